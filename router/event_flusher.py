"""Replica side: buffer an engine's KV event batches and flush them to the directory.

The replica's step loop calls :meth:`KVEventFlusher.add` with each
``LLMEngine.take_events()`` batch; a background task calls :meth:`flush` every
``interval`` (tens of ms). A flush sends everything buffered in one actor call; when the
directory answers that it missed batches (a gap, or it restarted), the flusher fetches a
snapshot through the replica's ``snapshot_fn`` (which must run ``cache_snapshot()`` on the
engine's thread) and sends it. If the directory is unreachable the buffer is kept, up to
``max_buffered`` batches; beyond that it is dropped and the next flush sends a snapshot
instead — the directory is an optimisation, never a reason to stall serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine.kv_events import CacheSnapshot, KVEventBatch

logger = logging.getLogger(__name__)


class KVEventFlusher:
    """Batches KV events of one replica towards the directory actor."""

    def __init__(
        self,
        directory: object,
        snapshot_fn: Callable[[], Awaitable[CacheSnapshot]],
        timeout_s: float = 5.0,
        max_buffered: int = 10_000,
    ) -> None:
        self._directory = directory
        self._snapshot_fn = snapshot_fn
        self._timeout_s = timeout_s
        self._max_buffered = max_buffered
        self._buffer: list[KVEventBatch] = []
        self._need_snapshot = False
        self._lock = asyncio.Lock()
        self.num_flushes = 0
        self.num_snapshots = 0

    def add(self, batch: KVEventBatch | None) -> None:
        """Queue one engine batch (None, as ``take_events`` returns when idle, is ignored)."""
        if batch is None:
            return
        if len(self._buffer) >= self._max_buffered:
            # The directory will have a gap; a snapshot replaces what we drop.
            self._buffer.clear()
            self._need_snapshot = True
        self._buffer.append(batch)

    async def flush(self) -> bool:
        """Send what is buffered (and a snapshot if wanted); True on success."""
        async with self._lock:
            batches, self._buffer = self._buffer, []
            try:
                if batches:
                    ref = self._directory.apply_batches.remote(batches)
                    if await asyncio.wait_for(ref, self._timeout_s):
                        self._need_snapshot = True
                    batches = []  # applied: never resend (a resend would be ignored anyway)
                if self._need_snapshot:
                    snap = await self._snapshot_fn()
                    await asyncio.wait_for(self._directory.restore.remote(snap), self._timeout_s)
                    self._need_snapshot = False
                    self.num_snapshots += 1
                self.num_flushes += 1
                return True
            except Exception as e:  # noqa: BLE001 - any transport failure: retry later
                logger.warning("KV event flush failed (%s); will retry", e)
                self._buffer = batches + self._buffer
                if len(self._buffer) > self._max_buffered:
                    self._buffer.clear()
                    self._need_snapshot = True
                return False

    async def run(self, interval_s: float = 0.05) -> None:
        """Flush forever every ``interval_s`` (run as a task; cancel to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
