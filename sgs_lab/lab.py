"""Notebook conveniences: run sizes, cached runs at notebook size, the toy lessons of gradient conflict,
benchmark tables, and training your own model into the run cache.

The notebooks in ``notebooks/`` call these so that every cell stays one or two calls; everything here is
unit-tested (``tests/test_lab.py``).

Sizes. ``SGS_LAB_FAST=1`` (any value but ``""`` and ``"0"``) shrinks every run to a few hundred samples and three
epochs, so the notebooks execute in seconds (continuous integration); otherwise runs have the benchmark's size
(6,000 training images, 30 epochs).

Cache. Runs are stored under :func:`runs_root`: ``$SGS_LAB_RUNS`` when set, else ``~/.cache/sgs_lab/runs``, keyed by
their configuration and data (``sgs_lab.cache.get_or_train``): a notebook opened a second time reads its runs
instead of training them again.

>>> from sgs_lab import lab
>>> lab.sizes(fast=True)
{'n_train': 800, 'n_test': 300, 'epochs': 3, 'batch_size': 64}
>>> from sgs_lab.data import ToyProblem
>>> moves = lab.toy_directions(ToyProblem(angle=120), [0.0, 0.0], methods=("ew", "pcgrad"))
>>> {name: [round(float(v), 3) + 0.0 for v in d] for name, d in moves.items()}
{'f1': [0.5, 0.866], 'f2': [0.5, -0.866], 'ew': [1.0, 0.0], 'pcgrad': [1.5, 0.0]}
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from .cli import fast  # one reading of SGS_LAB_FAST for the command line and the notebooks
from .data import TaskSet, ToyProblem, make_digit_attributes, make_multidigits

RUNS_ENV = "SGS_LAB_RUNS"
DATASETS = ("multidigits", "attributes")
TOY_METHODS = ("ew", "pcgrad", "mgda", "sgs")
TOY_TASKS = ("f1", "f2")
MODEL_FILE = "model.pt"

_FAST_SIZES = {"n_train": 800, "n_test": 300, "epochs": 3, "batch_size": 64}
_FULL_SIZES = {"n_train": 6000, "n_test": 2000, "epochs": 30, "batch_size": 128}


# ---------------------------------------------------------------------------------------------------------------------
# sizes and the cache
_env_fast = fast  # sizes() names its argument `fast`


def sizes(fast: bool | None = None) -> dict:
    """Run sizes for notebooks: n_train, n_test, epochs, batch_size (``fast=None``: from ``SGS_LAB_FAST``).

    Full size is the robustness benchmark's (6,000 / 2,000 MultiDigits images, 30 epochs, batch 128); fast size
    trains in about a second.
    """
    return dict(_FAST_SIZES if (_env_fast() if fast is None else fast) else _FULL_SIZES)


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Where notebook runs are cached: ``root`` when given, else ``$SGS_LAB_RUNS``, else ``~/.cache/sgs_lab/runs``
    (created when missing)."""
    if root is None:
        root = os.environ.get(RUNS_ENV) or Path.home() / ".cache" / "sgs_lab" / "runs"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebook_data(
    noise: float | Mapping[str, float] = 0.0, *, dataset: str = "multidigits", kind: str = "symmetric", seed: int = 0
) -> tuple[TaskSet, TaskSet]:
    """(train, test) at notebook size, with ``noise`` (a rate for every classification task, or {task: rate}) of
    the training labels flipped (``kind``: "symmetric" or "pairflip"); test labels stay clean.

    ``dataset``: "multidigits" (two overlaid digits, tasks left and right) or "attributes" (single digits with the
    tasks digit, parity, large, loop and the regression target ink; noise applies to the classification tasks).
    """
    size = sizes()
    if dataset == "multidigits":
        train, test = make_multidigits(size["n_train"], size["n_test"], seed=seed)
    elif dataset == "attributes":
        train, test = make_digit_attributes(seed=seed)
        train = train.subset(torch.arange(min(len(train), size["n_train"])))
        test = test.subset(torch.arange(min(len(test), size["n_test"])))
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if isinstance(noise, Mapping):
        rates = dict(noise)
    else:
        rates = {t: float(noise) for t, spec in train.tasks.items() if spec.kind == "classification"}
    if any(rates.values()):
        train = train.with_noise(rates, kind=kind, seed=seed)
    return train, test


