"""The replica core: one engine behind a step loop, whatever the replica's role. No Ray here.

The prefill and decode deployments (``cluster/prefill.py``, ``cluster/decode.py``) are thin
shells over this class, the way Ray Serve LLM wraps a plain server class: they build it
with an ``engine_factory`` and the Ray-side pieces (metrics, the KV-event pump), and
delegate every method. It owns:

- the engine loop (``cluster.engine_loop``), started in the replica's constructor;
- ``generate`` (decode and mixed roles): one request's outputs as :class:`StreamChunk`
  values, or one :class:`ApiError` value; remote prefill is the injected
  ``RemotePrefill``'s job;
- ``prefill`` (prefill role): compute a prompt, push its blocks, answer
  :class:`PrefillResult` or :class:`PrefillRefused`;
- stats, routing load snapshots, metric publication, health and teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from cluster.engine_loop import EngineDeadError, EngineLoop, RequestStream
from cluster.remote_prefill import LOCAL, RemotePrefill
from cluster.transport import TransferError, run_blocking
from cluster.wire import (
    CONTEXT_LENGTH_EXCEEDED,
    DECODE_POOL_UNAVAILABLE,
    INTERNAL_ERROR,
    AddRequest,
    ApiError,
    GenerateRequest,
    GetStats,
    ModelInfo,
    PinResult,
    PrefillRefused,
    PrefillRequest,
    PrefillResult,
    ReadExport,
    ReleaseExport,
    ReplicaStats,
    StreamChunk,
    StreamItem,
)
from engine.errors import ContextLengthExceeded, InvalidTokenIds

logger = logging.getLogger(__name__)


class Histogram(Protocol):
    def observe(self, value: float) -> None: ...


class MetricsSink(Protocol):
    """What the core records (``cluster.metrics.ReplicaMetrics``; a fake in unit tests)."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    tpot: Histogram

    def finished(self, finish_reason: str | None, prompt_tokens: int, generated_tokens: int) -> None: ...

    def engine_stats(self, stats: Any) -> None: ...


