"""sgs_lab.lab and sgs_lab.viz.toy: the notebooks' helpers, each checked against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgs_lab import lab
from sgs_lab.data import TaskSet, TaskSpec, ToyProblem
from sgs_lab.models import MultiTaskNet
from sgs_lab.train import evaluate
from sgs_lab.viz import toy


# ---------------------------------------------------------------------------------------------------------------------
# sizes and the cache
@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_fast_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("SGS_LAB_FAST", raising=False)
    else:
        monkeypatch.setenv("SGS_LAB_FAST", value)
    assert lab.fast() is expected
    assert lab.sizes() == lab.sizes(fast=expected)


def test_sizes_fast_is_tiny_and_full_is_the_benchmark():
    small, full = lab.sizes(fast=True), lab.sizes(fast=False)
    assert small["n_train"] < 1000 and small["epochs"] <= 3
    assert full == {"n_train": 6000, "n_test": 2000, "epochs": 30, "batch_size": 128}  # benchmarks/robust.py
    small["epochs"] = 99
    assert lab.sizes(fast=True)["epochs"] != 99  # a copy each time


def test_runs_root_prefers_argument_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SGS_LAB_RUNS", raising=False)
    assert lab.runs_root() == tmp_path / "home" / ".cache" / "sgs_lab" / "runs"
    assert lab.runs_root().is_dir()
    monkeypatch.setenv("SGS_LAB_RUNS", str(tmp_path / "env"))
    assert lab.runs_root() == tmp_path / "env"
    assert lab.runs_root(tmp_path / "given") == tmp_path / "given"


def test_notebook_data_sizes_and_noise(monkeypatch):
    monkeypatch.setenv("SGS_LAB_FAST", "1")
    size = lab.sizes()
    train, test = lab.notebook_data(0.4)
    assert (len(train), len(test)) == (size["n_train"], size["n_test"])
    for task in ("left", "right"):
        assert float(train.noisy[task].float().mean()) == pytest.approx(0.4, abs=0.01)
        assert torch.equal(train.labels[task] != train.clean[task], train.noisy[task])
        assert not test.noisy[task].any()
    clean, _ = lab.notebook_data(0.0)
    assert torch.equal(clean.x, train.x) and not clean.noisy["left"].any()
    attributes, attributes_test = lab.notebook_data(0.2, dataset="attributes")
    assert list(attributes.tasks) == ["digit", "parity", "large", "loop", "ink"]
    assert len(attributes) == size["n_train"] and len(attributes_test) == size["n_test"]
    assert float(attributes.noisy["digit"].float().mean()) == pytest.approx(0.2, abs=0.01)
    assert not attributes.noisy["ink"].any()  # regression: no label noise
    with pytest.raises(ValueError, match="unknown dataset"):
        lab.notebook_data(dataset="mnist")


@pytest.mark.parametrize(("epochs", "warmup"), [(3, 1), (12, 2), (30, 5), (60, 5)])
def test_notebook_config_shortens_the_sgs_warm_up(epochs, warmup):
    assert lab.notebook_config("sgs", epochs=epochs).knobs == {"warmup": warmup}
    assert lab.notebook_config("sgs", epochs=epochs, warmup=0).knobs == {"warmup": 0}
    assert lab.notebook_config("ew", epochs=epochs).knobs == {}


@pytest.fixture(scope="module")
def fast_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SGS_LAB_FAST", "1")
        root = tmp_path_factory.mktemp("runs")
        patch.setenv("SGS_LAB_RUNS", str(root))
        yield root


@pytest.fixture(scope="module")
def sgs_run(fast_root):
    return lab.notebook_run("sgs", 0.4)


def test_notebook_run_trains_into_the_root_then_reads_it(fast_root, sgs_run):
    size = lab.sizes()
    assert sgs_run.status == "finished" and sgs_run.path.parent == fast_root
    assert sgs_run.meta["knobs"] == {"warmup": 1} and sgs_run.meta["dataset"] == "multidigits"
    assert len(sgs_run.samples()) == size["epochs"] * 2 * size["n_train"]
    created = json.loads((sgs_run.path / "manifest.json").read_text())["created"]
    again = lab.notebook_run("sgs", 0.4)
    assert again.path == sgs_run.path
    assert json.loads((again.path / "manifest.json").read_text())["created"] == created  # not trained again
    assert lab.notebook_run("sgs", 0.2).path != sgs_run.path


def test_sweep_reads_every_run(fast_root, sgs_run):
    results = lab.sweep(["ew", "sgs"], noises=(0.4,))
    assert list(results["method"]) == ["ew", "sgs"] and set(results["status"]) == {"finished"}
    assert results.loc[1, "path"] == str(sgs_run.path)
    accuracy = sgs_run.meta["test_accuracy"]
    assert results.loc[1, "mean_accuracy"] == pytest.approx(np.mean(list(accuracy.values())))
    assert results.loc[1, "left/accuracy"] == pytest.approx(accuracy["left"])
    variants = lab.sweep({"sgs:relu": {"sample_rule": "relu"}}, noises=(0.4,))
    assert variants.loc[0, "method"] == "sgs:relu" and variants.loc[0, "path"] != str(sgs_run.path)


def test_load_model_gives_the_trained_weights(fast_root, sgs_run):
    train, test = lab.notebook_data(0.4)
    model = lab.load_model(sgs_run, train)
    metrics = evaluate(model, test, torch.device("cpu"))
    for task, accuracy in sgs_run.meta["test_accuracy"].items():
        assert metrics[f"{task}/accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_per_epoch_table_matches_the_records(fast_root, sgs_run):
    table = lab.per_epoch_table({"sgs": sgs_run}, columns=("loss", "weight"))
    assert list(table.columns) == ["run", "epoch", "metric", "labels", "value"]
    samples = sgs_run.samples()
    expected = samples.groupby(["epoch", "noisy"])["loss"].mean()
    got = table[table["metric"] == "loss"].set_index(["epoch", "labels"])["value"]
    for (epoch, noisy), value in expected.items():
        assert got[(epoch, "wrong label" if noisy else "clean label")] == pytest.approx(value, rel=1e-5)
    assert set(table["metric"]) == {"loss", "weight"} and set(table["run"]) == {"sgs"}


# ---------------------------------------------------------------------------------------------------------------------
# task × task matrix
def _tiny_model_and_data(seed: int = 0) -> tuple[MultiTaskNet, TaskSet]:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
    heads = {"a": nn.Linear(6, 3), "b": nn.Linear(6, 2), "r": nn.Linear(6, 1)}
    n = 11
    labels = {"a": torch.randint(0, 3, (n,)), "b": torch.randint(0, 2, (n,)), "r": torch.randn(n)}
    tasks = {"a": TaskSpec("classification", 3), "b": TaskSpec("classification", 2), "r": TaskSpec("regression")}
    return MultiTaskNet(encoder, heads), TaskSet(torch.randn(n, 5), labels, tasks, torch.arange(n))


def _per_sample_gradients(model: MultiTaskNet, data: TaskSet) -> dict[str, torch.Tensor]:
    """{task: (N, P)} by one autograd call per sample and task: the oracle."""
    params = list(model.encoder.parameters())
    out = {}
    for task, spec in data.tasks.items():
        rows = []
        for i in range(len(data)):
            prediction = model.heads[task](model.encoder(data.x[i : i + 1]))
            if spec.kind == "classification":
                loss = F.cross_entropy(prediction, data.labels[task][i : i + 1])
            else:
                loss = (prediction.squeeze(1) - data.labels[task][i : i + 1]).pow(2).sum()
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        out[task] = torch.stack(rows).double()
    return out


def test_task_conflict_matrix_against_per_sample_autograd():
    model, data = _tiny_model_and_data()
    grads = _per_sample_gradients(model, data)
    tasks = list(grads)
    sample = lab.task_conflict_matrix(model, data, batch_size=4)  # three batches
    mean = lab.task_conflict_matrix(model, data, batch_size=4, kind="mean")
    assert list(sample.index) == tasks and list(sample.columns) == tasks
    for s in tasks:
        for t in tasks:
            expected = 1.0 if s == t else float(F.cosine_similarity(grads[s], grads[t], dim=1).mean())
            assert sample.loc[s, t] == pytest.approx(expected, abs=1e-5)
            summed = F.cosine_similarity(grads[s].sum(0), grads[t].sum(0), dim=0)
            assert mean.loc[s, t] == pytest.approx(1.0 if s == t else float(summed), abs=1e-5)
    with pytest.raises(ValueError, match="kind"):
        lab.task_conflict_matrix(model, data, kind="median")


def test_matrix_figure_shows_the_matrix():
    matrix = pd.DataFrame([[1.0, -0.25], [-0.25, 1.0]], index=["a", "b"], columns=["a", "b"])
    heatmap = lab.matrix_figure(matrix).data[0]
    assert np.array_equal(np.asarray(heatmap.z), matrix.to_numpy())
    assert list(heatmap.x) == ["a", "b"] and list(heatmap.y) == ["a", "b"] and heatmap.zmid == 0


# ---------------------------------------------------------------------------------------------------------------------
# the toy problem
def _gradients(problem: ToyProblem, theta) -> tuple[np.ndarray, np.ndarray]:
    """∇f1, ∇f2 from the problem's own closed form (float64)."""
    g = problem.gradients(torch.tensor([theta], dtype=torch.float64))[:, 0].numpy()
    return g[0], g[1]


