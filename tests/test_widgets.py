"""Dashboards without a kernel: set a control's value, check the figures against an independent computation."""

from __future__ import annotations

import re
import sys

import ipywidgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.callbacks import Points
from test_viz import FrameRun, trained  # one short EW and one short SGS run, shared with the figure tests

from sgs_lab import viz, widgets
from sgs_lab.cache import RunWriter, open_run


@pytest.fixture(scope="module")
def runs():
    return trained()[1]


@pytest.fixture(scope="module")
def run(runs):
    return runs["sgs"]


@pytest.fixture(scope="module")
def records(run):
    return run.samples().astype({"task": str})


@pytest.fixture(scope="module")
def train_set():
    return trained()[0]


def heights(figure) -> list[np.ndarray]:
    return [np.asarray(t.y, dtype=float) for t in figure.data if t.type == "bar"]


def shares(values, edges) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return np.histogram(values, bins=edges)[0] / len(values)


def test_dashboards_are_widgets_holding_figure_widgets(run, runs):
    for dashboard in (widgets.conflict_dashboard(run), widgets.weight_dashboard(run), widgets.compare_runs(runs)):
        assert isinstance(dashboard, ipywidgets.VBox)
        figures = [w for box in dashboard.children for w in getattr(box, "children", [box])]
        assert any(isinstance(w, go.FigureWidget) for w in figures)


# --- conflicts ---------------------------------------------------------------------------------------------------


def test_conflict_dashboard_follows_the_epoch_slider_and_task(run, records):
    dash = widgets.conflict_dashboard(run)
    assert dash.epoch_slider.value == 2  # starts at the trained state
    for epoch in (0, 1):
        dash.epoch_slider.value = epoch
        rows = records[(records["epoch"] == epoch) & (records["task"] == "left")]
        z = np.asarray(dash.matrix_figure.data[0].z, dtype=float)
        np.testing.assert_allclose(z[0, 1], rows["conflict"].mean(), rtol=1e-6)
        band = dash.timeline_figure.layout.shapes[-1]
        assert (band.x0, band.x1) == (rows["step"].min() - 0.5, rows["step"].max() + 0.5)
    dash.task_dropdown.value = "right"
    rows = records[(records["epoch"] == 1) & (records["task"] == "right")]
    edges = np.linspace(-1, 1, 41)
    expected = [shares(rows.loc[rows["noisy"] == flag, "conflict"], edges) for flag in (False, True)]
    for got, want in zip(heights(dash.histogram_figure), expected):
        np.testing.assert_allclose(got, want)
    assert len(dash.timeline_figure.layout.shapes) == 2  # the zero line stays, one band


STATISTICS = ["p_label", "margin", "loss", "sgs", "sgs_batch", "sgs_class", "grad_norm", "weight", "conflict"]


def test_dashboards_open_on_a_float16_run(run, records):
    half = records.astype(dict.fromkeys(STATISTICS, np.float16))  # as a run stored with float16=True reads
    half_run = FrameRun(half, run.steps(), run.meta)
    dash = widgets.conflict_dashboard(half_run)
    wide = half.astype(dict.fromkeys(STATISTICS, np.float64))
    grouped = wide[wide["task"] == "left"].groupby("step")["conflict"]
    low, high, mean = dash.timeline_figure.data
    np.testing.assert_allclose(low.y, grouped.quantile(0.1))
    np.testing.assert_allclose(high.y, grouped.quantile(0.9))
    np.testing.assert_allclose(mean.y, grouped.mean())
    dash.epoch_slider.value = 1
    rows = wide[(wide["epoch"] == 1) & (wide["task"] == "left")]
    np.testing.assert_allclose(np.asarray(dash.matrix_figure.data[0].z, dtype=float)[0, 1], rows["conflict"].mean())
    for dashboard in (widgets.weight_dashboard, widgets.sample_explorer, widgets.noise_dashboard):
        assert dashboard(half_run).samples.select_dtypes("float16").empty  # read as float64
    assert isinstance(widgets.compare_runs([half_run, run]), ipywidgets.VBox)


