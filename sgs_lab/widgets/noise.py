"""Noisy-label detection on one run: ROC and precision–recall against the injected noise, and a threshold slider
that flags suspect samples with live precision and recall."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import numpy as np
import pandas as pd

from .. import viz
from ._base import Dashboard, dropdown, figure_widget, run_samples, run_tasks, show

ALL_TASKS = "all tasks"
COLUMNS = ("epoch", "task", "sample_id", "label", "clean_label", "noisy")
SLIDER_STEPS = 500


def mean_loss_scores(samples: pd.DataFrame, task: str | None) -> pd.DataFrame:
    """The small-loss score: each sample's training loss averaged over epochs (and over tasks when ``task`` is
    None); higher means more likely mislabelled. Returns sample_id and score, most suspect first."""
    rows = samples if task is None else samples[samples["task"] == task]
    score = rows.groupby("sample_id", sort=True)["loss"].mean().dropna()
    return score.rename("score").reset_index().sort_values("score", ascending=False, kind="stable")


def default_scorer(run, task: str | None) -> pd.DataFrame:
    """``sgs_lab.detect.find_noisy(run, task)`` where that module exists, else :func:`mean_loss_scores`."""
    try:
        from ..detect import find_noisy
    except ImportError:  # the detectors are optional here: the small-loss score needs only the records
        return mean_loss_scores(run_samples(run, ["task", "sample_id", "loss"]), task)
    return find_noisy(run, task)


def initial_threshold(scores: pd.DataFrame) -> float:
    """The detector's own cut (its lowest flagged score) when it flags anything, else the top 10 %."""
    if "flagged" in scores.columns and scores["flagged"].any():
        return float(scores.loc[scores["flagged"].astype(bool), "score"].min())
    return float(np.quantile(scores["score"], 0.9))


def set_range(slider: widgets.FloatSlider, low: float, high: float, value: float) -> None:
    """Move a slider to a new range and value without it clamping the value to the old range on the way."""
    high = high if high > low else low + 1e-9  # a constant score still needs a slider with some width
    slider.min, slider.max = min(low, slider.min), max(high, slider.max)
    slider.step = (high - low) / SLIDER_STEPS
    slider.value = float(np.clip(value, low, high))
    slider.min, slider.max = low, high


