"""Bookkeeping of one lower tier (host or disk): which blocks it holds, in which order they go.

Blocks in a lower tier are never touched in place (a hit promotes them back to the device),
so an entry's last use and expiry are fixed while it sits here. Two lazy heaps give the
order blocks leave: by expiry (their TTL in this tier ran out) and by last use (LRU, when
the tier needs room). Entries popped by one heap stay in the other as stale items, skipped
because the index no longer maps their hash to that very entry.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash


@dataclass(eq=False, slots=True)
class TierEntry:
    """One cached block held by a lower tier."""

    block_hash: BlockHash
    # Hash of the previous block of the prompt (None for a prompt's first block).
    parent_hash: BlockHash | None
    # The block's tokens, compared on every hit so a hash collision can't return wrong KV.
    token_ids: tuple[int, ...]
    # The block's lifetime (sliding TTL its requests asked for), seconds.
    ttl_s: float
    # Engine-clock time of the block's last use (the start of its sliding TTL).
    last_used_at: float
    # Engine-clock time the block leaves this tier.
    expires_at: float
    # Host tier: the slot holding the block's KV (-1 on disk).
    slot: int = -1


class TierIndex:
    """Hash -> entry, with expiry-first and LRU eviction orders (O(log n) per change)."""

    def __init__(self) -> None:
        self.entries: dict[BlockHash, TierEntry] = {}
        self._seq = itertools.count()
        self._by_expiry: list[tuple[float, int, TierEntry]] = []
        self._by_use: list[tuple[float, int, TierEntry]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self.entries

    def get(self, block_hash: BlockHash, token_ids: Sequence[int], now: float) -> TierEntry | None:
        """The unexpired entry for ``block_hash`` whose tokens match, else None."""
        entry = self.entries.get(block_hash)
        if entry is None or entry.expires_at <= now or entry.token_ids != tuple(token_ids):
            return None
        return entry

    def add(self, entry: TierEntry) -> None:
        if entry.block_hash in self.entries:
            raise RuntimeError(f"block {entry.block_hash:#x} is already in this tier")
        self.entries[entry.block_hash] = entry
        seq = next(self._seq)
        heapq.heappush(self._by_expiry, (entry.expires_at, seq, entry))
        heapq.heappush(self._by_use, (entry.last_used_at, seq, entry))
        if max(len(self._by_use), len(self._by_expiry)) > 4 * len(self.entries) + 64:
            self._compact()

    def pop(self, block_hash: BlockHash) -> TierEntry | None:
        return self.entries.pop(block_hash, None)

    def pop_expired(self, now: float) -> list[TierEntry]:
        """Remove and return the entries whose TTL here ran out, oldest expiry first."""
        out = []
        heap = self._by_expiry
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[2]
            if self.entries.get(entry.block_hash) is entry:
                del self.entries[entry.block_hash]
                out.append(entry)
        return out

    def pop_lru(self) -> TierEntry | None:
        """Remove and return the least recently used entry (None when empty)."""
        heap = self._by_use
        while heap:
            entry = heapq.heappop(heap)[2]
            if self.entries.get(entry.block_hash) is entry:
                del self.entries[entry.block_hash]
                return entry
        return None

    def clear(self) -> list[TierEntry]:
        out = list(self.entries.values())
        self.entries.clear()
        self._by_expiry.clear()
        self._by_use.clear()
        return out

    def _compact(self) -> None:
        live = self.entries.values()
        self._by_expiry = [(e.expires_at, next(self._seq), e) for e in live]
        self._by_use = [(e.last_used_at, next(self._seq), e) for e in live]
        heapq.heapify(self._by_expiry)
        heapq.heapify(self._by_use)
