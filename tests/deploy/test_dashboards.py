"""The Grafana dashboards: committed files in step with the code, complete panels, real PromQL.

Every query is held to kvferry's metrics CATALOG (plus a short list of Ray's own names),
parsed by Prometheus' own parser (promtool), and the tricky idioms (a ratio whose numerator
does not exist yet, a target that Serve does not export for a fixed pool) are evaluated by
promtool's rule unit tests on synthetic series. The live test runs them on real data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from cluster.metrics import CATALOG
from cluster.observability.dashboards import (
    CONDITIONS, DEFAULT_VARIABLES, VARIABLE_QUERIES, dashboards, panel_queries, render_query,
)
from cluster.observability.dashboards.exprs import RAY_METRICS
from cluster.observability.dashboards.files import SIDECAR_LABEL, export_files
from cluster.observability.promql import metric

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "k8s" / "base" / "dashboards"
REGENERATE = "kvferry dashboards export --out k8s/base/dashboards"
UIDS = ("kvferry-pools", "kvferry-prompt-cache", "kvferry-kv-transfer")
_SELECTED = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")  # a metric name, then its selector
_RAY_WORD = re.compile(r"\b(ray_[a-zA-Z0-9_:]+)")
_LABELS = {"ray_io_cluster", "ray_io_group"}  # labels the PodMonitors add, not metrics


def _panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in model["panels"] if p["type"] != "row"]


def _allowed_names() -> set[str]:
    names = set(RAY_METRICS)
    for spec in CATALOG:
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
        names |= {metric(spec.name, s) for s in suffixes}
    return names


def _names(expr: str) -> set[str]:
    return set(_SELECTED.findall(expr))


def test_export_writes_exactly_the_committed_files(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["dashboards", "export", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    fresh = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {str(p.relative_to(COMMITTED)): p.read_text() for p in COMMITTED.rglob("*") if p.is_file()}
    assert fresh == export_files(dashboards())
    assert sorted(committed) == sorted(fresh), f"k8s/base/dashboards has other files; run `{REGENERATE}`"
    stale = sorted(k for k in fresh if committed[k] != fresh[k])
    assert stale == [], f"{stale} drifted from the code; run `{REGENERATE}` and commit"


def test_configmaps_carry_each_dashboard_for_the_grafana_sidecar() -> None:
    files = export_files(dashboards())
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == [f"{uid}.yaml" for uid in UIDS]
    for uid, model in dashboards().items():
        cm = yaml.safe_load(files[f"{uid}.yaml"])
        assert cm["kind"] == "ConfigMap" and cm["apiVersion"] == "v1"
        assert cm["metadata"]["labels"].items() >= SIDECAR_LABEL.items()
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # a string: the sidecar matches text
        (key, text), = cm["data"].items()
        assert key == f"{uid}.json" and json.loads(text) == model
        assert json.loads(files[f"json/{uid}.json"]) == model
        # `kubectl apply` keeps a copy in an annotation, which may not exceed 256 KiB.
        assert len(text.encode()) < 200_000


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_the_committed_folder() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(COMMITTED)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["metadata"]["name"] for d in docs) == sorted(f"{uid}-dashboard" for uid in UIDS)


def test_three_boards_with_stable_uids_titles_and_tags() -> None:
    models = dashboards()
    assert tuple(models) == UIDS
    for uid, model in models.items():
        assert model["uid"] == uid and model["title"].startswith("kvferry / ") and "kvferry" in model["tags"]
        assert "id" not in model  # an id would pin the dashboard to one Grafana's database
        ids = [p["id"] for p in model["panels"]]
        assert len(set(ids)) == len(ids) and 0 not in ids
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in model["panels"])
        titles = [p["title"] for p in _panels(model)]
        assert len(set(titles)) == len(titles), "two panels of one board share a title"
        assert model["annotations"]["list"][0]["builtIn"] == 1


def test_each_board_has_the_four_variables() -> None:
    for model in dashboards().values():
        var = {v["name"]: v for v in model["templating"]["list"]}
        assert list(var) == ["datasource", "cluster", "application", "pool"]
        assert var["datasource"]["type"] == "datasource" and var["datasource"]["query"] == "prometheus"
        for name in ("cluster", "application", "pool"):
            v = var[name]
            assert v["type"] == "query" and v["includeAll"] and v["multi"]
            assert v["datasource"]["uid"] == "${datasource}"
            assert v["allValue"] == DEFAULT_VARIABLES[name]
            assert v["current"]["value"] == "$__all"
        assert "ray_io_cluster" in var["cluster"]["query"]
        for v in VARIABLE_QUERIES:  # what the live test asks Prometheus is what Grafana asks
            assert var[v.name]["query"] == var[v.name]["definition"] == v.grafana_query
        assert var["pool"]["allValue"] == "prefill|decode|mixed"
        assert re.fullmatch(var["pool"]["regex"].strip("/"), "decode")
        assert not re.fullmatch(var["pool"]["regex"].strip("/"), "ingress")


def test_every_panel_has_queries_a_unit_a_description_and_the_datasource_variable() -> None:
    for uid, model in dashboards().items():
        for panel in _panels(model):
            where = f"{uid} / {panel['title']}"
            assert panel["targets"], where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["fieldConfig"]["defaults"].get("unit"), where
            assert len(panel.get("description", "")) > 20, where
            assert panel["options"]["legend"]["showLegend"], where
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", where
                assert t["expr"] and t["refId"] and t["legendFormat"], where


def test_the_json_shows_exactly_the_queries_panel_queries_lists() -> None:
    shown = {(uid, p["title"], t["refId"], t["expr"]) for uid, m in dashboards().items()
             for p in _panels(m) for t in p["targets"]}
    listed = [(q.dashboard_uid, q.panel_title, q.ref_id, q.expr) for q in panel_queries()]
    assert len(listed) == len(set(listed))
    assert set(listed) == shown
    assert all(q.requires == "" or q.requires in CONDITIONS for q in panel_queries())


def test_every_query_reads_only_catalogued_or_ray_metrics() -> None:
    allowed = _allowed_names()
    for q in panel_queries():
        names = _names(q.expr)
        assert names, q
        assert names <= allowed, f"{q.panel_title}: unknown {names - allowed}"
        # Every name is read with a selector (so the variables apply): a bare one is a bug.
        bare = set(_RAY_WORD.findall(q.expr)) - names - _LABELS
        assert bare == set(), f"{q.panel_title}: {bare} without a selector"
        assert 'ray_io_cluster=~"$cluster"' in q.expr, q.panel_title


def _balanced(expr: str) -> bool:
    stack, pairs, quoted = [], {")": "(", "]": "[", "}": "{"}, False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not quoted


def test_every_query_is_balanced_and_fully_rendered() -> None:
    for q in panel_queries():
        rendered = render_query(q.expr)
        assert _balanced(q.expr), q
        assert "$" not in rendered, rendered
        assert "[1m]" in rendered or "rate(" not in rendered


def test_render_query_fills_every_form_of_a_variable() -> None:
    expr = 'rate(x{a=~"$cluster", b=~"${pool}", c=~"${application:regex}"}[$__rate_interval])'
    assert render_query(expr, {"pool": "decode"}) == 'rate(x{a=~".*", b=~"decode", c=~".*"}[1m])'
    assert render_query(expr, {"__rate_interval": "30s"}).endswith("[30s])")
    with pytest.raises(KeyError, match="nope"):
        render_query("x{a=~\"$nope\"}")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make tools` installs Debian's prometheus package")
    return path


def test_prometheus_parses_every_query(tmp_path: Path) -> None:
    exprs = [q.expr for q in panel_queries()] + [v.match for v in VARIABLE_QUERIES]
    rules = [{"record": f"kvferry:panel_query:{i}", "expr": render_query(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _query(uid: str, title: str, ref_id: str = "A") -> str:
    (q,) = [q for q in panel_queries() if (q.dashboard_uid, q.panel_title, q.ref_id) == (uid, title, ref_id)]
    return render_query(q.expr)


def _series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f'{name}{{application="kvferry", {labels}}}', "values": values}


def test_ratios_and_fallbacks_give_numbers_where_a_series_is_missing(tmp_path: Path) -> None:
    """Ray creates a counter at its first increment: "no failure yet" must read 0 %, not nothing."""
    rate_1, rate_2, rate_3, rate_4 = "0+15x20", "0+30x20", "0+45x20", "0+60x20"  # per second, 15 s apart
    series = [
        _series("ray_kvferry_prefix_cache_queries_total", 'deployment="decode"', rate_4),
        _series("ray_kvferry_prefix_cache_queries_total", 'deployment="prefill"', rate_2),
        _series("ray_kvferry_prefix_cache_hits_total", 'deployment="decode"', rate_2),  # prefill: no hit yet
        _series("ray_serve_deployment_replica_healthy", 'deployment="prefill", replica="p1"', "1x20"),
        _series("ray_serve_deployment_replica_healthy", 'deployment="prefill", replica="p2"', "1x20"),
        _series("ray_serve_deployment_replica_healthy", 'deployment="decode", replica="d1"', "1x20"),
        _series("ray_serve_deployment_replica_healthy", 'deployment="ingress", replica="i1"', "1x20"),
        _series("ray_serve_autoscaling_target_replicas", 'deployment="decode"', "3x20"),  # prefill: fixed
        _series("ray_kvferry_remote_prefills_total", 'deployment="decode", backend="gloo"', rate_3),
        _series("ray_kvferry_kv_transfer_failures_total", 'deployment="decode", backend="gloo"', rate_1),
        _series("ray_kvferry_remote_prefills_total", 'deployment="decode", backend="nccl"', rate_1),
        _series("ray_kvferry_kv_transfer_failures_total", 'deployment="decode", backend="cuda_ipc"', rate_1),
        _series("ray_kvferry_api_requests_total", 'route="/v1/completions", status="200", code="ok"', rate_1),
    ]
    cases = [
        (_query("kvferry-prompt-cache", "Prefix-cache hit rate by pool"),
         {'{deployment="decode"}': 0.5, '{deployment="prefill"}': 0}),
        (_query("kvferry-pools", "Replicas: healthy vs target", "A"),
         {'{deployment="decode"}': 1, '{deployment="prefill"}': 2}),
        (_query("kvferry-pools", "Replicas: healthy vs target", "B"),
         {'{deployment="decode"}': 3, '{deployment="prefill"}': 2}),
        (_query("kvferry-kv-transfer", "Transfer failure ratio"),
         {'{backend="gloo"}': 0.25, '{backend="nccl"}': 0, '{backend="cuda_ipc"}': 1}),
        (_query("kvferry-pools", "API error ratio"), {"{}": 0}),
    ]
    tests = [{"expr": expr, "eval_time": "4m", "exp_samples": [{"labels": k, "value": v} for k, v in want.items()]}
             for expr, want in cases]
    path = tmp_path / "dashboards_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": series, "promql_expr_test": tests}]}))
    out = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _metrics_of(uid: str) -> set[str]:
    return {n for q in panel_queries() if q.dashboard_uid == uid for n in _names(q.expr)}


def test_the_pools_board_covers_the_issue_list() -> None:
    used = _metrics_of("kvferry-pools")
    required = {
        "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",  # healthy vs target
        "ray_kvferry_num_running", "ray_kvferry_max_num_seqs", "ray_node_gpus_utilization",  # utilisation
        "ray_kvferry_kv_usage",
        "ray_kvferry_num_waiting", "ray_kvferry_queued_prefill_tokens",  # queue
        "ray_kvferry_prompt_tokens_total", "ray_kvferry_generation_tokens_total",  # tokens/s in and out
        "ray_kvferry_ttft_seconds_bucket", "ray_kvferry_request_tpot_seconds_bucket",
        "ray_kvferry_api_requests_total",  # request rate, error rate by code
    }
    assert required <= used, required - used
    exprs = [q.expr for q in panel_queries() if q.dashboard_uid == "kvferry-pools"]
    for hist in ("ray_kvferry_ttft_seconds_bucket", "ray_kvferry_request_tpot_seconds_bucket"):
        assert {q for q in (0.5, 0.99) for e in exprs if f"histogram_quantile({q}," in e and hist in e} == {0.5, 0.99}
    assert any("by (code)" in e and "ray_kvferry_api_requests_total" in e for e in exprs)
    gpu = [q for q in panel_queries() if "ray_node_gpus_utilization" in q.expr]
    assert gpu and all("by (ray_io_group)" in q.expr and q.requires == "gpu" for q in gpu)
    # Pools side by side: every kvferry replica metric is split by the pool it came from.
    for q in panel_queries():
        if q.dashboard_uid == "kvferry-pools" and q.pool_label == "deployment":
            assert "by (deployment" in q.expr or "by (le, deployment" in q.expr, q.panel_title


def test_the_cache_and_transfer_boards_cover_the_issue_list() -> None:
    cache = _metrics_of("kvferry-prompt-cache")
    assert {"ray_kvferry_prefix_cache_hits_total", "ray_kvferry_prefix_cache_queries_total",
            "ray_kvferry_kv_blocks", "ray_kvferry_kv_block_evictions_total", "ray_kvferry_directory_entries",
            "ray_kvferry_routing_decisions_total"} <= cache
    cache_exprs = " ".join(q.expr for q in panel_queries() if q.dashboard_uid == "kvferry-prompt-cache")
    assert "tier, state" in cache_exprs and "tier, reason" in cache_exprs and "pool, reason" in cache_exprs
    transfer = [q for q in panel_queries() if q.dashboard_uid == "kvferry-kv-transfer"]
    assert {"ray_kvferry_kv_transfer_bytes_total", "ray_kvferry_remote_prefills_total",
            "ray_kvferry_kv_transfer_seconds_bucket", "ray_kvferry_kv_transfer_failures_total",
            "ray_kvferry_local_recomputes_total"} <= _metrics_of("kvferry-kv-transfer")
    by_backend = [q for q in transfer if "local_recomputes" not in q.expr]
    assert all("backend" in q.expr for q in by_backend)


def test_the_cli_loads_the_dashboard_libraries_only_when_a_dashboards_command_runs() -> None:
    code = "import sys, cluster.cli; print(sorted(m for m in sys.modules if m.startswith(('grafana', 'niquests'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
