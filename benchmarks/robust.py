"""Robustness benchmark: test accuracy and Δm% of SGS against the baselines on MultiDigits with label noise.

    .venv/bin/python benchmarks/robust.py                    # noise {0, .2, .4, .6} × methods × 3 seeds
    .venv/bin/python benchmarks/robust.py --quick            # fewer epochs and samples, 1 seed (a smoke run)
    .venv/bin/python benchmarks/robust.py --methods ew sgs --noise 0.6 --csv out.csv

Every run trains from the same seeded data and initialisation; Δm% is measured against single-task EW runs with
the same noise and seed (``sgs_lab.train.delta_m``: mean relative accuracy change, positive = better). Runs go to
worker processes with one thread each (small models: two single-threaded runs beat one two-threaded run).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

DEFAULT_METHODS = ["ew", "sgs", "sgs-a2-w2", "sgs-relu", "sgs-all", "uw", "pcgrad", "mgda", "imtlg", "famo"]
# named variants: the method name on the left, its knobs on the right
VARIANTS = {
    "sgs-a2-w2": ("sgs", {"alpha": 2.0, "warmup": 2}),
    "sgs-relu": ("sgs", {"sample_rule": "relu", "warmup": 2}),
    "sgs-all": ("sgs", {"scope": "all", "alpha": 2.0, "warmup": 2}),
    "sgs-loo": ("sgs", {"reference": "loo"}),
    "sgs-class": ("sgs", {"reference": "class"}),
    "sgs-ema": ("sgs", {"reference": "ema"}),
    "sgs-softmax": ("sgs", {"sample_rule": "softmax", "temperature": 0.1}),
    "sgs-affine4": ("sgs", {"alpha": 4.0}),
    "sgs-a2-w5": ("sgs", {"alpha": 2.0}),
    "sgs-a1-w2": ("sgs", {"warmup": 2}),
    "sgs-notask": ("sgs", {"task_rule": "none"}),
    "sgs-coherence": ("sgs", {"task_rule": "coherence"}),
}


def _one(job: tuple) -> dict:
    label, noise, seed, tasks, sizes = job
    import torch

    from sgs_lab.data import make_multidigits
    from sgs_lab.train import TrainConfig, fit

    torch.set_num_threads(1)
    method, knobs = VARIANTS.get(label, (label, {}))
    train, test = make_multidigits(sizes["train"], sizes["test"], seed=seed)
    train = train.with_noise(noise, seed=seed)
    if tasks is not None:
        train, test = train.only(tasks), test.only(tasks)
    config = TrainConfig(method=method, knobs=knobs, epochs=sizes["epochs"], batch_size=128, seed=seed)
    started = time.perf_counter()
    result = fit(train, test, config, progress=False)
    seconds = time.perf_counter() - started
    accuracy = {k: v for k, v in result.test_metrics.items() if k.endswith("accuracy")}
    return {"method": label, "noise": noise, "seed": seed, "tasks": ",".join(tasks or ["left", "right"]),
            "seconds_per_epoch": seconds / sizes["epochs"], **accuracy}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from sgs_lab.train import delta_m
    from sgs_lab.weighting import available_methods

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--csv", default="robust.csv")
    parser.add_argument("--quick", action="store_true", help="5 epochs, 1,500 samples, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.seeds = 5, 1500, 1
    known = set(available_methods())
    methods = [m for m in args.methods if VARIANTS.get(m, (m,))[0] in known]
    for skipped in sorted(set(args.methods) - set(methods)):
        print(f"skipping {skipped}: not available here (see sgs_lab.weighting.available_methods)", file=sys.stderr)
    sizes = {"train": args.train_size, "test": args.test_size, "epochs": args.epochs}
    jobs = [(m, n, s, None, sizes) for n in args.noise for s in range(args.seeds) for m in methods]
    jobs += [("ew", n, s, [t], sizes) for n in args.noise for s in range(args.seeds) for t in ("left", "right")]
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(_one, jobs), total=len(jobs), desc="runs"))
    single = {(r["noise"], r["seed"]): {} for r in rows if r["tasks"] != "left,right"}
    for r in rows:
        if r["tasks"] != "left,right":
            single[(r["noise"], r["seed"])].update({k: v for k, v in r.items() if k.endswith("accuracy")})
    multi = [r for r in rows if r["tasks"] == "left,right"]
    for r in multi:
        accuracy = {k: v for k, v in r.items() if k.endswith("accuracy")}
        r["mean_accuracy"] = statistics.fmean(accuracy.values())
        r["delta_m"] = delta_m(accuracy, single[(r["noise"], r["seed"])])
    columns = ["method", "noise", "seed", "left/accuracy", "right/accuracy", "mean_accuracy", "delta_m", "seconds_per_epoch"]
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(multi)
    print(f"\n{'method':>14} " + " ".join(f"{'noise ' + str(n):>16}" for n in args.noise) + "   Δm% (per noise)        s/epoch")
    for m in methods:
        cells, deltas, secs = [], [], []
        for n in args.noise:
            runs = [r for r in multi if r["method"] == m and r["noise"] == n]
            acc = [r["mean_accuracy"] for r in runs]
            spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.fmean(acc):.3f} ± {spread:.3f}")
            deltas.append(f"{statistics.fmean(r['delta_m'] for r in runs):+.1f}")
            secs += [r["seconds_per_epoch"] for r in runs]
        print(f"{m:>14} " + " ".join(f"{c:>16}" for c in cells) + "   " + " ".join(deltas) + f"   {statistics.fmean(secs):.2f}")
    print(f"\nmean test accuracy over both tasks (mean ± std over {args.seeds} seed(s)); rows in {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
