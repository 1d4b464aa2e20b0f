"""Session-wide fixtures: one real local Ray cluster per test session, on loopback.

The cluster starts lazily (only if a test asks for ``ray_cluster``), binds to 127.0.0.1
with Ray's own random ports, and is always shut down at the end of the session. Tests that
need Serve call ``serve.start`` with a free HTTP port from :func:`free_port`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

# Two cores here: keep every process (and every Ray worker, which inherits the env) to one
# torch thread so replicas don't fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `kvferry serve` sets it for its Ray workers (see cluster/cli.py): replicas' RSS stays flat.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """Start one local Ray (4 logical CPUs so ingress, pools and directory fit)."""
    ray = pytest.importorskip("ray")
    ctx = ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        namespace="kvferry-tests",
        _node_ip_address="127.0.0.1",
        # Processes hand their metrics to Ray's exporter every 2 s (default 10 s), so the
        # live-Prometheus test waits seconds, not tens of seconds, for what it sent.
        _system_config={"metrics_report_interval_ms": 2000},
    )
    try:
        yield {"address": ctx.address_info["address"], "gcs_address": ctx.address_info["gcs_address"]}
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort; Ray shutdown below still runs
            pass
        ray.shutdown()
