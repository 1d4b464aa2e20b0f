"""``default_server``: the real ``kvferry serve`` on the embedded default model, once per session.

It runs as the console script users run, joined to the session's Ray cluster (``--address``)
so tests can reach its deployments through Serve handles and Ray's metrics port. Short
prompt-cache TTL so expiries happen within a test. Always stopped with Ctrl-C (SIGINT), the
way a user stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import release_serve
from tests.conftest import free_port

TTL_S = 4.0


@dataclass(frozen=True)
class DefaultServer:
    url: str
    log: Path
    ttl_s: float


def _kvferry_exe() -> str:
    exe = Path(sys.executable).with_name("kvferry")
    assert exe.exists(), f"{exe} missing: install kvferry (make install)"
    return str(exe)


def _wait_serving(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "kvferry is serving" in text:
            return
        if proc.poll() is not None:
            pytest.fail(f"kvferry serve exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    pytest.fail(f"kvferry serve not up after {timeout_s:g}s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="session")
def default_server(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultServer]:
    # `kvferry serve` starts Serve with its own HTTP port: a Serve instance the cluster tests
    # left running would keep its own port instead.
    release_serve()
    work = tmp_path_factory.mktemp("default-server")
    port = free_port()
    config = {
        "engine": {"default_ttl_s": TTL_S},
        "http": {"port": port, "prefill_timeout_s": 60.0},
        "grpc": {"port": free_port()},  # never a fixed 9000 another test run may hold
        "transport": {"transfer_timeout_s": 3.0},
    }
    (work / "kvferry.yaml").write_text(yaml.safe_dump(config))
    log = work / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_kvferry_exe(), "serve", "--config", str(work / "kvferry.yaml"),
                                 "--address", ray_cluster["address"]], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_serving(proc, log, timeout_s=600)
        yield DefaultServer(f"http://127.0.0.1:{port}", log, TTL_S)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
