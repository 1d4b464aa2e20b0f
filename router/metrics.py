"""Prometheus metrics of the routers and the KV directory (``ray.util.metrics``).

Routers run inside the caller's process (the ingress replica routes to the decode pool,
decode replicas route to the prefill pool) and the directory is a plain Ray actor, so
neither gets Serve's ``deployment`` label for free: each metric carries a ``pool`` label.
Ray exports every name with a ``ray_`` prefix. ``MetricSpec`` is the shared catalogue
entry; ``cluster.metrics.CATALOG`` lists these beside the replicas' own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the directory's types only; keep this module light to import
    from router.directory import PrefixMatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (without Ray's ``ray_`` prefix), kind, meaning and label keys."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    labels: tuple[str, ...] = ()


# Why a request went where it went: a replica holding part of its prefix, the least
# loaded one (nothing cached anywhere useful), or Serve's power of two choices because the
# request carried no routing hints or the directory did not answer in time.
ROUTING_REASONS = ("prefix_hit", "least_loaded", "no_hints", "directory_unavailable")
# Memory tiers, as ``tier`` label values, in ``engine.kv_events.Tier`` order.
TIERS = ("device", "host", "disk")

ROUTER_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("kvferry_routing_decisions_total", "counter", "Routing decisions of a pool's router, by reason.",
               ("pool", "reason")),
    MetricSpec("kvferry_directory_entries", "gauge", "(replica, block) entries held by a pool's KV directory.",
               ("pool",)),
    MetricSpec("kvferry_directory_expirations_total", "counter", "Directory entries dropped at their TTL.",
               ("pool",)),
    MetricSpec("kvferry_directory_entries_by_tier", "gauge",
               "(replica, block) entries of a pool's KV directory, by the tier the replica holds the block in.",
               ("pool", "tier")),
    MetricSpec("kvferry_routing_prompt_tokens_total", "counter",
               "Prompt tokens of requests a pool's router placed with the directory's answer.", ("pool",)),
    MetricSpec("kvferry_routing_cached_tokens_total", "counter",
               "Of those, the prompt tokens the chosen replica held, by tier, as the router saw them (hit rate by "
               "tier = this / kvferry_routing_prompt_tokens_total).", ("pool", "tier")),
)
_BY_NAME = {s.name: s for s in ROUTER_CATALOG}


def _make(name: str) -> Any:
    """A ``ray.util.metrics`` object for a catalogue entry (created where it is first used)."""
    from ray.util import metrics as m

    spec = _BY_NAME[name]
    cls = {"counter": m.Counter, "gauge": m.Gauge}[spec.kind]
    return cls(spec.name, description=spec.description, tag_keys=spec.labels)


def cached_tokens_by_tier(match: PrefixMatch | None, num_tokens: int, block_size: int) -> tuple[int, int, int]:
    """Prompt tokens a replica's match holds per tier (device, host, disk), at most the prompt.

    Slower tiers are the deeper blocks in practice (a prefix is promoted from the front),
    so when the match covers more than the prompt the excess comes off the slowest tier.
    """
    if match is None or match.num_blocks == 0:
        return (0, 0, 0)
    per = [n * block_size for n in match.blocks_per_tier]
    if sum(per) != match.num_blocks * block_size:  # a bare (num_blocks, tier) match
        per = [0, 0, 0]
        per[int(match.tier)] = match.num_blocks * block_size
    excess = sum(per) - num_tokens
    for t in (2, 1, 0):
        if excess <= 0:
            break
        cut = min(excess, per[t])
        per[t] -= cut
        excess -= cut
    return (per[0], per[1], per[2])


class RoutingMetrics:
    """Counts a router's decisions; never raises (a metrics failure must not fail routing)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._decisions: Any = None
        self._prompt: Any = None
        self._cached: Any = None

    def decision(self, reason: str) -> None:
        try:
            if self._decisions is None:
                self._decisions = _make("kvferry_routing_decisions_total")
            self._decisions.inc(1, tags={"pool": self.pool, "reason": reason})
        except Exception as e:  # noqa: BLE001 - observability must not break the request path
            logger.debug("routing metric failed: %r", e)

    def routed(self, prompt_tokens: int, cached_by_tier: tuple[int, int, int]) -> None:
        """One request placed: its prompt tokens and what the chosen replica held, per tier."""
        try:
            if self._prompt is None:
                self._prompt = _make("kvferry_routing_prompt_tokens_total")
                self._cached = _make("kvferry_routing_cached_tokens_total")
            self._prompt.inc(prompt_tokens, tags={"pool": self.pool})
            for tier, n in zip(TIERS, cached_by_tier):
                if n:
                    self._cached.inc(n, tags={"pool": self.pool, "tier": tier})
        except Exception as e:  # noqa: BLE001
            logger.debug("routing metric failed: %r", e)


class DirectoryMetrics:
    """The directory actor's size and expirations; never raises."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._entries: Any = None
        self._expired: Any = None
        self._by_tier: Any = None
        self._last_expired = 0

    def publish(self, num_entries: int, num_expired: int, entries_by_tier: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Record a ``KVDirectory.stats()`` reading (``num_expired`` is cumulative)."""
        try:
            if self._entries is None:
                self._entries = _make("kvferry_directory_entries")
                self._expired = _make("kvferry_directory_expirations_total")
                self._by_tier = _make("kvferry_directory_entries_by_tier")
            tags = {"pool": self.pool}
            self._entries.set(num_entries, tags=tags)
            for tier, n in zip(TIERS, entries_by_tier):
                self._by_tier.set(n, tags={"pool": self.pool, "tier": tier})
            # Counter objects only go up: add what expired since the last reading (an
            # actor restart starts both at 0 again, which Prometheus' rate() handles).
            if num_expired > self._last_expired:
                self._expired.inc(num_expired - self._last_expired, tags=tags)
            self._last_expired = num_expired
        except Exception as e:  # noqa: BLE001
            logger.debug("directory metric failed: %r", e)
