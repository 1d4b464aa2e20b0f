"""Engine lifecycle: preemption, aborts, block accounting, TTL expiry, sampling, stops, roles."""

from __future__ import annotations

import random

import pytest
from engine import CacheBreakpoint, LLMEngine, SamplingParams
from engine.kv_events import BlockRemoved, BlockStored, BlockTouched
from tests.engine.conftest import hf_greedy
from tests.engine.tiny_models import load_hf_model


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _assert_no_leak(eng: LLMEngine) -> None:
    assert not eng.has_unfinished_requests()
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in eng.pool.blocks)


def test_preemption_by_recompute_keeps_greedy_tokens(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    rng = random.Random(1)
    prompts = [_rand_prompt(rng, n) for n in (20, 27, 33, 18, 25, 30)]
    hf = load_hf_model(path)
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    # 24 blocks of 4 tokens: far fewer than 6 requests x ~44 tokens need -> preemptions.
    eng = LLMEngine.from_pretrained(str(path), block_size=4, num_kv_blocks=24, max_num_batched_tokens=64)
    outs = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert eng.stats().num_preemptions > 0
    _assert_no_leak(eng)


def test_block_accounting_survives_many_requests_and_aborts(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen2")
    rng = random.Random(2)
    eng = LLMEngine.from_pretrained(str(path), block_size=4, num_kv_blocks=40, max_num_batched_tokens=32, max_num_seqs=8)
    shared = _rand_prompt(rng, 16)
    live: set[str] = set()
    for i in range(60):
        prompt = (shared if i % 2 else []) + _rand_prompt(rng, rng.randrange(1, 20))
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(1, 10), ignore_eos=True)
        eng.add_request(f"r{i}", prompt, params)
        live.add(f"r{i}")
        for out in eng.step():
            if out.finished:
                live.discard(out.request_id)
        if i % 7 == 3 and live:
            victim = sorted(live)[0]
            eng.abort(victim)
            live.discard(victim)
        # Invariant at every step: held blocks == blocks referenced by live requests.
        held = sum(1 for b in eng.pool.blocks if b.ref_cnt > 0)
        in_tables = {b.block_id for r in eng._requests.values() for b in r.blocks}
        assert held == len(in_tables)
    while eng.has_unfinished_requests():
        eng.step()
    _assert_no_leak(eng)
    s = eng.stats()
    assert s.prefix_cache_hits > 0 and s.prefix_cache_queries >= s.prefix_cache_hits


def test_ttl_expiry_and_sliding_refresh_with_fake_clock(tiny_model_dir) -> None:
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(
        str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64, clock=clock, default_ttl_s=300.0
    )
    prompt = list(range(10, 30))  # 20 tokens: 4 cacheable blocks (the last token is recomputed)
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    assert eng.generate([prompt], greedy)[0].num_cached_tokens == 0
    clock.now += 299.0
    assert eng.generate([prompt], greedy)[0].num_cached_tokens == 16  # hit, TTL slides to +300
    clock.now += 299.0
    assert eng.generate([prompt], greedy)[0].num_cached_tokens == 16  # still alive thanks to the slide
    clock.now += 301.0
    assert eng.generate([prompt], greedy)[0].num_cached_tokens == 0  # expired: never a hit
    # A request may ask for an hour; it outlives the default.
    long = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, cache_ttl_s=3600.0)
    other = list(range(40, 60))
    eng.generate([other], long)
    clock.now += 1800.0
    assert eng.generate([other], greedy)[0].num_cached_tokens == 16
    with pytest.raises(ValueError, match="exceeds the maximum"):
        eng.add_request("too-long-ttl", other, SamplingParams(cache_ttl_s=7200.0))


