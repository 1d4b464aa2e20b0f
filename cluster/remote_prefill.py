"""Remote prefill for one decode replica: plan -> prefill pool -> KV transport -> land, or recompute.

The decode engine parks a request whose prompt is mostly uncached and hands out a
:class:`engine.RemotePrefillPlan` (which blocks to fill). For each plan this object asks
the prefill pool for exactly those blocks, receives them over the KV transport, writes
them into the reserved blocks and resumes the request with the prefill replica's first
token. Any failure on that path (pool down, no answer, transfer error) makes the engine
recompute the prompt locally: the client sees only latency.

A dead or unreachable prefill pool costs a request no more than a local prefill: a
circuit breaker (:mod:`cluster.prefill_health`) sends new requests local while the pool is
down, and calls in flight give up the moment it opens.

It owns all remote-prefill state (which replica prefilled which request, transfer ids,
in-flight calls, fault injection) and never calls back into the deployment. No Ray here:
the pool is any object with async ``prefill(request, hints)`` and ``ping()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from cluster.engine_loop import EngineDeadError, EngineLoop
from cluster.prefill_health import HealthSettings, PrefillPoolHealth
from cluster.transport import TransferError, dtype_from_str, run_blocking
from cluster.wire import FailRemoteKV, LandRemoteKV, PrefillRefused, PrefillRequest, PrefillResult

logger = logging.getLogger(__name__)

LOCAL = "local"
# Fault injection waits for a transfer id nobody sends: the real timeout path.
_NEVER_SENT = 1 << 29


class PrefillPool(Protocol):
    """The prefill pool as the decode replica sees it (a Serve handle, behind an adapter)."""

    async def prefill(self, request: PrefillRequest, hints: Any) -> PrefillResult | PrefillRefused: ...

    async def ping(self) -> None: ...


class PoolUnavailable(Exception):
    """The prefill pool did not answer (dead, unreachable, too slow): the breaker opens."""


class RemotePrefill:
    """Runs every remote prefill of one decode replica."""

    def __init__(
        self,
        pool: PrefillPool,
        transport: Any,
        loop: EngineLoop,
        metrics: Any,
        *,
        call_timeout_s: float,
        transfer_timeout_s: float,
        health: HealthSettings | None = None,
        hints: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.transport = transport
        self.loop = loop
        self.metrics = metrics
        self.call_timeout_s = call_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.health = PrefillPoolHealth(health)
        self._hints = hints
        self._clock = clock
        self._transfer_ids = itertools.count(1)
        # request id -> which prefill replica served it ("local" until a remote prefill lands).
        self._origin: dict[str, str] = {}
        # transfer id -> when its prefill call started (unanswered calls only).
        self._calls: dict[int, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None
        self._inject_failures = 0
        self.num_remote_prefills = 0
        self.num_transfer_failures = 0

    # ------------------------------------------------------------ the decode side's view

    def available(self) -> bool:
        """Should a new request ask the pool at all (False while the breaker is open)?"""
        return self.health.available()

    def begin(self, request_id: str) -> None:
        self._origin[request_id] = LOCAL

    def origin(self, request_id: str) -> str:
        """Which prefill replica served ``request_id`` ("local" if this replica did)."""
        return self._origin.get(request_id, LOCAL)

    def forget(self, request_id: str) -> None:
        self._origin.pop(request_id, None)

    def inject_failures(self, count: int) -> None:
        """The next ``count`` transfers wait for KV that never comes (chaos drills, tests)."""
        self._inject_failures = count

    def on_plans(self, plans: list[Any]) -> None:
        """EngineLoop callback (on the event loop): start one task per plan."""
        self._ensure_watchdog()
        for plan in plans:
            task = asyncio.get_running_loop().create_task(self._run(plan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop the watchdog and abandon plans in flight (replica teardown)."""
        for task in [*self._tasks, *([self._watchdog] if self._watchdog else [])]:
            task.cancel()

    # ------------------------------------------------------------ one plan

    async def _run(self, plan: Any) -> None:
        rid = plan.request_id
        if not self.health.available():
            await self._recompute(rid, "the prefill pool is unavailable", count_failure=False)
            return
        tid = next(self._transfer_ids)
        t0 = time.monotonic()
        drop = self._inject_failures > 0
        if drop:
            self._inject_failures -= 1
        try:
            request = PrefillRequest(
                request_id=rid,
                prompt_token_ids=tuple(plan.prompt_token_ids),
                params=plan.params,
                first_block_index=plan.first_block_index,
                endpoint=self.transport.listen(),
                transfer_id=tid,
            )
            resp = await self._call_pool(tid, request, self._hints(plan) if self._hints else None)
            if isinstance(resp, PrefillRefused):
                raise TransferError(f"prefill replica refused: {resp.reason}")
            if resp.shape[2] != len(plan.block_ids):
                raise TransferError(f"prefill sent {resp.shape[2]} blocks, {len(plan.block_ids)} expected")
            buf = await run_blocking(
                self.transport.recv, resp.group_id, tid + _NEVER_SENT if drop else tid, resp.shape,
                dtype_from_str(resp.dtype), self.transfer_timeout_s, resp.backend or None,
            )
            # The larger hit counts; the decode side's own hit is on its device (the plan
            # holds only device blocks), the prefill side says where its hit came from.
            if resp.num_cached_tokens >= plan.num_local_cached_tokens:
                cached, split = resp.num_cached_tokens, resp.cached_tokens_by_tier
            else:
                cached, split = plan.num_local_cached_tokens, None
            # The origin must be set before the first output can be dispatched.
            if rid in self._origin:
                self._origin[rid] = resp.replica_id
            landed = await self.loop.submit(
                LandRemoteKV(rid, tuple(plan.block_ids), buf, resp.first_token_id, cached, split)
            )
            if landed:
                self.num_remote_prefills += 1
                self.metrics.transfer_done(buf.numel() * buf.element_size(), time.monotonic() - t0,
                                           resp.backend or getattr(self.transport, "backend", "unknown"))
        except Exception as e:  # noqa: BLE001 - pool down, timeout, transfer error: recompute
            await self._recompute(rid, repr(e), count_failure=True)

    async def _call_pool(self, tid: int, request: PrefillRequest, hints: Any) -> PrefillResult | PrefillRefused:
        """The pool's answer, or PoolUnavailable (breaker opened) as soon as the pool looks down."""
        self._calls[tid] = self._clock()
        call = asyncio.ensure_future(self.pool.prefill(request, hints))
        opened = asyncio.ensure_future(self.health.opened.wait())
        try:
            done, _ = await asyncio.wait({call, opened}, timeout=self.call_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            self._calls.pop(tid, None)
        if call in done:
            try:
                resp = call.result()
            except Exception as e:
                self.health.record_failure(self._clock())
                raise PoolUnavailable(f"prefill call failed: {e!r}") from e
            self.health.record_success(self._clock())
            return resp
        call.cancel()
        if opened in done:
            raise PoolUnavailable("the prefill pool became unavailable")
        self.health.record_failure(self._clock())
        raise PoolUnavailable(f"no answer from the prefill pool within {self.call_timeout_s:g}s")

    async def _recompute(self, rid: str, reason: str, *, count_failure: bool) -> None:
        if count_failure:
            self.num_transfer_failures += 1
            logger.warning("remote prefill of %s failed (%s); recomputing locally", rid, reason)
        self.metrics.local_recompute("transfer_failed" if count_failure else "pool_unavailable")
        if rid in self._origin:
            self._origin[rid] = LOCAL
        try:
            await self.loop.submit(FailRemoteKV(rid))
        except EngineDeadError:
            pass

    # ------------------------------------------------------------ the watchdog

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Probe the pool when a call hangs (suspect) or while the breaker is open."""
        s = self.health.settings
        tick = min(s.suspect_after_s, s.probe_interval_s) / 2
        while True:
            await asyncio.sleep(tick)
            now = self._clock()
            if not self.health.probe_due(now, min(self._calls.values(), default=None)):
                continue
            self.health.probe_sent(now)
            try:
                await asyncio.wait_for(self.pool.ping(), timeout=s.probe_timeout_s)
            except Exception as e:  # noqa: BLE001 - any failure to answer means down
                if self.health.available():
                    logger.warning("prefill pool unavailable (%r): prefilling locally until it answers", e)
                self.health.record_failure(self._clock())
            else:
                if not self.health.available():
                    logger.info("prefill pool answers again: remote prefill resumes")
                self.health.record_success(self._clock())
