"""The KV directory as a named, async Ray actor (a thin shell around ``KVDirectory``).

One actor per pool, named (``kvferry-kv-directory-<pool>``) and detached, so every router
and every replica of the pool finds the same one with :func:`get_or_create_directory`.
It uses wall-clock time (``time.time``): replicas must stamp ``expires_at`` with the same
clock (create engines with ``clock=time.time``).

Restarts: Ray restarts the actor (``max_restarts=-1``) with an empty directory. The next
batch each replica flushes then has ``seq_no > 0``, which the directory reads as a gap, so
the reply asks for a snapshot and the replica's :class:`router.event_flusher.KVEventFlusher`
sends ``LLMEngine.cache_snapshot()``: the directory rebuilds itself from its replicas.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from engine.block_hash import BlockHash
from engine.kv_events import CacheSnapshot, KVEventBatch
from router.directory import KVDirectory
from router.metrics import DirectoryMetrics

DIRECTORY_NAME_PREFIX = "kvferry-kv-directory"
# Routers (in proxies, ingress replicas, drivers) and pool replicas live in different Ray
# namespaces; a fixed one makes them all resolve the same named actor.
DIRECTORY_NAMESPACE = "kvferry"


def directory_name(pool: str) -> str:
    """The actor name of one pool's directory."""
    return f"{DIRECTORY_NAME_PREFIX}-{pool}"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class KVDirectoryActor:
    """Async actor: every method runs on one event loop, so the plain class needs no lock."""

    def __init__(self, sweep_interval_s: float = 1.0, sweep_limit: int = 50_000, pool: str = "unknown") -> None:
        self._dir = KVDirectory()
        self._metrics = DirectoryMetrics(pool)
        self._sweep_interval_s = sweep_interval_s
        self._sweep_limit = sweep_limit
        self._sweeper: asyncio.Task | None = None

    def _ensure_sweeper(self) -> None:
        # Started lazily: __init__ of an async actor may run before its loop is current.
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            # Sliced so lookups interleave with a big expiry wave.
            while self._dir.sweep(time.time(), limit=self._sweep_limit) == self._sweep_limit:
                await asyncio.sleep(0)
            s = self._dir.stats()
            self._metrics.publish(s.num_entries, s.num_expired, s.entries_by_tier)

    async def apply_batches(self, batches: list[KVEventBatch]) -> list[str]:
        """Fold event batches in; return the replica ids whose snapshot is wanted."""
        self._ensure_sweeper()
        wanted = set()
        for b in batches:
            if self._dir.apply(b).snapshot_needed:
                wanted.add(b.replica_id)
        return sorted(wanted)

    async def restore(self, snapshot: CacheSnapshot) -> int:
        """Replace one replica's entries by its engine snapshot."""
        self._ensure_sweeper()
        return self._dir.restore(snapshot)

    async def lookup(self, block_hashes: list[BlockHash]) -> dict[str, Any]:
        """``{replica_id: PrefixMatch}`` for a prompt's chained block hashes, now."""
        return self._dir.lookup(block_hashes, time.time())

    async def drop_replica(self, replica_id: str) -> int:
        """Forget a replica (the router saw it die)."""
        return self._dir.drop_replica(replica_id)

    async def sweep(self) -> int:
        """Expire everything past its TTL now (the loop also does this every second)."""
        return self._dir.sweep(time.time())

    async def snapshot(self) -> list[CacheSnapshot]:
        """Everything known, one engine-format snapshot per replica."""
        return self._dir.snapshot()

    async def stats(self) -> dict[str, Any]:
        """Sizes and counters (for metrics and tests)."""
        s = self._dir.stats()
        return {"num_entries": s.num_entries, "num_hashes": s.num_hashes, "num_replicas": s.num_replicas,
                "num_expired": s.num_expired, "num_gaps": s.num_gaps,
                "replicas_needing_snapshot": s.replicas_needing_snapshot,
                "entries_by_tier": list(s.entries_by_tier)}


def get_or_create_directory(pool: str, namespace: str | None = None, **kwargs: Any) -> ray.actor.ActorHandle:
    """The pool's directory actor, created (detached) if it does not exist. Non-blocking."""
    opts: dict[str, Any] = {"name": directory_name(pool), "get_if_exists": True, "lifetime": "detached",
                            "namespace": namespace or DIRECTORY_NAMESPACE}
    return KVDirectoryActor.options(**opts).remote(pool=pool, **kwargs)
