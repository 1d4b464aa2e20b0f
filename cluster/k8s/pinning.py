"""Pin each pool to its own KubeRay worker group, one replica per pod.

A pool's replicas must land only on its group's pods (a decode replica on a prefill pod
would take the prefill pool's GPU), and a pod must hold one replica (pods are sized for
one model copy; the Ray autoscaler then adds a pod per replica Serve asks for). Two Ray
mechanisms do it, both written into the ``ServeConfig`` the RayService carries, so
``build_app`` (its ``ray_actor_options``) and the Serve config agree:

* a Ray node label ``kvferry.io/pool=<pool>`` on the group (KubeRay's group ``labels``
  field) and the same key in the pool's ``node_labels`` (``label_selector``): only that
  group matches, and the autoscaler v2 knows which group to grow for a pending replica;
* a custom resource ``kvferry_replica: 1`` that every worker pod offers once and every
  pool replica takes: at most one replica per pod, whatever spare CPUs the pod has.
"""

from __future__ import annotations

import math

from cluster.config import PoolConfig, ServeConfig

#: Ray node label naming the pool a worker group serves (also a pod label, for PodMonitors).
POOL_LABEL = "kvferry.io/pool"
#: Custom Ray resource each worker pod offers once and each pool replica takes.
SLOT_RESOURCE = "kvferry_replica"


def mode_pools(cfg: ServeConfig) -> tuple[str, ...]:
    """The pools (= worker groups) that exist in ``cfg``'s mode."""
    return ("prefill", "decode") if cfg.mode == "disaggregated" else ("mixed",)


def _check_pool(name: str, pool: PoolConfig) -> None:
    if pool.min_replicas < 1:
        raise ValueError(f"{name}: a pool on Kubernetes needs at least one replica (num_replicas or min_replicas)")
    if pool.num_gpus != int(pool.num_gpus):
        raise ValueError(
            f"{name}.num_gpus is {pool.num_gpus:g}: on Kubernetes each replica gets its own pod, "
            "so a replica cannot share a GPU; use a whole number"
        )
    label = pool.node_labels.get(POOL_LABEL, name)
    if label != name:
        raise ValueError(f"{name}.node_labels sets {POOL_LABEL}={label}; the render pins it to {name}")
    if SLOT_RESOURCE in pool.resources:
        raise ValueError(f"{name}.resources may not name {SLOT_RESOURCE!r}: the render sets it")


def pinned_config(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with every pool of its mode pinned to its group (label + one slot per replica).

    The pool's own ``node_labels`` and ``resources`` stay; its group offers them too.
    """
    overrides = {}
    for name in mode_pools(cfg):
        pool = cfg.pool(name)
        _check_pool(name, pool)
        overrides[f"{name}.node_labels"] = {**pool.node_labels, POOL_LABEL: name}
        overrides[f"{name}.resources"] = {**pool.resources, SLOT_RESOURCE: 1.0}
    return cfg.with_overrides(overrides)


def group_labels(pool: PoolConfig) -> dict[str, str]:
    """Ray node labels of a pinned pool's group: exactly what its replicas select."""
    return dict(pool.node_labels)


def _number(value: float) -> str:
    """A Kubernetes quantity string for a Ray resource amount (whole numbers without '.0')."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def group_resources(pool: PoolConfig, spare_cpus: float) -> dict[str, str]:
    """Ray resources one pod of a pinned pool's group offers: one replica's worth + spare CPUs.

    Goes to the group's ``resources`` field, which KubeRay turns into ``ray start
    --num-cpus/--num-gpus/--resources`` and the autoscaler reads to size new pods.
    """
    # round() first: 0.1 + 0.2 must not become two CPUs.
    resources = {"CPU": str(math.ceil(round(pool.num_cpus + spare_cpus, 6)))}
    if pool.num_gpus:
        resources["GPU"] = _number(pool.num_gpus)
    resources.update({key: _number(value) for key, value in sorted(pool.resources.items())})
    return resources
