"""Routing policies: pure functions of snapshots that rank replicas for one request.

No I/O, no clocks, no Ray: the Serve ``RequestRouter`` adapters (``router.serve_routers``)
and the trace simulator (``router.replay``) gather the same snapshots — the request's
block hashes and token count, per-replica load, the directory's prefix match — and call
the very same functions, so what ``kvferry replay`` measures is what production runs.

Prefill pool (:func:`rank_replicas`), the Dynamo-style time-to-first-token cost::

    cost(r) = queued_prefill_tokens(r) + uncached_tokens(r)
    uncached_tokens(r) = num_tokens - block_size * sum_t(credit_t * blocks_t(r))
    credit_t = 1 - promote_s_per_token[t] * prefill_tokens_per_s

where ``blocks_t(r)`` counts the leading blocks ``r`` holds in tier ``t`` (device, host,
disk) and the last prompt token is always recomputed. A block in host memory or on disk
must be promoted to the device before it is used: it saves its recompute time minus its
**measured promote time** (``benchmarks/promote_cost.py``; ``credit_t`` is floored at 0),
so a host hit is worth almost a device hit and a disk hit somewhat less, whatever the
hardware — set ``promote_s_per_token`` for yours. Both terms are tokens of prefill work,
divided by the replica's prefill speed when it reports one, so the cost reads as seconds
until the first token; ``prefill_tokens_per_s`` converts promote seconds into tokens when
it does not. A **load-imbalance valve** then demotes replicas whose queue exceeds
``imbalance_ratio`` x the shortest queue plus ``imbalance_abs_tokens``: a hot prefix may
pull traffic onto its replica, but not starve the rest of the pool. Full replicas are
never ranked.

Decode pool (:func:`rank_decode_replicas`): conversation affinity against decode load::

    cost(r) = load(r) - affinity_weight * cached_fraction(r)
    load(r) = max(num_running / max_num_seqs, kv_usage)

so a multi-turn chat returns to the replica holding its history unless that replica is
clearly busier than the others.

Ties are broken deterministically by rendezvous hashing of a per-request seed with the
replica id (then the id itself). The seed is ``RequestInfo.tiebreak_seed`` when the caller
has one, else the prompt's *last* full block hash — a chained hash, so it differs whenever
any part of the prompt differs. (It used to be the *first* block: when every prompt starts
with the same system-prompt block, every tie went the same way and loaded one replica
more than the rest.) Equal-cost replicas are ordered the same way every time for the
same prompt, while different prompts spread over the pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import xxhash

from engine.block_hash import BlockHash
from router.directory import PrefixMatch

# Promote time per cached token from each tier, measured by benchmarks/promote_cost.py on
# the project's 2-core CPU box (BENCHMARKS.md, "Tier promote cost"): one KV block of the
# default model (SmolLM2-135M, fp32, 16-token blocks, 720 KiB) copied from a second pool in
# host memory within a 32-block run (18-23 us/token over two runs), and read from a block
# file out of the page cache then copied (206-363 us/token). GPUs: measure yours with the
# same script and set RoutingConfig's host/disk_promote_us_per_token.
HOST_PROMOTE_US_PER_TOKEN: float = 20.0
DISK_PROMOTE_US_PER_TOKEN: float = 300.0
DEFAULT_PROMOTE_S_PER_TOKEN: tuple[float, float, float] = (
    0.0, HOST_PROMOTE_US_PER_TOKEN * 1e-6, DISK_PROMOTE_US_PER_TOKEN * 1e-6)
# Prefill speed that turns promote seconds into tokens of prefill work when a replica
# reports none: the default model's prefill on one torch thread on that box, same runs
# (41-58 tokens/s on the loaded box). A host hit then saves 99.9% of its recompute, a disk
# hit 98.5%.
DEFAULT_PREFILL_TOKENS_PER_S: float = 50.0


def tier_credits(promote_s_per_token: tuple[float, float, float], prefill_tokens_per_s: float) -> tuple[float, float, float]:
    """Fraction of a cached block's prefill work saved, per tier: 1 - promote time / recompute time."""
    if prefill_tokens_per_s <= 0:
        raise ValueError(f"prefill_tokens_per_s must be positive, got {prefill_tokens_per_s}")
    d, h, k = (max(0.0, 1.0 - p * prefill_tokens_per_s) for p in promote_s_per_token)
    return (d, h, k)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The request as the router sees it."""

    # Chained hashes of the prompt's full blocks (engine.block_hash).
    block_hashes: Sequence[BlockHash]
    # Prompt length in tokens (>= len(block_hashes) * block_size).
    num_tokens: int
    # Tokens per block.
    block_size: int
    # Seeds the tie-break between equal-cost replicas (something that differs per request
    # or conversation); None: the prompt's last full block hash (or its length).
    tiebreak_seed: int | None = None


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's load snapshot (engine stats plus the router's own in-flight view)."""

    replica_id: str
    # Prompt tokens admitted but not prefilled yet (waiting + the rest of running prefills).
    queued_prefill_tokens: int = 0
    # Sequences running / waiting on the replica.
    num_running: int = 0
    num_waiting: int = 0
    # Capacity in sequences; None = unknown (never "full" on this count).
    max_num_seqs: int | None = None
    # KV cache usage in [0, 1].
    kv_usage: float = 0.0
    # Free KV blocks; None = unknown.
    num_free_blocks: int | None = None
    # Measured prefill speed; None = assume the pool is homogeneous (cost in tokens).
    prefill_tokens_per_s: float | None = None
    # The replica refuses new work right now (e.g. Serve's max_ongoing_requests reached).
    is_full: bool = False