class ReplicaCore:
    """One replica's engine loop, model facts, request handling, stats, health and teardown."""

    def __init__(
        self,
        role: str,
        replica_id: str,
        engine_factory: Callable[[], Any],
        metrics: MetricsSink,
        *,
        max_num_seqs: int,
        transfer_timeout_s: float = 20.0,
        on_plans: Callable[[list[Any]], None] | None = None,
        on_events: Callable[[Any], None] | None = None,
        metrics_period_s: float = 1.0,
    ) -> None:
        self.role = role
        self.replica_id = replica_id
        self.metrics = metrics
        self.max_num_seqs = max_num_seqs
        self.transfer_timeout_s = transfer_timeout_s
        self.loop = EngineLoop(engine_factory, name=f"{role}-loop", on_plans=on_plans, on_events=on_events)
        self._metrics_period_s = metrics_period_s
        self._metrics_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.info: ModelInfo | None = None
        self.num_sent = 0
        self.num_send_failures = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ModelInfo:
        """Load the engine (blocking: Serve shows the replica as starting meanwhile)."""
        self.loop.start_blocking()
        eng = self.loop.engine  # immutable facts, read once before any step runs
        self.info = ModelInfo(eng.model_id, eng.max_model_len, eng.block_size, eng.model_config.vocab_size)
        return self.info

    def check_health(self) -> None:
        """Raise if the step loop is dead (Serve then replaces the replica)."""
        if not self.loop.alive:
            raise RuntimeError(f"{self.role} engine loop is dead")

    def shutdown(self) -> None:
        for task in [*self._tasks, *([self._metrics_task] if self._metrics_task else [])]:
            task.cancel()
        self.loop.shutdown(timeout_s=1.0)

    # ------------------------------------------------------------------ load and stats

    async def stats(self, remote: RemotePrefill | None = None) -> ReplicaStats:
        """Engine load plus transfer counters (a fresh snapshot, taken between steps)."""
        engine_stats = await self.loop.submit(GetStats())
        return ReplicaStats(
            replica_id=self.replica_id,
            role=self.role,
            engine=engine_stats,
            num_remote_prefills=remote.num_remote_prefills if remote else 0,
            num_transfer_failures=remote.num_transfer_failures if remote else 0,
            num_sent=self.num_sent,
            num_send_failures=self.num_send_failures,
        )

    def routing_stats(self) -> dict[str, Any]:
        """The load snapshot Serve hands to this pool's RequestRouter (never waits for a step).

        A dict because that is Serve's ``record_routing_stats`` contract; the keys are the
        fields of ``router.policy.ReplicaLoad``.
        """
        s = self.loop.last_stats
        if s is None:
            return {}
        return {
            "queued_prefill_tokens": s.num_queued_prefill_tokens,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting + s.num_waiting_for_remote_kv,
            "max_num_seqs": self.max_num_seqs,
            "kv_usage": s.kv_usage,
            "num_free_blocks": s.num_free_blocks,
        }

    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(self._publish_metrics())

    async def _publish_metrics(self) -> None:
        """Copy the step loop's latest stats into the metrics, forever."""
        while True:
            self.metrics.engine_stats(self.loop.last_stats)
            await asyncio.sleep(self._metrics_period_s)

    # ------------------------------------------------------------------ decode / mixed

    async def generate(self, request: GenerateRequest, remote: RemotePrefill | None) -> AsyncIterator[StreamItem]:
        """Stream one request's outputs; an :class:`ApiError` value ends the stream early."""
        rid = request.request_id
        self._ensure_metrics_task()
        # While the prefill pool is down, requests prefill here from the start.
        use_remote = remote is not None and remote.available()
        if remote is not None:
            remote.begin(rid)
        try:
            try:
                stream = await self.loop.add_request(
                    AddRequest(rid, request.prompt_token_ids, request.params, remote_prefill=use_remote,
                               pin=request.pin)
                )
            except ContextLengthExceeded as e:
                yield ApiError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=request.prompt_param)
                return
            except InvalidTokenIds as e:
                yield ApiError(400, str(e), param=request.prompt_param if e.field == "prompt" else e.field)
                return
            except ValueError as e:
                yield ApiError(400, str(e), param=request.prompt_param)
                return
            except EngineDeadError as e:
                logger.warning("request %s refused: %r", rid, e)
                yield ApiError(503, "the decode replica is restarting, retry later", code=DECODE_POOL_UNAVAILABLE)
                return
            async for item in self._chunks(rid, stream, remote):
                if request.pin is not None and isinstance(item, StreamChunk) and item.finished:
                    # The engine pinned (or refused) in the step that finished the request.
                    tokens, why = await self.loop.submit(PinResult(request.pin.pin_id))
                    item = dataclasses.replace(item, pinned_tokens=tokens, pin_refusal=why)
                yield item
        finally:
            if remote is not None:
                remote.forget(rid)

    async def _chunks(self, rid: str, stream: RequestStream, remote: RemotePrefill | None) -> AsyncIterator[StreamItem]:
        """The engine's outputs as wire chunks, recording latency metrics on the way."""
        t0 = time.monotonic()
        last_t: float | None = None
        first_t = t0
        try:
            async for out in stream:
                now = time.monotonic()
                if out.new_token_ids:
                    (self.metrics.itl if last_t is not None else self.metrics.ttft).observe(now - (last_t or t0))
                    if last_t is None:
                        first_t = now
                    last_t = now
                if out.finished:
                    self.metrics.e2e.observe(now - t0)
                    if len(out.token_ids) > 1:
                        self.metrics.tpot.observe((now - first_t) / (len(out.token_ids) - 1))
                    self.metrics.finished(out.finish_reason, out.num_prompt_tokens, len(out.token_ids))
                if out.error is not None:  # this request alone failed; the engine serves on
                    yield ApiError(500, f"generation failed: {out.error}", code=INTERNAL_ERROR)
                    return
                yield StreamChunk(
                    new_text=out.new_text,
                    new_token_ids=tuple(out.new_token_ids),
                    finished=out.finished,
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=len(out.token_ids),
                    cached_tokens=out.num_cached_tokens,
                    prefill_replica=remote.origin(rid) if remote is not None else LOCAL,
                    decode_replica=self.replica_id,
                    stop_string=out.stop_string,
                    cached_tokens_by_tier=out.cached_tokens_by_tier,
                )
        except EngineDeadError as e:
            logger.error("request %s lost its decode engine: %r", rid, e)
            yield ApiError(503, "the decode replica serving this request failed, retry later",
                           code=DECODE_POOL_UNAVAILABLE)

    # ------------------------------------------------------------------ prefill

    async def prefill(self, req: PrefillRequest, transport: Any) -> PrefillResult | PrefillRefused:
        """Prefill ``req`` and post its blocks to the decode replica's endpoint.

        The blocks stay leased until the send is delivered (or fails, or the engine's
        lease timeout frees them).
        """
        self._ensure_metrics_task()
        rid = req.prefill_request_id
        try:
            stream = await self.loop.add_request(
                AddRequest(rid, req.prompt_token_ids, req.params, export_from_block=req.first_block_index)
            )
            final = None
            async for out in stream:
                final = out
        except (ValueError, EngineDeadError) as e:
            return PrefillRefused(f"{type(e).__name__}: {e}")
        if final is None or final.kv_export is None or not final.token_ids:
            return PrefillRefused((final.error if final else None) or "prefill finished without a KV export")
        export = final.kv_export
        try:
            buffer = await self.loop.submit(ReadExport(tuple(export.block_ids)))
            handle = await run_blocking(transport.send, req.endpoint, req.transfer_id, buffer)
        except Exception as e:  # noqa: BLE001 - any failure: the decode side recomputes
            self.num_send_failures += 1
            await self.loop.submit(ReleaseExport(rid))
            return PrefillRefused(f"{type(e).__name__}: {e}")
        task = asyncio.get_running_loop().create_task(self._finish_send(rid, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        result = handle.result
        return PrefillResult(
            first_token_id=int(final.token_ids[0]),
            num_cached_tokens=int(final.num_cached_tokens),
            group_id=result.group_id,
            shape=tuple(result.shape),
            dtype=result.dtype,
            backend=result.backend,
            replica_id=self.replica_id,
            cached_tokens_by_tier=final.cached_tokens_by_tier,
        )

    async def _finish_send(self, rid: str, handle: Any) -> None:
        """Wait for delivery off the event loop, then end the lease (blocks stay cached)."""
        try:
            await run_blocking(handle.wait, self.transfer_timeout_s)
            self.num_sent += 1
        except TransferError as e:
            self.num_send_failures += 1
            logger.warning("KV send for %s failed: %s", rid, e)
        finally:
            try:
                await self.loop.submit(ReleaseExport(rid))
            except EngineDeadError:
                pass
