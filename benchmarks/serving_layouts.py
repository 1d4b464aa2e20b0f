"""Disaggregated (1 prefill + 1 decode) vs colocated (2 mixed) on one machine, in one run.

Starts a local Ray cluster, deploys each layout in turn behind the same ingress code on the
same port, offers the same multi-turn chat workload (``cluster.bench``), and writes both
summaries plus their ratios (disaggregated / colocated) to a JSON file. Both layouts get
the same CPU budget: two engine replicas with the same ``torch_threads``.

    .venv/bin/python benchmarks/serving_layouts.py --out bench_cluster.json

The load generator itself is ``cluster.bench`` (also behind ``kvferry bench``); this
script only deploys the layouts and compares them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `cluster` importable without an install
    sys.path.insert(0, str(REPO))

from cluster.bench import BenchConfig, format_summary, run_bench, write_json  # noqa: E402
from cluster.config import ServeConfig  # noqa: E402


def _wait_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def run_layout(cfg: ServeConfig, bench: BenchConfig) -> dict[str, Any]:
    """Deploy ``cfg``, warm up, offer ``bench`` load, tear the app down."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    try:
        _wait_ready(bench.url, 600)
        # Warm-up: one short conversation with a different seed (first-call overheads).
        warm = BenchConfig(**{**bench.__dict__, "num_conversations": 1, "turns": 1, "seed": 999})
        asyncio.run(run_bench(warm))
        summary = asyncio.run(run_bench(bench))
        # Engine-side counters of the pool the ingress talks to (remote prefills, failures).
        pool = "decode" if cfg.mode == "disaggregated" else "mixed"
        handle = serve.get_deployment_handle(pool, app_name=cfg.app_name)
        summary["replica_stats"] = dataclasses.asdict(handle.stats.remote().result())
        return summary
    finally:
        serve.delete(cfg.app_name)


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str, sub: str | None = None) -> float | None:
    """a/b for one figure; None when either side has none (e.g. no inter-token latencies:
    every request produced a single chunk)."""
    x = a[key].get(sub) if sub else a[key]
    y = b[key].get(sub) if sub else b[key]
    return (x / y) if x is not None and y else None


def main(
    model: str = typer.Option("default", help="Model to serve."),
    conversations: int = typer.Option(6, help="Conversations per layout."),
    turns: int = typer.Option(3, help="Turns per conversation."),
    concurrency: int = typer.Option(3, help="Conversations in flight."),
    max_tokens: int = typer.Option(16, help="Tokens per turn."),
    system_words: int = typer.Option(120, help="Words in the shared system prompt."),
    port: int = typer.Option(8011, help="HTTP port used by both layouts."),
    request_router: str = typer.Option("kvferry", help="kvferry (cache-affinity, the default) or default (Serve's)."),
    out: Path = typer.Option(Path("bench_cluster.json"), help="JSON results file."),
) -> None:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="kvferry-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    bench = BenchConfig(url=url, num_conversations=conversations, turns=turns, concurrency=concurrency,
                        max_tokens=max_tokens, system_words=system_words)
    base = {"model": {"model": model}, "http": {"port": port}, "routing": {"request_router": request_router}}
    layouts = {
        "disaggregated": ServeConfig.model_validate({**base, "mode": "disaggregated", "app_name": "disagg"}),
        "colocated": ServeConfig.model_validate({**base, "mode": "colocated", "app_name": "coloc",
                                                 "mixed": {"num_replicas": 2}}),
        # Every prompt through the prefill pool and the transport (no local-prefill shortcut):
        # what the ferry itself costs on this box.
        "disaggregated_remote_only": ServeConfig.model_validate(
            {**base, "mode": "disaggregated", "app_name": "disagg-remote", "engine": {"local_prefill_threshold": 0}}
        ),
    }
    results: dict[str, Any] = {}
    try:
        for name, cfg in layouts.items():
            results[name] = run_layout(cfg, bench)
            print(format_summary(name, results[name]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    d, c = results["disaggregated"], results["colocated"]
    ratios = {
        "ttft_p50": _ratio(d, c, "ttft_s", "p50"),
        "tpot_p50": _ratio(d, c, "tpot_s", "p50"),
        "itl_p50": _ratio(d, c, "itl_s", "p50"),
        "e2e_p50": _ratio(d, c, "e2e_s", "p50"),
        "output_tokens_per_s": _ratio(d, c, "output_tokens_per_s"),
        "cached_token_ratio": _ratio(d, c, "cached_token_ratio"),
    }
    print("disaggregated / colocated:", {k: (round(v, 3) if v else v) for k, v in ratios.items()})
    r = results["disaggregated_remote_only"]
    remote_ratios = {
        "ttft_p50": _ratio(r, c, "ttft_s", "p50"),
        "e2e_p50": _ratio(r, c, "e2e_s", "p50"),
        "output_tokens_per_s": _ratio(r, c, "output_tokens_per_s"),
    }
    print("disaggregated (remote only) / colocated:", {k: (round(v, 3) if v else v) for k, v in remote_ratios.items()})
    write_json(out, {"peer": "colocated (2 mixed replicas)", "results": results, "ratio_disagg_over_coloc": ratios,
                     "ratio_remote_only_over_coloc": remote_ratios, "cpu_count": os.cpu_count()})
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
