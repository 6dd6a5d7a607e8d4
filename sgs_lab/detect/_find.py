"""``find_noisy``: rank a run's labels, most suspect first, with the evidence and a flag for the likely wrong ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import _scores
from ._input import KEY_COLUMNS, check_task, classification_tasks, read_samples, run_meta, tasks_of


@dataclass(frozen=True)
class Detector:
    """A detector: what it reads and how it scores.

    kind : "run" (scores the run's records), "probabilities" (confident learning on out-of-sample probabilities),
        "refit" (retrains with suspect labels hidden).
    columns : record columns read besides :data:`~sgs_lab.detect._input.KEY_COLUMNS`.
    score : for kind "run", one task's rows → DataFrame(score, evidence) indexed by sample_id.
    """

    name: str
    kind: str
    summary: str
    columns: tuple[str, ...] = ()
    score: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    baseline: bool = False


def _in_run_detector(name: str, summary: str, columns: tuple[str, ...], score, baseline: bool = False) -> Detector:
    return Detector(name, "run", summary, columns, score, baseline)


_SGS = ("sgs_class",)
DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in [
        Detector("refit", "refit", "hide the run's suspects (AUM), retrain twice, rank-average the verdicts (needs data)"),
        _in_run_detector("sgs", "minus the mean class-reference SGS over epochs", _SGS, _scores.sgs_mean),
        _in_run_detector("sgs_min", "minus the lowest class-reference SGS over epochs", _SGS, _scores.sgs_min),
        _in_run_detector("sgs_early", "minus the mean class-reference SGS, first quarter of the epochs", _SGS,
                         _scores.sgs_early),
        _in_run_detector("sgs_negative", "fraction of epochs with negative class-reference SGS", _SGS,
                         _scores.sgs_negative),
        _in_run_detector("sgs_weight", "minus the mean SGS sample weight (a run trained with SGS weighting)",
                         ("weight",), _scores.sgs_weight),
        _in_run_detector("loss", "small-loss: mean training loss", ("loss",), _scores.small_loss, True),
        _in_run_detector("aum", "area under the margin (Pleiss et al. 2020)", (), _scores.area_under_margin, True),
        _in_run_detector("confidence", "Dataset Cartography: 1 − mean probability of the given label",
                         ("p_label",), _scores.cartography_confidence, True),
        _in_run_detector("variability", "Dataset Cartography: std over epochs of that probability", ("p_label",),
                         _scores.cartography_variability, True),
        _in_run_detector("grand", "GraNd: per-sample gradient norm, first quarter of the epochs", ("grad_norm",),
                         _scores.grand, True),
        Detector("cleanlab", "probabilities", "confident learning (cleanlab) on K-fold out-of-sample probabilities",
                 baseline=True),
    ]
}  # fmt: skip
BEST_IN_RUN = "aum"  # what "auto" uses when no training data is at hand (benchmarks/detect.py)
METHODS = ("auto", *DETECTORS)


def available_detectors() -> pd.DataFrame:
    """The detectors: name, kind, baseline (a published method sgs_lab compares against) and summary."""
    rows = [{"name": d.name, "kind": d.kind, "baseline": d.baseline, "summary": d.summary} for d in DETECTORS.values()]
    return pd.DataFrame(rows)


def _detector(method: str) -> Detector:
    if method not in METHODS:
        raise ValueError(f"unknown detection method {method!r}; choose one of {list(METHODS)}")
    return DETECTORS[method]


def _ranked(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    first = ["sample_id", "task", "score", "flagged", "given_label", "suggested_label"]
    frame = frame.reset_index().assign(task=task)
    frame = frame[first + [c for c in frame.columns if c not in first]]
    order = np.lexsort((frame["sample_id"].to_numpy(), -frame["score"].fillna(-np.inf).to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def _in_run(detector: Detector, rows: pd.DataFrame, options: dict) -> pd.DataFrame:
    evidence = _scores.common_evidence(rows)
    scored = detector.score(rows).reindex(evidence.index)
    scored = scored.join(evidence.drop(columns=[c for c in evidence.columns if c in scored.columns]))
    scored["flagged"] = _scores.flags(scored["score"], _scores.estimated_count(evidence), **options)
    return scored


def _task_frames(run, tasks: list[str] | None, detector: Detector, options: dict, extra: dict, epochs):
    """{task: DataFrame indexed by sample_id} with score, flagged, given_label, suggested_label and evidence."""
    columns = [*KEY_COLUMNS, *detector.columns]
    table = read_samples(run, columns, why=f"by the {detector.name!r} detector", epochs=epochs)
    meta = run_meta(run)
    if tasks is None:
        tasks = classification_tasks(table, meta)
        if not tasks:
            raise ValueError(f"the run has no classification task to check; its tasks are {tasks_of(table, meta)}")
    for task in tasks:
        check_task(table, task, meta)
    if detector.kind == "run":
        return {t: _in_run(detector, table[table["task"] == t], options) for t in tasks}
    from ._external import external_frames

    return external_frames(detector.kind, run, table, tasks, meta, options, **extra)


def _combine_tasks(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per sample over all tasks: score = how far past its task's flag cut it ranks, in fractions of that
    task's samples (max over tasks, > 0 exactly when flagged in some task); task = the most suspect one."""
    parts = []
    for task, frame in frames.items():
        order = frame["score"].fillna(-np.inf).sort_values(ascending=False, kind="stable").index
        position = pd.Series(np.arange(len(order)), index=order).reindex(frame.index)
        past_cut = (int(frame["flagged"].sum()) - position) / len(frame)  # flags are always the top of the ranking
        parts.append(frame[["given_label", "suggested_label", "flagged"]].assign(task=task, score=past_cut))
    long = pd.concat(parts).reset_index()
    flagged_tasks = long[long["flagged"]].groupby("sample_id")["task"].agg(",".join)
    best = long.sort_values(["score", "sample_id"], ascending=[False, True], kind="stable")
    best = best.drop_duplicates("sample_id").set_index("sample_id")
    best["flagged"] = best.index.isin(flagged_tasks.index)
    best["flagged_tasks"] = flagged_tasks.reindex(best.index).fillna("")
    for task, frame in frames.items():
        best[f"score_{task}"] = frame["score"].reindex(best.index)
    first = ["sample_id", "task", "score", "flagged", "given_label", "suggested_label"]
    best = best.reset_index()
    return best[first + [c for c in best.columns if c not in first]].reset_index(drop=True)


def find_noisy(
    run,
    task: str | None,
    *,
    method: str = "auto",
    threshold: float | None = None,
    rate: float | None = None,
    epochs: Sequence[int] | None = None,
    data=None,
    config=None,
    pred_probs: Mapping[str, object] | None = None,
    folds: int = 4,
    rounds: int = 2,
) -> pd.DataFrame:
    """Rank the labels of ``task`` in ``run``, most likely mislabelled first.

    Parameters
    ----------
    run : a cached run (``sgs_lab.cache.open_run``), a result of ``sgs_lab.train.fit``, or a DataFrame of sample
        rows (DESIGN §5 columns).
    task : a task of the run, or None to rank samples over all its classification tasks combined.
    method : "auto" (``refit`` when the training data is at hand — passed as ``data`` or rebuilt from the meta of
        a run trained by ``sgs-lab train`` — else ``aum``) or one of :func:`available_detectors`.
    threshold : flag the labels whose score is at least this (instead of the method's estimated count).
    rate : flag this fraction of the labels, the top scores (instead of the method's estimated count).
    epochs : use only these epochs' records (None: all).
    data : the run's training set (TaskSet), for ``refit`` and ``cleanlab``.
    config : training options for ``refit`` and ``cleanlab`` (default: the run's own, from its meta).
    pred_probs : for ``cleanlab``: {task: (N, C) out-of-sample probabilities}, a DataFrame indexed by sample_id or
        an array in ascending sample_id order (default: computed by :func:`cross_val_probabilities`).
    folds : K for the cross-validation of ``cleanlab``.
    rounds : hide-and-retrain rounds of ``refit`` (each one training run, without per-sample statistics).

    Returns
    -------
    DataFrame, one row per labelled sample of the task, most suspect first: sample_id, task, score (higher = more
    likely mislabelled; comparable within one method), flagged, given_label, suggested_label, then the method's
    evidence. By default the top k are flagged, k = the method's estimate of the number of wrong labels:
    every detector but ``cleanlab`` counts the low-AUM mode of the run (a two-component Gaussian mixture fitted to
    the AUM values), ``cleanlab`` uses ``cleanlab.count.num_label_issues``. With ``task=None`` there is one row per sample: task is its most suspect task, score how far past that
    task's flag cut it ranks (in fractions of the task's samples; > 0 exactly when flagged in some task),
    flagged_tasks lists the tasks flagging it and score_<task> gives each task's own score.

    Raises
    ------
    ValueError : an unknown method (listing the valid ones), a task the run lacks (listing its tasks), a run
        without the columns the method needs, a regression task.
    ImportError : ``cleanlab`` without the cleanlab package.
    """
    rankings = rank_tasks(run, None if task is None else [task], combined=task is None, method=method,
                          threshold=threshold, rate=rate, epochs=epochs, data=data, config=config,
                          pred_probs=pred_probs, folds=folds, rounds=rounds)  # fmt: skip
    return rankings[task]


def rank_tasks(run, tasks: Sequence[str] | None, *, combined: bool, method: str = "auto", threshold=None, rate=None,
               epochs=None, data=None, config=None, pred_probs=None, folds: int = 4,
               rounds: int = 2) -> dict[str | None, pd.DataFrame]:  # fmt: skip
    """:func:`find_noisy` for several tasks from one detector pass (one retraining for ``refit``): {task: ranking},
    plus {None: the combined ranking} with ``combined``."""
    detector = _resolve(method, run, data)
    options = {"threshold": threshold, "rate": rate}
    extra = {"data": data, "config": config, "pred_probs": pred_probs, "folds": folds, "rounds": rounds}
    frames = _task_frames(run, None if tasks is None else list(tasks), detector, options, extra, epochs)
    rankings: dict[str | None, pd.DataFrame] = {t: _ranked(frame, t) for t, frame in frames.items()}
    if combined:
        rankings[None] = _combine_tasks(frames)
    for task, ranking in rankings.items():
        ranking.attrs.update(method=detector.name, task=task)
    return rankings


def _resolve(method: str, run, data) -> Detector:
    if method != "auto":
        return _detector(method)
    from ._external import training_data_available

    return DETECTORS["refit" if training_data_available(run, data) else BEST_IN_RUN]