def _min_norm(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """The minimum-norm point of the segment [g1, g2] (MGDA's direction for two tasks), in closed form."""
    alpha = np.clip(np.dot(g2 - g1, g2) / np.dot(g1 - g2, g1 - g2), 0.0, 1.0)
    return alpha * g1 + (1 - alpha) * g2


@pytest.mark.parametrize(("angle", "theta"), [(120, (0.3, 0.6)), (150, (0.0, 0.3)), (100, (-0.4, 0.2))])
def test_toy_directions_follow_each_method_s_definition(angle, theta):
    problem = ToyProblem(angle=angle, anisotropy=2.0)
    g1, g2 = _gradients(problem, theta)
    assert np.dot(g1, g2) < 0  # these points are in conflict
    moves = lab.toy_directions(problem, theta)
    np.testing.assert_allclose(moves["f1"], -g1, atol=1e-12)
    np.testing.assert_allclose(moves["f2"], -g2, atol=1e-12)
    np.testing.assert_allclose(moves["ew"], -(g1 + g2), atol=1e-10)
    # PCGrad: each gradient loses its component along the other (they conflict), then the two are summed
    p1 = g1 - np.dot(g1, g2) / np.dot(g2, g2) * g2
    p2 = g2 - np.dot(g2, g1) / np.dot(g1, g1) * g1
    assert abs(np.dot(p1, g2)) < 1e-12 and abs(np.dot(p2, g1)) < 1e-12
    np.testing.assert_allclose(moves["pcgrad"], -(p1 + p2), atol=1e-8)
    # MGDA: the min-norm convex combination, scaled by T = 2 (sgs_lab's convention: no conflict → EW)
    np.testing.assert_allclose(moves["mgda"], -2 * _min_norm(g1, g2), atol=1e-4)
    # SGS sees one gradient per task and sample, all equal: every sample weight and task weight is 1 → EW
    np.testing.assert_allclose(moves["sgs"], moves["ew"], atol=1e-10)


def test_toy_pcgrad_is_ew_without_conflict():
    problem = ToyProblem(angle=40)
    theta = (0.0, 0.0)
    g1, g2 = _gradients(problem, theta)
    assert np.dot(g1, g2) > 0
    moves = lab.toy_directions(problem, theta, methods=("ew", "pcgrad", "mgda"))
    np.testing.assert_allclose(moves["pcgrad"], moves["ew"], atol=1e-10)
    np.testing.assert_allclose(moves["mgda"], -2 * _min_norm(g1, g2), atol=1e-4)


def test_toy_samples_shapes_noise_and_centres():
    problem = ToyProblem(angle=90)
    exact = lab.toy_samples(problem, 5, spread=0.0)
    assert exact.centres.shape == (2, 5, 2) and exact.n == 5 and not exact.noisy.any()
    np.testing.assert_allclose(exact.centres, problem.centres().double()[:, None, :].expand(2, 5, 2))
    noisy = lab.toy_samples(problem, 12, noise=0.25, spread=0.1, seed=3)
    assert noisy.noisy.sum(1).tolist() == [3, 3]
    towards = torch.einsum("knd,kd->kn", noisy.centres, problem.centres().double())
    assert bool((towards[noisy.noisy] < 0).all()) and bool((towards[~noisy.noisy] > 0).all())
    again = lab.toy_samples(problem, 12, noise=0.25, spread=0.1, seed=3)
    assert torch.equal(again.centres, noisy.centres)
    with pytest.raises(ValueError):
        lab.toy_samples(problem, 0)


def test_toy_directions_with_samples_average_the_sample_gradients():
    problem = ToyProblem(angle=120, anisotropy=1.5)
    samples = lab.toy_samples(problem, 6, noise=0.5, spread=0.2, seed=1)
    theta = np.array([0.2, -0.1])
    gram = (problem.scales().double().transpose(1, 2) @ problem.scales().double()).numpy()
    per_sample = np.einsum("kij,knj->kni", gram, theta[None, None] - samples.centres.numpy())
    moves = lab.toy_directions(problem, theta, methods=("ew",), samples=samples)
    np.testing.assert_allclose(moves["f1"], -per_sample[0].mean(0), atol=1e-12)
    np.testing.assert_allclose(moves["ew"], -per_sample.mean(1).sum(0), atol=1e-10)


def test_toy_weights_are_sgs_of_the_sample_gradients():
    problem = ToyProblem(angle=120)
    samples = lab.toy_samples(problem, 12, noise=0.25, spread=0.15)
    theta = np.array([0.0, 0.3])
    weights = lab.toy_weights(problem, theta, samples=samples)
    assert len(weights) == 24 and list(weights["task"].unique()) == ["f1", "f2"]
    # cosine of each sample's gradient θ − c_i with its task's mean gradient (isotropic bowls: A = I)
    grads = theta[None, None] - samples.centres.numpy()
    mean = grads.mean(1, keepdims=True)
    cosine = (grads * mean).sum(-1) / (np.linalg.norm(grads, axis=-1) * np.linalg.norm(mean, axis=-1))
    np.testing.assert_allclose(weights["cosine"], cosine.reshape(-1), atol=1e-10)
    # the default rule: w ∝ max(0, 1 + s), mean 1 per task; λ = 2·softmax(mean cosine / 0.5)
    raw = np.maximum(0, 1 + cosine)
    np.testing.assert_allclose(weights["weight"], (raw / raw.mean(1, keepdims=True)).reshape(-1), atol=1e-10)
    consistency = cosine.mean(1) / 0.5
    lam = 2 * np.exp(consistency) / np.exp(consistency).sum()
    np.testing.assert_allclose(weights["task_weight"], np.repeat(lam, 12), atol=1e-10)
    wrong, clean = weights[weights["noisy"]], weights[~weights["noisy"]]
    assert wrong["weight"].max() < clean["weight"].min()


def test_toy_paths_descend_to_the_pareto_set():
    problem = ToyProblem(angle=120)
    start = (-1.0, 1.2)
    paths = lab.toy_paths(problem, start, steps=150, lr=0.1)
    assert list(paths["method"].unique()) == list(lab.TOY_METHODS)
    assert (paths.groupby("method")["step"].max() == 150).all()
    first = paths[paths["step"] == 0]
    assert np.allclose(first[["x", "y"]].to_numpy(), start)
    f = problem.losses(torch.tensor([start]))[:, 0].numpy()
    assert np.allclose(first[["f1", "f2"]].to_numpy(), f, atol=1e-6)
    last = paths[paths["step"] == 150].set_index("method")
    # isotropic bowls: the Pareto set is the segment between the minima (x = cos 60°, |y| ≤ sin 60°)
    assert np.allclose(last["x"], 0.5, atol=1e-3) and (last["y"].abs() <= math.sin(math.radians(60)) + 1e-3).all()
    assert last.loc["ew", "y"] == pytest.approx(0.0, abs=1e-3)  # EW: the minimiser of f1 + f2
    ew = paths[paths["method"] == "ew"]
    assert (np.diff((ew["f1"] + ew["f2"]).to_numpy()) <= 1e-12).all()  # gradient descent on f1 + f2


def test_toy_sgs_resists_wrong_samples_better_than_ew():
    problem = ToyProblem(angle=120)
    samples = lab.toy_samples(problem, 12, noise=0.25, spread=0.15)
    paths = lab.toy_paths(problem, (-1.0, 1.2), ("ew", "sgs"), steps=80, samples=samples)
    last = paths[paths["step"] == 80].set_index("method")
    clean = last["f1"] + last["f2"]
    assert clean["sgs"] < clean["ew"]


def test_toy_refuses_methods_that_need_new_losses():
    with pytest.raises(ValueError, match="famo"):
        lab.toy_directions(ToyProblem(), (0.0, 0.0), methods=("famo",))


def test_toy_direction_table_signs():
    moves = lab.toy_directions(ToyProblem(angle=120), (0.3, 0.6))
    table = lab.toy_direction_table(moves)
    g1, g2 = -moves["f1"], -moves["f2"]
    for name, row in table.iterrows():
        assert row["df1"] == pytest.approx(float(moves[name] @ g1))
        assert row["df2"] == pytest.approx(float(moves[name] @ g2))
        assert row["decreases both"] == (row["df1"] < 0 and row["df2"] < 0)
    # here EW follows the larger gradient and f1 rises; PCGrad and MGDA lower both objectives
    assert not table.loc["ew", "decreases f1"] and table.loc["ew", "decreases f2"]
    assert table.loc["pcgrad", "decreases both"] and table.loc["mgda", "decreases both"]


def test_toy_arrows_draw_each_direction_from_theta():
    problem = ToyProblem(angle=120)
    theta = (0.3, 0.6)
    moves = lab.toy_directions(problem, theta)
    fig = toy.toy_arrows(problem, theta, moves, extent=2.0)
    arrows = {t.name: t for t in fig.data if t.name in moves}
    assert list(arrows) == list(moves)
    longest = max(np.linalg.norm(v) for v in moves.values())
    for name, trace in arrows.items():
        assert (trace.x[0], trace.y[0]) == theta
        tip = np.array([trace.x[1], trace.y[1]]) - theta
        np.testing.assert_allclose(tip, 0.45 * 2.0 / longest * moves[name], atol=1e-12)
        assert trace.marker.symbol == "arrow"
    scaled = toy.toy_arrows(problem, theta, {"ew": [1.0, 2.0]}, scale=0.5)
    ew = next(t for t in scaled.data if t.name == "ew")
    assert list(ew.x) == [0.3, 0.8] and list(ew.y) == [0.6, 1.6]
    samples = lab.toy_samples(problem, 8, noise=0.25)
    with_samples = toy.toy_arrows(problem, theta, moves, samples=samples)
    dots = next(t for t in with_samples.data if t.name == "samples of f1")
    assert list(dots.marker.symbol).count("x") == 2 and len(dots.x) == 8


def test_pareto_set_is_stationary_for_a_weighted_sum():
    problem = ToyProblem(angle=110, anisotropy=3.0)
    front = toy.pareto_set(problem, points=9)
    centres = problem.centres().numpy()
    np.testing.assert_allclose(front[0], centres[1], atol=1e-6)  # w = 0: the minimum of f2
    np.testing.assert_allclose(front[-1], centres[0], atol=1e-6)
    for point in front[1:-1]:
        g1, g2 = _gradients(problem, tuple(point))
        cosine = np.dot(g1, g2) / (np.linalg.norm(g1) * np.linalg.norm(g2))
        assert cosine == pytest.approx(-1.0, abs=1e-6)  # the gradients point exactly against each other


def test_toy_paths_and_weights_figures():
    problem = ToyProblem(angle=120)
    paths = lab.toy_paths(problem, (-1.0, 1.2), ("ew", "mgda"), steps=5)
    fig = toy.toy_paths_figure(problem, paths)
    for method in ("ew", "mgda"):
        trace = next(t for t in fig.data if t.name == method)
        rows = paths[paths["method"] == method]
        assert np.allclose(trace.x, rows["x"]) and np.allclose(trace.y, rows["y"])
    samples = lab.toy_samples(problem, 8, noise=0.25)
    weights = lab.toy_weights(problem, (0.0, 0.3), samples=samples)
    figure = toy.toy_weights_figure(weights)
    assert [t.name for t in figure.data] == ["f1: clean label", "f1: wrong label", "f2: clean label", "f2: wrong label"]
    wrong = weights[(weights["task"] == "f1") & weights["noisy"]]
    assert np.allclose(figure.data[1].x, wrong["cosine"]) and np.allclose(figure.data[1].y, wrong["weight"])


def test_toy_explorer_redraws_when_a_slider_moves():
    explorer = lab.toy_explorer((0.0, 0.3), angle=120)
    assert "conflicting" in explorer.summary.value
    before = {t.name: (tuple(t.x), tuple(t.y)) for t in explorer.figure.data if t.name in lab.TOY_METHODS}
    explorer.angle_slider.value = 30
    assert "aligned" in explorer.summary.value
    after = {t.name: (tuple(t.x), tuple(t.y)) for t in explorer.figure.data if t.name in lab.TOY_METHODS}
    assert set(after) == set(before) and after["ew"] != before["ew"]
    expected = lab.toy_directions(ToyProblem(angle=30), (0.0, 0.3))["ew"]
    tip = np.array([after["ew"][0][1] - 0.0, after["ew"][1][1] - 0.3])
    assert tip[0] * expected[1] - tip[1] * expected[0] == pytest.approx(0.0, abs=1e-9)  # parallel
    assert tip @ expected > 0  # and the same way
    assert not any(t.name == "samples of f1" for t in explorer.figure.data)
    explorer.noise_slider.value = 0.25
    assert any(t.name == "samples of f1" for t in explorer.figure.data)
    assert "application/vnd.jupyter.widget-view+json" in explorer._repr_mimebundle_()


# ---------------------------------------------------------------------------------------------------------------------
# benchmark tables
@pytest.fixture
def results():
    return pd.DataFrame({
        "method": ["sgs", "ew", "sgs", "ew", "sgs", "ew"], "noise": [0.4, 0.4, 0.4, 0.4, 0.0, 0.0],
        "seed": [0, 0, 1, 1, 0, 0], "mean_accuracy": [0.7, 0.6, 0.8, 0.6, 0.9, 0.95],
    })  # fmt: skip


def test_accuracy_table_and_pivot(results):
    table = lab.accuracy_table(results)
    assert table[["method", "noise"]].values.tolist() == [["sgs", 0.0], ["sgs", 0.4], ["ew", 0.0], ["ew", 0.4]]
    row = table.iloc[1]
    assert row["mean"] == pytest.approx(0.75) and row["std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert row["seeds"] == 2 and table.iloc[0]["std"] == 0.0
    pivot = lab.accuracy_pivot(table)
    assert list(pivot.index) == ["sgs", "ew"] and pivot.loc["sgs", 0.4] == "0.750 ± 0.071"
    assert lab.accuracy_pivot(table, digits=1).loc["ew", 0.0] == "0.9 ± 0.0"  # 0.95 rounds half to even


def test_accuracy_vs_noise_draws_one_line_per_method(results):
    table = lab.accuracy_table(results)
    fig = lab.accuracy_vs_noise(table, highlight=("sgs",))
    assert [t.name for t in fig.data] == ["sgs", "ew"]
    sgs = fig.data[0]
    assert list(sgs.x) == [0.0, 0.4] and np.allclose(sgs.y, [0.9, 0.75])
    assert np.allclose(sgs.error_y.array, [0.0, np.std([0.7, 0.8], ddof=1)])
    assert sgs.line.width > fig.data[1].line.width


def test_benchmark_results(tmp_path):
    assert lab.benchmark_results(tmp_path / "absent.csv") is None
    path = Path(lab.__file__).resolve().parents[1] / "benchmarks" / "robust_results.csv"
    if not path.is_file():
        pytest.skip("no benchmarks/robust_results.csv next to the package (not a source checkout)")
    frame = lab.benchmark_results()
    assert {"method", "noise", "seed", "mean_accuracy", "delta_m"} <= set(frame.columns) and len(frame) > 0


# ---------------------------------------------------------------------------------------------------------------------
# your own model
class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def _custom(seed: int = 0) -> MultiTaskNet:
    torch.manual_seed(seed)
    return MultiTaskNet(TinyEncoder(), {"cls": nn.Linear(12, 3), "reg": nn.Linear(12, 1)})


@pytest.fixture(scope="module")
def custom_data():
    generator = torch.Generator().manual_seed(0)
    n = 60
    x = torch.randn(n, 1, 4, 4, generator=generator)
    cls = (x.flatten(1)[:, :3].argmax(1)).long()
    labels = {"cls": cls, "reg": x.flatten(1).sum(1)}
    tasks = {"cls": TaskSpec("classification", 3), "reg": TaskSpec("regression")}
    data = TaskSet(x, labels, tasks, torch.arange(n))
    train, test = data.subset(torch.arange(40)), data.subset(torch.arange(40, 60))
    return train.with_noise({"cls": 0.25}), test


def test_train_custom_records_caches_and_restores(tmp_path, custom_data, monkeypatch):
    monkeypatch.setenv("SGS_LAB_FAST", "1")
    train, test = custom_data
    model = _custom()
    run = lab.train_custom(model, train, test, method="sgs", epochs=2, batch_size=16, root=tmp_path, name="tiny")
    assert run.status == "finished" and run.path.parent == tmp_path and run.path.name.startswith("tiny-sgs-")
    samples = run.samples()
    assert len(samples) == 2 * 2 * 40 and set(samples["task"].astype(str)) == {"cls", "reg"}
    assert samples.groupby("epoch")["step"].nunique().tolist() == [3, 3]  # ceil(40 / 16) steps per epoch
    assert samples[samples["task"] == "cls"]["noisy"].sum() == 2 * int(train.noisy["cls"].sum())
    assert run.meta["knobs"] == {"warmup": 1} and len(run.history) == 2
    metrics = evaluate(model, test, torch.device("cpu"))
    assert run.meta["test_accuracy"]["cls"] == pytest.approx(metrics["cls/accuracy"])
    assert run.meta["test_metrics"]["reg/loss"] == pytest.approx(metrics["reg/loss"])
    weights = samples[(samples["task"] == "cls") & (samples["epoch"] == 1)].groupby("step")["weight"].mean()
    assert np.allclose(weights, 1.0, atol=1e-5)  # SGS weights have mean 1 per task and step
    # the same model, data and options again: the stored run, and the trained weights loaded
    fresh = _custom()
    again = lab.train_custom(fresh, train, test, method="sgs", epochs=2, batch_size=16, root=tmp_path, name="tiny")
    assert again.path == run.path and again.meta["created"] == run.meta["created"]
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), key
    other = lab.train_custom(_custom(seed=1), train, test, method="ew", epochs=1, batch_size=16, root=tmp_path)
    assert other.path != run.path and other.meta["method"] == "ew"


def test_train_custom_again_with_the_model_it_trained_reopens_the_run(tmp_path, custom_data, monkeypatch):
    monkeypatch.setenv("SGS_LAB_FAST", "1")
    train, test = custom_data
    model = _custom()
    options = {"method": "ew", "epochs": 1, "batch_size": 16, "root": tmp_path, "name": "twice"}
    run = lab.train_custom(model, train, test, **options)
    trained = {key: value.clone() for key, value in model.state_dict().items()}
    again = lab.train_custom(model, train, test, **options)  # the same object, now holding the trained weights
    assert again.path == run.path and again.meta["created"] == run.meta["created"]
    assert [p.name for p in tmp_path.iterdir()] == [run.path.name]  # no second run
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key  # not trained any further
    holder = _custom(seed=5)  # another object given the trained weights is recognised too
    holder.load_state_dict(trained)
    assert lab.train_custom(holder, train, test, **options).path == run.path
    further = lab.train_custom(model, train, test, **{**options, "epochs": 2})  # other options: a run of its own
    assert further.path != run.path and len(further.history) == 2


def test_train_custom_refuses_models_without_encoder_and_heads(tmp_path, custom_data):
    train, test = custom_data
    with pytest.raises(TypeError, match="encoder"):
        lab.train_custom(nn.Linear(16, 3), train, test, root=tmp_path)
    model = MultiTaskNet(TinyEncoder(), {"cls": nn.Linear(12, 3)})
    with pytest.raises(ValueError, match="reg"):
        lab.train_custom(model, train, test, root=tmp_path)
