"""Figure builders: every figure's data checked against an independent pandas / NumPy / scikit-learn computation."""

from __future__ import annotations

import functools
import inspect
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from sgs_lab import viz
from sgs_lab.data import make_multidigits
from sgs_lab.train import TrainConfig, fit
from sgs_lab.viz._common import PARAMETERS


class FrameRun:
    """A run over in-memory DataFrames, shaped like ``sgs_lab.cache.open_run`` (task column categorical)."""

    def __init__(self, samples: pd.DataFrame, steps: pd.DataFrame, meta: dict) -> None:
        self._samples, self._steps, self.meta = samples, steps, meta

    def samples(self, epochs=None, tasks=None, columns=None) -> pd.DataFrame:
        frame = self._samples
        if epochs is not None:
            frame = frame[frame["epoch"].isin(epochs)]
        if tasks is not None:
            frame = frame[frame["task"].isin(tasks)]
        frame = frame if columns is None else frame[list(columns)]
        return frame.reset_index(drop=True).astype({"task": "category"} if "task" in frame else {})

    def steps(self) -> pd.DataFrame:
        return self._steps.copy()


@functools.cache
def trained():
    """One short EW and one short SGS run on noisy MultiDigits (a few seconds), shared by the viz and widget tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = make_multidigits(600, 300, seed=0)
        train = train.with_noise(0.4, seed=0)
        runs = {}
        for method, knobs in (("ew", {}), ("sgs", {"warmup": 1})):
            result = fit(train, test, TrainConfig(method=method, knobs=knobs, epochs=3), progress=False)
            meta = {"method": method, "seed": 0, "noise": {"left": 0.4, "right": 0.4}, "tasks": ["left", "right"],
                    "status": "finished", "history": result.history}  # fmt: skip
            runs[method] = FrameRun(pd.DataFrame(result.sink.samples()), pd.DataFrame(result.sink.steps()), meta)
    finally:
        torch.set_num_threads(threads)
    return train, runs


@pytest.fixture(scope="module")
def train_set():
    return trained()[0]


@pytest.fixture(scope="module")
def samples():
    """The SGS run's records with a plain string task column."""
    return trained()[1]["sgs"]._samples


@pytest.fixture(scope="module")
def steps():
    return trained()[1]["sgs"].steps()


def bars(fig) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(t.name, np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)) for t in fig.data if t.type == "bar"]


def expected_shares(values, edges) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return np.histogram(values, bins=edges)[0] / len(values)


# --- histograms --------------------------------------------------------------------------------------------------


def test_sgs_histogram_splits_tasks_and_noise_on_shared_bins(samples):
    fig = viz.sgs_histogram(samples)
    edges = np.linspace(-1, 1, 41)
    traces = bars(fig)
    assert [name for name, *_ in traces] == ["clean label", "wrong label"] * 2
    k = 0
    for task in ("left", "right"):
        for noisy in (False, True):
            rows = samples[(samples["task"] == task) & (samples["noisy"] == noisy)]
            name, x, y = traces[k]
            assert name == viz.NOISE_LABELS[noisy]
            np.testing.assert_allclose(x, (edges[:-1] + edges[1:]) / 2)
            np.testing.assert_allclose(y, expected_shares(rows["sgs"], edges))
            k += 1
    assert [a.text for a in fig.layout.annotations] == ["left", "right"]  # one panel per task


def test_histogram_normalisations_and_missing_values():
    frame = pd.DataFrame({"v": [0.0, 0.1, 0.2, 0.9, np.nan], "g": ["a", "a", "b", "b", "b"]})
    counts = viz.histogram(frame, "v", color="g", nbins=2, histnorm="count")
    assert [list(y) for _, _, y in bars(counts)] == [[2, 0], [1, 1]]  # the NaN is left out
    percent = viz.histogram(frame, "v", color="g", nbins=2, histnorm="percent")
    assert [list(y) for _, _, y in bars(percent)] == [[100, 0], [50, 50]]
    with pytest.raises(ValueError, match="histnorm"):
        viz.histogram(frame, "v", histnorm="density")
    with pytest.raises(KeyError, match="nope"):
        viz.histogram(frame, "nope")


