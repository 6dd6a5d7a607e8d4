"""Distributions of per-sample statistics: SGS and sample weights split by injected noise, weight trajectories.

Histograms are binned here with NumPy and drawn as bars, so a figure's size does not grow with the data and its
bar heights can be checked against ``numpy.histogram``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._common import (
    TEMPLATE,
    add,
    bar_heights,
    bin_edges,
    color_for,
    facet_figure,
    fill_doc,
    finish,
    finite,
    group_label,
    require,
    split,
    widen,
)


@fill_doc
def histogram(
    data_frame: pd.DataFrame,
    x: str,
    *,
    color: str | None = None,
    facet_col: str | None = None,
    nbins: int = 40,
    histnorm: str = "probability",
    range_x: tuple[float, float] | None = None,
    color_discrete_map: dict | None = None,
    describe: Callable[[np.ndarray], str] | None = None,
    title: str | None = None,
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Overlaid bar histograms of ``x`` per ``color`` group and ``facet_col`` panel, on shared bins.

    NaN values (statistics of missing labels) are left out.

    Parameters
    ----------
    {data_frame}
    x : str
        The column to bin.
    {color}
    {facet_col}
    {nbins}
    {histnorm}
    {range_x}
    {color_discrete_map}
    describe : callable or None
        ``describe(values)`` returns a note appended to each trace's name (e.g. a share of the values).
    {layout}

    {returns}
        One ``go.Bar`` per (panel, colour group), panel by panel; ``x`` holds the bin centres, ``y`` the heights.
    """
    require(data_frame, x, color, facet_col)
    edges = bin_edges(finite(data_frame[x]), nbins, range_x)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    panels = split(data_frame, facet_col)
    fig = facet_figure([value for value, _ in panels])
    names_shown: set[str] = set()
    for col, (_, panel) in enumerate(panels, start=1):
        for position, (value, rows) in enumerate(split(panel, color)):
            values = finite(rows[x])
            name = x if value is None else group_label(color, value)
            label = f"{name} {describe(values)}" if describe else name
            bar = go.Bar(
                x=centres, y=bar_heights(values, edges, histnorm), width=widths, name=label, legendgroup=name,
                showlegend=describe is not None or name not in names_shown, opacity=0.6,
                marker_color=color_for(name, position, color_discrete_map),
            )  # fmt: skip
            add(fig, bar, col)
            names_shown.add(name)
    fig.update_layout(barmode="overlay", bargap=0)
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=histnorm, col=1)
    return finish(fig, title=title, template=template, width=width, height=height)


