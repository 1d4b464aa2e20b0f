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


# Promotion latency, seconds: a few host blocks take microseconds on CPU, a 2K-token prompt
# from a cold disk a good fraction of a second.
_PROMOTE_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

# Label values used below (documented once, so dashboards and rules use the same words).
KV_TIERS = ("device", "host", "disk")  # engine.kv_events.Tier, by name
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
    MetricSpec("kvferry_kv_blocks", "gauge",
               "KV blocks by tier and state (used: held or being copied, cached, free; disk: cached only).",
               ("tier", "state")),
    MetricSpec("kvferry_kv_bytes", "gauge", "KV bytes by tier: what cached and held blocks take, and the "
               "tier's capacity (kind used / capacity).", ("tier", "kind")),
    MetricSpec("kvferry_kv_block_evictions_total", "counter",
               "Cached KV blocks that left a tier, by tier and reason (ttl: at the tier's TTL; capacity: for "
               "room). With host or disk tiers a block leaving the device or host is demoted, not dropped.",
               ("tier", "reason")),
    MetricSpec("kvferry_kv_block_demotions_total", "counter",
               "Cached KV blocks moved down to the host or disk tier (label: the tier they moved to).", ("tier",)),
    MetricSpec("kvferry_kv_block_promotions_total", "counter",
               "Cached KV blocks brought back to the device on a prefix hit (label: the tier they came from).",
               ("tier",)),
    MetricSpec("kvferry_kv_promotion_failures_total", "counter",
               "Promoted KV blocks that could not be read back (corrupt or vanished file): a miss, recomputed."),
    MetricSpec("kvferry_kv_promote_seconds", "histogram",
               "Time from starting a promotion to its KV being on the device (one per prompt)."),
    MetricSpec("kvferry_prefix_cache_hits_by_tier_total", "counter",
               "Prompt tokens served from the prefix cache, by the tier the blocks were found in.", ("tier",)),
    MetricSpec("kvferry_queued_prefill_tokens", "gauge", "Prompt tokens admitted or queued, not yet computed."),
    MetricSpec("kvferry_explicit_caches", "gauge", "Explicit caches (Gemini cachedContents) pinned on the replica."),
    MetricSpec("kvferry_explicit_cache_pinned_tokens", "gauge",
               "Prompt tokens the replica's explicit caches pin (never evicted before their expiry)."),
    MetricSpec("kvferry_explicit_cache_expirations_total", "counter", "Explicit caches that reached their fixed expiry."),
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
                buckets = _PROMOTE_BUCKETS if spec.name == "kvferry_kv_promote_seconds" else _LATENCY_BUCKETS
                self._m[spec.name] = m.Histogram(spec.name, spec.description, boundaries=buckets,
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
        g["kvferry_explicit_caches"].set(stats.num_pins)
        g["kvferry_explicit_cache_pinned_tokens"].set(stats.num_pinned_tokens)
        self._cumulative("kvferry_explicit_cache_expirations_total", stats.num_expired_pins)
        self._cumulative("kvferry_prefix_cache_queries_total", stats.prefix_cache_queries)
        self._cumulative("kvferry_prefix_cache_hits_total", stats.prefix_cache_hits)
        self._cumulative("kvferry_kv_block_evictions_total", stats.num_expired_blocks, tier="device", reason="ttl")
        self._cumulative("kvferry_kv_block_evictions_total", stats.num_evicted_blocks, tier="device",
                         reason="capacity")
        self._tiers(stats)

    def _tiers(self, stats: Any) -> None:
        """The host and disk tiers (``EngineStats.tiers``) and hits by tier."""
        t, g = stats.tiers, self._m
        for tier in KV_TIERS:
            self._cumulative("kvferry_prefix_cache_hits_by_tier_total", getattr(stats.prefix_cache_hits_by_tier, tier),
                             tier=tier)
        block = stats.kv_block_bytes
        g["kvferry_kv_bytes"].set((stats.num_total_blocks - stats.num_free_blocks + stats.num_cached_blocks) * block,
                                  tags={"tier": "device", "kind": "used"})
        g["kvferry_kv_bytes"].set(stats.num_total_blocks * block, tags={"tier": "device", "kind": "capacity"})
        if t.host_capacity_blocks:
            free = t.host_capacity_blocks - t.host_blocks - t.host_busy_blocks
            for state, n in (("used", t.host_busy_blocks), ("cached", t.host_blocks), ("free", free)):
                g["kvferry_kv_blocks"].set(n, tags={"tier": "host", "state": state})
            g["kvferry_kv_bytes"].set((t.host_blocks + t.host_busy_blocks) * block,
                                      tags={"tier": "host", "kind": "used"})
            g["kvferry_kv_bytes"].set(t.host_capacity_blocks * block, tags={"tier": "host", "kind": "capacity"})
        if t.disk_capacity_bytes:
            g["kvferry_kv_blocks"].set(t.disk_blocks, tags={"tier": "disk", "state": "cached"})
            g["kvferry_kv_bytes"].set(t.disk_bytes, tags={"tier": "disk", "kind": "used"})
            g["kvferry_kv_bytes"].set(t.disk_capacity_bytes, tags={"tier": "disk", "kind": "capacity"})
        for tier in ("host", "disk"):
            self._cumulative("kvferry_kv_block_demotions_total", getattr(t, f"num_demoted_to_{tier}"), tier=tier)
            self._cumulative("kvferry_kv_block_promotions_total", getattr(t, f"num_promoted_from_{tier}"), tier=tier)
            self._cumulative("kvferry_kv_block_evictions_total", getattr(t, f"num_{tier}_expired"), tier=tier,
                             reason="ttl")
            self._cumulative("kvferry_kv_block_evictions_total", getattr(t, f"num_{tier}_evicted"), tier=tier,
                             reason="capacity")
        self._cumulative("kvferry_kv_promotion_failures_total", t.num_failed_promotions)
        # The engine keeps its latest latencies; observe those that finished since the last call.
        recent = t.recent_promote_seconds
        new = min(t.num_promotions - self._last.get("promotions", 0), len(recent))
        self._last["promotions"] = t.num_promotions
        for seconds in recent[len(recent) - new:]:
            g["kvferry_kv_promote_seconds"].observe(seconds)


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