def test_weight_histogram_counts_every_present_weight(samples):
    fig = viz.weight_histogram(samples, facet_col=None, histnorm="count")
    total = sum(y.sum() for *_, y in bars(fig))
    assert total == samples["weight"].notna().sum()
    x = np.concatenate([x for _, x, _ in bars(fig)])
    assert x.min() > samples["weight"].min() and x.max() < samples["weight"].max()  # bins span the data


# --- weight trajectories -----------------------------------------------------------------------------------------


def test_weight_trajectories_mean_lines_and_sampled_lines(samples):
    fig = viz.weight_trajectories(samples, max_lines=10)
    by_name = {}
    for trace in fig.data:
        by_name.setdefault(trace.name, []).append(trace)
    for k, task in enumerate(("left", "right")):
        for noisy, name in ((False, "clean label"), (True, "wrong label")):
            rows = samples[(samples["task"] == task) & (samples["noisy"] == noisy)]
            mean = rows.groupby("epoch")["weight"].mean()
            line = by_name[f"{name} · mean"][k]
            np.testing.assert_allclose(line.x, mean.index)
            np.testing.assert_allclose(line.y, mean.to_numpy(), rtol=1e-6)
            thin = by_name[f"{name} · samples"][k]
            ids = {i for i in thin.customdata if i is not None}
            assert len(ids) == 5  # 10 lines shared between the two groups
            one = min(ids)
            points = [(x, y) for x, y, i in zip(thin.x, thin.y, thin.customdata) if i == one]
            expected = rows[rows["sample_id"] == one].groupby("epoch")["weight"].mean()
            np.testing.assert_allclose([p[1] for p in points], expected.to_numpy(), rtol=1e-6)
    again = viz.weight_trajectories(samples, max_lines=10)
    assert [list(t.customdata or []) for t in again.data] == [list(t.customdata or []) for t in fig.data]


def test_sgs_weights_differ_between_clean_and_wrong_labels_after_warmup(samples):
    """Not a figure property but what the figures are for: after warm-up the SGS weights move off 1."""
    late = samples[samples["epoch"] >= 1]
    assert late["weight"].std() > 0
    np.testing.assert_allclose(samples.loc[samples["epoch"] == 0, "weight"], 1.0)


# --- task conflicts ----------------------------------------------------------------------------------------------


def test_task_conflict_heatmap_is_the_mean_per_sample_cosine(samples):
    fig = viz.task_conflict_heatmap(samples)
    (heatmap,) = fig.data
    assert list(heatmap.x) == list(heatmap.y) == ["left", "right"]
    z = np.asarray(heatmap.z, dtype=float)
    expected = samples.loc[samples["task"] == "left", "conflict"].mean()
    np.testing.assert_allclose(z, [[1, expected], [expected, 1]], rtol=1e-6)
    assert heatmap.zmin == -1 and heatmap.zmax == 1


def test_task_conflict_table_per_epoch_and_categorical_tasks(samples):
    categorical = samples.astype({"task": pd.CategoricalDtype(["right", "left"])})
    table = viz.task_conflict_table(categorical, by="epoch")
    assert list(table.columns) == ["epoch", "task_a", "task_b", "cosine", "samples"]
    assert list(pd.unique(table["task_a"])) == ["right", "left"]  # the declared category order
    off = table[(table["task_a"] == "right") & (table["task_b"] == "left")].set_index("epoch")
    expected = samples[samples["task"] == "right"].groupby("epoch")["conflict"].agg(["mean", "count"])
    np.testing.assert_allclose(off["cosine"], expected["mean"], rtol=1e-6)
    assert list(off["samples"]) == list(expected["count"])


def three_task_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    tasks = np.repeat(["a", "b", "c"], 40)
    return pd.DataFrame({"task": tasks, "step": np.tile(np.repeat([0, 1], 20), 3), "conflict": rng.uniform(-1, 1, 120)})


