"""Noisy-label detection: every score against a direct computation, the flags, the metrics against scikit-learn,
real detection on a short noisy run, acting on the verdict, the command line and the refusals."""

import argparse
import builtins
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from sgs_lab.data import make_multidigits
from sgs_lab.detect import (
    METHODS,
    clean_and_retrain,
    clean_labels,
    cross_val_probabilities,
    detection_metrics,
    evaluate_detection,
    evaluate_ranking,
    find_noisy,
)
from sgs_lab.detect._crossval import train_and_track
from sgs_lab.detect._scores import mixture_count
from sgs_lab.detect.cli import add_detect_command
from sgs_lab.train import TrainConfig, fit

EPOCHS, SAMPLES = 4, 9


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    """Hand-built records of two tasks over four epochs: samples 6, 7, 8 of task "a" are wrong (low margins)."""
    rng = np.random.default_rng(0)
    rows = []
    for epoch in range(EPOCHS):
        for task in ("a", "b"):
            for i in range(SAMPLES):
                wrong = task == "a" and i >= 6
                label = i % 3
                rows.append({
                    "epoch": epoch, "step": epoch, "task": task, "sample_id": 100 + i, "label": float(label),
                    "clean_label": float((label + 1) % 3 if wrong else label), "noisy": wrong, "present": True,
                    "pred": float((label + 1) % 3 if wrong and epoch < 3 else label),
                    "p_label": rng.uniform(0.05, 0.4) if wrong else rng.uniform(0.5, 1.0),
                    "margin": rng.normal(-3.0, 0.3) if wrong else rng.normal(3.0, 0.3),
                    "loss": rng.uniform(1.0, 3.0) if wrong else rng.uniform(0.0, 0.8),
                    "sgs": rng.uniform(-1, 1), "sgs_batch": rng.uniform(-1, 1), "sgs_class": rng.uniform(-1, 1),
                    "grad_norm": rng.uniform(0, 5), "weight": 1.0 if epoch == 0 else rng.uniform(0, 2),
                    "conflict": rng.uniform(-1, 1),
                })  # fmt: skip
    return pd.DataFrame(rows)


def _direct(records: pd.DataFrame, task: str, method: str) -> dict[int, float]:
    """Each score computed sample by sample, straight from its definition."""
    scores = {}
    for sid in sorted(records["sample_id"].unique()):
        own = records[(records["task"] == task) & (records["sample_id"] == sid)].sort_values("epoch")
        first = own[own["epoch"] < math.ceil(EPOCHS / 4)]
        sgs = own["sgs_class"].to_numpy()
        scores[sid] = {
            "loss": own["loss"].mean(),
            "aum": -own["margin"].mean(),
            "confidence": 1 - own["p_label"].mean(),
            "variability": np.std(own["p_label"].to_numpy()),
            "grand": first["grad_norm"].mean(),
            "sgs": -sgs.mean(),
            "sgs_min": -sgs.min(),
            "sgs_early": -first["sgs_class"].mean(),
            "sgs_negative": np.mean(sgs < 0) - sgs.mean() / (4 * EPOCHS),
            "sgs_weight": -own[own["epoch"] >= 1]["weight"].mean(),  # epoch 0 is warm-up: all weights 1
        }[method]
    return scores


IN_RUN = ["loss", "aum", "confidence", "variability", "grand", "sgs", "sgs_min", "sgs_early", "sgs_negative",
          "sgs_weight"]  # fmt: skip


@pytest.mark.parametrize("method", IN_RUN)
def test_each_score_matches_its_definition(records, method):
    for task in ("a", "b"):
        ranked = find_noisy(records, task, method=method)
        expected = _direct(records, task, method)
        got = dict(zip(ranked["sample_id"], ranked["score"]))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert list(ranked["score"]) == sorted(ranked["score"], reverse=True)  # most suspect first
        assert ranked["flagged"].sum() == (3 if task == "a" else 0) or method != "aum"


def test_flags_follow_the_estimate_a_rate_or_a_threshold(records):
    ranked = find_noisy(records, "a", method="aum")
    aum = records[records["task"] == "a"].groupby("sample_id")["margin"].mean()
    assert ranked["flagged"].sum() == mixture_count(aum.to_numpy()) == 3  # the low-margin mode: samples 6, 7, 8
    assert set(ranked[ranked["flagged"]]["sample_id"]) == {106, 107, 108}
    assert list(ranked["flagged"]) == [True] * 3 + [False] * 6  # the flags are the top of the ranking
    by_rate = find_noisy(records, "a", method="loss", rate=5 / 9)
    assert by_rate["flagged"].sum() == 5 and by_rate["flagged"].iloc[:5].all()
    by_threshold = find_noisy(records, "a", method="loss", threshold=1.0)
    assert (by_threshold["flagged"] == (by_threshold["score"] >= 1.0)).all()
    with pytest.raises(ValueError, match="either threshold or rate"):
        find_noisy(records, "a", method="loss", rate=0.1, threshold=1.0)


