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

from router.replay import POLICIES, ReplayConfig, ReplayResult, ServiceModel, load_trace, replay, ttl_sweep

DEFAULT_TTLS_S = (10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def _table(title: str, results: list[ReplayResult], with_ttl: bool) -> Table:
    t = Table(title=title)
    if with_ttl:
        t.add_column("TTL (s)", justify="right", no_wrap=True)
    t.add_column("policy", no_wrap=True)
    for col in ("hit rate", "TTFT mean", "p50", "p90", "p99", "imbalance"):
        t.add_column(col, justify="right")
    for r in results:
        row = [f"{r.ttl_s:g}"] if with_ttl else []
        row += [r.policy, f"{r.hit_rate:.1%}", f"{r.ttft_mean_s:.3f} s", f"{r.ttft_p50_s:.3f} s",
                f"{r.ttft_p90_s:.3f} s", f"{r.ttft_p99_s:.3f} s", f"{r.imbalance:.2f}"]
        t.add_row(*row)
    return t


def replay_command(
    trace: Path = typer.Argument(..., exists=True, dir_okay=False, help="Mooncake-format JSONL trace."),
    replicas: int = typer.Option(8, "--replicas", min=1, help="Replicas in the simulated pool."),
    cache_tokens: int = typer.Option(1_000_000, "--cache-tokens", min=0, help="Prompt-cache capacity per replica, tokens."),
    policies: str = typer.Option(",".join(POLICIES), "--policies", help="Comma-separated: " + ", ".join(POLICIES) + "."),
    ttl_s: float = typer.Option(300.0, "--ttl", min=0.001, help="Directory / prompt-cache TTL, seconds (sliding)."),
    ttl_sweep_: bool = typer.Option(False, "--ttl-sweep", help="Report kvferry's hit rate and TTFT against the directory TTL."),
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
    cfg = ReplayConfig(num_replicas=replicas, cache_tokens=cache_tokens, ttl_s=ttl_s,
                       service=ServiceModel(prefill_tokens_per_s, overhead_s))
    results = replay(reqs, names, cfg)
    sweep = ttl_sweep(reqs, DEFAULT_TTLS_S, cfg) if ttl_sweep_ else []
    payload = [r.to_dict() for r in results + sweep]
    if out is not None:
        out.write_text(json.dumps(payload, indent=2))
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console()
    title = f"{trace.name}: {len(reqs)} requests, {replicas} replicas x {cache_tokens:,} cached tokens"
    console.print(_table(title, results, with_ttl=False))
    if sweep:
        console.print(_table("kvferry vs directory TTL", sweep, with_ttl=True))


def main() -> None:
    """Run :func:`replay_command` as a standalone program."""
    typer.run(replay_command)


if __name__ == "__main__":
    main()
