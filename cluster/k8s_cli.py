"""``kvferry k8s``: Kubernetes manifests from kvferry's own config.

``kvferry k8s render --config kvferry.yaml [--deploy deploy.yaml] [--out rayservice.yaml]``
writes the KubeRay RayService for a ``ServeConfig`` file (see ``cluster/k8s/`` and
docs/deploy.md). A bad file exits 2 with the reason, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

k8s_app = typer.Typer(help="Kubernetes (KubeRay) manifests generated from kvferry's config.", no_args_is_help=True)
console = Console(stderr=True)


@k8s_app.command("render")
def render_command(
    config: Path = typer.Option(..., "--config", help="kvferry ServeConfig YAML (what `kvferry serve --config` reads)."),
    deploy: Path | None = typer.Option(
        None, "--deploy", help="Deploy description YAML: name, image, pod sizes, volumes (default: a laptop CPU setup)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the RayService here (default: standard output)."),
) -> None:
    """Render the KubeRay RayService (serveConfigV2, head and one worker group per pool)."""
    import yaml

    from cluster.config import ServeConfig
    from cluster.k8s import DeploySpec, render
    from cluster.k8s.yaml_out import manifest_text

    try:
        cfg = ServeConfig.from_yaml(config)
        spec = DeploySpec.from_yaml(deploy) if deploy else DeploySpec()
        text = manifest_text(render(cfg, spec), [p.name for p in (config, deploy) if p is not None])
    except (ValueError, OSError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]cannot render:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    console.print(f"wrote {out}", highlight=False)
