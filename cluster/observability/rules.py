"""Prometheus recording rules of kvferry, per pool, generated from the metrics CATALOG.

Every expression is built here from ``promql.metric`` (a name the replicas do not export
fails at import time in a unit test) and aggregated so that it keeps

- the pool: ``deployment`` for replica and Serve metrics, ``pool`` for router metrics;
- ``application`` (Serve metrics carry it; two kvferry apps on one Ray cluster stay apart);
- ``ray_io_cluster``, the label the PodMonitors add on Kubernetes, so one Prometheus can watch
  several kvferry clusters. Locally it does not exist and ``by`` simply ignores it.

Names follow Prometheus' ``level:metric:operations`` convention: ``kvferry_pool:`` rules
are aggregated per pool, ``kvferry_pool_backend:`` per pool and KV transport backend,
``kvferry_router_reason:`` per router pool and routing reason, ``kvferry_ingress:`` per
application at the front door. Windows: 1m for what dashboards draw (quantiles, per-second
rates), 5m for the ratios alerts fire on (one slow minute should not page).

Every recording rule reads raw metrics only (never another recorded series), so each
``expr`` can also be evaluated on its own through Prometheus' HTTP API. The alerts
(``alerts.py``) read the recorded series; ``render.rule_file()`` puts both in one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.observability.promql import CLUSTER_LABEL, POOLS, ROUTER_POOL_LABEL, SERVE_POOL_LABEL, metric

# Aggregation labels by the kind of series (see the module docstring).
POOL_BY = (CLUSTER_LABEL, "application", SERVE_POOL_LABEL)
BACKEND_BY = POOL_BY + ("backend",)
ROUTER_BY = (CLUSTER_LABEL, ROUTER_POOL_LABEL)
INGRESS_BY = (CLUSTER_LABEL, "application")
# Serve deployments whose health matters: the pools and the front door.
DEPLOYMENTS = POOLS + ("ingress",)
DEPLOYMENT_SELECTOR = f'{SERVE_POOL_LABEL}=~"{"|".join(DEPLOYMENTS)}"'
# Ray Serve's own health gauge: 1 per healthy replica (0 while a health check fails).
SERVE_HEALTHY = "ray_serve_deployment_replica_healthy"


@dataclass(frozen=True)
class RecordingRule:
    """One ``record:`` rule: the new series' name and the PromQL that computes it."""

    record: str
    expr: str
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


def by(labels: tuple[str, ...]) -> str:
    return f"by ({', '.join(labels)})"


def sum_rate(name: str, window: str, labels: tuple[str, ...], selector: str = "") -> str:
    """``sum by (labels) (rate(ray_<name>{selector}[window]))``."""
    sel = f"{{{selector}}}" if selector else ""
    return f"sum {by(labels)} (rate({metric(name)}{sel}[{window}]))"


def quantile(q: float, name: str, window: str, labels: tuple[str, ...]) -> str:
    """The ``q`` quantile of a catalogue histogram over ``window``, per ``labels``."""
    return (f"histogram_quantile({q}, sum {by(('le',) + labels)} "
            f"(rate({metric(name, '_bucket')}[{window}])))")


def or_zero(expr: str, other: str) -> str:
    """``expr``, or 0 where only ``other`` has a series.

    Ray exports a counter only after its first increment: a pool whose transfers never failed
    has no failure series at all, and one whose transfers all failed has no success series.
    Without this, ``failures / (successes + failures)`` would be empty in both cases, and the
    second one is exactly when the failure alert must fire.
    """
    return f"({expr}\n or {other} * 0)"


def _latency() -> list[RecordingRule]:
    """TTFT and per-request TPOT p50/p99 per pool (1m for dashboards, 5m for the SLO alert)."""
    rules = []
    for name, short in (("kvferry_ttft_seconds", "ttft_seconds"), ("kvferry_request_tpot_seconds", "tpot_seconds")):
        for q, tag in ((0.5, "p50"), (0.99, "p99")):
            rules.append(RecordingRule(f"kvferry_pool:{short}:{tag}_1m", quantile(q, name, "1m", POOL_BY)))
    p99_5m = quantile(0.99, "kvferry_ttft_seconds", "5m", POOL_BY)
    rules.append(RecordingRule("kvferry_pool:ttft_seconds:p99_5m", p99_5m))
    return rules


def _throughput() -> list[RecordingRule]:
    """Tokens per second in and out, cached tokens per second and the prefix-cache hit ratio."""
    hits = sum_rate("kvferry_prefix_cache_hits_total", "5m", POOL_BY)
    queries = sum_rate("kvferry_prefix_cache_queries_total", "5m", POOL_BY)
    return [
        RecordingRule("kvferry_pool:prompt_tokens:rate1m", sum_rate("kvferry_prompt_tokens_total", "1m", POOL_BY)),
        RecordingRule("kvferry_pool:generation_tokens:rate1m",
                      sum_rate("kvferry_generation_tokens_total", "1m", POOL_BY)),
        RecordingRule("kvferry_pool:prefix_cache_hits:rate1m",
                      sum_rate("kvferry_prefix_cache_hits_total", "1m", POOL_BY)),
        # Token counters (vLLM's definition): the share of looked-up prompt tokens that were
        # cached. A hit counter that never moved is 0, not missing.
        RecordingRule("kvferry_pool:prefix_cache_hit:ratio_rate5m", f"{or_zero(hits, queries)}\n/ {queries}"),
    ]


