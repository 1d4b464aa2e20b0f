"""The engine with attention_backend="triton" generates what the torch backend generates.

Greedy decoding of a tiny random Llama (GQA) under the Triton interpreter: mixed decode +
prefill steps, and a second round whose prompts hit the prefix cache, so the prefill
kernel runs over a cached prefix inside the real model runner.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.kernels.kernel_test_inputs import NEEDS_INTERPRETER


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.slow
@NEEDS_INTERPRETER
def test_greedy_tokens_match_torch_backend(tiny_llama, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 8], [9, 8, 7]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        eng = LLMEngine.from_pretrained(
            str(tiny_llama), attention_backend=backend, num_kv_blocks=32, block_size=16
        )
        first = eng.generate(prompts, params)
        again = eng.generate(prompts[:2], params)  # full blocks now come from the prefix cache
        assert [o.num_cached_tokens for o in again] == [32, 32]
        results[backend] = [o.token_ids for o in first + again]
    assert results["triton"] == results["torch"]
