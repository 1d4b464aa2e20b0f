"""Prometheus alerts of kvferry: what pages an operator, and what only warns.

The alerts read the recorded series of ``rules.py`` where the window matches (5m ratios) and
raw metrics where they must see a series disappear (replica health). Thresholds are module
constants so the docs (``docs/alerts.md``), the unit tests and the rules say the same thing.
Every alert carries ``severity`` (``critical`` pages, ``warning`` goes to a ticket queue) and
``summary``/``description``/``runbook_url`` annotations; the runbook is the alert's section of
``docs/alerts.md`` (GitHub's anchor of a heading is its lower-cased text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.observability.promql import SERVE_POOL_LABEL
from cluster.observability.rules import DEPLOYMENT_SELECTOR, POOL_BY, SERVE_HEALTHY, by

ALERT_GROUP = "kvferry.alerts"
# Where the runbooks live, relative to the repository root (a fork publishing its docs can
# regenerate the manifests with its own URL here).
RUNBOOK_BASE = "docs/alerts.md"

# Time to first token the p99 of a pool should stay under: 2 s is a common interactive-chat
# SLO for a full prefill of a few thousand tokens on one GPU (the embedded CPU default is far
# slower under load, which is what the alert is for).
TTFT_P99_SLO_SECONDS = 2.0
# A transfer failure costs a local recompute (latency, not an error): 1% of them is a broken
# link or a flapping prefill replica, not noise.
TRANSFER_FAILURE_RATIO = 0.01
# ...but only with some traffic: one failure among three transfers on an idle night is 33%.
MIN_TRANSFERS_5M = 20
# A pool is saturated when its running sequences (or its KV blocks) are above this share of
# capacity while requests queue.
SATURATION_RATIO = 0.9
# Share of a router's decisions made without the directory (it did not answer in time).
DIRECTORY_UNAVAILABLE_RATIO = 0.1
# Share of ingress answers that are the server's fault (5xx and streams failed after 200).
SERVER_ERROR_RATIO = 0.05
MIN_REQUESTS_5M = 20
# How long a pool that vanished (no health series at all) is remembered: a pool removed on
# purpose stops alerting after this long.
VANISHED_LOOKBACK = "1h"
# Who a vanished pool belonged to. Not ``ray_io_cluster``: a RayService upgrade replaces its
# RayCluster (a new name), and the old cluster's pools vanishing then is no outage. The
# Kubernetes namespace (added by the PodMonitors' scrape) survives the upgrade; locally it
# is absent and the application alone says.
STABLE_BY = ("namespace", "application", SERVE_POOL_LABEL)


@dataclass(frozen=True)
class AlertRule:
    """One ``alert:`` rule with its severity and annotations (templates use ``$labels``/``$value``)."""

    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}#{self.alert.lower()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": self.description, "runbook_url": self.runbook_url},
        }


def no_healthy_replica_expr() -> str:
    """A pool (or the ingress) with no healthy replica, including one whose series are all gone.

    Three ways a pool has no healthy replica: (1) its replicas report, all unhealthy (sum == 0);
    (2) Serve's autoscaler wants replicas but none reports at all (autoscaled pools keep a
    target series while the deployment exists; ``min_replicas`` is at least 1, so a target
    never means "scaled to zero on purpose"); (3) the pool reported within the lookback and
    reports nothing now (a fixed-size pool whose replicas, or whose whole Ray head, died).
    (2) and (3) look for missing series per ``STABLE_BY``, so an upgrade's new RayCluster
    counts as the same pool; with equal labels, ``or`` keeps one alert where both hold.
    Each branch is 0-valued so ``$value`` reads as "healthy replicas".
    """
    healthy = f"{SERVE_HEALTHY}{{{DEPLOYMENT_SELECTOR}}}"
    present = f"count {by(STABLE_BY)} ({healthy})"
    on = f"on ({', '.join(STABLE_BY)})"
    return "\n".join([
        f"(sum {by(POOL_BY)} ({healthy}) == 0)",
        f"or (max {by(STABLE_BY)} (ray_serve_autoscaling_target_replicas{{{DEPLOYMENT_SELECTOR}}}) * 0",
        f"    unless {on} {present})",
        f"or (count {by(STABLE_BY)} (max_over_time({healthy}[{VANISHED_LOOKBACK}])) * 0",
        f"    unless {on} {present})",
    ])


def _availability() -> list[AlertRule]:
    return [
        AlertRule(
            "KvferryPoolNoHealthyReplica", no_healthy_replica_expr(), "2m", "critical",
            "kvferry {{ $labels.deployment }} has no healthy replica",
            "Deployment {{ $labels.deployment }} of application {{ $labels.application }} has had no healthy "
            "replica for 2 minutes: requests for it fail or queue.",
        ),
        AlertRule(
            "KvferryIngressAbsent", f'absent({SERVE_HEALTHY}{{deployment="ingress"}})', "15m", "critical",
            "kvferry's ingress exports no health metrics",
            "No kvferry ingress replica has been seen for 15 minutes: kvferry is not running, or "
            "Prometheus cannot scrape Ray's metrics port.",
        ),
        AlertRule(
            "KvferryPoolBelowTarget",
            f"max {by(POOL_BY)} (ray_serve_autoscaling_target_replicas{{{DEPLOYMENT_SELECTOR}}})\n"
            f"> sum {by(POOL_BY)} ({SERVE_HEALTHY}{{{DEPLOYMENT_SELECTOR}}})",
            "15m", "warning",
            "kvferry pool {{ $labels.deployment }} is below its autoscaling target",
            "Serve wants {{ $value }} replicas of {{ $labels.deployment }} ({{ $labels.application }}) and "
            "fewer have been healthy for 15 minutes: the cluster may lack nodes or GPUs for the pool.",
        ),
    ]


def _performance() -> list[AlertRule]:
    ratio = f"{SATURATION_RATIO:g}"
    return [
        AlertRule(
            "KvferryPoolSaturated",
            f"((kvferry_pool:utilisation:ratio > {ratio}) or (kvferry_pool:kv_usage:avg > {ratio}))\n"
            "and (kvferry_pool:num_waiting:sum > 0)",
            "5m", "warning",
            "kvferry pool {{ $labels.deployment }} is saturated",
            "Pool {{ $labels.deployment }} ({{ $labels.application }}) has run at {{ $value | humanizePercentage }} "
            "of its sequence or KV capacity with requests waiting for 5 minutes.",
        ),
        AlertRule(
            "KvferryTTFTOverSLO", f"kvferry_pool:ttft_seconds:p99_5m > {TTFT_P99_SLO_SECONDS:g}", "10m", "warning",
            "kvferry pool {{ $labels.deployment }}: TTFT p99 over the SLO",
            f"Time to first token p99 of {{{{ $labels.deployment }}}} is {{{{ $value | humanizeDuration }}}}, over "
            f"the {TTFT_P99_SLO_SECONDS:g}s SLO for 10 minutes.",
        ),
    ]


def _transfer_and_routing() -> list[AlertRule]:
    return [
        AlertRule(
            "KvferryKVTransferFailures",
            f"kvferry_pool_backend:kv_transfer_failure:ratio_rate5m > {TRANSFER_FAILURE_RATIO:g}\n"
            f"and (kvferry_pool_backend:kv_transfer_attempts:rate5m * 300) >= {MIN_TRANSFERS_5M}",
            "5m", "warning",
            "kvferry KV transfers failing ({{ $labels.backend }})",
            "{{ $value | humanizePercentage }} of KV transfers to {{ $labels.deployment }} over "
            "{{ $labels.backend }} failed in the last 5 minutes; those prompts were recomputed locally.",
        ),
        AlertRule(
            "KvferryPrefillPoolUnavailable",
            'kvferry_pool_reason:local_recomputes:rate5m{reason="pool_unavailable"} > 0',
            "10m", "warning",
            "kvferry {{ $labels.deployment }} prefills locally: prefill pool unavailable",
            "{{ $labels.deployment }} replicas could not reach the prefill pool for 10 minutes and prefill "
            "prompts themselves ({{ $value | humanize }}/s): TTFT and decode throughput suffer.",
        ),
        AlertRule(
            "KvferryDirectoryUnavailable",
            'kvferry_router_reason:routing_decisions:ratio_rate5m{reason="directory_unavailable"}'
            f" > {DIRECTORY_UNAVAILABLE_RATIO:g}",
            "5m", "warning",
            "kvferry {{ $labels.pool }} router cannot reach the KV directory",
            "{{ $value | humanizePercentage }} of the {{ $labels.pool }} router's decisions fell back to "
            "power-of-two choices because the KV directory did not answer: cache affinity is lost.",
        ),
    ]


def _ingress() -> list[AlertRule]:
    return [
        AlertRule(
            "KvferryIngressServerErrors",
            f"kvferry_ingress:api_server_errors:ratio_rate5m > {SERVER_ERROR_RATIO:g}\n"
            f"and (kvferry_ingress:api_requests:rate5m * 300) >= {MIN_REQUESTS_5M}",
            "5m", "critical",
            "kvferry answers server errors",
            "{{ $value | humanizePercentage }} of the API answers of {{ $labels.application }} in the last "
            "5 minutes were server errors (5xx or failed streams).",
        ),
    ]


def alerting_rules() -> list[AlertRule]:
    """Every alert, in the order of ``docs/alerts.md``."""
    return _availability() + _performance() + _transfer_and_routing() + _ingress()