def _capacity() -> list[RecordingRule]:
    """KV usage, queues and running-sequence utilisation per pool (gauges: no window)."""

    def agg(op: str, name: str) -> str:
        return f"{op} {by(POOL_BY)} ({metric(name)})"

    return [
        RecordingRule("kvferry_pool:kv_usage:avg", agg("avg", "kvferry_kv_usage")),
        RecordingRule("kvferry_pool:kv_usage:max", agg("max", "kvferry_kv_usage")),
        RecordingRule("kvferry_pool:num_waiting:sum", agg("sum", "kvferry_num_waiting")),
        RecordingRule("kvferry_pool:queued_prefill_tokens:sum", agg("sum", "kvferry_queued_prefill_tokens")),
        RecordingRule("kvferry_pool:num_running:sum", agg("sum", "kvferry_num_running")),
        # Sequences running over the sequences the pool could run at once.
        RecordingRule("kvferry_pool:utilisation:ratio",
                      f"{agg('sum', 'kvferry_num_running')}\n/ {agg('sum', 'kvferry_max_num_seqs')}"),
        RecordingRule("kvferry_pool:healthy_replicas:sum",
                      f"sum {by(POOL_BY)} ({SERVE_HEALTHY}{{{DEPLOYMENT_SELECTOR}}})"),
    ]


def transfer_attempts(window: str) -> str:
    """Remote prefills tried per second per pool and backend: landed plus failed."""
    ok = sum_rate("kvferry_remote_prefills_total", window, BACKEND_BY)
    failed = sum_rate("kvferry_kv_transfer_failures_total", window, BACKEND_BY)
    return f"{or_zero(ok, failed)}\n+ {or_zero(failed, ok)}"


def _transfer() -> list[RecordingRule]:
    """KV transfer volume, latency, failure ratio and local recomputes (decode replicas record them)."""
    failed = sum_rate("kvferry_kv_transfer_failures_total", "5m", BACKEND_BY)
    ok = sum_rate("kvferry_remote_prefills_total", "5m", BACKEND_BY)
    rules = [
        RecordingRule("kvferry_pool_backend:kv_transfer_bytes:rate1m",
                      sum_rate("kvferry_kv_transfer_bytes_total", "1m", BACKEND_BY)),
        RecordingRule("kvferry_pool_backend:kv_transfers:rate1m",
                      sum_rate("kvferry_remote_prefills_total", "1m", BACKEND_BY)),
        RecordingRule("kvferry_pool_backend:kv_transfer_attempts:rate5m", transfer_attempts("5m")),
        # failures / (remote prefills + failures): the share of transfers that fell back.
        RecordingRule("kvferry_pool_backend:kv_transfer_failure:ratio_rate5m",
                      f"{or_zero(failed, ok)}\n/ (\n{transfer_attempts('5m')}\n)"),
        RecordingRule("kvferry_pool_reason:local_recomputes:rate5m",
                      sum_rate("kvferry_local_recomputes_total", "5m", POOL_BY + ("reason",))),
    ]
    for q, tag in ((0.5, "p50"), (0.99, "p99")):
        rules.append(RecordingRule(f"kvferry_pool_backend:kv_transfer_seconds:{tag}_1m",
                                   quantile(q, "kvferry_kv_transfer_seconds", "1m", BACKEND_BY)))
    return rules


def _routing() -> list[RecordingRule]:
    """Routing decisions per router pool and reason, and each reason's share of them."""
    per_reason = sum_rate("kvferry_routing_decisions_total", "5m", ROUTER_BY + ("reason",))
    total = sum_rate("kvferry_routing_decisions_total", "5m", ROUTER_BY)
    return [
        RecordingRule("kvferry_router_reason:routing_decisions:rate1m",
                      sum_rate("kvferry_routing_decisions_total", "1m", ROUTER_BY + ("reason",))),
        RecordingRule("kvferry_router_reason:routing_decisions:ratio_rate5m",
                      f"{per_reason}\n/ ignoring (reason) group_left\n{total}"),
    ]


def server_errors(window: str) -> str:
    """Ingress answers per second that are the server's fault.

    5xx answers, plus streams that failed after their 200 went out (the ingress counts those
    as ``status="200"`` with the error's code). 4xx are the client's and not counted.
    """
    name = metric("kvferry_api_requests_total")
    return (f"sum {by(INGRESS_BY)} (rate({name}{{status=~\"5..\"}}[{window}]) "
            f"or rate({name}{{status=~\"2..\", code!=\"ok\"}}[{window}]))")


def _ingress() -> list[RecordingRule]:
    """Request rate (total and by status and code) and the server-error ratio at the front door."""
    total5 = sum_rate("kvferry_api_requests_total", "5m", INGRESS_BY)
    return [
        RecordingRule("kvferry_ingress:api_requests:rate1m", sum_rate("kvferry_api_requests_total", "1m", INGRESS_BY)),
        RecordingRule("kvferry_ingress:api_requests:rate5m", total5),
        RecordingRule("kvferry_ingress_code:api_requests:rate1m",
                      sum_rate("kvferry_api_requests_total", "1m", INGRESS_BY + ("status", "code"))),
        RecordingRule("kvferry_ingress:api_server_errors:ratio_rate5m",
                      f"{or_zero(server_errors('5m'), total5)}\n/ {total5}"),
    ]


# Rule groups: Prometheus evaluates the rules of a group in order and the groups in parallel.
RECORDING_GROUPS = {
    "kvferry.pool.rules": (_latency, _throughput, _capacity),
    "kvferry.transfer.rules": (_transfer,),
    "kvferry.router.rules": (_routing,),
    "kvferry.ingress.rules": (_ingress,),
}


def recording_rule_groups() -> dict[str, list[RecordingRule]]:
    """Every recording rule, by group name."""
    return {name: [r for make in makers for r in make()] for name, makers in RECORDING_GROUPS.items()}


def recording_rules() -> list[tuple[str, str]]:
    """Every recording rule as ``(record, expr)``, in evaluation order."""
    return [(r.record, r.expr) for rules in recording_rule_groups().values() for r in rules]
