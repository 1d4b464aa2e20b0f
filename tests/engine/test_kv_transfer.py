"""``LLMEngine.kv_transfer`` step by step: export leases (prefill role), landings (decode role).

Each test walks one lifecycle of engine/kv_transfer.py's contract and checks the block
accounting at every stop, because a wrong step there corrupts another request's KV.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.outputs import RequestOutput

PROMPT = list(range(30, 53))  # 23 tokens: 5 full blocks of 4 and a partial one
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
KW = dict(block_size=4, num_kv_blocks=32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _drain(eng: LLMEngine) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    return outs


def _held(eng: LLMEngine) -> set[int]:
    return {b.block_id for b in eng.pool.blocks if b.ref_cnt > 0}


@pytest.fixture
def path(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def _prefill(eng: LLMEngine, rid: str, first_block: int = 0) -> RequestOutput:
    eng.add_request(rid, PROMPT, GREEDY, export_from_block=first_block)
    final = _drain(eng)[-1]
    assert final.finished and len(final.token_ids) == 1 and final.kv_export is not None
    return final


def _park(dec: LLMEngine, rid: str):
    dec.add_request(rid, PROMPT, GREEDY, remote_prefill=True)
    assert dec.step() == []
    (plan,) = dec.kv_transfer.take_plans()
    assert dec.kv_transfer.is_waiting(rid) and dec.stats().num_waiting_for_remote_kv == 1
    return plan


def test_export_lease_holds_blocks_until_released(path) -> None:
    pre = LLMEngine.from_pretrained(path, role="prefill", **KW)
    final = _prefill(pre, "p1")
    export = final.kv_export
    assert export.first_block_index == 0 and export.num_tokens == len(PROMPT) and len(export.block_ids) == 6
    # Leased: the blocks stay held (nobody else may write them) and the id stays taken.
    assert _held(pre) == set(export.block_ids)
    assert pre.kv_transfer.has_export("p1")
    with pytest.raises(ValueError, match="already in use"):
        pre.add_request("p1", PROMPT, GREEDY)
    shape = pre.kv_transfer.block_shape()
    assert pre.kv_transfer.read_blocks(export.block_ids).shape == (shape[0], 2, 6, *shape[2:])
    pre.kv_transfer.release_export("p1")
    assert _held(pre) == set() and not pre.kv_transfer.has_export("p1")
    pre.kv_transfer.release_export("p1")  # a second release is a no-op
    # Released blocks stay in the prompt cache: the same prompt now hits its full blocks.
    again = _prefill(pre, "p2")
    assert again.num_cached_tokens == 20
    pre.abort("p2")  # aborting an exported request ends its lease as well
    assert _held(pre) == set()


def test_export_from_a_later_block_ships_only_the_tail(path) -> None:
    pre = LLMEngine.from_pretrained(path, role="prefill", **KW)
    export = _prefill(pre, "tail", first_block=3).kv_export
    assert export.first_block_index == 3 and len(export.block_ids) == 3
    pre.kv_transfer.release_export("tail")


def test_lease_expiry_frees_blocks(path) -> None:
    clock = FakeClock()
    pre = LLMEngine.from_pretrained(path, role="prefill", clock=clock, export_lease_timeout_s=5.0, **KW)
    _prefill(pre, "leak")
    clock.now += 4.0
    pre.step()
    assert pre.kv_transfer.has_export("leak") and _held(pre)  # not yet
    clock.now += 2.0
    pre.step()
    assert not pre.kv_transfer.has_export("leak") and _held(pre) == set()
    assert pre.kv_transfer.export_of("leak") is None


def test_complete_after_abort_is_ignored(path) -> None:
    # Exactly the prompt's 6 blocks: the next request must reuse the aborted one's blocks.
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, block_size=4, num_kv_blocks=6)
    plan = _park(dec, "gone")
    dec.abort("gone")
    assert not dec.kv_transfer.is_waiting("gone")
    (out,) = dec.step()
    assert out.finish_reason == "abort" and _held(dec) == set()
    # Its blocks may now belong to another request; a late answer must not touch it.
    other = _park(dec, "other")
    assert set(other.block_ids) == set(plan.block_ids)
    layers, two, bs, h, d = dec.kv_transfer.block_shape()
    # What the rightful owner received; a late landing for "gone" must not overwrite it.
    dec.kv_transfer.write_blocks(other.block_ids, torch.full((layers, two, len(other.block_ids), bs, h, d), 3.0))
    dec.kv_transfer.complete("gone", 7, 0)
    dec.kv_transfer.fail("gone")
    assert dec.kv_transfer.is_waiting("other") and dec.stats().num_waiting_for_remote_kv == 1
    assert dec.step() == [] and dec.stats().num_running == 0
    assert bool((dec.kv_transfer.read_blocks(other.block_ids) == 3.0).all())
    dec.abort("other")
    _drain(dec)
    assert _held(dec) == set()


def test_complete_twice_and_fail_after_complete_are_ignored(path) -> None:
    pre = LLMEngine.from_pretrained(path, role="prefill", **KW)
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, **KW)
    plan = _park(dec, "r")
    final = _prefill(pre, "r", plan.first_block_index)
    dec.kv_transfer.write_blocks(plan.block_ids, pre.kv_transfer.read_blocks(final.kv_export.block_ids))
    pre.kv_transfer.release_export("r")
    dec.kv_transfer.complete("r", final.token_ids[0], final.num_cached_tokens)
    dec.kv_transfer.complete("r", 999, 0)
    dec.kv_transfer.fail("r")
    outs = _drain(dec)
    assert outs[0].new_token_ids == [final.token_ids[0]]  # the sender's token comes out first
    assert outs[-1].token_ids[0] == final.token_ids[0] and len(outs[-1].token_ids) == GREEDY.max_tokens
    assert _held(dec) == set()


def test_a_first_token_that_ends_the_request_finishes_it_on_landing(path) -> None:
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, **KW)
    dec.add_request("one", PROMPT, SamplingParams(temperature=0.0, max_tokens=1), remote_prefill=True)
    dec.step()
    dec.kv_transfer.take_plans()
    dec.kv_transfer.complete("one", 5)
    (out,) = dec.step()
    assert out.finished and out.finish_reason == "length" and out.token_ids == [5]
    assert not dec.has_unfinished_requests() and _held(dec) == set()


def test_fail_recomputes_locally_with_the_same_greedy_tokens(path) -> None:
    want = LLMEngine.from_pretrained(path, **KW).generate([PROMPT], GREEDY)[0].token_ids
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, **KW)
    _park(dec, "f")
    dec.kv_transfer.fail("f")
    assert not dec.kv_transfer.is_waiting("f") and dec.stats().num_waiting == 1
    assert dec.kv_transfer.take_plans() == []  # recomputed here, never planned again
    assert _drain(dec)[-1].token_ids == want
    assert _held(dec) == set()


def test_write_blocks_refuses_a_wrong_buffer_or_block_ids(path) -> None:
    dec = LLMEngine.from_pretrained(path, role="decode", local_prefill_threshold=0, **KW)
    layers, two, bs, h, d = dec.kv_transfer.block_shape()
    good = torch.zeros((layers, two, 2, bs, h, d), dtype=dec.kv_dtype)
    with pytest.raises(ValueError, match="shape"):
        dec.kv_transfer.write_blocks([0, 1, 2], good)
    with pytest.raises(ValueError, match="block ids"):
        dec.kv_transfer.write_blocks([0, 32], good)
    with pytest.raises(ValueError, match="block ids"):
        dec.kv_transfer.read_blocks([-1])
    dec.kv_transfer.write_blocks([0, 1], good + 1.0)
    assert torch.equal(dec.kv_transfer.read_blocks([0, 1]), good + 1.0)


def test_local_prefill_threshold_keeps_short_uncached_prompts_local(path) -> None:
    dec = LLMEngine.from_pretrained(path, role="decode", **KW)  # default threshold 64 > 23 tokens
    dec.add_request("short", PROMPT, GREEDY, remote_prefill=True)
    outs = _drain(dec)
    assert dec.kv_transfer.take_plans() == [] and outs[-1].finished and len(outs[-1].token_ids) == 6