@fill_doc
def sgs_histogram(
    data_frame: pd.DataFrame,
    x: str = "sgs",
    *,
    color: str | None = "noisy",
    facet_col: str | None = "task",
    nbins: int = 40,
    histnorm: str = "probability",
    range_x: tuple[float, float] | None = (-1.0, 1.0),
    color_discrete_map: dict | None = None,
    title: str | None = "Sample gradient similarity by label quality",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Distribution of SGS (the cosine between a sample's gradient and its reference) per task, clean against noisy.

    Parameters
    ----------
    {data_frame}
    x : str
        The similarity column: ``sgs`` (the run's training reference), ``sgs_batch`` or ``sgs_class``.
    {color}
    {facet_col}
    {nbins}
    {histnorm}
    {range_x}
    {color_discrete_map}
    {layout}

    {returns}
    """
    return histogram(
        data_frame, x, color=color, facet_col=facet_col, nbins=nbins, histnorm=histnorm, range_x=range_x,
        color_discrete_map=color_discrete_map, title=title, template=template, width=width, height=height,
    )  # fmt: skip


@fill_doc
def weight_histogram(
    data_frame: pd.DataFrame,
    x: str = "weight",
    *,
    color: str | None = "noisy",
    facet_col: str | None = "task",
    nbins: int = 40,
    histnorm: str = "probability",
    range_x: tuple[float, float] | None = None,
    color_discrete_map: dict | None = None,
    title: str | None = "Sample weights by label quality",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Distribution of the sample weights w (mean 1 per task and step) per task, clean against noisy.

    Parameters
    ----------
    {data_frame}
    x : str
        The weight column.
    {color}
    {facet_col}
    {nbins}
    {histnorm}
    {range_x}
    {color_discrete_map}
    {layout}

    {returns}
    """
    return histogram(
        data_frame, x, color=color, facet_col=facet_col, nbins=nbins, histnorm=histnorm, range_x=range_x,
        color_discrete_map=color_discrete_map, title=title, template=template, width=width, height=height,
    )  # fmt: skip


def pick_lines(ids_by_group: dict, max_lines: int, seed: int) -> dict:
    """A fixed-seed draw of at most ``max_lines`` ids in all, shared evenly between the groups (sorted per group)."""
    per_group = max(1, max_lines // max(len(ids_by_group), 1))
    rng = np.random.default_rng(seed)
    picked = {}
    for group, ids in ids_by_group.items():
        ids = np.sort(np.asarray(ids))
        picked[group] = ids if len(ids) <= per_group else np.sort(rng.choice(ids, size=per_group, replace=False))
    return picked


def _joined_lines(series: pd.DataFrame, x: str, y: str, line_group: str) -> tuple[list, list, list]:
    """x, y, line id lists with a None between lines, so that one trace draws many lines."""
    xs, ys, ids = [], [], []
    for line_id, rows in series.groupby(line_group, sort=True):
        xs += rows[x].tolist() + [None]
        ys += rows[y].tolist() + [None]
        ids += [line_id] * len(rows) + [None]
    return xs, ys, ids


@fill_doc
def weight_trajectories(
    data_frame: pd.DataFrame,
    x: str = "epoch",
    y: str = "weight",
    *,
    line_group: str = "sample_id",
    color: str | None = "noisy",
    facet_col: str | None = "task",
    max_lines: int = 40,
    seed: int = 0,
    color_discrete_map: dict | None = None,
    title: str | None = "Per-sample weight trajectories",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Each sample's weight over training (thin lines) and each group's mean (thick line).

    Rows sharing (panel, ``line_group``, ``x``) are averaged; a sample is seen once per epoch, so a line has one
    point per epoch and needs no downsampling. The thin lines are a fixed-seed draw of ``max_lines`` samples per
    panel, shared evenly between the colour groups; the mean line uses every sample. A thin line's points carry its
    id in ``customdata`` (None between lines).

    Parameters
    ----------
    {data_frame}
    x : str
        Time axis: ``epoch`` or ``step``.
    y : str
        The per-sample statistic (``weight``, or any other such as ``sgs``).
    line_group : str
        Column identifying one line (a sample).
    {color}
    {facet_col}
    max_lines : int
        Most thin lines per panel.
    {seed}
    {color_discrete_map}
    {layout}

    {returns}
    """
    require(data_frame, x, y, line_group, color, facet_col)
    panels = split(widen(data_frame, y), facet_col)
    fig = facet_figure([value for value, _ in panels])
    for col, (_, panel) in enumerate(panels, start=1):
        groups = split(panel, color)
        picked = pick_lines({value: panel_ids[line_group].unique() for value, panel_ids in groups}, max_lines, seed)
        for position, (value, rows) in enumerate(groups):
            name = y if value is None else group_label(color, value)
            colour = color_for(name, position, color_discrete_map)
            chosen = rows[rows[line_group].isin(picked[value])]
            lines = chosen.groupby([line_group, x], observed=True, sort=True)[y].mean().reset_index()
            xs, ys, ids = _joined_lines(lines, x, y, line_group)
            thin = go.Scatter(
                x=xs, y=ys, customdata=ids, mode="lines", name=f"{name} · samples", legendgroup=name,
                showlegend=col == 1, line={"color": colour, "width": 1}, opacity=0.35, connectgaps=False,
            )  # fmt: skip
            mean = rows.groupby(x, observed=True, sort=True)[y].mean()
            thick = go.Scatter(
                x=mean.index.to_numpy(), y=mean.to_numpy(), mode="lines+markers", name=f"{name} · mean",
                legendgroup=name, showlegend=col == 1, line={"color": colour, "width": 3},
            )  # fmt: skip
            add(fig, thin, col)
            add(fig, thick, col)
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y, col=1)
    return finish(fig, title=title, template=template, width=width, height=height)


@fill_doc
def sample_history(
    data_frame: pd.DataFrame,
    y: str = "sgs",
    x: str = "epoch",
    *,
    color: str | None = "task",
    color_discrete_map: dict | None = None,
    title: str | None = "One sample over training",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """One sample's statistic over training, one line per task (rows sharing ``x`` are averaged).

    Parameters
    ----------
    data_frame : pandas.DataFrame
        The records of one sample (or of any group whose mean is wanted).
    y, x : str
        The statistic and the time axis.
    {color}
    {color_discrete_map}
    {layout}

    {returns}
        One ``go.Scatter`` per colour group.
    """
    require(data_frame, x, y, color)
    fig = go.Figure()
    for position, (value, rows) in enumerate(split(widen(data_frame, y), color)):
        name = y if value is None else group_label(color, value)
        line = rows.groupby(x, observed=True, sort=True)[y].mean()
        fig.add_scatter(x=line.index.to_numpy(), y=line.to_numpy(), mode="lines+markers", name=name,
                        line={"color": color_for(name, position, color_discrete_map)})  # fmt: skip
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return finish(fig, title=title, template=template, width=width, height=height)
