"""Paged decode attention: one query token per sequence against its paged K/V (GQA).

Flash-decoding: each sequence's context is cut into ``num_splits`` token ranges that run
in parallel (a batch of a few long sequences would otherwise leave most SMs idle); each
split writes a partial output and its log-sum-exp, and a second kernel merges them.
With one split the first kernel writes the final output directly (no second launch).
The ranges are sized per sequence, in the kernel, from its own context length: a grid
sized for a far larger bound (CUDA graphs size it for ``max_model_len``) still spreads a
short context over the splits instead of leaving it whole in split 0.

A program owns one (sequence, KV head, split) and all ``H // H_kv`` query heads that
share the KV head, so K/V are read once per group. Key tiles are gathered token by token
through the block table, so the tile width is independent of the KV block size.
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

# Key tile width: wide enough for tensor cores, narrow enough that short contexts waste little.
BLOCK_N = 64
# Aim for about this many programs in flight before splitting contexts further (~2 waves
# on a 132-SM H100); more splits add merge traffic for no gain.
TARGET_PROGRAMS = 256
# A split shorter than this many tokens costs more in merging than it saves.
MIN_TOKENS_PER_SPLIT = 256
# Splits the merge kernel combines per iteration (x head_dim fp32 values in registers).
MERGE_BLOCK_S = 16


def paged_decode_reference(
    q: torch.Tensor,  # (B, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
) -> torch.Tensor:  # (B, H, D)
    """Pure-torch reference: gather each sequence's context and run SDPA, one at a time."""
    bs = k_cache.shape[1]
    h, h_kv = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        table = block_tables[b, : (n + bs - 1) // bs].long()
        keys = k_cache[table].flatten(0, 1)[:n].transpose(0, 1)  # (H_kv, n, D)
        vals = v_cache[table].flatten(0, 1)[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[b][:, None].float(), keys.float(), vals.float(), scale=scale, enable_gqa=h != h_kv
        )  # (H, 1, D)
        out[b] = o[:, 0].to(q.dtype)
    return out


@lazy_jit
def _paged_decode_kernel(
    q_ptr,  # (B, H, D)
    k_cache_ptr,  # (num_blocks, block_size, H_kv, D), dense
    v_cache_ptr,
    block_tables_ptr,  # (B, max_blocks) int32
    context_lens_ptr,  # (B,) int32
    out_ptr,  # (B, H, D) when SINGLE_SPLIT else partial (B, H, num_splits, D) fp32
    lse_ptr,  # (B, H, num_splits) fp32 (unused when SINGLE_SPLIT)
    scale_log2,  # softmax scale * log2(e): scores go through exp2
    stride_qb,
    stride_qh,
    stride_ob,  # out's strides (used only when SINGLE_SPLIT)
    stride_oh,
    stride_bt,
    num_splits,
    H: tl.constexpr,
    H_KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    # Whole key tiles per split, so only the last tile of a split is ragged. A context of
    # 0 tokens (or one shorter than the splits) leaves splits empty: lo >= hi.
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(ctx, lo + per_split)

    g = tl.arange(0, BLOCK_G)  # query heads of this KV group
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < D
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    row: tl.constexpr = H_KV * D  # elements per cached token
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,) token positions
        n_mask = pos < hi
        block_ids = tl.load(
            block_tables_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=n_mask, other=0
        )
        tok = block_ids.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # flat slot
        kv_offs = tok[:, None] * row + kvh * D + d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    nonempty = l_i > 0
    o = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        dst = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part = (b.to(tl.int64) * H + heads) * num_splits + split  # (BLOCK_G,)
        tl.store(out_ptr + part[:, None] * D + d[None, :], o, mask=o_mask)
        # log2-sum-exp2 of the scaled scores; -inf marks an empty split.
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=g_mask)


