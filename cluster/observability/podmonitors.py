"""PodMonitors (prometheus-operator, ``monitoring.coreos.com/v1``) for a KubeRay cluster.

KubeRay labels every pod with ``ray.io/node-type`` (``head`` | ``worker``), ``ray.io/cluster``
(the RayCluster a RayService created) and ``ray.io/group`` (the worker group: kvferry names
its groups after the pool they host, the head's is ``headgroup``). Ray's metrics export is a
container port named ``metrics`` on the head and on every worker.

Two monitors, head and workers, so each can be selected (and dropped) on its own; the
operator names the ``job`` after the monitor (``<namespace>/kvferry-ray-head``). Both copy
``ray.io/cluster`` and ``ray.io/group`` into ``ray_io_cluster`` / ``ray_io_group`` on every
series: Serve metrics split by pool through ``deployment`` already, but node and GPU
metrics only carry an IP, and the group is what ties a node to its pool.

Selection by Prometheus: kube-prometheus-stack's Prometheus only picks up monitors (and
PrometheusRules) whose labels match its ``podMonitorSelector`` / ``ruleSelector``, by default
``release: <helm release name>``. ``RELEASE_LABELS`` matches a release named ``prometheus``
(the name KubeRay's guide installs); patch the label in an overlay for another release name,
or set the selectors to ``{}``. The monitors watch their own namespace (no
``namespaceSelector``): kustomize puts them beside the RayService.
"""

from __future__ import annotations

from typing import Any

from cluster.observability.promql import CLUSTER_LABEL, GROUP_LABEL

API_VERSION = "monitoring.coreos.com/v1"
RELEASE_LABELS = {"release": "prometheus"}
APP_LABELS = {"app.kubernetes.io/name": "kvferry", "app.kubernetes.io/component": "monitoring"}
METRICS_PORT = "metrics"
# kube-prometheus-stack scrapes every 30s by default; the dashboards and recording rules use
# rate(...[1m]), which needs at least two samples inside the window, so scrape every 15s.
SCRAPE_INTERVAL = "15s"
# Pod label -> series label. Prometheus' Kubernetes discovery exposes a pod label as
# __meta_kubernetes_pod_label_<name with every non-alphanumeric character as "_">.
POD_LABELS = {"ray.io/cluster": CLUSTER_LABEL, "ray.io/group": GROUP_LABEL}
NODE_TYPES = ("head", "worker")
# The head also runs the Ray autoscaler (pending nodes, launch failures) and the dashboard,
# each with its own metrics port. KubeRay does not declare these ports itself: the head
# container must name them (44217, 44227) or these endpoints find no target, harmlessly.
HEAD_EXTRA_PORTS = ("as-metrics", "dash-metrics")


def _relabelings() -> list[dict[str, Any]]:
    out = []
    for pod_label, target in POD_LABELS.items():
        meta = "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in pod_label)
        out.append({"sourceLabels": [meta], "targetLabel": target, "action": "replace"})
    return out


def pod_monitor(node_type: str) -> dict[str, Any]:
    """The PodMonitor scraping Ray's metrics port on the pods of one node type."""
    if node_type not in NODE_TYPES:
        raise ValueError(f"node_type must be one of {NODE_TYPES}, not {node_type!r}")
    name = f"kvferry-ray-{node_type}"
    ports = (METRICS_PORT,) + (HEAD_EXTRA_PORTS if node_type == "head" else ())
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitor",
        "metadata": {"name": name, "labels": {**APP_LABELS, **RELEASE_LABELS}},
        "spec": {
            "selector": {"matchLabels": {"ray.io/node-type": node_type}},
            "podMetricsEndpoints": [
                {"port": port, "path": "/metrics", "interval": SCRAPE_INTERVAL, "relabelings": _relabelings()}
                for port in ports
            ],
        },
    }


def pod_monitors() -> list[dict[str, Any]]:
    """The head's and the workers' PodMonitors."""
    return [pod_monitor(t) for t in NODE_TYPES]
