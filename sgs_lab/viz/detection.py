"""Noisy-label detection against injected noise: ROC and precision–recall curves, and one threshold's outcome.

Scores follow ``sgs_lab.detect.find_noisy``: higher means more likely mislabelled. The truth is the records'
``noisy`` column (the labels the noise injection flipped); :func:`with_noise_truth` joins it onto a score table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from ._common import TEMPLATE, color_for, fill_doc, finish, group_label, require, split


def with_noise_truth(
    scores: pd.DataFrame, samples: pd.DataFrame, *, task: str | None = None, sample_id: str = "sample_id"
) -> pd.DataFrame:
    """``scores`` with a boolean ``noisy`` column joined from the records.

    Parameters
    ----------
    scores : pandas.DataFrame
        Scored samples with a ``sample_id`` column (e.g. from ``find_noisy``); with a ``task`` column too, each
        row is matched to that task's label.
    samples : pandas.DataFrame
        Per-sample records with ``task``, ``sample_id`` and ``noisy``.
    task : str or None
        The task whose labels were scored; None with one row per sample: a sample counts as mislabelled when any
        task's label is wrong (as for ``find_noisy(run, None)``).
    sample_id : str
        Column name of the sample id in both frames.

    Returns
    -------
    pandas.DataFrame
        ``scores`` in its own order (any ``noisy`` column it had is replaced).
    """
    require(samples, sample_id, "noisy", "task")
    require(scores, sample_id)
    rows = samples if task is None else samples[samples["task"] == task]
    keys = [sample_id, *(["task"] if "task" in scores.columns else [])]
    truth = rows.assign(task=rows["task"].astype(str)).groupby(keys, sort=False)["noisy"].any().rename("noisy")
    left = scores.drop(columns=["noisy"], errors="ignore")
    joined = left.join(truth, on=keys) if len(keys) == 1 else _join_on_task(left, truth, keys)
    if joined["noisy"].isna().any():
        raise ValueError("some scored samples have no records for this task: cannot tell whether they are noisy")
    return joined.astype({"noisy": bool})


def _join_on_task(scores: pd.DataFrame, truth: pd.Series, keys: list[str]) -> pd.DataFrame:
    """Join on (sample id, task), comparing task names as strings (a categorical column may hold them)."""
    lookup = scores[keys].astype({"task": str})
    noisy = pd.MultiIndex.from_frame(lookup).map(truth.to_dict().get)
    return scores.assign(noisy=np.asarray(noisy, dtype=object))


def flag_outcome(score, truth, threshold: float) -> dict[str, float]:
    """What flagging every sample with ``score >= threshold`` gives against the true noise.

    Parameters
    ----------
    score, truth : array-like
        Scores (higher: more suspect) and whether each label is really wrong.
    threshold : float
        Flag samples scoring at least this.

    Returns
    -------
    dict
        flagged, true_positives, noisy (counts), precision (NaN when nothing is flagged), recall (NaN without
        noisy samples), false_positive_rate (NaN without clean samples).

    Examples
    --------
    >>> flag_outcome([0.9, 0.8, 0.1, 0.7], [True, False, False, True], 0.75)["precision"]
    0.5
    """
    score, truth = np.asarray(score, dtype=float), np.asarray(truth, dtype=bool)
    flagged = score >= threshold
    hits, n_flagged, n_noisy, n_clean = (
        int((flagged & truth).sum()),
        int(flagged.sum()),
        int(truth.sum()),
        int((~truth).sum()),
    )
    ratio = lambda a, b: a / b if b else float("nan")
    return {
        "flagged": n_flagged, "true_positives": hits, "noisy": n_noisy, "precision": ratio(hits, n_flagged),
        "recall": ratio(hits, n_noisy), "false_positive_rate": ratio(n_flagged - hits, n_clean),
    }  # fmt: skip


def _score_frame(data_frame: pd.DataFrame | None, score, truth, color) -> tuple[pd.DataFrame, str, str]:
    """A frame and its score/truth column names, from a frame or from two arrays."""
    if data_frame is None:
        if isinstance(score, str) or isinstance(truth, str):
            raise TypeError("without a data_frame, pass score= and truth= as arrays")
        return (
            pd.DataFrame({"score": np.asarray(score, dtype=float), "noisy": np.asarray(truth, dtype=bool)}),
            "score",
            "noisy",
        )
    require(data_frame, score, truth, color)
    return data_frame, score, truth


def _curves(data_frame, score, truth, color):
    """[(name, position, scores, truth)] per colour group, refusing groups the curves are undefined for."""
    out = []
    for position, (group, rows) in enumerate(split(data_frame, color)):
        values, labels = rows[score].to_numpy(dtype=float), rows[truth].to_numpy(dtype=bool)
        keep = np.isfinite(values)
        values, labels = values[keep], labels[keep]
        name = score if group is None else group_label(color, group)
        if labels.all() or not labels.any():
            raise ValueError(
                f"{name}: the curves need both noisy and clean samples; got {labels.sum()} of {len(labels)} noisy"
            )
        out.append((name, position, values, labels))
    return out


def _operating_point(fig: go.Figure, x: float, y: float, threshold: float) -> None:
    fig.add_scatter(x=[x], y=[y], mode="markers", name=f"score ≥ {threshold:.3g}",
                    marker={"size": 12, "symbol": "x", "color": "black"})  # fmt: skip


@fill_doc
def noise_roc(
    data_frame: pd.DataFrame | None = None,
    score="score",
    truth="noisy",
    *,
    color: str | None = None,
    threshold: float | None = None,
    color_discrete_map: dict | None = None,
    title: str | None = "Noisy-label detection: ROC",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """ROC curve of a noisy-label score against the injected noise; the legend gives each curve's AUROC.

    Parameters
    ----------
    data_frame : pandas.DataFrame or None
        One row per scored sample; None: ``score`` and ``truth`` are arrays.
    score, truth : str or array-like
        Column names (or arrays): the score (higher: more suspect) and whether the label is really wrong.
    color : str or None
        Column whose values get one curve each (e.g. a detection method); None: one curve.
    threshold : float or None
        Marks the point reached by flagging scores ≥ ``threshold`` of the first curve (the last trace).
    {color_discrete_map}
    {layout}

    {returns}
        One ``go.Scatter`` per curve (x: false-positive rate, y: true-positive rate, from
        ``sklearn.metrics.roc_curve``), then the marker if any. A dashed diagonal marks chance.
    """
    frame, score, truth = _score_frame(data_frame, score, truth, color)
    fig = go.Figure()
    curves = _curves(frame, score, truth, color)
    for name, position, values, labels in curves:
        fpr, tpr, _ = roc_curve(labels, values)
        fig.add_scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUROC {roc_auc_score(labels, values):.3f})",
                        line={"color": color_for(name, position, color_discrete_map)})  # fmt: skip
    if threshold is not None:
        outcome = flag_outcome(curves[0][2], curves[0][3], threshold)
        _operating_point(fig, outcome["false_positive_rate"], outcome["recall"], threshold)
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dash", "color": "grey"})
    fig.update_xaxes(title_text="false-positive rate", range=[0, 1])
    fig.update_yaxes(title_text="true-positive rate (recall)", range=[0, 1.02])
    return finish(fig, title=title, template=template, width=width, height=height)


@fill_doc
def noise_pr(
    data_frame: pd.DataFrame | None = None,
    score="score",
    truth="noisy",
    *,
    color: str | None = None,
    threshold: float | None = None,
    color_discrete_map: dict | None = None,
    title: str | None = "Noisy-label detection: precision–recall",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Precision–recall curve of a noisy-label score; the legend gives each curve's average precision (AP).

    Parameters
    ----------
    data_frame : pandas.DataFrame or None
        One row per scored sample; None: ``score`` and ``truth`` are arrays.
    score, truth : str or array-like
        Column names (or arrays): the score (higher: more suspect) and whether the label is really wrong.
    color : str or None
        Column whose values get one curve each (e.g. a detection method); None: one curve.
    threshold : float or None
        Marks the point reached by flagging scores ≥ ``threshold`` of the first curve (the last trace).
    {color_discrete_map}
    {layout}

    {returns}
        One ``go.Scatter`` per curve (x: recall, y: precision, from ``sklearn.metrics.precision_recall_curve``),
        then the marker if any. A dashed line marks chance: the share of noisy samples over all curves.
    """
    frame, score, truth = _score_frame(data_frame, score, truth, color)
    fig = go.Figure()
    curves = _curves(frame, score, truth, color)
    for name, position, values, labels in curves:
        precision, recall, _ = precision_recall_curve(labels, values)
        ap = average_precision_score(labels, values)
        fig.add_scatter(x=recall, y=precision, mode="lines", name=f"{name} (AP {ap:.3f})", line_shape="hv",
                        line={"color": color_for(name, position, color_discrete_map)})  # fmt: skip
    if threshold is not None:
        outcome = flag_outcome(curves[0][2], curves[0][3], threshold)
        _operating_point(fig, outcome["recall"], outcome["precision"], threshold)
    prevalence = float(np.mean(np.concatenate([labels for *_, labels in curves])))
    fig.add_hline(y=prevalence, line_dash="dash", line_color="grey", annotation_text=f"chance {prevalence:.2f}")
    fig.update_xaxes(title_text="recall", range=[0, 1])
    fig.update_yaxes(title_text="precision", range=[0, 1.02])
    return finish(fig, title=title, template=template, width=width, height=height)