def notebook_config(method: str = "sgs", *, seed: int = 0, epochs: int | None = None,
                    batch_size: int | None = None, model: str = "mlp", lr: float = 1e-3, **knobs):  # fmt: skip
    """The :class:`~sgs_lab.train.TrainConfig` of a notebook run at notebook size.

    SGS keeps uniform weights for its first ``warmup`` epochs; unless ``warmup`` is given it is
    min(5, max(1, epochs // 6)) — 5 for a 30-epoch run, 1 for a fast one — as ``sgs-lab demo`` does.
    """
    from .train import TrainConfig

    size = sizes()
    epochs = size["epochs"] if epochs is None else epochs
    if method == "sgs" and "warmup" not in knobs:
        knobs["warmup"] = min(5, max(1, epochs // 6))
    return TrainConfig(method=method, knobs=knobs, model=model, epochs=epochs, seed=seed, lr=lr,
                       batch_size=size["batch_size"] if batch_size is None else batch_size)  # fmt: skip


def notebook_run(
    method: str = "sgs",
    noise: float | Mapping[str, float] = 0.4,
    *,
    dataset: str = "multidigits",
    kind: str = "symmetric",
    seed: int = 0,
    root: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    model: str = "mlp",
    lr: float = 1e-3,
    progress: bool | None = None,
    **knobs,
):
    """One run of ``method`` (with its ``knobs``) on :func:`notebook_data`, from the cache under
    :func:`runs_root` — trained and stored there first when absent (``progress``: show a bar; default: unless
    fast). Returns the :class:`sgs_lab.cache.Run`."""
    from .cache import get_or_train

    train, test = notebook_data(noise, dataset=dataset, kind=kind, seed=seed)
    config = notebook_config(method, seed=seed, epochs=epochs, batch_size=batch_size, model=model, lr=lr, **knobs)
    meta = {"dataset": dataset, "noise_kind": kind, "noise_rate": noise if not isinstance(noise, Mapping) else
            dict(noise), "fast": fast()}  # fmt: skip
    progress = not fast() if progress is None else progress
    return get_or_train(config, runs_root(root), train, test, meta=meta, progress=progress)


def sweep(
    methods: Sequence[str] | Mapping[str, dict],
    noises: Iterable[float] = (0.0, 0.4),
    seeds: Iterable[int] = (0,),
    *,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Test accuracy of every method × noise × seed, each run from the cache (trained when absent).

    ``methods``: names, or {label: knobs} where a label is a method name or "name:variant" (the part before the
    colon is the method). Returns one row per run: method (the label), noise, seed, ``<task>/accuracy`` per task,
    mean_accuracy, status and path.
    """
    labelled = {m: {} for m in methods} if not isinstance(methods, Mapping) else dict(methods)
    rows = []
    for noise in noises:
        for seed in seeds:
            for label, knobs in labelled.items():
                run = notebook_run(label.split(":")[0], noise, seed=seed, root=root, progress=progress, **knobs)
                accuracy = run.meta.get("test_accuracy") or {}
                rows.append({"method": label, "noise": float(noise), "seed": int(seed),
                             **{f"{t}/accuracy": float(v) for t, v in accuracy.items()},
                             "mean_accuracy": float(np.mean(list(accuracy.values()))) if accuracy else float("nan"),
                             "status": run.status, "path": str(run.path)})  # fmt: skip
    return pd.DataFrame(rows)


def load_model(run, like: TaskSet):
    """The model of a finished cache run, with its final weights (from the run's checkpoint), built for data
    shaped like ``like`` (the run's training set)."""
    from .models import build_model
    from .train import CHECKPOINT, TrainConfig

    state = torch.load(Path(run.path) / CHECKPOINT, map_location="cpu", weights_only=False)  # written by sgs_lab
    config = TrainConfig(**state["config"])
    model = build_model(config.model, tuple(like.x.shape[1:]), like.tasks)
    model.load_state_dict(state["model"])
    return model


def task_conflict_matrix(model, data: TaskSet, *, batch_size: int = 256, kind: str = "sample") -> pd.DataFrame:
    """Task × task gradient cosines of ``model`` (a shared ``encoder`` and ``heads``) on ``data``'s given labels,
    over every encoder parameter.

    ``kind="sample"``: the mean over samples of the per-sample cosine between a sample's gradients for two tasks
    (``stats.conflict``); ``kind="mean"``: the cosine between the tasks' mean gradients over all of ``data``
    (summed batch by batch). The diagonal is 1. Returns a DataFrame indexed and columned
    by task.
    """
    from .grads import SampleGradients
    from .train import task_losses

    if kind not in ("sample", "mean"):
        raise ValueError(f"kind must be 'sample' or 'mean'; got {kind!r}")
    tasks = list(data.tasks)
    probe = SampleGradients(model.encoder)
    device = next(model.parameters()).device
    total, count, summed = None, None, None
    for lo in range(0, len(data), batch_size):
        batch = data.subset(torch.arange(lo, min(lo + batch_size, len(data)))).to(device)
        with probe.capture():
            z = model.encoder(batch.x)
        outputs = {t: model.heads[t](z) for t in tasks}
        stats = probe.compute(task_losses(outputs, batch), masks=batch.present)
        if kind == "sample":
            pairs = stats.conflict.double().cpu()  # (B, T, T), NaN where a task does not label the sample
            part, seen = pairs.nan_to_num(0.0).sum(0), (~pairs.isnan()).sum(0)
            total, count = (part, seen) if total is None else (total + part, count + seen)
        else:  # the tasks' summed gradients over all batches: mean gradient rows times labelled counts
            part = stats.jacobian().double().cpu() * stats.mask.sum(1).double().cpu()[:, None]
            summed = part if summed is None else summed + part
    if kind == "sample":
        matrix = total / count.clamp(min=1)
    else:
        gram = summed @ summed.T
        norms = gram.diagonal().clamp(min=0).sqrt()
        matrix = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    matrix.fill_diagonal_(1.0)
    return pd.DataFrame(matrix.numpy(), index=pd.Index(tasks, name="task"), columns=pd.Index(tasks, name="other"))


def matrix_figure(matrix: pd.DataFrame, *, title: str | None = "Task × task gradient cosine",
                  width: int | None = 520, height: int | None = 460) -> go.Figure:  # fmt: skip
    """A heatmap of a task × task cosine matrix (red: conflicting, blue: aligned), values printed in the cells."""
    heatmap = go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index],
        zmin=-1, zmax=1, zmid=0, colorscale="RdBu", texttemplate="%{z:.2f}", colorbar_title="cosine",
        hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heatmap)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", width=width, height=height)
    return fig


def per_epoch_table(runs: Mapping[str, object], columns: Sequence[str] = ("loss", "p_label", "sgs", "weight")
                    ) -> pd.DataFrame:  # fmt: skip
    """Per-epoch means of record ``columns`` for clean and for wrong labels, several runs in one long table
    (columns run, epoch, metric, labels — "clean label" / "wrong label" — and value), for
    ``sgs_lab.viz.training_dynamics(table, line_dash="labels")``. Each run's mean is over all its tasks."""
    from .viz import NOISE_LABELS

    parts = []
    for name, run in runs.items():
        means = run.per_epoch(list(columns), by=["noisy"])
        long = means.melt(id_vars=["epoch", "noisy"], value_vars=list(columns), var_name="metric", value_name="value")
        long["labels"] = long.pop("noisy").map(lambda v: NOISE_LABELS[bool(v)])
        long.insert(0, "run", str(name))
        parts.append(long)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return frame.reindex(columns=["run", "epoch", "metric", "labels", "value"])


# ---------------------------------------------------------------------------------------------------------------------
# benchmark tables
def benchmark_results(path: str | os.PathLike | None = None) -> pd.DataFrame | None:
    """The committed robustness benchmark (``benchmarks/robust_results.csv`` of a source checkout) as a
    DataFrame, or None when there is no such file (an installed package without the repository)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "benchmarks" / "robust_results.csv"
    return pd.read_csv(path) if path.is_file() else None


def accuracy_table(frame: pd.DataFrame, value: str = "mean_accuracy") -> pd.DataFrame:
    """Per method and noise rate: mean and std (over seeds; 0 for one seed) of ``value`` and the seed count,
    methods in order of first appearance."""
    grouped = frame.groupby(["method", "noise"], sort=False)[value]
    table = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    table["std"] = table["std"].fillna(0.0)
    order = {m: i for i, m in enumerate(pd.unique(frame["method"]))}
    return table.sort_values(["method", "noise"], key=lambda c: c.map(order) if c.name == "method" else c,
                             ignore_index=True)  # fmt: skip


def accuracy_pivot(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`accuracy_table` as method × noise text cells "mean ± std" (for display)."""
    cells = table.assign(cell=[f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(table["mean"], table["std"])])
    pivot = cells.pivot(index="method", columns="noise", values="cell")
    return pivot.reindex(index=pd.unique(table["method"]))


def accuracy_vs_noise(table: pd.DataFrame, *, highlight: Sequence[str] = ("ew", "sgs"),
                      title: str | None = "Test accuracy against label noise", y_title: str = "mean test accuracy",
                      width: int | None = 760, height: int | None = 460) -> go.Figure:  # fmt: skip
    """One line per method of :func:`accuracy_table` (mean ± std error bars) against the noise rate; methods in
    ``highlight`` are drawn thick, the others thin."""
    fig = go.Figure()
    for method, rows in table.groupby("method", sort=False):
        strong = method in highlight
        fig.add_trace(go.Scatter(
            x=rows["noise"], y=rows["mean"], name=str(method), mode="lines+markers",
            error_y={"type": "data", "array": rows["std"].to_numpy(), "visible": True},
            line={"width": 3 if strong else 1}, opacity=1.0 if strong else 0.6,
        ))  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", width=width, height=height,
                      xaxis_title="symmetric label-noise rate", yaxis_title=y_title)  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# the toy problem: two 2-D objectives, sample by sample
@dataclass(frozen=True)
class ToySamples:
    """Per-sample versions of a :class:`~sgs_lab.data.ToyProblem`'s two objectives.

    Sample i of objective k has the loss ℓ_{k,i}(θ) = ½‖A_k(θ − c_{k,i})‖² (A_k the problem's scale), so the mean
    over samples is the problem's f_k up to a constant when the c_{k,i} average to its minimum. A *noisy* sample
    (a wrong label) has its minimum on the far side of the origin: it pulls against its objective.

    Attributes: ``centres`` (2, n, 2) float64, each sample's minimum; ``noisy`` (2, n) bool.
    """

    centres: Tensor
    noisy: Tensor

    @property
    def n(self) -> int:
        return self.centres.shape[1]


def toy_samples(problem: ToyProblem, n: int = 12, *, noise: float = 0.0, spread: float = 0.15,
                seed: int = 0) -> ToySamples:  # fmt: skip
    """``n`` samples per objective: minima scattered by ``spread`` around the objective's minimum c_k, and a share
    ``noise`` of them (rounded) wrong — their minima scattered around −c_k instead."""
    if n < 1 or not 0.0 <= noise <= 1.0:
        raise ValueError(f"need n ≥ 1 and noise in [0, 1]; got n={n}, noise={noise}")
    generator = torch.Generator().manual_seed(seed)
    base = problem.centres().double()  # (2, 2)
    jitter = spread * torch.randn(2, n, 2, generator=generator, dtype=torch.float64)
    noisy = torch.zeros(2, n, dtype=torch.bool)
    wrong = round(noise * n)
    for k in range(2):
        noisy[k, torch.randperm(n, generator=generator)[:wrong]] = True
    sign = torch.where(noisy, -1.0, 1.0).double()[..., None]
    return ToySamples(centres=sign * base[:, None, :] + jitter, noisy=noisy)


def _toy_stats(problem: ToyProblem, theta, samples: ToySamples, method):
    """GradStats of the per-sample toy losses at ``theta``: θ is the weight of a Linear(1, 2) fed ones, so the
    engine sees an ordinary layer; returns (layer, stats)."""
    from .grads import SampleGradients

    layer = nn.Linear(1, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(theta, dtype=torch.float64).reshape(2, 1))
    scales = problem.scales().double()
    probe = SampleGradients(layer, scope=method.scope)
    with probe.capture():
        z = layer(torch.ones(samples.n, 1, dtype=torch.float64))  # (n, 2): every row is θ
    losses = {}
    for k, task in enumerate(TOY_TASKS):
        scaled = (z - samples.centres[k]) @ scales[k].T
        losses[task] = 0.5 * scaled.pow(2).sum(1)
    reference = method.reference
    if reference == "class":
        raise ValueError("the toy samples have no classes: use the batch, loo or ema reference")
    return layer, probe.compute(losses, reference=reference)


def _toy_step_gradient(problem: ToyProblem, theta, samples: ToySamples, method, epoch: int = 0) -> Tensor:
    """The gradient ``method`` writes into θ's ``.grad`` at ``theta`` (what the trainer's step would apply)."""
    layer, stats = _toy_stats(problem, theta, samples, method)
    if getattr(method, "needs_jacobian", False):
        stats.apply_direction(method.aggregate(stats.jacobian()))
    else:
        weights, task_weights = method.weights(stats, epoch=epoch)
        stats.backward(weights, task_weights)
    return layer.weight.grad.reshape(2).detach()


def _toy_method(name: str, knobs: Mapping | None = None):
    from .weighting import make_method

    knobs = dict(knobs or {})
    if name == "sgs":
        knobs.setdefault("warmup", 0)
    method = make_method(name, **knobs)
    if method.needs_new_losses:
        raise ValueError(f"{name} learns from the losses after each step; the toy lessons do not support it")
    return method


def _default_samples(problem: ToyProblem, samples: ToySamples | None) -> ToySamples:
    return samples if samples is not None else toy_samples(problem, 4, spread=0.0)


def toy_directions(problem: ToyProblem, theta, methods: Sequence[str] = TOY_METHODS, *,
                   samples: ToySamples | None = None, knobs: Mapping[str, dict] | None = None) -> dict:  # fmt: skip
    """Where θ moves from ``theta``: {name: (2,) array}, the descent direction −∇ of each objective ("f1", "f2":
    the mean over its samples) and of each weighting method in ``methods`` (the negative of the gradient the
    method writes into ``.grad``; any name of ``sgs_lab.weighting``, SGS without warm-up).

    ``samples``: per-sample objectives (:func:`toy_samples`); default: noiseless samples at the two minima, i.e.
    the problem itself. ``knobs``: {method: its keyword knobs}.
    """
    samples = _default_samples(problem, samples)
    theta = torch.as_tensor(theta, dtype=torch.float64).reshape(2)
    out = {}
    gradients = _toy_task_gradients(problem, theta, samples)
    for k, task in enumerate(TOY_TASKS):
        out[task] = (-gradients[k]).numpy()
    for name in methods:
        method = _toy_method(name, (knobs or {}).get(name))
        out[name] = (-_toy_step_gradient(problem, theta, samples, method)).numpy()
    return out


def toy_direction_table(directions: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """One row per direction of :func:`toy_directions`: dx, dy, length, and for each objective the rate at which a
    small step along it changes that objective, to first order (``df1``, ``df2`` = ⟨direction, ∇f⟩: negative
    means the objective decreases), and whether it decreases f1 / f2 / both."""
    g1, g2 = -np.asarray(directions["f1"], dtype=float), -np.asarray(directions["f2"], dtype=float)  # the gradients
    rows = []
    for name, vector in directions.items():
        d = np.asarray(vector, dtype=float)
        df1, df2 = float(d @ g1), float(d @ g2)
        rows.append({"direction": name, "dx": float(d[0]), "dy": float(d[1]), "length": float(np.linalg.norm(d)),
                     "df1": df1, "df2": df2, "decreases f1": df1 < 0, "decreases f2": df2 < 0,
                     "decreases both": df1 < 0 and df2 < 0})  # fmt: skip
    return pd.DataFrame(rows).set_index("direction")


def _toy_task_gradients(problem: ToyProblem, theta: Tensor, samples: ToySamples) -> Tensor:
    """(2, 2): each objective's mean gradient over its samples, in closed form A_kᵀA_k(θ − mean_i c_{k,i})."""
    scales = problem.scales().double()
    gram = scales.transpose(1, 2) @ scales
    return torch.einsum("kij,kj->ki", gram, theta[None] - samples.centres.mean(1))


def toy_weights(problem: ToyProblem, theta, *, samples: ToySamples, **sgs_knobs) -> pd.DataFrame:
    """SGS at ``theta``: one row per (task, sample) with noisy, cosine (to the task's mean gradient), weight
    (the sample weight w) and task_weight (λ). ``sgs_knobs`` go to the SGS method (warm-up 0 by default)."""
    method = _toy_method("sgs", sgs_knobs)
    _, stats = _toy_stats(problem, theta, samples, method)
    weights, task_weights = method.weights(stats, epoch=0)
    n = samples.n
    return pd.DataFrame({
        "task": np.repeat(TOY_TASKS, n), "sample": np.tile(np.arange(n), 2),
        "noisy": samples.noisy.reshape(-1).numpy(), "cosine": stats.cosine.reshape(-1).numpy(),
        "weight": weights.reshape(-1).numpy(), "task_weight": np.repeat(task_weights.numpy(), n),
    })  # fmt: skip


def toy_paths(problem: ToyProblem, start, methods: Sequence[str] = TOY_METHODS, *, steps: int = 40,
              lr: float = 0.1, samples: ToySamples | None = None,
              knobs: Mapping[str, dict] | None = None) -> pd.DataFrame:  # fmt: skip
    """Gradient descent θ ← θ − lr·(the method's gradient) from ``start`` for ``steps`` steps, per method.

    Returns one row per (method, step) — step 0 is the start — with x, y and both objectives' values f1, f2 (the
    problem's clean objectives, whatever the samples).
    """
    samples = _default_samples(problem, samples)
    rows = []
    for name in methods:
        method = _toy_method(name, (knobs or {}).get(name))
        theta = torch.as_tensor(start, dtype=torch.float64).reshape(2).clone()
        for step in range(steps + 1):
            f1, f2 = problem.losses(theta[None]).reshape(2).tolist()
            rows.append({"method": name, "step": step, "x": float(theta[0]), "y": float(theta[1]), "f1": f1,
                         "f2": f2})  # fmt: skip
            if step < steps:
                theta = theta - lr * _toy_step_gradient(problem, theta, samples, method, epoch=step)
    return pd.DataFrame(rows)


class ToyExplorer:
    """Sliders over the toy problem: the angle between the objectives' minima and the share of wrong samples;
    the figure shows each objective's and each method's descent direction at θ (see :func:`toy_explorer`).

    Controls: ``angle_slider``, ``noise_slider``; output: ``figure`` (a ``go.FigureWidget``), ``summary``
    (HTML: the objectives' cosine at θ); ``widget`` is the ipywidgets box to display.
    """

    def __init__(self, theta=(0.3, 0.5), *, angle: float = 120.0, noise: float = 0.0,
                 methods: Sequence[str] = TOY_METHODS, n: int = 12, seed: int = 0) -> None:  # fmt: skip
        import ipywidgets as widgets

        self.theta, self.methods, self.n, self.seed = tuple(theta), tuple(methods), n, seed
        self.angle_slider = widgets.IntSlider(value=int(angle), min=0, max=180, step=5, description="angle°",
                                              continuous_update=False)  # fmt: skip
        self.noise_slider = widgets.FloatSlider(value=noise, min=0.0, max=0.5, step=0.05, description="wrong",
                                                readout_format=".0%", continuous_update=False)  # fmt: skip
        self.summary = widgets.HTML()
        self.figure = go.FigureWidget()
        for control in (self.angle_slider, self.noise_slider):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.angle_slider, self.noise_slider]), self.summary, self.figure])
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def current(self) -> tuple[ToyProblem, ToySamples, dict]:
        """(problem, samples, directions) for the sliders' values."""
        problem = ToyProblem(angle=float(self.angle_slider.value))
        spread = 0.15 if self.noise_slider.value else 0.0
        samples = toy_samples(problem, self.n, noise=float(self.noise_slider.value), spread=spread, seed=self.seed)
        return problem, samples, toy_directions(problem, self.theta, self.methods, samples=samples)

    def update(self) -> None:
        """Recompute the directions and redraw the figure."""
        from .viz.toy import toy_arrows

        problem, samples, directions = self.current()
        g1, g2 = directions["f1"], directions["f2"]
        cosine = float(np.dot(g1, g2) / max(np.linalg.norm(g1) * np.linalg.norm(g2), 1e-300))
        verdict = "conflicting" if cosine < 0 else "aligned" if cosine > 0 else "orthogonal"
        self.summary.value = f"cosine between the objectives' gradients at θ: <b>{cosine:+.2f}</b> ({verdict})"
        figure = toy_arrows(problem, self.theta, directions, samples=samples if self.noise_slider.value else None)
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_traces(list(figure.data))
            self.figure.layout = figure.layout