class NoiseDashboard(Dashboard):
    """Controls: ``task_dropdown`` (a task, or "all tasks" combined), ``threshold_slider`` (flag scores ≥ it).
    Output: ``summary`` (flagged count, precision and recall against the injected noise), ``roc_figure`` and
    ``pr_figure`` (the last trace of each marks the threshold), ``gallery_figure`` (the most suspect flagged
    samples, when images were given). ``scores`` holds the current score table with its ``noisy`` truth."""

    def __init__(self, run, *, scorer: Callable | None = None, images=None, image_ids=None, gallery_size=12) -> None:
        super().__init__()
        self.run, self.scorer = run, scorer or default_scorer
        self.samples = run_samples(run, COLUMNS)
        self.images = viz.image_lookup(images, image_ids) if images is not None else None
        self.gallery_size = gallery_size
        self.task_dropdown = dropdown([*run_tasks(run, self.samples), ALL_TASKS], "task")
        self.threshold_slider = widgets.FloatSlider(description="threshold", readout_format=".3g",
                                                    continuous_update=False)  # fmt: skip
        self.summary = widgets.HTML()
        self.roc_figure, self.pr_figure, self.gallery_figure = figure_widget(), figure_widget(), figure_widget()
        self.scores = pd.DataFrame()
        self._observe(self.task_dropdown, self.update_scores)
        self._observe(self.threshold_slider, self.update_threshold)
        self.children = [
            widgets.HBox([self.task_dropdown, self.threshold_slider]),
            self.summary,
            widgets.HBox([self.roc_figure, self.pr_figure]),
            *([self.gallery_figure] if self.images is not None else []),
        ]
        self.update_scores()

    @property
    def task(self) -> str | None:
        return None if self.task_dropdown.value == ALL_TASKS else self.task_dropdown.value

    def update_scores(self) -> None:
        """Score the chosen task, redraw the curves and put the slider at the detector's own cut."""
        scores = viz.with_noise_truth(self.scorer(self.run, self.task), self.samples, task=self.task)
        self.scores = scores.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        score = self.scores["score"]
        with self.quietly():
            set_range(self.threshold_slider, float(score.min()), float(score.max()), initial_threshold(self.scores))
        threshold = self.threshold_slider.value  # the builders add the marker trace that update_threshold moves
        show(self.roc_figure, viz.noise_roc(self.scores, threshold=threshold, width=460, height=400))
        show(self.pr_figure, viz.noise_pr(self.scores, threshold=threshold, width=460, height=400))
        self.update_threshold()

    def update_threshold(self) -> None:
        """Flag scores ≥ the threshold: live precision / recall, the markers on both curves, the gallery."""
        threshold = self.threshold_slider.value
        outcome = viz.flag_outcome(self.scores["score"], self.scores["noisy"], threshold)
        self.summary.value = _summary_html(outcome, len(self.scores))
        name = f"score ≥ {threshold:.3g}"
        with self.roc_figure.batch_update():
            self.roc_figure.data[-1].update(x=[outcome["false_positive_rate"]], y=[outcome["recall"]], name=name)
        with self.pr_figure.batch_update():
            self.pr_figure.data[-1].update(x=[outcome["recall"]], y=[outcome["precision"]], name=name)
        if self.images is not None:
            self.update_gallery(threshold)

    def flagged(self) -> pd.DataFrame:
        """The samples flagged at the current threshold, most suspect first."""
        return self.scores[self.scores["score"] >= self.threshold_slider.value]

    def update_gallery(self, threshold: float) -> None:
        top = self.flagged().head(self.gallery_size)[["sample_id"]]
        rows = self.samples[self.samples["epoch"] == self.samples["epoch"].max()]
        if self.task is not None:
            rows = rows[rows["task"] == self.task]
        shown = top.merge(rows[["sample_id", "task", "label", "clean_label"]], on="sample_id", how="left")
        title = f"Most suspect flagged samples (score ≥ {threshold:.3g}); red: the label is wrong"
        show(self.gallery_figure, viz.sample_gallery(shown, self.images, title=title, width=900))


def _summary_html(outcome: dict, total: int) -> str:
    def fmt(value: float) -> str:
        return "—" if np.isnan(value) else f"{value:.3f}"

    return (
        f"flagged <b>{outcome['flagged']}</b> of {total} · precision <b>{fmt(outcome['precision'])}</b> · "
        f"recall <b>{fmt(outcome['recall'])}</b> (against the {outcome['noisy']} injected wrong labels)"
    )


def noise_dashboard(run, *, scorer: Callable | None = None, images=None, image_ids=None) -> NoiseDashboard:
    """Noisy-label detection dashboard: a task dropdown, a threshold slider that flags suspect samples with live
    precision / recall against the injected noise, ROC and PR curves marking the threshold, and a gallery of the
    most suspect flagged samples.

    Parameters
    ----------
    run : Run
        Anything with ``samples(columns=...)``, ``steps()`` and ``meta``, as ``sgs_lab.cache.open_run`` returns.
    scorer : callable, optional
        ``scorer(run, task)`` (task None: all tasks) returns a table with sample_id and score (higher: more
        suspect), optionally flagged (the slider starts at the lowest flagged score); default
        :func:`default_scorer`.
    images : TaskSet, mapping or array-like, optional
        The samples' pictures for the gallery (see ``sgs_lab.viz.image_lookup``); None: no gallery.
    image_ids : array-like, optional
        Sample ids of the rows of an image array.

    Returns
    -------
    NoiseDashboard
        An ``ipywidgets.VBox``.
    """
    return NoiseDashboard(run, scorer=scorer, images=images, image_ids=image_ids)
