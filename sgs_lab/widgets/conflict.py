"""Task conflicts of one run: the task × task matrix and the per-sample distribution at an epoch, and the
evolution over steps with that epoch shaded."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go

from .. import viz
from ._base import Dashboard, dropdown, epoch_slider, figure_widget, run_samples, run_tasks, show

COLUMNS = ("epoch", "step", "task", "sample_id", "noisy", "conflict")


class ConflictDashboard(Dashboard):
    """Controls: ``epoch_slider`` (the epoch shown by the matrix and the histogram), ``task_dropdown`` (whose
    labels split the histogram into clean and wrong). Figures: ``matrix_figure``, ``histogram_figure``,
    ``timeline_figure`` (its last shape shades the chosen epoch's steps)."""

    def __init__(self, run) -> None:
        super().__init__()
        self.samples = run_samples(run, COLUMNS)
        self.epoch_slider = epoch_slider(self.samples["epoch"])
        self.task_dropdown = dropdown(run_tasks(run, self.samples), "task")
        self.matrix_figure = figure_widget()
        self.histogram_figure = figure_widget()
        self.timeline_figure = figure_widget(viz.task_conflict_over_steps(self.samples, height=320))
        self._timeline_shapes = self.timeline_figure.layout.shapes  # the builder's own (the zero line)
        self._observe(self.epoch_slider, self.update)
        self._observe(self.task_dropdown, self.update_histogram)
        self.children = [
            widgets.HBox([self.epoch_slider, self.task_dropdown]),
            widgets.HBox([self.matrix_figure, self.histogram_figure]),
            self.timeline_figure,
        ]
        self.update()

    def epoch_rows(self):
        return self.samples[self.samples["epoch"] == self.epoch_slider.value]

    def update(self) -> None:
        """Show the chosen epoch everywhere."""
        self.update_matrix()
        self.update_histogram()
        self.mark_epoch()

    def update_matrix(self) -> None:
        title = f"Mean per-sample task cosine, epoch {self.epoch_slider.value}"
        show(self.matrix_figure, viz.task_conflict_heatmap(self.epoch_rows(), title=title, width=420, height=360))

    def update_histogram(self) -> None:
        rows = self.epoch_rows()
        rows = rows[rows["task"] == self.task_dropdown.value]
        title = f"Per-sample conflict, epoch {self.epoch_slider.value}, {self.task_dropdown.value} labels"
        show(self.histogram_figure, viz.conflict_histogram(rows, color="noisy", title=title, width=520, height=360))

    def mark_epoch(self) -> None:
        """Shade the steps of the chosen epoch on the timeline."""
        steps = self.epoch_rows()["step"]
        band = go.layout.Shape(
            type="rect", xref="x", yref="paper", x0=steps.min() - 0.5, x1=steps.max() + 0.5, y0=0, y1=1,
            fillcolor="grey", opacity=0.15, line_width=0, layer="below",
        )  # fmt: skip
        self.timeline_figure.layout.shapes = (*self._timeline_shapes, band)


def conflict_dashboard(run) -> ConflictDashboard:
    """Task-conflict dashboard: an epoch slider and a task dropdown over the conflict matrix, the per-sample
    conflict histogram (clean against wrong labels) and the conflict's evolution over steps.

    Parameters
    ----------
    run : Run
        Anything with ``samples(columns=...)``, ``steps()`` and ``meta``, as ``sgs_lab.cache.open_run`` returns.

    Returns
    -------
    ConflictDashboard
        An ``ipywidgets.VBox``.
    """
    return ConflictDashboard(run)
