"""Rotary position embedding (RoPE), NeoX/HF "rotate half" layout.

cos/sin are computed once per forward pass from the flat ``positions`` (all layers share
them), in float32 exactly like transformers does, then cast to the activation dtype.
Supported scalings: ``default``, ``linear``, Llama 3.1's ``llama3`` and ``yarn`` (Qwen's
long-context setting; static, like transformers: it also scales cos/sin by an attention factor).
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
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
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


def rope_attention_factor(scaling: dict[str, Any]) -> float:
    """Scale applied to cos/sin (1.0 except for yarn, whose paper scales attention logits)."""
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp in between."""
    factor = float(scaling["factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes num_rotations turns over the old context.
        return (head_dim * math.log(old_context_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: high frequency, kept as is (extrapolated)
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(torch.nn.Module):
    """Computes per-token cos/sin and rotates q/k heads."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any], device: torch.device | str) -> None:
        super().__init__()
        self.head_dim = head_dim
        # A buffer (not a parameter) so load_weights never expects it and .to() moves it.
        self.register_buffer(
            "inv_freq", rope_inv_freq(head_dim, theta, scaling).to(device), persistent=False
        )
        self.attention_factor = rope_attention_factor(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) int64 positions -> cos, sin of shape (T, 1, D/2), broadcastable over heads."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2) fp32
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, H, D) heads by (T, 1, D/2) cos/sin; returns a new contiguous tensor."""
    x1, x2 = x.chunk(2, dim=-1)  # (T, H, D/2) each
    if torch.compiler.is_compiling():  # the compiler fuses this into one loop; out= would break the graph
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    # First half: x1*cos - x2*sin; second half: x2*cos + x1*sin (HF's rotate_half).
    torch.mul(x1, cos, out=o1)
    o1.sub_(x2 * sin)
    torch.mul(x2, cos, out=o2)
    o2.add_(x1 * sin)
    return out


def rotate_qk(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, H_kv, D)
    cos: torch.Tensor,  # (T, 1, D/2)
    sin: torch.Tensor,  # (T, 1, D/2)
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fresh contiguous (T, H, D), (T, H_kv, D)
    """Rotate q and k; ``fused`` does both in one Triton launch (``kernels.rotary``)."""
    if fused:
        # Imported here: kernels/ needs triton, which CPU-only installs may lack.
        from kernels.rotary import rotary_embedding  # noqa: PLC0415

        return rotary_embedding(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
