"""Every dashboard panel and every recording rule, evaluated by a real Prometheus scraping a
real ``kvferry serve`` (the embedded default model), must return data for the pools that exist.

A query that returns nothing is a broken panel: a misspelt metric, a label that is not
there, a pool filter that matches nothing. The server (``default_server`` in this folder's
conftest) joins the session's Ray cluster, so this test can inject one KV-transfer failure
through a Serve handle; Prometheus (Debian's package) scrapes that cluster's metrics export
port every second and loads kvferry's rules.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import httpx
import pytest
import yaml

from cluster.observability.local_prometheus import LocalPrometheus, Sample
from tests.deploy import live_traffic

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Processes report what they recorded to Ray's exporter every 2 s in tests (the session
# cluster's metrics_report_interval_ms, tests/conftest.py); wait a bit more than twice that.
RAY_EXPORT_S = 5.0
POOL_LABELS = ("deployment", "pool", "ray_io_group")
SERVING_POOLS = {"prefill", "decode", "mixed"}


@pytest.fixture(scope="module")
def live(default_server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import ray
    from ray import serve

    work = tmp_path_factory.mktemp("live-prometheus")
    url = default_server.url
    node = next(n for n in ray.nodes() if n["Alive"])
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump(_rule_file()))
    with LocalPrometheus([target], work / "prom", rule_files=[rules]) as prom:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        decode = serve.get_deployment_handle("decode", app_name="kvferry")
        live_traffic.warm_up(url, model)
        time.sleep(RAY_EXPORT_S)  # every series exists before the measured traffic: rates > 0
        sent = live_traffic.traffic(url, model, lambda: decode.inject_transfer_failures.remote(1).result())
        live_traffic.let_blocks_expire(url, model, default_server.ttl_s)
        time.sleep(RAY_EXPORT_S)
        prom.wait_for_scrapes(target, 2)
        time.sleep(prom.scrape_interval_s + 1)  # one rule evaluation after the last scrape
        yield {"prom": prom, "sent": sent, "url": url}


def _rule_file() -> dict:
    from cluster.observability.render import rule_file

    return rule_file()


def _pool_values(samples: list[Sample]) -> set[str]:
    return {s.labels[k] for s in samples for k in POOL_LABELS if s.labels.get(k) in SERVING_POOLS}


def _has_label(prom: LocalPrometheus, label: str) -> bool:
    return bool(prom.query(f'count({{{label}!=""}})'))


def _pools_exporting(prom: LocalPrometheus, expr: str) -> set[str]:
    """Serving pools that export any metric ``expr`` reads (the pools its answer must cover)."""
    pools: set[str] = set()
    for name in set(re.findall(r"\bray_[a-z_]+\b", expr)):
        for label in POOL_LABELS:
            # Only this server's series: earlier tests' apps on the same Ray cluster leave
            # theirs (a colocated app's `mixed` pool, say). Router metrics carry no application.
            pools |= _pool_values(prom.query(f'count by ({label}) ({name}{{application=~"kvferry|"}})'))
    return pools


def _check(prom: LocalPrometheus, what: str, expr: str, pool_label: str | None = None) -> str | None:
    """None if ``expr`` returns real data for every pool that exports its metrics, else why not."""
    samples = prom.query(expr)
    if not samples:
        return f"{what}: no data for {expr}"
    if all(math.isnan(s.value) for s in samples):
        return f"{what}: only NaN for {expr}"
    got = _pool_values(samples)
    # ray_io_group exists only on KubeRay pods (the PodMonitors add it); locally it is absent.
    if pool_label is not None and not got and not (pool_label == "ray_io_group" and not _has_label(prom, pool_label)):
        return f"{what}: the answer should be split by {pool_label} but has no pool label: {samples[0].labels}"
    if got:  # the answer is split by pool: every pool that has the inputs must be there
        missing = _pools_exporting(prom, expr) - got
        if missing:
            return f"{what}: no series for pools {sorted(missing)} in {expr}"
    return None


def test_every_recording_rule_returns_data(live) -> None:
    from cluster.observability.rules import recording_rules

    prom = live["prom"]
    rules = recording_rules()
    assert len(rules) >= 20, f"only {len(rules)} recording rules"
    problems = [p for record, expr in rules if (p := _check(prom, f"rule {record}", expr))]
    # Prometheus itself evaluated and stored each rule (the file loaded, the rule is healthy).
    stored = [record for record, _ in rules if not prom.query(record)]
    assert not problems, "\n".join(problems)
    assert not stored, f"Prometheus stored nothing for {stored}"


def test_every_dashboard_panel_returns_data(live) -> None:
    from cluster.observability.dashboards import panel_queries, render_query

    prom = live["prom"]
    problems, checked = [], 0
    for q in panel_queries():
        if q.requires == "gpu":
            continue  # reads GPU metrics; this box has no GPU (every other condition is produced above)
        checked += 1
        where = f"{q.dashboard_uid}/{q.panel_title}/{q.ref_id}"
        if problem := _check(prom, where, render_query(q.expr, {"application": "kvferry"}), q.pool_label):
            problems.append(problem)
    assert checked >= 30, f"only {checked} panel queries: the dashboards lost panels"
    assert not problems, "\n".join(problems) + f"\ntargets: {prom.target_health()}"


def test_every_template_variable_has_values(live) -> None:
    """Grafana fills the drop-downs from these label queries; locally the cluster label is
    absent (its 'All' regex matches that), the others must list what is running."""
    from cluster.observability.dashboards import VARIABLE_QUERIES, render_query

    prom = live["prom"]
    for var in VARIABLE_QUERIES:
        values = prom.label_values(var.label, render_query(var.match, {"application": "kvferry"}))
        if var.label == "ray_io_cluster":
            continue
        assert values, f"variable {var.name}: no values of {var.label} for {var.match}"
    pools = prom.label_values("deployment", "ray_kvferry_kv_usage")
    assert {"prefill", "decode"} <= set(pools)


def test_the_traffic_is_what_the_metrics_say(live) -> None:
    """A few panels' numbers against what the test itself sent."""
    prom, sent = live["prom"], live["sent"]
    failures = prom.query('sum(ray_kvferry_local_recomputes_total{reason="transfer_failed"})')
    assert failures and failures[0].value >= sent["failed_transfer"], f"{failures}; targets: {prom.target_health()}"
    hits = prom.query('sum(ray_kvferry_prefix_cache_hits_total{deployment="decode"})')
    assert hits and hits[0].value > 0, "cached prompts produced no prefix-cache hits"
    for kind in ("read", "written"):  # the ingress's per-surface account of the same traffic
        tokens = prom.query(f'sum(ray_kvferry_prompt_cache_{kind}_tokens_total{{surface="openai"}})')
        assert tokens and tokens[0].value > 0, f"no prompt-cache tokens {kind} counted for the openai surface"
    errors = prom.query('sum(ray_kvferry_api_requests_total{code="model_not_found"})')
    assert errors and errors[0].value >= sent["api_errors"]
    ttl = prom.query('sum(ray_kvferry_kv_block_evictions_total{reason="ttl"})')
    assert ttl and ttl[0].value > 0, "no block expired at its TTL"
