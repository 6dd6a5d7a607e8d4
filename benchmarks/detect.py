"""Noisy-label detection benchmark: every sgs_lab detector and every baseline against injected label noise.

    .venv/bin/python benchmarks/detect.py                  # the full grid below, 3 seeds (about 15-25 min, 2 cores)
    .venv/bin/python benchmarks/detect.py --quick          # 1 seed, 10 epochs, 2,000 images (a smoke run)
    .venv/bin/python benchmarks/detect.py --settings md-symmetric-0.4 --seeds 1

Grid: MultiDigits (tasks left and right, 10 classes each) with symmetric noise at 20, 40 and 60 % and pair-flip
noise (class c → c + 1) at 20 and 40 %; the digit attributes (binary tasks parity, large, loop) with symmetric noise
at 20 and 40 % (on two classes pair-flip is the same flip, and past 50 % the wrong label is the majority). Noise
hits every task at the same rate.

Per setting and seed (the training options of ``--epochs``, ``--train-size``; Adam 1e-3, batch 128, MLP):
- an equal-weighting (EW) run, whose records give the published baselines: small-loss, AUM, Dataset Cartography
  confidence and variability, GraNd;
- an SGS-weighted run (sgs_lab's default SGS), whose records give the SGS detectors ("sgs@ew": the class-reference
  SGS the EW run records, over all encoder parameters);
- refit from either run ("refit": the EW run the baselines read; "refit@sgs": the SGS-weighted run);
- cleanlab on 4-fold out-of-sample probabilities (``sgs_lab.detect.cross_val_probabilities``, same options).
"sgs+aum" is the rank average of the SGS and AUM scores of the SGS run: the obvious combination, measured to show
what it does. AP and AUROC are per task, averaged over the tasks, then mean ± std over seeds. Seconds are the
detector's own time (scoring; plus its training for refit and cleanlab), not the run's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SETTINGS = {
    "md-symmetric-0.2": ("md", "symmetric", 0.2),
    "md-symmetric-0.4": ("md", "symmetric", 0.4),
    "md-symmetric-0.6": ("md", "symmetric", 0.6),
    "md-pairflip-0.2": ("md", "pairflip", 0.2),
    "md-pairflip-0.4": ("md", "pairflip", 0.4),
    "attr-symmetric-0.2": ("attr", "symmetric", 0.2),
    "attr-symmetric-0.4": ("attr", "symmetric", 0.4),
}
OURS = ["refit", "refit@sgs", "sgs", "sgs@ew", "sgs_min", "sgs_early", "sgs_negative", "sgs_weight", "sgs+aum"]
BASELINES = ["loss", "aum", "confidence", "variability", "grand", "cleanlab"]
ATTRIBUTE_TASKS = ["parity", "large", "loop"]


def _data(dataset: str, kind: str, rate: float, seed: int, train_size: int):
    from sgs_lab.data import make_digit_attributes, make_multidigits

    if dataset == "md":
        train, test = make_multidigits(train_size, 1000, seed=seed)
    else:  # the bundled digits: 1,258 training images whatever train_size says
        train, test = make_digit_attributes(seed=seed)
        train, test = train.only(ATTRIBUTE_TASKS), test.only(ATTRIBUTE_TASKS)
    return train.with_noise(rate, kind=kind, seed=seed), test


def _scored(name: str, rankings: dict, truth, seconds: float, run: str) -> list[dict]:
    from sgs_lab.detect._evaluate import _ranking_metrics

    rows = []
    for task, ranking in rankings.items():
        metrics = _ranking_metrics(ranking, truth)
        rows.append({"method": name, "run": run, "task": task, "seconds": seconds,
                     **{k: metrics[k] for k in ("auroc", "ap", "precision", "recall", "true_rate",
                                                "estimated_rate")}})  # fmt: skip
    return rows


def _timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _rank_average(first: dict, second: dict) -> dict:
    """Per task: the ranking of the mean of the two methods' percentile ranks (flags: the first's count)."""
    combined = {}
    for task, a in first.items():
        b = second[task].set_index("sample_id")["score"]
        a = a.set_index("sample_id")
        score = a["score"].rank(pct=True) + b.reindex(a.index).rank(pct=True)
        frame = a.assign(score=score).sort_values("score", ascending=False).reset_index()
        frame["flagged"] = frame.index < int(a["flagged"].sum())
        frame.attrs.update(method="sgs+aum", task=task)
        combined[task] = frame
    return combined


def _one(job: tuple) -> list[dict]:
    setting, seed, options = job
    import pandas as pd
    import torch

    from sgs_lab.detect import cross_val_probabilities, noise_mask
    from sgs_lab.detect._find import rank_tasks
    from sgs_lab.train import TrainConfig, fit

    torch.set_num_threads(1)
    dataset, kind, rate = SETTINGS[setting]
    train, test = _data(dataset, kind, rate, seed, options["train_size"])
    config = TrainConfig(epochs=options["epochs"], batch_size=128, seed=seed)
    tasks = list(train.tasks)
    runs, train_seconds = {}, {}
    for method in ("ew", "sgs"):
        run_config = dataclasses.replace(config, method=method)
        result, train_seconds[method] = _timed(lambda c=run_config: fit(train, test, c, progress=False))
        runs[method] = pd.DataFrame(result.sink.samples())
    truth = noise_mask(runs["ew"])
    rows = []

    def detect(method: str, run: str, record: bool = True, **extra):
        rankings, seconds = _timed(lambda: rank_tasks(runs[run], tasks, combined=False, method=method, **extra))
        if record:
            rows.extend(_scored(method, rankings, truth, seconds, run))
        return rankings, seconds

    for method in ["loss", "aum", "confidence", "variability", "grand"]:
        detect(method, "ew")
    sgs, sgs_seconds = detect("sgs", "sgs")
    for method in ["sgs_min", "sgs_early", "sgs_negative", "sgs_weight"]:
        detect(method, "sgs")
    rankings, seconds = detect("sgs", "ew", record=False)  # every run records class-reference SGS (EW: all scope)
    rows.extend(_scored("sgs@ew", rankings, truth, seconds, "ew"))
    aum_of_sgs_run, aum_seconds = detect("aum", "sgs", record=False)
    rows.extend(_scored("sgs+aum", _rank_average(sgs, aum_of_sgs_run), truth, sgs_seconds + aum_seconds, "sgs"))
    detect("refit", "ew", data=train, config=config)
    rankings, seconds = detect("refit", "sgs", record=False, data=train, config=config)
    rows.extend(_scored("refit@sgs", rankings, truth, seconds, "sgs"))
    probs, cv_seconds = _timed(lambda: cross_val_probabilities(train, config=config, folds=4))
    rankings, seconds = _timed(lambda: rank_tasks(runs["ew"], tasks, combined=False, method="cleanlab",
                                                  pred_probs=probs))  # fmt: skip
    rows.extend(_scored("cleanlab", rankings, truth, cv_seconds + seconds, "cv"))
    base = {"setting": setting, "dataset": dataset, "noise_kind": kind, "rate": rate, "seed": seed,
            "train_size": len(train), "epochs": config.epochs, "seconds_ew_run": train_seconds["ew"],
            "seconds_sgs_run": train_seconds["sgs"]}  # fmt: skip
    return [{**base, **row} for row in rows]


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict], settings: list[str], metric: str) -> dict:
    """{(method, setting): (mean, std)} over seeds of the per-seed task mean of ``metric``."""
    cells = {}
    for method in OURS + BASELINES:
        for setting in settings:
            per_seed = {}
            for r in rows:
                if r["method"] == method and r["setting"] == setting:
                    per_seed.setdefault(r["seed"], []).append(r[metric])
            cells[method, setting] = _mean_std([statistics.fmean(v) for v in per_seed.values()])
    return cells


def _print_table(cells: dict, settings: list[str], title: str) -> None:
    print(f"\n{title}")
    print(f"{'method':>13} " + " ".join(f"{s:>19}" for s in settings))
    for method in OURS + BASELINES:
        cells_of = (f"{cells[method, s][0]:>10.3f} ± {cells[method, s][1]:.3f}" for s in settings)
        print(f"{method:>13} " + " ".join(cells_of))


def verdicts(cells: dict, settings: list[str]) -> list[str]:
    """Per setting: does the best sgs_lab detector match (within one seed std, the larger of the two) or beat the
    best baseline?"""
    lines = []
    for s in settings:
        ours = max(OURS, key=lambda m: cells[m, s][0])
        base = max(BASELINES, key=lambda m: cells[m, s][0])
        (mo, so), (mb, sb) = cells[ours, s], cells[base, s]
        verdict = "beats" if mo > mb + max(so, sb) else "matches" if mo >= mb - max(so, sb) else "MISSES"
        lines.append(f"{s}: {ours} {mo:.3f} ± {so:.3f} {verdict} {base} {mb:.3f} ± {sb:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=6000, help="MultiDigits training images")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--csv", default="benchmarks/detect_results.csv")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs, 2,000 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_size = 1, 10, 2000
    options = {"epochs": args.epochs, "train_size": args.train_size}
    jobs = [(s, seed, options) for s in args.settings for seed in range(args.seeds)]
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = [row for rows in tqdm(pool.map(_one, jobs), total=len(jobs), desc="settings × seeds") for row in rows]
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ap, auroc = summarise(rows, args.settings, "ap"), summarise(rows, args.settings, "auroc")
    _print_table(ap, args.settings, "average precision (mean ± std over seeds)")
    _print_table(auroc, args.settings, "AUROC (mean ± std over seeds)")
    seconds = summarise(rows, args.settings, "seconds")
    rate = summarise(rows, args.settings, "estimated_rate")
    print("\nseconds per detector (mean over settings and seeds; scoring, plus training for refit and cleanlab):")
    for method in OURS + BASELINES:
        print(f"{method:>13} {statistics.fmean(seconds[method, s][0] for s in args.settings):8.2f}   estimated "
              "rate " + " ".join(f"{rate[method, s][0]:.2f}" for s in args.settings))  # fmt: skip
    print("\n" + "\n".join(verdicts(ap, args.settings)))
    runs = [r for r in rows if r["method"] == "loss"]
    print(f"\nruns: EW {statistics.fmean(r['seconds_ew_run'] for r in runs):.1f} s, SGS "
          f"{statistics.fmean(r['seconds_sgs_run'] for r in runs):.1f} s on average; wall {time.perf_counter() - started:.0f} s; "
          f"rows in {args.csv}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
