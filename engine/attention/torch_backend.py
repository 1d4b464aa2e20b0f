"""Pure-torch paged attention (SDPA): the CPU default and every kernel's reference.

Decode sequences are served by one batched SDPA call over their gathered, padded
contexts; each prefill chunk gets its own call (there are few per step, and padding a
long chunk against short ones would waste the step).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.decode_staging import DecodeStaging


def store_kv_reference(
    k: torch.Tensor,  # (T, H_kv, D)
    v: torch.Tensor,  # (T, H_kv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64
) -> None:
    """Write each token's K/V into its flat slot (reference for the Triton store kernel)."""
    num_blocks, block_size, h_kv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, v)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """(num_blocks, bs, H_kv, D) + (nb,) -> (length, H_kv, D) of one sequence."""
    bs = cache.shape[1]
    nb = (length + bs - 1) // bs
    return _gather_blocks(cache, block_table[:nb]).flatten(0, 1)[:length]


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """(num_blocks, bs, H_kv, D) + block ids of any shape S -> (*S, bs, H_kv, D).

    index_select over whole flattened blocks is a row memcpy; advanced indexing
    (``cache[ids]``) is ~1.6x slower on CPU for the same bytes.
    """
    nblk = cache.shape[0]
    rows = cache.view(nblk, -1).index_select(0, block_ids.reshape(-1).long())
    return rows.view(*block_ids.shape, *cache.shape[1:])


class TorchAttentionBackend(AttentionBackend):
    """SDPA over K/V gathered from the paged cache."""

    name = "torch"

    def __init__(self, stage_decode: bool = True) -> None:
        # Keeps the decode batch's K/V contiguous across steps (see decode_staging).
        self._staging = DecodeStaging() if stage_decode else None
        # The decode padding mask of the step whose metadata this refers to (weakly).
        self._pad_meta: weakref.ref | None = None
        self._pad: torch.Tensor | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd and not meta.num_prefills:  # decode-only step: no output buffer to fill
            return self._decode(q, k, v, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k[:nd], v[:nd], k_cache, v_cache, meta, scale)
        if meta.num_prefills:
            start = nd
            for i, (qlen, ctx) in enumerate(
                zip(meta.prefill_query_lens_list, meta.prefill_context_lens_list)
            ):
                qi = q[start : start + qlen]  # (Q, H, D)
                if qlen == ctx:  # nothing cached before this chunk: its own K/V is the context
                    ki, vi = k[start : start + qlen], v[start : start + qlen]
                else:
                    table = meta.prefill_block_tables[i]
                    ki = _gather_context(k_cache, table, ctx)  # (C, H_kv, D)
                    vi = _gather_context(v_cache, table, ctx)
                out[start : start + qlen] = _causal_sdpa(qi, ki, vi, scale)
                start += qlen
        return out

    def _decode(
        self,
        q: torch.Tensor,  # (B, H, D)
        k_new: torch.Tensor,  # (B, H_kv, D)
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        lens = meta.decode_context_lens_list
        max_len = max(lens)
        b, h = q.shape[0], q.shape[1]
        staged = None
        if self._staging is not None:
            staged = self._staging.keys_values(
                k_new, v_new, k_cache, v_cache, meta.decode_block_tables, lens, meta.decode_context_lens, meta
            )
        if staged is not None:
            keys, vals = staged  # (B, H_kv, L, D)
        else:
            bs = k_cache.shape[1]
            tables = meta.decode_block_tables[:, : (max_len + bs - 1) // bs]  # (B, nb)
            keys = _gather_blocks(k_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)  # (B, H_kv, L, D)
            vals = _gather_blocks(v_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)
        h_kv = keys.shape[1]
        g = h // h_kv
        # Decode attention as two batched matmuls per KV head group: (B, H_kv, G, D) queries
        # against (B, H_kv, L, D) keys. SDPA's GQA path expands K/V to H heads first, which
        # on CPU costs more than the attention itself (memory-bound: ~25% slower here).
        qg = q.view(b, h_kv, g, -1)  # (B, H_kv, G, D); head i uses KV head i // G, as in HF
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale)  # (B, H_kv, G, L)
        pad = self._padding(meta, max_len, q.device)
        if pad is not None:  # ragged batch: hide each row's padding
            scores.masked_fill_(pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vals.dtype)
        out = torch.matmul(probs, vals)  # (B, H_kv, G, D)
        return out.reshape(b, h, -1)

    def _padding(self, meta: AttentionMetadata, max_len: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, 1, L) True where a decode row's context has ended; None when none is ragged.

        Built at a step's first layer and reused by the others (they share ``meta``).
        """
        if self._pad_meta is not None and self._pad_meta() is meta:
            return self._pad
        lens = meta.decode_context_lens_list
        pad = None
        if min(lens) != max_len:
            pos = torch.arange(max_len, device=device)
            pad = (pos[None, :] >= meta.decode_context_lens[:, None].to(device))[:, None, None, :]
        self._pad_meta, self._pad = weakref.ref(meta), pad
        return pad


def _causal_sdpa(
    q: torch.Tensor,  # (Q, H, D): the last Q positions of a context of length C
    k: torch.Tensor,  # (C, H_kv, D)
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # (Q, H, D)
    qlen, ctx = q.shape[0], k.shape[0]
    h, h_kv = q.shape[1], k.shape[1]
    # 4-D (1, H, T, D) on purpose: torch's fused CPU kernel only takes batched inputs; 3-D
    # inputs fall back to the unfused math path, which is ~10x slower here.
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, D)
    if qlen == ctx:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=h != h_kv
        )
    else:
        # Query i sits at absolute position ctx - qlen + i and sees keys 0..that position.
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=kpos <= qpos, scale=scale, enable_gqa=h != h_kv
        )
    return out[0].transpose(0, 1)
