"""Trace-driven simulator of one prefill pool: routing policies compared on real traces.

``kvferry replay TRACE [--replicas N] [--cache-tokens C] [--policies ...]`` runs it
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
* ``service_s = overhead_s + uncached_tokens / prefill_tokens_per_s``; defaults 20 ms and
  10,000 tokens/s (an 8B model on one H100-class GPU). Cached tokens are free: the blocks
  are already in device memory.
* ``TTFT = finish - arrival`` (queueing + service). Decode is not simulated.
* Cache: each replica keeps an LRU of ``cache_tokens // 512`` blocks. A request hits the
  longest prefix of its ``hash_ids`` present when it *starts*; its blocks are inserted (or
  refreshed) when it starts, and evicted blocks leave the LRU tail.
* Events: the replica's stores, touches and evictions reach the directory when the
  request *finishes* (the engine emits them per step; flush latency is folded in), with
  ``expires_at = finish + ttl_s`` (sliding). The directory is swept every second.
* Hit rate = cached prompt tokens / prompt tokens (the last token is always computed).

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
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.kv_events import BlockRemoved, BlockStored, BlockTouched, KVEventBatch, Tier
from router.directory import KVDirectory, PrefixMatch
from router.policy import PrefillPolicyConfig, ReplicaLoad, RequestInfo, merge_matches, rank_replicas
from router.speculative import SpeculativeRoutes

TRACE_BLOCK_TOKENS = 512
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

    def service_s(self, uncached_tokens: int) -> float:
        return self.overhead_s + uncached_tokens / self.prefill_tokens_per_s


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """One simulation run."""

    num_replicas: int = 8
    cache_tokens: int = 1_000_000
    ttl_s: float = 300.0
    speculative_ttl_s: float = 30.0
    service: ServiceModel = ServiceModel()
    policy_config: PrefillPolicyConfig = PrefillPolicyConfig()


@dataclass(slots=True)
class ReplayResult:
    """Aggregate metrics of one policy on one trace."""

    policy: str
    hit_rate: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    # Busiest replica's prefill work / mean work (1.0 = perfectly balanced).
    imbalance: float
    num_requests: int = 0
    ttl_s: float | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Replica:
    rid: str
    capacity_blocks: int
    lru: OrderedDict = field(default_factory=OrderedDict)
    free_at: float = 0.0
    work_s: float = 0.0
    seq_no: int = -1
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
        if config.num_replicas <= 0 or config.cache_tokens < 0:
            raise ValueError("need at least one replica and a non-negative cache size")
        self.policy = policy
        self.cfg = config
        cap = config.cache_tokens // TRACE_BLOCK_TOKENS
        self.replicas = [_Replica(f"replica-{i}", cap) for i in range(config.num_replicas)]
        self.directory = KVDirectory()
        self.spec = SpeculativeRoutes(ttl_s=config.speculative_ttl_s)
        self._pending: list[tuple[float, int, int, list]] = []  # (t, tiebreak, replica, events)
        self._n = 0
        self._rr = 0
        self._last_sweep = 0.0

    # -- event plumbing -------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Deliver every replica event batch due by ``now`` to the directory."""
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
        info = RequestInfo(req.hash_ids, _num_tokens(req), TRACE_BLOCK_TOKENS)
        ranked = rank_replicas(info, loads, matches, self.cfg.policy_config)
        return idx[ranked[0]]

    # -- service --------------------------------------------------------------------

    def _serve(self, ri: int, req: TraceRequest, now: float) -> tuple[float, int]:
        """Queue ``req`` on replica ``ri``; return (TTFT, cached tokens)."""
        rep = self.replicas[ri]
        lru = rep.lru
        hit_blocks = 0
        for h in req.hash_ids:
            if h not in lru:
                break
            hit_blocks += 1
        cached = min(hit_blocks * TRACE_BLOCK_TOKENS, max(req.input_length - 1, 0))
        start = max(now, rep.free_at)
        service = self.cfg.service.service_s(req.input_length - cached)
        finish = start + service
        rep.free_at = finish
        rep.work_s += service
        rep.outstanding = [f for f in rep.outstanding if f > now]
        rep.outstanding.append(finish)
        # The LRU changes when the request starts; FIFO means only this replica's later
        # requests (which start after) can observe it, so updating it now is exact.
        touched = list(req.hash_ids[:hit_blocks])
        new = list(req.hash_ids[hit_blocks:])
        for h in req.hash_ids:
            lru[h] = None
            lru.move_to_end(h)
        evicted = []
        while len(lru) > rep.capacity_blocks:
            evicted.append(lru.popitem(last=False)[0])
        exp = finish + self.cfg.ttl_s
        events = []
        if evicted:
            events.append(BlockRemoved(tuple(evicted)))
        if touched:
            events.append(BlockTouched(tuple(touched), exp))
        kept = [h for h in new if h in lru]
        if kept:
            events.append(BlockStored(tuple(kept), touched[-1] if touched else None, Tier.DEVICE, exp))
        self._n += 1
        heapq.heappush(self._pending, (finish, self._n, ri, events))
        return finish - now, cached

    def run(self, trace: Iterable[TraceRequest]) -> ReplayResult:
        """Replay the whole trace; return the aggregate metrics."""
        ttfts: list[float] = []
        cached_total = 0
        tokens_total = 0
        for req in trace:
            now = req.arrival_s
            self._advance(now)
            ri = self._choose(req, now)
            if self.policy in ("cache_aware", "kvferry"):
                self.spec.record(req.hash_ids, self.replicas[ri].rid, now)
            ttft, cached = self._serve(ri, req, now)
            ttfts.append(ttft)
            cached_total += cached
            tokens_total += req.input_length
        ttfts.sort()
        works = [r.work_s for r in self.replicas]
        mean_work = sum(works) / len(works)
        return ReplayResult(
            policy=self.policy,
            hit_rate=cached_total / tokens_total if tokens_total else 0.0,
            ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else 0.0,
            ttft_p50_s=_percentile(ttfts, 0.50),
            ttft_p90_s=_percentile(ttfts, 0.90),
            ttft_p99_s=_percentile(ttfts, 0.99),
            imbalance=max(works) / mean_work if mean_work > 0 else 1.0,
            num_requests=len(ttfts),
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
        cfg = ReplayConfig(config.num_replicas, config.cache_tokens, ttl, config.speculative_ttl_s,
                           config.service, config.policy_config)
        res = PoolSimulator(policy, cfg).run(trace)
        res.ttl_s = ttl
        out.append(res)
    return out

