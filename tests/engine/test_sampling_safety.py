"""Every value SamplingParams accepts samples safely; a failure fails one request, not the batch.

Regression for issue 14's "one schema-valid request kills the decode engine": ``top_p``
1e-300 or 2.2e-313 and ``temperature`` 5e-324 made ``torch.multinomial`` raise, which
killed the engine loop and every other client's stream with it.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.sampler import Sampler, SamplingFailure

EXTREME = [
    {"top_p": 1e-300},
    {"top_p": 2.2e-313},
    {"top_p": 5e-324},
    {"top_p": 1e-300, "top_k": 1},
    {"temperature": 5e-324},
    {"temperature": 1e-300},
    {"temperature": 1e-5},
    {"temperature": 2.0, "top_p": 5e-324},
    {"temperature": 1e-30, "top_p": 1e-30, "top_k": 3},
    {"temperature": 2.0, "top_k": 1},
]


@pytest.mark.parametrize("kw", EXTREME, ids=[str(k) for k in EXTREME])
def test_extreme_but_valid_params_sample_the_most_likely_token(kw: dict) -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 8
    params = [SamplingParams(seed=7, **kw)] * 3
    tokens = Sampler().sample(logits, params, [0, 1, 2])
    # Each of these settings leaves only the most likely token in play.
    assert tokens == logits.argmax(dim=-1).tolist()


def test_huge_logits_with_a_small_temperature_do_not_overflow() -> None:
    logits = torch.zeros(1, 50)
    logits[0, 17] = 3e38  # near float32 max: dividing by 1e-4 overflows float32
    assert Sampler().sample(logits, [SamplingParams(temperature=1e-4, seed=1)], [0]) == [17]


def test_nan_logits_fail_that_row_only() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    logits[1, 5] = float("nan")
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(3)]
    out = Sampler().sample(logits, params, [0, 0, 0])
    assert isinstance(out[1], SamplingFailure) and "NaN" in out[1].message
    assert all(isinstance(t, int) and 0 <= t < 40 for t in (out[0], out[2]))


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(2))
    top = int(logits.argmax())
    target = (top + 1) % 60
    forced = Sampler().sample(logits, [SamplingParams(temperature=0, logit_bias={target: 100.0})], [0])
    assert forced == [target]
    banned = Sampler().sample(logits, [SamplingParams(temperature=0, logit_bias={top: -100.0})], [0])
    assert banned[0] != top and banned[0] == int(logits[0].topk(2).indices[1])
    sampled = Sampler().sample(logits, [SamplingParams(temperature=1.0, seed=3, logit_bias={9: 100.0})], [0])
    assert sampled == [9]


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -1e-300},
        {"top_p": 0.0},
        {"top_p": math.nan},
        {"logit_bias": {1: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {True: 1.0}},
    ],
)
def test_values_outside_the_schema_are_refused_at_construction(kw: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def _assert_no_leak(eng: LLMEngine) -> None:
    assert not eng.has_unfinished_requests()
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


def test_a_request_that_cannot_be_sampled_fails_alone(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = eng.generate([[5, 6, 7, 8, 9]], greedy)[0].token_ids
    real = eng.runner.sampler._sample_row

    def poisoned(logits, p, index):  # the 'bad' request's rows come back as NaN logits
        return real(torch.full_like(logits, math.nan), p, index) if p.seed == 666 else real(logits, p, index)

    eng.runner.sampler._sample_row = poisoned
    eng.add_request("good", [5, 6, 7, 8, 9], greedy)
    eng.add_request("bad", [1, 2, 3], SamplingParams(temperature=0.9, seed=666, max_tokens=6))
    eng.add_request("extreme", [4, 4, 4], SamplingParams(temperature=5e-324, top_p=1e-300, max_tokens=6))
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["bad"].finish_reason == "error" and "NaN" in finals["bad"].error
    assert finals["good"].token_ids == alone and finals["good"].error is None
    assert finals["extreme"].finish_reason == "length" and len(finals["extreme"].token_ids) == 6
    _assert_no_leak(eng)


def test_a_failed_forward_fails_its_step_and_the_engine_keeps_serving(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = eng.generate([[9, 8, 7]], greedy)[0].token_ids
    real = eng.runner.execute
    failures = iter([True])

    def flaky(sched):
        if next(failures, False):
            raise RuntimeError("injected forward failure")
        return real(sched)

    eng.runner.execute = flaky
    eng.add_request("victim", [1, 2, 3, 4, 5], greedy)
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("victim", "error")]
    assert "injected" not in outs[0].error  # the client sees a message, the log gets the trace
    _assert_no_leak(eng)
    assert eng.generate([[9, 8, 7]], greedy)[0].token_ids == expected


def test_a_forward_that_keeps_failing_breaks_the_engine(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)

    def broken(sched):
        raise RuntimeError("device lost")

    eng.runner.execute = broken
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(2):
        eng.add_request(f"r{i}", [1, 2, 3], greedy)
        assert eng.step()[0].finish_reason == "error"
    eng.add_request("last", [1, 2, 3], greedy)
    with pytest.raises(RuntimeError, match="in a row"):
        eng.step()


def test_a_text_that_cannot_fit_is_refused_before_tokenizing(tiny_model_dir) -> None:
    from engine import ContextLengthExceeded
    from engine.tokenizer import PromptTokenizer, load_tokenizer

    tok = load_tokenizer(tiny_model_dir("llama"))
    calls = []

    class Counting:  # the real tokenizer, counting encode calls
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, *a, **kw):
            calls.append(1)
            return tok.encode(*a, **kw)

    pt = PromptTokenizer(Counting(), max_model_len=64)
    assert pt.max_chars_per_token >= 1
    fits = "a short prompt"
    assert pt.encode_text(fits) == tok.encode(fits, add_special_tokens=False) and calls == [1]
    with pytest.raises(ContextLengthExceeded, match="characters"):
        pt.encode_text("x" * (64 * pt.max_chars_per_token + 1))
    with pytest.raises(ContextLengthExceeded):
        pt.encode_chat([{"role": "user", "content": "y" * (64 * pt.max_chars_per_token)}])
    assert calls == [1]  # neither over-long text reached the tokenizer
    # The bound is sound: the longest text it lets through never has fewer tokens than chars/bound.
    text = "the river ferries blocks " * 20
    assert len(tok.encode(text, add_special_tokens=False)) >= len(text) / pt.max_chars_per_token
