"""Rotary position embedding (NeoX/HF "rotate half" layout) of q and k in one launch.

The torch path (``engine.models.rotary.apply_rotary``) runs four elementwise kernels per
tensor plus temporaries, twice (q and k). Here one program per token loads that token's
cos/sin once and rotates all of its q heads and k heads, reading q/k straight from their
strided views of the fused QKV projection and writing fresh contiguous outputs.

cos/sin are (T, 1, D/2), exactly what ``RotaryEmbedding.cos_sin`` returns (already in the
activation dtype), so the engine passes them through untouched. The kernel computes each
output in fp32 and rounds once; the torch path rounds after every op, so half-precision
results may differ from it by one unit in the last place (fp32 agrees to rounding).
"""

from __future__ import annotations

import torch
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


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, H, D) heads by (T, 1, D/2) cos/sin; the engine's torch ops, op for op."""
    x1, x2 = x.chunk(2, dim=-1)  # (T, H, D/2) each
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    # First half: x1*cos - x2*sin; second half: x2*cos + x1*sin (HF's rotate_half).
    torch.mul(x1, cos, out=o1)
    o1.sub_(x2 * sin)
    torch.mul(x2, cos, out=o2)
    o2.add_(x1 * sin)
    return out


def rotary_embedding_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`rotary_embedding`."""
    return apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin)


@lazy_jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,  # (T, H, D) contiguous
    k_out_ptr,  # (T, H_KV, D) contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    H: tl.constexpr,
    H_KV: tl.constexpr,
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # next power of two >= H + H_KV
    BLOCK_D: tl.constexpr,  # next power of two >= D / 2
):
    t = tl.program_id(0).to(tl.int64)
    # Tile rows 0..H-1 are the q heads, H..H+H_KV-1 the k heads: one tile, no branches.
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    kh = offs_h - H  # k head of each row (negative on q rows: masked there)
    is_q = (offs_h < H)[:, None] & d_mask[None, :]  # (BLOCK_H, BLOCK_D)
    is_k = ((offs_h >= H) & (offs_h < H + H_KV))[:, None] & d_mask[None, :]
    q_src = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    k_src = k_ptr + t * stride_kt + kh[:, None] * stride_kh + offs_d[None, :]
    x1 = tl.where(
        is_q,
        tl.load(q_src, mask=is_q, other=0.0).to(tl.float32),
        tl.load(k_src, mask=is_k, other=0.0).to(tl.float32),
    )  # first halves, (BLOCK_H, BLOCK_D)
    x2 = tl.where(
        is_q,
        tl.load(q_src + HALF, mask=is_q, other=0.0).to(tl.float32),
        tl.load(k_src + HALF, mask=is_k, other=0.0).to(tl.float32),
    )  # second halves
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    q_dst = q_out_ptr + t * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    k_dst = k_out_ptr + t * (H_KV * 2 * HALF) + kh[:, None] * (2 * HALF) + offs_d[None, :]
    out_ty = q_out_ptr.dtype.element_ty
    tl.store(q_dst, o1.to(out_ty), mask=is_q)
    tl.store(q_dst + HALF, o2.to(out_ty), mask=is_q)
    tl.store(k_dst, o1.to(out_ty), mask=is_k)
    tl.store(k_dst + HALF, o2.to(out_ty), mask=is_k)


def rotary_embedding(
    q: torch.Tensor,  # (T, H, D), last dim contiguous (a view of the QKV output is fine)
    k: torch.Tensor,  # (T, H_kv, D), last dim contiguous
    cos: torch.Tensor,  # (T, 1, D/2), q's dtype
    sin: torch.Tensor,  # (T, 1, D/2), q's dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # fresh contiguous (T, H, D), (T, H_kv, D)
    """Triton RoPE of q and k in one launch: one program per token rotates all its heads."""
    name = "rotary_embedding"
    check_launchable(name, q, k, cos, sin)
    check_shape(name, "q", q, (None, None, None))
    t, h, d = q.shape
    if d % 2:
        raise ValueError(f"{name}: head_dim must be even, got {d}")
    check_shape(name, "k", k, (t, None, d))
    check_shape(name, "cos", cos, (t, 1, d // 2))
    check_shape(name, "sin", sin, (t, 1, d // 2))
    check_dtype(name, "q", q, FLOAT_DTYPES)
    for arg, x in (("k", k), ("cos", cos), ("sin", sin)):
        check_dtype(name, arg, x, (q.dtype,))
    for arg, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_inner_contiguous(name, arg, x, 1)
    h_kv = k.shape[1]
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, h_kv, d), dtype=k.dtype, device=k.device)
    if t == 0 or d == 0 or h + h_kv == 0:
        return q_out, k_out
    block_h, block_d = next_power_of_2(h + h_kv), next_power_of_2(d // 2)
    _rotary_kernel[(t,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        H=h, H_KV=h_kv, HALF=d // 2, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(8, block_h * block_d // 512)),
    )
    return q_out, k_out
