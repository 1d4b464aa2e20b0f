"""The pool of KV blocks: free lists, the prompt cache with TTLs, and KV events.

Every block is either *held* (``ref_cnt > 0``: some request's block table points at it)
or *free*. A free block may still be *cached*: it carries a chained block hash and can be
handed back to a later request with the same prefix (a prefix-cache hit).

Eviction order when blocks are allocated (pinned by ``test_block_pool.py``):

1. free blocks that cache nothing, in the order they were freed;
2. cached blocks whose TTL has run out (they are never hits again), oldest expiry first;
3. unexpired cached blocks, least recently used first (a hit or a release counts as a use).

Held blocks are never evicted. A request releases its blocks tail-first, so the blocks at
the end of a prompt are evicted before the shared prefix they hang off.

With lower tiers (``engine.kv_tiers``) a cached block leaving the device, for room or at
its device TTL, is handed to ``lower_tiers.demote`` while its KV is still intact, which
moves it to host memory or disk (or drops it); without them it is simply removed. A
promoted block is put back with :meth:`BlockPool.adopt` and stays *pending* until its KV
has landed.

Every cache change appends a KV event (``engine.kv_events``); the engine drains them.
Methods take an explicit ``now`` so tests drive time with a fake clock.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.block_hash import BlockHash
from engine.kv_events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    BlockTouched,
    KVEvent,
    Tier,
)


class LowerTiers(Protocol):
    """Where cached blocks go when they leave the device (``engine.kv_tiers.TieredKV``)."""

    def demote(self, blocks: list[KVBlock], now: float, reason: str) -> None:
        """Move or drop cached device blocks about to be uncached (reason "capacity" or "ttl"),
        emitting their events; called while the blocks' KV is still intact."""

    def supersede(self, hashes: Sequence[BlockHash]) -> None:
        """The device is about to store ``hashes``: drop copies lower tiers hold."""


@dataclass(eq=False, slots=True)
class KVBlock:
    """Bookkeeping of one physical block of the paged KV cache."""

    block_id: int
    # Requests whose block table holds this block.
    ref_cnt: int = 0
    # Chained hash when the block is in the prompt cache, else None.
    block_hash: BlockHash | None = None
    # Hash of the previous block of the prompt (None for a prompt's first block).
    parent_hash: BlockHash | None = None
    # The block's tokens, compared on every hit so a hash collision can't return wrong KV.
    token_ids: tuple[int, ...] | None = None
    # Absolute expiry of the cached block; a hit slides it to now + ttl_s.
    expires_at: float = 0.0
    # Sliding TTL of the cached block (the longest any request asked for): its lifetime.
    ttl_s: float = 0.0
    # Last hit or store (the start of the sliding TTL); lower tiers count from it.
    last_used_at: float = 0.0
    # A promoted block whose KV is still being copied in: requests holding it wait.
    pending: bool = False


