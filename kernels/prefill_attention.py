"""Prefill attention over a cached prefix plus new tokens, for a variable-length batch.

Sequence ``i`` brings ``Q_i`` new query tokens; its context (``C_i`` tokens, the cached
prefix and the new tokens, all already stored in the paged cache) is read through its
block table. Query ``r`` sits at absolute position ``C_i - Q_i + r`` and sees keys
``0..C_i - Q_i + r`` (causal, bottom-right aligned). Queries are flat: sequence ``i``
owns rows ``query_start_loc[i]:query_start_loc[i + 1]`` of ``q``.

A program owns one (sequence, tile of BLOCK_M queries, query head) and walks key tiles
only up to the tile's last query position, so the causal upper triangle is never read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import (
    FLOAT_DTYPES,
    check_paged_layout_and_out,
    check_dtype,
    check_launchable,
    check_shape,
    lazy_jit,
    next_power_of_2,
)

BLOCK_M = 64
BLOCK_N = 64


def prefill_attention_reference(
    q: torch.Tensor,  # (T, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    query_start_loc: torch.Tensor,  # (B + 1,) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
) -> torch.Tensor:  # (T, H, D)
    """Pure-torch reference: per sequence, gather its context and run masked SDPA."""
    bs = k_cache.shape[1]
    h, h_kv = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(block_tables.shape[0]):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        ctx, qlen = int(context_lens[i]), end - start
        table = block_tables[i, : (ctx + bs - 1) // bs].long()
        keys = k_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).float()  # (H_kv, C, D)
        vals = v_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).float()
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # (Q, C)
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).float(), keys, vals,
            attn_mask=mask, scale=scale, enable_gqa=h != h_kv,
        )  # (H, Q, D)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


@lazy_jit
def _prefill_attention_kernel(
    q_ptr,  # (T, H, D)
    k_cache_ptr,  # (num_blocks, block_size, H_kv, D), dense
    v_cache_ptr,
    block_tables_ptr,  # (B, max_blocks) int32
    query_start_loc_ptr,  # (B + 1,) int32
    context_lens_ptr,  # (B,) int32
    out_ptr,  # (T, H, D)
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    H_KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        ctx = tl.load(context_lens_ptr + seq)
        prefix = ctx - q_len
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
        r_mask = r < q_len
        q_pos = prefix + r  # absolute positions
        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        rows = (q_start + r).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        row: tl.constexpr = H_KV * D
        n = tl.arange(0, BLOCK_N)
        # Keys past the tile's last query are causally invisible to every row of the tile.
        hi = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            pos = start + n  # (BLOCK_N,) key positions
            n_mask = pos < hi
            block_ids = tl.load(
                block_tables_ptr + seq.to(tl.int64) * stride_bt + pos // BLOCK_SIZE,
                mask=n_mask,
                other=0,
            )
            tok = block_ids.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_offs = tok[:, None] * row + kvh * D + d[None, :]  # (BLOCK_N, BLOCK_D)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N)
            # Key 0 is visible to every row (even padding rows), so no row is all -inf.
            visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        o = acc / l_i[:, None]
        dst = out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,  # (T, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    query_start_loc: torch.Tensor,  # (B + 1,) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,  # (T, H, D)
) -> torch.Tensor:  # (T, H, D)
    """Triton varlen prefill attention with a paged, possibly cached, prefix.

    ``max_query_len`` sizes the grid; pass it from host-side bookkeeping to avoid a
    device sync (without it the bound is ``T``, which launches idle programs).
    """
    name = "prefill_attention"
    check_launchable(name, q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    check_shape(name, "q", q, (None, None, None))
    check_shape(name, "k_cache", k_cache, (None, None, None, q.shape[2]))
    t, h, d = q.shape
    nb, bs, h_kv, _ = k_cache.shape
    batch = block_tables.shape[0] if block_tables.dim() == 2 else -1
    check_shape(name, "v_cache", v_cache, (nb, bs, h_kv, d))
    check_shape(name, "block_tables", block_tables, (None, None))
    check_shape(name, "query_start_loc", query_start_loc, (batch + 1,))
    check_shape(name, "context_lens", context_lens, (batch,))
    check_dtype(name, "q", q, FLOAT_DTYPES)
    check_dtype(name, "k_cache", k_cache, (q.dtype,))
    check_dtype(name, "v_cache", v_cache, (q.dtype,))
    for arg, x in (
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("context_lens", context_lens),
    ):
        check_dtype(name, arg, x, (torch.int32,))
    out = check_paged_layout_and_out(name, q, k_cache, v_cache, block_tables, out)
    if batch == 0 or t == 0:
        return out
    if max_query_len is None:
        max_query_len = t
    grid = (batch, triton.cdiv(max_query_len, BLOCK_M), h)
    block_d = max(16, next_power_of_2(d))
    # Rows wider than 512 bytes (fp32 at head_dim 256) make the pipelined K/V tiles need
    # more shared memory than an H100 SM has (~320 KB at 2 or 3 stages): don't pipeline.
    num_stages = 1 if block_d * q.element_size() > 512 else 3
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        H_KV=h_kv, D=d, BLOCK_SIZE=bs, GROUP=h // h_kv,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_stages=num_stages,
    )
    return out
