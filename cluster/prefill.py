"""The prefill pool: replicas that compute prompt KV and push it to the asking decode replica.

A decode replica calls ``prefill(request)`` with the blocks it still needs (from
``first_block_index``) and its transport endpoint. This replica schedules the prompt
(reusing its own prompt cache, chunked and batched with other prompts), samples the first
token, packs only the requested blocks into one buffer and posts the send. It answers with
the first token and where the buffer travels; the blocks stay leased until the send is
delivered (or fails, or the engine's lease timeout frees them).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from cluster.config import ServeConfig
from cluster.engine_loop import EngineLoop
from cluster.metrics import ReplicaMetrics, publish_engine_stats
from cluster.replica import build_transport, limit_threads, replica_id, run_blocking
from cluster.routing import EventPump, routing_stats
from cluster.transport import TransferError, TransportEndpoint

logger = logging.getLogger(__name__)


@serve.deployment
class PrefillServer:
    """One prefill replica: an ``LLMEngine(role="prefill")`` behind a step loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        from engine import LLMEngine

        self.cfg = ServeConfig.model_validate(config)
        limit_threads(self.cfg.prefill.torch_threads)
        self.replica_id = replica_id("prefill-local")
        opts = self.cfg.engine_options("prefill", self.replica_id)
        kvferry_routing = self.cfg.request_router == "kvferry"
        self.loop = EngineLoop(
            lambda: LLMEngine.from_pretrained(self.cfg.model.model, **opts),
            name="prefill-loop",
            on_events=(lambda batch: self._pump.on_events(batch)) if kvferry_routing else None,
        )
        # KV events feed the pool's directory only when kvferry's routers use it.
        self._pump = EventPump("prefill", self.loop) if kvferry_routing else None
        self.loop.start_blocking()
        self.transport = build_transport(self.cfg, "prefill", self.replica_id)
        self._tasks: set[asyncio.Task] = set()
        self.num_sent = 0
        self.num_send_failures = 0
        self.metrics = ReplicaMetrics()
        self._metrics_task: asyncio.Task | None = None

    async def prefill(self, req: dict[str, Any], hints: Any = None) -> dict[str, Any]:
        """Prefill ``req`` and post its blocks to the decode replica.

        ``req``: ``request_id``, ``prompt_token_ids``, ``params`` (SamplingParams kwargs),
        ``first_block_index``, ``endpoint`` (TransportEndpoint fields) and ``transfer_id``.
        Returns ``first_token_id``, ``num_cached_tokens``, ``group_id``, ``shape``,
        ``dtype``, ``backend`` (the transport that carries the KV) and ``replica_id`` — or
        ``error`` with a message. ``hints`` (routing hints) are read by the pool's
        RequestRouter, not here.
        """
        from engine import SamplingParams

        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(
                publish_engine_stats(self.metrics, self.loop)
            )
        # Prefill-side id: the decode replica may retry the same request after a failure.
        rid = f"{req['request_id']}@{req['transfer_id']}"
        params = SamplingParams(**req["params"])
        try:
            stream = await self.loop.add_request(
                rid, req["prompt_token_ids"], params, export_from_block=req["first_block_index"]
            )
        except ValueError as e:
            return {"error": str(e)}
        final = None
        async for out in stream:
            final = out
        if final is None or final.kv_export is None or not final.token_ids:
            return {"error": "prefill finished without a KV export"}
        export = final.kv_export
        try:
            buffer = await self.loop.call(lambda eng: eng.read_kv_blocks(export.block_ids))
            endpoint = TransportEndpoint(**req["endpoint"])
            handle = await run_blocking(self.transport.send, endpoint, req["transfer_id"], buffer)
        except Exception as e:  # noqa: BLE001 - any failure: the decode side recomputes
            self.num_send_failures += 1
            await self.loop.call(lambda eng: eng.release_kv_export(rid))
            return {"error": f"{type(e).__name__}: {e}"}
        task = asyncio.create_task(self._finish_send(rid, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {
            "first_token_id": int(final.token_ids[0]),
            "num_cached_tokens": int(final.num_cached_tokens),
            "group_id": handle.result.group_id,
            "shape": list(handle.result.shape),
            "dtype": handle.result.dtype,
            "backend": handle.result.backend,
            "replica_id": self.replica_id,
        }

    async def _finish_send(self, rid: str, handle: Any) -> None:
        """Wait for delivery off the event loop, then end the lease (blocks stay cached)."""
        try:
            await run_blocking(handle.wait, self.cfg.transport.transfer_timeout_s)
            self.num_sent += 1
        except TransferError as e:
            self.num_send_failures += 1
            logger.warning("KV send for %s failed: %s", rid, e)
        finally:
            await self.loop.call(lambda eng: eng.release_kv_export(rid))

    async def stats(self) -> dict[str, Any]:
        """Engine load plus transfer counters (for routers, metrics and tests)."""
        s = await self.loop.call(lambda eng: eng.stats())
        return {
            "replica_id": self.replica_id,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_queued_prefill_tokens": s.num_queued_prefill_tokens,
            "kv_usage": s.kv_usage,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_sent": self.num_sent,
            "num_send_failures": self.num_send_failures,
        }

    async def ping(self) -> None:
        """A no-op the decode pool's failover probe calls: answering at all is the signal."""

    def record_routing_stats(self) -> dict[str, Any]:
        """Load snapshot Serve hands to this pool's RequestRouter (never waits for a step)."""
        return routing_stats(self.loop.last_stats, self.cfg.prefill.max_num_seqs)

    def check_health(self) -> None:
        """Serve's health check: a dead step loop makes the replica unhealthy (restarted)."""
        if not self.loop.alive:
            raise RuntimeError("prefill engine loop is dead")

    def __del__(self) -> None:
        try:
            self.loop.shutdown(timeout_s=1.0)
            self.transport.close()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
