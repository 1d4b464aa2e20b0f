"""Store new tokens' K/V into the paged cache by slot mapping (nano-vllm's ``store_kvcache``).

Slot ``s`` is row ``s % block_size`` of block ``s // block_size``. A negative slot means
"padding token, store nothing" (CUDA-graph decode batches are padded to a captured size).
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


def store_kv_reference(
    k: torch.Tensor,  # (T, H_kv, D)
    v: torch.Tensor,  # (T, H_kv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    slot_mapping: torch.Tensor,  # (T,) int64, -1 = skip
) -> None:
    """Pure-torch reference: ``index_copy_`` of every kept token into its flat slot."""
    num_blocks, block_size, h_kv, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slots, k[keep])
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slots, v[keep])


@lazy_jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    ROW: tl.constexpr,  # H_kv * D: elements per token
    BLOCK: tl.constexpr,  # next power of two >= ROW
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        # The cache is dense in (block_size, H_kv, D), so a slot is just a row index.
        dst = slot.to(tl.int64) * ROW + offs
        key = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
        val = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + dst, key, mask=mask)
        tl.store(v_cache_ptr + dst, val, mask=mask)


def store_kv(
    k: torch.Tensor,  # (T, H_kv, D)
    v: torch.Tensor,  # (T, H_kv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    slot_mapping: torch.Tensor,  # (T,) int64, -1 = skip
) -> None:
    """Triton store: validate, then one program per token copies its K and V rows."""
    name = "store_kv"
    check_launchable(name, k, v, k_cache, v_cache, slot_mapping)
    check_shape(name, "k_cache", k_cache, (None, None, None, None))
    nb, bs, h_kv, d = k_cache.shape
    t = k.shape[0]
    check_shape(name, "v_cache", v_cache, (nb, bs, h_kv, d))
    check_shape(name, "k", k, (t, h_kv, d))
    check_shape(name, "v", v, (t, h_kv, d))
    check_shape(name, "slot_mapping", slot_mapping, (t,))
    check_dtype(name, "k", k, FLOAT_DTYPES)
    for arg, x in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, arg, x, (k.dtype,))
    check_dtype(name, "slot_mapping", slot_mapping, (torch.int64,))
    check_inner_contiguous(name, "k", k, 2)
    check_inner_contiguous(name, "v", v, 2)
    # Flat slot addressing needs the whole cache dense, not just each block.
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError(f"{name}: k_cache and v_cache must be contiguous")
    if t == 0:
        return
    row = h_kv * d
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
        ROW=row, BLOCK=next_power_of_2(row),
    )
