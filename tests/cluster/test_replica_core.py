"""ReplicaCore without Ray: a scripted fake engine behind the real step loop.

Checks the contract the deployments rely on: typed chunks out, typed errors (never an
exception across the handle), one failing request leaves the others alone, a dead loop
fails health, and the prefill role answers with a PrefillResult or PrefillRefused.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from cluster.replica import ReplicaCore
from cluster.wire import ApiError, GenerateRequest, PrefillRefused, PrefillRequest, PrefillResult, StreamChunk
from engine import ContextLengthExceeded, EngineStats, KVExport, RequestOutput, SamplingParams


class FakeEngine:
    """Emits one token (id 7, text "x") per step per request; scripted failures by request id."""

    model_id, max_model_len, block_size = "fake", 128, 16
    model_config = SimpleNamespace(vocab_size=100)

    def __init__(self, role: str = "mixed") -> None:
        self.role = role
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.exports: set[str] = set()
        self.crash_on_step = False

    def add_request(self, rid, prompt, params, remote_prefill=False, export_from_block=None):
        if rid.startswith("toolong"):
            raise ContextLengthExceeded("too long for the fake", max_model_len=self.max_model_len)
        if rid.startswith("bad"):
            raise ValueError("bad input")
        self.requests[rid] = (list(prompt), params, [])

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.crash_on_step:
            raise RuntimeError("broken invariant")
        outs = []
        for rid, (prompt, params, tokens) in list(self.requests.items()):
            tokens.append(7)
            failed = rid.startswith("nan")
            done = failed or len(tokens) >= params.max_tokens or self.role == "prefill"
            export = None
            if done and self.role == "prefill":
                export = KVExport([3, 4], 0, len(prompt))
                self.exports.add(rid)
            outs.append(RequestOutput(
                request_id=rid, prompt_token_ids=prompt, token_ids=list(tokens), new_token_ids=[7],
                text="x" * len(tokens), new_text="x", finished=done,
                finish_reason=("error" if failed else "length") if done else None,
                num_prompt_tokens=len(prompt), num_cached_tokens=0, kv_export=export,
                error="the model produced NaN logits for this request" if failed else None))
            if done:
                del self.requests[rid]
        return outs

    def abort(self, rid: str) -> None:
        self.requests.pop(rid, None)

    @property
    def kv_transfer(self) -> FakeEngine:  # the KV-transfer facade is this fake too
        return self

    def take_plans(self) -> list:
        return []

    def take_events(self):
        return None

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.requests), num_free_blocks=10, num_total_blocks=10)

    def read_blocks(self, block_ids):
        return torch.zeros(1, 2, len(block_ids), 16, 1, 2)

    def release_export(self, rid: str) -> None:
        self.exports.discard(rid)


class FakeMetrics:
    def __init__(self) -> None:
        self.observed: dict[str, list[float]] = {"ttft": [], "itl": [], "e2e": [], "tpot": []}
        self.finished_reasons: list[str | None] = []
        for name in self.observed:
            setattr(self, name, SimpleNamespace(observe=self.observed[name].append))

    def finished(self, reason, prompt_tokens, generated_tokens) -> None:
        self.finished_reasons.append(reason)

    def engine_stats(self, stats) -> None:
        pass


def _core(role: str = "mixed") -> tuple[ReplicaCore, FakeEngine, FakeMetrics]:
    eng, metrics = FakeEngine(role), FakeMetrics()
    core = ReplicaCore(role, f"{role}#1", lambda: eng, metrics, max_num_seqs=8)
    core.start()
    return core, eng, metrics


def _request(rid: str, max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3), SamplingParams(max_tokens=max_tokens), "messages")


async def _collect(core: ReplicaCore, req: GenerateRequest) -> list:
    return [item async for item in core.generate(req, None)]


def test_generate_streams_typed_chunks_and_records_latency() -> None:
    core, _, metrics = _core()
    try:
        items = asyncio.run(_collect(core, _request("r1")))
        assert all(isinstance(i, StreamChunk) for i in items) and len(items) == 3
        last = items[-1]
        assert last.finished and last.finish_reason == "length" and last.completion_tokens == 3
        assert last.prefill_replica == "local" and last.decode_replica == "mixed#1"
        assert "".join(i.new_text for i in items) == "xxx"
        assert len(metrics.observed["ttft"]) == 1 and len(metrics.observed["itl"]) == 2
        assert metrics.finished_reasons == ["length"]
        assert core.info.vocab_size == 100 and core.info.max_model_len == 128
    finally:
        core.shutdown()


@pytest.mark.parametrize(("rid", "status", "code"), [
    ("toolong-1", 400, "context_length_exceeded"),
    ("bad-1", 400, None),
    ("nan-1", 500, "INTERNAL_ERROR"),
])
def test_refusals_and_failures_are_error_values_for_that_request_alone(rid, status, code) -> None:
    core, _, _ = _core()
    try:
        async def run():
            return await asyncio.gather(_collect(core, _request(rid)), _collect(core, _request("ok", 4)))

        failed, ok = asyncio.run(run())
        assert len(failed) == 1 and isinstance(failed[0], ApiError)
        assert failed[0].status_code == status and failed[0].code == code
        if status == 400:
            assert failed[0].param == "messages"
        assert [c.completion_tokens for c in ok] == [1, 2, 3, 4]  # the other request is untouched
        core.check_health()
    finally:
        core.shutdown()


def test_a_dead_loop_ends_streams_with_503_and_fails_health() -> None:
    core, eng, _ = _core()
    try:
        async def run():
            eng.crash_on_step = True
            return await _collect(core, _request("r1"))

        items = asyncio.run(run())
        assert len(items) == 1 and isinstance(items[0], ApiError) and items[0].status_code == 503
        assert "broken invariant" not in items[0].message  # clients get a message, logs the trace
        with pytest.raises(RuntimeError, match="dead"):
            core.check_health()
    finally:
        core.shutdown()


def test_routing_stats_and_stats_snapshots() -> None:
    core, _, _ = _core()
    try:
        stats = asyncio.run(core.stats())
        assert stats.replica_id == "mixed#1" and stats.engine.num_free_blocks == 10
        asyncio.run(_collect(core, _request("r1", 1)))  # a step publishes last_stats
        assert core.routing_stats()["max_num_seqs"] == 8
    finally:
        core.shutdown()


class FakeTransport:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[int, tuple]] = []

    def send(self, endpoint, transfer_id, buffer):
        if self.fail:
            raise RuntimeError("peer unreachable")
        self.sent.append((transfer_id, tuple(buffer.shape)))
        result = SimpleNamespace(group_id="g1", shape=tuple(buffer.shape), dtype="float32", backend="gloo")
        return SimpleNamespace(result=result, wait=lambda timeout_s: None)


def _prefill_request(rid: str = "p1") -> PrefillRequest:
    return PrefillRequest(rid, (1, 2, 3), SamplingParams(max_tokens=1), 0, endpoint=None, transfer_id=5)


def test_prefill_answers_with_a_result_and_releases_the_lease_after_delivery() -> None:
    core, eng, _ = _core("prefill")
    transport = FakeTransport()
    try:
        async def run():
            result = await core.prefill(_prefill_request(), transport)
            await asyncio.sleep(0.3)  # the delivery task ends the lease
            return result

        result = asyncio.run(run())
        assert isinstance(result, PrefillResult)
        assert result.first_token_id == 7 and result.shape[2] == 2 and result.replica_id == "prefill#1"
        assert transport.sent == [(5, (1, 2, 2, 16, 1, 2))]
        assert eng.exports == set() and core.num_sent == 1
    finally:
        core.shutdown()


def test_prefill_refuses_bad_input_and_failed_sends() -> None:
    core, eng, _ = _core("prefill")
    try:
        refused = asyncio.run(core.prefill(_prefill_request("bad-1"), FakeTransport()))
        assert isinstance(refused, PrefillRefused) and "bad input" in refused.reason
        failed = asyncio.run(core.prefill(_prefill_request("p2"), FakeTransport(fail=True)))
        assert isinstance(failed, PrefillRefused) and core.num_send_failures == 1
        assert eng.exports == set()  # the lease was released, not leaked
    finally:
        core.shutdown()
