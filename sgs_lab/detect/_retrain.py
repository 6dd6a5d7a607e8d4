"""Acting on a detector's verdict: drop or relabel the flagged labels, retrain, and measure what it changed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from ..data import TaskSet
from ._refit import positions_in

ACTIONS = ("drop", "relabel")


def _flagged_by_task(suspects: pd.DataFrame | list[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    frames = suspects if isinstance(suspects, list) else [suspects]
    table = pd.concat(frames, ignore_index=True)
    needed = {"sample_id", "task", "flagged", "suggested_label"}
    if not needed <= set(table.columns):
        raise ValueError(f"suspects must be find_noisy rankings with {sorted(needed)}; got {list(table.columns)}")
    flagged = table[table["flagged"].astype(bool)]
    return {task: rows for task, rows in flagged.groupby("task", sort=False)}


def clean_labels(train: TaskSet, suspects, *, action: str = "drop") -> TaskSet:
    """A copy of ``train`` with the flagged labels of ``suspects`` dropped or relabelled.

    Parameters
    ----------
    train : the training set the run saw.
    suspects : a :func:`find_noisy` ranking, or a list of them (one per task); with ``task=None`` rankings each
        flagged sample is acted on in its most suspect task.
    action : "drop" marks the flagged labels missing (the sample keeps training its other tasks); "relabel"
        replaces each with its suggested_label (the noise mask is updated against the clean labels).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {list(ACTIONS)}; got {action!r}")
    labels, present, noisy = dict(train.labels), dict(train.present), dict(train.noisy)
    for task, rows in _flagged_by_task(suspects).items():
        if task not in train.tasks:
            raise ValueError(
                f"the suspects name task {task!r}, which the training set lacks; it has {list(train.tasks)}"
            )
        where = torch.as_tensor(positions_in(train, rows["sample_id"].to_numpy()))
        if action == "drop":
            present[task] = present[task].clone()
            present[task][where] = False
        else:
            labels[task] = labels[task].clone()
            labels[task][where] = torch.tensor(rows["suggested_label"].to_numpy(), dtype=labels[task].dtype)
            noisy[task] = labels[task] != train.clean[task]
    return dataclasses.replace(train, labels=labels, present=present, noisy=noisy)


def _wrong_labels_used(data: TaskSet, task: str) -> float:
    """The fraction of the labels training uses that are wrong."""
    used = data.present[task]
    return float((data.noisy[task] & used).sum()) / max(int(used.sum()), 1)


def clean_and_retrain(train: TaskSet, test: TaskSet, suspects, *, action: str = "drop", config=None,
                      before=None) -> pd.DataFrame:  # fmt: skip
    """Drop or relabel the flagged labels, retrain, and report each task's test accuracy before and after.

    Parameters
    ----------
    train, test : the run's training set and a test set (accuracy is measured against its clean labels).
    suspects : :func:`find_noisy` ranking(s) (see :func:`clean_labels`).
    action : "drop" or "relabel".
    config : ``sgs_lab.train.TrainConfig`` of both trainings (default: ``TrainConfig()``).
    before : test accuracies of the run as it was ({task: accuracy}, e.g. a cached run's
        ``meta["test_accuracy"]``); default: train ``config`` on ``train`` first.

    Returns
    -------
    DataFrame, one row per task: task, accuracy_before, accuracy_after, change, changed (labels dropped or
    relabelled), changed_wrong (how many of those were wrong, by the training set's noise mask), wrong_before and
    wrong_after (the fraction of wrong labels among those training uses).
    """
    from ..train import TrainConfig, fit

    config = config or TrainConfig()
    cleaned = clean_labels(train, suspects, action=action)
    if before is None:
        before = _accuracy(fit(train, test, config, progress=False).test_metrics)
    after = _accuracy(fit(cleaned, test, config, progress=False).test_metrics)
    flagged = _flagged_by_task(suspects)
    rows = []
    for task in after:
        ids = flagged[task]["sample_id"].to_numpy() if task in flagged else np.array([], dtype=np.int64)
        wrong = train.noisy[task].numpy()[positions_in(train, ids)] if len(ids) else np.array([], dtype=bool)
        rows.append({"task": task, "accuracy_before": before.get(task, float("nan")), "accuracy_after": after[task],
                     "change": after[task] - before.get(task, float("nan")), "changed": len(ids),
                     "changed_wrong": int(wrong.sum()), "wrong_before": _wrong_labels_used(train, task),
                     "wrong_after": _wrong_labels_used(cleaned, task)})  # fmt: skip
    return pd.DataFrame(rows)


def _accuracy(metrics: dict) -> dict[str, float]:
    return {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("/accuracy")}
