"""``kvferry dashboards``: export the Grafana dashboards to files, or push them to a Grafana.

A typer sub-app that ``cluster/cli.py`` mounts; the dashboard code (grafana-foundation-sdk,
grafana-client) is imported inside each command so ``kvferry --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Grafana dashboards of kvferry: Pools, Prompt cache, KV transfer.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@app.command()
def export(
    out: Path = typer.Option(Path("k8s/base/dashboards"), "--out", help="Folder to write into (made if missing)."),
) -> None:
    """Write each dashboard's JSON (json/), a ConfigMap per dashboard and a kustomization.yaml.

    The ConfigMaps carry the label grafana_dashboard: "1", which the kube-prometheus-stack
    Grafana sidecar loads; `kubectl apply -k OUT` installs them.
    """
    from cluster.observability.dashboards import dashboards
    from cluster.observability.dashboards.files import export_files, write_files

    written = write_files(export_files(dashboards()), out)
    console.print(f"wrote {len(written)} files to {out}")


@app.command()
def push(
    url: str = typer.Option(..., "--url", help="Grafana's base URL, e.g. http://localhost:3000."),
    token: str | None = typer.Option(None, "--token", envvar="GRAFANA_TOKEN",
                                     help="Service account token (Editor); or user:password@ in --url."),
    folder: str = typer.Option("kvferry", "--folder", help="Folder title, created if missing ('' = General)."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per HTTP request."),
) -> None:
    """Upload every dashboard to a running Grafana (overwriting the previous version)."""
    from cluster.observability.dashboards import dashboards
    from cluster.observability.dashboards.push import PushError
    from cluster.observability.dashboards.push import push as push_dashboards

    try:
        pushed = push_dashboards(dashboards(), url, token, folder=folder, timeout_s=timeout)
    except PushError as e:
        # Plain text: Grafana's own message may hold [brackets] that rich would read as markup.
        err_console.print(f"push failed: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for p in pushed:
        console.print(f"pushed {p.uid} {p.url}", markup=False, highlight=False, soft_wrap=True)
