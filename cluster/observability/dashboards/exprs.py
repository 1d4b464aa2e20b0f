"""PromQL of the dashboards: label selectors with the template variables, and a few shapes.

Every selector filters on the dashboards' variables with *regex* matchers: on Kubernetes
the PodMonitors add ``ray_io_cluster`` to every series, locally the label is absent, and
``=~".*"`` (the variables' "All") matches an absent label too, so one query serves both.
Names go through :func:`cluster.observability.promql.metric`, which raises for a name the
replicas do not export: a typo fails when the module is imported, not on a live dashboard.

These helpers are dashboard-only (they speak ``$cluster`` and ``$__rate_interval``); the
recording rules and alerts build their own PromQL from ``promql.py``'s names.
"""

from __future__ import annotations

from cluster.observability.promql import CLUSTER_LABEL, POOLS, ROUTER_POOL_LABEL, SERVE_POOL_LABEL, metric

# The rate window: Grafana's own, at least four scrape intervals, so rate() never sees
# fewer than two samples whatever the zoom.
RATE_WINDOW = "$__rate_interval"

# What each variable means when its "All" is picked. The pool's "All" names the pools
# instead of ``.*`` so Serve's own metrics (which also cover the ingress deployment) and
# the routers' ``pool`` label keep to the serving pools.
ALL_CLUSTERS = ".*"
ALL_APPLICATIONS = ".*"
ALL_POOLS = "|".join(POOLS)

# Ray's and Serve's own metrics the dashboards use besides kvferry's CATALOG (they are not
# ours to declare, so they are listed here; a test holds every query to CATALOG + these).
RAY_METRICS = frozenset({
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_node_cpu_utilization",
    "ray_node_gpus_utilization",
})


def _selector(*matchers: str) -> str:
    return "{" + ", ".join(matchers) + "}"


def serve_sel(*extra: str) -> str:
    """Series of a pool's replicas (kvferry's replica metrics, ``ray_serve_*``)."""
    return _selector(f'{CLUSTER_LABEL}=~"$cluster"', 'application=~"$application"',
                     f'{SERVE_POOL_LABEL}=~"$pool"', *extra)


def ingress_sel(*extra: str) -> str:
    """Series of the ingress deployment: filtered by cluster and application, not by pool."""
    return _selector(f'{CLUSTER_LABEL}=~"$cluster"', 'application=~"$application"', *extra)


def router_sel(*extra: str) -> str:
    """Series of the routers and directories (they carry ``pool``, no ``application``)."""
    return _selector(f'{CLUSTER_LABEL}=~"$cluster"', f'{ROUTER_POOL_LABEL}=~"$pool"', *extra)


def node_sel(*extra: str) -> str:
    """Ray's node metrics: split by worker group (= pool) on Kubernetes, one node locally."""
    return _selector(f'{CLUSTER_LABEL}=~"$cluster"', *extra)


def _by(labels: tuple[str, ...]) -> str:
    return f"by ({', '.join(labels)}) " if labels else ""


def rate_sum(name: str, sel: str, *by: str) -> str:
    """Per-second rate of a CATALOG counter, summed over replicas, kept apart by ``by``."""
    return f"sum {_by(by)}(rate({metric(name)}{sel}[{RATE_WINDOW}]))"


def gauge(agg: str, name: str, sel: str, *by: str) -> str:
    """``agg`` (sum, avg, max) of a CATALOG gauge over replicas, kept apart by ``by``."""
    return f"{agg} {_by(by)}({metric(name)}{sel})"


def quantile(q: float, name: str, sel: str, *by: str) -> str:
    """The ``q`` quantile of a CATALOG histogram over all replicas of each ``by`` group."""
    buckets = f"rate({metric(name, '_bucket')}{sel}[{RATE_WINDOW}])"
    return f"histogram_quantile({q}, sum {_by(('le', *by))}({buckets}))"


def or_zero(expr: str, like: str) -> str:
    """``expr``, or 0 for each group of ``like`` that ``expr`` lacks.

    Ray creates a counter's series at its first increment, so "no failure yet" is a missing
    series, not a 0; a ratio over it would draw nothing instead of 0 %.
    """
    return f"({expr} or 0 * {like})"


def ratio(part: str, whole: str) -> str:
    """``part / whole`` with a missing ``part`` read as 0 (both grouped by the same labels)."""
    return f"{or_zero(part, whole)} / {whole}"


def share(part: str, other: str) -> str:
    """``part / (part + other)``, either side read as 0 where only the other exists."""
    p, o = or_zero(part, other), or_zero(other, part)
    return f"{p} / ({p} + {o})"

