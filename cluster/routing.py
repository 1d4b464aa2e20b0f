"""Glue to kvferry's cache-affinity routing (``request_router: kvferry``).

The routers (``router/serve_routers.py``) need three things from the serving side, and
this module provides them:

1. *Routing hints* on every handle call: the prompt's block hashes, computed with the
   engine's own ``hash_prompt_blocks`` so router and engine agree on keys, from the token
   ids the ingress computed (it tokenizes every prompt).
2. *KV events* from every replica's engine, flushed in batches to the pool's directory.
3. *Load snapshots*: each replica's ``record_routing_stats()`` (``ReplicaCore.routing_stats``).

With the default Serve router none of this runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from cluster.engine_loop import EngineLoop
from cluster.wire import GetCacheSnapshot

logger = logging.getLogger(__name__)


def routing_hints(token_ids: Sequence[int], block_size: int, model_id: str, salt: str | None = None,
                  cache_key: str | None = None, prefer_replica: str | None = None) -> Any:
    """``router.hints.RoutingHints`` for a prompt. A ``prompt_cache_key`` travels only as a
    hash with the tenant's salt (routers never see it, nor group two tenants' keys)."""
    import xxhash

    from engine.block_hash import hash_prompt_blocks
    from router.hints import RoutingHints

    hashes = hash_prompt_blocks(token_ids, block_size, model_id, salt)
    key = None if cache_key is None else xxhash.xxh3_128_hexdigest(f"{salt}\x00{cache_key}".encode())
    return RoutingHints(tuple(hashes), len(token_ids), block_size, cache_key=key, prefer_replica=prefer_replica)


class EventPump:
    """Forwards one replica's KV event batches to its pool's directory actor."""

    def __init__(self, pool: str, loop: EngineLoop, interval_s: float = 0.05) -> None:
        from router.directory_actor import get_or_create_directory
        from router.event_flusher import KVEventFlusher

        self._loop = loop
        self._interval_s = interval_s
        self.flusher = KVEventFlusher(get_or_create_directory(pool), self._snapshot)
        self._task: asyncio.Task | None = None

    async def _snapshot(self) -> Any:
        return await self._loop.submit(GetCacheSnapshot())

    def on_events(self, batch: Any) -> None:
        """EngineLoop callback (runs on the event loop): buffer, and start flushing once."""
        self.flusher.add(batch)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.flusher.run(self._interval_s))
