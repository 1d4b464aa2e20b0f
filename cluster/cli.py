"""``kvferry`` command line: serve, bench, replay, version.

``kvferry serve`` with no flags starts a local Ray cluster, deploys the embedded default
model with one prefill and one decode replica on the CPU, shows progress while the models
load, prints the URL and serves until Ctrl-C, which shuts Serve and Ray down cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from cluster.config import ServeConfig

MALLOC_MMAP_THRESHOLD = 1 << 20

app = typer.Typer(help="kvferry: disaggregated LLM serving on Ray Serve.", no_args_is_help=True)
console = Console()


@app.command()
def version() -> None:
    """Print kvferry's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        console.print(f"kvferry {pkg_version('kvferry')}")
    except PackageNotFoundError:
        console.print("kvferry (not installed)")


def _deployment_lines(status: Any, app_name: str) -> list[str]:
    app_status = status.applications.get(app_name)
    if app_status is None:
        return ["waiting for the application to be created"]
    lines = []
    for name, d in sorted(app_status.deployments.items()):
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(d.replica_states.items())) or "none yet"
        lines.append(f"{name:10s} {d.status.lower():10s} replicas: {counts}")
    return lines


def _deploy_with_progress(cfg: Any, timeout_s: float, stop: threading.Event) -> None:
    """``serve.run`` without blocking, then poll ``serve.status`` and show replica states.

    Ctrl-C while models load stops waiting at once (the caller then shuts down cleanly)."""
    from ray import serve

    from cluster.app import build_app

    serve._run(build_app(cfg), _blocking=False, name=cfg.app_name, route_prefix=cfg.route_prefix)
    deadline = time.monotonic() + timeout_s
    shown: list[str] = []
    with console.status("deploying…") as spinner:
        while True:
            st = serve.status()
            app_st = st.applications.get(cfg.app_name)
            lines = _deployment_lines(st, cfg.app_name)
            spinner.update("loading models\n" + "\n".join(lines))
            if not console.is_terminal and lines != shown:  # logs/pipes get plain progress lines
                console.print("loading models: " + "; ".join(lines))
                shown = lines
            if app_st is not None and app_st.status == "RUNNING":
                return
            if app_st is not None and app_st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"deployment failed: {app_st.message or app_st.status}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"application not running after {timeout_s:.0f}s")
            if stop.wait(0.5):
                return


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", help="YAML config file (flags override it)."),
    model: str | None = typer.Option(None, help='Model: HF dir, .gguf file or "default".'),
    host: str | None = typer.Option(None, help="HTTP bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
    grpc_port: int | None = typer.Option(None, help="gRPC port (default 9000; 0 turns gRPC off)."),
    prefill_replicas: int | None = typer.Option(None, help="Prefill pool size."),
    decode_replicas: int | None = typer.Option(None, help="Decode pool size."),
    mode: str | None = typer.Option(None, help="disaggregated | colocated."),
    mixed_replicas: int | None = typer.Option(None, help="Colocated pool size (mode=colocated)."),
    block_size: int | None = typer.Option(None, help="Tokens per KV block."),
    kv_cache_memory_bytes: int | None = typer.Option(None, help="KV cache bytes per replica."),
    num_gpus: float | None = typer.Option(None, help="GPUs per engine replica (0 = CPU)."),
    metrics_port: int | None = typer.Option(None, help="Ray's Prometheus metrics port (default 8080; 0 = any)."),
    address: str | None = typer.Option(None, help="Join an existing Ray cluster instead of starting one."),
    num_cpus: int | None = typer.Option(None, help="Logical CPUs of the local Ray cluster (default: 4)."),
    deploy_timeout_s: float = typer.Option(900.0, help="Give up if models are not loaded by then."),
) -> None:
    """Start Ray (or join one), deploy kvferry, print the URL, serve until Ctrl-C."""
    from cluster.config import load_config

    overrides = _serve_overrides(
        model=model, host=host, port=port, grpc_port=grpc_port, prefill_replicas=prefill_replicas,
        decode_replicas=decode_replicas, mode=mode, mixed_replicas=mixed_replicas, block_size=block_size,
        kv_cache_memory_bytes=kv_cache_memory_bytes, num_gpus=num_gpus, metrics_port=metrics_port,
    )
    try:
        cfg = load_config(config, overrides)
    except (ValueError, OSError) as e:
        console.print(f"[red]bad configuration:[/red] {e}")
        raise typer.Exit(2) from e

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Inherited by the local Ray cluster's workers (glibc reads it at process start): a fixed
    # mmap threshold stops freed tensors from fragmenting the heap, which grew replicas' RSS
    # ~10 % over a 5-minute soak; no throughput cost measured (docs/reliability.md).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _start_ray(cfg, address, num_cpus)
    raise typer.Exit(_serve_until_stopped(cfg, deploy_timeout_s, stop))


