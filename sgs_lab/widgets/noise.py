"""Noisy-label detection on one run: ROC and precision–recall against the injected noise, and a threshold slider
that flags suspect samples with live precision and recall."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import viz
from ._base import Dashboard, dropdown, figure_widget, run_samples, run_tasks, show

ALL_TASKS = "all tasks"
COLUMNS = ("epoch", "task", "sample_id", "label", "clean_label", "noisy")
OPTIONAL_COLUMNS = ("present", "margin")  # read when the run records them: which labels exist, which tasks classify
SLIDER_STEPS = 500


def read_records(run) -> pd.DataFrame:
    """The run's :data:`COLUMNS`, with :data:`OPTIONAL_COLUMNS` where the run has them."""
    listed = getattr(run, "columns", None)
    if callable(listed):  # a cached run lists its columns without reading any rows
        try:
            available = set(listed())
        except (TypeError, ValueError, OSError):
            available = None
        if available is not None:
            return run_samples(run, [*COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in available)])
    try:
        return run_samples(run, [*COLUMNS, *OPTIONAL_COLUMNS])
    except (KeyError, ValueError):  # a run object without them
        return run_samples(run, COLUMNS)


def labelled_rows(samples: pd.DataFrame, task: str) -> pd.DataFrame:
    """``task``'s rows that carry a label (a label, and ``present`` where recorded)."""
    keep = (samples["task"].astype(str) == task).to_numpy() & samples["label"].notna().to_numpy()
    if "present" in samples.columns:
        keep &= samples["present"].fillna(False).astype(bool).to_numpy()
    return samples[keep]


def classification_tasks(samples: pd.DataFrame, tasks) -> list[str]:
    """The tasks whose labels a detector can check: labelled rows with whole-number labels and, where margins are
    recorded, a margin (a regression task has none). Tasks without any labelled sample are left out."""
    found = []
    for task in tasks:
        rows = labelled_rows(samples, task)
        labels = rows["label"].to_numpy(dtype=float)
        if not len(rows) or not np.array_equal(labels, np.round(labels)):
            continue
        if "margin" in rows.columns and rows["margin"].isna().all():
            continue
        found.append(task)
    return found


def has_noise_truth(noisy) -> bool:
    """Whether ground truth can grade a detector: both clean and wrong labels among ``noisy``."""
    noisy = np.asarray(noisy, dtype=bool)
    return bool(noisy.any() and not noisy.all())


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
    """Controls: ``task_dropdown`` (a classification task with labelled samples, or "all tasks" combined; it
    starts at the first task with both clean and wrong labels), ``threshold_slider`` (flag scores ≥ it).
    Output: ``summary`` (flagged count, precision and recall against the injected noise), ``roc_figure`` and
    ``pr_figure`` (the last trace of each marks the threshold), ``gallery_figure`` (the most suspect flagged
    samples, when images were given). ``scores`` holds the current score table with its ``noisy`` truth.

    A task without injected noise (or with only wrong labels) has nothing to grade the detector against:
    ``truth_known`` is False, the summary says so and the curve figures stay empty; the ranking still updates."""

    def __init__(self, run, *, scorer: Callable | None = None, images=None, image_ids=None, gallery_size=12) -> None:
        super().__init__()
        self.run, self.scorer = run, scorer or default_scorer
        self.samples = read_records(run)
        self.images = viz.image_lookup(images, image_ids) if images is not None else None
        self.gallery_size = gallery_size
        tasks = run_tasks(run, self.samples)
        checkable = classification_tasks(self.samples, tasks)
        if not checkable:
            raise ValueError(
                f"the run has no classification task with labelled samples to check; its tasks are {tasks}"
            )
        with_truth = [t for t in checkable if has_noise_truth(labelled_rows(self.samples, t)["noisy"])]
        self.task_dropdown = dropdown([*checkable, ALL_TASKS], "task", value=(with_truth or checkable)[0])
        self.threshold_slider = widgets.FloatSlider(description="threshold", readout_format=".3g",
                                                    continuous_update=False)  # fmt: skip
        self.summary = widgets.HTML()
        self.roc_figure, self.pr_figure, self.gallery_figure = figure_widget(), figure_widget(), figure_widget()
        self.scores = pd.DataFrame()
        self.truth_known = False  # whether the current task has both clean and wrong labels to grade against
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
        self.truth_known = has_noise_truth(self.scores["noisy"])
        score = self.scores["score"]
        with self.quietly():
            set_range(self.threshold_slider, float(score.min()), float(score.max()), initial_threshold(self.scores))
        threshold = self.threshold_slider.value  # the builders add the marker trace that update_threshold moves
        if self.truth_known:
            show(self.roc_figure, viz.noise_roc(self.scores, threshold=threshold, width=460, height=400))
            show(self.pr_figure, viz.noise_pr(self.scores, threshold=threshold, width=460, height=400))
        else:  # nothing to grade against: empty plots, the summary says why
            for target in (self.roc_figure, self.pr_figure):
                show(target, go.Figure(layout={"width": 460, "height": 400, "template": viz.TEMPLATE}))
        self.update_threshold()

    def update_threshold(self) -> None:
        """Flag scores ≥ the threshold: live precision / recall, the markers on both curves, the gallery."""
        threshold = self.threshold_slider.value
        outcome = viz.flag_outcome(self.scores["score"], self.scores["noisy"], threshold)
        if not self.truth_known:
            self.summary.value = _no_truth_html(outcome, len(self.scores), self.task_dropdown.value)
            if self.images is not None:
                self.update_gallery(threshold)
            return
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


def _no_truth_html(outcome: dict, total: int, task: str) -> str:
    subject = "the tasks combined" if task == ALL_TASKS else f"task <b>{task}</b>"
    which = "none" if outcome["noisy"] == 0 else "all"
    return (
        f"flagged <b>{outcome['flagged']}</b> of {total} · no injected-noise ground truth for {subject}: {which} "
        f"of its {total} scored labels were flipped, so there is no precision, recall or ROC / PR curve to measure "
        f"the detector by (the ranking and its flags still stand)"
    )


def noise_dashboard(run, *, scorer: Callable | None = None, images=None, image_ids=None) -> NoiseDashboard:
    """Noisy-label detection dashboard: a task dropdown, a threshold slider that flags suspect samples with live
    precision / recall against the injected noise, ROC and PR curves marking the threshold, and a gallery of the
    most suspect flagged samples.

    The dropdown lists the classification tasks that have labelled samples (regression tasks and tasks whose labels
    are all missing have nothing to check) and starts at the first one with both clean and wrong labels.

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

    Raises
    ------
    ValueError
        The run has no classification task with labelled samples.
    """
    return NoiseDashboard(run, scorer=scorer, images=images, image_ids=image_ids)
