"""The GPU benchmark scripts import (without a GPU) and describe themselves in --help."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = [
    "decode_roofline", "prefill_throughput", "offline_throughput", "transfer_bandwidth", "ttft_cached",
    "fused_ops", "prefill_attention_choice",
]
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


def _gpu_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_DIR))
    return importlib.import_module(name)


def test_decode_reads_the_lm_head_but_not_the_whole_input_embedding(monkeypatch):
    common = _gpu_module("common", monkeypatch)
    c = common.MODEL_CONFIGS["llama-3.1-8b"]
    embedding = c["vocab_size"] * c["hidden_size"] * 2  # bf16
    assert common.decode_weight_bytes("llama-3.1-8b") == common.param_bytes("llama-3.1-8b") - embedding
    # Tied: the one matrix is the LM head, read whole.
    assert common.decode_weight_bytes("qwen3-0.6b") == common.param_bytes("qwen3-0.6b")


def test_requests_outlive_the_prefill_phase_and_the_timed_steps(monkeypatch):
    roofline = _gpu_module("decode_roofline", monkeypatch)
    # 64 x 4K prompts through an 8K-token step budget: ~33 steps of chunked prefill, during
    # which the first sequences already decode; all must still run through 20 timed steps.
    n = roofline.max_new_tokens(64, 4096, 20, 8192)
    prefill_steps = 64 * 4096 // 8192
    assert n >= prefill_steps + roofline.WARMUP_STEPS + 20


def test_built_model_is_reused(monkeypatch, tmp_path):
    common = _gpu_module("common", monkeypatch)
    first = common.build_model_dir("tiny", "cpu", "float32", root=tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    again = common.build_model_dir("tiny", "cpu", "float32", root=tmp_path)
    assert again == first and (first / "config.json").stat().st_mtime_ns == stamp


def test_decode_roofline_smoke_run(monkeypatch, tmp_path, capsys):
    roofline = _gpu_module("decode_roofline", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "MODELS_DIR", tmp_path / "models")
    out = tmp_path / "roofline.json"
    monkeypatch.setattr(sys, "argv", ["decode_roofline", "--smoke", "--out", str(out)])
    roofline.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 64), (4, 64)]
    assert all(r["step_ms"] > 0 for r in rows)


def test_transfer_bandwidth_smoke_moves_blocks_through_the_kvferry_transport(tmp_path):
    # A subprocess, as a user runs it: the script spawns the receiving process itself.
    import subprocess

    out = tmp_path / "transfer.json"
    proc = subprocess.run(
        [sys.executable, str(GPU_DIR / "transfer_bandwidth.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    transfers = [r for r in rows if r["op"] == "transfer"]
    # One real transfer row per size, carried by the backend serving would pick on CPU.
    assert [(r["num_blocks"], r["impl"]) for r in transfers] == [(4, "kvferry gloo"), (16, "kvferry gloo")]
    assert all(r["gb_s"] > 0 for r in transfers)
