"""Regenerate ``docs/figures/pools_dashboard.png``: the Pools dashboard's queries, drawn from
a real Prometheus after a real ``kvferry bench`` run against ``kvferry serve``.

    .venv/bin/python docs/figures/pools_dashboard.py            # ~4 minutes on a 2-core box

Starts ``kvferry serve`` on the embedded default model (its own local Ray), a Prometheus
scraping Ray's metrics port every second, runs ``kvferry bench`` twice (a warm-up, then the
measured run), evaluates every query of the Pools dashboard over the run with Prometheus'
range API, and draws one small chart per panel (matplotlib), one line per series. The
machine, CPU model, date and commit go into the figure's title.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `cluster` importable without an install
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_info  # noqa: E402
from cluster.observability.local_prometheus import LocalPrometheus, free_port  # noqa: E402

POOL_LABELS = ("deployment", "pool", "ray_io_group", "backend", "code", "reason", "state")
VARIABLES = {"cluster": ".*", "application": "kvferry", "pool": "prefill|decode|mixed",
             "__rate_interval": "30s", "__interval": "5s"}


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _kvferry() -> str:
    return str(Path(sys.executable).with_name("kvferry"))


def _start_server(work: Path, http_port: int, metrics_port: int) -> subprocess.Popen:
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([_kvferry(), "serve", "--port", str(http_port), "--metrics-port", str(metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 900
    while "kvferry is serving" not in (work / "serve.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("kvferry serve did not start:\n" + (work / "serve.log").read_text()[-2000:])
        time.sleep(1)
    return proc


def _bench(url: str, conversations: int, concurrency: int) -> None:
    subprocess.run([_kvferry(), "bench", "--url", url, "--conversations", str(conversations), "--turns", "3",
                    "--concurrency", str(concurrency), "--max-tokens", "32", "--system-words", "200"], check=True)


def _label(legend: str, labels: dict[str, str]) -> str:
    """The panel's own legend format (``{{deployment}} p99``) filled in, as Grafana would."""
    if legend:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend).strip() or "all"
    return "/".join(labels[k] for k in POOL_LABELS if k in labels) or "all"


def _draw(prom: LocalPrometheus, start: float, end: float, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.observability.dashboards import panel_queries, render_query

    panels: dict[str, list] = {}
    for q in panel_queries():
        if q.dashboard_uid == "kvferry-pools" and q.requires != "gpu":  # no GPU on a CPU box
            panels.setdefault(q.panel_title, []).append(q)
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows), squeeze=False)
    for ax, (title, queries) in zip(axes.flat, panels.items()):
        for q in queries:
            for labels, values in prom.query_range(render_query(q.expr, VARIABLES), start, end, 5):
                ts = [t - start for t, _ in values]
                ax.plot(ts, [v for _, v in values], label=_label(q.legend, labels))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("s", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"kvferry Pools dashboard queries during `kvferry bench` — {cpu_info()['cpu_model']}, "
                 f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, commit {_commit()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return len(panels)


def main(
    out: Path = typer.Option(REPO / "docs" / "figures" / "pools_dashboard.png", help="PNG to write."),
    conversations: int = typer.Option(24, help="Conversations of the measured bench run."),
    concurrency: int = typer.Option(6, help="Conversations in flight."),
) -> None:
    """Serve, scrape, bench, draw."""
    work = Path(tempfile.mkdtemp(prefix="kvferry-png-"))
    http_port, metrics_port = free_port(), free_port()
    server = _start_server(work, http_port, metrics_port)
    try:
        with LocalPrometheus([f"127.0.0.1:{metrics_port}"], work / "prom") as prom:
            url = f"http://127.0.0.1:{http_port}"
            _bench(url, 2, 2)  # warm-up: every series exists before the measured run
            time.sleep(12)  # Ray exports recorded metrics every ~10 s
            start = time.time()
            _bench(url, conversations, concurrency)
            time.sleep(15)
            n = _draw(prom, start - 10, time.time(), out)
            print(f"wrote {out} ({n} panels)")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)


if __name__ == "__main__":
    typer.run(main)