def _serve_overrides(
    *,
    model: str | None,
    host: str | None,
    port: int | None,
    prefill_replicas: int | None,
    decode_replicas: int | None,
    mode: str | None,
    mixed_replicas: int | None,
    block_size: int | None,
    kv_cache_memory_bytes: int | None,
    num_gpus: float | None,
    metrics_port: int | None = None,
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """``serve``'s flags as dotted config overrides; a flag not given (None) keeps the file's value."""
    overrides: dict[str, Any] = {
        "model.model": model,
        "http.host": host,
        "http.port": port,
        "grpc.port": grpc_port,
        "prefill.num_replicas": prefill_replicas,
        "decode.num_replicas": decode_replicas,
        "mixed.num_replicas": mixed_replicas,
        "mode": mode,
        "engine.block_size": block_size,
        "engine.kv_cache_memory_bytes": kv_cache_memory_bytes,
        "metrics.export_port": metrics_port,
    }
    if num_gpus is not None:  # one flag for every pool: --num-gpus is per engine replica
        overrides.update({"prefill.num_gpus": num_gpus, "decode.num_gpus": num_gpus, "mixed.num_gpus": num_gpus})
    return overrides


def _start_ray(cfg: ServeConfig, address: str | None, num_cpus: int | None) -> None:
    """Join the Ray cluster at ``address``, or start a local one; then start Serve's HTTP and gRPC proxies."""
    import ray
    from ray import serve as rserve

    from cluster.grpc.options import grpc_options

    with console.status("starting Ray…"):
        if address:
            ray.init(address=address, namespace="kvferry", log_to_driver=False)
        else:
            # Fractional pools: a couple of logical CPUs more than cores lets ingress and both
            # pools fit on a 2-core laptop; the replicas limit their own torch threads.
            # Ray serves every process's metrics on this port for Prometheus (see docs/deploy.md).
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                     namespace="kvferry", log_to_driver=False, _metrics_export_port=cfg.metrics.export_port or None)
        rserve.start(http_options={"host": cfg.http.host, "port": cfg.http.port},
                     grpc_options=grpc_options(cfg.grpc.port))


def _serve_until_stopped(cfg: ServeConfig, deploy_timeout_s: float, stop: threading.Event) -> int:
    """Deploy, print the URL, wait for ``stop``; always shut Serve and Ray down. Returns the exit code."""
    import ray
    from ray import serve as rserve

    code = 0
    try:
        _deploy_with_progress(cfg, deploy_timeout_s, stop)
        if stop.is_set():
            raise KeyboardInterrupt  # Ctrl-C while loading: a requested, clean stop
        url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
        console.print(f"[green]kvferry is serving[/green] {url}  (model: {cfg.model.model}, mode: {cfg.mode})")
        console.print(f"  try: curl {url}/v1/models      Ctrl-C to stop")
        if cfg.grpc.port:
            # Serve's gRPC proxy binds every interface (it has no host option): say so.
            console.print(f"  gRPC kvferry.v1.Inference on port {cfg.grpc.port}, every interface (docs/grpc.md)")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        console.print("interrupted while deploying")
    except RuntimeError as e:
        console.print(f"[red]{e}[/red]")
        code = 1
    finally:
        with console.status("shutting down…"):
            try:
                rserve.shutdown()
            finally:
                ray.shutdown()
        console.print("stopped")
    return code


@app.command()
def bench(
    url: str = typer.Option("http://127.0.0.1:8000", help="Server base URL."),
    model: str | None = typer.Option(None, help="Model name (default: the server's first)."),
    conversations: int = typer.Option(8, help="Conversations in total."),
    turns: int = typer.Option(3, help="User turns per conversation."),
    concurrency: int = typer.Option(4, help="Conversations in flight (closed loop)."),
    rate: float | None = typer.Option(None, help="Open loop: conversation arrivals per second."),
    duration: float | None = typer.Option(
        None, help="Closed loop for this many seconds (instead of --conversations): a soak."),
    max_tokens: int = typer.Option(16, help="Tokens generated per turn."),
    system_words: int = typer.Option(120, help="Words in the shared system prompt."),
    output: Path | None = typer.Option(None, help="Write the JSON summary here."),
) -> None:
    """Streaming load against a running server: TTFT/TPOT/ITL/E2E percentiles, goodput, cache ratio."""
    from cluster.bench import BenchConfig, format_summary, run_bench, write_json

    cfg = BenchConfig(url=url.rstrip("/"), model=model, num_conversations=conversations, turns=turns,
                      concurrency=concurrency, rate=rate, max_tokens=max_tokens, system_words=system_words,
                      duration_s=duration)
    summary = asyncio.run(run_bench(cfg))
    console.print(format_summary(url, summary))
    if output:
        write_json(output, summary)
        console.print(f"wrote {output}")
    elif summary["num_ok"] < summary["num_requests"]:
        console.print(json.dumps(summary["errors"], indent=1))


def _register_replay() -> None:
    """``kvferry replay`` comes from the router package; import it only when it runs.

    router ships in the same distribution, so the import cannot fail; it is deferred only
    so the other commands start without loading the simulator.
    """

    @app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,  # --help goes through to the real command
    )
    def replay(ctx: typer.Context) -> None:
        """Replay request traces through routing policies (no GPU; see router/replay_cli.py)."""
        from router.replay_cli import replay_command

        sub = typer.Typer()
        sub.command()(replay_command)
        sub(args=list(ctx.args), prog_name="kvferry replay", standalone_mode=True)


_register_replay()
from cluster.dashboards_cli import app as dashboards_app  # noqa: E402 - typer only; its commands import lazily
from cluster.k8s_cli import k8s_app  # noqa: E402 - cheap: the command imports what it needs when it runs

app.add_typer(dashboards_app, name="dashboards")
app.add_typer(k8s_app, name="k8s")

if __name__ == "__main__":
    app()
