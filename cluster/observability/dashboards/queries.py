"""Every panel query of the boards, and the substitution Grafana makes before sending one.

The live-Prometheus test evaluates each :class:`PanelQuery` (after :func:`render_query`)
through Prometheus' HTTP API: a query that returns nothing is a broken panel.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster.observability.dashboards import exprs
from cluster.observability.dashboards.spec import Board, ref_ids
from cluster.observability.promql import CLUSTER_LABEL, POOLS, SERVE_POOL_LABEL

# What Grafana puts in for each variable when everything is selected ("All"), and a rate
# window of a few scrape intervals (Grafana's $__rate_interval is 4 x the scrape interval).
DEFAULT_VARIABLES: dict[str, str] = {
    "cluster": exprs.ALL_CLUSTERS,
    "application": exprs.ALL_APPLICATIONS,
    "pool": exprs.ALL_POOLS,
    "__rate_interval": "1m",
}

# $name, ${name} and ${name:format} (Grafana's formats do not change a plain regex value).
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class VariableQuery:
    """A template variable listing the values of ``label`` on the series ``match`` selects.

    Grafana runs ``label_values(match, label)``; Prometheus' equivalent is
    ``GET /api/v1/label/<label>/values?match[]=<match>`` (after :func:`render_query`).
    """

    name: str
    label: str
    match: str
    all_value: str
    regex: str = ""  # Grafana keeps only the values this /regex/ matches

    @property
    def grafana_query(self) -> str:
        return f"label_values({self.match}, {self.label})"


# Serve's replica-health gauge exists for every deployment of every application as soon as
# Serve runs, so it is the series the variables take their values from. The pool variable
# keeps to the serving pools (not the ingress deployment).
_SOURCE = "ray_serve_deployment_replica_healthy"
VARIABLE_QUERIES: tuple[VariableQuery, ...] = (
    VariableQuery("cluster", CLUSTER_LABEL, _SOURCE, exprs.ALL_CLUSTERS),
    VariableQuery("application", "application", f'{_SOURCE}{{{CLUSTER_LABEL}=~"$cluster"}}', exprs.ALL_APPLICATIONS),
    VariableQuery("pool", SERVE_POOL_LABEL, f'{_SOURCE}{{{CLUSTER_LABEL}=~"$cluster", application=~"$application"}}',
                  exprs.ALL_POOLS, regex=f"/^({'|'.join(POOLS)})$/"),
)


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel, as Grafana sends it (before variable substitution).

    ``pool_label``: the result label that names the pool (``deployment``, ``pool`` or
    ``ray_io_group``), or ``None`` when the query does not split by pool.
    ``requires``: ``""`` when any kvferry serving traffic returns data, else a key of
    ``spec.CONDITIONS`` naming the event (GPU nodes, an API error, an eviction...) without
    which the series does not exist yet.
    """

    dashboard_uid: str
    panel_title: str
    ref_id: str
    expr: str
    legend: str = ""
    pool_label: str | None = None
    requires: str = ""


def board_queries(board: Board) -> list[PanelQuery]:
    """The queries of one board, panel by panel, with Grafana's refIds (A, B...)."""
    out = []
    for panel in board.panels():
        for target, ref_id in zip(panel.targets, ref_ids(len(panel.targets)), strict=True):
            out.append(PanelQuery(board.uid, panel.title, ref_id, target.expr, target.legend,
                                  target.pool_label, target.requires))
    return out


def queries_of(boards: Iterable[Board]) -> list[PanelQuery]:
    return [q for b in boards for q in board_queries(b)]


def render_query(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables filled in: ``variables`` over :data:`DEFAULT_VARIABLES`.

    ``$cluster``, ``${cluster}``, ``${cluster:regex}`` and ``$__rate_interval`` are all
    replaced; a variable with no value raises ``KeyError`` (a typo in a panel, caught here).
    """
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def fill(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(fill, expr)