def test_more_than_two_tasks_show_each_tasks_minimum_over_the_others():
    frame = three_task_frame()
    z = np.asarray(viz.task_conflict_heatmap(frame).data[0].z, dtype=float)
    means = frame.groupby("task")["conflict"].mean()
    for i, task in enumerate("abc"):
        assert z[i, i] == 1
        np.testing.assert_allclose(np.delete(z[i], i), means[task])  # the whole row: that task's minimum
    lines = viz.task_conflict_over_steps(frame, band=None)
    assert [t.name for t in lines.data] == [f"{t} · min over other tasks" for t in "abc"]
    np.testing.assert_allclose(lines.data[1].y, frame[frame["task"] == "b"].groupby("step")["conflict"].mean())


def test_task_conflict_over_steps_mean_and_band(samples):
    fig = viz.task_conflict_over_steps(samples, band=(0.25, 0.75))
    low, high, mean = fig.data
    assert mean.name == "left · right"
    grouped = samples[samples["task"] == "left"].groupby("step")["conflict"]
    np.testing.assert_allclose(mean.x, grouped.mean().index)
    np.testing.assert_allclose(mean.y, grouped.mean(), rtol=1e-6)
    np.testing.assert_allclose(low.y, grouped.quantile(0.25), rtol=1e-6)
    np.testing.assert_allclose(high.y, grouped.quantile(0.75), rtol=1e-6)


def test_conflict_histogram_names_the_share_of_conflicting_samples(samples):
    left = samples[samples["task"] == "left"]
    fig = viz.conflict_histogram(left, color="noisy")
    for (name, _, y), noisy in zip(bars(fig), (False, True)):
        values = left.loc[left["noisy"] == noisy, "conflict"]
        assert name.endswith(f"({(values < 0).mean():.0%} < 0)")
        np.testing.assert_allclose(y, expected_shares(values, np.linspace(-1, 1, 41)))


# --- data map ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["p_label", "sgs_class"])
def test_data_map_is_mean_against_variability_over_epochs(samples, value):
    fig = viz.data_map(samples, value)
    stats = samples.groupby(["task", "sample_id"])[value].agg(mean="mean", std=lambda v: v.std(ddof=0))
    noisy = samples.groupby(["task", "sample_id"])["noisy"].first()
    traces = iter(fig.data)
    for task in ("left", "right"):
        for flag in (False, True):
            trace = next(traces)
            assert trace.type == "scatter" and trace.name == viz.NOISE_LABELS[flag]
            ids = noisy[task][noisy[task] == flag].index
            assert sorted(trace.customdata) == sorted(ids)
            expected = stats.loc[task].loc[list(trace.customdata)]
            np.testing.assert_allclose(trace.x, expected["std"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(trace.y, expected["mean"], rtol=1e-5)


def test_data_map_past_max_points_uses_webgl_and_a_deterministic_subsample():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "task": "t", "sample_id": np.repeat(np.arange(3000), 2), "epoch": np.tile([0, 1], 3000),
        "p_label": rng.uniform(size=6000), "noisy": np.repeat(rng.uniform(size=3000) < 0.3, 2),
    })  # fmt: skip
    small = viz.data_map(frame, max_points=5000)
    assert {t.type for t in small.data} == {"scatter"} and sum(len(t.x) for t in small.data) == 3000
    big = viz.data_map(frame, max_points=1000)
    assert {t.type for t in big.data} == {"scattergl"}
    assert sum(len(t.x) for t in big.data) == 1000
    assert [list(t.customdata) for t in viz.data_map(frame, max_points=1000).data] == [
        list(t.customdata) for t in big.data
    ]
    assert [list(t.customdata) for t in viz.data_map(frame, max_points=1000, seed=1).data] != [
        list(t.customdata) for t in big.data
    ]
    full = viz.data_map_table(frame).set_index("sample_id")
    trace = big.data[0]
    np.testing.assert_allclose(trace.y, full.loc[list(trace.customdata), "mean"])  # kept points are unchanged


