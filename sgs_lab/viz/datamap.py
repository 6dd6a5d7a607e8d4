"""Data maps (Swayamdipta et al., "Dataset Cartography", EMNLP 2020): each sample's mean of a per-epoch statistic
against its variability over epochs, coloured by injected noise.

With ``value="p_label"`` (the probability of the given label) the mean is Cartography's confidence; mislabelled
samples gather at low confidence and low variability ("hard to learn"). With ``value="sgs_class"`` (or ``sgs``) the
map shows how consistently a sample's gradient agrees with its reference.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ._common import (
    MAX_POINTS,
    TEMPLATE,
    add,
    color_for,
    facet_figure,
    fill_doc,
    finish,
    group_label,
    require,
    scatter_type,
    split,
    subsample,
    widen,
)

AXIS_TITLES = {
    "p_label": "confidence: mean p(given label)",
    "sgs": "mean SGS",
    "sgs_batch": "mean SGS (batch reference)",
    "sgs_class": "mean SGS (class reference)",
}
HOVER = "{hover_name} %{{customdata}}<br>variability %{{x:.3f}}<br>mean %{{y:.3f}}<extra>{name}</extra>"
CARRIED = ("noisy", "label", "clean_label")  # constant per (task, sample): carried over from the first row


def data_map_table(
    data_frame: pd.DataFrame, value: str = "p_label", *, by: tuple[str, ...] = ("task", "sample_id")
) -> pd.DataFrame:
    """Per sample: mean and variability (standard deviation, ddof = 0 as in Cartography) of ``value`` over its rows.

    A sample is seen once per epoch, so over all rows of a run these are statistics over epochs. NaN values
    (missing labels) are left out.

    Parameters
    ----------
    data_frame : pandas.DataFrame
        Per-sample records.
    value : str
        The per-epoch statistic.
    by : tuple of str
        Columns identifying one point.

    Returns
    -------
    pandas.DataFrame
        One row per ``by`` group: the ``by`` columns, mean, variability, epochs (rows averaged), and noisy, label,
        clean_label where present.
    """
    require(data_frame, value, *by)
    grouped = widen(data_frame, value).groupby(list(by), observed=True, sort=True)
    table = pd.DataFrame({
        "mean": grouped[value].mean(), "variability": grouped[value].std(ddof=0), "epochs": grouped[value].count(),
    })  # fmt: skip
    for column in CARRIED:
        if column in data_frame.columns and column not in by:
            table[column] = grouped[column].first()
    return table.reset_index()


@fill_doc
def data_map(
    data_frame: pd.DataFrame,
    value: str = "p_label",
    *,
    color: str | None = "noisy",
    facet_col: str | None = "task",
    hover_name: str = "sample_id",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    color_discrete_map: dict | None = None,
    title: str | None = "Data map",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Scatter of each sample's mean ``value`` (y) against its variability over epochs (x).

    Points come from :func:`data_map_table`; each trace's ``customdata`` holds the points' ``hover_name`` values
    (the sample ids), which a click handler can read.

    Parameters
    ----------
    {data_frame}
    value : str
        The per-epoch statistic: ``p_label`` (confidence), ``sgs``, ``sgs_class``, ``loss``, ...
    {color}
    {facet_col}
    hover_name : str
        Column identifying a point (shown on hover, kept in ``customdata``).
    {max_points}
    {seed}
    {color_discrete_map}
    {layout}

    {returns}
    """
    by = tuple(dict.fromkeys(c for c in (facet_col, hover_name) if c))
    table = data_map_table(data_frame, value, by=by)
    require(table, color)
    table, webgl = subsample(table, max_points, seed)
    panels = split(table, facet_col)
    fig = facet_figure([name for name, _ in panels])
    for col, (_, panel) in enumerate(panels, start=1):
        for position, (group, rows) in enumerate(split(panel, color)):
            name = value if group is None else group_label(color, group)
            points = scatter_type(webgl)(
                x=rows["variability"].to_numpy(), y=rows["mean"].to_numpy(), customdata=rows[hover_name].to_numpy(),
                mode="markers", name=name, legendgroup=name, showlegend=col == 1, opacity=0.7,
                marker={"size": 5, "color": color_for(name, position, color_discrete_map)},
                hovertemplate=HOVER.format(hover_name=hover_name, name=name),
            )  # fmt: skip
            add(fig, points, col)
    fig.update_xaxes(title_text="variability: std over epochs")
    fig.update_yaxes(title_text=AXIS_TITLES.get(value, f"mean {value}"), col=1)
    return finish(fig, title=title, template=template, width=width, height=height)
