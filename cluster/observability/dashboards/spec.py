"""What a dashboard says, as plain data: boards of rows of panels of queries.

The three boards (``pools.py``, ``prompt_cache.py``, ``kv_transfer.py``) are written as these
values; ``render.py`` turns them into Grafana JSON with grafana-foundation-sdk, and
``queries.py`` lists every query for the live-Prometheus test. One source, two readers, so
the queries tested are the queries shown.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from cluster.metrics import CATALOG
from cluster.observability.promql import GROUP_LABEL, ROUTER_POOL_LABEL, SERVE_POOL_LABEL

# Conditions under which a query returns data beyond "kvferry serves traffic": Ray creates a
# counter's series at its first increment and a gauge at its first set, so these panels show
# "No data" until the event they count has happened once.
CONDITIONS: dict[str, str] = {
    "gpu": "GPU nodes (Ray exports ray_node_gpus_utilization only where it sees a GPU)",
    "api_errors": "the ingress answered at least one error (any code but ok)",
    "kv_evictions": "an engine dropped a cached KV block (TTL expiry or eviction for room)",
    "directory_expiry": "a KV directory entry reached its TTL",
    "explicit_cache_expiry": "an explicit cache (Gemini cachedContents) reached its expiry",
    "transfer_failure": "a KV transfer failed or the prefill pool was unavailable (local recompute)",
}

# Labels that name the pool in a query's result, by the family of metric it reads.
POOL_LABELS = (SERVE_POOL_LABEL, ROUTER_POOL_LABEL, GROUP_LABEL)


@dataclass(frozen=True)
class Target:
    """One query of a panel.

    ``pool_label``: the result label naming the pool (``deployment``, ``pool``,
    ``ray_io_group``), or ``None`` when the query does not split by pool.
    ``requires``: a key of :data:`CONDITIONS`, or ``""`` when any kvferry serving traffic
    returns data.
    """

    expr: str
    legend: str
    pool_label: str | None = SERVE_POOL_LABEL
    requires: str = ""

    def __post_init__(self) -> None:
        if self.requires and self.requires not in CONDITIONS:
            raise ValueError(f"unknown condition {self.requires!r}; known: {sorted(CONDITIONS)}")
        if self.pool_label is not None and self.pool_label not in POOL_LABELS:
            raise ValueError(f"{self.pool_label!r} does not name a pool; known: {POOL_LABELS}")


@dataclass(frozen=True)
class Panel:
    """A time-series panel: Grafana unit id (``s``, ``Bps``, ``percentunit``...), width of 24."""

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    width: int = 12
    stack: bool = False
    max: float | None = None  # 1.0 for ratios, so 100 % is the top of the axis
    decimals: int | None = None


@dataclass(frozen=True)
class Row:
    """A titled row of panels (laid out left to right, wrapping at 24 columns)."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Board:
    """One dashboard: a stable uid (its URL and its ConfigMap name), title, rows."""

    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]

    def panels(self) -> list[Panel]:
        return [p for r in self.rows for p in r.panels]


def describe(name: str) -> str:
    """The CATALOG description of a kvferry metric (panel descriptions quote the source)."""
    for spec in CATALOG:
        if spec.name == name:
            return spec.description
    raise KeyError(f"{name} is not in cluster.metrics.CATALOG")


def ref_ids(n: int) -> list[str]:
    """Grafana's query names: A, B, C..."""
    return list(string.ascii_uppercase[:n])