def test_dashboards_refuse_a_run_without_rows_yet(tmp_path, run):
    with RunWriter(tmp_path / "empty", {"method": "ew", "tasks": ["left", "right"]}):
        pass  # the writer stopped before its first flush
    empty = open_run(tmp_path / "empty")
    message = f"run {tmp_path / 'empty'} has no committed rows yet; wait for its first flush or refresh"
    for dashboard in (widgets.conflict_dashboard, widgets.weight_dashboard, widgets.sample_explorer,
                      widgets.noise_dashboard):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            dashboard(empty)
    with pytest.raises(ValueError, match=re.escape(message)):
        widgets.compare_runs({"trained": run, "empty": empty})


# --- weights -----------------------------------------------------------------------------------------------------


def test_weight_dashboard_redraws_for_task_and_epoch(run, records):
    dash = widgets.weight_dashboard(run, max_lines=6)
    dash.task_dropdown.value = "right"
    means = {t.name: t for t in dash.trajectory_figure.data if t.name.endswith("· mean")}
    right = records[records["task"] == "right"]
    expected = right[right["noisy"]].groupby("epoch")["weight"].mean()
    np.testing.assert_allclose(means["wrong label · mean"].y, expected, rtol=1e-6)
    before = heights(dash.histogram_figure)
    dash.epoch_slider.value = 1
    rows = right[right["epoch"] == 1]
    total = sum(h.sum() for h in heights(dash.histogram_figure))
    np.testing.assert_allclose(total, 2.0)  # two groups, each normalised to 1
    assert not all(np.array_equal(a, b) for a, b in zip(before, heights(dash.histogram_figure)))
    clean_x = np.asarray(dash.histogram_figure.data[0].x)
    width = clean_x[1] - clean_x[0]
    edges = np.append(clean_x - width / 2, clean_x[-1] + width / 2)
    np.testing.assert_allclose(heights(dash.histogram_figure)[0], shares(rows.loc[~rows["noisy"], "weight"], edges))
    assert dash.trajectory_figure.layout.shapes[-1].x0 == 1


# --- sample explorer ---------------------------------------------------------------------------------------------


def test_explorer_map_follows_statistic_task_and_epochs(run, records):
    dash = widgets.sample_explorer(run)
    dash.statistic_dropdown.value = "sgs_class"
    dash.task_dropdown.value = "right"
    right = records[records["task"] == "right"]
    mean = right.groupby("sample_id")["sgs_class"].mean()
    for trace in dash.map_figure.data:
        np.testing.assert_allclose(trace.y, mean.loc[list(trace.customdata)], rtol=1e-5)
    dash.epoch_range.value = (1, 1)  # one epoch: no variability
    assert all(np.allclose(t.x, 0) for t in dash.map_figure.data)
    one_epoch = right[right["epoch"] == 1].set_index("sample_id")["sgs_class"]
    trace = dash.map_figure.data[0]
    np.testing.assert_allclose(trace.y, one_epoch.loc[list(trace.customdata)], rtol=1e-6)


def test_clicking_a_point_shows_that_sample(run, records, train_set):
    dash = widgets.sample_explorer(run, images=train_set)
    wrong = dash.map_figure.data[1]  # left task, wrong labels
    assert wrong.name == "wrong label"
    dash.select_point(1, 3)
    sample_id = int(wrong.customdata[3])
    assert dash.selected == sample_id
    rows = records[(records["sample_id"] == sample_id) & (records["task"] == "left")]
    first = rows.iloc[0]
    assert f"Sample #{sample_id}" in dash.details.value
    assert f"<td>left</td><td>{int(first.label)}</td><td>{int(first.clean_label)}</td>" in dash.details.value
    row = int(np.flatnonzero(train_set.sample_id.numpy() == sample_id)[0])
    np.testing.assert_allclose(dash.image_figure.data[0].z, train_set.x[row, 0].numpy())
    left_line = dash.history_figure.data[0]
    np.testing.assert_allclose(left_line.y, rows.sort_values("epoch")["p_label"], rtol=1e-6)

    # the FigureWidget's own click dispatch reaches the same handler
    other = dash.map_figure.data[0]
    other._dispatch_on_click(Points(point_inds=[0], trace_index=0), None)
    assert dash.selected == int(other.customdata[0])
    dash.statistic_dropdown.value = "weight"  # the shown sample follows the statistic
    assert "mean weight" in dash.details.value
    assert dash.history_figure.layout.title.text.endswith(": weight")


# --- noisy-label detection ---------------------------------------------------------------------------------------


def loss_scorer(run, task):
    return widgets.mean_loss_scores(run.samples(columns=["task", "sample_id", "loss"]), task)


