"""The ``refit`` detector: hide the run's suspect labels, retrain, and let the retrained model judge every label.

A hidden label is predicted out of sample (the sample still trains the other tasks through the shared encoder),
and the labels kept train a cleaner model, so both the false alarms and the missed wrong labels of the first
ranking get a second, better-informed verdict. Each round hides the current top suspects and retrains once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data import TaskSet
from ..train import TrainConfig
from ._crossval import train_and_track
from ._scores import mixture_count


def positions_in(data: TaskSet, sample_ids: np.ndarray) -> np.ndarray:
    """Row positions in ``data`` of ``sample_ids``; ValueError when some are not in the data."""
    positions = pd.Index(data.sample_id.numpy()).get_indexer(np.asarray(sample_ids))
    if (positions < 0).any():
        raise ValueError(
            f"{int((positions < 0).sum())} sample id(s) of the run are not in the data given: pass the run's "
            "training set as data="
        )
    return positions


def check_labels_match(data: TaskSet, task: str, given: pd.Series) -> None:
    """ValueError when ``data`` labels ``task`` differently from the run (``given``: label by sample_id)."""
    labels = data.labels[task].numpy()[positions_in(data, given.index.to_numpy())]
    differ = int((labels != given.to_numpy()).sum())
    if differ:
        raise ValueError(
            f"the data given labels {differ} sample(s) of task {task!r} differently from the run: pass the run's "
            "own training set (with its noise) as data="
        )


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    hidden = np.zeros(len(scores), dtype=bool)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    hidden[order[:count]] = True
    return hidden


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to (0, 1]: rank-averaging makes scores of different units comparable."""
    return pd.Series(values).rank(pct=True, na_option="bottom").to_numpy()


def refit_scores(
    data: TaskSet,
    initial: dict[str, pd.Series],
    counts: dict[str, int],
    *,
    config: TrainConfig,
    rounds: int = 2,
) -> dict[str, pd.DataFrame]:
    """Scores after ``rounds`` of hide-and-retrain.

    Parameters
    ----------
    data : the run's training set, N samples.
    initial : {task: Series indexed by sample_id} the first ranking (higher = more suspect); tasks not in it are
        left unhidden.
    counts : {task: int} how many labels to hide in the first round.
    config : training options of the retraining (equal weighting).
    rounds : retrainings; each later one hides the current top suspects, as many as the low-margin mode of the
        previous retraining (:func:`mixture_count`).

    Returns
    -------
    {task: DataFrame indexed by sample_id (data order)} with score (the mean of the percentile ranks of the first
    ranking and of every retraining's minus-mean-margin, in (0, 1]), refit_margin (the last retraining's mean margin
    over epochs) and hidden (in the last round).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    n = len(data)
    first = {t: np.full(n, np.nan) for t in initial}
    for task, series in initial.items():
        first[task][positions_in(data, series.index.to_numpy())] = series.to_numpy()
    # the in-run ranking saw the whole training history, each refit a cleaner model: they correct each other, so
    # every verdict so far gets an equal say (rank average) in what the next round hides and in the final score
    total = {t: _ranks(first[t]) for t in first}
    current, counts = dict(first), dict(counts)
    for round_ in range(rounds):
        hidden = {t: _top(current[t], counts[t]) for t in current}
        tracked = train_and_track(data, config=config, hidden=hidden, seed=config.seed + 7919 * (round_ + 1))
        mean_margin = {t: tracked.margins[t].mean(0) for t in current}
        total = {t: total[t] + _ranks(-mean_margin[t]) for t in current}
        current = {t: total[t] / (round_ + 2) for t in current}
        counts = {t: mixture_count(mean_margin[t]) for t in current}
    index = pd.Index(data.sample_id.numpy(), name="sample_id")
    frames = {}
    for task in current:
        frames[task] = pd.DataFrame(
            {"score": current[task], "refit_margin": mean_margin[task], "hidden": hidden[task]}, index=index
        )
    return frames
