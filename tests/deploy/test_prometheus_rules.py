"""kvferry's Prometheus objects: committed = generated, valid for promtool, behaving as meant.

``promtool`` comes from Debian's ``prometheus`` package (``make tools`` installs it); without
it these tests fail, they do not skip: a rule file nobody checked is how alerts rot.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.metrics import CATALOG, LOCAL_RECOMPUTE_REASONS, REPLICA_CATALOG
from cluster.observability.alerts import alerting_rules
from cluster.observability.podmonitors import pod_monitors
from cluster.observability.promql import metric
from cluster.observability.render import FILES, REGENERATE, render_monitoring, write_monitoring, write_rule_file
from cluster.observability.rules import recording_rules
from router.metrics import ROUTER_CATALOG, ROUTING_REASONS

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "base" / "monitoring"
PROMTOOL_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))

# Labels every series gets on top of its own: Serve's for replica metrics, and on Kubernetes
# the PodMonitors' relabelings and the operator's target labels (namespace, pod, ...).
K8S_LABELS = {"ray_io_cluster", "ray_io_group", "namespace"}
SERVE_LABELS = {"application", "deployment", "replica"} | K8S_LABELS
ROUTER_LABELS = K8S_LABELS
# Ray Serve's own metrics the rules read, with the labels Serve gives them.
RAY_METRICS = {
    "ray_serve_deployment_replica_healthy": {"application", "deployment", "replica"} | K8S_LABELS,
    "ray_serve_autoscaling_target_replicas": {"application", "deployment"} | K8S_LABELS,
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make tools` (installs Debian's prometheus package) or "
                    "`apt-get install prometheus`")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def rule_path(tmp_path: Path) -> Path:
    return write_rule_file(tmp_path / "kvferry.rules.yaml")


def all_exprs() -> dict[str, str]:
    """Rule name -> PromQL of every recording rule and alert."""
    return {**dict(recording_rules()), **{a.alert: a.expr for a in alerting_rules()}}


# --- committed files ------------------------------------------------------------------

def test_committed_monitoring_manifests_match_the_generator() -> None:
    expected = render_monitoring()
    committed = {p.name: p.read_text() for p in MONITORING.glob("*.yaml")}
    assert set(committed) == set(FILES), f"k8s/base/monitoring holds {sorted(committed)}; regenerate: {REGENERATE}"
    stale = [name for name, text in expected.items() if committed[name] != text]
    assert stale == [], f"{stale} drifted from cluster/observability/: regenerate with `{REGENERATE}`"


def test_the_module_command_writes_the_same_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "cluster.observability.render", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == render_monitoring()
    assert sorted(p.name for p in write_monitoring(tmp_path / "again")) == sorted(FILES)


def test_the_prometheusrule_wraps_the_same_groups_as_the_rule_file(rule_path: Path) -> None:
    docs = list(yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["PrometheusRule"]
    assert docs[0]["apiVersion"] == "monitoring.coreos.com/v1"
    assert docs[0]["metadata"]["labels"]["release"]
    assert docs[0]["spec"]["groups"] == yaml.safe_load(rule_path.read_text())["groups"]


# --- promtool -------------------------------------------------------------------------

def test_promtool_checks_the_rules(rule_path: Path) -> None:
    out = run_promtool("check", "rules", str(rule_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(all_exprs())} rules found" in out.stdout


@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(test_file: Path, rule_path: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load(test_file.read_text())
    spec["rule_files"] = [str(rule_path)]
    runnable = tmp_path / test_file.name
    runnable.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_promtool("test", "rules", str(runnable))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_has_a_promtool_test() -> None:
    assert len(PROMTOOL_TESTS) >= 2
    tested_exprs, fired, quiet = set(), set(), set()
    for path in PROMTOOL_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            tested_exprs |= {re.split(r"[{\s]", t["expr"])[0] for t in group.get("promql_expr_test", [])}
            for t in group.get("alert_rule_test", []):
                (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    assert {r for r, _ in recording_rules()} - tested_exprs == set(), "recording rules without an exact-value test"
    alerts = {a.alert for a in alerting_rules()}
    assert alerts - fired == set(), "alerts never seen firing"
    assert alerts - quiet == set(), "alerts never seen staying quiet"


# --- names and labels -----------------------------------------------------------------

_AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", s)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group() in _AGGREGATIONS | _KEYWORDS:
            continue  # a function call, an aggregation or a keyword
        names.add(m.group())
    return names


def scraped_catalog() -> dict[str, set[str]]:
    """Every scraped name of the CATALOG -> the labels its series carry."""
    out: dict[str, set[str]] = {}
    for spec in CATALOG:
        base = set(spec.labels) | (ROUTER_LABELS if spec in ROUTER_CATALOG else SERVE_LABELS)
        if spec.kind == "histogram":
            out[metric(spec.name, "_bucket")] = base | {"le"}
            out[metric(spec.name, "_sum")] = out[metric(spec.name, "_count")] = base
        else:
            out[metric(spec.name)] = base
    return out


def test_the_name_parser_finds_names() -> None:
    expr = 'sum by (le, deployment) (rate(a_b{x="sum(y)"}[5m])) / ignoring (reason) group_left max(c:d:e) > 0.5'
    assert metric_names(expr) == {"a_b", "c:d:e"}


def test_every_metric_in_every_rule_is_exported_or_recorded() -> None:
    recorded = {r for r, _ in recording_rules()}
    known = set(scraped_catalog()) | set(RAY_METRICS)
    used: set[str] = set()
    unknown = {}
    for name, expr in all_exprs().items():
        names = metric_names(expr)
        used |= names
        if bad := names - known - recorded:
            unknown[name] = sorted(bad)
    assert unknown == {}
    assert len(used & set(scraped_catalog())) >= 15, "the parser found too few catalogue names"
    for name, expr in recording_rules():
        assert not metric_names(expr) & recorded, f"{name} reads a recorded series: it must stand alone"


def test_rules_group_and_select_only_labels_their_metrics_have() -> None:
    labels_of = scraped_catalog() | RAY_METRICS
    problems = []
    for name, expr in all_exprs().items():
        raw = metric_names(expr) & set(labels_of)
        if not raw:
            continue  # an alert over recorded series; their labels are tested through promtool
        have = set.intersection(*(labels_of[n] for n in raw))
        grouped = {lbl.strip() for lst in re.findall(r"\bby \(([^)]*)\)", expr) for lbl in lst.split(",")}
        selected = {m for n in raw for m in re.findall(rf"{n}\{{([^}}]*)\}}", expr)}
        selected_labels = {lbl for sel in selected for lbl in re.findall(r"(\w+)\s*[=!]~?", sel)}
        if missing := (grouped | selected_labels) - have:
            problems.append(f"{name}: {sorted(missing)}")
    assert problems == []


def test_label_values_in_rules_are_ones_kvferry_emits() -> None:
    reasons = {v for expr in all_exprs().values() for v in re.findall(r'reason="([^"]+)"', expr)}
    assert reasons and reasons <= set(LOCAL_RECOMPUTE_REASONS) | set(ROUTING_REASONS)
    pools = {v for expr in all_exprs().values() for v in re.findall(r'deployment=~"([^"]+)"', expr)}
    assert pools == {"prefill|decode|mixed|ingress"}


def test_a_metric_outside_the_catalog_is_refused() -> None:
    assert metric("kvferry_ttft_seconds", "_bucket") == "ray_kvferry_ttft_seconds_bucket"
    with pytest.raises(KeyError):
        metric("kvferry_time_to_first_token_seconds")
    assert any(s.name == "kvferry_kv_usage" for s in REPLICA_CATALOG)


# --- alerts ---------------------------------------------------------------------------

def test_every_alert_has_severity_for_annotations_and_a_runbook_section() -> None:
    docs = (ROOT / "docs" / "alerts.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", docs, re.M)}
    for alert in alerting_rules():
        rule = alert.to_dict()
        assert rule["labels"]["severity"] in ("critical", "warning"), alert.alert
        assert re.fullmatch(r"\d+[mh]", rule["for"]), alert.alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert.alert
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/alerts.md#") and url.split("#", 1)[1] in anchors, url


# --- PodMonitors ----------------------------------------------------------------------

def test_podmonitors_scrape_head_and_workers_with_pool_labels() -> None:
    docs = list(yaml.safe_load_all((MONITORING / "podmonitors.yaml").read_text()))
    assert docs == pod_monitors()
    assert {d["kind"] for d in docs} == {"PodMonitor"}
    assert {d["apiVersion"] for d in docs} == {"monitoring.coreos.com/v1"}
    selected = sorted(d["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for d in docs)
    assert selected == ["head", "worker"]
    for d in docs:
        assert d["metadata"]["labels"]["release"], "kube-prometheus-stack selects monitors by release"
        endpoints = d["spec"]["podMetricsEndpoints"]
        assert endpoints[0]["port"] == "metrics"  # Ray's metrics export, on every node
        for endpoint in endpoints:
            relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
            assert relabel == {
                "ray_io_cluster": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                "ray_io_group": ["__meta_kubernetes_pod_label_ray_io_group"],
            }
    head, worker = sorted(docs, key=lambda d: d["metadata"]["name"])
    assert [e["port"] for e in worker["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert [e["port"] for e in head["spec"]["podMetricsEndpoints"]] == ["metrics", "as-metrics", "dash-metrics"]


def test_the_kustomization_lists_the_monitoring_objects() -> None:
    k = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == ["podmonitors.yaml", "prometheusrule.yaml"]
    assert all((MONITORING / r).exists() for r in k["resources"])