def test_threshold_slider_gives_live_precision_and_recall(run, records):
    dash = widgets.noise_dashboard(run, scorer=loss_scorer)
    left = records[records["task"] == "left"]
    score = left.groupby("sample_id")["loss"].mean()
    noisy = left.groupby("sample_id")["noisy"].first()
    assert dash.threshold_slider.value == pytest.approx(np.quantile(score, 0.9), abs=dash.threshold_slider.step)
    marker_before = dash.roc_figure.data[-1].x
    threshold = float(np.quantile(score, 0.5))
    dash.threshold_slider.value = threshold
    threshold = dash.threshold_slider.value  # as the slider's step rounds it
    flagged = score >= threshold
    precision = (flagged & noisy).sum() / flagged.sum()
    recall = (flagged & noisy).sum() / noisy.sum()
    assert f"flagged <b>{flagged.sum()}</b> of 600" in dash.summary.value
    assert f"precision <b>{precision:.3f}</b>" in dash.summary.value
    assert f"recall <b>{recall:.3f}</b>" in dash.summary.value
    assert dash.roc_figure.data[-1].x != marker_before
    assert dash.pr_figure.data[-1].x == (pytest.approx(recall),)
    assert dash.pr_figure.data[-1].y == (pytest.approx(precision),)
    assert set(dash.flagged()["sample_id"]) == set(score[flagged].index)


def test_noise_dashboard_over_all_tasks_and_with_a_detectors_cut(run, records, train_set):
    def scorer(run, task):
        table = loss_scorer(run, task)
        return table.assign(flagged=np.arange(len(table)) < 50)  # the detector flags its top 50

    dash = widgets.noise_dashboard(run, scorer=scorer, images=train_set)
    assert dash.summary.value.startswith("flagged <b>50</b>")
    assert len(dash.gallery_figure.data) == dash.gallery_size
    assert dash.gallery_figure.layout.annotations[0].text.startswith(f"#{dash.flagged()['sample_id'].iloc[0]} ·")
    dash.task_dropdown.value = "all tasks"
    any_noisy = records.groupby("sample_id")["noisy"].any()
    assert f"against the {any_noisy.sum()} injected wrong labels" in dash.summary.value
    truth = any_noisy.loc[dash.scores["sample_id"]].to_numpy()
    np.testing.assert_array_equal(dash.scores["noisy"], truth)
    roc = viz.noise_roc(dash.scores)
    np.testing.assert_allclose(dash.roc_figure.data[0].y, roc.data[0].y)


def test_default_scorer_falls_back_to_the_small_loss_score(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "sgs_lab.detect", None)  # as if the detectors were not installed
    got = widgets.default_scorer(run, "left")
    pd.testing.assert_frame_equal(got, loss_scorer(run, "left"))
    assert got["score"].is_monotonic_decreasing


@pytest.fixture(scope="module")
def mixed_run(run, records):
    """The SGS run as if only "right" had injected noise, with a regression task listed first ("ink") and a task
    whose labels are all missing ("loop")."""
    frame = records.assign(noisy=records["noisy"] & (records["task"] == "right"))
    left = frame[frame["task"] == "left"]
    ink = left.assign(task="ink", label=left["sample_id"] * 0.37, clean_label=left["sample_id"] * 0.37,
                      noisy=False, margin=np.nan, p_label=np.nan)  # fmt: skip
    loop = left.assign(task="loop", label=np.nan, noisy=False, present=False, margin=np.nan, p_label=np.nan)
    meta = {**run.meta, "tasks": ["ink", "loop", "left", "right"]}
    return FrameRun(pd.concat([ink, loop, frame], ignore_index=True), run.steps(), meta)


