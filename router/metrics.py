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
from typing import Any

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

ROUTER_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("kvferry_routing_decisions_total", "counter", "Routing decisions of a pool's router, by reason.",
               ("pool", "reason")),
    MetricSpec("kvferry_directory_entries", "gauge", "(replica, block) entries held by a pool's KV directory.",
               ("pool",)),
    MetricSpec("kvferry_directory_expirations_total", "counter", "Directory entries dropped at their TTL.",
               ("pool",)),
)
_BY_NAME = {s.name: s for s in ROUTER_CATALOG}


def _make(name: str) -> Any:
    """A ``ray.util.metrics`` object for a catalogue entry (created where it is first used)."""
    from ray.util import metrics as m

    spec = _BY_NAME[name]
    cls = {"counter": m.Counter, "gauge": m.Gauge}[spec.kind]
    return cls(spec.name, description=spec.description, tag_keys=spec.labels)


class RoutingMetrics:
    """Counts a router's decisions; never raises (a metrics failure must not fail routing)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._decisions: Any = None

    def decision(self, reason: str) -> None:
        try:
            if self._decisions is None:
                self._decisions = _make("kvferry_routing_decisions_total")
            self._decisions.inc(1, tags={"pool": self.pool, "reason": reason})
        except Exception as e:  # noqa: BLE001 - observability must not break the request path
            logger.debug("routing metric failed: %r", e)


class DirectoryMetrics:
    """The directory actor's size and expirations; never raises."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._entries: Any = None
        self._expired: Any = None
        self._last_expired = 0

    def publish(self, num_entries: int, num_expired: int) -> None:
        """Record a ``KVDirectory.stats()`` reading (``num_expired`` is cumulative)."""
        try:
            if self._entries is None:
                self._entries = _make("kvferry_directory_entries")
                self._expired = _make("kvferry_directory_expirations_total")
            tags = {"pool": self.pool}
            self._entries.set(num_entries, tags=tags)
            # Counter objects only go up: add what expired since the last reading (an
            # actor restart starts both at 0 again, which Prometheus' rate() handles).
            if num_expired > self._last_expired:
                self._expired.inc(num_expired - self._last_expired, tags=tags)
            self._last_expired = num_expired
        except Exception as e:  # noqa: BLE001
            logger.debug("directory metric failed: %r", e)
