"""The decode pool (and the colocated ``mixed`` pool): a thin Serve shell over ``ReplicaCore``.

A decode replica owns the request from the ingress onward (Ray Serve LLM's pattern): its
engine looks up the local prefix cache, reserves blocks and either prefills locally (few
uncached tokens, or the prefill pool is down) or emits a remote-prefill plan, which
``cluster.remote_prefill.RemotePrefill`` carries out (or turns into a local recompute on
any failure). With no prefill pool (``mixed`` role) the same class serves whole requests.

This file only wires Ray-side pieces (the prefill pool's handle, metrics, the KV-event
pump) to the plain classes and delegates; nothing below calls back into it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.config import SERVING_CLOCK, ServeConfig
from cluster.explicit_cache_actor import get_registry
from cluster.metrics import ReplicaMetrics
from cluster.pin_sync import PinSync
from cluster.prefill_health import HealthSettings
from cluster.remote_prefill import RemotePrefill
from cluster.replica import ReplicaCore
from cluster.replica_setup import build_transport, limit_threads, replica_id
from cluster.routing import EventPump, routing_hints
from cluster.wire import GenerateRequest, ModelInfo, PrefillRefused, PrefillRequest, PrefillResult, ReplicaStats, StreamItem


@serve.deployment
class DecodeServer:
    """One decode (or mixed) replica."""

    def __init__(self, config: dict[str, Any], prefill: Any | None = None) -> None:
        from engine import LLMEngine

        cfg = ServeConfig.model_validate(config)
        role = "decode" if prefill is not None else "mixed"
        limit_threads(cfg.pool(role).torch_threads)
        rid = replica_id(f"{role}-local")
        engine_cfg = cfg.engine_config(role, rid)
        routed = cfg.routing.request_router == "kvferry"
        self.metrics = ReplicaMetrics(cfg.transport.backend)
        self.core = ReplicaCore(
            role, rid, lambda: LLMEngine.from_pretrained(cfg.model.model, config=engine_cfg, clock=SERVING_CLOCK),
            self.metrics,
            max_num_seqs=engine_cfg.max_num_seqs,
            on_plans=(lambda plans: self.remote.on_plans(plans)) if prefill is not None else None,
            # KV events feed the pool's directory only when kvferry's routers use it.
            on_events=(lambda batch: self._pump.on_events(batch)) if routed else None,
        )
        self._pump = EventPump(role, self.core.loop) if routed else None
        # Explicit caches pinned here follow the app's registry (DELETE, PATCH, expiry).
        budget = cfg.cache.explicit_cache_budget_tokens
        self._pins = PinSync(self.core.loop, lambda: get_registry(cfg.app_name, budget), rid)
        info = self.core.start()
        self.remote: RemotePrefill | None = None
        if prefill is not None:
            f = cfg.failover
            self.remote = RemotePrefill(
                PrefillPoolClient(prefill), build_transport(cfg, role, rid), self.core.loop, self.metrics,
                call_timeout_s=cfg.http.prefill_timeout_s,
                transfer_timeout_s=cfg.transport.transfer_timeout_s,
                health=HealthSettings(f.suspect_after_s, f.probe_timeout_s, f.probe_interval_s),
                hints=(lambda plan: routing_hints(plan.prompt_token_ids, info.block_size, info.model_id,
                                                  plan.params.cache_salt)) if routed else None,
            )

    async def model_info(self) -> ModelInfo:
        return self.core.info

    async def generate(self, request: GenerateRequest, hints: Any = None) -> AsyncIterator[StreamItem]:
        """Stream one request (``hints`` are for this pool's RequestRouter, not read here)."""
        if request.pin is not None:
            self._pins.ensure_started()
        async for item in self.core.generate(request, self.remote):
            yield item

    async def stats(self) -> ReplicaStats:
        return await self.core.stats(self.remote)

    async def inject_transfer_failures(self, count: int) -> None:
        """Fault injection (operators' chaos drills, tests): the next ``count`` remote
        prefills wait for a transfer that never comes, exercising the transfer timeout,
        the pair re-forming and the local recompute end to end."""
        if self.remote is not None:
            self.remote.inject_failures(count)

    def record_routing_stats(self) -> dict[str, Any]:
        return self.core.routing_stats()

    def check_health(self) -> None:
        self.core.check_health()

    def __del__(self) -> None:
        try:
            if self.remote is not None:
                self.remote.close()
                self.remote.transport.close()
            self._pins.stop()
            self.core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


class PrefillPoolClient:
    """The prefill pool's Serve handle as a :class:`cluster.remote_prefill.PrefillPool`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def prefill(self, request: PrefillRequest, hints: Any) -> PrefillResult | PrefillRefused:
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
