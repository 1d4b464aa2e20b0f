"""RMSNorm over the last dim, optionally fused with the residual add before it.

``fused_add_rms_norm`` replaces the decoder's ``residual += x; norm(residual)`` (two or
more torch kernels, each reading the activations again) with one pass: one program per
row reads x and the residual, writes the sum back into the residual and the normalised
row into a fresh output. ``rms_norm`` is the same without the add; it also serves
Qwen3's per-head q/k norm on (T, H, D) views of the fused QKV projection.

Dtype semantics are HF's: the statistics are computed in fp32; in half precision the
normalised value is rounded to the dtype *before* the weight multiply (and the product
rounded again), exactly what ``engine.models.layers.RMSNorm`` does with torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl

from kernels.launch import (
    FLOAT_DTYPES,
    check_dtype,
    check_inner_contiguous,
    check_launchable,
    check_shape,
    lazy_jit,
    next_power_of_2,
)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch reference (``RMSNorm.forward``'s ops): (..., N) -> (..., N)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # Half precision: normalise in fp32 and cast back *before* scaling, as HF does.
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Pure-torch reference: ``residual += x`` in place, return ``rms_norm(residual)``."""
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps)


@lazy_jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # the residual (read and written) when ADD_RESIDUAL, else unused
    w_ptr,
    out_ptr,  # (A, B, N) contiguous
    stride_xa,
    stride_xb,
    stride_ra,
    num_b,  # B: rows per leading index (heads for q/k norm, 1 otherwise)
    eps,
    N: tl.constexpr,  # the normalised size
    BLOCK: tl.constexpr,  # next power of two >= N
    ADD_RESIDUAL: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + offs, mask=mask, other=0.0)  # (BLOCK,)
    if ADD_RESIDUAL:
        r_ptrs = res_ptr + a * stride_ra + offs
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        # torch's in-place half add: sum in fp32, round once to the dtype. The norm then
        # reads the rounded sum, as the unfused path reads the updated residual.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(r_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N  # masked lanes are 0 and add nothing
    # Round to the output dtype before the weight multiply (a no-op in fp32), like HF.
    y = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (a * num_b + b) * N + offs, out, mask=mask)


def _num_warps(block: int) -> int:
    # One warp for a 128-wide head row (no cross-warp reduction); 8 for a 4096-wide hidden.
    return max(1, min(8, block // 256))


def _check_weight(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    check_dtype(name, "x", x, FLOAT_DTYPES)
    check_shape(name, "weight", weight, (x.shape[-1],))
    check_dtype(name, "weight", weight, (x.dtype,))
    check_inner_contiguous(name, "weight", weight, 1)
    check_inner_contiguous(name, "x", x, 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm of each row of the last dim: (T, N) or (T, H, N) -> fresh contiguous.

    ``x`` may be strided (a head view of the fused QKV output) as long as its last dim is
    contiguous. One program per row.
    """
    name = "rms_norm"
    check_launchable(name, x, weight)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: x must be (T, N) or (T, H, N), got shape {tuple(x.shape)}")
    _check_weight(name, x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (A, B, N)
    a, b, n = x3.shape
    block = next_power_of_2(n)
    _rms_norm_kernel[(a, b)](
        x3, x3, weight, out, x3.stride(0), x3.stride(1), 0, b, eps,
        N=n, BLOCK=block, ADD_RESIDUAL=False, num_warps=_num_warps(block),
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # (T, N)
    residual: torch.Tensor,  # (T, N), updated in place
    weight: torch.Tensor,  # (N,)
    eps: float,
) -> torch.Tensor:  # (T, N) fresh contiguous
    """Triton ``residual += x`` (in place) then RMSNorm of the residual, in one pass."""
    name = "fused_add_rms_norm"
    check_launchable(name, x, residual, weight)
    check_shape(name, "x", x, (None, None))
    check_shape(name, "residual", residual, tuple(x.shape))
    _check_weight(name, x, weight)
    check_dtype(name, "residual", residual, (x.dtype,))
    check_inner_contiguous(name, "residual", residual, 1)
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    block = next_power_of_2(n)
    _rms_norm_kernel[(t, 1)](
        x, residual, weight, out, x.stride(0), 0, residual.stride(0), 1, eps,
        N=n, BLOCK=block, ADD_RESIDUAL=True, num_warps=_num_warps(block),
    )
    return out
