"""The deploy description: what a RayService needs beyond kvferry's own ``ServeConfig``.

``ServeConfig`` says what to serve and how many replicas each pool may have; this file says
where it runs on Kubernetes: the RayService's name, the image, each pod's memory and CPU
request, the model volume, extra environment (NCCL settings on GPUs) and scheduling hints.
It is loaded from YAML (``deploy.yaml`` next to ``kvferry.yaml`` in ``k8s/``) and, like
``ServeConfig``, rejects unknown keys so a misspelt setting fails the render.

Ray's share of a pod (logical CPUs, GPUs, node labels) is *derived* from the pool, not
written here: one replica per pod, so a pod offers what one replica asks for plus
``spare_cpus`` for the unpinned actors (ingress replicas) that may land on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A Kubernetes resource quantity ("512Mi", "2", "500m", "1.5Gi").
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
#: /dev/shm holds Ray's object store plus this share of it (see pods.shm_size).
SHM_HEADROOM = 1.25
# KubeRay appends 6 characters to a RayService's name for its RayCluster (max 53).
MAX_NAME_LENGTH = 47


def quantity_value(quantity: str) -> float:
    """The number a Kubernetes quantity stands for ("1Gi" -> 1073741824.0, "500m" -> 0.5)."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity (e.g. 512Mi, 2Gi, 500m, 2)")
    return float(match.group(1)) * _FACTORS[match.group(3)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvVar(_Strict):
    """One environment variable of every Ray container."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str


class Toleration(_Strict):
    """A Kubernetes toleration (GPU node pools are usually tainted)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PodShape(_Strict):
    """Kubernetes-side size and placement of one group's pods."""

    cpu: str | None = Field(
        None, description="CPU request; None = the Ray CPUs the pod offers (a laptop may ask for less)."
    )
    memory: str = Field("2Gi", description="Memory request and limit (a replica loads its own model copy).")
    object_store_memory: str = Field(
        "256Mi", description="Ray object store, kept in a memory-backed /dev/shm of this size."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Kubernetes tolerations.")

    @field_validator("cpu", "memory", "object_store_memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            quantity_value(value)
        return value

    @model_validator(mode="after")
    def _store_fits(self) -> PodShape:
        # /dev/shm is memory the pod's limit counts.
        if quantity_value(self.object_store_memory) * SHM_HEADROOM >= quantity_value(self.memory):
            raise ValueError(
                f"object_store_memory {self.object_store_memory} (+25% of /dev/shm) must be below memory {self.memory}"
            )
        return self


class ModelVolume(_Strict):
    """A PersistentVolumeClaim holding HF model directories, mounted read-only in worker pods."""

    claim_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    mount_path: str = Field("/models", pattern=r"^/.+")


class DeploySpec(_Strict):
    """Everything ``kvferry k8s render`` needs besides the ``ServeConfig``."""

    name: str = Field("kvferry", max_length=MAX_NAME_LENGTH, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
                      description="RayService name (a DNS-1035 label).")
    namespace: str | None = Field(None, description="metadata.namespace; None leaves it to kubectl -n / kustomize.")
    image: str = Field("kvferry:0.1.0-cpu", description="Image of every Ray container (see the Dockerfile).")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    spare_cpus: float = Field(
        1.0, ge=0, description="Ray CPUs a worker pod offers beyond its replica: room for ingress replicas."
    )
    idle_timeout_s: int = Field(60, ge=0, description="The Ray autoscaler removes a pod idle this long.")
    head: PodShape = Field(default_factory=lambda: PodShape(cpu="1"), description="The head pod.")
    pools: dict[Literal["prefill", "decode", "mixed"], PodShape] = Field(
        default_factory=dict, description="Pod shape of each pool's worker group (missing: defaults)."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of every Ray container.")
    model_volume: ModelVolume | None = Field(None, description="Where model.model lives, if not in the image.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploySpec:
        """Load a deploy description (unknown keys are an error)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def pool_shape(self, pool: str) -> PodShape:
        """The pod shape of ``pool``'s worker group."""
        return self.pools.get(pool, PodShape())  # type: ignore[call-overload]
