"""benchmarks/gpu/fused_ops.py: --help, and its --smoke run on CPU end to end.

The smoke run times each fused kernel (under the Triton interpreter) against the engine's
torch ops at tiny shapes, checks both computed the same thing and writes the result JSON.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from tests.kernels.kernel_test_inputs import NEEDS_INTERPRETER

NAME = "fused_ops"
GPU_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_DIR))
    # The smoke mode switches the interpreter on; monkeypatch restores the variable after.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.import_module(NAME)


def test_help_mentions_smoke(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [NAME, "--help"])
    with pytest.raises(SystemExit) as exc:
        script.main()
    assert exc.value.code == 0
    assert "--smoke" in capsys.readouterr().out


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
