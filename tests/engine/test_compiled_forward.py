"""``compile=True``: the torch.compile'd forward (engine.models.compiled) keeps greedy parity.

One tiny one-layer model and steps of several tokens only (T == 1 would compile a second
graph): the compile costs tens of seconds on a 2-core box, so this is the one test of it.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.engine.conftest import hf_greedy
from tests.engine.tiny_models import load_hf_model, make_tiny_model


@pytest.mark.slow
def test_compiled_forward_matches_transformers(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = make_tiny_model("qwen2", tmp_path, num_hidden_layers=1)  # qkv biases: both custom ops' bias paths
    prompts = [[5, 17, 99, 3, 250, 7], [42] * 11, list(range(30, 60))]
    hf = load_hf_model(path)
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    eng = LLMEngine.from_pretrained(str(path), compile=True, cpu_linear="onednn", block_size=4, num_kv_blocks=64)
    outs = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    compiled = eng.runner.compiled
    assert compiled is not None and set(compiled.compile_seconds) == {"T>1"}  # compiled once, reported


def test_attention_op_outside_a_step_says_so() -> None:
    import engine.models.compiled  # noqa: F401 - registers the ops

    q = torch.zeros(2, 4, 8)
    with pytest.raises(RuntimeError, match="outside a forward_context"):
        torch.ops.kvferry.attention(q, q[:, :2], q[:, :2], 0, 1.0)
