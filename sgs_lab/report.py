"""A self-contained HTML report of runs: plotly figures with the JavaScript inlined (nothing from the network)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def run_summary(runs: Mapping[str, object]) -> list[dict]:
    """One row per run: name, method, status, mean noise rate, test accuracy per task, seconds."""
    rows = []
    for name, run in runs.items():
        meta = run.meta
        noise = meta.get("noise") or {}
        row = {"run": name, "method": meta.get("method"), "status": meta["status"],
               "noise": sum(noise.values()) / len(noise) if noise else 0.0}  # fmt: skip
        row.update({f"{task} accuracy": value for task, value in (meta.get("test_accuracy") or {}).items()})
        row["seconds"] = meta.get("seconds")
        rows.append(row)
    return rows


def run_figures(runs: Mapping[str, object]) -> list:
    """The report's figures for cached runs (``sgs_lab.cache.Run``): training dynamics of all runs overlaid, then
    per run the last epoch's SGS and sample-weight distributions (clean vs wrong labels), the task-conflict
    heatmap and the data map over all epochs."""
    from . import viz

    dynamics = viz.dynamics_table({n: r.history for n, r in runs.items()}, {n: r.steps() for n, r in runs.items()})
    figures = [viz.training_dynamics(dynamics, title="Training dynamics")] if len(dynamics) else []
    for name, run in runs.items():
        history = run.history
        last = history[-1]["epoch"] if history else None
        columns = ["task", "sample_id", "noisy", "present", "sgs", "weight", "conflict"]
        recent = run.samples(epochs=last, columns=columns)
        if recent.empty:
            continue
        figures.append(viz.sgs_histogram(recent, title=f"{name}: sample gradient similarity, last epoch"))
        weights = recent["weight"].dropna()
        if len(weights) and not np.allclose(weights, 1.0):  # equal weighting: a single bar says nothing
            figures.append(viz.weight_histogram(recent, title=f"{name}: sample weights, last epoch"))
        if recent["task"].nunique() > 1:
            figures.append(viz.task_conflict_heatmap(recent, title=f"{name}: task conflict, last epoch"))
        epochs = run.samples(columns=["task", "sample_id", "epoch", "p_label", "noisy"])
        figures.append(viz.data_map(epochs, title=f"{name}: data map (confidence vs variability over epochs)"))
    return figures


def report_runs(runs: Mapping[str, object], path: str | Path, title: str, table: list[dict] | None = None) -> Path:
    """Write one self-contained HTML page for cached runs: ``table`` (default :func:`run_summary`) and
    :func:`run_figures`."""
    return write_report(path, title, run_summary(runs) if table is None else table, run_figures(runs))


def write_report(path: str | Path, title: str, table: list[dict], figures: list) -> Path:
    """One HTML page: a title, a summary table (list of row dicts) and the figures; plotly.js inlined once."""
    path = Path(path)
    columns = list(dict.fromkeys(c for row in table for c in row))  # rows may differ (single-task runs)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in table
    )
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>{''.join(parts)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
