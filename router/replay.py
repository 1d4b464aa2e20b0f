"""Trace-driven simulator of one prefill pool: routing policies compared on real traces.

``kvferry replay TRACE [--replicas N] [--cache-tokens C] [--host-tokens H] [--policies ...]`` runs it
(the command lives in ``router.replay_cli``, which imports this module, never the
reverse). Traces are JSONL in the Mooncake format: ``timestamp`` (ms),
``input_length``, ``output_length`` and ``hash_ids`` (chained ids of 512-token blocks).

What is real: the :class:`~router.directory.KVDirectory` (fed with the events the
simulated replicas emit) and :func:`~router.policy.rank_replicas` with
:class:`~router.speculative.SpeculativeRoutes` — the code production runs.

Service-time model (one replica, documented in docs/replay.md):

* A replica prefills one request at a time, FIFO (chunked-prefill batching keeps a
  compute-bound GPU at about the same token throughput, so FIFO over tokens is the
  usual first-order model).
* ``service_s = overhead_s + uncached_tokens / prefill_tokens_per_s + promote_s``;
  defaults 20 ms and 10,000 tokens/s (an 8B model on one H100-class GPU). Device hits are
  free; a host or disk hit costs its promote time, ``promote_us_per_token`` per cached
  token of that tier (defaults: an 8B model's 128 KiB of KV per token over ~25 GB/s of
  PCIe, and ~5 GB/s of NVMe).
* ``TTFT = finish - arrival`` (queueing + service). Decode is not simulated.
* Cache (``router.replay_cache.TieredCache``): per replica a device LRU of
  ``cache_tokens // 512`` blocks, and optional host and disk LRUs (``host_tokens``,
  ``disk_tokens``). A block leaving a tier for room or at its TTL is demoted to the next
  tier (or dropped); per-tier TTLs (device ``ttl_s`` sliding, host ``host_ttl_s``, disk
  ``disk_ttl_s``). A request hits the longest prefix of its ``hash_ids`` held in any tier
  when it *starts*; its blocks all end on the device then (hits promoted).
* Events: the replica's stores, touches, moves and removals reach the directory when the
  request *finishes* (the engine emits them per step; flush latency is folded in), with
  ``expires_at = finish + ttl_s`` on the device; TTL demotions when they happen (never
  before an earlier batch of the same replica). The directory is swept every second.
* Hit rate = cached prompt tokens / prompt tokens (the last token is always computed),
  split by the tier each cached token came from.

Policies: ``round_robin``; ``least_loaded`` (least queued prefill work); ``cache_aware``
(SGLang's router: shortest queue in requests when max - min > 64 and max > 1.5x min,
else the best match if its match rate > 0.3, else the least loaded; it sees the same
directory + speculative entries as ours, i.e. SGLang's tree of routed prompts plus
real evictions); ``kvferry`` (our ``rank_replicas``).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.kv_events import KVEventBatch
from router.directory import KVDirectory, PrefixMatch
from router.policy import PrefillPolicyConfig, ReplicaLoad, RequestInfo, merge_matches, rank_replicas
from router.replay_cache import TieredCache
from router.speculative import SpeculativeRoutes

TRACE_BLOCK_TOKENS = 512
# Promote time per cached token of the modelled GPU replica (an 8B model, 128 KiB of KV
# per token): host memory over ~25 GB/s of PCIe, disk at ~5 GB/s of NVMe reads.
GPU_HOST_PROMOTE_US_PER_TOKEN = 5.0
GPU_DISK_PROMOTE_US_PER_TOKEN = 26.0
POLICIES = ("round_robin", "least_loaded", "cache_aware", "kvferry")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a Mooncake trace."""

    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """How long a prefill takes on one replica (see the module docstring)."""

    prefill_tokens_per_s: float = 10_000.0
    overhead_s: float = 0.020
    # Seconds to promote one cached token's KV to the device, per tier (device, host, disk).
    promote_s_per_token: tuple[float, float, float] = (
        0.0, GPU_HOST_PROMOTE_US_PER_TOKEN * 1e-6, GPU_DISK_PROMOTE_US_PER_TOKEN * 1e-6)

    def service_s(self, uncached_tokens: int, cached_by_tier: tuple[int, int, int] = (0, 0, 0)) -> float:
        promote = sum(n * p for n, p in zip(cached_by_tier, self.promote_s_per_token))
        return self.overhead_s + uncached_tokens / self.prefill_tokens_per_s + promote


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """One simulation run."""

    num_replicas: int = 8
    # Device tier per replica, tokens, and its sliding TTL.
    cache_tokens: int = 1_000_000
    ttl_s: float = 300.0
    speculative_ttl_s: float = 30.0
    service: ServiceModel = ServiceModel()
    # The policy's knobs; its promote costs and prefill speed are the service model's.
    policy_config: PrefillPolicyConfig = PrefillPolicyConfig()
    # Host and disk tiers per replica, tokens (0: off), and their TTLs from demotion.
    host_tokens: int = 0
    disk_tokens: int = 0
    host_ttl_s: float = 3600.0
    disk_ttl_s: float = 86_400.0
    # False: the directory hears about the device tier only (a tier-blind router).
    tier_events: bool = True


