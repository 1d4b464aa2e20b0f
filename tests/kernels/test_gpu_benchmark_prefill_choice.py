"""benchmarks/gpu/prefill_attention_choice.py: its --smoke run on CPU end to end (--help: test_gpu_benchmark_scripts).

The smoke run builds every scenario with tiny shapes, runs the Triton prefill kernel under
the interpreter and both SDPA variants (fresh prompts; gathered context with a bottom-right
causal bias), checks they agree and writes the result JSON.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.kernels.kernel_test_inputs import NEEDS_INTERPRETER

NAME = "prefill_attention_choice"


@pytest.fixture
def script(gpu_benchmark):
    return gpu_benchmark(NAME)


@NEEDS_INTERPRETER
def test_smoke_run_writes_a_row_per_scenario(script, monkeypatch, tmp_path, capsys):
    out = tmp_path / "prefill_choice.json"
    monkeypatch.setattr(sys, "argv", [NAME, "--smoke", "--out", str(out)])
    script.main()
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "gpu_prefill_attention" and payload["smoke"] is True
    rows = payload["rows"]
    assert [r["case"] for r in rows] == ["fresh-1x64", "fresh-4x16", "cached-32+32"]
    for r in rows:
        assert r["sdpa_error"] is None
        assert r["max_abs_diff"] < 1e-4  # the two paths computed the same attention
        assert r["triton_ms"] > 0 and r["sdpa_ms"] > 0
        assert r["ratio"] == pytest.approx(r["triton_ms"] / r["sdpa_ms"])
        assert r["winner"] == ("sdpa" if r["ratio"] > 1 else "triton")
    # What "auto" runs on CUDA: SDPA for fresh prompts, the kernel over a cached prefix.
    assert [r["auto_on_cuda_runs"] for r in rows] == ["sdpa", "sdpa", "triton"]
    assert rows[2]["gather_ms"] > 0 and rows[0]["gather_ms"] == 0
    assert "ratio" in capsys.readouterr().out


def test_visible_pairs_counts_the_causal_triangle_and_the_prefix(script):
    assert script.visible_pairs([4], 0) == 10  # 1 + 2 + 3 + 4
    assert script.visible_pairs([2, 2], 0) == 6
    assert script.visible_pairs([3], 5) == 3 * 5 + 6
