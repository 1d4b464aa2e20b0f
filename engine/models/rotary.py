"""Rotary position embedding (RoPE), NeoX/HF "rotate half" layout.

cos/sin are computed once per forward pass from the flat ``positions`` (all layers share
them), in float32 exactly like transformers does, then cast to the activation dtype.
Supported scalings: ``default``, ``linear`` and Llama 3.1's ``llama3``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Return the (head_dim // 2,) float32 inverse frequencies for a RoPE variant."""
    # Same expression as transformers' default init, so fp32 parity is exact.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Computes per-token cos/sin and rotates q/k heads."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any], device: torch.device | str) -> None:
        super().__init__()
        self.head_dim = head_dim
        # A buffer (not a parameter) so load_weights never expects it and .to() moves it.
        self.register_buffer(
            "inv_freq", rope_inv_freq(head_dim, theta, scaling).to(device), persistent=False
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) int64 positions -> cos, sin of shape (T, 1, D/2), broadcastable over heads."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2) fp32
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, H, D) heads by (T, 1, D/2) cos/sin; returns a new contiguous tensor."""
    x1, x2 = x.chunk(2, dim=-1)  # (T, H, D/2) each
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    # First half: x1*cos - x2*sin; second half: x2*cos + x1*sin (HF's rotate_half).
    torch.mul(x1, cos, out=o1)
    o1.sub_(x2 * sin)
    torch.mul(x2, cos, out=o2)
    o2.add_(x1 * sin)
    return out
