"""The decode pool (and the colocated ``mixed`` pool): replicas that orchestrate and stream.

A decode replica owns the request from the ingress onward (Ray Serve LLM's pattern): it
tokenizes, hands the prompt to its engine with ``remote_prefill=True``; the engine looks
up the local prefix cache, reserves blocks and either prefills locally (few uncached
tokens) or emits a remote-prefill plan. For each plan this replica asks the prefill pool
for only the missing blocks, receives them over the KV transport, writes them into the
reserved blocks and resumes the request with the prefill replica's first token. Any
failure on that path (pool down, timeout, transfer error) makes the engine recompute the
prompt locally: the client sees only latency.

With no prefill pool (``mixed`` role) the same class serves whole requests itself.

``generate`` is a streaming method; it yields plain dicts (they cross process
boundaries): one per engine output, or a single ``{"error": ...}`` if the request is
refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.config import ServeConfig
from cluster.engine_loop import EngineDeadError, EngineLoop
from cluster.errors import CONTEXT_LENGTH_EXCEEDED, DECODE_POOL_UNAVAILABLE
from cluster.metrics import ReplicaMetrics, publish_engine_stats
from cluster.replica import build_transport, limit_threads, replica_id, run_blocking
from cluster.routing import EventPump, routing_hints, routing_stats
from cluster.transport import TransferError, dtype_from_str

logger = logging.getLogger(__name__)

LOCAL = "local"


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
            on_plans=self._on_plans if prefill is not None else None,
            on_events=(lambda batch: self._pump.on_events(batch)) if self.kvferry_routing else None,
        )
        # KV events feed the pool's directory only when kvferry's routers use it.
        self._pump = EventPump(self.role, self.loop) if self.kvferry_routing else None
        self.loop.start_blocking()
        eng = self.loop.engine  # immutable facts, read once before any step runs
        self.model_id: str = eng.model_id
        self.max_model_len: int = eng.max_model_len
        self.block_size: int = eng.block_size
        self.transport = build_transport(self.cfg, self.role, self.replica_id) if prefill else None
        self._transfer_ids = itertools.count(1)
        # request id -> which prefill replica served it ("local" until a remote prefill lands).
        self._origin: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        self._inject_failures = 0
        self.num_remote_prefills = 0
        self.num_transfer_failures = 0
        self.metrics = ReplicaMetrics()
        self._metrics_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ API

    async def model_info(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "max_model_len": self.max_model_len, "block_size": self.block_size}

    async def generate(self, req: dict[str, Any], hints: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Stream one request. ``req``: ``request_id``, ``params`` (SamplingParams kwargs,
        ``max_tokens`` may be None) and ``prompt_token_ids`` or one of ``messages`` /
        ``prompt`` (text or ids). ``hints`` are for this pool's RequestRouter."""
        from engine import SamplingParams

        rid = req["request_id"]
        t0 = time.monotonic()
        self._ensure_metrics_task()
        try:
            prompt_ids = await self.loop.call(lambda eng: _tokenize(eng, req))
            kw = dict(req["params"])
            if kw.get("max_tokens") is None:
                room = self.max_model_len - len(prompt_ids)
                kw["max_tokens"] = max(1, min(self.cfg.model.default_max_tokens, room))
            if kw.get("cache_ttl_s") is not None:
                # Providers clamp long retention requests ("24h") to what they offer.
                kw["cache_ttl_s"] = min(float(kw["cache_ttl_s"]), self.cfg.cache.max_ttl_s)
            params = SamplingParams(**kw)
            self._origin[rid] = LOCAL
            stream = await self.loop.add_request(rid, prompt_ids, params, remote_prefill=self.role == "decode")
        except ValueError as e:
            self._origin.pop(rid, None)
            msg = str(e)
            code = CONTEXT_LENGTH_EXCEEDED if "context" in msg else None
            yield _error(400, msg, code, "messages" if "messages" in req else "prompt")
            return
        except EngineDeadError as e:
            self._origin.pop(rid, None)
            yield _error(503, f"decode replica unavailable: {e}", DECODE_POOL_UNAVAILABLE)
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
                yield {
                    "new_text": out.new_text,
                    "new_token_ids": list(out.new_token_ids),
                    "finished": out.finished,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": out.num_prompt_tokens,
                    "completion_tokens": len(out.token_ids),
                    "cached_tokens": out.num_cached_tokens,
                    "prefill_replica": self._origin.get(rid, LOCAL),
                    "decode_replica": self.replica_id,
                }
        except EngineDeadError as e:
            yield _error(503, f"decode replica failed: {e}", DECODE_POOL_UNAVAILABLE)
        finally:
            self._origin.pop(rid, None)

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
            "num_remote_prefills": self.num_remote_prefills,
            "num_transfer_failures": self.num_transfer_failures,
        }

    async def inject_transfer_failures(self, count: int) -> None:
        """Fault injection (operators' chaos drills, tests): for the next ``count`` remote
        prefills this replica waits for a transfer that never comes, exercising the
        transfer timeout, the pair re-forming and the local recompute end to end."""
        self._inject_failures = count

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

    # ------------------------------------------------------------------ remote prefill

    def _on_plans(self, plans: list[Any]) -> None:
        for plan in plans:
            task = asyncio.get_running_loop().create_task(self._remote_prefill(plan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _remote_prefill(self, plan: Any) -> None:
        rid = plan.request_id
        assert self.transport is not None and self.prefill is not None
        tid = next(self._transfer_ids)
        t0 = time.monotonic()
        drop = self._inject_failures > 0
        if drop:
            self._inject_failures -= 1
        try:
            endpoint = self.transport.listen()
            resp = await asyncio.wait_for(
                self.prefill.prefill.remote(
                    {
                        "request_id": rid,
                        "prompt_token_ids": plan.prompt_token_ids,
                        "params": _params_dict(plan.params),
                        "first_block_index": plan.first_block_index,
                        "endpoint": endpoint.__dict__,
                        "transfer_id": tid,
                    },
                    hints=self._prefill_hints(plan),
                ),
                timeout=self.cfg.http.prefill_timeout_s,
            )
            if "error" in resp:
                raise TransferError(f"prefill replica refused: {resp['error']}")
            shape = tuple(resp["shape"])
            if shape[2] != len(plan.block_ids):
                raise TransferError(f"prefill sent {shape[2]} blocks, {len(plan.block_ids)} expected")
            # Fault injection waits for a transfer id nobody sends: the real timeout path.
            recv_tid = tid + (1 << 29) if drop else tid
            buf = await run_blocking(
                self.transport.recv, resp["group_id"], recv_tid, shape, dtype_from_str(resp["dtype"]),
                self.cfg.transport.transfer_timeout_s, resp.get("backend") or None,
            )
            cached = max(plan.num_local_cached_tokens, int(resp["num_cached_tokens"]))
            first = int(resp["first_token_id"])
            # The origin must be set before the first output can be dispatched.
            self._origin[rid] = resp["replica_id"]
            landed = await self.loop.call(lambda eng: _land(eng, plan, buf, first, cached))
            if landed:
                self.num_remote_prefills += 1
                self.metrics.inc("kvferry_remote_prefills_total")
                self.metrics.inc("kvferry_kv_transfer_bytes_total", buf.numel() * buf.element_size())
                self.metrics.transfer_s.observe(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - pool down, timeout, transfer error: recompute
            self.num_transfer_failures += 1
            self.metrics.inc("kvferry_kv_transfer_failures_total")
            logger.warning("remote prefill of %s failed (%s); recomputing locally", rid, e)
            if rid in self._origin:
                self._origin[rid] = LOCAL
            try:
                await self.loop.call(lambda eng: eng.fail_remote_prefill(rid))
            except EngineDeadError:
                pass


def _tokenize(eng: Any, req: dict[str, Any]) -> list[int]:
    """Prompt token ids from chat messages, a text prompt or ids (runs on the loop thread)."""
    if req.get("prompt_token_ids") is not None:  # the ingress tokenized (kvferry routing)
        return [int(t) for t in req["prompt_token_ids"]]
    if req.get("messages") is not None:
        return eng.encode_chat(req["messages"], add_generation_prompt=True)
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        return eng.encode(prompt)
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    raise ValueError("a request needs messages or a prompt")


def _land(eng: Any, plan: Any, buf: Any, first_token_id: int, cached: int) -> bool:
    """Write the received KV and resume the request; False if it was aborted meanwhile.

    The check matters: an aborted request's blocks may already belong to someone else.
    """
    if not eng.is_waiting_for_remote_kv(plan.request_id):
        return False
    eng.write_kv_blocks(plan.block_ids, buf)
    eng.complete_remote_prefill(plan.request_id, first_token_id, cached)
    return True


def _params_dict(params: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(params)