@lazy_jit
def _merge_splits_kernel(
    partial_ptr,  # (B, H, num_splits, D) fp32
    lse_ptr,  # (B, H, num_splits) fp32, log2 domain
    out_ptr,  # (B, H, D)
    stride_ob,
    stride_oh,
    num_splits,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    base = (b.to(tl.int64) * H + h) * num_splits  # row of split 0
    # Splits are walked BLOCK_S at a time: a (num_splits, D) tile of up to 256 x 128 fp32
    # would not fit in registers.
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        lse = tl.load(lse_ptr + base + s0 + s, mask=s0 + s < num_splits, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_max = tl.max(m, 0)
    # Every split empty (a context of 0 tokens): use 0, not -inf, so exp2 gives weights of
    # 0 instead of NaN from -inf - -inf; the output row is then 0, as with one split.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_mask = s0 + s < num_splits
        w = tl.exp2(tl.load(lse_ptr + base + s0 + s, mask=s_mask, other=float("-inf")) - m_max)
        part = tl.load(
            partial_ptr + (base + s0 + s)[:, None] * D + d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        acc += tl.sum(part * w[:, None], 0)
        w_sum += w
    total = tl.sum(w_sum, 0)
    o = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)
    dst = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(batch: int, num_kv_heads: int, max_context_len: int) -> int:
    """Splits per sequence: enough programs to fill the GPU, none shorter than the minimum."""
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    by_occupancy = max(1, TARGET_PROGRAMS // max(1, batch * num_kv_heads))
    return min(by_length, by_occupancy)


def paged_decode(
    q: torch.Tensor,  # (B, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
    *,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # (B, H, D)
) -> torch.Tensor:  # (B, H, D)
    """Triton paged decode attention.

    ``max_context_len`` bounds every ``context_lens`` entry; pass it (or ``num_splits``)
    from host-side bookkeeping so the launch never syncs on the device — and pass fixed
    values when capturing a CUDA graph, since the grid is baked into the graph. Without
    it the bound is the whole block table.
    """
    out = _check_args(q, k_cache, v_cache, block_tables, context_lens, out)
    batch, h, d = q.shape
    _, bs, h_kv, _ = k_cache.shape
    if batch == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * bs
    num_splits = _num_useful_splits(max(1, max_context_len), num_splits, batch, h_kv)
    group = h // h_kv
    consts = dict(
        H=h, H_KV=h_kv, D=d, BLOCK_SIZE=bs, GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_D=max(16, next_power_of_2(d)),
        BLOCK_N=BLOCK_N,
    )
    scale_log2 = scale * math.log2(math.e)
    if num_splits == 1:
        _paged_decode_kernel[(batch, h_kv, 1)](
            q, k_cache, v_cache, block_tables, context_lens, out, out, scale_log2,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), 1,
            SINGLE_SPLIT=True, **consts,
        )
        return out
    partial = torch.empty(batch, h, num_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, h, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, h_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse, scale_log2,
        q.stride(0), q.stride(1), 0, 0, block_tables.stride(0), num_splits,
        SINGLE_SPLIT=False, **consts,
    )
    _merge_splits_kernel[(batch, h)](
        partial, lse, out, out.stride(0), out.stride(1), num_splits,
        H=h, D=d, BLOCK_S=min(MERGE_BLOCK_S, next_power_of_2(num_splits)), BLOCK_D=next_power_of_2(d),
    )
    return out


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Shapes, dtypes and strides of :func:`paged_decode`'s arguments; returns ``out``."""
    name = "paged_decode"
    check_launchable(name, q, k_cache, v_cache, block_tables, context_lens)
    check_shape(name, "q", q, (None, None, None))
    check_shape(name, "k_cache", k_cache, (None, None, None, q.shape[2]))
    batch, _, d = q.shape
    nb, bs, h_kv, _ = k_cache.shape
    check_shape(name, "v_cache", v_cache, (nb, bs, h_kv, d))
    check_shape(name, "block_tables", block_tables, (batch, None))
    check_shape(name, "context_lens", context_lens, (batch,))
    check_dtype(name, "q", q, FLOAT_DTYPES)
    check_dtype(name, "k_cache", k_cache, (q.dtype,))
    check_dtype(name, "v_cache", v_cache, (q.dtype,))
    check_dtype(name, "block_tables", block_tables, (torch.int32,))
    check_dtype(name, "context_lens", context_lens, (torch.int32,))
    return check_paged_layout_and_out(name, q, k_cache, v_cache, block_tables, out)


def _num_useful_splits(max_context_len: int, num_splits: int | None, batch: int, num_kv_heads: int) -> int:
    """``num_splits`` (or the occupancy-based choice) minus the splits every context leaves empty."""
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context_len)
    if num_splits < 1:
        raise ValueError(f"paged_decode: num_splits must be positive, got {num_splits}")
    # The kernel sizes each sequence's splits from its own length, in whole BLOCK_N tiles,
    # so splits past the longest context's last tile would only compute nothing.
    longest_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(max_context_len, longest_split)
