"""Shared helpers of the deployment tests: where the manifests are, and ``kubectl kustomize``.

Every directory under ``k8s/`` with a ``kvferry.yaml`` is a render source: its
``kvferry.yaml`` + ``deploy.yaml`` give its committed ``rayservice.yaml``.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RENDER_DIRS = sorted(p.parent for p in K8S.rglob("kvferry.yaml"))
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def render_dir(path: Path) -> str:
    """A render source's path from the repo root, for test ids and messages."""
    return str(path.relative_to(ROOT))


def render_command(path: Path) -> str:
    """The command that regenerates ``path``'s ``rayservice.yaml``."""
    d = render_dir(path)
    return f"kvferry k8s render --config {d}/kvferry.yaml --deploy {d}/deploy.yaml --out {d}/rayservice.yaml"


def rendered_text(path: Path) -> str:
    """What ``kvferry k8s render`` writes for the render source ``path``, now."""
    from cluster.config import ServeConfig
    from cluster.k8s import DeploySpec, render
    from cluster.k8s.yaml_out import manifest_text

    cfg = ServeConfig.from_yaml(path / "kvferry.yaml")
    return manifest_text(render(cfg, DeploySpec.from_yaml(path / "deploy.yaml")), ["kvferry.yaml", "deploy.yaml"])


def kubectl() -> str:
    """kubectl's path; its absence fails the test (CI has it), it is never a skip."""
    path = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)
    if path is None:
        pytest.fail("kubectl not found: install it (kubectl kustomize renders the overlays offline)")
    return path


@functools.cache
def _kustomize(overlay: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {render_dir(overlay)} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize overlay`` renders (cached per overlay)."""
    return list(_kustomize(overlay))


def rayservice_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one RayService among ``docs``."""
    (svc,) = [d for d in docs if d.get("kind") == "RayService"]
    return svc
