"""Task conflicts: a task × task matrix, its evolution over training and the distribution over samples.

What is shown. The records keep, per sample and task, ``conflict``: for two tasks the cosine between the sample's
gradients for the two tasks (the same value on both tasks' rows), for more tasks the *minimum* of those cosines over
the other tasks. The cosine between the tasks' batch-mean gradients is not recorded. So the matrix shows the mean
per-sample conflict: for T = 2 the off-diagonal cell is the mean over samples of the pairwise cosine; for T > 2 every
off-diagonal cell of row t holds the mean of task t's minimum over the other tasks (a pessimistic summary, the same
across the row). The diagonal is 1, a gradient's cosine with itself. Rows without a value (a sample the other task
does not label) are left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._common import TEMPLATE, color_for, fill_doc, finish, ordered_values, require, widen
from .distributions import histogram


def _per_task(data_frame: pd.DataFrame, task: str, conflict: str) -> list[tuple[str, pd.DataFrame]]:
    """[(task, its rows with a finite conflict)]; the rows of every task, in the run's task order."""
    rows = data_frame[np.isfinite(data_frame[conflict].to_numpy(dtype=float))]
    return [(name, rows[rows[task] == name]) for name in ordered_values(data_frame[task])]


def task_conflict_table(
    data_frame: pd.DataFrame, *, by: str | None = None, conflict: str = "conflict", task: str = "task"
) -> pd.DataFrame:
    """Mean per-sample conflict for every ordered task pair, optionally per value of ``by``.

    Parameters
    ----------
    data_frame : pandas.DataFrame
        Per-sample records with ``task`` and ``conflict`` columns (and ``by``, e.g. ``step`` or ``epoch``).
    by : str or None
        Column to compute the matrix for each value of; None: one matrix over all rows.
    conflict, task : str
        Column names.

    Returns
    -------
    pandas.DataFrame
        Columns [``by``,] task_a, task_b, cosine, samples (rows averaged; 0 on the diagonal, whose cosine is 1 by
        definition). See the module docstring for what the off-diagonal values are when there are more than 2 tasks.
    """
    require(data_frame, conflict, task, by)
    data_frame = widen(data_frame, conflict)
    tasks = ordered_values(data_frame[task])
    parts = []
    for name, rows in _per_task(data_frame, task, conflict):
        if by:
            grouped = rows.groupby(by, observed=True, sort=True)[conflict]
            mean, count = grouped.mean(), grouped.count()
        else:
            mean, count = pd.Series([rows[conflict].mean()]), pd.Series([len(rows)])
        for other in tasks:
            same = other == name
            part = pd.DataFrame({
                "task_a": name, "task_b": other, "cosine": np.ones(len(mean)) if same else mean.to_numpy(dtype=float),
                "samples": np.zeros(len(mean), dtype=int) if same else count.to_numpy(),
            })  # fmt: skip
            if by:
                part.insert(0, by, mean.index.to_numpy())
            parts.append(part)
    columns = [*([by] if by else []), "task_a", "task_b", "cosine", "samples"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


@fill_doc
def task_conflict_heatmap(
    data_frame: pd.DataFrame,
    *,
    conflict: str = "conflict",
    task: str = "task",
    title: str | None = "Task conflict: mean per-sample cosine between task gradients",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Task × task heatmap of the mean per-sample gradient cosine (red: conflicting, blue: aligned).

    Filter ``data_frame`` to one epoch or step to see that moment; the module docstring says what the cells hold.

    Parameters
    ----------
    {data_frame}
    conflict, task : str
        Column names.
    {layout}

    {returns}
        One ``go.Heatmap`` whose ``z[i][j]`` is the cell (task ``y[i]``, task ``x[j]``).
    """
    table = task_conflict_table(data_frame, conflict=conflict, task=task)
    tasks = ordered_values(data_frame[task])
    matrix = table.pivot(index="task_a", columns="task_b", values="cosine").reindex(index=tasks, columns=tasks)
    counts = table.pivot(index="task_a", columns="task_b", values="samples").reindex(index=tasks, columns=tasks)
    heatmap = go.Heatmap(
        z=matrix.to_numpy(), x=[str(t) for t in tasks], y=[str(t) for t in tasks], zmin=-1, zmax=1, zmid=0,
        colorscale="RdBu", texttemplate="%{z:.2f}", customdata=counts.to_numpy(), colorbar_title="cosine",
        hovertemplate="%{y} · %{x}: %{z:.3f}<br>%{customdata} sample rows<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heatmap)
    fig.update_yaxes(autorange="reversed")  # read like a matrix: first task at the top
    return finish(fig, title=title, template=template, width=width, height=height)


@fill_doc
def task_conflict_over_steps(
    data_frame: pd.DataFrame,
    x: str = "step",
    *,
    conflict: str = "conflict",
    task: str = "task",
    band: tuple[float, float] | None = (0.1, 0.9),
    color_discrete_map: dict | None = None,
    title: str | None = "Task conflict over training",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Mean per-sample task conflict per step (or epoch), with a shaded quantile band.

    For two tasks one line (the pair); for more, one line per task (its minimum over the other tasks). Each line is
    a ``go.Scatter`` named after the pair, preceded by its band (two traces, lower then upper quantile) when
    ``band`` is given. A dashed line marks 0, where the gradients are orthogonal.

    Parameters
    ----------
    {data_frame}
    x : str
        Time axis: ``step`` or ``epoch``.
    conflict, task : str
        Column names.
    band : (float, float) or None
        Lower and upper quantiles to shade; None: no band.
    {color_discrete_map}
    {layout}

    {returns}
    """
    require(data_frame, x, conflict, task)
    series = _per_task(widen(data_frame, conflict), task, conflict)
    if len(series) == 2:  # both rows carry the same pairwise value: one line says it all
        series = [(f"{series[0][0]} · {series[1][0]}", series[0][1])]
    else:
        series = [(f"{name} · min over other tasks", rows) for name, rows in series]
    fig = go.Figure()
    for position, (name, rows) in enumerate(series):
        colour = color_for(name, position, color_discrete_map)
        grouped = rows.groupby(x, observed=True, sort=True)[conflict]
        if band is not None:
            low, high = grouped.quantile(band[0]), grouped.quantile(band[1])
            fig.add_scatter(x=low.index.to_numpy(), y=low.to_numpy(), mode="lines", line={"width": 0, "color": colour},
                            legendgroup=name, showlegend=False, hoverinfo="skip")  # fmt: skip
            fig.add_scatter(x=high.index.to_numpy(), y=high.to_numpy(), mode="lines", fill="tonexty", opacity=0.2,
                            line={"width": 0, "color": colour}, legendgroup=name, showlegend=False, hoverinfo="skip",
                            name=f"{name} · {band[0]:.0%}–{band[1]:.0%}")  # fmt: skip
        mean = grouped.mean()
        fig.add_scatter(x=mean.index.to_numpy(), y=mean.to_numpy(), mode="lines", name=name, legendgroup=name,
                        line={"color": colour, "width": 2})  # fmt: skip
    fig.add_hline(y=0, line_dash="dash", line_color="grey")
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text="mean per-sample cosine", range=[-1, 1])
    return finish(fig, title=title, template=template, width=width, height=height)


def _conflicting_share(values: np.ndarray) -> str:
    share = float(np.mean(values < 0)) if len(values) else float("nan")
    return f"({share:.0%} < 0)"


@fill_doc
def conflict_histogram(
    data_frame: pd.DataFrame,
    x: str = "conflict",
    *,
    color: str | None = None,
    facet_col: str | None = None,
    nbins: int = 40,
    histnorm: str = "probability",
    range_x: tuple[float, float] | None = (-1.0, 1.0),
    color_discrete_map: dict | None = None,
    title: str | None = "Per-sample task conflict",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Distribution over samples of the cosine between a sample's task gradients; below 0 the tasks conflict.

    Each trace name ends with the share of its values below 0. With two tasks each sample's value sits on both
    tasks' rows: filter one task for counts (fractions are the same either way).

    Parameters
    ----------
    {data_frame}
    x : str
        The conflict column.
    {color}
    {facet_col}
    {nbins}
    {histnorm}
    {range_x}
    {color_discrete_map}
    {layout}

    {returns}
    """
    fig = histogram(
        data_frame, x, color=color, facet_col=facet_col, nbins=nbins, histnorm=histnorm, range_x=range_x,
        color_discrete_map=color_discrete_map, describe=_conflicting_share, title=title, template=template,
        width=width, height=height,
    )  # fmt: skip
    fig.add_vline(x=0, line_dash="dash", line_color="grey", row="all", col="all")
    return fig
