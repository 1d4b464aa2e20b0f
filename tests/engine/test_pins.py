"""Explicit-cache pins (``engine.pins``): held until a fixed expiry, never evicted, capped.

A real tiny engine with a fake clock: pinned blocks survive pool pressure that evicts
unpinned ones, a hit does not extend the pin (no refresh), the blocks stay findable past
their own sliding TTL while pinned and become ordinary cache when the pin ends, and the
engine-wide cap refuses a pin rather than starve running requests.
"""

from __future__ import annotations

import random

import pytest
from engine import LLMEngine, SamplingParams
from engine.kv_events import BlockTouched
from tests.engine.conftest import hf_greedy
from tests.engine.test_engine_lifecycle import FakeClock
from tests.engine.tiny_models import load_hf_model

BS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _engine(path, clock: FakeClock, blocks: int = 32, fraction: float = 0.5) -> LLMEngine:
    return LLMEngine.from_pretrained(str(path), block_size=BS, num_kv_blocks=blocks, max_num_batched_tokens=64,
                                     default_ttl_s=300.0, max_pinned_fraction=fraction, clock=clock)


def _run(eng: LLMEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY,
         pin: tuple[str, float] | None = None) -> object:
    eng.add_request(rid, prompt, params)
    if pin is not None:
        eng.pin_on_finish(rid, pin[0], pin[1], len(prompt))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid and out.finished:
                final = out
    return final


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def _hits(eng: LLMEngine, prompt: list[int], rid: str) -> int:
    return _run(eng, rid, prompt + [7]).num_cached_tokens


def test_pinned_blocks_survive_pressure_that_evicts_unpinned_ones(tiny_model_dir) -> None:
    clock = FakeClock()
    eng = _engine(tiny_model_dir("llama"), clock)
    pinned, plain = _prompt(1, 24), _prompt(2, 24)  # 6 blocks each
    _run(eng, "create", pinned, pin=("cache-1", clock.now + 3600))
    assert eng.pins.result("cache-1") == (24, None)
    _run(eng, "plain", plain)
    assert eng.stats().num_pinned_blocks == 6 and eng.stats().num_pins == 1
    # Fill the whole unpinned pool with fresh prompts: every unpinned cached block goes.
    for i in range(4):
        clock.now += 1
        _run(eng, f"filler-{i}", _prompt(100 + i, 100), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert eng.stats().num_evicted_blocks > 0
    assert _hits(eng, plain, "plain-again") == 0
    assert _hits(eng, pinned, "pinned-again") == 24


def test_fixed_expiry_no_refresh_on_hit_and_findable_past_the_blocks_own_ttl(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    clock = FakeClock()
    eng = _engine(path, clock)
    prompt = _prompt(3, 16)
    t0 = clock.now
    _run(eng, "create", prompt, pin=("c", t0 + 1000))
    eng.take_events()
    # Well past the blocks' own 300 s TTL: still hits, because the pin keeps them findable
    # (the engine's idle steps slide their lookup expiry, and say so to the directory).
    for step_at in range(100, 900, 100):
        clock.now = t0 + step_at
        eng.step()
    assert any(isinstance(e, BlockTouched) for e in eng.pool.take_events())
    clock.now = t0 + 900
    out = _run(eng, "hit", prompt + [9, 9])
    assert out.num_cached_tokens == 16
    # The hit did not move the pin's fixed expiry: at t0 + 1000 it ends.
    assert eng.pins.get("c").expires_at == t0 + 1000
    clock.now = t0 + 1000
    eng.step()
    assert eng.pins.get("c") is None and eng.stats().num_expired_pins == 1
    assert eng.stats().num_pinned_blocks == 0
    # Released to the ordinary cache with the blocks' own TTL (300 s sliding, not the pin's).
    assert all(b.ref_cnt == 0 for b in eng.pool.blocks)
    clock.now = t0 + 900 + 301
    assert _hits(eng, prompt, "after") == 0
    # What is served while pinned is the model's own greedy text.
    hf = load_hf_model(path)
    assert out.token_ids == hf_greedy(hf, prompt + [9, 9], 1)


def test_unpin_and_set_expiry(tiny_model_dir) -> None:
    clock = FakeClock()
    eng = _engine(tiny_model_dir("llama"), clock)
    _run(eng, "a", _prompt(4, 12), pin=("a", clock.now + 50))
    _run(eng, "b", _prompt(5, 12), pin=("b", clock.now + 50))
    assert eng.pins.set_expiry("a", clock.now + 5000, clock.now)
    assert eng.pins.unpin("b", clock.now) and not eng.pins.unpin("b", clock.now)
    clock.now += 60
    eng.step()
    assert eng.pins.ids() == ["a"]
    assert eng.pins.set_expiry("a", clock.now - 1, clock.now)  # a past expiry ends it now
    assert eng.pins.num_pins == 0 and all(b.ref_cnt == 0 for b in eng.pool.blocks)


def test_cap_refuses_a_pin_that_would_starve_running_requests(tiny_model_dir) -> None:
    clock = FakeClock()
    eng = _engine(tiny_model_dir("llama"), clock, blocks=32, fraction=0.25)  # 8 pinnable blocks
    _run(eng, "a", _prompt(6, 24), pin=("a", clock.now + 100))
    assert eng.pins.result("a") == (24, None)
    _run(eng, "b", _prompt(7, 12), pin=("b", clock.now + 100))
    tokens, why = eng.pins.result("b")
    assert tokens == 0 and "cap of 8 pinned blocks" in why
    # Re-pinning the same id with a new expiry replaces it (not counted twice).
    _run(eng, "a2", _prompt(6, 24), pin=("a", clock.now + 200))
    assert eng.pins.result("a") == (24, None) and eng.stats().num_pinned_blocks == 6
    # An aborted request pins nothing.
    eng.add_request("gone", _prompt(8, 12), GREEDY)
    eng.pin_on_finish("gone", "g", clock.now + 100, 12)
    eng.abort("gone")
    eng.step()
    assert eng.pins.get("g") is None
    with pytest.raises(ValueError):
        eng.pin_on_finish("nobody", "x", clock.now + 1, 4)