@dataclass(frozen=True, slots=True)
class PrefillPolicyConfig:
    """Knobs of :func:`rank_replicas`."""

    # Seconds to promote one cached token's KV to the device, per tier (device, host, disk).
    promote_s_per_token: tuple[float, float, float] = DEFAULT_PROMOTE_S_PER_TOKEN
    # Prefill speed for replicas that report none (converts promote seconds to tokens).
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    # Weight of the request's own uncached tokens against the queue ahead of it.
    uncached_weight: float = 1.0
    # Valve: a queue longer than ratio * shortest + abs tokens is demoted.
    imbalance_ratio: float = 2.0
    imbalance_abs_tokens: int = 32_768


@dataclass(frozen=True, slots=True)
class DecodePolicyConfig:
    """Knobs of :func:`rank_decode_replicas`."""

    promote_s_per_token: tuple[float, float, float] = DEFAULT_PROMOTE_S_PER_TOKEN
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    # How much a fully cached conversation is worth, in units of load (0..1).
    affinity_weight: float = 0.5
    # Valve: replicas more than this much load above the least loaded one are demoted.
    imbalance_load: float = 0.5


def cached_tokens(match: PrefixMatch | None, request: RequestInfo, credits: tuple[float, float, float]) -> float:
    """Tier-weighted prefill tokens a replica's match saves (never the last token)."""
    if match is None or match.num_blocks == 0:
        return 0.0
    d, h, k = match.blocks_per_tier
    if d + h + k != match.num_blocks:  # a bare (num_blocks, tier) match: all in `tier`
        per = [0, 0, 0]
        per[int(match.tier)] = match.num_blocks
        d, h, k = per
    saved = request.block_size * (credits[0] * d + credits[1] * h + credits[2] * k)
    return min(saved, float(max(request.num_tokens - 1, 0)))


def tiebreak_seed(request: RequestInfo) -> int:
    """The request's tie-break seed (see the module docstring), 64 bits."""
    if request.tiebreak_seed is not None:
        seed = request.tiebreak_seed
    elif request.block_hashes:
        seed = request.block_hashes[-1]
    else:
        seed = request.num_tokens
    return seed & 0xFFFFFFFFFFFFFFFF


def _tiebreak(seed: int, replica_id: str) -> int:
    return xxhash.xxh3_64_intdigest(replica_id.encode(), seed=seed)


def _validate(request: RequestInfo) -> None:
    if request.block_size <= 0:
        raise ValueError(f"block_size must be positive, got {request.block_size}")
    if request.num_tokens < len(request.block_hashes) * request.block_size:
        raise ValueError(
            f"num_tokens={request.num_tokens} is shorter than its "
            f"{len(request.block_hashes)} full blocks of {request.block_size}"
        )


