"""The ``kvferry`` CLI: commands exist, bad config exits 2, and ``serve`` stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cluster.bench import percentiles
from cluster.cli import app
from tests.conftest import free_port

runner = CliRunner()


def test_commands_registered() -> None:
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("serve", "bench", "replay", "version"):
        assert cmd in out
    assert runner.invoke(app, ["version"]).exit_code == 0


def test_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle: {}\n")
    res = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and "bad configuration" in res.output


def test_percentiles_nearest_rank() -> None:
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == 50.0 and p["p90"] == 90.0 and p["p99"] == 99.0 and p["mean"] == 50.5
    assert percentiles([]) == {}
    assert percentiles([3.0])["p99"] == 3.0


def _grpc_models(port: int) -> list[str]:
    import grpc

    from cluster.grpc import kvferry_pb2 as pb
    from cluster.grpc.kvferry_pb2_grpc import InferenceStub

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [m.id for m in InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models]


@pytest.mark.ray
@pytest.mark.slow
def test_serve_then_sigint_shuts_down_cleanly(tmp_path: Path) -> None:
    """``kvferry serve`` as ``make run`` starts it: its own local Ray (the one test of that
    path; the deploy tests' server joins the session's cluster). Colocated, one replica: the
    disaggregated server is the deploy tests' default_server, and one model load instead of
    two keeps this test's time to Ray's start and stop."""
    from tests.engine.tiny_models import make_tiny_model

    model = make_tiny_model("llama", tmp_path)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model), "--port", str(port),
         "--grpc-port", str(grpc_port), "--kv-cache-memory-bytes", str(4 << 20), "--mode", "colocated",
         "--mixed-replicas", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("kvferry is serving" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.5)
        r = httpx.get(url + "/v1/models", timeout=10)
        assert r.json()["data"][0]["id"] == "llama"
        assert _grpc_models(grpc_port) == ["llama"]  # --grpc-port: the gRPC proxy serves the same app
        done = httpx.post(url + "/v1/completions", timeout=60,
                          json={"model": "llama", "prompt": "hi", "max_tokens": 2, "ignore_eos": True})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2, done.text
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "loading models" in out  # progress while replicas start
    assert "kvferry is serving" in out and url in out and "mode: colocated" in out and "stopped" in out
    assert f"on port {grpc_port}" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)
