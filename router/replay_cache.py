"""One simulated replica's prompt cache for ``kvferry replay``: device, host and disk tiers.

Pure logic with an explicit clock (``router.replay`` drives it; no Ray, no engine). It
follows the engine's tier rules (issue 12; docs/replay.md):

* Each tier holds at most ``capacity[t]`` blocks (0 turns a tier off; the device tier is
  always on) and is an LRU. A block lives in exactly one tier.
* A block leaving a tier — for room (the LRU tail) or at its TTL — is **demoted** to the
  next tier that is on, with that tier's TTL counted from the moment it moves, and is
  dropped when no tier below is on.
* A request that hits a prefix **promotes** its host and disk blocks back to the device;
  every block of the request gets the device TTL from the request's finish (sliding).
* Device TTL slides on every hit; host and disk TTLs are fixed from the demotion.

Events: :meth:`TieredCache.drain` returns the KV events (``engine.kv_events``) that turn
what the directory was last told into the cache's current state — stores, touches,
moves (with the expiry in the new tier) and removals. With ``tier_events=False`` the
directory is told about the device tier only, as a router fed device-tier events would be:
a demotion reads as a removal and a promotion as a store.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from engine.kv_events import BlockMoved, BlockRemoved, BlockStored, BlockTouched, KVEvent, Tier

NUM_TIERS = 3


class TieredCache:
    """Device / host / disk LRUs with per-tier TTLs; see the module docstring."""

    def __init__(self, capacity: Sequence[int], ttl_s: Sequence[float], tier_events: bool = True) -> None:
        if len(capacity) != NUM_TIERS or len(ttl_s) != NUM_TIERS:
            raise ValueError("need a capacity and a TTL for each of device, host and disk")
        if any(c < 0 for c in capacity) or any(t <= 0 for t in ttl_s):
            raise ValueError(f"capacities must be >= 0 and TTLs > 0, got {capacity} and {ttl_s}")
        self.capacity = tuple(capacity)
        self.ttl_s = tuple(ttl_s)
        self.tier_events = tier_events
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(NUM_TIERS)]
        self._where: dict[int, int] = {}  # block -> tier
        self._exp: dict[int, float] = {}  # block -> absolute expiry in its tier
        self._parent: dict[int, int | None] = {}
        self._heap: list[tuple[float, int]] = []  # (expiry, block); stale entries skipped
        self._expired_to = float("-inf")
        # What the directory was last told: block -> (tier, expiry); blocks changed since.
        self._reported: dict[int, tuple[int, float]] = {}
        self._dirty: dict[int, None] = {}
        # Cumulative counts (for tests and reports).
        self.num_demotions = 0
        self.num_promotions = 0
        self.num_expired = 0
        self.num_evicted = 0

    # -- queries ----------------------------------------------------------------------

    def tier_of(self, block: int) -> int | None:
        """The tier a block is in, or None."""
        return self._where.get(block)

    def blocks_in(self, tier: int) -> int:
        """Blocks held in one tier."""
        return len(self._lru[tier])

    def prefix(self, blocks: Sequence[int]) -> list[int]:
        """The tiers of the longest prefix of ``blocks`` held (call :meth:`expire` first)."""
        out = []
        for b in blocks:
            t = self._where.get(b)
            if t is None:
                break
            out.append(t)
        return out

    # -- changes ----------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Demote (or drop) every block whose TTL ran out by ``now``, oldest first."""
        if now <= self._expired_to:
            return
        self._expired_to = now
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, b = heapq.heappop(heap)
            if self._exp.get(b) != exp:
                continue  # touched or moved since: a stale slot
            self.num_expired += 1
            self._demote(b, self._where[b], exp)

    def use(self, blocks: Sequence[int], hit: int, start: float, finish: float) -> None:
        """A request that hit ``blocks[:hit]`` runs from ``start`` to ``finish``.

        Every block of the request ends on the device (hits promoted, the rest stored)
        with expiry ``finish + device TTL``; the device LRU tail is demoted for room.
        """
        exp = finish + self.ttl_s[Tier.DEVICE]
        dev = self._lru[Tier.DEVICE]
        parent: int | None = None
        for i, b in enumerate(blocks):
            # A block held past a break in the prefix is recomputed, then cached as a hit is.
            t = self._where.get(b)
            if t is None:
                self._parent[b] = parent
            elif t != Tier.DEVICE:
                self._lru[t].pop(b)
                self.num_promotions += i < hit
            self._where[b] = Tier.DEVICE
            dev[b] = None
            dev.move_to_end(b)
            self._set_exp(b, exp)
            parent = b
        self._make_room(Tier.DEVICE, start)

    def drain(self) -> list[KVEvent]:
        """The events that bring the directory's view up to date (see the module docstring)."""
        stores: dict[tuple[int, float], list[int]] = {}
        moves: dict[tuple[int, float], list[int]] = {}
        touches: dict[float, list[int]] = {}
        removed = []
        for b in self._dirty:
            cur = self._visible(b)
            old = self._reported.get(b)
            if cur == old:
                continue
            if cur is None:
                removed.append(b)
                del self._reported[b]
                continue
            self._reported[b] = cur
            if old is None:
                stores.setdefault(cur, []).append(b)
            elif old[0] != cur[0]:
                moves.setdefault(cur, []).append(b)
            else:
                touches.setdefault(cur[1], []).append(b)
        self._dirty.clear()
        events: list[KVEvent] = []
        if removed:
            events.append(BlockRemoved(tuple(removed)))
        for (t, exp), bs in stores.items():
            events.extend(self._chained_stores(bs, Tier(t), exp))
        events.extend(BlockMoved(tuple(bs), Tier(t), exp) for (t, exp), bs in moves.items())
        events.extend(BlockTouched(tuple(bs), exp) for exp, bs in touches.items())
        return events

    # -- internals --------------------------------------------------------------------

    def _visible(self, b: int) -> tuple[int, float] | None:
        t = self._where.get(b)
        if t is None or (t != Tier.DEVICE and not self.tier_events):
            return None
        return (t, self._exp[b])

    def _chained_stores(self, blocks: list[int], tier: Tier, exp: float) -> list[BlockStored]:
        """Split stored blocks into chained runs, each with its true parent."""
        out: list[BlockStored] = []
        run: list[int] = []
        for b in blocks:
            if run and self._parent.get(b) != run[-1]:
                out.append(BlockStored(tuple(run), self._parent.get(run[0]), tier, exp))
                run = []
            run.append(b)
        if run:
            out.append(BlockStored(tuple(run), self._parent.get(run[0]), tier, exp))
        return out

    def _set_exp(self, b: int, exp: float) -> None:
        if self._exp.get(b) != exp:
            self._exp[b] = exp
            heapq.heappush(self._heap, (exp, b))
        self._dirty[b] = None

    def _next_tier(self, tier: int) -> int | None:
        for t in range(tier + 1, NUM_TIERS):
            if self.capacity[t] > 0:
                return t
        return None

    def _demote(self, b: int, tier: int, now: float) -> None:
        """Move ``b`` out of ``tier`` to the next tier that is on (or drop it) at ``now``."""
        self._lru[tier].pop(b)
        nxt = self._next_tier(tier)
        if nxt is None:
            self._forget(b)
            return
        self.num_demotions += 1
        self._where[b] = nxt
        self._lru[nxt][b] = None
        self._set_exp(b, now + self.ttl_s[nxt])
        self._make_room(nxt, now)

    def _make_room(self, tier: int, now: float) -> None:
        lru = self._lru[tier]
        while len(lru) > self.capacity[tier]:
            self.num_evicted += self._next_tier(tier) is None  # dropped, not demoted
            self._demote(next(iter(lru)), tier, now)

    def _forget(self, b: int) -> None:
        t = self._where.pop(b)
        self._lru[t].pop(b, None)
        self._exp.pop(b, None)
        self._parent.pop(b, None)
        self._dirty[b] = None