# --- noisy-label detection ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(samples):
    table = samples[samples["task"] == "left"].groupby("sample_id")["loss"].mean().rename("score").reset_index()
    return viz.with_noise_truth(table, samples, task="left")


def test_roc_and_pr_curves_match_scikit_learn(scores):
    truth, score = scores["noisy"].to_numpy(), scores["score"].to_numpy()
    roc = viz.noise_roc(scores)
    fpr, tpr, _ = roc_curve(truth, score)
    np.testing.assert_allclose(roc.data[0].x, fpr)
    np.testing.assert_allclose(roc.data[0].y, tpr)
    assert roc.data[0].name == f"score (AUROC {roc_auc_score(truth, score):.3f})"
    pr = viz.noise_pr(scores)
    precision, recall, _ = precision_recall_curve(truth, score)
    np.testing.assert_allclose(pr.data[0].x, recall)
    np.testing.assert_allclose(pr.data[0].y, precision)
    assert pr.data[0].name == f"score (AP {average_precision_score(truth, score):.3f})"
    from_arrays = viz.noise_pr(score=score, truth=truth)
    np.testing.assert_allclose(from_arrays.data[0].y, precision)


def test_detection_curves_per_group_and_threshold_marker(scores):
    both = pd.concat([scores.assign(method="loss"), scores.assign(method="negated", score=-scores["score"])])
    fig = viz.noise_roc(both, color="method", threshold=2.3)
    assert [t.name.split(" (")[0] for t in fig.data[:2]] == ["loss", "negated"]
    flagged = scores["score"] >= 2.3
    marker = fig.data[-1]
    np.testing.assert_allclose(marker.x, [(flagged & ~scores["noisy"]).sum() / (~scores["noisy"]).sum()])
    np.testing.assert_allclose(marker.y, [(flagged & scores["noisy"]).sum() / scores["noisy"].sum()])
    auc_loss = roc_auc_score(scores["noisy"], scores["score"])
    assert f"{1 - auc_loss:.3f}" in fig.data[1].name  # negating a score mirrors its ROC


def test_detection_curves_refuse_a_single_class(scores):
    with pytest.raises(ValueError, match="both noisy and clean"):
        viz.noise_roc(scores.assign(noisy=False))
    with pytest.raises(TypeError, match="arrays"):
        viz.noise_pr(score="score")


def test_flag_outcome_counts():
    outcome = viz.flag_outcome([0.9, 0.8, 0.1, 0.7], [True, False, False, True], 0.75)
    assert outcome == {"flagged": 2, "true_positives": 1, "noisy": 2, "precision": 0.5, "recall": 0.5,
                       "false_positive_rate": 0.5}  # fmt: skip
    assert np.isnan(viz.flag_outcome([0.1, 0.2], [True, False], 1.0)["precision"])


def test_with_noise_truth_per_task_and_over_tasks(samples):
    table = pd.DataFrame({"sample_id": [0, 1, 2, 3], "score": [4.0, 3.0, 2.0, 1.0]})
    per = samples.groupby(["sample_id", "task"])["noisy"].first().unstack()
    left = viz.with_noise_truth(table, samples, task="left")
    assert list(left["noisy"]) == list(per.loc[[0, 1, 2, 3], "left"])
    anywhere = viz.with_noise_truth(table, samples)
    assert list(anywhere["noisy"]) == list(per.loc[[0, 1, 2, 3]].any(axis=1))
    with pytest.raises(ValueError, match="no records"):
        viz.with_noise_truth(pd.DataFrame({"sample_id": [10**6], "score": [1.0]}), samples)
    mixed = int(per.index[per["left"] != per["right"]][0])  # one label wrong, the other right
    per_task = pd.DataFrame({"sample_id": [mixed, mixed], "task": ["left", "right"], "score": [3.0, 2.0]})
    joined = viz.with_noise_truth(per_task, samples.astype({"task": "category"}))  # rows matched to their task
    assert list(joined["noisy"]) == [per.loc[mixed, "left"], per.loc[mixed, "right"]]


# --- training dynamics -------------------------------------------------------------------------------------------


