"""Contiguous K/V of the decode batch, kept across steps (a CPU fast path).

Paged attention in plain torch has to gather every decode sequence's blocks into one
padded tensor, per layer, per step. On CPU that gather moves as many bytes as the
attention itself reads. But in steady-state decoding the batch is the same from one step
to the next, and each sequence just grows by one token. So the first step gathers into
a buffer with some headroom, and every following step only appends the new token's K/V.
When requests leave the batch (they finished, or were aborted or preempted) the rows
that stay move up in place before the append: a re-gather there cost ~20% of a step
(2-core CPU, batch 16), and workloads with mixed output lengths have a leaver every few
steps. A request joining, a block table change or running out of headroom rebuilds the
buffer.

The paged cache is still written every step, because it stays the source of truth for
prefix caching, preemption and KV transfer. The staging buffer is only a read cache.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

# Above this many bytes per layer (K + V) staging is skipped and the caller gathers.
MAX_STAGING_BYTES_PER_LAYER = 16 << 20
# Extra positions allocated past the longest context, so appends rarely force a rebuild.
HEADROOM = 64


@dataclass
class _LayerStage:
    k: torch.Tensor  # (B, H_kv, L_cap, D)
    v: torch.Tensor  # (B, H_kv, L_cap, D)


class DecodeStaging:
    """Per-layer staging buffers, plus a check done once per step: "can we append?"."""

    def __init__(self) -> None:
        self._layers: dict[int, _LayerStage] = {}
        # The decode batch of the previous step: block tables and context lengths.
        self._prev_tables: torch.Tensor | None = None
        self._prev_lens: list[int] = []
        # The metadata object this step's decision was made for (a weak reference: ids of
        # freed objects get reused, a dead weakref never matches), and the decision.
        self._meta_ref: weakref.ref | None = None
        self._append = False
        self._capacity = 0
        # Per step, shared by every layer: the longest context and the rows appended to.
        self._max_len = 0
        self._batch = 0
        self._append_rows = torch.empty(0, dtype=torch.long)
        # Per step, when rows left the batch: the old row each new row came from (else None).
        self._kept_rows: list[int] | None = None
        # Steps that had to re-gather instead of appending (observability and tests).
        self.num_rebuilds = 0
        # Steps that moved rows up after requests left, instead of re-gathering.
        self.num_compactions = 0

    def keys_values(
        self,
        k_new: torch.Tensor,  # (B, H_kv, D): this step's decode keys
        v_new: torch.Tensor,
        k_cache: torch.Tensor,  # (num_blocks, bs, H_kv, D)
        v_cache: torch.Tensor,
        tables: torch.Tensor,  # (B, nb) int32
        lens: list[int],
        lens_tensor: torch.Tensor,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, H_kv, L, D) keys and values of the decode batch, or None to gather instead.

        ``meta`` is the step's AttentionMetadata: every layer of one step passes the same
        object, so the append-or-rebuild decision is made once per step.
        """
        if self._meta_ref is None or self._meta_ref() is not meta:
            self._begin_step(tables, lens, lens_tensor, k_cache)
            self._meta_ref = weakref.ref(meta)
        if self._capacity == 0:
            return None
        layer = k_cache.data_ptr()
        stage = self._layers.get(layer)
        max_len = self._max_len
        if self._append and stage is not None:
            if self._kept_rows is not None:  # each layer is called once per step
                _move_rows_up(stage, self._kept_rows)
            # One row copy per (sequence, KV head): this step's token lands at its position.
            d = k_new.shape[-1]
            stage.k.view(-1, d).index_copy_(0, self._append_rows, k_new.reshape(-1, d))
            stage.v.view(-1, d).index_copy_(0, self._append_rows, v_new.reshape(-1, d))
        else:
            stage = self._rebuild(k_cache, v_cache, tables, max_len)
            self._layers[layer] = stage
        b = self._batch  # rows past the batch (left by requests that went) are stale
        return stage.k[:b, :, :max_len], stage.v[:b, :, :max_len]

    def _begin_step(self, tables: torch.Tensor, lens: list[int], lens_tensor: torch.Tensor, k_cache: torch.Tensor) -> None:
        """Decide append-or-rebuild for this step, and compute what every layer reuses."""
        kept = self._rows_kept(tables, lens, k_cache.shape[1])
        self._append = kept is not None
        identity = kept is not None and kept == list(range(len(kept))) and len(kept) == len(self._prev_lens)
        self._kept_rows = None if identity else kept
        if self._kept_rows is not None:
            self.num_compactions += 1
        _, _, h_kv, d = k_cache.shape
        if not self._append:
            self.num_rebuilds += 1
            cap = max(lens) + HEADROOM
            per_layer = 2 * len(lens) * h_kv * cap * d * k_cache.element_size()
            self._capacity = cap if per_layer <= MAX_STAGING_BYTES_PER_LAYER else 0
            self._layers.clear()
        self._max_len, self._batch = max(lens), len(lens)
        if self._append:
            # Flat row of (b, h, lens[b] - 1) in a (B, H_kv, cap, D) buffer viewed as (-1, D).
            b_h = torch.arange(len(lens) * h_kv, device=k_cache.device).view(len(lens), h_kv)
            pos = (lens_tensor.to(k_cache.device).long() - 1)[:, None]
            self._append_rows = (b_h * self._capacity + pos).reshape(-1)
        self._prev_tables = tables.clone()
        self._prev_lens = list(lens)

    def _rows_kept(self, tables: torch.Tensor, lens: list[int], block_size: int) -> list[int] | None:
        """For each row, last step's row it continues (same blocks, one token longer); None
        when some row continues none (a request joined, a table changed) or the headroom ran out.

        Rows keep their order when requests leave (the scheduler's running list), so one
        forward walk matches them. Two rows with the same blocks and length hold the same
        K/V, so a match is always a correct source whichever request it was.
        """
        prev, prev_lens = self._prev_tables, self._prev_lens
        if prev is None or not lens or len(lens) > len(prev_lens) or max(lens) > self._capacity:
            return None
        rows, prev_rows = tables.tolist(), prev.tolist()
        kept: list[int] = []
        j = 0
        for row, n in zip(rows, lens):
            while j < len(prev_lens):
                # Only the blocks the old row used: a padding 0 that has since become a
                # real block (the row crossed a block boundary) is not a change.
                used = -(-prev_lens[j] // block_size)
                if n == prev_lens[j] + 1 and row[:used] == prev_rows[j][:used]:
                    break
                j += 1
            if j == len(prev_lens):
                return None
            kept.append(j)
            j += 1
        return kept

    def _rebuild(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, max_len: int
    ) -> _LayerStage:
        num_blocks, bs, h_kv, d = k_cache.shape
        b = tables.shape[0]
        nb = -(-max_len // bs)
        ids = tables[:, :nb].reshape(-1).long()
        out = []
        for cache in (k_cache, v_cache):
            buf = torch.empty((b, h_kv, self._capacity, d), dtype=cache.dtype, device=cache.device)
            rows = cache.view(num_blocks, -1).index_select(0, ids).view(b, nb * bs, h_kv, d)
            buf[:, :, :max_len] = rows[:, :max_len].transpose(1, 2)
            # The headroom must be finite: a short row's padding there is masked, but a
            # masked NaN still poisons softmax @ V (0 * NaN = NaN).
            buf[:, :, max_len:].zero_()
            out.append(buf)
        return _LayerStage(out[0], out[1])


def _move_rows_up(stage: _LayerStage, kept: list[int]) -> None:
    """Row ``i`` of each buffer becomes old row ``kept[i]`` (``kept`` increasing, so rows
    only move up); only rows from the first one that changes are copied."""
    first = next((i for i, j in enumerate(kept) if i != j), len(kept))
    if first == len(kept):
        return
    src = torch.tensor(kept[first:], dtype=torch.long, device=stage.k.device)
    for buf in (stage.k, stage.v):
        # index_select copies out first: source and destination rows overlap.
        buf[first : len(kept)] = buf.index_select(0, src)