@dataclass(slots=True)
class ReplayResult:
    """Aggregate metrics of one policy on one trace."""

    policy: str
    hit_rate: float
    # Share of prompt tokens cached in each tier (they sum to hit_rate).
    hit_rate_device: float
    hit_rate_host: float
    hit_rate_disk: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    # Busiest replica's prefill work / mean work (1.0 = perfectly balanced).
    imbalance: float
    num_requests: int = 0
    ttl_s: float | None = None
    # The pool's tiers per replica, tokens, and whether the router heard of host/disk.
    cache_tokens: int = 0
    host_tokens: int = 0
    disk_tokens: int = 0
    tier_events: bool = True

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Replica:
    rid: str
    cache: TieredCache
    free_at: float = 0.0
    work_s: float = 0.0
    seq_no: int = -1
    # Delivery time of the replica's latest event batch (batches arrive in order).
    last_batch_at: float = 0.0
    # Finish times of requests not finished yet (cache_aware counts requests).
    outstanding: list[float] = field(default_factory=list)


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake JSONL trace (ValueError with the line number on bad input)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(TraceRequest(d["timestamp"] / 1000.0, int(d["input_length"]),
                                        int(d.get("output_length", 0)), tuple(d["hash_ids"])))
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{i}: not a Mooncake trace line ({e})") from e
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: r.arrival_s)
    return out


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    k = min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[k]


