"""Explore one run sample by sample: a data map of the chosen statistic; clicking a point shows that sample."""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import pandas as pd

from .. import viz
from ._base import Dashboard, dropdown, figure_widget, run_samples, run_tasks, show

STATISTICS = ("p_label", "sgs", "sgs_class", "sgs_batch", "loss", "weight", "margin", "conflict", "grad_norm")
KEYS = ("epoch", "task", "sample_id", "label", "clean_label", "noisy")


class SampleExplorer(Dashboard):
    """Controls: ``task_dropdown``, ``statistic_dropdown`` (the data map's statistic), ``epoch_range`` (the epochs
    it averages over). Figures: ``map_figure`` (clicking a point calls :meth:`on_point_click`), and for the chosen
    sample ``details`` (an HTML table), ``image_figure`` (when images were given) and ``history_figure``.
    ``selected`` holds the shown sample's id."""

    def __init__(self, run, *, images=None, image_ids=None) -> None:
        super().__init__()
        self.samples = run_samples(run, [*KEYS, *STATISTICS])
        self.images = viz.image_lookup(images, image_ids) if images is not None else None
        statistics = [s for s in STATISTICS if s in self.samples.columns]
        epochs = self.samples["epoch"]
        self.task_dropdown = dropdown(run_tasks(run, self.samples), "task")
        self.statistic_dropdown = dropdown(statistics, "statistic")
        self.epoch_range = widgets.IntRangeSlider(value=(int(epochs.min()), int(epochs.max())), min=int(epochs.min()),
                                                  max=int(epochs.max()), description="epochs",
                                                  continuous_update=False)  # fmt: skip
        self.map_figure = figure_widget()
        self.details = widgets.HTML("<i>Click a point to see that sample.</i>")
        self.image_figure = figure_widget()
        self.history_figure = figure_widget()
        self.selected = None
        for control in (self.task_dropdown, self.statistic_dropdown, self.epoch_range):
            self._observe(control, self.update)
        sample_view = [self.details, *([self.image_figure] if self.images is not None else []), self.history_figure]
        self.children = [
            widgets.HBox([self.task_dropdown, self.statistic_dropdown, self.epoch_range]),
            widgets.HBox([self.map_figure, widgets.VBox(sample_view)]),
        ]
        self.update()

    def map_rows(self) -> pd.DataFrame:
        low, high = self.epoch_range.value
        rows = self.samples[(self.samples["task"] == self.task_dropdown.value)]
        return rows[(rows["epoch"] >= low) & (rows["epoch"] <= high)]

    def update(self) -> None:
        """Redraw the data map, and the chosen sample's view for the new statistic."""
        low, high = self.epoch_range.value
        title = f"Data map: {self.statistic_dropdown.value}, {self.task_dropdown.value}, epochs {low}–{high}"
        figure = viz.data_map(self.map_rows(), self.statistic_dropdown.value, facet_col=None, title=title,
                              width=620, height=480)  # fmt: skip
        show(self.map_figure, figure)
        for trace in self.map_figure.data:  # new traces: hand each the click handler again
            trace.on_click(self.on_point_click)
        if self.selected is not None:
            self.show_sample(self.selected)

    def on_point_click(self, trace, points, _state=None) -> None:
        """FigureWidget click callback: show the first clicked point's sample (its id is the point's customdata)."""
        if points.point_inds:
            self.show_sample(trace.customdata[points.point_inds[0]])

    def select_point(self, trace_index: int, point_index: int) -> None:
        """Show the sample behind point ``point_index`` of the map's trace ``trace_index`` (what a click does)."""
        self.show_sample(self.map_figure.data[trace_index].customdata[point_index])

    def show_sample(self, sample_id) -> None:
        """Fill the sample view: labels per task, the statistic's mean, the image and the statistic over epochs."""
        self.selected = sample_id = int(sample_id)
        rows = self.samples[self.samples["sample_id"] == sample_id]
        statistic = self.statistic_dropdown.value
        self.details.value = _details_html(sample_id, rows, statistic)
        history = viz.sample_history(rows, statistic, title=f"Sample #{sample_id}: {statistic}", width=380, height=260)
        show(self.history_figure, history)
        if self.images is not None:
            last = rows[rows["epoch"] == rows["epoch"].max()]
            show(self.image_figure, viz.sample_gallery(last, self.images, columns=1, max_images=1, title=None,
                                                       width=200, height=230))  # fmt: skip


def _details_html(sample_id: int, rows: pd.DataFrame, statistic: str) -> str:
    """A small table: one line per task with the given and true label and the statistic's mean over epochs."""
    lines = []
    for task, task_rows in rows.groupby("task", observed=True, sort=False):
        first = task_rows.iloc[0]
        wrong = bool(first["noisy"])
        mark = "<b style='color:#e45756'>wrong</b>" if wrong else "clean"
        mean = np.nanmean(task_rows[statistic].to_numpy(dtype=float)) if task_rows[statistic].notna().any() else np.nan
        lines.append(f"<tr><td>{html.escape(str(task))}</td><td>{_label(first['label'])}</td>"
                     f"<td>{_label(first['clean_label'])}</td><td>{mark}</td><td>{mean:.3f}</td></tr>")  # fmt: skip
    head = f"<tr><th>task</th><th>given</th><th>true</th><th>label</th><th>mean {html.escape(statistic)}</th></tr>"
    return f"<b>Sample #{sample_id}</b><table>{head}{''.join(lines)}</table>"


def _label(value) -> str:
    return "missing" if pd.isna(value) else str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def sample_explorer(run, *, images=None, image_ids=None) -> SampleExplorer:
    """Sample explorer: a data map of one task (the chosen statistic's mean against its variability over the
    chosen epochs, coloured by injected noise); clicking a point shows that sample's labels, image and statistic
    over epochs.

    Parameters
    ----------
    run : Run
        Anything with ``samples(columns=...)``, ``steps()`` and ``meta``, as ``sgs_lab.cache.open_run`` returns.
    images : TaskSet, mapping or array-like, optional
        The samples' pictures (see ``sgs_lab.viz.image_lookup``); None: no image in the sample view.
    image_ids : array-like, optional
        Sample ids of the rows of an image array.

    Returns
    -------
    SampleExplorer
        An ``ipywidgets.VBox``.
    """
    return SampleExplorer(run, images=images, image_ids=image_ids)
