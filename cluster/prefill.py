"""The prefill pool: a thin Serve shell over ``ReplicaCore`` in the prefill role.

A decode replica calls ``prefill(request)`` with the blocks it still needs and its transport
endpoint. The core schedules the prompt (reusing this replica's prompt cache, chunked and
batched with other prompts), samples the first token, packs only the requested blocks into
one buffer and posts the send; it answers with the first token and where the buffer
travels. This file only wires Ray-side pieces (metrics, the KV-event pump) and delegates.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.config import SERVING_CLOCK, ServeConfig
from cluster.metrics import ReplicaMetrics
from cluster.replica import ReplicaCore
from cluster.replica_setup import build_transport, limit_threads, replica_id
from cluster.routing import EventPump
from cluster.wire import PrefillRefused, PrefillRequest, PrefillResult, ReplicaStats


@serve.deployment
class PrefillServer:
    """One prefill replica."""

    def __init__(self, config: dict[str, Any]) -> None:
        from engine import LLMEngine

        cfg = ServeConfig.model_validate(config)
        limit_threads(cfg.prefill.torch_threads)
        rid = replica_id("prefill-local")
        engine_cfg = cfg.engine_config("prefill", rid)
        routed = cfg.routing.request_router == "kvferry"
        self.core = ReplicaCore(
            "prefill", rid,
            lambda: LLMEngine.from_pretrained(cfg.model.model, config=engine_cfg, clock=SERVING_CLOCK),
            ReplicaMetrics(),
            max_num_seqs=engine_cfg.max_num_seqs,
            transfer_timeout_s=cfg.transport.transfer_timeout_s,
            # KV events feed the pool's directory only when kvferry's routers use it.
            on_events=(lambda batch: self._pump.on_events(batch)) if routed else None,
        )
        self._pump = EventPump("prefill", self.core.loop) if routed else None
        self.core.start()
        self.transport = build_transport(cfg, "prefill", rid)

    async def prefill(self, request: PrefillRequest, hints: Any = None) -> PrefillResult | PrefillRefused:
        """Prefill ``request`` and push its blocks (``hints`` are for the pool's RequestRouter)."""
        return await self.core.prefill(request, self.transport)

    async def ping(self) -> None:
        """A no-op the decode pool's failover probe calls: answering at all is the signal."""

    async def stats(self) -> ReplicaStats:
        return await self.core.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        return self.core.routing_stats()

    def check_health(self) -> None:
        self.core.check_health()

    def __del__(self) -> None:
        try:
            self.core.shutdown()
            self.transport.close()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
