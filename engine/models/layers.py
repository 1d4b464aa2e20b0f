"""Building blocks of the decoder: uninitialised linear, RMSNorm, fused SwiGLU MLP.

Parameters are allocated with ``torch.empty`` (no random init: the checkpoint overwrites
them, and initialising a large model would cost seconds) and never require grad.
Fused projections hold several HF weights concatenated along the output dimension;
``shard_offsets`` tells ``load_weights`` where each HF weight lands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """An uninitialised, frozen parameter."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def transposed_layout(device: torch.device | str) -> bool:
    """Whether linear weights are stored as (in, out) on ``device``.

    On CPU, MKL's sgemm is up to ~2x faster for the skinny ``x @ W`` of decode steps
    (M = batch size) when ``W`` is stored (in, out) rather than HF's (out, in); it is never
    slower for prefill-sized M. GPUs keep HF's layout (cuBLAS is layout-agnostic).
    """
    return torch.device(device).type == "cpu"


class Linear(nn.Module):
    """``y = x W^T (+ b)``; optionally the concatenation of several HF projections.

    ``weight`` is (out, in) like HF's, or (in, out) when ``transposed`` (see
    ``transposed_layout``); ``load`` hides the difference from the checkpoint loader.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: dict[str, int] | int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        sizes = out_sizes if isinstance(out_sizes, dict) else {"": out_sizes}
        # name of each fused HF projection -> (offset, size) along our output dimension.
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.transposed = transposed_layout(device)
        shape = (in_features, offset) if self.transposed else (offset, in_features)
        self.weight = empty_param(*shape, dtype=dtype, device=device)
        self.bias = empty_param(offset, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, in) -> (T, out)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)

    def out_weight(self) -> torch.Tensor:
        """The weight as an (out, in) view, whatever the storage layout."""
        return self.weight.t() if self.transposed else self.weight

    def load(self, shard: str, kind: str, tensor: torch.Tensor) -> int:
        """Copy HF tensor ``kind`` ("weight"/"bias") of projection ``shard``; return elements written."""
        offset, size = self.shard_offsets[shard]
        if kind == "bias":
            if self.bias is None:
                raise ValueError("the config says this projection has no bias")
            dst = self.bias.narrow(0, offset, size)
        else:
            dst = self.out_weight().narrow(0, offset, size)  # (size, in) view
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)  # casts dtype, moves device, transposes through the view
        return dst.numel()


class Embedding(nn.Module):
    """Token embedding table (V, hidden), or a view of a tied ``lm_head``'s weight."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = empty_param(vocab_size, hidden_size, dtype=dtype, device=device)
        # Held in a list so the tied head is not registered (and loaded) as our submodule.
        self._tied: list[Linear] = []

    def tie_to(self, head: Linear) -> None:
        """Share ``head``'s weight (tied embeddings): one matrix, whichever layout it has."""
        self.weight = None
        self._tied = [head]

    @property
    def tied_head(self) -> Linear | None:
        return self._tied[0] if self._tied else None

    def table(self) -> torch.Tensor:
        """(V, hidden) view of the embedding matrix."""
        head = self.tied_head
        if head is not None:
            return head.out_weight()
        assert self.weight is not None
        return self.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, hidden)
        # With a tied (in, out) head this gathers strided rows: ~80 us per decode step for
        # SmolLM2, far cheaper than keeping a second copy of a 113 MB matrix.
        return F.embedding(input_ids, self.table())


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, with an optional fused residual add."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:  # (..., size) -> (..., size)
        """Normalise ``x``; ``fused`` runs the Triton kernel (``ForwardContext.fused_kernels``)."""
        if fused:
            # Imported here: kernels/ needs triton, which CPU-only installs may lack.
            from kernels.rms_norm import rms_norm  # noqa: PLC0415

            return rms_norm(x, self.weight, self.eps)  # fresh contiguous, same semantics
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32 and cast back *before* scaling, as HF does.
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return y * self.weight

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual += x`` in place (the residual stream is ours), return (norm(residual), residual).

        ``fused`` does both in one Triton pass (``kernels.rms_norm.fused_add_rms_norm``).
        """
        if fused:
            from kernels.rms_norm import fused_add_rms_norm  # noqa: PLC0415

            return fused_add_rms_norm(x, residual, self.weight, self.eps), residual
        residual.add_(x)
        return self(residual), residual


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias, dtype, device
        )
        self.down_proj = Linear(intermediate_size, hidden_size, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        act = F.silu(gate_up[:, : self.intermediate_size])  # (T, I), fresh contiguous buffer
        act.mul_(gate_up[:, self.intermediate_size :])  # in place: act is ours
        return self.down_proj(act)
