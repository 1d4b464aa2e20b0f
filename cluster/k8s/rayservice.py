"""``render(cfg, spec)``: a KubeRay ``RayService`` (``ray.io/v1``) for one ``ServeConfig``.

Shape of what comes out:

* ``serveConfigV2``: the Serve config of ``cluster.k8s.serve_config``, as a YAML string;
* a head group that runs no replica (``num-cpus: 0``, ``num-gpus: 0``): it holds the GCS,
  the Serve controller and the autoscaler, and losing it loses the cluster;
* one worker group per pool of the mode, named after the pool (``prefill``, ``decode`` or
  ``mixed``: dashboards split node metrics by KubeRay's ``ray.io/group`` pod label), its
  min/max pods = the pool's min/max replicas (one replica per pod, see ``pinning``);
* the Ray autoscaler v2, so Serve autoscaling a pool adds and removes that group's pods.
"""

from __future__ import annotations

from typing import Any

from cluster.config import ServeConfig
from cluster.k8s.pinning import group_labels, group_resources, mode_pools, pinned_config
from cluster.k8s.pods import HEAD_ONLY_PORTS, object_store_bytes, pod_template, serving_ports
from cluster.k8s.serve_config import pod_config, serve_config
from cluster.k8s.spec import DeploySpec
from cluster.k8s.yaml_out import dump_yaml

#: The Ray in the image (the Dockerfile's base image; pyproject pins ray[serve] to it).
RAY_VERSION = "2.60.0"
API_VERSION = "ray.io/v1"


def _check_model_volume(cfg: ServeConfig, spec: DeploySpec) -> None:
    volume = spec.model_volume
    if volume is None or cfg.model.model == "default":
        return
    root = volume.mount_path.rstrip("/") + "/"
    if not cfg.model.model.startswith(root):
        raise ValueError(f"model.model {cfg.model.model!r} is not under the model volume's mount path {root}")


def _check_pool_shapes(cfg: ServeConfig, spec: DeploySpec) -> None:
    unused = sorted(set(spec.pools) - set(mode_pools(cfg)))
    if unused:
        raise ValueError(f"the deploy description sizes pools {unused} that mode {cfg.mode} does not have")


def _check_ingress_room(cfg: ServeConfig, spec: DeploySpec) -> None:
    """Ingress replicas are not pinned; the pool pods' spare CPUs must hold them all."""
    needed = cfg.ingress.max_replicas * cfg.ingress.num_cpus
    room = sum(cfg.pool(name).min_replicas for name in mode_pools(cfg)) * spec.spare_cpus
    if needed > room + 1e-9:
        raise ValueError(
            f"ingress needs {needed:g} CPUs ({cfg.ingress.max_replicas} x {cfg.ingress.num_cpus:g}) but the worker "
            f"pods offer {room:g} spare CPUs at their minimum; raise spare_cpus in the deploy description"
        )


def _head_group(cfg: ServeConfig, spec: DeploySpec) -> dict[str, Any]:
    ports = [*HEAD_ONLY_PORTS, *serving_ports(cfg.http.port, cfg.grpc.port, cfg.metrics.export_port)]
    return {
        "rayStartParams": {
            "num-cpus": "0",  # no replica, ingress or task lands on the head
            "num-gpus": "0",
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(cfg.metrics.export_port),
            "object-store-memory": object_store_bytes(spec.head),
        },
        "template": pod_template(spec, component="head", shape=spec.head, ports=ports, ray_resources={}),
    }


def _worker_group(cfg: ServeConfig, spec: DeploySpec, name: str) -> dict[str, Any]:
    pool, shape = cfg.pool(name), spec.pool_shape(name)
    resources = group_resources(pool, spec.spare_cpus)
    ports = serving_ports(cfg.http.port, cfg.grpc.port, cfg.metrics.export_port)
    initial = pool.autoscaling.initial_replicas if pool.autoscaled else None
    return {
        "groupName": name,
        "replicas": initial or pool.min_replicas,
        "minReplicas": pool.min_replicas,
        "maxReplicas": pool.max_replicas,
        # KubeRay passes these to `ray start --labels/--num-cpus/--num-gpus/--resources`
        # (and forbids `labels` in rayStartParams); the autoscaler reads them to pick a group.
        "labels": group_labels(pool),
        "resources": resources,
        "rayStartParams": {
            "metrics-export-port": str(cfg.metrics.export_port),
            "object-store-memory": object_store_bytes(shape),
        },
        "template": pod_template(spec, component=name, shape=shape, ports=ports, ray_resources=resources),
    }


def render(cfg: ServeConfig, spec: DeploySpec) -> dict[str, Any]:
    """The RayService for ``cfg`` deployed as ``spec`` describes (plain data, YAML-ready)."""
    run_cfg = pod_config(pinned_config(cfg))
    _check_model_volume(run_cfg, spec)
    _check_ingress_room(run_cfg, spec)
    _check_pool_shapes(run_cfg, spec)
    metadata: dict[str, Any] = {"name": spec.name}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    metadata["labels"] = {"app.kubernetes.io/name": "kvferry", "app.kubernetes.io/instance": spec.name}
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            # NewCluster: a changed rayClusterConfig comes up beside the old cluster, traffic
            # moves when its app is healthy, and the old cluster lives on for a request
            # timeout so streams in flight finish (serveConfigV2-only changes update in place).
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterDeletionDelaySeconds": int(run_cfg.http.request_timeout_s),
            # The head's proxy stays out of the Serve Service: request bursts stay off the
            # pod whose loss takes the whole cluster down.
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": dump_yaml(serve_config(run_cfg)),
            "rayClusterConfig": _cluster(run_cfg, spec),
        },
    }


def _cluster(cfg: ServeConfig, spec: DeploySpec) -> dict[str, Any]:
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",  # label-aware scaling: a pending decode replica grows the decode group
            "upscalingMode": "Default",
            "idleTimeoutSeconds": spec.idle_timeout_s,
        },
        "headGroupSpec": _head_group(cfg, spec),
        "workerGroupSpecs": [_worker_group(cfg, spec, name) for name in mode_pools(cfg)],
    }

