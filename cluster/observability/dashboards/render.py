"""A :class:`~cluster.observability.dashboards.spec.Board` as Grafana dashboard JSON.

Built with grafana-foundation-sdk's classic (schema v1) builders: that is the JSON Grafana's
``POST /api/dashboards/db`` and the kube-prometheus-stack ConfigMap sidecar both take, from
Grafana 10 on. Every panel and query reads the ``$datasource`` variable, so one file works
against whichever Prometheus a Grafana has.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from cluster.observability.dashboards.queries import VARIABLE_QUERIES, VariableQuery
from cluster.observability.dashboards.spec import Board, Panel, Target, ref_ids

with warnings.catch_warnings():
    # The SDK's classic Dashboard builder warns at import that v2 exists; v2 needs a Grafana
    # 12 feature flag, v1 works everywhere, so the warning is not for us.
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as builders
    from grafana_foundation_sdk.builders import prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as models

TAG = "kvferry"
DATASOURCE_VAR = "datasource"
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VAR + "}")
PANEL_HEIGHT = 8
_ALL = models.VariableOption(selected=True, text="All", value="$__all")


def _query_variable(v: VariableQuery) -> builders.QueryVariable:
    """A multi-value variable listing a label's values, "All" (= ``v.all_value``) selected first."""
    variable = (
        builders.QueryVariable(v.name)
        .label(v.name.capitalize())
        .datasource(DATASOURCE)
        .query(v.grafana_query)
        .definition(v.grafana_query)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(v.all_value)
        .current(_ALL)
    )
    return variable.regex(v.regex) if v.regex else variable


def variables() -> list[Any]:
    """datasource, cluster, application, pool: the four variables every board shares."""
    return [
        builders.DatasourceVariable(DATASOURCE_VAR).label("Prometheus").type("prometheus"),
        *(_query_variable(v) for v in VARIABLE_QUERIES),
    ]


def _query(target: Target, ref_id: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .expr(target.expr)
        .legend_format(target.legend)
        .ref_id(ref_id)
        .range()
    )


def _panel(spec: Panel) -> timeseries.Panel:
    """A time series panel: legend as a table (last, max) so pools compare side by side."""
    panel = (
        timeseries.Panel()
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .min(0)
        .span(spec.width)
        .height(PANEL_HEIGHT)
        .line_width(1)
        .fill_opacity(40 if spec.stack else 10)
        .legend(common_builders.VizLegendOptions()
                .show_legend(True)
                .display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM)
                .calcs(["lastNotNull", "max"]))
        .tooltip(common_builders.VizTooltipOptions()
                 .mode(common.TooltipDisplayMode.MULTI)
                 .sort(common.SortOrder.DESCENDING))
    )
    if spec.stack:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    if spec.max is not None:
        panel = panel.max(spec.max)
    if spec.decimals is not None:
        panel = panel.decimals(spec.decimals)
    for target, ref_id in zip(spec.targets, ref_ids(len(spec.targets)), strict=True):
        panel = panel.with_target(_query(target, ref_id))
    return panel


def _links() -> builders.DashboardLink:
    """A drop-down to the other kvferry boards, keeping the time range and variables."""
    return (
        builders.DashboardLink("kvferry")
        .type(models.DashboardLinkType.DASHBOARDS)
        .tags([TAG])
        .as_dropdown(True)
        .include_vars(True)
        .keep_time(True)
    )


def _builtin_annotations() -> builders.AnnotationQuery:
    """Grafana's own "Annotations & Alerts" (alert state changes, manual notes on the graphs).

    Grafana adds it to a dashboard it creates; a provisioned file must carry it itself, and
    an empty ``annotations`` object (the SDK's default) is not a list Grafana can read.
    """
    return (
        builders.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(common.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )


def render(board: Board) -> dict[str, Any]:
    """The dashboard JSON model of ``board`` (what Grafana stores), panel ids numbered 1.."""
    dash = (
        builders.Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags([TAG])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .link(_links())
        .annotation(_builtin_annotations())
        .variables(variables())
    )
    for row in board.rows:
        dash = dash.with_row(builders.Row(row.title))
        for panel in row.panels:
            dash = dash.with_panel(_panel(panel))
    model: dict[str, Any] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    # The SDK leaves ids unset (rows get 0); Grafana needs them unique for links and edits,
    # and stable ones keep the committed JSON's diffs small.
    for i, panel_json in enumerate(model["panels"], start=1):
        panel_json["id"] = i
    # The SDK pins links and annotations to "inControlsMenu" (Grafana 12's folded menu);
    # without it they sit in the dashboard's top bar, on every Grafana version.
    for item in [*model["links"], *model["annotations"]["list"]]:
        item.pop("placement", None)
    return model