def test_given_and_suggested_labels(records):
    ranked = find_noisy(records, "a", method="aum").set_index("sample_id")
    for sid in range(100, 109):
        label = (sid - 100) % 3
        assert ranked.loc[sid, "given_label"] == label
        # the wrong ones were predicted as label + 1 in three epochs of four; the others never disagreed
        assert ranked.loc[sid, "suggested_label"] == ((label + 1) % 3 if sid >= 106 else label)
        assert ranked.loc[sid, "disagreement"] == pytest.approx(0.75 if sid >= 106 else 0.0)


def test_all_tasks_combined_gives_one_row_per_sample(records):
    per_task = {t: find_noisy(records, t, method="aum").set_index("sample_id") for t in ("a", "b")}
    combined = find_noisy(records, None, method="aum").set_index("sample_id")
    assert sorted(combined.index) == list(range(100, 109))
    for sid, row in combined.iterrows():
        assert row["flagged"] == any(per_task[t].loc[sid, "flagged"] for t in ("a", "b"))
        assert (row["score"] > 0) == row["flagged"]
        assert row[f"score_{row['task']}"] == per_task[row["task"]].loc[sid, "score"]
    assert set(combined[combined["flagged"]]["flagged_tasks"]) == {"a"}


def test_metrics_agree_with_scikit_learn(records):
    rng = np.random.default_rng(1)
    truth, score = rng.random(200) < 0.3, rng.normal(size=200)
    flagged = score > 0.5
    metrics = detection_metrics(truth, score + truth, flagged)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(truth, score + truth))
    assert metrics["ap"] == pytest.approx(average_precision_score(truth, score + truth))
    assert metrics["precision"] == pytest.approx((truth & flagged).sum() / flagged.sum())
    assert metrics["recall"] == pytest.approx((truth & flagged).sum() / truth.sum())
    table = evaluate_detection(records, method="loss").set_index("task")
    for task in ("a", "b"):
        ranked = find_noisy(records, task, method="loss")
        wrong = records[records["task"] == task].groupby("sample_id")["noisy"].first().loc[ranked["sample_id"]]
        if wrong.any():
            assert table.loc[task, "auroc"] == pytest.approx(roc_auc_score(wrong, ranked["score"]))
            assert table.loc[task, "ap"] == pytest.approx(average_precision_score(wrong, ranked["score"]))
        else:  # nothing wrong in task b: nothing to score, but the row says how many were flagged
            assert np.isnan(table.loc[task, "auroc"]) and table.loc[task, "n_noisy"] == 0
    assert table.loc["(all)", "n_noisy"] == 3


class Adapter:
    """Any object with samples(columns=...) and meta is a run."""

    def __init__(self, frame: pd.DataFrame, meta: dict | None = None):
        self.frame, self.meta = frame, meta or {}

    def samples(self, epochs=None, tasks=None, columns=None):
        return self.frame if columns is None else self.frame[columns]


def test_refusals_name_what_is_wrong(records):
    with pytest.raises(ValueError, match=r"unknown detection method 'magic'.*'refit'.*'cleanlab'"):
        find_noisy(records, "a", method="magic")
    with pytest.raises(ValueError, match=r"no task 'c'; its tasks are \['a', 'b'\]"):
        find_noisy(Adapter(records), "c", method="loss")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sgs_class'\] needed by the 'sgs' detector"):
        find_noisy(records.drop(columns="sgs_class"), "a", method="sgs")
    regression = records.assign(margin=np.where(records["task"] == "b", np.nan, records["margin"]))
    with pytest.raises(ValueError, match="task 'b' has no class labels"):
        find_noisy(regression, "b", method="loss")
    with pytest.raises(ValueError, match="sample weights are all uniform"):
        find_noisy(records.assign(weight=1.0), "a", method="sgs_weight")
    with pytest.raises(ValueError, match="needs the run's training set"):
        find_noisy(records, "a", method="refit")
    assert "auto" in METHODS