def test_a_one_hour_breakpoint_outlives_the_five_minute_default_with_fake_clock(tiny_model_dir) -> None:
    """Anthropic-style breakpoints: the prefix up to a 1 h breakpoint keeps its blocks for an
    hour; the rest of the prompt (past the breakpoint) has the 5 min default."""
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(
        str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64, clock=clock, default_ttl_s=300.0
    )
    system, question = list(range(10, 22)), list(range(50, 59))  # 12 + 9 tokens
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    marked = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                            cache_breakpoints=(CacheBreakpoint(len(system), 3600.0),))
    t0 = clock.now
    first = eng.generate([system + question], marked)[0]
    assert first.num_cached_tokens == 0
    stored = [e for b in [eng.take_events()] if b for e in b.events if isinstance(e, BlockStored)]
    assert sorted({e.expires_at - t0 for e in stored}) == [300.0, 3600.0]  # two expiry classes
    clock.now += 301.0  # the 5 min default is over, the 1 h breakpoint is not
    again = eng.generate([system + question], greedy)[0]
    assert again.num_cached_tokens == len(system)  # only the breakpoint's prefix survived
    assert again.token_ids == first.token_ids
    clock.now += 3600.0 - 301.0 + 1.0  # the read at 301 s slid it to 301 + 3600
    assert eng.generate([system + question], greedy)[0].num_cached_tokens == len(system)
    clock.now += 3601.0
    assert eng.generate([system + question], greedy)[0].num_cached_tokens == 0
    too_long = SamplingParams(cache_breakpoints=(CacheBreakpoint(4, 7200.0),))
    with pytest.raises(ValueError, match="breakpoint TTL 7200s exceeds the maximum"):
        eng.add_request("too-long-breakpoint", system, too_long)
    with pytest.raises(ValueError, match="num_tokens >= 1"):
        CacheBreakpoint(0, 60.0)


def test_kv_events_sequence_numbers_and_snapshot(tiny_model_dir) -> None:
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=16, clock=clock,
                                    replica_id="r-7")
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    eng.generate([list(range(10, 27))], greedy)
    b0 = eng.take_events()
    assert b0 is not None and b0.replica_id == "r-7" and b0.seq_no == 0
    stored = [e for e in b0.events if isinstance(e, BlockStored)]
    assert sum(len(e.hashes) for e in stored) == 4 and stored[0].parent is None
    assert eng.take_events() is None
    eng.generate([list(range(10, 27))], greedy)
    b1 = eng.take_events()
    assert b1.seq_no == 1 and any(isinstance(e, BlockTouched) for e in b1.events)
    snap = eng.cache_snapshot()
    assert snap.seq_no == 1 and len(snap.blocks) == 4
    # Filling the pool with other prompts evicts the cached blocks -> BlockRemoved.
    eng.generate([list(range(100, 160))], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    b2 = eng.take_events()
    assert any(isinstance(e, BlockRemoved) for e in b2.events)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = eng.generate([[5, 6, 7, 8, 9]], p)[0].token_ids
    batched = eng.generate([[11, 12], [5, 6, 7, 8, 9], [40] * 9], [SamplingParams(temperature=1.0, max_tokens=7), p,
                                                                   SamplingParams(temperature=0.0, max_tokens=3)])
    assert batched[1].token_ids == alone
    other_seed = eng.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True))
    assert other_seed[0].token_ids != alone
    # top_k=1 is greedy whatever the temperature.
    greedy = eng.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].token_ids
    topk1 = eng.generate([[5, 6, 7]], SamplingParams(temperature=5.0, top_k=1, max_tokens=5, ignore_eos=True))[0].token_ids
    assert topk1 == greedy


