"""Training for the detectors that need models of their own: out-of-sample probabilities by K-fold cross-validation
(for confident learning) and retraining with suspect labels hidden (the ``refit`` detector).

A lean equal-weighting loop on the trainer's model, optimiser and batches: no per-sample statistics are recorded, so
it costs about a third of :func:`sgs_lab.train.fit`, and it can evaluate every sample after every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from ..data import TaskSet
from ..models import build_model
from ..train import TrainConfig, resolve_device, task_losses
from ..train.fit import make_optimizer
from ..train.recorder import margin


@dataclasses.dataclass
class Tracked:
    """What one training run saw of the evaluated samples.

    margins : {task: (epochs, n_eval)} the given label's logit minus the largest other, after each epoch.
    probs : {task: (n_eval, C)} softmax probabilities after the last epoch.
    """

    margins: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]


def classification_tasks_of(data: TaskSet) -> list[str]:
    return [t for t, spec in data.tasks.items() if spec.kind == "classification"]


@torch.no_grad()
def _evaluate(model, data: TaskSet, index: np.ndarray, tasks: list[str], device, batch_size: int = 2048):
    model.eval()
    margins = {t: [] for t in tasks}
    probs = {t: [] for t in tasks}
    for lo in range(0, len(index), batch_size):
        pick = torch.as_tensor(index[lo : lo + batch_size])
        outputs = model(data.x[pick].to(device))
        for t in tasks:
            logits = outputs[t].float()
            margins[t].append(margin(logits, data.labels[t][pick].to(device)).cpu())
            probs[t].append(torch.softmax(logits, 1).cpu())
    model.train()
    return {t: torch.cat(v).numpy() for t, v in margins.items()}, {t: torch.cat(v).numpy() for t, v in probs.items()}


def train_and_track(
    data: TaskSet,
    *,
    config: TrainConfig,
    train_index: np.ndarray | None = None,
    eval_index: np.ndarray | None = None,
    hidden: Mapping[str, np.ndarray] | None = None,
    seed: int | None = None,
) -> Tracked:
    """Train with equal weighting on ``train_index`` and evaluate ``eval_index`` after every epoch.

    Parameters
    ----------
    data : the task set (labels as training sees them).
    config : model, optimiser, learning rate, batch size, epochs and device (its method is not used: equal weighting).
    train_index, eval_index : (n,) positions in ``data`` (default: all samples).
    hidden : {task: (N,) bool} labels left out of training, like missing labels (the sample still trains its
        other tasks, so a hidden label is predicted out of sample).
    seed : initialisation and batch order (default ``config.seed``).
    """
    n = len(data)
    train_index = np.arange(n) if train_index is None else np.asarray(train_index)
    eval_index = np.arange(n) if eval_index is None else np.asarray(eval_index)
    seed = config.seed if seed is None else seed
    device = resolve_device(config.device)
    tasks = classification_tasks_of(data)
    present = {t: data.present[t].clone() for t in data.tasks}
    for task, mask in (hidden or {}).items():
        present[task] &= ~torch.as_tensor(np.asarray(mask, dtype=bool))
    training = dataclasses.replace(data, present=present).subset(torch.as_tensor(train_index)).to(device)
    torch.manual_seed(seed)
    model = build_model(config.model, tuple(data.x.shape[1:]), data.tasks).to(device)
    optimizer = make_optimizer(model.parameters(), config)
    margins = {t: np.empty((config.epochs, len(eval_index)), dtype=np.float32) for t in tasks}
    for epoch in range(config.epochs):
        order = torch.randperm(len(training), generator=torch.Generator().manual_seed(seed * 10007 + epoch))
        for lo in range(0, len(training), config.batch_size):
            batch = training.subset(order[lo : lo + config.batch_size].to(device))
            losses = task_losses(model(batch.x), batch)
            # Σ_t mean over the task's kept labels, as the trainer's equal weighting
            kept = {t: batch.present[t].float() for t in losses}
            loss = sum((losses[t] * kept[t]).sum() / kept[t].sum().clamp(min=1) for t in losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_margins, probs = _evaluate(model, data, eval_index, tasks, device)
        for t in tasks:
            margins[t][epoch] = epoch_margins[t]
    return Tracked(margins, probs)


def _folds(n: int, folds: int, seed: int) -> np.ndarray:
    if not 2 <= folds <= n:
        raise ValueError(f"folds must lie in [2, {n}] for {n} samples; got {folds}")
    return np.random.default_rng(seed).permutation(n) % folds


def cross_val_probabilities(
    data: TaskSet,
    *,
    config: TrainConfig | None = None,
    folds: int = 4,
    hidden: Mapping[str, np.ndarray] | None = None,
) -> dict[str, pd.DataFrame]:
    """Out-of-sample predicted probabilities by K-fold cross-validation, for confident learning.

    Each fold's samples are predicted by a model trained (equal weighting, ``config``'s model and optimiser) on the
    other K − 1 folds only.

    Parameters
    ----------
    data : TaskSet with N samples.
    config : training options (default: ``TrainConfig()``); its seed also draws the folds.
    folds : K ≥ 2.
    hidden : {task: (N,) bool} labels to leave out of every training fold.

    Returns
    -------
    {task: DataFrame (N, C)} for each classification task, indexed by sample_id, columns the classes 0..C−1.
    """
    config = config or TrainConfig()
    n = len(data)
    fold = _folds(n, folds, config.seed)
    tasks = classification_tasks_of(data)
    probs = {t: np.zeros((n, data.tasks[t].n_classes), dtype=np.float64) for t in tasks}
    for k in range(folds):
        held_out = np.flatnonzero(fold == k)
        tracked = train_and_track(data, config=config, train_index=np.flatnonzero(fold != k), eval_index=held_out,
                                  hidden=hidden, seed=config.seed * 1000 + k)  # fmt: skip
        for t in tasks:
            probs[t][held_out] = tracked.probs[t]
    index = pd.Index(data.sample_id.numpy(), name="sample_id")
    return {t: pd.DataFrame(p, index=index) for t, p in probs.items()}