def test_a_task_without_labelled_samples_is_not_called_missing(records):
    missing = records["task"] == "b"  # every label of task "b" is missing
    unlabelled = records.assign(present=~missing, label=records["label"].mask(missing))
    for run in (unlabelled, Adapter(unlabelled), Adapter(records[records["task"] == "a"], {"tasks": ["a", "b"]})):
        with pytest.raises(ValueError, match=r"task 'b' has no labelled samples.*the tasks with labels are \['a'\]"):
            find_noisy(run, "b", method="loss")
    with pytest.raises(ValueError, match=r"the run has no task 'c'; its tasks are \['a', 'b'\]"):
        find_noisy(unlabelled, "c", method="loss")  # a task the run never had is still called missing
    assert set(find_noisy(unlabelled, None, method="loss")["task"]) == {"a"}  # all tasks: the labelled ones


def test_a_run_without_noise_is_ranked_but_not_evaluated(records):
    clean = records.assign(noisy=False)
    assert len(find_noisy(clean, "a", method="loss")) == SAMPLES  # detection still works
    with pytest.raises(ValueError, match="cannot evaluate: the run has no injected label noise"):
        evaluate_detection(clean, method="loss")
    with pytest.raises(ValueError, match="cannot evaluate: the run records no noise mask"):
        evaluate_ranking(find_noisy(clean, "a", method="loss"), clean.drop(columns="noisy"))


def test_cleanlab_absent_says_how_to_install(records, monkeypatch):
    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name == "cleanlab" or name.startswith("cleanlab."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    with pytest.raises(ImportError, match="pip install cleanlab"):
        find_noisy(records, "a", method="cleanlab", pred_probs={"a": np.full((SAMPLES, 3), 1 / 3)})


def test_cleanlab_scores_are_one_minus_label_quality(records):
    cleanlab_rank = pytest.importorskip("cleanlab.rank")
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=SAMPLES)
    ranked = find_noisy(records, "a", method="cleanlab", pred_probs={"a": probs}).set_index("sample_id")
    labels = np.arange(SAMPLES) % 3
    quality = cleanlab_rank.get_label_quality_scores(labels, probs)
    assert ranked.loc[np.arange(100, 109), "score"].to_numpy() == pytest.approx(1 - quality)
    preferred = probs.argmax(1)
    suggested = ranked.loc[np.arange(100, 109), "suggested_label"].to_numpy()
    assert (suggested == np.where(preferred != labels, preferred, labels)).all()


