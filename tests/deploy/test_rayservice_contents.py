"""What is inside each overlay's RayService: a Serve config Ray accepts and that builds kvferry,
pools that land only on their own worker group (as Ray's autoscaler reads the groups), valid
``ray start`` parameters, the ports KubeRay exposes, the head out of serving."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tests.deploy.manifests import K8S, OVERLAYS, kustomize, rayservice_of

POOL_LABEL = "kvferry.io/pool"


def _service(overlay: Path) -> dict[str, Any]:
    return rayservice_of(kustomize(overlay))


def _serve(overlay: Path) -> dict[str, Any]:
    return yaml.safe_load(_service(overlay)["spec"]["serveConfigV2"])


def _unknown_keys(data: Any, model: type[BaseModel], where: str) -> list[str]:
    """Ray's Serve schemas accept unknown keys silently (forward compatibility); we do not."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        gRPCOptionsSchema,
    )

    nested = {"http_options": HTTPOptionsSchema, "grpc_options": gRPCOptionsSchema, "applications": ServeApplicationSchema,
              "deployments": DeploymentSchema, "ray_actor_options": RayActorOptionsSchema,
              "autoscaling_config": AutoscalingConfig}
    bad = [f"{where}.{k}" for k in data if k not in model.model_fields]
    for key, value in data.items():
        if key in nested and key in model.model_fields:
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                bad += _unknown_keys(item, nested[key], f"{where}.{key}[{i}]")
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serve_config_is_one_ray_accepts_and_its_args_are_a_serve_config(overlay: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ServeConfig

    serve = _serve(overlay)
    ServeDeploySchema.model_validate(serve)
    assert _unknown_keys(serve, ServeDeploySchema, "serveConfigV2") == []
    (app,) = serve["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.model_dump(mode="json") == app["args"]  # nothing lost or defaulted on the way
    assert serve["http_options"] == {"host": "0.0.0.0", "port": cfg.http.port}
    assert (app["name"], app["route_prefix"]) == (cfg.app_name, cfg.route_prefix)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serve_config_builds_kvferry_with_the_deployments_it_configures(overlay: Path) -> None:
    """Serve calls build_app(args) in the cluster, then applies `deployments` by name: a name
    the app lacks fails the deploy. Build it here the same way (no Ray cluster needed)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as build_serve_app

    from cluster.app import build_app

    (app,) = _serve(overlay)["applications"]
    built = build_serve_app(call_user_app_builder_with_args_if_necessary(build_app, app["args"]), name=app["name"])
    assert sorted(d.name for d in built.deployments) == sorted(d["name"] for d in app["deployments"])


def _node_types(overlay: Path) -> dict[str, dict[str, Any]]:
    """The worker groups as Ray's autoscaler reads them from the RayCluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec

    return _generate_available_node_types_from_ray_cr_spec(_service(overlay)["spec"]["rayClusterConfig"])


def _demand(deployment: dict[str, Any]) -> dict[str, float]:
    opts = deployment["ray_actor_options"]
    demand = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    return {k: v for k, v in demand.items() if v}


def _fits(deployment: dict[str, Any], node: dict[str, Any]) -> int:
    """How many replicas of ``deployment`` one node of this type holds (0: it may not land)."""
    selector = deployment["ray_actor_options"].get("label_selector", {})
    if any(node["labels"].get(k) != v for k, v in selector.items()):
        return 0
    return min(math.floor(node["resources"].get(k, 0) / v + 1e-9) for k, v in _demand(deployment).items())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_pool_lands_only_on_its_own_group_one_replica_per_pod(overlay: Path) -> None:
    from cluster.config import ServeConfig

    (app,) = _serve(overlay)["applications"]
    cfg = ServeConfig.model_validate(app["args"])
    types = _node_types(overlay)
    pools = [d for d in app["deployments"] if d["name"] != "ingress"]
    assert sorted(types) == sorted(["headgroup", *(d["name"] for d in pools)])  # group name = pool name
    for dep in pools:
        fits = {name: _fits(dep, node) for name, node in types.items()}
        assert fits == {name: int(name == dep["name"]) for name in types}, dep["name"]
        node, pool = types[dep["name"]], cfg.pool(dep["name"])
        assert node["labels"] == {POOL_LABEL: dep["name"]}
        assert (node["min_workers"], node["max_workers"]) == (pool.min_replicas, pool.max_replicas)
    # Ingress replicas are not pinned; the spare CPUs of the pools' pods must hold them.
    (ingress,) = [d for d in app["deployments"] if d["name"] == "ingress"]
    spare = sum((types[d["name"]]["resources"]["CPU"] - _demand(d)["CPU"]) * types[d["name"]]["min_workers"]
                for d in pools)
    assert spare >= cfg.ingress.max_replicas * _demand(ingress)["CPU"]


def _groups(overlay: Path) -> list[dict[str, Any]]:
    cluster = _service(overlay)["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_ray_start_params_are_ray_start_options_with_valid_values(overlay: Path) -> None:
    import click
    from ray.scripts.scripts import start

    options = {opt[2:]: param for param in start.params for opt in param.opts if opt.startswith("--")}
    for group in _groups(overlay):
        params = group["rayStartParams"]
        assert "labels" not in params  # KubeRay >= 1.5 rejects it: the group's `labels` field sets them
        if group.get("resources"):  # KubeRay rejects resources given both ways
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        for key, value in params.items():
            assert key in options, f"`ray start` has no --{key}"
            options[key].type.convert(value, options[key], click.Context(start))  # raises if malformed


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_ports_head_and_autoscaler(overlay: Path) -> None:
    svc = _service(overlay)
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cluster = svc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert (head["rayStartParams"]["num-cpus"], head["rayStartParams"]["num-gpus"]) == ("0", "0")
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    metrics = int(head["rayStartParams"]["metrics-export-port"])
    serving = {"serve": serve["http_options"]["port"], "serve-grpc": serve["grpc_options"]["port"], "metrics": metrics}
    for group in _groups(overlay):
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {**serving, **({"gcs": 6379, "dashboard": 8265, "client": 10001} if group is head else {})}
        assert ports == expected, group.get("groupName", "head")
        assert group["rayStartParams"]["metrics-export-port"] == str(metrics)


def test_gpu_overlay_gives_each_pool_its_gpus_model_and_nccl_settings() -> None:
    overlay = K8S / "overlays" / "gpu"
    (app,) = _serve(overlay)["applications"]
    model = app["args"]["model"]["model"]
    for group in _service(overlay)["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == group["resources"]["GPU"] == "1"
        assert any(model.startswith(m["mountPath"] + "/") for m in container["volumeMounts"]), group["groupName"]
        env = {e["name"] for e in container["env"]}
        assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"} <= env
    assert {d["name"]: "autoscaling_config" in d for d in app["deployments"]} == {
        "prefill": True, "decode": True, "ingress": False}