def _is_full(load: ReplicaLoad, need_blocks: int) -> bool:
    if load.is_full:
        return True
    if load.max_num_seqs is not None and load.num_running + load.num_waiting >= load.max_num_seqs:
        return True
    return load.num_free_blocks is not None and load.num_free_blocks < need_blocks


def prefill_costs(
    request: RequestInfo,
    loads: Sequence[ReplicaLoad],
    matches: Mapping[str, PrefixMatch],
    config: PrefillPolicyConfig = PrefillPolicyConfig(),
) -> dict[str, float]:
    """Estimated time to first token (tokens, or seconds with a measured speed) per replica."""
    _validate(request)
    default_credits = tier_credits(config.promote_s_per_token, config.prefill_tokens_per_s)
    out = {}
    for ld in loads:
        credits = (tier_credits(config.promote_s_per_token, ld.prefill_tokens_per_s)
                   if ld.prefill_tokens_per_s else default_credits)
        uncached = request.num_tokens - cached_tokens(matches.get(ld.replica_id), request, credits)
        work = ld.queued_prefill_tokens + config.uncached_weight * uncached
        out[ld.replica_id] = work / ld.prefill_tokens_per_s if ld.prefill_tokens_per_s else float(work)
    return out


def rank_replicas(
    request: RequestInfo,
    loads: Sequence[ReplicaLoad],
    matches: Mapping[str, PrefixMatch],
    config: PrefillPolicyConfig = PrefillPolicyConfig(),
) -> list[str]:
    """Prefill pool: replica ids, best first; full replicas are left out (may be empty)."""
    costs = prefill_costs(request, loads, matches, config)
    need = 0  # a prefill replica allocates as it goes; only Serve's own fullness counts
    open_ = [ld for ld in loads if not _is_full(ld, need)]
    if not open_:
        return []
    shortest = min(ld.queued_prefill_tokens for ld in open_)
    limit = config.imbalance_ratio * shortest + config.imbalance_abs_tokens
    seed = tiebreak_seed(request)

    def key(ld: ReplicaLoad) -> tuple:
        demoted = ld.queued_prefill_tokens > limit
        return (demoted, costs[ld.replica_id], _tiebreak(seed, ld.replica_id), ld.replica_id)

    return [ld.replica_id for ld in sorted(open_, key=key)]


def rank_decode_replicas(
    request: RequestInfo,
    loads: Sequence[ReplicaLoad],
    matches: Mapping[str, PrefixMatch],
    config: DecodePolicyConfig = DecodePolicyConfig(),
) -> list[str]:
    """Decode pool: replica ids, best first; full replicas are left out (may be empty).

    A replica is full when it runs ``max_num_seqs`` sequences or lacks the free KV
    blocks for the part of the prompt (plus one block to decode into) it does not hold.
    """
    _validate(request)
    num_blocks_total = -(-request.num_tokens // request.block_size) + 1
    credits = tier_credits(config.promote_s_per_token, config.prefill_tokens_per_s)
    scored = []
    for ld in loads:
        m = matches.get(ld.replica_id)
        held = m.num_blocks if m is not None else 0
        if _is_full(ld, num_blocks_total - held):
            continue
        frac = ld.num_running / ld.max_num_seqs if ld.max_num_seqs else 0.0
        load = max(frac, ld.kv_usage)
        affinity = cached_tokens(m, request, credits) / max(request.num_tokens, 1)
        scored.append((load, load - config.affinity_weight * affinity, ld.replica_id))
    if not scored:
        return []
    least = min(s[0] for s in scored)
    seed = tiebreak_seed(request)
    scored.sort(key=lambda s: (s[0] > least + config.imbalance_load, s[1], _tiebreak(seed, s[2]), s[2]))
    return [s[2] for s in scored]


def merge_matches(*sources: Mapping[str, PrefixMatch]) -> dict[str, PrefixMatch]:
    """Per replica, the longest of several matches (directory + speculative entries)."""
    out: dict[str, PrefixMatch] = {}
    for src in sources:
        for rid, m in src.items():
            cur = out.get(rid)
            if cur is None or m.num_blocks > cur.num_blocks:
                out[rid] = m
    return out
