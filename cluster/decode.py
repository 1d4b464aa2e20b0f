"""The decode pool (and the colocated ``mixed`` pool): replicas that orchestrate and stream.

A decode replica owns the request from the ingress onward (Ray Serve LLM's pattern): it
hands the prompt's token ids to its engine with ``remote_prefill=True``; the engine looks
up the local prefix cache, reserves blocks and either prefills locally (few uncached
tokens) or emits a remote-prefill plan, which ``cluster.remote_prefill.RemotePrefill``
carries out (or turns into a local recompute on any failure). While the prefill pool is
down, requests prefill locally from the start.

With no prefill pool (``mixed`` role) the same class serves whole requests itself.

``generate`` is a streaming method; it yields plain dicts (they cross process
boundaries): one per engine output, or a single ``{"error": ...}`` if the request is
refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.config import ServeConfig
from cluster.engine_loop import EngineDeadError, EngineLoop
from cluster.errors import CONTEXT_LENGTH_EXCEEDED, DECODE_POOL_UNAVAILABLE, INTERNAL_ERROR
from cluster.metrics import ReplicaMetrics, publish_engine_stats
from cluster.prefill_health import HealthSettings
from cluster.remote_prefill import LOCAL, RemotePrefill
from cluster.replica import build_transport, limit_threads, replica_id
from cluster.routing import EventPump, routing_hints, routing_stats

logger = logging.getLogger(__name__)


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"status_code": status, "message": message, "code": code, "param": param}}


@serve.deployment
class DecodeServer:
    """One decode (or mixed) replica: an ``LLMEngine`` behind a step loop."""

    def __init__(self, config: dict[str, Any], prefill: Any | None = None) -> None:
        from engine import LLMEngine

        self.cfg = ServeConfig.model_validate(config)
        self.role = "decode" if prefill is not None else "mixed"
        pool = self.cfg.pool(self.role)
        limit_threads(pool.torch_threads)
        self.replica_id = replica_id(f"{self.role}-local")
        self.prefill = prefill
        opts = self.cfg.engine_options(self.role, self.replica_id)
        self.kvferry_routing = self.cfg.request_router == "kvferry"
        self.loop = EngineLoop(
            lambda: LLMEngine.from_pretrained(self.cfg.model.model, **opts),
            name=f"{self.role}-loop",
            on_plans=(lambda plans: self.remote.on_plans(plans)) if prefill is not None else None,
            on_events=(lambda batch: self._pump.on_events(batch)) if self.kvferry_routing else None,
        )
        # KV events feed the pool's directory only when kvferry's routers use it.
        self._pump = EventPump(self.role, self.loop) if self.kvferry_routing else None
        self.loop.start_blocking()
        eng = self.loop.engine  # immutable facts, read once before any step runs
        self.model_id: str = eng.model_id
        self.max_model_len: int = eng.max_model_len
        self.block_size: int = eng.block_size
        self.vocab_size: int = eng.model_config.vocab_size
        self.metrics = ReplicaMetrics()
        self._metrics_task: asyncio.Task | None = None
        self.remote: RemotePrefill | None = None
        if prefill is not None:
            f = self.cfg.failover
            self.remote = RemotePrefill(
                PrefillPoolClient(prefill),
                build_transport(self.cfg, self.role, self.replica_id),
                self.loop,
                self.metrics,
                call_timeout_s=self.cfg.http.prefill_timeout_s,
                transfer_timeout_s=self.cfg.transport.transfer_timeout_s,
                health=HealthSettings(f.suspect_after_s, f.probe_timeout_s, f.probe_interval_s),
                hints=self._prefill_hints if self.kvferry_routing else None,
            )

    # ------------------------------------------------------------------ API

    async def model_info(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "max_model_len": self.max_model_len, "block_size": self.block_size,
                "vocab_size": self.vocab_size}

    async def generate(self, req: dict[str, Any], hints: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Stream one request. ``req``: ``request_id``, ``params`` (SamplingParams kwargs,
        ``max_tokens`` may be None), ``prompt_token_ids`` (the ingress tokenizes) and
        ``prompt_param`` (the API field errors name). ``hints`` are for this pool's RequestRouter."""
        from engine import ContextLengthExceeded, SamplingParams

        rid = req["request_id"]
        t0 = time.monotonic()
        self._ensure_metrics_task()
        try:
            prompt_ids = [int(t) for t in req["prompt_token_ids"]]
            kw = dict(req["params"])
            if kw.get("max_tokens") is None:
                room = self.max_model_len - len(prompt_ids)
                kw["max_tokens"] = max(1, min(self.cfg.model.default_max_tokens, room))
            if kw.get("cache_ttl_s") is not None:
                # Providers clamp long retention requests ("24h") to what they offer.
                kw["cache_ttl_s"] = min(float(kw["cache_ttl_s"]), self.cfg.cache.max_ttl_s)
            params = SamplingParams(**kw)
            # While the prefill pool is down, requests prefill here from the start.
            remote = self.remote is not None and self.remote.available()
            if self.remote is not None:
                self.remote.begin(rid)
            stream = await self.loop.add_request(rid, prompt_ids, params, remote_prefill=remote)
        except ValueError as e:
            self._forget(rid)
            code = CONTEXT_LENGTH_EXCEEDED if isinstance(e, ContextLengthExceeded) else None
            yield _error(400, str(e), code, req.get("prompt_param", "prompt"))
            return
        except EngineDeadError as e:
            self._forget(rid)
            logger.warning("request %s refused: %r", rid, e)
            yield _error(503, "the decode replica is restarting, retry later", DECODE_POOL_UNAVAILABLE)
            return
        last_t: float | None = None
        try:
            async for out in stream:
                now = time.monotonic()
                if out.new_token_ids:
                    (self.metrics.itl if last_t is not None else self.metrics.ttft).observe(now - (last_t or t0))
                    last_t = now
                if out.finished:
                    self.metrics.e2e.observe(now - t0)
                    self.metrics.finished(out.finish_reason, out.num_prompt_tokens, len(out.token_ids))
                if out.error is not None:  # this request alone failed; the engine serves on
                    yield _error(500, f"generation failed: {out.error}", INTERNAL_ERROR)
                    return
                yield {
                    "new_text": out.new_text,
                    "new_token_ids": list(out.new_token_ids),
                    "finished": out.finished,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": out.num_prompt_tokens,
                    "completion_tokens": len(out.token_ids),
                    "cached_tokens": out.num_cached_tokens,
                    "prefill_replica": self.remote.origin(rid) if self.remote is not None else LOCAL,
                    "decode_replica": self.replica_id,
                }
        except EngineDeadError as e:
            logger.error("request %s lost its decode engine: %r", rid, e)
            yield _error(503, "the decode replica serving this request failed, retry later", DECODE_POOL_UNAVAILABLE)
        finally:
            self._forget(rid)

    def _forget(self, rid: str) -> None:
        if self.remote is not None:
            self.remote.forget(rid)

    async def stats(self) -> dict[str, Any]:
        s = await self.loop.call(lambda eng: eng.stats())
        return {
            "replica_id": self.replica_id,
            "role": self.role,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_waiting_for_remote_kv": s.num_waiting_for_remote_kv,
            "kv_usage": s.kv_usage,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_remote_prefills": self.remote.num_remote_prefills if self.remote else 0,
            "num_transfer_failures": self.remote.num_transfer_failures if self.remote else 0,
        }

    async def inject_transfer_failures(self, count: int) -> None:
        """Fault injection (operators' chaos drills, tests): for the next ``count`` remote
        prefills this replica waits for a transfer that never comes, exercising the
        transfer timeout, the pair re-forming and the local recompute end to end."""
        if self.remote is not None:
            self.remote.inject_failures(count)

    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(
                publish_engine_stats(self.metrics, self.loop)
            )

    def record_routing_stats(self) -> dict[str, Any]:
        """Load snapshot Serve hands to this pool's RequestRouter (never waits for a step)."""
        return routing_stats(self.loop.last_stats, self.cfg.pool(self.role).max_num_seqs)

    def _prefill_hints(self, plan: Any) -> Any:
        if not self.kvferry_routing:
            return None
        return routing_hints(plan.prompt_token_ids, self.block_size, self.model_id, plan.params.cache_salt)

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"{self.role} engine loop is dead")


class PrefillPoolClient:
    """The prefill pool's Serve handle as a :class:`cluster.remote_prefill.PrefillPool`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def prefill(self, request: dict[str, Any], hints: Any) -> dict[str, Any]:
        return await _cancel_on_exit(self._handle.prefill.remote(request, hints=hints))

    async def ping(self) -> None:
        await _cancel_on_exit(self._handle.ping.remote())


async def _cancel_on_exit(response: Any) -> Any:
    """Await a DeploymentResponse; cancelling the awaiting task cancels the request too
    (Serve would otherwise keep it queued for a replica that may never come)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
