"""The GPU benchmark scripts import (without a GPU) and describe themselves in --help."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = ["decode_roofline", "prefill_throughput", "offline_throughput", "transfer_bandwidth", "ttft_cached"]
GPU_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses_help(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(GPU_DIR))
    mod = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_roofline_byte_counts_match_real_model_sizes():
    sys.path.insert(0, str(GPU_DIR))
    try:
        common = importlib.import_module("common")
    finally:
        sys.path.remove(str(GPU_DIR))
    # Llama-3.1-8B has 8.03 B parameters; Qwen3-0.6B 0.60 B (tied embeddings counted once).
    assert abs(common.param_bytes("llama-3.1-8b", 1) / 1e9 - 8.03) < 0.02
    assert abs(common.param_bytes("qwen3-0.6b", 1) / 1e9 - 0.60) < 0.02
    assert common.kv_bytes_per_token("llama-3.1-8b") == 32 * 2 * 8 * 128 * 2  # 128 KiB
