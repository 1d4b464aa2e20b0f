"""``kvferry replay TRACE``: compare routing policies on a request trace (no GPU).

:func:`replay_command` is a plain typer command function; ``cluster/cli.py`` registers it
as ``kvferry replay`` and :func:`main` runs it standalone (``python -m router.replay_cli``).
The simulator itself is ``router.replay``; it does not know about this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from router.replay import (
    GPU_DISK_PROMOTE_US_PER_TOKEN,
    GPU_HOST_PROMOTE_US_PER_TOKEN,
    POLICIES,
    ReplayConfig,
    ReplayResult,
    ServiceModel,
    load_trace,
    replay,
    tier_comparison,
    ttl_sweep,
)

DEFAULT_TTLS_S = (10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def _table(title: str, results: list[ReplayResult], with_ttl: bool) -> Table:
    t = Table(title=title)
    if with_ttl:
        t.add_column("TTL (s)", justify="right", no_wrap=True)
    t.add_column("policy", no_wrap=True)
    for col in ("hit rate", "dev/host/disk %", "TTFT mean", "p50", "p90", "p99", "imbalance"):
        t.add_column(col, justify="right")
    for r in results:
        row = [f"{r.ttl_s:g}"] if with_ttl else []
        row += [r.policy, f"{r.hit_rate:.1%}", _by_tier(r), f"{r.ttft_mean_s:.3f} s", f"{r.ttft_p50_s:.3f} s",
                f"{r.ttft_p90_s:.3f} s", f"{r.ttft_p99_s:.3f} s", f"{r.imbalance:.2f}"]
        t.add_row(*row)
    return t


def _by_tier(r: ReplayResult) -> str:
    return f"{100 * r.hit_rate_device:.1f}/{100 * r.hit_rate_host:.1f}/{100 * r.hit_rate_disk:.1f}"


def _tier_table(results: list[ReplayResult]) -> Table:
    t = Table(title="kvferry: device only vs tiers (hit rate by tier; TTFT vs device only)")
    for col in ("tiers", "router sees", "hit rate", "dev/host/disk %", "TTFT mean", "p90", "vs device only"):
        t.add_column(col, justify="right" if col not in ("tiers", "router sees") else "left")
    base = results[0].ttft_mean_s
    for r in results:
        tiers = "device" + (" + host" if r.host_tokens else "") + (" + disk" if r.disk_tokens else "")
        sees = "device" if not r.tier_events or tiers == "device" else "all tiers"
        t.add_row(tiers.replace(" ", ""), sees, f"{r.hit_rate:.1%}", _by_tier(r), f"{r.ttft_mean_s:.3f} s", f"{r.ttft_p90_s:.3f} s",
                  f"{r.ttft_mean_s / base:.2f}x" if base else "-")
    return t


def replay_command(
    trace: Path = typer.Argument(..., exists=True, dir_okay=False, help="Mooncake-format JSONL trace."),
    replicas: int = typer.Option(8, "--replicas", min=1, help="Replicas in the simulated pool."),
    cache_tokens: int = typer.Option(1_000_000, "--cache-tokens", min=0, help="Device prompt-cache capacity per replica, tokens."),
    host_tokens: int = typer.Option(0, "--host-tokens", min=0, help="Host-memory tier per replica, tokens (0: off)."),
    disk_tokens: int = typer.Option(0, "--disk-tokens", min=0, help="Disk tier per replica, tokens (0: off)."),
    policies: str = typer.Option(",".join(POLICIES), "--policies", help="Comma-separated: " + ", ".join(POLICIES) + "."),
    ttl_s: float = typer.Option(300.0, "--ttl", min=0.001, help="Device-tier prompt-cache TTL, seconds (sliding)."),
    host_ttl_s: float = typer.Option(3600.0, "--host-ttl", min=0.001, help="Host-tier TTL from demotion, seconds."),
    disk_ttl_s: float = typer.Option(86_400.0, "--disk-ttl", min=0.001, help="Disk-tier TTL from demotion, seconds."),
    host_promote_us: float = typer.Option(GPU_HOST_PROMOTE_US_PER_TOKEN, "--host-promote-us-per-token", min=0.0,
                                          help="Service model: host -> device promote time per cached token, microseconds."),
    disk_promote_us: float = typer.Option(GPU_DISK_PROMOTE_US_PER_TOKEN, "--disk-promote-us-per-token", min=0.0,
                                          help="Service model: disk -> device promote time per cached token, microseconds."),
    ttl_sweep_: bool = typer.Option(False, "--ttl-sweep", help="Report kvferry's hit rate and TTFT against the device TTL."),
    prefill_tokens_per_s: float = typer.Option(10_000.0, "--prefill-tokens-per-s", min=1.0, help="Service model: prefill speed of one replica."),
    overhead_s: float = typer.Option(0.020, "--overhead-s", min=0.0, help="Service model: fixed cost per request."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Replay only the first N requests."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON list to this file."),
) -> None:
    """Replay a trace through a simulated pool for each routing policy."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise typer.BadParameter(f"unknown policy {bad or names}; choose from {', '.join(POLICIES)}", param_hint="--policies")
    try:
        reqs = load_trace(trace, limit)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="TRACE") from e
    service = ServiceModel(prefill_tokens_per_s, overhead_s, (0.0, host_promote_us * 1e-6, disk_promote_us * 1e-6))
    cfg = ReplayConfig(num_replicas=replicas, cache_tokens=cache_tokens, ttl_s=ttl_s, service=service,
                       host_tokens=host_tokens, disk_tokens=disk_tokens, host_ttl_s=host_ttl_s, disk_ttl_s=disk_ttl_s)
    results = replay(reqs, names, cfg)
    # With a lower tier, also run kvferry without it and with a device-only router view.
    tiers = tier_comparison(reqs, cfg) if host_tokens or disk_tokens else []
    sweep = ttl_sweep(reqs, DEFAULT_TTLS_S, cfg) if ttl_sweep_ else []
    payload = [r.to_dict() for r in results + tiers + sweep]
    if out is not None:
        out.write_text(json.dumps(payload, indent=2))
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped into a file: rich would assume 80 columns and wrap
        console = Console(width=120)
    title = f"{trace.name}: {len(reqs)} requests, {replicas} replicas x {cache_tokens:,} device"
    title += f" + {host_tokens:,} host" if host_tokens else ""
    title += f" + {disk_tokens:,} disk" if disk_tokens else ""
    title += " tokens"
    console.print(_table(title, results, with_ttl=False))
    if tiers:
        console.print(_tier_table(tiers))
    if sweep:
        console.print(_table("kvferry vs device TTL", sweep, with_ttl=True))


def main() -> None:
    """Run :func:`replay_command` as a standalone program."""
    typer.run(replay_command)


if __name__ == "__main__":
    main()