def test_dynamics_table_and_overlaid_runs():
    _, runs = trained()
    histories = {name: run.meta["history"] for name, run in runs.items()}
    table = viz.dynamics_table(histories, {name: run.steps() for name, run in runs.items()})
    weights = table[(table["run"] == "sgs") & (table["metric"] == "task weight") & (table["task"] == "right")]
    expected = runs["sgs"].steps().query("task == 'right'").groupby("epoch")["task_weight"].mean()
    np.testing.assert_allclose(weights["value"], expected)
    accuracy = table[(table["run"] == "ew") & (table["metric"] == "test accuracy") & (table["task"] == "left")]
    assert list(accuracy["value"]) == [h["test/left/accuracy"] for h in histories["ew"]]

    fig = viz.training_dynamics(table)
    metrics = ["train loss", "test loss", "test accuracy", "task weight", "consistency"]
    assert sorted(a.text for a in fig.layout.annotations) == sorted(metrics)
    colours = {t.name.split(" · ")[0]: set() for t in fig.data}
    for trace in fig.data:
        colours[trace.name.split(" · ")[0]].add(trace.line.color)
    assert set(colours) == {"ew", "sgs"} and all(len(c) == 1 for c in colours.values())  # one colour per run
    assert len(fig.data) == 2 * (1 + 2 * 4)  # per run: train loss, then 2 tasks in 4 per-task panels
    only = viz.training_dynamics(table, metrics=["consistency"])
    assert len(only.data) == 4


# --- gallery -----------------------------------------------------------------------------------------------------


def test_gallery_shows_each_sample_image_with_given_and_true_labels(samples, train_set):
    last = samples[samples["epoch"] == 2]
    wrong = last[last["noisy"] & (last["task"] == "left")].head(2)
    clean = last[~last["noisy"] & (last["task"] == "left")].head(1)
    shown = pd.concat([wrong, clean])
    fig = viz.sample_gallery(shown, train_set, columns=2)
    assert len(fig.data) == 3
    row_of = {int(i): k for k, i in enumerate(train_set.sample_id)}
    for trace, sample_id in zip(fig.data, shown["sample_id"]):
        np.testing.assert_allclose(trace.z, train_set.x[row_of[int(sample_id)], 0].numpy())
    titles = [a.text for a in fig.layout.annotations]
    first = wrong.iloc[0]
    assert titles[0] == f"#{first.sample_id} · {int(first.label)} (true {int(first.clean_label)})"
    assert titles[2] == f"#{clean.iloc[0].sample_id} · {int(clean.iloc[0].label)}"
    assert [a.font.color for a in fig.layout.annotations] == ["#e45756", "#e45756", "black"]


def test_gallery_joins_tasks_per_sample_and_accepts_arrays():
    frame = pd.DataFrame({"sample_id": [7, 7, 3], "task": ["left", "right", "left"], "label": [1, 2, 5],
                          "clean_label": [1, 4, 5]})  # fmt: skip
    images = np.arange(4 * 2 * 2, dtype=float).reshape(4, 1, 2, 2)
    fig = viz.sample_gallery(frame, images, image_ids=[3, 5, 7, 9])
    assert [a.text for a in fig.layout.annotations] == ["#7 · left 1, right 2 (true 4)", "#3 · left 5"]
    np.testing.assert_allclose(fig.data[0].z, images[2, 0])
    colour = viz.sample_gallery(frame.head(1), {7: np.ones((3, 2, 2)) * 0.5})
    assert colour.data[0].type == "image" and colour.data[0].z.shape == (2, 2, 3)
    assert len(viz.sample_gallery(frame, images, image_ids=[3, 5, 7, 9], max_images=1).data) == 1
    unlabelled = pd.DataFrame({"sample_id": [3], "label": [np.nan], "clean_label": [5.0]})
    (title,) = viz.sample_gallery(unlabelled, images, image_ids=[3, 5, 7, 9]).layout.annotations
    assert (title.text, title.font.color) == ("#3 · missing (true 5)", "black")  # missing is not wrong


# --- shared keywords and docs ------------------------------------------------------------------------------------

