"""benchmarks/gpu/fused_ops.py: its --smoke run on CPU end to end (--help: test_gpu_benchmark_scripts).

The smoke run times each fused kernel (under the Triton interpreter) against the engine's
torch ops at tiny shapes, checks both computed the same thing and writes the result JSON.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.kernels.kernel_test_inputs import NEEDS_INTERPRETER

NAME = "fused_ops"


@pytest.fixture
def script(gpu_benchmark):
    return gpu_benchmark(NAME)


@NEEDS_INTERPRETER
def test_smoke_run_writes_a_row_per_op_and_size(script, monkeypatch, tmp_path, capsys):
    out = tmp_path / "fused_ops.json"
    monkeypatch.setattr(sys, "argv", [NAME, "--smoke", "--out", str(out)])
    script.main()
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "gpu_fused_ops" and payload["smoke"] is True
    rows = payload["rows"]
    assert [(r["op"], r["tokens"]) for r in rows] == [
        (op, t) for t in (1, 8) for op in ("add_rms_norm", "qk_norm", "rotary")
    ]
    for r in rows:
        assert r["max_abs_diff"] < 1e-5  # fp32: the kernel and the torch ops agree
        assert r["eager_torch_us"] > 0 and r["eager_fused_us"] > 0
        assert r["eager_speedup"] == pytest.approx(r["eager_torch_us"] / r["eager_fused_us"])
        assert "graph_speedup" not in r  # no CUDA graphs on CPU
    printed = capsys.readouterr().out
    assert "speedup" in printed and "add_rms_norm" in printed