def toy_explorer(theta=(0.3, 0.5), *, angle: float = 120.0, noise: float = 0.0,
                 methods: Sequence[str] = TOY_METHODS) -> ToyExplorer:  # fmt: skip
    """An interactive :func:`sgs_lab.viz.toy.toy_arrows`: move the angle between the two objectives' minima (0°:
    the same direction, 180°: opposite) and the share of wrong samples, and watch how EW, PCGrad, MGDA and SGS
    move θ. Display the returned object in a notebook cell."""
    return ToyExplorer(theta, angle=angle, noise=noise, methods=methods)


# ---------------------------------------------------------------------------------------------------------------------
# your own model and data, into the cache
def _model_key(model: nn.Module, train: TaskSet, test: TaskSet, described: dict) -> str:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    digest = hashlib.sha256()
    for part in (repr(model), json.dumps(described, sort_keys=True, default=str), train.fingerprint(),
                 test.fingerprint()):  # fmt: skip
        digest.update(part.encode())
    digest.update(hashlib.sha256(buffer.getvalue()).digest())
    return digest.hexdigest()[:16]


def _trained_run(root: Path, prefix: str, key: str):
    """The finished run under ``root`` (directories named ``prefix``…) whose *trained* weights, data and options
    have the key ``key`` (``meta["trained_key"]``), or None."""
    from .cache import CacheError, open_run

    for path in sorted(p for p in root.iterdir() if p.name.startswith(prefix) and (p / "manifest.json").exists()):
        try:
            run = open_run(path)
        except (CacheError, OSError, ValueError, KeyError):  # an unreadable neighbour is not this call's business
            continue
        if run.meta.get("trained_key") == key and run.status == "finished" and (path / MODEL_FILE).exists():
            return run
    return None


