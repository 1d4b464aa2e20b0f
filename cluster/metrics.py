"""Prometheus metrics of the serving replicas (via ``ray.serve.metrics``).

Serve adds the ``deployment``, ``replica`` and ``application`` labels itself, so a pool's
panels filter on ``deployment="prefill"`` / ``"decode"`` / ``"mixed"``. Ray exports every
name with a ``ray_`` prefix. ``CATALOG`` lists each metric once (name, type, description)
so dashboards can be generated from it instead of copied by hand.

Prefix-cache counters count *tokens*, like vLLM's ``prefix_cache_queries`` /
``prefix_cache_hits``, so hit rate = hits / queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Latency buckets, seconds: from one fast decode step to a long CPU prefill.
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (without Ray's ``ray_`` prefix), kind and meaning."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str


CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("kvferry_ttft_seconds", "histogram", "Time to first token, seen by the decode replica."),
    MetricSpec("kvferry_itl_seconds", "histogram", "Time between consecutive streamed outputs."),
    MetricSpec("kvferry_e2e_seconds", "histogram", "Request latency from arrival to its last token."),
    MetricSpec("kvferry_requests_total", "counter", "Finished requests, by finish_reason."),
    MetricSpec("kvferry_prompt_tokens_total", "counter", "Prompt tokens of finished requests."),
    MetricSpec("kvferry_generation_tokens_total", "counter", "Generated tokens of finished requests."),
    MetricSpec("kvferry_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache."),
    MetricSpec("kvferry_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache."),
    MetricSpec("kvferry_remote_prefills_total", "counter", "Prompts prefilled by the prefill pool."),
    MetricSpec("kvferry_kv_transfer_failures_total", "counter", "KV transfers that failed (local recompute)."),
    MetricSpec("kvferry_kv_transfer_bytes_total", "counter", "KV bytes received from the prefill pool."),
    MetricSpec("kvferry_kv_transfer_seconds", "histogram", "Prefill call + KV receive time per remote prefill."),
    MetricSpec("kvferry_num_running", "gauge", "Running sequences on the replica."),
    MetricSpec("kvferry_num_waiting", "gauge", "Waiting sequences (incl. waiting for remote KV)."),
    MetricSpec("kvferry_kv_usage", "gauge", "Fraction of KV blocks held by requests (0..1)."),
    MetricSpec("kvferry_queued_prefill_tokens", "gauge", "Prompt tokens admitted or queued, not yet computed."),
)


class ReplicaMetrics:
    """The metric objects of one replica; every method is cheap and never raises."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        by_name = {s.name: s for s in CATALOG}

        def hist(name: str) -> Any:
            return m.Histogram(name, by_name[name].description, boundaries=_LATENCY_BUCKETS)

        self.ttft = hist("kvferry_ttft_seconds")
        self.itl = hist("kvferry_itl_seconds")
        self.e2e = hist("kvferry_e2e_seconds")
        self.transfer_s = hist("kvferry_kv_transfer_seconds")
        self.requests = m.Counter("kvferry_requests_total", by_name["kvferry_requests_total"].description,
                                  tag_keys=("finish_reason",))
        self.counters = {
            s.name: m.Counter(s.name, s.description)
            for s in CATALOG
            if s.kind == "counter" and s.name != "kvferry_requests_total"
        }
        self.gauges = {s.name: m.Gauge(s.name, s.description) for s in CATALOG if s.kind == "gauge"}
        self._last_queries = 0
        self._last_hits = 0

    def inc(self, name: str, value: float = 1.0) -> None:
        if value > 0:
            self.counters[name].inc(value)

    def finished(self, finish_reason: str | None, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests.inc(1, tags={"finish_reason": finish_reason or "unknown"})
        self.inc("kvferry_prompt_tokens_total", prompt_tokens)
        self.inc("kvferry_generation_tokens_total", generated_tokens)

    def engine_stats(self, stats: Any) -> None:
        """Gauges and cumulative cache counters from an ``EngineStats`` snapshot."""
        if stats is None:
            return
        self.gauges["kvferry_num_running"].set(stats.num_running)
        self.gauges["kvferry_num_waiting"].set(stats.num_waiting + stats.num_waiting_for_remote_kv)
        self.gauges["kvferry_kv_usage"].set(stats.kv_usage)
        self.gauges["kvferry_queued_prefill_tokens"].set(stats.num_queued_prefill_tokens)
        # The engine's counters are cumulative; Prometheus counters want increments.
        self.inc("kvferry_prefix_cache_queries_total", stats.prefix_cache_queries - self._last_queries)
        self.inc("kvferry_prefix_cache_hits_total", stats.prefix_cache_hits - self._last_hits)
        self._last_queries = stats.prefix_cache_queries
        self._last_hits = stats.prefix_cache_hits
