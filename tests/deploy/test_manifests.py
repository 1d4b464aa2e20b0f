"""The committed k8s/ manifests: what the generator writes, what kustomize renders, and what the
API server would accept (KubeRay's CRD schemas, Kubernetes' own schemas), all offline."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.crd_schema import crd_errors
from tests.deploy.manifests import (
    K8S,
    OVERLAYS,
    RENDER_DIRS,
    kustomize,
    render_command,
    render_dir,
    rayservice_of,
    rendered_text,
)

#: Kubernetes version the built-in kinds are validated against (kubernetes-validate's schemas).
K8S_VERSION = "1.30"
CUSTOM_KINDS = ("RayService", "RayCluster")
# prometheus-operator's kinds: no CRD schema ships in ../shared/k8s-crds; their structure and
# every rule are checked by tests/deploy/test_prometheus_rules.py (promtool included).
OPERATOR_KINDS = ("PodMonitor", "PrometheusRule")


def test_render_sources_and_overlays_are_there() -> None:
    assert [render_dir(p) for p in RENDER_DIRS] == ["k8s/base", "k8s/overlays/gpu"]
    assert [p.name for p in OVERLAYS] == ["cpu", "gpu"]
    for src in RENDER_DIRS:
        assert (src / "deploy.yaml").is_file() and (src / "rayservice.yaml").is_file(), render_dir(src)


@pytest.mark.parametrize("src", RENDER_DIRS, ids=render_dir)
def test_committed_rayservice_is_what_the_generator_writes(src: Path) -> None:
    committed = (src / "rayservice.yaml").read_text()
    assert committed == rendered_text(src), (
        f"{render_dir(src)}/rayservice.yaml is out of date with kvferry.yaml/deploy.yaml or the generator; "
        f"run: {render_command(src)}"
    )


def _source_of(overlay: Path) -> Path:
    """The render source whose RayService an overlay applies: its own, else the base's."""
    return overlay if (overlay / "kvferry.yaml").is_file() else K8S / "base"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_applies_exactly_the_rendered_rayservice(overlay: Path) -> None:
    applied = rayservice_of(kustomize(overlay))
    committed = yaml.safe_load((_source_of(overlay) / "rayservice.yaml").read_text())
    assert applied == committed


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_custom_resources_validate_strictly_against_the_kuberay_crds(overlay: Path) -> None:
    docs = [d for d in kustomize(overlay) if d["kind"] in CUSTOM_KINDS]
    # KubeRay creates a RayCluster from each RayService's rayClusterConfig: validate that too.
    docs += [{"apiVersion": d["apiVersion"], "kind": "RayCluster", "metadata": {"name": d["metadata"]["name"]},
              "spec": d["spec"]["rayClusterConfig"]} for d in docs if d["kind"] == "RayService"]
    assert {d["kind"] for d in docs} == set(CUSTOM_KINDS)
    for doc in docs:
        assert crd_errors(doc) == [], f"{overlay.name}: {doc['kind']} {doc['metadata']['name']}"


def _builtin_errors(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']} {doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"
    return None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_builtin_kinds_and_all_metadata_validate_against_kubernetes_schemas(overlay: Path) -> None:
    docs = kustomize(overlay)
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS + OPERATOR_KINDS]
    # CRDs leave ObjectMeta to the API server: check every document's metadata as a ConfigMap's.
    metas = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": d["metadata"]} for d in docs]
    errors = [e for d in builtin + metas if (e := _builtin_errors(d))]
    assert errors == []


def test_gpu_overlay_brings_its_model_volume() -> None:
    docs = kustomize(K8S / "overlays" / "gpu")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    groups = rayservice_of(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        used = {v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v}
        assert used and used <= claims, group["groupName"]


def test_builtin_validation_is_strict() -> None:
    pvc = next(d for d in kustomize(K8S / "overlays" / "gpu") if d["kind"] == "PersistentVolumeClaim")
    bad = copy.deepcopy(pvc)
    bad["spec"]["accessMode"] = ["ReadWriteMany"]  # misspelt: the API server would drop it
    assert "accessMode" in (_builtin_errors(bad) or "")
    assert _builtin_errors(pvc) is None
