"""Per-sample noisy-label scores from one task's training records (higher = more likely mislabelled), and the flags.

Every function takes ``rows``: one task's records, one row per (epoch, sample_id) with the columns it names, and
returns a DataFrame indexed by sample_id (sorted) with ``score`` and the evidence behind it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

EARLY_FRACTION = 0.25  # "early" = the first quarter of the recorded epochs (at least one), as for GraNd and SGS-early


def early_epochs(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the first ``EARLY_FRACTION`` of the recorded epochs (at least the first epoch)."""
    epochs = np.sort(rows["epoch"].unique())
    keep = epochs[: max(1, math.ceil(EARLY_FRACTION * len(epochs)))]
    return rows[rows["epoch"].isin(keep)]


def _by_sample(rows: pd.DataFrame, column: str):
    return rows.groupby("sample_id", sort=True)[column]


def small_loss(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean training loss over the epochs (the small-loss criterion: clean labels are learnt first)."""
    loss = _by_sample(rows, "loss").mean()
    return pd.DataFrame({"score": loss, "mean_loss": loss})


def area_under_margin(rows: pd.DataFrame) -> pd.DataFrame:
    """AUM (Pleiss et al. 2020): minus the mean over epochs of the given label's logit minus the largest other."""
    margin = _by_sample(rows, "margin").mean()
    return pd.DataFrame({"score": -margin, "aum": margin})


def _cartography(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    grouped = _by_sample(rows, "p_label")
    return grouped.mean(), grouped.std(ddof=0)  # population std over epochs, as in Swayamdipta et al. 2020


def cartography_confidence(rows: pd.DataFrame) -> pd.DataFrame:
    """Dataset Cartography: 1 − confidence, the mean probability of the given label over epochs."""
    confidence, variability = _cartography(rows)
    return pd.DataFrame({"score": 1.0 - confidence, "confidence": confidence, "variability": variability})


def cartography_variability(rows: pd.DataFrame) -> pd.DataFrame:
    """Dataset Cartography: variability, the std over epochs of the given label's probability (ambiguity)."""
    confidence, variability = _cartography(rows)
    return pd.DataFrame({"score": variability, "confidence": confidence, "variability": variability})


def grand(rows: pd.DataFrame) -> pd.DataFrame:
    """GraNd (Paul et al. 2021): the per-sample gradient norm (the engine's exact ``grad_norm``), early epochs."""
    norm = _by_sample(early_epochs(rows), "grad_norm").mean()
    return pd.DataFrame({"score": norm, "grand": norm})


def sgs_mean(rows: pd.DataFrame) -> pd.DataFrame:
    """Minus the mean over epochs of the class-reference SGS (cosine to the mean gradient of its labelled class)."""
    sgs = _by_sample(rows, "sgs_class").mean()
    return pd.DataFrame({"score": -sgs, "sgs_mean": sgs})


def sgs_min(rows: pd.DataFrame) -> pd.DataFrame:
    """Minus the lowest class-reference SGS over epochs."""
    sgs = _by_sample(rows, "sgs_class").min()
    return pd.DataFrame({"score": -sgs, "sgs_min": sgs})


def sgs_early(rows: pd.DataFrame) -> pd.DataFrame:
    """Minus the mean class-reference SGS over the early epochs (before the network memorises wrong labels)."""
    sgs = _by_sample(early_epochs(rows), "sgs_class").mean()
    return pd.DataFrame({"score": -sgs, "sgs_early": sgs})


def sgs_negative(rows: pd.DataFrame) -> pd.DataFrame:
    """The fraction of epochs with a negative class-reference SGS; ties broken by the mean SGS.

    The tie-break is scaled below half a step of the fraction (1 / epochs), so it never reorders two fractions.
    """
    sgs = _by_sample(rows, "sgs_class")
    fraction = (rows["sgs_class"] < 0).groupby(rows["sample_id"], sort=True).mean()
    mean = sgs.mean()
    steps = max(int(sgs.count().max()), 1)
    return pd.DataFrame({"score": fraction - mean / (4 * steps), "negative_fraction": fraction, "sgs_mean": mean})


def sgs_weight(rows: pd.DataFrame) -> pd.DataFrame:
    """Minus the mean SGS sample weight over the weighted epochs of a run trained with SGS weighting."""
    spread = rows.groupby("epoch")["weight"].agg(lambda w: float(np.nanmax(w) - np.nanmin(w)))
    weighted = spread.index[spread > 1e-6]  # warm-up epochs (all weights 1) carry no verdict
    if len(weighted) == 0:
        raise ValueError(
            "the run's sample weights are all uniform (equal weighting, or only warm-up epochs): "
            "'sgs_weight' needs a run trained with SGS weighting past its warm-up"
        )
    weight = _by_sample(rows[rows["epoch"].isin(weighted)], "weight").mean()
    return pd.DataFrame({"score": -weight, "mean_weight": weight})


def common_evidence(rows: pd.DataFrame) -> pd.DataFrame:
    """Per sample: given_label, suggested_label, aum, disagreement (fraction of epochs predicting another class).

    suggested_label is the class the model predicted most often in the epochs where it disagreed with the given
    label (early in training the network predicts the true class of most wrong labels), or the given label when it
    never disagreed.
    """
    grouped = rows.groupby("sample_id", sort=True)
    given = grouped["label"].first().astype(np.int64)
    disagree = rows["pred"].to_numpy() != rows["label"].to_numpy()
    others = rows[disagree]
    alternative = others.groupby(["sample_id", "pred"]).size().reset_index(name="count")
    alternative = alternative.sort_values(["sample_id", "count", "pred"], ascending=[True, False, True])
    alternative = alternative.drop_duplicates("sample_id").set_index("sample_id")["pred"]
    suggested = alternative.reindex(given.index).fillna(given).astype(np.int64)
    fraction = pd.Series(disagree, index=rows.index).groupby(rows["sample_id"], sort=True).mean()
    return pd.DataFrame(
        {"given_label": given, "suggested_label": suggested, "aum": grouped["margin"].mean(), "disagreement": fraction}
    )


def mixture_count(values) -> int:
    """How many of ``values`` fall in the low component of a two-component Gaussian mixture fitted to them.

    Wrong labels form their own low-margin mode (DivideMix does the same on losses). The cut is where the low
    component's posterior drops to one half between the two means, so both tails stay on their own side. When the
    low component's mean is not below 0 it is not a mode of wrong labels (a clean run still splits into easy and
    hard samples), and so with fewer than 4 distinct values: then the count is that of the negative values.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(np.unique(x)) < 4:
        return int((x < 0).sum())
    mixture = GaussianMixture(2, random_state=0).fit(x[:, None])
    low, high = np.sort(mixture.means_.ravel())
    if low >= 0:
        return int((x < 0).sum())
    grid = np.linspace(low, high, 512)[:, None]
    posterior = mixture.predict_proba(grid)[:, int(np.argmin(mixture.means_.ravel()))]
    below_half = posterior <= 0.5
    cut = grid[int(np.argmax(below_half)), 0] if below_half.any() else high
    return int((x < cut).sum())


def estimated_count(evidence: pd.DataFrame) -> int:
    """How many labels a run says are wrong: the low-AUM mode of the run (:func:`mixture_count` of the AUM)."""
    return mixture_count(evidence["aum"].to_numpy())


def _top_flags(scores: pd.Series, count: int) -> pd.Series:
    """True for the ``count`` highest scores (ties by sample_id); NaN scores are never flagged."""
    order = scores.fillna(-np.inf).sort_values(ascending=False, kind="stable").index
    flagged = pd.Series(False, index=scores.index)
    flagged.loc[order[: max(count, 0)]] = True
    return flagged & scores.notna()


def flags(scores: pd.Series, estimate: int, threshold: float | None, rate: float | None) -> pd.Series:
    """The flagged labels: scores at or above ``threshold``, else the top ``rate`` fraction, else the top
    ``estimate``."""
    if threshold is not None and rate is not None:
        raise ValueError("give either threshold or rate, not both")
    if threshold is not None:
        return scores >= threshold
    if rate is not None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1]; got {rate}")
        return _top_flags(scores, round(rate * scores.notna().sum()))
    return _top_flags(scores, estimate)
