"""A self-contained HTML report of runs: plotly figures with the JavaScript inlined (nothing from the network)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        raise ImportError("the report needs plotly: pip install plotly") from exc
    return go


def accuracy_figure(runs: dict[str, list[dict]]):
    """Test accuracy per epoch, one line per (run, task)."""
    go = _plotly()
    fig = go.Figure()
    for name, history in runs.items():
        for key in sorted(k for k in history[0] if k.endswith("/accuracy")):
            task = key.split("/")[1]
            fig.add_scatter(x=[h["epoch"] for h in history], y=[h[key] for h in history], name=f"{name} · {task}")
    fig.update_layout(title="Test accuracy", xaxis_title="epoch", yaxis_title="accuracy", template="plotly_white")
    return fig


def weight_figure(samples: dict[str, np.ndarray], last_epochs: int = 3):
    """Distribution of the sample weights w of mislabelled and clean samples over the last epochs."""
    go = _plotly()
    recent = samples["epoch"] >= samples["epoch"].max() - last_epochs + 1
    fig = go.Figure()
    for flag, name in ((False, "clean label"), (True, "wrong label")):
        pick = recent & (samples["noisy"] == flag) & samples["present"]
        fig.add_histogram(x=samples["weight"][pick], name=name, opacity=0.6, histnorm="probability", nbinsx=40)
    fig.update_layout(
        barmode="overlay", title=f"SGS sample weights, last {last_epochs} epochs", xaxis_title="weight w",
        template="plotly_white",
    )  # fmt: skip
    return fig


def write_report(path: str | Path, title: str, table: list[dict], figures: list) -> Path:
    """One HTML page: a title, a summary table (list of row dicts) and the figures; plotly.js inlined once."""
    path = Path(path)
    columns = list(table[0]) if table else []
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row[c]))}</td>" for c in columns) + "</tr>" for row in table
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
    return f"{value:.3f}" if isinstance(value, float) else str(value)
