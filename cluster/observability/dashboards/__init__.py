"""kvferry's Grafana dashboards as code: Pools, Prompt cache, KV transfer.

Public API (the CLI, the manifests and the live-Prometheus test use these):

- :func:`dashboards` -> ``{uid: JSON model}`` for Grafana;
- :func:`panel_queries` -> every panel query as a :class:`PanelQuery`;
- :func:`render_query` -> a query with the template variables filled in, ready for Prometheus;
- :data:`VARIABLE_QUERIES` -> what the cluster, application and pool variables list.

Each board is plain data (``spec.Board``) in its own module; ``render.py`` turns it into
Grafana JSON with grafana-foundation-sdk. ``files.py`` writes JSON and ConfigMaps,
``push.py`` uploads to a Grafana.
"""

from __future__ import annotations

from typing import Any

from cluster.observability.dashboards import kv_transfer, pools, prompt_cache
from cluster.observability.dashboards.queries import (
    DEFAULT_VARIABLES, VARIABLE_QUERIES, PanelQuery, VariableQuery, queries_of, render_query,
)
from cluster.observability.dashboards.render import render
from cluster.observability.dashboards.spec import CONDITIONS, Board

BOARDS: tuple[Board, ...] = (pools.BOARD, prompt_cache.BOARD, kv_transfer.BOARD)


def dashboards() -> dict[str, dict[str, Any]]:
    """Every board's Grafana JSON model, by uid (``kvferry-pools``, ...)."""
    return {b.uid: render(b) for b in BOARDS}


def panel_queries() -> list[PanelQuery]:
    """Every query of every panel of every board, in board and panel order."""
    return queries_of(BOARDS)


__all__ = ["BOARDS", "CONDITIONS", "DEFAULT_VARIABLES", "VARIABLE_QUERIES", "PanelQuery", "VariableQuery",
           "dashboards", "panel_queries", "render_query"]
