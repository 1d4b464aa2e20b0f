"""PromQL building blocks shared by the recording rules, the alerts and the dashboards.

Names: Ray exports every metric with a ``ray_`` prefix (``kvferry_ttft_seconds`` is scraped
as ``ray_kvferry_ttft_seconds_bucket`` ...). Labels that say which pool a series belongs to:

- replica metrics (``cluster.metrics.REPLICA_CATALOG``) and Serve's own ``ray_serve_*``
  metrics carry ``deployment`` (``prefill``, ``decode``, ``mixed``, ``ingress``) and
  ``application``;
- router and directory metrics (``router.metrics``) carry ``pool``;
- on Kubernetes, the PodMonitors add ``ray_io_cluster`` (the RayCluster) and ``ray_io_group``
  (the KubeRay worker group, named after the pool it hosts) to every series, so node and
  GPU metrics split by pool too. Locally neither label exists; the dashboards' ``.*``
  regexes match the empty value, so the same queries work on a laptop.
"""

from __future__ import annotations

from cluster.metrics import CATALOG

RAY_PREFIX = "ray_"
POOLS = ("prefill", "decode", "mixed")
# The label that carries the pool, by the kind of metric.
SERVE_POOL_LABEL = "deployment"
ROUTER_POOL_LABEL = "pool"
GROUP_LABEL = "ray_io_group"
CLUSTER_LABEL = "ray_io_cluster"
_NAMES = {s.name for s in CATALOG}


def metric(name: str, suffix: str = "") -> str:
    """The scraped name of a catalogue metric (``suffix``: ``_bucket``, ``_sum``, ``_count``).

    Raises ``KeyError`` for a name the replicas do not export, so a typo in a rule or a panel
    fails in a unit test instead of drawing an empty panel.
    """
    if name not in _NAMES:
        raise KeyError(f"{name} is not in cluster.metrics.CATALOG")
    return f"{RAY_PREFIX}{name}{suffix}"
