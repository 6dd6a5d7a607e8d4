"""Scoring a detector against the ground truth a run knows: which labels the injected noise flipped."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._input import read_samples

ALL_TASKS = "(all)"  # the task column of the combined evaluation (task=None)


def detection_metrics(is_noisy, score, flagged=None) -> dict[str, float]:
    """AUROC and average precision of ``score`` for ``is_noisy``; precision and recall of ``flagged``.

    Parameters
    ----------
    is_noisy : (n,) bool, the ground truth.
    score : (n,) float, higher = more likely mislabelled (NaN counts as the lowest score).
    flagged : (n,) bool or None.

    Returns
    -------
    dict: n, n_noisy, auroc, ap (NaN when ``is_noisy`` has a single class) and, with ``flagged``, n_flagged,
    precision (NaN when nothing is flagged) and recall.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(is_noisy, dtype=bool)
    score = np.asarray(score, dtype=float)
    finite = score[np.isfinite(score)]
    score = np.where(np.isnan(score), finite.min() - 1.0 if finite.size else 0.0, score)
    metrics = {"n": len(truth), "n_noisy": int(truth.sum())}
    both = 0 < truth.sum() < len(truth)
    metrics["auroc"] = float(roc_auc_score(truth, score)) if both else float("nan")
    metrics["ap"] = float(average_precision_score(truth, score)) if both else float("nan")
    if flagged is not None:
        flagged = np.asarray(flagged, dtype=bool)
        hits = int((flagged & truth).sum())
        metrics["n_flagged"] = int(flagged.sum())
        metrics["precision"] = hits / flagged.sum() if flagged.any() else float("nan")
        metrics["recall"] = hits / truth.sum() if truth.any() else float("nan")
    return metrics


def noise_mask(run, *, epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """The run's ground truth: (task, sample_id, noisy), one row per labelled sample of each task.

    Raises ValueError when the run records no noise mask or its mask flags nothing: such a run cannot be evaluated
    (detection itself still works).
    """
    try:
        table = read_samples(run, ["epoch", "task", "sample_id", "label", "noisy"], why="to evaluate", epochs=epochs)
    except ValueError as exc:
        if "noisy" not in str(exc):
            raise
        raise ValueError(
            "cannot evaluate: the run records no noise mask (no 'noisy' column); find_noisy still ranks its labels"
        ) from exc
    truth = table.groupby(["task", "sample_id"], sort=True)["noisy"].max().astype(bool).reset_index()
    if not truth["noisy"].any():
        raise ValueError(
            "cannot evaluate: the run has no injected label noise (its noise mask flags no label), so there is no "
            "ground truth to score against; find_noisy still ranks its labels"
        )
    return truth


def evaluate_detection(run, tasks: Sequence[str] | None = None, *, method: str = "auto", combined: bool = True,
                       **options) -> pd.DataFrame:  # fmt: skip
    """Score ``find_noisy(run, task, method=method, **options)`` against the run's noise mask, per task.

    Parameters
    ----------
    run : a run with a ``noisy`` column (see :func:`find_noisy`).
    tasks : the tasks to evaluate (default: every task with class labels).
    method, options : passed to :func:`find_noisy`.
    combined : add a row for ``task=None`` (task column "(all)"; a sample is wrong when any of its labels is).

    Returns
    -------
    DataFrame, one row per task: method, task, auroc, ap, precision and recall of the flagged labels,
    n, n_noisy, n_flagged, true_rate, estimated_rate (n_flagged / n), seconds (the detector's time for all tasks
    together).
    A task without wrong labels gets NaN AUROC and AP.
    """
    from ._find import rank_tasks

    truth = noise_mask(run, epochs=options.get("epochs"))
    if tasks is None:
        tasks = _classification_tasks(run, truth)
    started = time.perf_counter()
    rankings = rank_tasks(run, tasks, combined=combined and len(tasks) > 1, method=method, **options)
    seconds = time.perf_counter() - started  # one pass serves every task
    truth = truth[truth["task"].isin(list(tasks))]  # the combined row counts only the ranked tasks' labels
    rows = [{**_ranking_metrics(ranked, truth), "seconds": seconds} for ranked in rankings.values()]
    columns = ["method", "task", "auroc", "ap", "precision", "recall", "n", "n_noisy", "n_flagged", "true_rate",
               "estimated_rate", "seconds"]  # fmt: skip
    return pd.DataFrame(rows)[columns]


def _ranking_metrics(ranking: pd.DataFrame, truth: pd.DataFrame) -> dict:
    # a combined ranking (task=None) names each row's most suspect task and lists the flagging ones
    task = None if "flagged_tasks" in ranking.columns or not len(ranking) else ranking["task"].iloc[0]
    if task is None:  # combined over tasks: a sample is wrong when any of its labels is
        wrong = truth.groupby("sample_id")["noisy"].any()
    else:
        wrong = truth[truth["task"] == task].set_index("sample_id")["noisy"]
    is_noisy = wrong.reindex(ranking["sample_id"]).fillna(False).to_numpy(dtype=bool)
    metrics = detection_metrics(is_noisy, ranking["score"].to_numpy(), ranking["flagged"].to_numpy())
    return {"method": ranking.attrs.get("method", ""), "task": ALL_TASKS if task is None else task, **metrics,
            "true_rate": metrics["n_noisy"] / max(metrics["n"], 1),
            "estimated_rate": metrics["n_flagged"] / max(metrics["n"], 1)}  # fmt: skip


def evaluate_ranking(ranking: pd.DataFrame, run) -> dict:
    """Score one :func:`find_noisy` ranking against ``run``'s noise mask (see :func:`evaluate_detection`).

    Returns
    -------
    dict: method, task, n, n_noisy, auroc, ap, n_flagged, precision, recall, true_rate, estimated_rate.

    Raises ValueError when the run has no noise mask (see :func:`noise_mask`).
    """
    return _ranking_metrics(ranking, noise_mask(run))


def _classification_tasks(run, truth: pd.DataFrame) -> list[str]:
    from ._input import KEY_COLUMNS, classification_tasks, run_meta

    table = read_samples(run, KEY_COLUMNS, why="to find the tasks")
    return [t for t in classification_tasks(table, run_meta(run)) if t in set(truth["task"])]