def test_stop_token_ids_eos_and_stop_strings(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    prompt = [20, 21, 22, 23]
    free = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    toks = free.token_ids
    # Stop at the 3rd generated token's id: generation ends right there, the token is kept.
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[toks[2]],
                                                ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == toks[: toks.index(toks[2]) + 1]
    # A stop string taken from the free-running text: the text ends right before it.
    text = free.text
    # A stop string of two complete characters (random bytes also decode to U+FFFD, which
    # is only rendered once generation ends, so it can never match mid-stream).
    starts = [i for i in range(1, len(text) - 1) if "\ufffd" not in text[i : i + 2]]
    assert starts, text
    stop = text[starts[0] : starts[0] + 2]
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    # EOS ends generation unless ignore_eos.
    eng.model_config.eos_token_ids = [toks[0]]
    eng.eos_token_ids = frozenset([toks[0]])
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert out.token_ids == [toks[0]] and out.finish_reason == "stop"


def test_bad_requests_raise_value_error_and_queue_nothing(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.add_request("b", [5] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("c", [5, 100000], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    eng.add_request("d", [5, 6], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("d", [5, 6], SamplingParams(max_tokens=1))
    assert eng.scheduler.num_unfinished == 1


def test_streaming_deltas_add_up_to_the_final_text(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    eng.add_request("s", "Hello there", SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True))
    pieces, ids, final = [], [], None
    while eng.has_unfinished_requests():
        for out in eng.step():
            pieces.append(out.new_text)
            ids.extend(out.new_token_ids)
            final = out
    assert final is not None and final.finished
    assert "".join(pieces) == final.text and ids == final.token_ids and len(ids) == 15


def test_disaggregated_prefill_then_decode_matches_mixed(tiny_model_dir) -> None:
    """Prefill engine exports blocks, decode engine imports them: same greedy tokens."""
    path = str(tiny_model_dir("qwen3"))
    kw = dict(block_size=4, num_kv_blocks=64)
    mixed = LLMEngine.from_pretrained(path, **kw)
    pre = LLMEngine.from_pretrained(path, role="prefill", **kw)
    # Threshold 0: every prompt goes through the prefill replica (the default, 64, would
    # prefill this 23-token prompt locally).
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, **kw)
    rng = random.Random(3)
    prompt = _rand_prompt(rng, 23)
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    want = mixed.generate([prompt], params)[0].token_ids
    # Requests whose prompt the decode engine computed itself (a chunk at prompt positions).
    prefilled_here: set[str] = set()
    execute = dec.runner.execute

    def spy(sched):
        prefilled_here.update(c.request.request_id for c in sched.chunks if c.start < c.request.num_prompt_tokens)
        return execute(sched)

    dec.runner.execute = spy

    def run_disaggregated(rid: str, fail: bool = False) -> tuple[list[int], bool]:
        dec.add_request(rid, prompt, params, remote_prefill=True)
        assert dec.step() == []
        (plan,) = dec.kv_transfer.take_plans()
        assert dec.stats().num_waiting_for_remote_kv == 1
        if fail:
            dec.kv_transfer.fail(rid)
        else:
            pre.add_request(rid, plan.prompt_token_ids, plan.params, export_from_block=plan.first_block_index)
            outs = []
            while pre.has_unfinished_requests():
                outs.extend(pre.step())
            final = outs[-1]
            assert final.finished and final.kv_export is not None and len(final.token_ids) == 1
            buf = pre.kv_transfer.read_blocks(final.kv_export.block_ids)
            assert buf.shape[2] == len(plan.block_ids)
            dec.kv_transfer.write_blocks(plan.block_ids, buf)
            pre.kv_transfer.release_export(rid)
            dec.kv_transfer.complete(rid, final.token_ids[0], final.num_cached_tokens)
        outs = []
        while dec.has_unfinished_requests():
            outs.extend(dec.step())
        return outs[-1].token_ids, rid in prefilled_here

    assert run_disaggregated("x1") == (want, False)
    # Second time the decode replica holds the prefix: only the tail blocks travel.
    assert run_disaggregated("x2") == (want, False)
    # An injected transfer failure: recomputed locally, same tokens.
    assert run_disaggregated("x3", fail=True) == (want, True)
    for e in (pre, dec):
        assert e.pool.num_free_blocks == e.pool.num_blocks
    # An aborted request no longer accepts KV: its reserved blocks are gone.
    dec.add_request("x4", prompt, params, remote_prefill=True)
    dec.step()
    (plan,) = dec.kv_transfer.take_plans()
    assert dec.kv_transfer.is_waiting("x4")
    dec.abort("x4")
    assert not dec.kv_transfer.is_waiting("x4")
    assert dec.step()[0].finish_reason == "abort"
    assert dec.pool.num_free_blocks == dec.pool.num_blocks
    # Leases that are never released expire.
    clock = FakeClock()
    pre2 = LLMEngine.from_pretrained(path, role="prefill", clock=clock, export_lease_timeout_s=5.0, **kw)
    pre2.add_request("leak", prompt, params)
    while pre2.has_unfinished_requests():
        pre2.step()
    assert pre2.pool.num_free_blocks < pre2.pool.num_blocks
    clock.now += 6.0
    pre2.step()
    assert pre2.pool.num_free_blocks == pre2.pool.num_blocks
