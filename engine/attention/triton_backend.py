"""Triton paged attention: the GPU backend (``attention_backend="triton"``).

Three launches per layer and step, all from ``kernels/``: store the new tokens' K/V by
slot mapping, paged decode attention (split over long contexts) for the decode tokens at
the head of the flat batch, and varlen prefill attention over cached prefix + new tokens
for the rest. Sizes come from the metadata's host-side lists, so a step never syncs on the
device. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests); use the
``torch`` backend there.

``prefill_attention`` picks how prefills are computed: ``"triton"`` runs the prefill
kernel for every prefill sequence; ``"sdpa"`` hands *fresh* sequences (nothing cached
before them: context length == query length) to torch SDPA on the dense new-token q/k/v
(``engine.attention.sdpa_prefill``) and keeps the kernel for sequences over a cached
prefix (prefix-cache hits, later chunks of a chunked prefill); ``"auto"`` is ``"sdpa"`` on
CUDA and ``"triton"`` elsewhere. CUDA graphs capture decode-only steps, so the choice
never enters a graph.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.sdpa_prefill import sdpa_fresh_prefill
from engine.config import PrefillAttention
from kernels.paged_decode import paged_decode
from kernels.prefill_attention import prefill_attention
from kernels.store_kv import store_kv


def prefill_runs(query_lens: list[int], context_lens: list[int]) -> list[tuple[int, int, bool]]:
    """``(first_seq, end_seq, fresh)`` for each run of consecutive prefill sequences that are
    all fresh (context == query) or all over a cached prefix, in batch order."""
    runs: list[tuple[int, int, bool]] = []
    for i, (qlen, ctx) in enumerate(zip(query_lens, context_lens)):
        fresh = qlen == ctx
        if runs and runs[-1][2] == fresh:
            runs[-1] = (runs[-1][0], i + 1, fresh)
        else:
            runs.append((i, i + 1, fresh))
    return runs


class TritonAttentionBackend(AttentionBackend):
    """Store, paged decode and prefill-with-prefix, each one Triton kernel (fresh prefills
    optionally through torch SDPA)."""

    name = "triton"

    def __init__(self, graph_max_context_len: int | None = None, prefill_attention: PrefillAttention = "auto") -> None:
        # For CUDA-graph capture the decode grid must not depend on the step's data: with
        # this set (to max_model_len) the split count depends only on the batch size, and
        # padded decode slots (slot -1, context length 1) are harmless. None sizes the grid
        # from each step's longest context, which is cheaper without graphs.
        self.graph_max_context_len = graph_max_context_len
        # Valid by construction: EngineConfig.prefill_attention is a Literal of the choices.
        self.prefill_attention = prefill_attention

    def resolved_prefill_attention(self, device: torch.device) -> str:
        """``"triton"`` or ``"sdpa"``: what ``prefill_attention`` means for tensors on ``device``."""
        if self.prefill_attention != "auto":
            return self.prefill_attention
        # On CUDA torch's flash / memory-efficient SDPA kernels are expected to beat our
        # simple prefill kernel on long fresh prompts -- an expectation, confirmed or refuted
        # per GPU by benchmarks/gpu/prefill_attention_choice.py (results/gpu_prefill_attention.json).
        # Elsewhere the kernel only runs interpreted (tests), and those tests should keep
        # exercising it, so "auto" stays on the kernel.
        return "sdpa" if torch.device(device).type == "cuda" else "triton"

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
            if self.resolved_prefill_attention(q.device) == "sdpa":
                self._prefill_split(q, k, v, k_cache, v_cache, meta, scale, out)
            else:
                prefill_attention(
                    q[nd:], k_cache, v_cache,
                    meta.prefill_block_tables, meta.prefill_query_start_loc,
                    meta.prefill_context_lens, scale,
                    max_query_len=max(meta.prefill_query_lens_list),
                    out=out[nd:],
                )
        return out

    def _prefill_split(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,
        k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,  # (T, H, D)
    ) -> None:
        """Fresh runs through SDPA, runs over a cached prefix through the prefill kernel."""
        nd = meta.num_decode_tokens
        qlens, ctxs = meta.prefill_query_lens_list, meta.prefill_context_lens_list
        # Host-side row offsets of each prefill sequence within the prefill part.
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        for first, end, fresh in prefill_runs(qlens, ctxs):
            if fresh:
                rows = slice(nd + starts[first], nd + starts[end])
                sdpa_fresh_prefill(q[rows], k[rows], v[rows], qlens[first:end], scale, out[rows])
            else:
                # Views, no new tensors: query_start_loc keeps its offsets into the whole
                # prefill part, so the kernel still gets q[nd:] and out[nd:] and simply
                # never visits the rows of the other runs.
                prefill_attention(
                    q[nd:], k_cache, v_cache,
                    meta.prefill_block_tables[first:end],
                    meta.prefill_query_start_loc[first : end + 1],
                    meta.prefill_context_lens[first:end], scale,
                    max_query_len=max(qlens[first:end]),
                    out=out[nd:],
                )
