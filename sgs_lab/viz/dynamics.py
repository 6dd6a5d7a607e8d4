"""Training dynamics per epoch — loss, test accuracy, task weights, consistency — with several runs overlaid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ._common import TEMPLATE, fill_doc, finish, ordered_values, require, widen

DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
STEP_METRICS = {"task_weight": "task weight", "consistency": "consistency"}
COLUMNS = ["run", "epoch", "metric", "task", "value"]


def _history_rows(run: str, history: Sequence[dict]) -> list[dict]:
    """Rows of one run's per-epoch summaries: ``train_loss`` and every ``test/<task>/<metric>``."""
    rows = []
    for summary in history:
        for key, value in summary.items():
            if key == "train_loss":
                rows.append({"metric": "train loss", "task": "all", "value": value})
            elif key.startswith("test/") and key.count("/") == 2:
                _, task, metric = key.split("/")
                rows.append({"metric": f"test {metric}", "task": task, "value": value})
            else:
                continue
            rows[-1].update(run=run, epoch=summary["epoch"])
    return rows


def _step_rows(run: str, steps: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch means of the per-step task weights and consistencies."""
    present = [c for c in STEP_METRICS if c in steps.columns]
    means = widen(steps, *present).groupby(["epoch", "task"], observed=True, sort=True)[present].mean().reset_index()
    long = means.melt(id_vars=["epoch", "task"], value_vars=present, var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(STEP_METRICS)
    long["task"] = long["task"].astype(str)
    long.insert(0, "run", run)
    return long


def dynamics_table(
    histories: Mapping[str, Sequence[dict]], steps: Mapping[str, pd.DataFrame] | None = None
) -> pd.DataFrame:
    """One tidy table of per-epoch curves for several runs.

    Parameters
    ----------
    histories : mapping
        {run name: per-epoch summaries} as ``RunResult.history`` or ``run.meta["history"]`` hold them
        (epoch, train_loss, test/<task>/accuracy, test/<task>/loss, ...).
    steps : mapping or None
        {run name: ``run.steps()``}; adds the per-epoch means of ``task_weight`` and ``consistency``.

    Returns
    -------
    pandas.DataFrame
        Columns run, epoch, metric ("train loss", "test accuracy", "test loss", "task weight", "consistency"),
        task ("all" for the summed train loss) and value.

    Examples
    --------
    >>> history = [{"epoch": 0, "train_loss": 2.0, "test/left/accuracy": 0.5, "seconds": 1.0}]
    >>> dynamics_table({"ew": history})[["metric", "task", "value"]].values.tolist()
    [['train loss', 'all', 2.0], ['test accuracy', 'left', 0.5]]
    """
    parts = [pd.DataFrame(_history_rows(run, history), columns=COLUMNS) for run, history in histories.items()]
    parts += [_step_rows(run, frame)[COLUMNS] for run, frame in (steps or {}).items() if len(frame)]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


@fill_doc
def training_dynamics(
    data_frame: pd.DataFrame,
    x: str = "epoch",
    y: str = "value",
    *,
    facet_row: str = "metric",
    color: str = "run",
    line_dash: str | None = "task",
    metrics: Sequence[str] | None = None,
    color_discrete_map: dict | None = None,
    title: str | None = "Training dynamics",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Per-epoch curves in one panel per metric (stacked, shared x), one colour per run, one dash per task.

    Parameters
    ----------
    data_frame : pandas.DataFrame
        Long table as :func:`dynamics_table` makes it.
    x, y : str
        Columns for the axes.
    facet_row : str
        Column whose values get one panel each.
    color : str
        Column whose values get one colour each (the runs: compare methods on the same axes).
    line_dash : str or None
        Column whose values get one dash pattern each.
    metrics : sequence of str or None
        The panels, in order; None: every metric in the table.
    {color_discrete_map}
    {layout}

    {returns}
        One ``go.Scatter`` per (metric, run, task), in that order; trace names read "run · task".
    """
    require(data_frame, x, y, facet_row, color, line_dash)
    metrics = list(metrics) if metrics is not None else ordered_values(data_frame[facet_row])
    runs = ordered_values(data_frame[color])
    dashes = (
        {v: DASHES[i % len(DASHES)] for i, v in enumerate(ordered_values(data_frame[line_dash]))} if line_dash else {}
    )
    fig = make_subplots(rows=max(len(metrics), 1), cols=1, shared_xaxes=True, subplot_titles=[str(m) for m in metrics],
                        vertical_spacing=0.08 if len(metrics) < 5 else 0.04)  # fmt: skip
    shown = set()
    for row, metric in enumerate(metrics, start=1):
        panel = data_frame[data_frame[facet_row] == metric]
        for position, run in enumerate(runs):
            colour = (color_discrete_map or {}).get(str(run), qualitative.Plotly[position % len(qualitative.Plotly)])
            rows = panel[panel[color] == run]
            for dash_value, line in rows.groupby(line_dash, sort=False) if line_dash else [(None, rows)]:
                line = line.sort_values(x)
                name = str(run) if dash_value is None else f"{run} · {dash_value}"
                fig.add_scatter(x=line[x].to_numpy(), y=line[y].to_numpy(), mode="lines+markers", name=name,
                                legendgroup=name, showlegend=name not in shown, row=row, col=1,
                                line={"color": colour, "dash": dashes.get(dash_value, "solid")})  # fmt: skip
                shown.add(name)
    fig.update_xaxes(title_text=x, row=len(metrics), col=1)
    height = height if height is not None else 200 + 180 * len(metrics)
    return finish(fig, title=title, template=template, width=width, height=height)
