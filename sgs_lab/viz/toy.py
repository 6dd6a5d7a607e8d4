"""Figures for the toy lesson on gradient conflict (notebook 01): two 2-D objectives, their level sets and Pareto
set, and arrows for where each objective and each weighting method moves θ.

The directions and paths come from :mod:`sgs_lab.lab` (``toy_directions``, ``toy_paths``, ``toy_weights``); these
builders only draw. Every arrow is a trace (a line from θ with an arrow-head marker at its tip) named after its
objective or method, so tests read the arrows from the figure's data.

>>> from sgs_lab.data import ToyProblem
>>> fig = toy_arrows(ToyProblem(angle=90), (0.0, 0.0), {"f1": [0.7, 0.7], "ew": [1.4, 0.0]}, scale=1.0)
>>> [(t.name, list(t.x), list(t.y)) for t in fig.data if t.name in ("f1", "ew")]
[('f1', [0.0, 0.7], [0.0, 0.7]), ('ew', [0.0, 1.4], [0.0, 0.0])]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from ._common import NOISE_COLORS, NOISE_LABELS, PALETTE, TEMPLATE

#: colours of the two objectives and of the usual methods
TOY_COLORS = {"f1": "#4c78a8", "f2": "#b279a2", "ew": "#595959", "pcgrad": "#f58518", "mgda": "#54a24b",
              "sgs": "#e45756"}  # fmt: skip
TOY_LABELS = {"f1": "−∇f1 (task 1)", "f2": "−∇f2 (task 2)", "ew": "EW", "pcgrad": "PCGrad", "mgda": "MGDA",
              "sgs": "SGS"}  # fmt: skip


def _color(name: str, position: int) -> str:
    return TOY_COLORS.get(name, PALETTE[position % len(PALETTE)])


def _width(position: int) -> float:
    """Each later method draws thinner, so one that coincides with an earlier one (SGS with EW without wrong
    samples) leaves the earlier one visible as an outline."""
    return max(2.0, 7.0 - 1.5 * position)


def pareto_set(problem, points: int = 60) -> np.ndarray:
    """(points, 2): the Pareto set of the two quadratic objectives, the minimisers of w·f1 + (1 − w)·f2 for w from
    0 to 1: θ*(w) = (w G1 + (1−w) G2)⁻¹ (w G1 c1 + (1−w) G2 c2) with G_k = A_kᵀA_k."""
    scales = problem.scales().double()
    gram = scales.transpose(1, 2) @ scales
    centres = problem.centres().double()
    out = []
    for w in np.linspace(0.0, 1.0, points):
        lhs = w * gram[0] + (1 - w) * gram[1]
        rhs = w * gram[0] @ centres[0] + (1 - w) * gram[1] @ centres[1]
        out.append(torch.linalg.solve(lhs, rhs).numpy())
    return np.asarray(out)


def _landscape(problem, extent: float, grid: int) -> list:
    """Level sets of both objectives (lines only), the Pareto set and the two minima."""
    axis = np.linspace(-extent, extent, grid)
    xx, yy = np.meshgrid(axis, axis)
    theta = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float64)
    values = problem.losses(theta).numpy().reshape(2, grid, grid)
    traces = []
    for k, name in enumerate(("f1", "f2")):
        color = TOY_COLORS[name]
        traces.append(go.Contour(
            x=axis, y=axis, z=values[k], name=f"level sets of {name}", showscale=False, ncontours=14,
            contours_coloring="lines", colorscale=[[0, color], [1, color]], line={"width": 1}, opacity=0.45,
            hoverinfo="skip", showlegend=False,
        ))  # fmt: skip
    front = pareto_set(problem)
    traces.append(go.Scatter(x=front[:, 0], y=front[:, 1], mode="lines", name="Pareto set",
                             line={"color": "black", "width": 4}, opacity=0.35))  # fmt: skip
    centres = problem.centres().numpy()
    traces.append(go.Scatter(
        x=centres[:, 0], y=centres[:, 1], mode="markers+text", name="minima", text=["min f1", "min f2"],
        textposition="top center", marker={"symbol": "star", "size": 14, "color": [TOY_COLORS["f1"], TOY_COLORS["f2"]]},
        showlegend=False,
    ))  # fmt: skip
    return traces


def _finish(fig: go.Figure, extent: float, title, template, width, height) -> go.Figure:
    fig.update_xaxes(range=[-extent, extent], title="θ₁", zeroline=False)
    fig.update_yaxes(range=[-extent, extent], title="θ₂", scaleanchor="x", scaleratio=1, zeroline=False)
    fig.update_layout(title=title, template=template, width=width, height=height, legend={"itemsizing": "constant"})
    return fig


def toy_arrows(
    problem,
    theta,
    directions: Mapping[str, Sequence[float]],
    *,
    samples=None,
    scale: float | None = None,
    extent: float = 1.6,
    grid: int = 80,
    title: str | None = "Where each objective and each method moves θ",
    template: str = TEMPLATE,
    width: int | None = 640,
    height: int | None = 600,
) -> go.Figure:
    """Arrows from ``theta`` along each of ``directions`` ({name: (dx, dy)}, e.g. from ``sgs_lab.lab.
    toy_directions``), over both objectives' level sets, their Pareto set and minima.

    Parameters
    ----------
    problem : sgs_lab.data.ToyProblem
    theta : (float, float)
        Where the arrows start.
    directions : mapping
        {name: descent direction}; "f1" and "f2" are the objectives, other names methods.
    samples : sgs_lab.lab.ToySamples or None
        Draw each sample's minimum (wrong samples as crosses).
    scale : float or None
        Arrow length per unit of direction; None: the longest arrow spans 0.45·``extent``. Every arrow uses the
        same scale, so lengths compare.
    extent : float
        The axes cover [−extent, extent]².
    grid : int
        Grid points per axis for the level sets.
    title, template, width, height
        Layout.

    Returns
    -------
    plotly.graph_objects.Figure
        One trace per arrow, named as in ``directions``: x = [θ₁, θ₁ + scale·dx], y likewise.
    """
    theta = np.asarray(theta, dtype=float).reshape(2)
    vectors = {name: np.asarray(d, dtype=float).reshape(2) for name, d in directions.items()}
    if scale is None:
        longest = max((np.linalg.norm(v) for v in vectors.values()), default=0.0)
        scale = 0.45 * extent / longest if longest > 0 else 1.0
    fig = go.Figure(_landscape(problem, extent, grid))
    if samples is not None:
        centres, noisy = samples.centres.numpy(), samples.noisy.numpy()
        for k, name in enumerate(("f1", "f2")):
            fig.add_trace(go.Scatter(
                x=centres[k, :, 0], y=centres[k, :, 1], mode="markers", name=f"samples of {name}",
                marker={"color": TOY_COLORS[name], "size": 8, "opacity": 0.6,
                        "symbol": np.where(noisy[k], "x", "circle").tolist()},
                customdata=noisy[k], hovertemplate=f"{name} sample: minimum (%{{x:.2f}}, %{{y:.2f}})<extra></extra>",
            ))  # fmt: skip
    fig.add_trace(go.Scatter(x=[theta[0]], y=[theta[1]], mode="markers", name="θ",
                             marker={"color": "black", "size": 10}))  # fmt: skip
    methods = 0
    for position, (name, vector) in enumerate(vectors.items()):
        tip = theta + scale * vector
        is_task = name in ("f1", "f2")
        line_width = 2.0 if is_task else _width(methods)
        methods += not is_task
        fig.add_trace(go.Scatter(
            x=[theta[0], tip[0]], y=[theta[1], tip[1]], mode="lines+markers", name=name,
            line={"color": _color(name, position), "width": line_width, "dash": "dot" if is_task else "solid"},
            marker={"symbol": "arrow", "angleref": "previous", "size": [0, 16], "color": _color(name, position)},
            hovertemplate=f"{TOY_LABELS.get(name, name)}: ({vector[0]:+.3f}, {vector[1]:+.3f})<extra></extra>",
        ))  # fmt: skip
    return _finish(fig, extent, title, template, width, height)


def toy_paths_figure(
    problem,
    paths: pd.DataFrame,
    *,
    extent: float = 1.6,
    grid: int = 80,
    title: str | None = "Gradient descent paths of each method",
    template: str = TEMPLATE,
    width: int | None = 640,
    height: int | None = 600,
) -> go.Figure:
    """Each method's path (``sgs_lab.lab.toy_paths``: columns method, step, x, y) over the level sets: one line
    trace per method, named after it, its points in step order."""
    fig = go.Figure(_landscape(problem, extent, grid))
    for position, (name, rows) in enumerate(paths.groupby("method", sort=False)):
        rows = rows.sort_values("step")
        fig.add_trace(go.Scatter(
            x=rows["x"], y=rows["y"], mode="lines+markers", name=str(name),
            line={"color": _color(str(name), position), "width": _width(position)}, marker={"size": 4},
            customdata=rows["step"], hovertemplate=f"{name}, step %{{customdata}}: (%{{x:.2f}}, %{{y:.2f}})<extra></extra>",
        ))  # fmt: skip
    if len(paths):
        start = paths.sort_values("step").iloc[0]
        fig.add_trace(go.Scatter(x=[start["x"]], y=[start["y"]], mode="markers", name="start",
                                 marker={"color": "black", "size": 10}))  # fmt: skip
    return _finish(fig, extent, title, template, width, height)


def toy_weights_figure(
    weights: pd.DataFrame,
    *,
    title: str | None = "SGS on the toy samples: a sample's weight against its cosine to its task's mean gradient",
    template: str = TEMPLATE,
    width: int | None = 700,
    height: int | None = 420,
) -> go.Figure:
    """Sample weight against cosine (``sgs_lab.lab.toy_weights``), clean and wrong samples in two traces per task
    (named "<task>: clean label" / "<task>: wrong label")."""
    fig = go.Figure()
    for task, task_rows in weights.groupby("task", sort=False):
        for noisy in (False, True):
            rows = task_rows[task_rows["noisy"] == noisy]
            if rows.empty:
                continue
            label = NOISE_LABELS[noisy]
            fig.add_trace(go.Scatter(
                x=rows["cosine"], y=rows["weight"], mode="markers", name=f"{task}: {label}",
                marker={"color": NOISE_COLORS[label], "size": 10, "symbol": "circle" if task == "f1" else "diamond",
                        "line": {"color": TOY_COLORS.get(str(task), "black"), "width": 2}},
                customdata=rows["sample"], hovertemplate="sample %{customdata}: cosine %{x:.2f}, weight %{y:.2f}<extra></extra>",
            ))  # fmt: skip
    fig.update_xaxes(title="cosine to the task's mean gradient", range=[-1.05, 1.05])
    fig.update_yaxes(title="sample weight w", rangemode="tozero")
    fig.update_layout(title=title, template=template, width=width, height=height)
    return fig


__all__ = ["TOY_COLORS", "pareto_set", "toy_arrows", "toy_paths_figure", "toy_weights_figure"]