def test_noise_dashboard_offers_classification_tasks_and_starts_at_one_with_noise(mixed_run, records):
    dash = widgets.noise_dashboard(mixed_run)  # the default scorer: sgs_lab.detect.find_noisy
    assert dash.task_dropdown.options == ("left", "right", "all tasks")
    assert dash.task_dropdown.value == "right" and dash.truth_known
    right = records[records["task"] == "right"].groupby("sample_id")["noisy"].first()
    assert f"against the {right.sum()} injected wrong labels" in dash.summary.value
    assert len(dash.roc_figure.data) == 2 and len(dash.pr_figure.data) == 2  # curve and threshold marker

    dash.task_dropdown.value = "left"  # no injected noise: a ranking, no curves
    assert not dash.truth_known and not dash.scores["noisy"].any() and len(dash.scores) == 600
    assert dash.scores["score"].is_monotonic_decreasing
    assert (len(dash.roc_figure.data), len(dash.pr_figure.data)) == (0, 0)
    assert "no injected-noise ground truth for task <b>left</b>: none of its 600 scored labels" in dash.summary.value
    assert "precision <b>" not in dash.summary.value
    dash.threshold_slider.value = float(dash.scores["score"].iloc[99])
    assert dash.summary.value.startswith(f"flagged <b>{len(dash.flagged())}</b> of 600 ")
    assert len(dash.flagged()) >= 100

    dash.task_dropdown.value = "all tasks"  # the combined ranking is graded again ("right" has wrong labels)
    assert dash.truth_known and "precision <b>" in dash.summary.value and len(dash.roc_figure.data) == 2
    dash.task_dropdown.value = "right"
    assert dash.truth_known and len(dash.roc_figure.data) == 2


def test_noise_dashboard_refuses_a_run_without_class_labels(mixed_run):
    samples = mixed_run.samples().astype({"task": str})
    only = samples[samples["task"].isin(["ink", "loop"])]
    with pytest.raises(ValueError, match=r"no classification task with labelled samples.*\['ink', 'loop'\]"):
        widgets.noise_dashboard(FrameRun(only, mixed_run.steps(), {**mixed_run.meta, "tasks": ["ink", "loop"]}))


# --- comparing runs ----------------------------------------------------------------------------------------------


def test_compare_runs_side_by_side(runs):
    dash = widgets.compare_runs(runs)
    assert (dash.left_dropdown.value, dash.right_dropdown.value) == ("ew", "sgs")
    dash.statistic_dropdown.value = "loss"
    dash.epoch_slider.value = 1
    left_x, right_x = np.asarray(dash.left_figure.data[0].x), np.asarray(dash.right_figure.data[0].x)
    np.testing.assert_allclose(left_x, right_x)  # shared bins
    width = left_x[1] - left_x[0]
    edges = np.append(left_x - width / 2, left_x[-1] + width / 2)
    for figure, name in ((dash.left_figure, "ew"), (dash.right_figure, "sgs")):
        frame = runs[name].samples()
        rows = frame[(frame["epoch"] == 1) & (frame["task"] == "left")]
        for got, flag in zip(heights(figure), (False, True)):
            np.testing.assert_allclose(got, shares(rows.loc[rows["noisy"] == flag, "loss"], edges), atol=1e-12)
    names = {t.name.split(" · ")[0] for t in dash.dynamics_figure.data}
    assert names == {"ew", "sgs"}
    dash.right_dropdown.value = "ew"
    assert {t.name.split(" · ")[0] for t in dash.dynamics_figure.data} == {"ew"}
    np.testing.assert_allclose(heights(dash.left_figure)[0], heights(dash.right_figure)[0])
    dash.statistic_dropdown.value = "sgs"
    np.testing.assert_allclose(dash.left_figure.data[0].x[[0, -1]], [-0.975, 0.975])  # cosines: fixed bins


def test_compare_runs_names_a_sequence_by_method(runs):
    dash = widgets.compare_runs([runs["sgs"], runs["ew"], runs["sgs"]])
    assert list(dash.left_dropdown.options) == ["sgs", "ew", "sgs #2"]


def test_compare_runs_offers_the_tasks_of_every_run(runs):
    from test_viz import FrameRun

    other = runs["sgs"]
    frame = other.samples()
    frame = frame[frame["task"] == "right"].assign(task=lambda f: f["task"].astype(str).replace("right", "solo"))
    steps = other.steps()
    solo = FrameRun(frame, steps[steps["task"] == "right"].assign(task="solo"),
                    {**other.meta, "method": "solo", "tasks": ["solo"]})  # fmt: skip
    dash = widgets.compare_runs({"ew": runs["ew"], "solo": solo})
    assert list(dash.task_dropdown.options) == ["left", "right", "solo"]
    dash.right_dropdown.value = "solo"
    dash.task_dropdown.value = "solo"
    assert sum(np.asarray(t.y).sum() for t in dash.right_figure.data) > 0  # the single-task run has its panel
