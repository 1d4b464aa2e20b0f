"""Greedy token-for-token parity with transformers on every supported architecture.

Batched prompts of different lengths sharing prefixes, chunked prefill forced on (a small
per-step token budget), small blocks; the same batch runs twice and the second run must
hit the prompt cache without changing a single token.
"""

from __future__ import annotations

import random

import pytest

from engine import LLMEngine, SamplingParams
from tests.engine.conftest import hf_greedy
from tests.engine.tiny_models import ARCHS, load_hf_model

NUM_NEW = 8


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 250) for _ in range(21)]
    return [
        shared + [rng.randrange(3, 250) for _ in range(9)],  # 30 tokens, shares 21
        shared[:13],  # a strict prefix of the others
        shared + [rng.randrange(3, 250) for _ in range(26)],  # 47 tokens
        [rng.randrange(3, 250) for _ in range(5)],  # short, unrelated
    ]


@pytest.mark.parametrize("cpu_linear", ["onednn", "dense"])  # prepacked oneDNN matmuls forced on / off
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_batched_chunked_and_cached(arch: str, cpu_linear: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    prompts = _prompts()
    hf = load_hf_model(path)
    expected = [hf_greedy(hf, p, NUM_NEW) for p in prompts]

    eng = LLMEngine.from_pretrained(
        str(path), block_size=4, max_num_batched_tokens=20, num_kv_blocks=128, cpu_linear=cpu_linear
    )
    assert eng.runner.linear_plan.kernels == {cpu_linear: len(eng.runner.model.linears())}
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    first = eng.generate(prompts, params)
    assert [o.token_ids for o in first] == expected
    assert all(o.finish_reason == "length" for o in first)

    second = eng.generate(prompts, params)
    assert [o.token_ids for o in second] == expected
    # Every prompt but the 5-token one has full blocks cached from the first run.
    assert [o.num_cached_tokens > 0 for o in second] == [True, True, True, True]
    assert second[2].num_cached_tokens >= 44
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
