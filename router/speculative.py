"""Speculative directory entries: requests routed but whose blocks are not reported yet.

Between routing a request and the replica's KV events reaching the directory (prefill
time plus the event flush interval) the directory does not know the replica will hold the
prompt. Without a stand-in, a burst of requests sharing a new prefix (a fan-out of agents
on one system prompt) would scatter over the pool and be computed N times. So the router
records "replica r will hold these blocks" for a short TTL, and merges these entries with
the directory's answer (``router.policy.merge_matches``). They expire on their own; once
the real events arrive the directory's entries take over.

Backed by a private :class:`~router.directory.KVDirectory`, so it shares the compact
layout and the exact expiry semantics; explicit ``now`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import BlockHash
from engine.kv_events import BlockStored, KVEventBatch, Tier
from router.directory import KVDirectory, PrefixMatch


class SpeculativeRoutes:
    """Short-lived "will hold" entries for requests routed but not yet reported."""

    def __init__(self, ttl_s: float = 10.0, sweep_every: int = 256) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._dir = KVDirectory()
        self._seq: dict[str, int] = {}
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def record(self, block_hashes: Sequence[BlockHash], replica_id: str, now: float) -> None:
        """The request with these blocks was just routed to ``replica_id``."""
        if not block_hashes:
            return
        seq = self._seq[replica_id] = self._seq.get(replica_id, -1) + 1
        ev = BlockStored(tuple(block_hashes), None, Tier.DEVICE, now + self.ttl_s)
        self._dir.apply(KVEventBatch(replica_id, seq, now, [ev]))
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self._since_sweep = 0
            self._dir.sweep(now)

    def lookup(self, block_hashes: Sequence[BlockHash], now: float) -> dict[str, PrefixMatch]:
        """Per replica, leading blocks it is expected to hold soon (device tier)."""
        return self._dir.lookup(block_hashes, now)

    def drop_replica(self, replica_id: str) -> None:
        """Forget a replica that left the pool."""
        self._dir.drop_replica(replica_id)
        self._seq.pop(replica_id, None)

    def __len__(self) -> int:
        return len(self._dir)