# -- real training ---------------------------------------------------------------------------------------------------
CONFIG = TrainConfig(epochs=12, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def noisy_run(one_thread):
    """A short SGS-weighted run (about 2 s) on MultiDigits with 40 % symmetric noise on both tasks."""
    train, test = make_multidigits(3000, 200, seed=0)
    train = train.with_noise(0.4, seed=0)
    config = dataclasses.replace(CONFIG, method="sgs", knobs={"warmup": 2})
    return train, test, pd.DataFrame(fit(train, test, config, progress=False).sink.samples())


def test_sgs_detects_injected_noise_on_a_real_run(noisy_run):
    train, _, samples = noisy_run
    table = evaluate_detection(samples, method="sgs", combined=False)
    # chance is 0.5 (AUROC) and 0.4 (AP); measured 0.66-0.68 over seeds, and ±0.01 is the sampling spread here
    assert (table["auroc"] > 0.62).all(), table
    assert (table["ap"] > 0.5).all(), table
    refit = evaluate_detection(samples, method="auto", data=train, config=CONFIG, combined=False)
    assert (refit["method"] == "refit").all() and (refit["auroc"] > 0.8).all(), refit


def test_cross_validation_predicts_each_fold_out_of_sample(noisy_run):
    train = noisy_run[0]
    small = train.subset(torch.arange(200))
    config = dataclasses.replace(CONFIG, epochs=2, batch_size=64)
    probs = cross_val_probabilities(small, config=config, folds=2)
    assert set(probs) == {"left", "right"}
    for frame in probs.values():
        assert list(frame.index) == small.sample_id.tolist() and frame.shape == (200, 10)
        assert np.allclose(frame.sum(axis=1), 1.0, atol=1e-5)
    # a hidden label carries no weight: changing its value leaves the trained model unchanged
    hidden = {"left": np.arange(200) < 50}
    relabelled = dataclasses.replace(small, labels={**small.labels, "left": small.labels["left"].roll(1)})
    relabelled.labels["left"][50:] = small.labels["left"][50:]
    a = train_and_track(small, config=config, hidden=hidden).probs
    b = train_and_track(relabelled, config=config, hidden=hidden).probs
    assert np.array_equal(a["left"], b["left"]) and np.array_equal(a["right"], b["right"])


def test_clean_and_retrain_drops_or_relabels_the_flagged(noisy_run):
    train, test, samples = noisy_run
    suspects = find_noisy(samples, "left", method="aum")
    flagged = suspects[suspects["flagged"]]
    dropped = clean_labels(train, suspects, action="drop")
    assert int((~dropped.present["left"]).sum()) == len(flagged) and dropped.present["right"].all()
    relabelled = clean_labels(train, suspects, action="relabel")
    where = torch.tensor(flagged["sample_id"].to_numpy())  # MultiDigits train ids are positions
    assert relabelled.labels["left"][where].tolist() == flagged["suggested_label"].tolist()
    report = clean_and_retrain(train, test, suspects, action="drop", config=dataclasses.replace(CONFIG, epochs=2),
                               before={"left": 0.2, "right": 0.2}).set_index("task")  # fmt: skip
    assert report.loc["left", "changed"] == len(flagged) and report.loc["right", "changed"] == 0
    assert report.loc["left", "changed_wrong"] == int(train.noisy["left"][where].sum())
    assert report.loc["left", "wrong_after"] < report.loc["left", "wrong_before"]  # the flags are mostly right
    assert report.loc["left", "change"] == pytest.approx(report.loc["left", "accuracy_after"] - 0.2)
    with pytest.raises(ValueError, match="action must be one of"):
        clean_labels(train, suspects, action="burn")


def test_detect_command_through_the_cache(tmp_path, monkeypatch, capsys, one_thread):
    from sgs_lab.cache import open_run
    from sgs_lab.cli import main

    monkeypatch.setenv("SGS_LAB_FAST", "1")
    assert main(["train", "--method", "ew", "--noise", "0.4", "--epochs", "4", "--out", str(tmp_path / "run")]) == 0
    run = open_run(tmp_path / "run")
    frame = run.samples()
    assert find_noisy(run, "left", method="aum").equals(find_noisy(frame, "left", method="aum"))
    parser = argparse.ArgumentParser(prog="sgs-lab")
    add_detect_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["detect", str(tmp_path / "run"), "--task", "left", "--out", str(tmp_path / "s.csv")])
    capsys.readouterr()
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    written = pd.read_csv(tmp_path / "s.csv")
    assert printed.startswith("refit: ")  # the training data is rebuilt from the run's meta
    assert "AUROC" in printed and len(written) == len(frame[frame["task"] == "left"]["sample_id"].unique())
    assert {"sample_id", "score", "flagged", "given_label", "suggested_label"} <= set(written.columns)
    with pytest.raises(SystemExit, match="no task 'middle'; its tasks are"):
        args.run(parser.parse_args(["detect", str(tmp_path / "run"), "--task", "middle", "--out", "x.csv"]))


def test_evaluating_some_tasks_counts_only_their_wrong_labels(records):
    extra = records[records["task"] == "a"].assign(task="c", noisy=lambda f: f["sample_id"] < 103)
    table = pd.concat([records, extra], ignore_index=True)
    result = evaluate_detection(table, ["a", "b"], method="loss")
    combined = result[result["task"] == "(all)"].iloc[0]
    assert combined["n_noisy"] == 3  # samples 6, 7, 8 of task "a"; task "c"'s wrong labels are not ranked here


def test_pred_probs_cover_every_sample_when_a_task_has_missing_labels(records):
    table = records.copy()
    hidden = (table["task"] == "a") & (table["sample_id"] == 101)
    table.loc[hidden, "present"] = False
    table.loc[hidden, ["label", "loss", "margin", "p_label", "weight"]] = np.nan
    probs = np.full((SAMPLES, 3), 1 / 3)
    probs[np.arange(SAMPLES), (np.arange(SAMPLES) + 1) % 3] = 0.9  # every given label looks wrong
    ranked = find_noisy(table, "a", method="cleanlab", pred_probs={"a": probs / probs.sum(1, keepdims=True)})
    assert len(ranked) == SAMPLES - 1 and 101 not in set(ranked["sample_id"])


def test_retraining_options_leave_the_recorded_device_behind():
    from sgs_lab.detect._external import _config

    config = _config({"config": {"method": "sgs", "epochs": 7, "device": "cuda", "lr": 0.01}}, None, pd.DataFrame())
    assert config.device == "auto" and config.epochs == 7 and config.lr == 0.01
