"""EngineLoop: one thread owns the engine; calls, streams, aborts and crashes reach asyncio."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from cluster.engine_loop import EngineDeadError, EngineLoop
from cluster.wire import AddRequest


@dataclass
class _Out:
    request_id: str
    new_token_ids: list[int]
    finished: bool


@dataclass
class _CountingEngine:
    """Test double: each request emits one token per step until it has max_tokens."""

    threads: set = field(default_factory=set)
    reqs: dict = field(default_factory=dict)
    aborted: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    crash_on_step: bool = False
    events_taken: int = 0

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, rid, prompt, params, **kw):
        self._touch()
        if not prompt:
            raise ValueError("the prompt is empty")
        self.reqs[rid] = [params, 0]
        if kw.get("remote_prefill"):
            self.plans.append(rid)

    def abort(self, rid):
        self._touch()
        if self.reqs.pop(rid, None) is not None:
            self.aborted.append(rid)

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        self._touch()
        if self.crash_on_step and self.reqs:
            raise RuntimeError("broken invariant")
        outs = []
        for rid, st in list(self.reqs.items()):
            st[1] += 1
            done = st[1] >= st[0]
            outs.append(_Out(rid, [st[1]], done))
            if done:
                del self.reqs[rid]
        return outs

    @property
    def kv_transfer(self):  # the engine's KV-transfer facade: plans only, here
        return self

    def take_plans(self):
        p, self.plans = self.plans, []
        return p

    def take_events(self):
        self.events_taken += 1
        return None

    def stats(self):
        return {"num_running": len(self.reqs)}


def test_streams_calls_and_single_thread() -> None:
    eng = _CountingEngine()
    seen_plans: list = []

    async def main() -> None:
        loop = EngineLoop(lambda: eng, on_plans=seen_plans.extend)
        await loop.start()
        s1 = await loop.add_request(AddRequest("a", (1,), 3))
        s2 = await loop.add_request(AddRequest("b", (1,), 5, remote_prefill=True))
        toks_a = [o.new_token_ids[0] async for o in s1]
        toks_b = [o.new_token_ids[0] async for o in s2]
        assert toks_a == [1, 2, 3] and toks_b == [1, 2, 3, 4, 5]
        with pytest.raises(ValueError, match="empty"):
            await loop.add_request(AddRequest("c", (), 3))
        assert await loop.call(lambda e: len(e.reqs)) == 0
        loop.shutdown()
        with pytest.raises(EngineDeadError):
            await loop.call(lambda e: 1)

    asyncio.run(main())
    assert len(eng.threads) == 1 and threading.get_ident() not in eng.threads
    assert seen_plans == ["b"]


def test_abandoned_stream_aborts_request() -> None:
    eng = _CountingEngine()

    async def main() -> None:
        loop = EngineLoop(lambda: eng)
        await loop.start()
        stream = await loop.add_request(AddRequest("long", (1,), 10_000))
        async for _ in stream:
            break  # consumer goes away (e.g. client disconnected)
        await asyncio.sleep(0.2)
        assert await loop.call(lambda e: "long" in e.aborted)
        loop.shutdown()

    asyncio.run(main())


def test_crash_fails_waiters_instead_of_hanging() -> None:
    eng = _CountingEngine(crash_on_step=True)

    async def main() -> None:
        loop = EngineLoop(lambda: eng)
        await loop.start()
        stream = await loop.add_request(AddRequest("x", (1,), 3))
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not loop.alive

    asyncio.run(asyncio.wait_for(main(), 10))


def test_factory_failure_surfaces_from_start() -> None:
    def boom():
        raise OSError("no such model")

    async def main() -> None:
        with pytest.raises(OSError, match="no such model"):
            await EngineLoop(boom).start()

    asyncio.run(main())


def test_events_drained_and_stats_snapshotted_without_listeners() -> None:
    """The engine buffers KV events until taken: the loop must drain them even with no sink."""
    eng = _CountingEngine()

    async def main() -> None:
        loop = EngineLoop(lambda: eng, idle_tick_s=0.01, stats_period_s=0.01)
        await loop.start()
        stream = await loop.add_request(AddRequest("a", (1,), 2))
        async for _ in stream:
            pass
        await asyncio.sleep(0.1)
        assert loop.last_stats == {"num_running": 0}
        loop.shutdown()

    asyncio.run(main())
    assert eng.events_taken >= 2
