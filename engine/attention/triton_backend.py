"""Triton paged attention: the GPU backend (``attention_backend="triton"``).

Three launches per layer and step, all from ``kernels/``: store the new tokens' K/V by
slot mapping, paged decode attention (split over long contexts) for the decode tokens at
the head of the flat batch, and varlen prefill attention over cached prefix + new tokens
for the rest. Sizes come from the metadata's host-side lists, so a step never syncs on
the device. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests); use the
``torch`` backend there.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from kernels.paged_decode import paged_decode
from kernels.prefill_attention import prefill_attention
from kernels.store_kv import store_kv


class TritonAttentionBackend(AttentionBackend):
    """Store, paged decode and prefill-with-prefix, each one Triton kernel."""

    name = "triton"

    def __init__(self, graph_max_context_len: int | None = None, prefill_attention: str = "auto") -> None:
        # For CUDA-graph capture the decode grid must not depend on the step's data: with
        # this set (to max_model_len) the split count depends only on the batch size, and
        # padded decode slots (slot -1, context length 1) are harmless. None sizes the grid
        # from each step's longest context, which is cheaper without graphs.
        self.graph_max_context_len = graph_max_context_len
        if prefill_attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"prefill_attention must be auto, triton or sdpa, got {prefill_attention!r}")
        self.prefill_attention = prefill_attention

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,  # (T, H_kv, D)
        k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
        v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, H, D)
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(
                f"k_cache block size {k_cache.shape[1]} != metadata block size {meta.block_size}"
            )
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, H, D), dense
        nd = meta.num_decode_tokens
        if nd:
            paged_decode(
                q[:nd], k_cache, v_cache,
                meta.decode_block_tables, meta.decode_context_lens, scale,
                max_context_len=self.graph_max_context_len or max(meta.decode_context_lens_list),
                out=out[:nd],
            )
        if meta.num_prefills:
            prefill_attention(
                q[nd:], k_cache, v_cache,
                meta.prefill_block_tables, meta.prefill_query_start_loc,
                meta.prefill_context_lens, scale,
                max_query_len=max(meta.prefill_query_lens_list),
                out=out[nd:],
            )
        return out
