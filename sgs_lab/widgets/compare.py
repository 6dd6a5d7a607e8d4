"""Compare runs side by side: one statistic's distribution in two chosen runs at an epoch, and both runs'
training dynamics overlaid."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import pandas as pd

from .. import viz
from ..viz._common import finite
from ._base import Dashboard, dropdown, epoch_slider, figure_widget, named_runs, run_samples, run_steps, run_tasks, show

STATISTICS = ("weight", "sgs", "sgs_class", "sgs_batch", "conflict", "loss", "p_label", "margin", "grad_norm")
COSINES = ("sgs", "sgs_class", "sgs_batch", "conflict")  # bounded by ±1: same bins whatever the data
COLUMNS = ("epoch", "task", "sample_id", "noisy", *STATISTICS)


class CompareRuns(Dashboard):
    """Controls: ``left_dropdown`` and ``right_dropdown`` (the two runs), ``task_dropdown``,
    ``statistic_dropdown``, ``epoch_slider``. Figures: ``left_figure`` and ``right_figure`` (the statistic's
    histogram, clean against wrong labels, on the same bins), ``dynamics_figure`` (both runs per epoch)."""

    def __init__(self, runs) -> None:
        super().__init__()
        self.runs = named_runs(runs)
        if not self.runs:
            raise ValueError("compare_runs needs at least one run")
        names = list(self.runs)
        self.samples = {name: run_samples(run, COLUMNS) for name, run in self.runs.items()}
        self.left_dropdown = dropdown(names, "left")
        self.right_dropdown = dropdown(names, "right", value=names[min(1, len(names) - 1)])
        # every run's tasks: runs on other data (a single-task run, another dataset) still get their panels
        tasks = [t for name, run in self.runs.items() for t in run_tasks(run, self.samples[name])]
        self.task_dropdown = dropdown(list(dict.fromkeys(tasks)), "task")
        self.statistic_dropdown = dropdown(STATISTICS, "statistic")
        self.epoch_slider = epoch_slider(np.concatenate([frame["epoch"].to_numpy() for frame in self.samples.values()]))
        self.left_figure, self.right_figure, self.dynamics_figure = figure_widget(), figure_widget(), figure_widget()
        for control in (self.task_dropdown, self.statistic_dropdown, self.epoch_slider):
            self._observe(control, self.update_panels)
        for control in (self.left_dropdown, self.right_dropdown):
            self._observe(control, self.update)
        self.children = [
            widgets.HBox([self.left_dropdown, self.right_dropdown]),
            widgets.HBox([self.task_dropdown, self.statistic_dropdown, self.epoch_slider]),
            widgets.HBox([self.left_figure, self.right_figure]),
            self.dynamics_figure,
        ]
        self.update()

    def selected(self) -> list[str]:
        return list(dict.fromkeys([self.left_dropdown.value, self.right_dropdown.value]))

    def panel_rows(self, name: str) -> pd.DataFrame:
        """The chosen run's rows at the chosen epoch and task."""
        frame = self.samples[name]
        return frame[(frame["epoch"] == self.epoch_slider.value) & (frame["task"] == self.task_dropdown.value)]

    def update(self) -> None:
        """Redraw everything for the chosen runs."""
        self.update_panels()
        self.update_dynamics()

    def update_panels(self) -> None:
        """Both histograms on shared bins, so the two runs read against each other."""
        statistic = self.statistic_dropdown.value
        left, right = self.panel_rows(self.left_dropdown.value), self.panel_rows(self.right_dropdown.value)
        range_x = (-1.0, 1.0) if statistic in COSINES else _shared_range(left[statistic], right[statistic])
        for figure, name, rows in ((self.left_figure, self.left_dropdown.value, left),
                                   (self.right_figure, self.right_dropdown.value, right)):  # fmt: skip
            title = f"{name}: {statistic}, {self.task_dropdown.value}, epoch {self.epoch_slider.value}"
            show(figure, viz.histogram(rows, statistic, color="noisy", range_x=range_x, title=title, width=480,
                                       height=360))  # fmt: skip

    def update_dynamics(self) -> None:
        names = self.selected()
        histories = {name: (self.runs[name].meta or {}).get("history", []) for name in names}
        table = viz.dynamics_table(histories, {name: run_steps(self.runs[name]) for name in names})
        show(self.dynamics_figure, viz.training_dynamics(table, title="Training dynamics: " + " vs ".join(names),
                                                          width=960))  # fmt: skip


def _shared_range(*columns: pd.Series) -> tuple[float, float] | None:
    values = np.concatenate([finite(c) for c in columns])
    return (float(values.min()), float(values.max())) if len(values) else None


def compare_runs(runs) -> CompareRuns:
    """Side-by-side comparison of runs: two run dropdowns, a task and a statistic dropdown and an epoch slider
    over both runs' histograms of the statistic (clean against wrong labels, same bins), and both runs' training
    dynamics overlaid below.

    Parameters
    ----------
    runs : mapping or sequence
        {name: run}, or runs named by their method ("sgs", "ew", a repeat: "sgs #2"); each anything with
        ``samples(columns=...)``, ``steps()`` and ``meta`` (its ``history`` feeds the dynamics).

    Returns
    -------
    CompareRuns
        An ``ipywidgets.VBox``.
    """
    return CompareRuns(runs)
