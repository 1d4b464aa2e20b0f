"""Prometheus metrics of the serving replicas (via ``ray.serve.metrics``).

Serve adds the ``deployment``, ``replica`` and ``application`` labels itself, so a pool's
panels filter on ``deployment="prefill"`` / ``"decode"`` / ``"mixed"``. Ray exports every
name with a ``ray_`` prefix. ``CATALOG`` lists each metric once (name, type, description)
so dashboards can be generated from it instead of copied by hand.

Prefix-cache counters count *tokens*, like vLLM's ``prefix_cache_queries`` /
``prefix_cache_hits``, so hit rate = hits / queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from router.metrics import ROUTER_CATALOG, MetricSpec

# Latency buckets, seconds: from one fast decode step to a long CPU prefill. Dense where
# TPOT and ITL live (vLLM's time-per-output-token buckets), so p50/p99 interpolate within a
# narrow bucket instead of snapping to 0.25 / 0.5 / 1.0.
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0]


# Label values used below (documented once, so dashboards and rules use the same words).
KV_TIERS = ("device",)  # "host" and "disk" arrive with the tiered KV cache
KV_BLOCK_STATES = ("used", "cached", "free")  # held by requests / reusable prefix, unheld / empty
EVICTION_REASONS = ("ttl", "capacity")  # expired at its TTL / evicted for room before its TTL
LOCAL_RECOMPUTE_REASONS = ("transfer_failed", "pool_unavailable")

REPLICA_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("kvferry_ttft_seconds", "histogram", "Time to first token, seen by the decode replica."),
    MetricSpec("kvferry_itl_seconds", "histogram", "Time between consecutive streamed outputs."),
    MetricSpec("kvferry_request_tpot_seconds", "histogram",
               "Time per output token of a finished request: (e2e - ttft) / (tokens - 1)."),
    MetricSpec("kvferry_e2e_seconds", "histogram", "Request latency from arrival to its last token."),
    MetricSpec("kvferry_requests_total", "counter", "Finished requests, by finish_reason.", ("finish_reason",)),
    MetricSpec("kvferry_prompt_tokens_total", "counter", "Prompt tokens of finished requests."),
    MetricSpec("kvferry_generation_tokens_total", "counter", "Generated tokens of finished requests."),
    MetricSpec("kvferry_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache."),
    MetricSpec("kvferry_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache."),
    MetricSpec("kvferry_remote_prefills_total", "counter", "Prompts prefilled by the prefill pool.", ("backend",)),
    MetricSpec("kvferry_kv_transfer_failures_total", "counter", "KV transfers that failed (local recompute).",
               ("backend",)),
    MetricSpec("kvferry_kv_transfer_bytes_total", "counter", "KV bytes received from the prefill pool.",
               ("backend",)),
    MetricSpec("kvferry_kv_transfer_seconds", "histogram", "Prefill call + KV receive time per remote prefill.",
               ("backend",)),
    MetricSpec("kvferry_local_recomputes_total", "counter",
               "Prompts meant for the prefill pool but prefilled locally, by reason.", ("reason",)),
    MetricSpec("kvferry_num_running", "gauge", "Running sequences on the replica."),
    MetricSpec("kvferry_max_num_seqs", "gauge", "Most sequences the replica runs at once (utilisation denominator)."),
    MetricSpec("kvferry_num_waiting", "gauge", "Waiting sequences (incl. waiting for remote KV)."),
    MetricSpec("kvferry_kv_usage", "gauge", "Fraction of KV blocks held by requests (0..1)."),
    MetricSpec("kvferry_kv_blocks", "gauge", "KV blocks by tier and state (used, cached, free).", ("tier", "state")),
    MetricSpec("kvferry_kv_block_evictions_total", "counter",
               "Cached KV blocks dropped, by tier and reason (ttl: expired; capacity: evicted for room).",
               ("tier", "reason")),
    MetricSpec("kvferry_queued_prefill_tokens", "gauge", "Prompt tokens admitted or queued, not yet computed."),
)

# The ingress deployment's own: one count per HTTP answer, by status and kvferry error code
# ("ok" for a success), so an error rate by code needs no log parsing.
# Prompt-cache tokens per API surface and TTL class, once per finished request
# (cluster.cache_usage: reads refresh the blocks' TTL; writes are the prompt's newly cached
# full blocks). Surfaces: openai, anthropic, gemini, grpc; TTL classes: 5m, 1h, other.
INGRESS_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("kvferry_api_requests_total", "counter", "API answers of the ingress, by HTTP status and error code.",
               ("route", "status", "code")),
    MetricSpec("kvferry_prompt_cache_read_tokens_total", "counter",
               "Prompt tokens served from the prompt cache, by API surface and TTL class.", ("surface", "ttl_class")),
    MetricSpec("kvferry_prompt_cache_written_tokens_total", "counter",
               "Prompt tokens newly written to the prompt cache, by API surface and TTL class.",
               ("surface", "ttl_class")),
)

CATALOG: tuple[MetricSpec, ...] = REPLICA_CATALOG + INGRESS_CATALOG + ROUTER_CATALOG


class ReplicaMetrics:
    """The metric objects of one engine replica; every method is cheap and never raises."""

    def __init__(self, backend: str = "unknown") -> None:
        from ray.serve import metrics as m

        # The KV transport's backend, a label of the transfer metrics: set from the config,
        # then from the backend that actually carried the last transfer.
        self.backend = backend
        self._m: dict[str, Any] = {}
        for spec in REPLICA_CATALOG:
            if spec.kind == "histogram":
                self._m[spec.name] = m.Histogram(spec.name, spec.description, boundaries=_LATENCY_BUCKETS,
                                                 tag_keys=spec.labels)
            else:
                cls = m.Counter if spec.kind == "counter" else m.Gauge
                self._m[spec.name] = cls(spec.name, spec.description, tag_keys=spec.labels)
        self.ttft = self._m["kvferry_ttft_seconds"]
        self.itl = self._m["kvferry_itl_seconds"]
        self.e2e = self._m["kvferry_e2e_seconds"]
        self.tpot = self._m["kvferry_request_tpot_seconds"]
        self._last: dict[str, int] = {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._m[name].inc(value, tags=tags or None)

    def finished(self, finish_reason: str | None, prompt_tokens: int, generated_tokens: int) -> None:
        self._m["kvferry_requests_total"].inc(1, tags={"finish_reason": finish_reason or "unknown"})
        self.inc("kvferry_prompt_tokens_total", prompt_tokens)
        self.inc("kvferry_generation_tokens_total", generated_tokens)

    def transfer_done(self, nbytes: int, seconds: float, backend: str) -> None:
        """One remote prefill whose KV landed here, carried by ``backend`` (gloo, nccl, cuda_ipc)."""
        self.backend = backend
        self.inc("kvferry_remote_prefills_total", backend=backend)
        self.inc("kvferry_kv_transfer_bytes_total", nbytes, backend=backend)
        self._m["kvferry_kv_transfer_seconds"].observe(seconds, tags={"backend": backend})

    def local_recompute(self, reason: str) -> None:
        """A prompt meant for the prefill pool was prefilled here (``LOCAL_RECOMPUTE_REASONS``)."""
        if reason == "transfer_failed":
            self.inc("kvferry_kv_transfer_failures_total", backend=self.backend)
        self.inc("kvferry_local_recomputes_total", reason=reason)

    def _cumulative(self, name: str, total: int, **tags: str) -> None:
        """Feed an engine's cumulative count to a counter (Prometheus counters want increments)."""
        key = name + repr(sorted(tags.items()))
        self.inc(name, total - self._last.get(key, 0), **tags)
        self._last[key] = total

    def engine_stats(self, stats: Any) -> None:
        """Gauges and cumulative counters from an ``EngineStats`` snapshot."""
        if stats is None:
            return
        g = self._m
        g["kvferry_num_running"].set(stats.num_running)
        g["kvferry_max_num_seqs"].set(stats.max_num_seqs)
        g["kvferry_num_waiting"].set(stats.num_waiting + stats.num_waiting_for_remote_kv)
        g["kvferry_kv_usage"].set(stats.kv_usage)
        g["kvferry_queued_prefill_tokens"].set(stats.num_queued_prefill_tokens)
        free = stats.num_free_blocks - stats.num_cached_blocks
        for state, n in (("used", stats.num_total_blocks - stats.num_free_blocks), ("cached", stats.num_cached_blocks),
                         ("free", free)):
            g["kvferry_kv_blocks"].set(n, tags={"tier": "device", "state": state})
        self._cumulative("kvferry_prefix_cache_queries_total", stats.prefix_cache_queries)
        self._cumulative("kvferry_prefix_cache_hits_total", stats.prefix_cache_hits)
        self._cumulative("kvferry_kv_block_evictions_total", stats.num_expired_blocks, tier="device", reason="ttl")
        self._cumulative("kvferry_kv_block_evictions_total", stats.num_evicted_blocks, tier="device",
                         reason="capacity")


def cache_usage_recorder() -> Callable[[str, Any], None]:
    """``(surface, CacheAccount) -> None`` counting one finished request's cache tokens
    (inside a Serve replica; zero counts are skipped)."""
    from ray.serve import metrics as m

    read, written = (m.Counter(s.name, s.description, tag_keys=s.labels) for s in INGRESS_CATALOG[1:3])

    def record(surface: str, account: Any) -> None:
        for counter, by_class in ((read, account.read), (written, account.written)):
            for ttl_class, tokens in by_class.items():
                if tokens > 0:
                    counter.inc(tokens, tags={"surface": surface, "ttl_class": ttl_class})

    return record


def ingress_answer_recorder() -> Callable[[str, str, str], None]:
    """``(route, status, code) -> None`` counting the ingress's answers (inside a Serve replica)."""
    from ray.serve import metrics as m

    spec = INGRESS_CATALOG[0]
    counter = m.Counter(spec.name, spec.description, tag_keys=spec.labels)
    return lambda route, status, code: counter.inc(1, tags={"route": route, "status": status, "code": code})
