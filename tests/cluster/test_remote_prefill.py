"""RemotePrefill and its circuit breaker, without Ray: fake pool, fake transport, fake engine.

The regression behind it (issue 14): after the prefill replica died, the next long prompt
waited ~22 s for Serve to start a replacement instead of being prefilled locally at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from cluster.prefill_health import HealthSettings, PrefillPoolHealth
from cluster.remote_prefill import RemotePrefill
from cluster.wire import PrefillResult
from engine import SamplingParams

FAST = HealthSettings(suspect_after_s=0.05, probe_timeout_s=0.1, probe_interval_s=0.1)


class FakeEngine:
    """Records what RemotePrefill asks of the engine."""

    def __init__(self) -> None:
        self.waiting: set[str] = set()
        self.recomputed: list[str] = []
        self.landed: list[tuple[str, int, int]] = []
        self.written: list[list[int]] = []

    @property
    def kv_transfer(self) -> FakeEngine:  # the KV-transfer facade is this fake too
        return self

    def is_waiting(self, rid: str) -> bool:
        return rid in self.waiting

    def write_blocks(self, block_ids, buf) -> None:
        self.written.append(list(block_ids))

    def complete(self, rid: str, first: int, cached: int, by_tier=None) -> None:
        self.waiting.discard(rid)
        self.landed.append((rid, first, cached))

    def fail(self, rid: str) -> None:
        self.waiting.discard(rid)
        self.recomputed.append(rid)


class FakeLoop:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def submit(self, command):
        return command.apply(self.engine)


class FakeMetrics:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def transfer_done(self, nbytes: int, seconds: float, backend: str) -> None:
        self.counts["kvferry_remote_prefills_total"] = self.counts.get("kvferry_remote_prefills_total", 0) + 1

    def local_recompute(self, reason: str) -> None:
        key = f"kvferry_local_recomputes_total[{reason}]"
        self.counts[key] = self.counts.get(key, 0) + 1
        if reason == "transfer_failed":
            self.counts["kvferry_kv_transfer_failures_total"] = self.counts.get("kvferry_kv_transfer_failures_total", 0) + 1


class FakeTransport:
    def listen(self):
        return SimpleNamespace(host="127.0.0.1", port=1)

    def recv(self, group_id, tid, shape, dtype, timeout_s, backend):
        return torch.zeros(shape, dtype=dtype)


@dataclass
class FakePool:
    """``mode``: "ok" answers, "hang" never answers (Serve queueing with no replica), "dead" raises."""

    mode: str = "ok"
    ping_ok: bool = False
    calls: int = 0
    cancelled: int = 0
    pings: list[bool] = field(default_factory=list)

    async def prefill(self, request, hints):
        self.calls += 1
        if self.mode == "dead":
            raise RuntimeError("actor died")
        if self.mode == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return PrefillResult(first_token_id=7, num_cached_tokens=16, group_id="g", shape=(1, 2, 2, 4, 1, 2),
                             dtype="float32", backend="gloo", replica_id="prefill#1")

    async def ping(self):
        self.pings.append(self.ping_ok)
        if not self.ping_ok:
            await asyncio.Event().wait()


def _plan(rid: str):
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(range(40)), params=SamplingParams(),
                           first_block_index=1, block_ids=[5, 6], num_local_cached_tokens=16)


def _remote(pool: FakePool) -> tuple[RemotePrefill, FakeEngine, FakeMetrics]:
    eng, metrics = FakeEngine(), FakeMetrics()
    remote = RemotePrefill(pool, FakeTransport(), FakeLoop(eng), metrics, call_timeout_s=30.0,
                           transfer_timeout_s=1.0, health=FAST)
    return remote, eng, metrics


async def _settle(remote: RemotePrefill, timeout_s: float = 2.0) -> None:
    await asyncio.wait_for(asyncio.gather(*list(remote._tasks)), timeout_s)


def test_a_landed_prefill_names_the_prefill_replica() -> None:
    async def run() -> None:
        remote, eng, metrics = _remote(FakePool("ok"))
        eng.waiting.add("r1")
        remote.begin("r1")
        remote.on_plans([_plan("r1")])
        await _settle(remote)
        assert eng.landed == [("r1", 7, 16)] and eng.written == [[5, 6]]
        assert remote.origin("r1") == "prefill#1" and remote.num_remote_prefills == 1
        remote.forget("r1")
        assert remote.origin("r1") == "local"
        remote.close()

    asyncio.run(run())


def test_a_pool_that_never_answers_costs_a_request_no_more_than_suspect_plus_probe() -> None:
    async def run() -> None:
        pool = FakePool("hang", ping_ok=False)
        remote, eng, metrics = _remote(pool)
        eng.waiting.add("r1")
        remote.begin("r1")
        t0 = asyncio.get_running_loop().time()
        remote.on_plans([_plan("r1")])
        await _settle(remote)
        waited = asyncio.get_running_loop().time() - t0
        # Not the 30 s call timeout: the probe found the pool down and the call gave up.
        assert waited < 1.0
        assert eng.recomputed == ["r1"] and pool.cancelled == 1
        assert not remote.available() and remote.origin("r1") == "local"
        assert metrics.counts["kvferry_kv_transfer_failures_total"] == 1
        # While down, new plans recompute at once without calling the pool.
        eng.waiting.add("r2")
        remote.on_plans([_plan("r2")])
        await _settle(remote)
        assert eng.recomputed == ["r1", "r2"] and pool.calls == 1
        remote.close()

    asyncio.run(run())


def test_a_dead_pool_opens_the_breaker_and_a_probe_closes_it() -> None:
    async def run() -> None:
        pool = FakePool("dead", ping_ok=False)
        remote, eng, _ = _remote(pool)
        eng.waiting.add("r1")
        remote.on_plans([_plan("r1")])
        await _settle(remote)
        assert eng.recomputed == ["r1"] and not remote.available()
        pool.mode, pool.ping_ok = "ok", True  # the replacement replica is up
        for _ in range(50):
            await asyncio.sleep(0.02)
            if remote.available():
                break
        assert remote.available() and pool.pings[-1] is True
        eng.waiting.add("r2")
        remote.on_plans([_plan("r2")])
        await _settle(remote)
        assert [r for r, *_ in eng.landed] == ["r2"]
        remote.close()

    asyncio.run(run())


def test_breaker_probes_only_when_suspect_or_open() -> None:
    h = PrefillPoolHealth(HealthSettings(suspect_after_s=1.0, probe_timeout_s=1.0, probe_interval_s=2.0))
    assert h.available() and not h.probe_due(10.0, None)
    assert not h.probe_due(10.0, 9.5)  # a call 0.5 s old is not suspect yet
    assert h.probe_due(10.0, 9.0)
    h.probe_sent(10.0)
    assert not h.probe_due(11.0, 5.0)  # one probe per interval
    h.record_failure(11.0)
    assert not h.available() and h.opened.is_set() and h.num_opened == 1
    assert not h.probe_due(12.0, None) and h.probe_due(13.0, None)
    h.record_failure(13.0)
    assert h.num_opened == 1  # already open
    h.record_success(13.5)
    assert h.available() and not h.opened.is_set()


@pytest.mark.parametrize("mode", ["hang", "dead"])
def test_injected_and_real_failures_never_leave_a_request_parked(mode: str) -> None:
    async def run() -> None:
        remote, eng, _ = _remote(FakePool(mode))
        for i in range(5):
            eng.waiting.add(f"r{i}")
        remote.on_plans([_plan(f"r{i}") for i in range(5)])
        await _settle(remote)
        assert not eng.waiting and sorted(eng.recomputed) == [f"r{i}" for i in range(5)]
        remote.close()

    asyncio.run(run())
