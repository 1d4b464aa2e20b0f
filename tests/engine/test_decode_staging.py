"""The decode staging buffer (CPU fast path) never changes a token.

Two engines on the same weights, one gathering paged K/V every step and one appending to
its staging buffer, run a workload that joins, finishes, preempts and aborts requests
mid-decode (every way the decode batch can change) and must agree token for token.
"""

from __future__ import annotations

import random

from engine import LLMEngine, SamplingParams
from engine.attention.torch_backend import TorchAttentionBackend


def _run(eng: LLMEngine, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 250) for _ in range(12)]
    done: dict[str, list[int]] = {}
    for i in range(24):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 14))]
        eng.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=rng.randrange(2, 20), ignore_eos=True))
        for _ in range(rng.randrange(0, 3)):
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        if i % 5 == 4:
            eng.abort(f"r{i - 2}")
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_staged_decode_matches_gathered_decode(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    kw = dict(block_size=4, num_kv_blocks=22, max_num_batched_tokens=24, max_num_seqs=6)
    staged = LLMEngine.from_pretrained(path, **kw)
    gathered = LLMEngine.from_pretrained(path, **kw)
    gathered.runner.backend = TorchAttentionBackend(stage_decode=False)
    assert isinstance(staged.runner.backend, TorchAttentionBackend) and staged.runner.backend._staging is not None
    a, b = _run(staged, 7), _run(gathered, 7)
    assert a == b and len(a) == 24
    assert staged.stats().num_preemptions > 0  # the workload did preempt


def test_steady_decode_appends_instead_of_regathering(tiny_model_dir) -> None:
    """Rows crossing block boundaries at different steps must not force a re-gather."""
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=64)
    prompts = [[7] * 3, [8] * 5, [9] * 6]  # lengths that cross block boundaries out of phase
    eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    staging = eng.runner.backend._staging
    # Decode steps: ~40. Re-gathers: the first decode step, plus one per 64-token headroom
    # exhaustion (none here). Anything per block boundary would be > 10.
    assert 1 <= staging.num_rebuilds <= 3


def test_requests_leaving_the_batch_move_rows_up_instead_of_regathering(tiny_model_dir) -> None:
    """Mixed output lengths: a request leaves every few steps; the rows that stay move up
    in the staging buffer (no re-gather) and every token matches the gathering engine."""
    path = str(tiny_model_dir("llama"))
    kw = dict(block_size=4, num_kv_blocks=128)
    staged = LLMEngine.from_pretrained(path, **kw)
    gathered = LLMEngine.from_pretrained(path, **kw)
    gathered.runner.backend = TorchAttentionBackend(stage_decode=False)
    prompts = [[10 + i] * (3 + i % 4) for i in range(8)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 5 * i, ignore_eos=True) for i in (3, 0, 6, 1, 7, 2, 5, 4)]
    a = [o.token_ids for o in staged.generate(prompts, params)]
    b = [o.token_ids for o in gathered.generate(prompts, params)]
    assert a == b
    staging = staged.runner.backend._staging
    # Seven requests leave (one at a time: all lengths differ) while others decode; each
    # leaving moves rows up. Only the first decode step gathers (before: one per leaver).
    assert staging.num_compactions >= 6
    assert staging.num_rebuilds <= 2