class BlockPool:
    """Allocates, caches and evicts KV blocks; O(1) per block except expiry (O(log n))."""

    def __init__(self, num_blocks: int, ttl_cap_s: float = math.inf) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Longest a block stays on the device idle (its device TTL when lower tiers exist).
        self.ttl_cap_s = ttl_cap_s
        self.lower_tiers: LowerTiers | None = None
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks holding nothing reusable, in free order (first out first).
        self._free_uncached: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        # Free blocks still in the prompt cache, least recently used first.
        self._free_cached: OrderedDict[int, KVBlock] = OrderedDict()
        # The prompt cache: hash -> block (held or free).
        self._cached: dict[BlockHash, KVBlock] = {}
        # (expires_at, block_id, hash) of cached blocks; stale entries are skipped lazily.
        self._expiry_heap: list[tuple[float, int, BlockHash]] = []
        self._events: list[KVEvent] = []
        # Cumulative counts of cached blocks dropped at their TTL and evicted for room (metrics).
        self.num_expired = 0
        self.num_evicted = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_free_cached_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix (evicted last, LRU first)."""
        return len(self._free_cached)

    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int], now: float) -> KVBlock | None:
        """The cached, unexpired block for ``block_hash`` whose tokens match, else None."""
        block = self._cached.get(block_hash)
        if block is None or block.expires_at <= now:
            return None
        if block.token_ids != tuple(token_ids):
            return None  # a hash collision: never return someone else's KV
        return block

    # -------------------------------------------------------------- allocation
    def allocate(self, num_blocks: int, now: float) -> list[KVBlock] | None:
        """Take ``num_blocks`` free blocks (evicting cached ones if needed); None if too few."""
        if num_blocks > self.num_free_blocks:
            return None
        self.expire(now)
        out: list[KVBlock] = []
        evicted: list[KVBlock] = []
        for _ in range(num_blocks):
            if self._free_uncached:
                _, block = self._free_uncached.popitem(last=False)
            else:
                _, block = self._free_cached.popitem(last=False)
                evicted.append(block)
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self.num_evicted += len(evicted)
            self._evict(evicted, now, "capacity")
        return out

    def touch(self, blocks: Sequence[KVBlock], now: float, ttl_s: float | Sequence[float]) -> None:
        """Take a reference on cached blocks (prefix hits) and slide their TTL (one for all,
        or one per block: a cache breakpoint gives a prefix a longer TTL)."""
        ttls = _per_block(ttl_s, len(blocks))
        touched: dict[float, list[BlockHash]] = {}
        for block, ttl_s in zip(blocks, ttls):
            if block.ref_cnt == 0:
                # A free cached block leaves the free list while it is in use.
                if self._free_cached.pop(block.block_id, None) is None:
                    raise RuntimeError(f"block {block.block_id} is free but not on a free list")
            block.ref_cnt += 1
            if block.block_hash is not None:
                block.ttl_s = max(block.ttl_s, ttl_s)
                block.last_used_at = now
                expires_at = now + min(block.ttl_s, self.ttl_cap_s)
                block.expires_at = expires_at
                heapq.heappush(self._expiry_heap, (expires_at, block.block_id, block.block_hash))
                touched.setdefault(expires_at, []).append(block.block_hash)
        for expires_at, hashes in touched.items():
            self._events.append(BlockTouched(tuple(hashes), expires_at))

    def free(self, blocks: Iterable[KVBlock], now: float) -> None:
        """Drop one reference per block, in the given order (pass a block table reversed)."""
        expired: list[KVBlock] = []
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt:
                continue
            if block.block_hash is None:
                self._free_uncached[block.block_id] = block
            elif block.expires_at <= now:
                expired.append(block)
                self._free_uncached[block.block_id] = block
            else:
                self._free_cached[block.block_id] = block  # most recently used end
        if expired:
            self.num_expired += len(expired)
            self._evict(expired, now, "ttl")

    # ------------------------------------------------------------------ caching
    def cache_blocks(
        self,
        entries: Sequence[tuple[KVBlock, BlockHash, BlockHash | None, Sequence[int]]],
        now: float,
        ttl_s: float | Sequence[float],
    ) -> None:
        """Put newly full blocks ``(block, hash, parent_hash, token_ids)`` into the prompt cache,
        with one TTL for all or one per block.

        A hash already cached by another block (two requests computed the same block at
        once) leaves this block uncached: one copy per hash.
        """
        ttls = _per_block(ttl_s, len(entries))
        run: list[BlockHash] = []
        run_parent: BlockHash | None = None
        expires_at = 0.0
        for (block, block_hash, parent, token_ids), ttl_s in zip(entries, ttls):
            if block.block_hash is not None:
                raise RuntimeError(f"block {block.block_id} is already cached")
            if run and now + min(ttl_s, self.ttl_cap_s) != expires_at:
                # One BlockStored per run of blocks sharing an expiry.
                self._flush_stored(run, run_parent, expires_at)
                run = []
            expires_at = now + min(ttl_s, self.ttl_cap_s)
            if block_hash in self._cached:
                self._flush_stored(run, run_parent, expires_at)
                run = []
                continue
            block.block_hash = block_hash
            block.parent_hash = parent
            block.token_ids = tuple(token_ids)
            block.ttl_s = ttl_s
            block.last_used_at = now
            block.expires_at = expires_at
            self._cached[block_hash] = block
            heapq.heappush(self._expiry_heap, (expires_at, block.block_id, block_hash))
            if not run:
                run_parent = parent
            run.append(block_hash)
        self._flush_stored(run, run_parent, expires_at)

    def expire(self, now: float) -> int:
        """Uncache free blocks whose TTL ran out, oldest expiry first; returns how many."""
        heap = self._expiry_heap
        removed: list[KVBlock] = []
        while heap and heap[0][0] <= now:
            expires_at, block_id, block_hash = heapq.heappop(heap)
            block = self.blocks[block_id]
            if block.block_hash != block_hash or block.expires_at != expires_at:
                continue  # stale entry: the block was refreshed or reused since
            if block.ref_cnt or self._free_cached.pop(block_id, None) is None:
                continue  # held blocks are dealt with when freed; a duplicate heap entry
            removed.append(block)
            self._free_uncached[block_id] = block
        if removed:
            self.num_expired += len(removed)
            self._evict(removed, now, "ttl")
        if len(heap) > 4 * self.num_blocks + 64:
            self._compact_heap()
        return len(removed)

    def clear_cache(self) -> None:
        """Forget every cached block (held blocks keep their KV, just not as cache)."""
        for block in list(self._cached.values()):
            self._uncache(block)
        self._free_uncached.update(self._free_cached)
        self._free_cached.clear()
        self._expiry_heap.clear()
        self._events.append(AllCleared())

    def cached_entries(self, now: float) -> list[tuple[BlockHash, BlockHash | None, Tier, float]]:
        """(hash, parent, tier, expires_at) of every unexpired cached block."""
        return [
            (h, b.parent_hash, Tier.DEVICE, b.expires_at)
            for h, b in self._cached.items()
            if b.expires_at > now
        ]

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def emit(self, event: KVEvent) -> None:
        """Append an event (lower tiers report their moves here, in order with the pool's)."""
        self._events.append(event)

    # -------------------------------------------------------------- promotion
    def adopt(self, block: KVBlock, entry: tuple[BlockHash, BlockHash | None, Sequence[int]], ttl_s: float,
              now: float) -> None:
        """Cache a freshly allocated (held) block for ``entry = (hash, parent, tokens)`` coming
        back from a lower tier: pending until its KV lands; the tiers emit its BlockMoved."""
        block_hash, parent, token_ids = entry
        if block.ref_cnt < 1 or block.block_hash is not None:
            raise RuntimeError(f"block {block.block_id} must be held and uncached to adopt a promotion")
        if block_hash in self._cached:
            raise RuntimeError(f"block hash {block_hash:#x} is already on the device")
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent, tuple(token_ids)
        block.ttl_s, block.last_used_at = ttl_s, now
        block.expires_at = now + min(ttl_s, self.ttl_cap_s)
        block.pending = True
        self._cached[block_hash] = block
        heapq.heappush(self._expiry_heap, (block.expires_at, block.block_id, block_hash))

    def drop_failed(self, block: KVBlock) -> None:
        """A promotion could not fill ``block`` (its file was corrupt or gone): uncache it."""
        block.pending = False
        if block.block_hash is not None:
            self._events.append(BlockRemoved((self._uncache(block),)))

    # ---------------------------------------------------------------- internals
    def _uncache(self, block: KVBlock) -> BlockHash:
        block_hash = block.block_hash
        if block_hash is None:
            raise RuntimeError(f"block {block.block_id} is not cached")
        del self._cached[block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = None
        block.expires_at = 0.0
        block.ttl_s = 0.0
        block.last_used_at = 0.0
        block.pending = False
        return block_hash

    def _flush_stored(self, run: list[BlockHash], parent: BlockHash | None, expires_at: float) -> None:
        if run:
            if self.lower_tiers is not None:
                self.lower_tiers.supersede(run)  # one tier per hash: lower copies go first
            self._events.append(BlockStored(tuple(run), parent, Tier.DEVICE, expires_at))

    def _evict(self, blocks: list[KVBlock], now: float, reason: str) -> None:
        """Cached blocks leave the device: demoted by the lower tiers, else removed."""
        if self.lower_tiers is not None:
            self.lower_tiers.demote(blocks, now, reason)
            for block in blocks:
                self._uncache(block)
        else:
            self._events.append(BlockRemoved(tuple(self._uncache(b) for b in blocks)))

    def _compact_heap(self) -> None:
        self._expiry_heap = [
            (b.expires_at, b.block_id, b.block_hash)
            for b in self._cached.values()
            if b.block_hash is not None
        ]
        heapq.heapify(self._expiry_heap)


def _per_block(ttl_s: float | Sequence[float], n: int) -> Sequence[float]:
    if isinstance(ttl_s, (int, float)):
        return [float(ttl_s)] * n
    if len(ttl_s) != n:
        raise ValueError(f"{len(ttl_s)} TTLs for {n} blocks")
    return ttl_s
