"""Keeps a decode replica's pins (explicit caches) in step with the app's registry.

The registry (``cluster.explicit_cache_actor``) is the source of truth: every
``interval_s`` the replica lists its engine's pins, asks the registry which of them it
still lists *on this replica* and until when, and releases the others (a DELETE, an
expiry moved by PATCH, a cache re-pinned on another replica after this one was
unreachable, a registry restart). So a DELETE or PATCH needs no call routed to the one
replica that holds the blocks; the replica catches up within ``interval_s``.

Started lazily by the first request that pins here: replicas with no pins never poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cluster.engine_loop import EngineDeadError, EngineLoop
from cluster.wire import ListPins, SyncPins

logger = logging.getLogger(__name__)


class PinSync:
    """One replica's reconcile loop against the registry actor."""

    def __init__(self, loop: EngineLoop, registry: Callable[[], Any], replica_id: str, interval_s: float = 1.0) -> None:
        self._loop = loop
        # () -> the registry actor's handle: resolved on first use (most replicas never pin).
        self._get_registry = registry
        self._registry: Any = None
        self._replica_id = replica_id
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self._registry is None:
            self._registry = self._get_registry()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def sync_once(self) -> int:
        """One reconcile; how many pins were released."""
        ids = await self._loop.submit(ListPins())
        if not ids:
            return 0
        live = await self._registry.live.remote(ids, self._replica_id)
        return await self._loop.submit(SyncPins(tuple(ids), live))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sync_once()
            except EngineDeadError:
                return
            except Exception as e:  # noqa: BLE001 - registry unreachable: keep pins, try again
                logger.warning("explicit-cache sync failed: %r", e)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
