"""The engine with fused_kernels="on" generates what it generates with "off".

Greedy decoding of tiny random models under the Triton interpreter: a Llama with GQA
(fused residual-add + RMSNorm and rotary) and a Qwen3 (also the per-head q/k norm), over
mixed prefill + decode steps. Also how ``resolve_fused_kernels`` reads the setting on CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

import kernels.rms_norm
import kernels.rotary
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_runner import resolve_fused_kernels
from tests.engine.tiny_models import make_tiny_model
from tests.kernels.kernel_test_inputs import NEEDS_INTERPRETER

_KERNELS = (
    (kernels.rms_norm, "fused_add_rms_norm"),
    (kernels.rms_norm, "rms_norm"),
    (kernels.rotary, "rotary_embedding"),
)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count launches of each fused kernel (the model imports them at call time)."""
    calls = {name: 0 for _, name in _KERNELS}
    for module, name in _KERNELS:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@NEEDS_INTERPRETER
def test_fused_greedy_tokens_match_unfused(arch, tmp_path, monkeypatch, kernel_calls):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model_dir = make_tiny_model(arch, tmp_path, with_tokenizer=False)
    prompts = [list(range(3, 22)), [9, 8, 7], list(range(40, 51))]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    results, launches = {}, {}
    for setting in ("off", "on"):
        eng = LLMEngine.from_pretrained(
            str(model_dir), fused_kernels=setting, num_kv_blocks=16, block_size=16
        )
        assert eng.runner.fused_kernels is (setting == "on")
        before = dict(kernel_calls)
        results[setting] = [o.token_ids for o in eng.generate(prompts, params)]
        launches[setting] = {k: kernel_calls[k] - before[k] for k in kernel_calls}
    assert results["on"] == results["off"]
    assert all(len(t) == 4 for t in results["on"])
    # "off" is today's torch path; "on" really ran the kernels (q/k norm only on Qwen3).
    assert sum(launches["off"].values()) == 0
    assert launches["on"]["fused_add_rms_norm"] > 0 and launches["on"]["rotary_embedding"] > 0
    assert (launches["on"]["rms_norm"] > 0) == (arch == "qwen3")


def test_auto_is_off_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where the kernels could run
    assert resolve_fused_kernels("auto", torch.device("cpu")) is False
    assert resolve_fused_kernels("off", torch.device("cpu")) is False


def test_on_is_allowed_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_fused_kernels("on", torch.device("cpu")) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="fused_kernels='on'.*TRITON_INTERPRET=1.*'off'"):
        resolve_fused_kernels("on", torch.device("cpu"))


def test_unknown_setting_is_refused():
    # Refused once, where every setting is validated: the engine's config.
    with pytest.raises(ValueError, match=r"(?s)fused_kernels.*'auto', 'on' or 'off'"):
        EngineConfig(fused_kernels="yes")
