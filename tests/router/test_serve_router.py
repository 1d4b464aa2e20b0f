"""PrefillRequestRouter in a running Serve app: a repeated prompt goes back to its replica."""

from __future__ import annotations

import time

import pytest

from engine.block_hash import hash_prompt_blocks
from engine.kv_events import BlockStored, CacheSnapshot, KVEventBatch, Tier
from router.hints import RoutingHints

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BS = 16


def _hints(seed: int, num_blocks: int = 32) -> RoutingHints:
    toks = [seed * 7 + i for i in range(num_blocks * BS)]
    return RoutingHints(tuple(hash_prompt_blocks(toks, BS, "toy")), len(toks) + 3, BS)


def _build_app(pool: str):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from router.directory_actor import get_or_create_directory
    from router.event_flusher import KVEventFlusher
    from router.serve_routers import PrefillRequestRouter

    @serve.deployment(
        num_replicas=3,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefillRequestRouter,
            # Generous: on a loaded 2-core CI box a slow lookup would fall back to
            # power-of-two choices, which is correct behaviour but not what we test here.
            request_router_kwargs={"pool": pool, "lookup_timeout_s": 5.0},
            request_routing_stats_period_s=0.5,
        ),
    )
    class ToyPrefill:
        """Stands in for a prefill replica: 'caches' each prompt and reports it as KV events."""

        def __init__(self) -> None:
            self.rid = serve.get_replica_context().replica_id.to_full_id_str()
            self.cached: set[int] = set()
            self.seq = -1
            self.flusher = KVEventFlusher(get_or_create_directory(pool), self._snapshot)

        async def _snapshot(self) -> CacheSnapshot:
            exp = time.time() + 300
            return CacheSnapshot(self.rid, self.seq, time.time(), [(h, None, Tier.DEVICE, exp) for h in self.cached])

        def record_routing_stats(self) -> dict:
            return {"queued_prefill_tokens": 0}

        async def __call__(self, hints: RoutingHints) -> str:
            new = [h for h in hints.block_hashes if h not in self.cached]
            self.cached.update(new)
            self.seq += 1
            self.flusher.add(KVEventBatch(self.rid, self.seq, time.time(),
                                          [BlockStored(tuple(new), None, Tier.DEVICE, time.time() + 300)]))
            await self.flusher.flush()
            return self.rid

    return ToyPrefill.bind()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_repeated_prompt_returns_to_the_replica_that_holds_it(ray_cluster):
    import ray
    from ray import serve

    from router.directory_actor import get_or_create_directory

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    handle = serve.run(_build_app("test-serve"), name="toy-router", route_prefix=None)
    try:
        first: dict[int, str] = {}
        # Five different prompts, sequential so events land before the repeat.
        for seed in range(5):
            first[seed] = handle.remote(_hints(seed)).result(timeout_s=30)
        stats = ray.get(get_or_create_directory("test-serve").stats.remote())
        assert stats["num_entries"] >= 5 * 32
        # Repeats (and a prompt extending prompt 0) go back where the prefix is.
        for _ in range(3):
            for seed in range(5):
                assert handle.remote(_hints(seed)).result(timeout_s=30) == first[seed]
        longer = RoutingHints(_hints(0).block_hashes + (12345,), 33 * BS, BS)
        assert handle.remote(longer).result(timeout_s=30) == first[0]
        # Cold prompts spread over more than one replica (ties are hashed, not "first").
        assert len(set(first.values())) >= 2
    finally:
        serve.delete("toy-router")
        ray.kill(get_or_create_directory("test-serve"), no_restart=True)
