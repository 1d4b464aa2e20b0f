"""The Prompt cache board: how much of each prompt the pools find cached, and why.

Top: the engines' prefix caches (hit rate and cached tokens per pool), then the cache
tokens read and written per API surface and TTL class (the ingress counts them). Middle: the KV
blocks behind them by tier and state, and what drops them (TTL expiry against eviction for
room: many capacity evictions mean the TTLs outlive the memory), and the explicit caches
pinned until their fixed expiry. Bottom: the routers' view,
the directory that tells them where prefixes live and the reasons behind their decisions.
"""

from __future__ import annotations

from cluster.observability.dashboards.exprs import gauge, ingress_sel, rate_sum, ratio, router_sel, serve_sel
from cluster.observability.dashboards.spec import Board, Panel, Row, Target, describe
from cluster.observability.promql import ROUTER_POOL_LABEL

UID = "kvferry-prompt-cache"
POOL = "deployment"
_HITS, _QUERIES = "kvferry_prefix_cache_hits_total", "kvferry_prefix_cache_queries_total"
_DECISIONS = "kvferry_routing_decisions_total"


def _hits() -> tuple[Panel, ...]:
    hits, queries = rate_sum(_HITS, serve_sel(), POOL), rate_sum(_QUERIES, serve_sel(), POOL)
    return (
        Panel("Prefix-cache hit rate by pool",
              "Prompt tokens served from the prefix cache over prompt tokens looked up (tokens, "
              "like vLLM's prefix_cache_hits / prefix_cache_queries).", "percentunit",
              (Target(ratio(hits, queries), "{{deployment}}"),), max=1.0),
        Panel("Cached tokens/s", f"{describe(_HITS)} Against: {describe(_QUERIES)}", "suffix: tok/s",
              (Target(hits, "{{deployment}} cached"), Target(queries, "{{deployment}} looked up"))),
    )


def _surfaces() -> tuple[Panel, ...]:
    read, written = "kvferry_prompt_cache_read_tokens_total", "kvferry_prompt_cache_written_tokens_total"
    note = (" One line per API surface (openai, anthropic, gemini, grpc) and TTL class (5m, 1h, other), "
            "counted by the ingress once per finished request.")
    return (
        Panel("Cache reads by API surface and TTL", describe(read) + note, "suffix: tok/s",
              (Target(rate_sum(read, ingress_sel(), "surface", "ttl_class"), "{{surface}} {{ttl_class}}",
                      pool_label=None),), stack=True, width=12),
        Panel("Cache writes by API surface and TTL", describe(written) + note, "suffix: tok/s",
              (Target(rate_sum(written, ingress_sel(), "surface", "ttl_class"), "{{surface}} {{ttl_class}}",
                      pool_label=None),), stack=True, width=12),
    )


def _blocks() -> tuple[Panel, ...]:
    evictions = "kvferry_kv_block_evictions_total"
    return (
        Panel("KV blocks by tier and state",
              describe("kvferry_kv_blocks") + " used: held by running requests; cached: reusable prefix "
              "nobody holds; free: empty. Summed over the pool's replicas.", "short",
              (Target(gauge("sum", "kvferry_kv_blocks", serve_sel(), POOL, "tier", "state"),
                      "{{deployment}} {{tier}} {{state}}"),), stack=True),
        Panel("TTL expiries vs capacity evictions", describe(evictions) + " Per second.", "suffix: blocks/s",
              (Target(rate_sum(evictions, serve_sel(), POOL, "tier", "reason"),
                      "{{deployment}} {{tier}} {{reason}}", requires="kv_evictions"),)),
    )


def _explicit() -> tuple[Panel, ...]:
    caches, tokens = "kvferry_explicit_caches", "kvferry_explicit_cache_pinned_tokens"
    expiries = "kvferry_explicit_cache_expirations_total"
    return (
        Panel("Explicit caches and their pinned tokens",
              f"{describe(caches)} {describe(tokens)} Summed over the pool's replicas; pinned blocks also "
              "count as used KV.", "short",
              (Target(gauge("sum", caches, serve_sel(), POOL), "{{deployment}} caches"),
               Target(gauge("sum", tokens, serve_sel(), POOL), "{{deployment}} pinned tokens"))),
        Panel("Explicit-cache expiries/s", describe(expiries) + " (fixed TTLs: a hit never extends one).",
              "suffix: caches/s",
              (Target(rate_sum(expiries, serve_sel(), POOL), "{{deployment}}", requires="explicit_cache_expiry"),)),
    )


def _routing() -> tuple[Panel, ...]:
    by_pool = ROUTER_POOL_LABEL
    decisions = rate_sum(_DECISIONS, router_sel(), by_pool)
    prefix_hits = rate_sum(_DECISIONS, router_sel('reason="prefix_hit"'), by_pool)
    return (
        Panel("Directory entries", describe("kvferry_directory_entries"), "short",
              (Target(gauge("sum", "kvferry_directory_entries", router_sel(), by_pool), "{{pool}}",
                      pool_label=by_pool),)),
        Panel("Directory expirations/s", describe("kvferry_directory_expirations_total"), "suffix: entries/s",
              (Target(rate_sum("kvferry_directory_expirations_total", router_sel(), by_pool), "{{pool}}",
                      pool_label=by_pool, requires="directory_expiry"),)),
        Panel("Routing decisions/s by reason",
              describe(_DECISIONS) + " prefix_hit: sent to a replica holding part of the prompt; "
              "least_loaded: nothing useful cached; no_hints / directory_unavailable: Serve's "
              "power of two choices.", "reqps",
              (Target(rate_sum(_DECISIONS, router_sel(), by_pool, "reason"), "{{pool}} {{reason}}",
                      pool_label=by_pool),), stack=True),
        Panel("Routed to a cached prefix", "Share of a pool's routing decisions that found a replica "
              "holding part of the prompt (reason prefix_hit).", "percentunit",
              (Target(ratio(prefix_hits, decisions), "{{pool}}", pool_label=by_pool),), max=1.0),
    )


BOARD = Board(
    uid=UID,
    title="kvferry / Prompt cache",
    description="Prefix-cache hit rate and cached tokens per pool, KV blocks by tier, TTL expiries "
                "vs capacity evictions, the KV directory and the routers' decisions.",
    rows=(
        Row("Prefix cache", _hits()),
        Row("Cache reads and writes by API surface", _surfaces()),
        Row("KV blocks", _blocks()),
        Row("Explicit caches", _explicit()),
        Row("Directory and routing", _routing()),
    ),
)
