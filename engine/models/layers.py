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


class Linear(nn.Module):
    """``y = x W^T (+ b)``; optionally the concatenation of several HF projections."""

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
        # name of each fused HF projection -> (row offset, rows) in our weight.
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight = empty_param(offset, in_features, dtype=dtype, device=device)
        self.bias = empty_param(offset, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, in) -> (T, out)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, with an optional fused residual add."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., size) -> (..., size)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32 and cast back *before* scaling, as HF does.
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return y * self.weight

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual += x`` in place (the residual stream is ours), return (norm(residual), residual)."""
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
