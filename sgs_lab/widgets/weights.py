"""Sample weights of one run: their distribution at an epoch (clean against wrong labels) and per-sample
trajectories over training."""

from __future__ import annotations

import ipywidgets as widgets

from .. import viz
from ._base import Dashboard, dropdown, epoch_slider, figure_widget, run_samples, run_tasks, show

COLUMNS = ("epoch", "step", "task", "sample_id", "noisy", "weight")


class WeightDashboard(Dashboard):
    """Controls: ``epoch_slider``, ``task_dropdown``. Figures: ``histogram_figure`` (the chosen epoch and task),
    ``trajectory_figure`` (the chosen task over all epochs; its last shape marks the epoch)."""

    def __init__(self, run, *, max_lines: int = 40) -> None:
        super().__init__()
        self.max_lines = max_lines
        self.samples = run_samples(run, COLUMNS)
        self.epoch_slider = epoch_slider(self.samples["epoch"])
        self.task_dropdown = dropdown(run_tasks(run, self.samples), "task")
        self.histogram_figure = figure_widget()
        self.trajectory_figure = figure_widget()
        self._observe(self.epoch_slider, self.update_epoch)
        self._observe(self.task_dropdown, self.update)
        self.children = [
            widgets.HBox([self.epoch_slider, self.task_dropdown]),
            widgets.HBox([self.histogram_figure, self.trajectory_figure]),
        ]
        self.update()

    def task_rows(self):
        return self.samples[self.samples["task"] == self.task_dropdown.value]

    def update(self) -> None:
        """Redraw both figures for the chosen task."""
        title = f"Weight trajectories, {self.task_dropdown.value}"
        figure = viz.weight_trajectories(self.task_rows(), facet_col=None, max_lines=self.max_lines, title=title,
                                         width=520, height=380)  # fmt: skip
        show(self.trajectory_figure, figure)
        self.update_epoch()

    def update_epoch(self) -> None:
        rows = self.task_rows()
        rows = rows[rows["epoch"] == self.epoch_slider.value]
        title = f"Sample weights, epoch {self.epoch_slider.value}, {self.task_dropdown.value}"
        show(self.histogram_figure, viz.weight_histogram(rows, facet_col=None, title=title, width=480, height=380))
        self.trajectory_figure.layout.shapes = [
            {"type": "line", "xref": "x", "yref": "paper", "x0": self.epoch_slider.value,
             "x1": self.epoch_slider.value, "y0": 0, "y1": 1, "line": {"color": "grey", "dash": "dot"}},
        ]  # fmt: skip


def weight_dashboard(run, *, max_lines: int = 40) -> WeightDashboard:
    """Sample-weight dashboard: an epoch slider and a task dropdown over the weight histogram (clean against wrong
    labels) and per-sample weight trajectories with each group's mean.

    Parameters
    ----------
    run : Run
        Anything with ``samples(columns=...)``, ``steps()`` and ``meta``, as ``sgs_lab.cache.open_run`` returns.
    max_lines : int
        Most sample lines drawn (a fixed-seed draw shared between clean and wrong labels).

    Returns
    -------
    WeightDashboard
        An ``ipywidgets.VBox``.
    """
    return WeightDashboard(run, max_lines=max_lines)