BUILDERS = {
    "sgs_histogram": lambda s, h: viz.sgs_histogram(s, **h),
    "weight_histogram": lambda s, h: viz.weight_histogram(s, **h),
    "weight_trajectories": lambda s, h: viz.weight_trajectories(s, **h),
    "task_conflict_heatmap": lambda s, h: viz.task_conflict_heatmap(s, **h),
    "task_conflict_over_steps": lambda s, h: viz.task_conflict_over_steps(s, **h),
    "conflict_histogram": lambda s, h: viz.conflict_histogram(s, **h),
    "data_map": lambda s, h: viz.data_map(s, **h),
    "noise_roc": lambda s, h: viz.noise_roc(score=s["loss"], truth=s["noisy"], **h),
    "noise_pr": lambda s, h: viz.noise_pr(score=s["loss"], truth=s["noisy"], **h),
    "sample_history": lambda s, h: viz.sample_history(s[s["sample_id"] == 0], **h),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_builder_takes_the_layout_keywords(samples, name):
    fig = BUILDERS[name](samples, {"title": "T", "template": "simple_white", "width": 321, "height": 234})
    assert isinstance(fig, go.Figure)
    assert (fig.layout.title.text, fig.layout.width, fig.layout.height) == ("T", 321, 234)
    assert fig.layout.template == go.Figure(layout={"template": "simple_white"}).layout.template


def test_public_builders_have_filled_numpy_docstrings():
    for name in viz.__all__:
        obj = getattr(viz, name)
        if not callable(obj):
            continue
        doc = inspect.getdoc(obj)
        assert not set(re.findall(r"\{(\w+)\}", doc)) & set(PARAMETERS), name  # every placeholder filled
        if "data_frame" in inspect.signature(obj).parameters:
            assert "Parameters\n----------" in doc and "Returns\n-------" in doc, name


# --- half-precision runs -----------------------------------------------------------------------------------------

STATISTICS = ["p_label", "margin", "loss", "sgs", "sgs_batch", "sgs_class", "grad_norm", "weight", "conflict"]


@pytest.fixture(scope="module")
def half_samples(samples):
    """The records as a run stored with ``float16=True`` gives them back, and the same values in float64."""
    half = samples.astype(dict.fromkeys(STATISTICS, np.float16))
    return half, half.astype(dict.fromkeys(STATISTICS, np.float64))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_builder_reads_float16_records_as_their_float64_values(half_samples, name):
    half, wide = half_samples
    assert BUILDERS[name](half, {}).to_json() == BUILDERS[name](wide, {}).to_json()


def test_conflict_over_steps_band_and_tables_of_a_float16_run(half_samples, steps):
    half, wide = half_samples
    low, high, mean = viz.task_conflict_over_steps(half).data  # no float16 kernel for a grouped quantile
    grouped = wide[wide["task"] == "left"].groupby("step")["conflict"]
    np.testing.assert_allclose(low.y, grouped.quantile(0.1))
    np.testing.assert_allclose(high.y, grouped.quantile(0.9))
    np.testing.assert_allclose(mean.y, grouped.mean())  # summed in float64, not in half precision
    pd.testing.assert_frame_equal(viz.task_conflict_table(half, by="step"), viz.task_conflict_table(wide, by="step"))
    pd.testing.assert_frame_equal(viz.data_map_table(half, "p_label"), viz.data_map_table(wide, "p_label"))
    one = half[half["sample_id"] == 3]
    assert viz.sample_history(one, "loss").to_json() == viz.sample_history(wide.loc[one.index], "loss").to_json()
    metrics = ["task_weight", "consistency"]
    history = {"sgs": trained()[1]["sgs"].meta["history"]}
    pd.testing.assert_frame_equal(
        viz.dynamics_table(history, {"sgs": steps.astype(dict.fromkeys(metrics, np.float16))}),
        viz.dynamics_table(history, {"sgs": steps.astype(dict.fromkeys(metrics, np.float16)).astype(
            dict.fromkeys(metrics, np.float64))}),
    )  # fmt: skip