def train_custom(
    model: nn.Module,
    train: TaskSet,
    test: TaskSet,
    *,
    method: str = "sgs",
    knobs: Mapping | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    name: str = "custom",
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
):
    """Train your own ``model`` — a shared ``model.encoder`` and ``model.heads`` ({task: module}); ``model(x)``
    returns {task: output}, like :class:`sgs_lab.models.MultiTaskNet` — on ``train`` with ``method``, recording
    every per-sample statistic into the run cache exactly as ``sgs-lab train`` does; evaluate on ``test`` after
    every epoch.

    The run is keyed by ``name``, the model's architecture and initial weights, the data and the options: called
    again with the same, it opens the stored run and loads the trained weights into ``model`` instead of
    training. The key of the trained weights is stored too (``meta["trained_key"]``), so calling again with the
    model object a first call trained (or one holding its weights) also reopens that run rather than training
    on top of them; to train further from trained weights, give another ``name``.

    Losses: cross-entropy for classification tasks, squared error for regression. Adam with ``lr``; ``epochs``
    defaults to the notebook size's; SGS without ``warmup`` in ``knobs`` gets min(5, max(1, epochs // 6)). Returns
    the :class:`sgs_lab.cache.Run`.
    """
    from tqdm.auto import tqdm

    from .cache import RunWriter, open_run, remove_run
    from .grads import SampleGradients
    from .grads.stats import masked_mean
    from .train import evaluate, task_losses
    from .train.recorder import step_records
    from .weighting import make_method

    if not hasattr(model, "encoder") or not hasattr(model, "heads"):
        raise TypeError("model needs a shared `encoder` and `heads` ({task: module}), e.g. sgs_lab.models.MultiTaskNet")
    missing = [t for t in train.tasks if t not in model.heads]
    if missing:
        raise ValueError(f"model.heads lacks the task(s) {missing}; the data's tasks are {list(train.tasks)}")
    epochs = sizes()["epochs"] if epochs is None else epochs
    knobs = dict(knobs or {})
    if method == "sgs" and "warmup" not in knobs:
        knobs["warmup"] = min(5, max(1, epochs // 6))
    described = {"name": name, "method": method, "knobs": knobs, "epochs": epochs, "batch_size": batch_size,
                 "lr": lr, "seed": seed}  # fmt: skip
    key = _model_key(model, train, test, described)
    out = runs_root(root) / f"{name}-{method}-{key}"
    if not (out / "manifest.json").exists():
        trained = _trained_run(out.parent, f"{name}-{method}-", key)  # ``model`` may be the result of that run
        if trained is not None:
            model.load_state_dict(torch.load(trained.path / MODEL_FILE, map_location="cpu", weights_only=True))
            return trained
    if (out / "manifest.json").exists():
        run = open_run(out)
        if run.status == "finished" and (out / MODEL_FILE).exists():
            model.load_state_dict(torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True))
            return run
        if run.status == "running":
            from .cache import RunLockedError

            raise RunLockedError(f"{out} is being trained by another live process")
        remove_run(out)  # interrupted: a custom run does not resume, it starts again
    elif out.exists():
        shutil.rmtree(out)

    device = next(model.parameters()).device
    strategy = make_method(method, **knobs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    probe = SampleGradients(model.encoder, scope=strategy.scope)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    labels_for = {t: s.kind == "classification" for t, s in train.tasks.items()}
    meta = {"method": method, "knobs": knobs, "seed": seed, "tasks": list(train.tasks), "key": key, "name": name,
            "model": repr(model), "noise": {t: round(float(train.noisy[t].float().mean()), 4) for t in train.tasks},
            "config": described, "data": {"train": train.fingerprint(), "test": test.fingerprint(),
                                          "train_size": len(train), "test_size": len(test)}}  # fmt: skip
    started = time.perf_counter()
    progress = not fast() if progress is None else progress
    with RunWriter(out, meta) as writer:
        history = []
        for epoch in tqdm(range(epochs), desc=f"{name}: {method}", disable=not progress, leave=False):
            order = torch.randperm(len(train), generator=generator)
            losses_sum = 0.0
            for step in range(steps_per_epoch):
                batch = train.subset(order[step * batch_size : (step + 1) * batch_size]).to(device)
                with probe.capture():
                    z = model.encoder(batch.x)
                outputs = {t: model.heads[t](z) for t in train.tasks}
                losses = task_losses(outputs, batch)
                labels = {t: y if labels_for[t] else torch.zeros_like(y, dtype=torch.long)
                          for t, y in batch.labels.items()}  # fmt: skip
                stats = probe.compute(losses, labels=labels, reference=strategy.reference, masks=batch.present)
                sgs_batch = stats.similarity("batch").cosine
                sgs_class = stats.similarity("class").cosine
                weights, task_weights = strategy.weights(stats, epoch=epoch)
                weights = torch.ones_like(stats.cosine) if weights is None else weights
                task_weights = torch.ones(len(losses), device=device) if task_weights is None else task_weights
                optimizer.zero_grad(set_to_none=True)
                if getattr(strategy, "needs_jacobian", False):
                    stats.apply_direction(strategy.aggregate(stats.jacobian()))
                else:
                    stats.backward(weights, task_weights)
                optimizer.step()
                if strategy.needs_new_losses:
                    with torch.no_grad():
                        new = task_losses(model(batch.x), batch)
                    present = torch.stack([batch.present[t] for t in new])
                    strategy.after_step(stats, masked_mean(torch.stack(list(new.values())), present))
                writer.write(*step_records(
                    epoch=epoch, step=epoch * steps_per_epoch + step, batch=batch, outputs=outputs, stats=stats,
                    weights=weights, task_weights=task_weights, sgs_batch=sgs_batch, sgs_class=sgs_class,
                    specs=train.tasks,
                ))  # fmt: skip
                losses_sum += float(masked_mean(stats.losses, stats.mask).mean())
            strategy.end_epoch(epoch)
            summary = {"epoch": epoch, "train_loss": losses_sum / steps_per_epoch}
            summary.update({f"test/{k}": v for k, v in evaluate(model, test, device).items()})
            summary["seconds"] = time.perf_counter() - started
            history.append(summary)
            writer.commit_epoch(summary)
            writer.flush()
        torch.save(model.state_dict(), out / MODEL_FILE)
        metrics = {k.removeprefix("test/"): v for k, v in history[-1].items() if k.startswith("test/")}
        accuracy = {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("accuracy")}
        writer.finish(test_metrics=metrics, test_accuracy=accuracy, seconds=round(time.perf_counter() - started, 2),
                      trained_key=_model_key(model, train, test, described))  # fmt: skip
    return open_run(out)


__all__ = [
    "DATASETS", "TOY_METHODS", "ToyExplorer", "ToySamples", "accuracy_pivot", "accuracy_table", "accuracy_vs_noise",
    "benchmark_results", "fast", "load_model", "matrix_figure", "notebook_config", "notebook_data", "notebook_run",
    "per_epoch_table", "runs_root", "sizes", "sweep", "task_conflict_matrix", "toy_direction_table",
    "toy_directions", "toy_explorer", "toy_paths", "toy_samples", "toy_weights", "train_custom",
]  # fmt: skip
