"""Pod templates of the head and worker groups: container, ports, resources, volumes.

KubeRay takes the first container of each template as the Ray container and runs
``ray start`` in it; it also builds the Serve Service from container ports named ``serve``
and ``serve-*`` (hence ``serve-grpc``) and probes readiness and liveness itself, so no
probes are set here.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.k8s.spec import SHM_HEADROOM, DeploySpec, PodShape, quantity_value

#: Ports only the head serves (GCS, dashboard + job API, Ray client).
HEAD_ONLY_PORTS = (("gcs", 6379), ("dashboard", 8265), ("client", 10001))
SHM_VOLUME = "shm"
MODEL_VOLUME = "models"
#: Environment of every Ray container (the same defaults ``kvferry serve`` sets).
BASE_ENV = (("RAY_USAGE_STATS_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false"))


def serving_ports(http_port: int, grpc_port: int, metrics_port: int) -> list[tuple[str, int]]:
    """Ports every Ray pod exposes: a Serve proxy (HTTP, gRPC unless its port is 0) and Ray's
    metrics run per node."""
    grpc = [("serve-grpc", grpc_port)] if grpc_port else []
    return [("serve", http_port), *grpc, ("metrics", metrics_port)]


def object_store_bytes(shape: PodShape) -> str:
    """``ray start --object-store-memory`` for a pod shape (bytes, as KubeRay wants a string)."""
    return str(int(quantity_value(shape.object_store_memory)))


def shm_size(shape: PodShape) -> str:
    """/dev/shm for the object store plus a quarter: Ray moves the store to slow disk if /dev/shm
    has less free than the store's size, and NCCL and torch keep their own segments there."""
    return f"{math.ceil(quantity_value(shape.object_store_memory) * SHM_HEADROOM / 2**20)}Mi"


def _resources(shape: PodShape, ray_resources: dict[str, str]) -> dict[str, Any]:
    """Container requests/limits: CPU request only (a CPU limit throttles decode steps),
    memory request = limit (no overcommit: an OOM kill loses a replica), GPUs as limits."""
    requests = {"cpu": shape.cpu or ray_resources.get("CPU", "1"), "memory": shape.memory}
    limits: dict[str, str] = {"memory": shape.memory}
    if ray_resources.get("GPU", "0") != "0":
        limits["nvidia.com/gpu"] = ray_resources["GPU"]
    return {"requests": requests, "limits": limits}


def _env(spec: DeploySpec) -> list[dict[str, str]]:
    env = [{"name": name, "value": value} for name, value in BASE_ENV]
    env += [var.model_dump() for var in spec.env if var.name not in dict(BASE_ENV)]
    return env


def _volumes(shape: PodShape, spec: DeploySpec, with_models: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): /dev/shm for Ray's object store (a pod's default is 64 MiB, and Ray
    falls back to slow disk when it is smaller than the store); the model PVC on workers."""
    volumes: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(shape)}},
    ]
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if with_models and spec.model_volume is not None:
        claim = spec.model_volume.claim_name
        volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": MODEL_VOLUME, "mountPath": spec.model_volume.mount_path, "readOnly": True})
    return volumes, mounts


def pod_template(
    spec: DeploySpec,
    *,
    component: str,
    shape: PodShape,
    ports: list[tuple[str, int]],
    ray_resources: dict[str, str],
) -> dict[str, Any]:
    """The pod template of one group (``component``: "head" or the pool's name)."""
    is_head = component == "head"
    volumes, mounts = _volumes(shape, spec, with_models=not is_head)
    container = {
        "name": "ray-head" if is_head else "ray-worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": _env(spec),
        "ports": [{"name": name, "containerPort": port} for name, port in ports],
        "resources": _resources(shape, ray_resources),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if shape.node_selector:
        pod_spec["nodeSelector"] = dict(shape.node_selector)
    if shape.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in shape.tolerations]
    labels = {"app.kubernetes.io/name": "kvferry", "app.kubernetes.io/instance": spec.name,
              "app.kubernetes.io/component": component}
    return {"metadata": {"labels": labels}, "spec": pod_spec}
