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

from engine.models.cpu_linear import LinearKernel, onednn_linear, pack_onednn, run_kernel


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """An uninitialised, frozen parameter."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T (+ b)``; optionally the concatenation of several HF projections.

    Weights load in HF's ``(out, in)`` layout. On CPU the engine then picks, per shape, how
    to store and multiply them (``engine.models.cpu_linear``): kept as they are
    (``dense``), transposed to ``(in, out)`` (``dense_t``) or packed for oneDNN
    (``onednn``, the dense weight dropped). ``load`` works in the first two.
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
        self.in_features, self.out_features = in_features, offset
        self.kernel: LinearKernel = "dense"
        self.weight: nn.Parameter | None = empty_param(offset, in_features, dtype=dtype, device=device)
        self.bias = empty_param(offset, dtype=dtype, device=device) if bias else None
        # oneDNN's blocked copy of the weight (kernel "onednn"); an attribute, not a
        # parameter: it is opaque, never saved, never moved.
        self.packed: torch.Tensor | None = None
        # Its key for the compiled forward's ``kvferry::onednn_linear`` op (set when compiling).
        self.pack_key = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, in) -> (T, out)
        if self.packed is not None:
            if torch.compiler.is_compiling():  # opaque to the compiler: see engine.models.compiled
                return torch.ops.kvferry.onednn_linear(x, self.pack_key, self.bias)
            return onednn_linear(x, self.packed, self.bias)
        assert self.weight is not None
        return run_kernel(self.kernel, x, self.weight, self.bias)

    def out_weight(self) -> torch.Tensor:
        """The weight as an (out, in) view, whatever the storage layout (not once packed)."""
        if self.weight is None:
            raise ValueError("this linear's weight is packed for oneDNN: it has no dense copy")
        return self.weight.t() if self.kernel == "dense_t" else self.weight

    def use_kernel(self, kind: LinearKernel, packed: torch.Tensor | None = None) -> None:
        """Re-store the weight for ``kind`` (from ``dense``); ``packed`` reuses a ready oneDNN copy."""
        if kind == self.kernel:
            return
        if self.kernel != "dense" or self.weight is None:
            raise ValueError(f"linear kernel already set to {self.kernel!r}")
        if kind == "onednn":
            self.packed = packed if packed is not None else pack_onednn(self.weight)
            self.weight = None  # one copy of the weights: the dense one goes
        elif kind == "dense_t":
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=False)
        self.kernel = kind

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

    def keep_table(self) -> None:
        """Hold the tied head's (V, hidden) matrix ourselves (same storage, no copy).

        Called before the head packs its weight for oneDNN and drops the dense copy: the
        packed layout cannot be gathered by row, so the embedding keeps what it needs.
        """
        head = self.tied_head
        if head is not None:
            self.weight = nn.Parameter(head.out_weight().detach(), requires_grad=False)
            self._tied = []

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
        # With a tied (in, out) head ("dense_t") this gathers strided rows: ~80 us per
        # decode step for SmolLM2, far cheaper than a second copy of a 113 MB matrix.
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
