"""What every dashboard shares: reading a run, swapping a figure into a FigureWidget, the controls' look."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..viz._common import ordered_values, widen


class Dashboard(widgets.VBox):
    """A dashboard is a VBox (display it, or nest it in another layout) holding its controls and figures.

    Subclasses keep interaction logic in plain methods (``update_*``, ``show_sample``, ...) that the controls'
    observers call, so tests drive them by setting a control's ``.value`` and reading the figures' data.
    """

    _quiet = False

    def _observe(self, control: widgets.Widget, handler) -> None:
        """Call ``handler()`` when ``control``'s value changes, unless the dashboard itself is moving it."""

        def on_change(_change) -> None:
            if not self._quiet:
                handler()

        control.observe(on_change, names="value")

    @contextmanager
    def quietly(self):
        """Set controls from code without triggering their handlers (the caller redraws once afterwards)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False


def run_samples(run, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The run's per-sample records as a DataFrame (a run may hand back {column: array}), float16 statistics
    (a run stored with ``float16=True``) widened to float64 so the dashboards can aggregate them. A run without
    rows yet (its writer has not flushed) is refused with a ValueError saying so."""
    frame = run.samples(columns=list(columns)) if columns is not None else run.samples()
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    if not len(frame):  # a run whose writer has not flushed yet: nothing to put on a slider or a figure
        raise ValueError(
            f"run {describe_run(run)} has no committed rows yet; wait for its first flush or refresh() the run"
        )
    return widen(frame)


def describe_run(run) -> str:
    """How an error names a run: its path when it has one, else its method."""
    path = getattr(run, "path", None)
    return str(path) if path is not None else repr(run_name(run, type(run).__name__))


def run_steps(run) -> pd.DataFrame:
    """The run's per-step records as a DataFrame, float16 columns widened to float64."""
    frame = run.steps()
    return widen(frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame))


def run_tasks(run, samples: pd.DataFrame) -> list[str]:
    """Task names in the run's order (``meta["tasks"]`` when recorded, else the records' order)."""
    tasks = run.meta.get("tasks") if isinstance(getattr(run, "meta", None), Mapping) else None
    return [str(t) for t in (tasks or ordered_values(samples["task"]))]


def run_name(run, fallback: str) -> str:
    meta = getattr(run, "meta", None) or {}
    return str(meta.get("method", fallback))


def named_runs(runs) -> dict[str, object]:
    """{name: run} from a mapping, or from a sequence named by each run's method (a repeated method gets its
    position: "sgs", "ew", "sgs #2")."""
    if isinstance(runs, Mapping):
        return {str(k): v for k, v in runs.items()}
    named: dict[str, object] = {}
    for position, run in enumerate(runs):
        name = run_name(run, f"run {position}")
        named[name if name not in named else f"{name} #{position}"] = run
    return named


def show(target: go.FigureWidget, figure: go.Figure) -> None:
    """Replace ``target``'s traces and layout by ``figure``'s, in one message to the browser."""
    with target.batch_update():
        target.data = []
        target.add_traces(list(figure.data))
        target.layout = figure.layout


def figure_widget(figure: go.Figure | None = None) -> go.FigureWidget:
    return go.FigureWidget(figure if figure is not None else go.Figure())


def epoch_slider(epochs: np.ndarray, description: str = "epoch") -> widgets.IntSlider:
    """A slider over the recorded epochs, starting at the last one (the trained state)."""
    low, high = int(np.min(epochs)), int(np.max(epochs))
    return widgets.IntSlider(value=high, min=low, max=high, description=description, continuous_update=False)


def dropdown(options: Sequence, description: str, value=None) -> widgets.Dropdown:
    options = list(options)
    return widgets.Dropdown(options=options, value=options[0] if value is None else value, description=description)
