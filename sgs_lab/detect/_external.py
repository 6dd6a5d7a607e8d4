"""Detectors that need more than the run's records: its training data (rebuilt from the run's meta when it was
trained by ``sgs-lab train``), models of their own, or the optional cleanlab package."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..data import TaskSet
from ..train import TrainConfig
from . import _scores
from ._crossval import cross_val_probabilities
from ._refit import check_labels_match, refit_scores

_REBUILD_OPTIONS = ("train_size", "test_size", "seed", "noise", "noise_kind")


def _rebuilt_data(meta: dict) -> TaskSet | None:
    """The MultiDigits training set of a run made by ``sgs-lab train`` (None when its meta cannot say, or when the
    rebuilt set's fingerprint differs from the one the run recorded)."""
    options = meta.get("options") or {}
    if not all(key in options for key in _REBUILD_OPTIONS):
        return None
    from ..data import make_multidigits

    train, _ = make_multidigits(options["train_size"], options["test_size"], seed=options["seed"])
    train = train.with_noise(options["noise"], kind=options["noise_kind"], seed=options["seed"])
    tasks = meta.get("tasks")
    if tasks and set(tasks) <= set(train.tasks):
        train = train.only(tasks)
    recorded = (meta.get("data") or {}).get("train")
    if recorded is not None and recorded != train.fingerprint():
        return None
    return train


def training_data_available(run, data) -> bool:
    from ._input import run_meta

    return data is not None or _rebuilt_data(run_meta(run)) is not None


def _training_data(meta: dict, data, why: str) -> TaskSet:
    data = data if data is not None else _rebuilt_data(meta)
    if data is None:
        raise ValueError(f"{why} needs the run's training set: pass data= (a TaskSet with the run's labels)")
    return data


def _config(meta: dict, config, table: pd.DataFrame) -> TrainConfig:
    """The run's own training options (its meta), else defaults over as many epochs as it recorded."""
    if config is not None:
        return config
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    recorded = meta.get("config")
    if isinstance(recorded, dict):  # the recorded device may not exist here (a GPU run read on a laptop)
        kept = {k: v for k, v in recorded.items() if k in names and k not in ("method", "knobs", "device")}
        return TrainConfig(**kept)
    options = {k: v for k, v in (meta.get("options") or {}).items() if k in names and k not in ("method", "device")}
    options.setdefault("epochs", int(table["epoch"].nunique()))
    options.setdefault("seed", int(meta.get("seed", 0)))
    return TrainConfig(**options)


def import_cleanlab():
    try:
        import cleanlab.count
        import cleanlab.rank
    except ImportError as exc:
        raise ImportError("the 'cleanlab' detector needs the optional cleanlab package: pip install cleanlab") from exc
    return cleanlab


def _aligned_probabilities(probs, sample_ids: np.ndarray, all_ids: np.ndarray) -> np.ndarray:
    """(n, C) rows for ``sample_ids`` from a DataFrame indexed by sample_id or an array over ``all_ids`` (sorted)."""
    if isinstance(probs, pd.DataFrame):
        missing = ~np.isin(sample_ids, probs.index.to_numpy())
        if missing.any():
            raise ValueError(f"pred_probs lack {int(missing.sum())} of the run's sample ids")
        return probs.loc[sample_ids].to_numpy(dtype=float)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or len(probs) != len(all_ids):
        raise ValueError(f"pred_probs must be (N, C) with one row per sample in ascending sample_id order (N = "
                         f"{len(all_ids)}); got shape {probs.shape}")  # fmt: skip
    return probs[np.searchsorted(all_ids, sample_ids)]


def _cleanlab_frames(run, table, tasks, meta, options, *, data, config, pred_probs, folds, **_) -> dict:
    cleanlab = import_cleanlab()
    if pred_probs is None:
        data = _training_data(meta, data, "confident learning without pred_probs")
        pred_probs = cross_val_probabilities(data, config=_config(meta, config, table), folds=folds)
    frames = {}
    for task in tasks:
        rows = table[table["task"] == task]
        evidence = _scores.common_evidence(rows)
        if task not in pred_probs:
            raise ValueError(f"pred_probs has no task {task!r}; it has {list(pred_probs)}")
        ids = evidence.index.to_numpy()
        every = np.sort(table["sample_id"].unique())  # all N samples, labelled for this task or not
        probs = _aligned_probabilities(pred_probs[task], ids, every)
        labels = evidence["given_label"].to_numpy()
        quality = cleanlab.rank.get_label_quality_scores(labels, probs)
        preferred = probs.argmax(1)
        frame = pd.DataFrame({"score": 1.0 - quality, "label_quality": quality, "p_given": probs[np.arange(len(ids)), labels]},
                             index=evidence.index)  # fmt: skip
        frame = frame.join(evidence.drop(columns=["suggested_label"]))
        frame["suggested_label"] = np.where(preferred != labels, preferred, labels)
        estimate = int(cleanlab.count.num_label_issues(labels, probs))
        frame["flagged"] = _scores.flags(frame["score"], estimate, **options)
        frames[task] = frame
    return frames


def _refit_frames(run, table, tasks, meta, options, *, data, config, rounds, **_) -> dict:
    from ._input import classification_tasks

    data = _training_data(meta, data, "the 'refit' detector")
    evidence = {t: _scores.common_evidence(table[table["task"] == t]) for t in classification_tasks(table, meta)}
    for task, frame in evidence.items():
        if task not in data.tasks:
            raise ValueError(f"the data given has no task {task!r}; it has {list(data.tasks)}")
        check_labels_match(data, task, frame["given_label"])
    # every task's suspects are hidden at once: wrong labels of one task harm the encoder all tasks share
    initial = {t: -frame["aum"] for t, frame in evidence.items()}
    counts = {t: _scores.estimated_count(frame) for t, frame in evidence.items()}
    refit = refit_scores(data, initial, counts, config=_config(meta, config, table), rounds=rounds)
    frames = {}
    for task in tasks:
        # the run's own suggestion (its most frequent other prediction) was measured right more often than the
        # retrained model's preferred class (84 against 64 % of the wrong labels at 40 % pair-flip noise)
        frame = refit[task].reindex(evidence[task].index).join(evidence[task])
        # flag the run's own estimate: measured closer to the true count than the retrained models' (docs/detect.md)
        frame["flagged"] = _scores.flags(frame["score"], counts[task], **options)
        frames[task] = frame
    return frames


def external_frames(kind: str, run, table, tasks, meta, options, **extra) -> dict:
    build = {"probabilities": _cleanlab_frames, "refit": _refit_frames}[kind]
    return build(run, table, tasks, meta, options, **extra)
