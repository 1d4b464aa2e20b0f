"""Ray Serve ``RequestRouter`` adapters: gather snapshots, await the directory, call the policy.

Use them through a deployment's request-router config::

    RequestRouterConfig(
        request_router_class="router.serve_routers.PrefillRequestRouter",
        request_router_kwargs={"pool": "prefill"},
        request_routing_stats_period_s=1.0,
    )

Per request (``choose_replicas``):

1. Find the request's :class:`router.hints.RoutingHints` (none: power of two choices).
2. Load snapshot per replica: the replica's ``record_routing_stats()`` dict (keys as in
   ``ReplicaLoad``: ``queued_prefill_tokens``, ``num_running``, ``num_waiting``,
   ``max_num_seqs``, ``kv_usage``, ``num_free_blocks``, ``prefill_tokens_per_s``), raised to
   at least this router's own in-flight tokens on that replica (stats are periodic and
   stale; what we sent since is certain), and Serve's queue-length cache for fullness.
3. ``await`` the directory's lookup with a short timeout (never ``ray.get`` on the loop);
   merge this router's speculative entries.
4. Call the pure policy, then put preferred replicas first (``router.key_affinity``: the
   replica of the request's ``prompt_cache_key``, load permitting; the replica pinning its
   explicit cache), and return one rank per replica, best first. If the directory is
   unreachable or slow, fall back to power-of-two choices (built on Serve's public
   ``LocalityMixin``, no private class).

Replica ids in the directory are Serve's full replica ids
(``serve.get_replica_context().replica_id.to_full_id_str()``): replicas must give that
string to their engine as ``replica_id``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import xxhash

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from router.directory import PrefixMatch
from router.directory_actor import get_or_create_directory
from router.hints import RoutingHints, find_hints
from router.key_affinity import KeyAffinity, prefer
from router.metrics import RoutingMetrics, cached_tokens_by_tier
from router.policy import (
    DEFAULT_PROMOTE_S_PER_TOKEN,
    DecodePolicyConfig,
    PrefillPolicyConfig,
    ReplicaLoad,
    RequestInfo,
    cached_tokens,
    merge_matches,
    rank_decode_replicas,
    rank_replicas,
    tier_credits,
)
from router.speculative import SpeculativeRoutes

logger = logging.getLogger(__name__)

# The calls whose routing the metrics count: a pool's requests, not its control calls.
_ROUTED_METHODS = ("generate", "prefill")

_STATS_KEYS = ("queued_prefill_tokens", "num_running", "num_waiting", "max_num_seqs", "kv_usage",
               "num_free_blocks", "prefill_tokens_per_s")


class _KVAwareRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Shared plumbing of the two pools' routers; subclasses pick the policy."""

    # Set by the subclass before it calls initialize_state (its policy's knobs).
    _config: PrefillPolicyConfig | DecodePolicyConfig

    def initialize_state(
        self,
        pool: str = "prefill",
        namespace: str | None = None,
        lookup_timeout_s: float = 0.25,
        speculative_ttl_s: float = 10.0,
        directory: Any = None,
    ) -> None:
        """Called by Serve with ``request_router_kwargs``; ``directory`` is for tests."""
        self._directory = directory if directory is not None else get_or_create_directory(pool, namespace)
        self._lookup_timeout_s = lookup_timeout_s
        self._spec = SpeculativeRoutes(ttl_s=speculative_ttl_s)
        # prompt_cache_key (hashed) -> the replica its last request went to.
        self._keys = KeyAffinity()
        # internal_request_id -> (replica full id, tokens) for requests sent, not completed.
        self._inflight: dict[str, tuple[str, int]] = {}
        # internal_request_id -> {replica: (uncached tokens, its match)} estimated while
        # ranking, so the in-flight work we add is what the replica must compute, not the
        # whole prompt, and the metrics count the hits by tier the chosen replica holds.
        self._estimates: dict[str, dict[str, tuple[int, PrefixMatch | None]]] = {}
        self._inflight_tokens: dict[str, int] = {}
        self.num_directory_failures = 0
        self.num_policy_routes = 0
        self._metrics = RoutingMetrics(pool)

    # -- snapshots --------------------------------------------------------------------

    def _load(self, r: RunningReplica) -> ReplicaLoad:
        rid = r.replica_id.to_full_id_str()
        stats = r.routing_stats or {}
        kw = {k: stats[k] for k in _STATS_KEYS if stats.get(k) is not None}
        kw["queued_prefill_tokens"] = max(int(kw.get("queued_prefill_tokens", 0)), self._inflight_tokens.get(rid, 0))
        q = self._replica_queue_len_cache.get(r.replica_id)
        full = q is not None and q >= r.max_ongoing_requests
        return ReplicaLoad(rid, is_full=full, **kw)

    async def _matches(self, hints: RoutingHints) -> dict[str, PrefixMatch] | None:
        try:
            found = await asyncio.wait_for(self._directory.lookup.remote(list(hints.block_hashes)),
                                           self._lookup_timeout_s)
        except Exception as e:  # noqa: BLE001 - unreachable/slow directory: degrade, don't fail
            self.num_directory_failures += 1
            logger.debug("KV directory lookup failed: %r", e)
            return None
        return merge_matches(found, self._spec.lookup(hints.block_hashes, time.time()))

    def _rank(self, info: RequestInfo, loads: list[ReplicaLoad], matches: dict[str, PrefixMatch]) -> list[str]:
        raise NotImplementedError

    def _prefer(self, hints: RoutingHints, ranked: list[str], loads: list[ReplicaLoad]) -> list[str]:
        """The key's replica first, load permitting; a pinned cache's replica first, always."""
        if hints.cache_key is not None:
            slack = getattr(self._config, "imbalance_load", 0.5)
            ranked = prefer(ranked, self._keys.get(hints.cache_key, time.time()), loads, slack)
        return prefer(ranked, hints.prefer_replica, loads, 0.0, force=True)

    def _power_of_two(
        self, candidates: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        """Serve's fallback policy through its public API: two random replicas (same-node ones
        first, via LocalityMixin) in one rank; Serve sends the request to the less loaded."""
        preferred = self.apply_locality_routing(pending_request) if pending_request is not None else set()
        pool = [r for r in candidates if r.replica_id in preferred] or list(candidates)
        return [random.sample(pool, min(2, len(pool)))] if pool else []

    # -- RequestRouter API ------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """One rank per replica, best first (power of two choices without hints/directory)."""
        hints = find_hints(pending_request.args, pending_request.kwargs) if pending_request else None
        matches = await self._matches(hints) if hints is not None and candidate_replicas else None
        if hints is None or matches is None:
            return self._power_of_two(candidate_replicas, pending_request)
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        req_id = pending_request.metadata.internal_request_id
        # A prompt shorter than one block has no hash to seed the tie-break: use the request.
        seed = None if hints.block_hashes else xxhash.xxh3_64_intdigest(req_id.encode())
        info = RequestInfo(hints.block_hashes, hints.num_tokens, hints.block_size, tiebreak_seed=seed)
        loads = [self._load(r) for r in candidate_replicas]
        ranked = self._prefer(hints, self._rank(info, loads, matches), loads)
        if len(self._estimates) > 10_000:  # requests cancelled before routing never pop theirs
            self._estimates.clear()
        credits = tier_credits(self._config.promote_s_per_token, self._config.prefill_tokens_per_s)
        self._estimates[req_id] = {
            rid: (hints.num_tokens - int(cached_tokens(matches.get(rid), info, credits)), matches.get(rid))
            for rid in ranked
        }
        if not ranked:
            return []
        self.num_policy_routes += 1
        # We returned every rank we have: if none accepts, back off before asking again.
        pending_request.routing_context.should_backoff = True
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        """Record a speculative entry and the in-flight tokens for the chosen replica."""
        hints = find_hints(pending_request.args, pending_request.kwargs)
        if hints is None:
            # Control calls (model_info, ping, stats) carry no hints and are not routing decisions.
            if getattr(pending_request.metadata, "call_method", "") in _ROUTED_METHODS:
                self._metrics.decision("no_hints")
            return
        rid = replica_id.to_full_id_str()
        self._spec.record(hints.block_hashes, rid, time.time())
        if hints.cache_key is not None:
            self._keys.record(hints.cache_key, rid, time.time())
        req_id = pending_request.metadata.internal_request_id
        est = self._estimates.pop(req_id, None)
        # No estimate: the directory did not answer and Serve's power of two chose.
        tokens, match = (hints.num_tokens, None) if est is None else est.get(rid, (hints.num_tokens, None))
        self._metrics.decision("directory_unavailable" if est is None
                               else "prefix_hit" if tokens < hints.num_tokens else "least_loaded")
        self._metrics.routed(hints.num_tokens, cached_tokens_by_tier(match, hints.num_tokens, hints.block_size))
        self._inflight[req_id] = (rid, tokens)
        self._inflight_tokens[rid] = self._inflight_tokens.get(rid, 0) + tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Release the in-flight tokens of a finished request."""
        entry = self._inflight.pop(internal_request_id, None)
        if entry is not None:
            rid, n = entry
            left = self._inflight_tokens.get(rid, 0) - n
            if left > 0:
                self._inflight_tokens[rid] = left
            else:
                self._inflight_tokens.pop(rid, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica here and in the directory (fire and forget)."""
        super().on_replica_actor_died(replica_id)
        rid = replica_id.to_full_id_str()
        self._spec.drop_replica(rid)
        self._keys.drop_replica(rid)
        self._inflight_tokens.pop(rid, None)
        try:
            self._directory.drop_replica.remote(rid)
        except Exception:  # noqa: BLE001 - the directory may be down; it forgets on restart
            pass


def _tier_cost_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the tier-cost knobs (RoutingConfig's units) into policy-config fields."""
    out: dict[str, Any] = {}
    host = kwargs.pop("host_promote_us_per_token", None)
    disk = kwargs.pop("disk_promote_us_per_token", None)
    if host is not None or disk is not None:
        _, h, d = DEFAULT_PROMOTE_S_PER_TOKEN
        out["promote_s_per_token"] = (0.0, h if host is None else host * 1e-6, d if disk is None else disk * 1e-6)
    if "prefill_tokens_per_s" in kwargs:
        out["prefill_tokens_per_s"] = kwargs.pop("prefill_tokens_per_s")
    return out


class PrefillRequestRouter(_KVAwareRouter):
    """Prefill pool: estimated time to first token (``router.policy.rank_replicas``)."""

    def initialize_state(self, pool: str = "prefill", **kwargs: Any) -> None:
        cfg = {k: kwargs.pop(k) for k in ("imbalance_ratio", "imbalance_abs_tokens", "uncached_weight") if k in kwargs}
        self._config = PrefillPolicyConfig(**cfg, **_tier_cost_fields(kwargs))
        super().initialize_state(pool=pool, **kwargs)

    def _rank(self, info: RequestInfo, loads: list[ReplicaLoad], matches: dict[str, PrefixMatch]) -> list[str]:
        return rank_replicas(info, loads, matches, self._config)


class DecodeRequestRouter(_KVAwareRouter):
    """Decode pool: conversation affinity vs decode load (``rank_decode_replicas``)."""

    def initialize_state(self, pool: str = "decode", **kwargs: Any) -> None:
        cfg = {k: kwargs.pop(k) for k in ("affinity_weight", "imbalance_load") if k in kwargs}
        self._config = DecodePolicyConfig(**cfg, **_tier_cost_fields(kwargs))
        super().initialize_state(pool=pool, **kwargs)

    def _rank(self, info: RequestInfo, loads: list[ReplicaLoad], matches: dict[str, PrefixMatch]) -> list[str]:
        return rank_decode_replicas(info, loads, matches, self._config)


_PREFILL_KNOBS = ("imbalance_ratio", "imbalance_abs_tokens", "uncached_weight")
_DECODE_KNOBS = ("affinity_weight", "imbalance_load")
_SHARED_KNOBS = ("lookup_timeout_s", "speculative_ttl_s", "host_promote_us_per_token", "disk_promote_us_per_token",
                 "prefill_tokens_per_s")


def request_router_config(pool_name: str, knobs: dict[str, Any] | None = None, stats_period_s: float = 1.0) -> Any:
    """Serve ``RequestRouterConfig`` for one pool: "prefill" ranks by TTFT, others by decode.

    ``knobs``: policy settings by name (the cluster passes its ``RoutingConfig``); each pool's
    router receives the ones its policy reads.
    """
    from ray.serve.config import RequestRouterConfig

    knobs = knobs or {}
    prefill = pool_name == "prefill"
    names = _SHARED_KNOBS + (_PREFILL_KNOBS if prefill else _DECODE_KNOBS)
    return RequestRouterConfig(
        request_router_class=PrefillRequestRouter if prefill else DecodeRequestRouter,
        request_router_kwargs={"pool": pool_name, **{k: knobs[k] for k in names if k in knobs}},
        # The policy reads record_routing_stats(); Serve's 10 s default is too stale.
        request_routing_stats_period_s=stats_period_s,
    )