class PoolSimulator:
    """N replicas, one routing policy, one trace; see the module docstring."""

    def __init__(self, policy: str, config: ReplayConfig) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if config.num_replicas <= 0 or min(config.cache_tokens, config.host_tokens, config.disk_tokens) < 0:
            raise ValueError("need at least one replica and non-negative cache sizes")
        self.policy = policy
        self.cfg = config
        cap = tuple(n // TRACE_BLOCK_TOKENS for n in (config.cache_tokens, config.host_tokens, config.disk_tokens))
        ttls = (config.ttl_s, config.host_ttl_s, config.disk_ttl_s)
        self.replicas = [_Replica(f"replica-{i}", TieredCache(cap, ttls, config.tier_events))
                         for i in range(config.num_replicas)]
        # The router knows the pool's prefill speed and promote costs (the service model).
        self.policy_config = replace(config.policy_config, promote_s_per_token=config.service.promote_s_per_token,
                                     prefill_tokens_per_s=config.service.prefill_tokens_per_s)
        self.directory = KVDirectory()
        self.spec = SpeculativeRoutes(ttl_s=config.speculative_ttl_s)
        self._pending: list[tuple[float, int, int, list]] = []  # (t, tiebreak, replica, events)
        self._n = 0
        self._rr = 0
        self._last_sweep = 0.0

    # -- event plumbing -------------------------------------------------------------

    def _emit(self, ri: int, t: float) -> None:
        """Queue replica ``ri``'s pending events for delivery at ``t`` (after its earlier ones)."""
        rep = self.replicas[ri]
        events = rep.cache.drain()
        if events:
            rep.last_batch_at = max(t, rep.last_batch_at)
            self._n += 1
            heapq.heappush(self._pending, (rep.last_batch_at, self._n, ri, events))

    def _advance(self, now: float) -> None:
        """Expire blocks due by ``now``; deliver every replica event batch due by ``now``."""
        for ri, rep in enumerate(self.replicas):
            rep.cache.expire(now)
            self._emit(ri, now)
        while self._pending and self._pending[0][0] <= now:
            t, _, ri, events = heapq.heappop(self._pending)
            rep = self.replicas[ri]
            rep.seq_no += 1
            self.directory.apply(KVEventBatch(rep.rid, rep.seq_no, t, events))
        if now - self._last_sweep >= 1.0:
            self.directory.sweep(now)
            self._last_sweep = now

    # -- routing --------------------------------------------------------------------

    def _loads(self, now: float) -> list[ReplicaLoad]:
        tps = self.cfg.service.prefill_tokens_per_s
        return [ReplicaLoad(r.rid, queued_prefill_tokens=int(max(0.0, r.free_at - now) * tps))
                for r in self.replicas]

    def _matches(self, req: TraceRequest, now: float) -> dict[str, PrefixMatch]:
        return merge_matches(self.directory.lookup(req.hash_ids, now), self.spec.lookup(req.hash_ids, now))

    def _choose(self, req: TraceRequest, now: float) -> int:
        n = len(self.replicas)
        if self.policy == "round_robin":
            self._rr = (self._rr + 1) % n
            return self._rr
        loads = self._loads(now)
        if self.policy == "least_loaded":
            return min(range(n), key=lambda i: (loads[i].queued_prefill_tokens, i))
        matches = self._matches(req, now)
        idx = {r.rid: i for i, r in enumerate(self.replicas)}
        if self.policy == "cache_aware":
            counts = [sum(1 for f in r.outstanding if f > now) for r in self.replicas]
            hi, lo = max(counts), min(counts)
            if hi - lo > 64 and hi > 1.5 * lo:
                return min(range(n), key=lambda i: (counts[i], i))
            best = max(matches.items(), key=lambda kv: (kv[1].num_blocks, -idx[kv[0]]), default=None)
            if best is not None:
                rate = min(best[1].num_blocks * TRACE_BLOCK_TOKENS, req.input_length) / req.input_length
                if rate > 0.3:
                    return idx[best[0]]
            return min(range(n), key=lambda i: (counts[i], loads[i].queued_prefill_tokens, i))
        ranked = rank_replicas(self.request_info(req), loads, matches, self.policy_config)
        return idx[ranked[0]]

    def request_info(self, req: TraceRequest) -> RequestInfo:
        """The request as kvferry's policy sees it (benchmarks override the tie-break seed)."""
        return RequestInfo(req.hash_ids, _num_tokens(req), TRACE_BLOCK_TOKENS)

    # -- service --------------------------------------------------------------------

    def _serve(self, ri: int, req: TraceRequest, now: float) -> tuple[float, tuple[int, int, int]]:
        """Queue ``req`` on replica ``ri``; return (TTFT, cached tokens per tier)."""
        rep = self.replicas[ri]
        start = max(now, rep.free_at)
        # The cache changes when the request starts; FIFO means only this replica's later
        # requests (which start after) can observe it, so updating it now is exact.
        rep.cache.expire(start)
        tiers = rep.cache.prefix(req.hash_ids)
        by_tier = [0, 0, 0]
        left = max(req.input_length - 1, 0)  # the last token is always computed
        for t in tiers:
            n = min(TRACE_BLOCK_TOKENS, left)
            by_tier[t] += n
            left -= n
        cached = (by_tier[0], by_tier[1], by_tier[2])
        service = self.cfg.service.service_s(req.input_length - sum(cached), cached)
        finish = start + service
        rep.free_at = finish
        rep.work_s += service
        rep.outstanding = [f for f in rep.outstanding if f > now]
        rep.outstanding.append(finish)
        rep.cache.use(req.hash_ids, len(tiers), start, finish)
        self._emit(ri, finish)
        return finish - now, cached

    def run(self, trace: Iterable[TraceRequest]) -> ReplayResult:
        """Replay the whole trace; return the aggregate metrics."""
        ttfts: list[float] = []
        cached_total = [0, 0, 0]
        tokens_total = 0
        for req in trace:
            now = req.arrival_s
            self._advance(now)
            ri = self._choose(req, now)
            if self.policy in ("cache_aware", "kvferry"):
                self.spec.record(req.hash_ids, self.replicas[ri].rid, now)
            ttft, cached = self._serve(ri, req, now)
            ttfts.append(ttft)
            for t in range(3):
                cached_total[t] += cached[t]
            tokens_total += req.input_length
        ttfts.sort()
        works = [r.work_s for r in self.replicas]
        mean_work = sum(works) / len(works)
        share = [c / tokens_total if tokens_total else 0.0 for c in cached_total]
        cfg = self.cfg
        return ReplayResult(
            policy=self.policy,
            hit_rate=sum(share),
            hit_rate_device=share[0],
            hit_rate_host=share[1],
            hit_rate_disk=share[2],
            ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else 0.0,
            ttft_p50_s=_percentile(ttfts, 0.50),
            ttft_p90_s=_percentile(ttfts, 0.90),
            ttft_p99_s=_percentile(ttfts, 0.99),
            imbalance=max(works) / mean_work if mean_work > 0 else 1.0,
            num_requests=len(ttfts),
            cache_tokens=cfg.cache_tokens,
            host_tokens=cfg.host_tokens,
            disk_tokens=cfg.disk_tokens,
            tier_events=cfg.tier_events,
        )


def _num_tokens(req: TraceRequest) -> int:
    # A trace's hash_ids cover ceil(input_length / 512) blocks, the last one partial; the
    # policy counts only full blocks as cacheable, so expose them as full (the simulator
    # caches whole trace blocks too) and never less than the prompt itself.
    return max(req.input_length, len(req.hash_ids) * TRACE_BLOCK_TOKENS)


def replay(trace: Sequence[TraceRequest], policies: Sequence[str], config: ReplayConfig) -> list[ReplayResult]:
    """Run each policy on the trace with a fresh pool."""
    return [PoolSimulator(p, config).run(trace) for p in policies]


def ttl_sweep(trace: Sequence[TraceRequest], ttls_s: Sequence[float], config: ReplayConfig,
              policy: str = "kvferry") -> list[ReplayResult]:
    """Hit rate and TTFT of one policy as the directory TTL varies."""
    out = []
    for ttl in ttls_s:
        res = PoolSimulator(policy, replace(config, ttl_s=ttl)).run(trace)
        res.ttl_s = ttl
        out.append(res)
    return out


def tier_comparison(trace: Sequence[TraceRequest], config: ReplayConfig) -> list[ReplayResult]:
    """kvferry on the device tier alone, then with ``config``'s tiers seen by a device-only
    router (the directory hears of the device tier only), then with tier-aware routing."""
    device_only = replace(config, host_tokens=0, disk_tokens=0)
    blind = replace(config, tier_events=False)
    return [PoolSimulator("kvferry", c).run(trace) for c in (device_only, blind, config)]
