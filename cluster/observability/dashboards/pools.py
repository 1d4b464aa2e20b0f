"""The Pools board: prefill, decode and mixed side by side, one legend entry per pool.

Each panel keeps the pools apart (``sum by (deployment)``, or the KubeRay worker group for
node metrics) and its legend is a table with the last and highest value, so one glance
compares the pools; the ``pool`` variable narrows it down. Rows follow an operator's
questions: are the replicas there, are they busy, is work queueing, how much gets done,
how fast is it for the user, and what does the API answer.
"""

from __future__ import annotations

from cluster.observability.dashboards.exprs import gauge, ingress_sel, node_sel, quantile, rate_sum, ratio, serve_sel
from cluster.observability.dashboards.spec import Board, Panel, Row, Target, describe
from cluster.observability.promql import GROUP_LABEL

UID = "kvferry-pools"
POOL = "deployment"  # the label replica metrics carry the pool in
# Ray's own metrics (exprs.RAY_METRICS lists them for the tests).
_HEALTHY, _TARGET = "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"
_CPU, _GPU = "ray_node_cpu_utilization", "ray_node_gpus_utilization"


def _replicas() -> Panel:
    healthy = f"sum by ({POOL}) ({_HEALTHY}{serve_sel()})"
    # Serve exports a target only for an autoscaled pool; a fixed pool's target is the
    # number of replicas it runs, which the health gauge counts (one series per replica).
    target = f"max by ({POOL}) ({_TARGET}{serve_sel()}) or count by ({POOL}) ({_HEALTHY}{serve_sel()})"
    return Panel(
        "Replicas: healthy vs target",
        "Healthy replicas per pool (Serve's health checks) against the autoscaler's target "
        "(a fixed pool's target is its replica count). A gap that lasts means replicas fail to start.",
        "short", (Target(healthy, "{{deployment}} healthy"), Target(target, "{{deployment}} target")),
        decimals=0, width=8,
    )


def _utilisation() -> Panel:
    running = gauge("sum", "kvferry_num_running", serve_sel(), POOL)
    capacity = gauge("sum", "kvferry_max_num_seqs", serve_sel(), POOL)
    return Panel(
        "Utilisation: running / max sequences",
        "Running sequences over the most the pool's replicas run at once "
        f"({describe('kvferry_max_num_seqs')}). Near 100 % the pool is saturated: scale it out.",
        "percentunit", (Target(f"{running} / {capacity}", "{{deployment}}"),), max=1.0, width=8,
    )


def _kv_usage() -> Panel:
    return Panel(
        "KV cache usage", describe("kvferry_kv_usage") + " Mean over the pool's replicas and the fullest one.",
        "percentunit",
        (Target(gauge("avg", "kvferry_kv_usage", serve_sel(), POOL), "{{deployment}} mean"),
         Target(gauge("max", "kvferry_kv_usage", serve_sel(), POOL), "{{deployment}} fullest replica")),
        max=1.0, width=8,
    )


def _nodes() -> tuple[Panel, ...]:
    by_group = f"by ({GROUP_LABEL})"
    return (
        Panel("Node CPU utilisation by worker group",
              "Ray's node CPU utilisation, averaged per KubeRay worker group (one group per pool; "
              "headgroup is the head). Outside Kubernetes there is no group: one line for the node.",
              "percent", (Target(f"avg {by_group} ({_CPU}{node_sel()})", "{{ray_io_group}}",
                                 pool_label=GROUP_LABEL),), max=100.0),
        Panel("GPU utilisation by worker group",
              "Ray's GPU utilisation per KubeRay worker group: the prefill group should run hot "
              "on long prompts, the decode group on many concurrent streams. Empty on CPU-only nodes.",
              "percent", (Target(f"avg {by_group} ({_GPU}{node_sel()})", "{{ray_io_group}}",
                                 pool_label=GROUP_LABEL, requires="gpu"),), max=100.0),
    )


def _queue() -> tuple[Panel, ...]:
    return (
        Panel("Waiting sequences", describe("kvferry_num_waiting") + " Summed over the pool.", "short",
              (Target(gauge("sum", "kvferry_num_waiting", serve_sel(), POOL), "{{deployment}}"),)),
        Panel("Queued prefill tokens", describe("kvferry_queued_prefill_tokens") + " Summed over the pool; "
              "the prefill router's cost estimate grows with it.", "short",
              (Target(gauge("sum", "kvferry_queued_prefill_tokens", serve_sel(), POOL), "{{deployment}}"),)),
    )


def _throughput() -> tuple[Panel, ...]:
    return (
        Panel("Tokens/s in and out",
              "Prompt tokens (in) and generated tokens (out) of finished requests per second, counted "
              "where the request is served (decode or mixed pool).", "suffix: tok/s",
              (Target(rate_sum("kvferry_prompt_tokens_total", serve_sel(), POOL), "{{deployment}} in"),
               Target(rate_sum("kvferry_generation_tokens_total", serve_sel(), POOL), "{{deployment}} out"))),
        Panel("Finished requests/s by finish reason", describe("kvferry_requests_total"), "reqps",
              (Target(rate_sum("kvferry_requests_total", serve_sel(), POOL, "finish_reason"),
                      "{{deployment}} {{finish_reason}}"),), stack=True),
    )


def _latency() -> tuple[Panel, ...]:
    def p50_p99(title: str, name: str, why: str) -> Panel:
        return Panel(title, f"{describe(name)} {why}", "s",
                     (Target(quantile(0.5, name, serve_sel(), POOL), "{{deployment}} p50"),
                      Target(quantile(0.99, name, serve_sel(), POOL), "{{deployment}} p99")), width=6)

    return (
        p50_p99("TTFT p50 / p99", "kvferry_ttft_seconds", "Includes the remote prefill and the KV transfer."),
        p50_p99("TPOT p50 / p99", "kvferry_request_tpot_seconds", "Per request, over its decode phase."),
        p50_p99("ITL p50 / p99", "kvferry_itl_seconds", "Stalls here are decode steps held up by prefills."),
        p50_p99("E2E latency p50 / p99", "kvferry_e2e_seconds", "What the client waits for a whole answer."),
    )


def _api() -> tuple[Panel, ...]:
    answers = "kvferry_api_requests_total"
    errors = rate_sum(answers, ingress_sel('code!="ok"'), "code")
    return (
        Panel("API requests/s by route", describe(answers) + " All answers, per route.", "reqps",
              (Target(rate_sum(answers, ingress_sel(), "route"), "{{route}}", pool_label=None),), stack=True, width=8),
        Panel("API errors/s by code", "Error answers of the ingress per kvferry error code (the `code` "
              "field of the error body); 'ok' answers are left out. Empty while nothing fails.", "reqps",
              (Target(errors, "{{code}}", pool_label=None, requires="api_errors"),), stack=True, width=8),
        Panel("API error ratio", "Share of the ingress's answers that are errors (any code but ok).",
              "percentunit",
              (Target(ratio(rate_sum(answers, ingress_sel('code!="ok"')), rate_sum(answers, ingress_sel())),
                      "errors", pool_label=None),), max=1.0, width=8),
    )


BOARD = Board(
    uid=UID,
    title="kvferry / Pools",
    description="Prefill, decode and mixed pools side by side: replicas, utilisation, KV, queues, "
                "throughput, latency and API answers.",
    rows=(
        Row("Replicas and utilisation", (_replicas(), _utilisation(), _kv_usage(), *_nodes())),
        Row("Queues", _queue()),
        Row("Throughput", _throughput()),
        Row("Latency", _latency()),
        Row("API answers", _api()),
    ),
)
