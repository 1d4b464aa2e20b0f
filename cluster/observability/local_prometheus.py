"""A real Prometheus server on loopback, scraping a local kvferry (tests, the docs' figures).

Runs the ``prometheus`` binary (Debian's package ships it, and ``make test`` installs it)
with a generated config: one scrape job per target, a short scrape interval, kvferry's
rule file. Queries go through Prometheus' HTTP API, so a panel or a rule is checked by the
same engine Grafana and the alert manager would use.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

logger = logging.getLogger(__name__)


class PrometheusError(RuntimeError):
    """Prometheus could not start, or answered a query with an error."""


@dataclass(frozen=True)
class Sample:
    """One series of an instant query: its labels and value."""

    labels: dict[str, str]
    value: float


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPrometheus:
    """``with LocalPrometheus(targets, workdir) as prom: prom.query("up")``."""

    targets: list[str]  # host:port of Ray metrics exporters
    workdir: Path
    rule_files: list[Path] = field(default_factory=list)
    # Ray's exporter can take over a second to render a big cluster's metrics (every dead
    # replica's series lingers), so scrape every 2 s with a 2 s timeout, not 1 s; ``start``
    # lengthens both to 3x the slowest render it measures. A scrape that times out marks
    # every series of its target stale, so queries right after it find nothing.
    scrape_interval_s: float = 2.0
    binary: str = "prometheus"
    port: int = 0
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        interval = f"{self.scrape_interval_s:g}s"
        cfg = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": list(self.targets)}]}],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        exe = shutil.which(self.binary)
        if exe is None:
            raise PrometheusError(f"`{self.binary}` not found: install Debian's prometheus package (make tools)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._fit_interval_to_targets()
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            [exe, f"--config.file={self._write_config()}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout_s:g}s: {self.log_tail()}")

    def _fit_interval_to_targets(self) -> None:
        """Scrape interval (and timeout) >= 3x the slowest target's render time, measured now."""
        slowest = 0.0
        for target in self.targets:
            for _ in range(3):
                t = time.monotonic()
                try:
                    httpx.get(f"http://{target}/metrics", timeout=30)
                except httpx.HTTPError:
                    break  # unreachable: Prometheus will report it down
                slowest = max(slowest, time.monotonic() - t)
        if 3 * slowest > self.scrape_interval_s:
            self.scrape_interval_s = float(math.ceil(3 * slowest))
            logger.info("metrics take up to %.2f s to render: scraping every %g s", slowest, self.scrape_interval_s)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    # ------------------------------------------------------------------ queries

    def _api(self, path: str, params: dict[str, Any]) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query', path)}: {body.get('error', r.text)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query (now, or at unix time ``at``); a PromQL error raises."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._api("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [Sample(s["metric"], float(s["value"][1])) for s in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[tuple[dict, list]]:
        """A range query: ``[(labels, [(t, value), ...]), ...]``."""
        data = self._api("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step_s})
        return [(s["metric"], [(float(t), float(v)) for t, v in s["values"]]) for s in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of ``label`` on series matching ``match`` (what Grafana's label_values() shows)."""
        return list(self._api(f"/api/v1/label/{label}/values", {"match[]": match}))

    def scrapes_of(self, target: str) -> int:
        """How many times ``target`` was scraped successfully (in the last hour)."""
        found = self.query(f'sum_over_time(up{{instance="{target}"}}[1h])')
        return int(found[0].value) if found else 0

    def target_health(self) -> list[dict[str, Any]]:
        """Prometheus' view of each target: health, last error, last scrape duration."""
        targets = self._api("/api/v1/targets", {})["activeTargets"]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrapeDuration")} for t in targets]

    def wait_for_scrapes(self, target: str, count: int, timeout_s: float = 90.0) -> None:
        """Block until ``count`` more successful scrapes of ``target`` than now."""
        goal = self.scrapes_of(target) + count
        deadline = time.monotonic() + timeout_s
        while self.scrapes_of(target) < goal:
            if time.monotonic() > deadline:
                raise PrometheusError(f"fewer than {count} scrapes of {target} in {timeout_s:g}s: "
                                      f"{self.target_health()}")
            time.sleep(self.scrape_interval_s / 2)
