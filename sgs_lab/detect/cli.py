"""``sgs-lab detect RUN --out suspects.csv``: rank a cached run's labels without opening a notebook."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._find import DETECTORS, METHODS


def add_detect_command(subparsers) -> argparse.ArgumentParser:
    """Register ``detect`` on the ``sgs-lab`` sub-command parsers; the handler is the parser's ``run`` default."""
    described = "; ".join(f"{name}: {d.summary}" for name, d in DETECTORS.items())
    parser = subparsers.add_parser(
        "detect",
        help="rank a run's labels, most likely wrong first, into a CSV",
        description=f"Rank the labels of a cached run, most likely mislabelled first. Methods — auto: refit when "
        f"the run's training data can be rebuilt from its meta, else aum; {described}",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory (written by sgs-lab train --out)")
    parser.add_argument("--task", help="the task to check (default: every task, one row per sample)")
    parser.add_argument("--out", required=True, help="CSV file for the ranking")
    parser.add_argument("--method", default="auto", choices=METHODS, metavar="M", help="detector (see above)")
    flag = parser.add_mutually_exclusive_group()
    flag.add_argument("--threshold", type=float, help="flag scores at or above this (default: the method's estimate)")
    flag.add_argument("--rate", type=float, help="flag this fraction of the labels, the top scores")
    parser.add_argument("--top", type=int, default=10, help="how many suspects to print (default 10)")
    parser.set_defaults(run=run_detect)
    return parser


def _open_run(directory: str):
    from ..cache import CacheError, open_run

    if not Path(directory).is_dir():
        raise SystemExit(f"sgs-lab detect: {directory} is not a directory")
    try:
        return open_run(directory)
    except (CacheError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"sgs-lab detect: {directory} holds no readable run ({exc})") from exc


def run_detect(args: argparse.Namespace) -> int:
    """Write the ranking to ``args.out``, print the top suspects and, when the run knows its noise, the scores."""
    from ._evaluate import evaluate_ranking
    from ._find import find_noisy

    run = _open_run(args.run_dir)
    try:
        ranking = find_noisy(run, args.task, method=args.method, threshold=args.threshold, rate=args.rate)
    except (ValueError, ImportError, RuntimeError) as exc:
        raise SystemExit(f"sgs-lab detect: {exc}") from exc
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ranking.to_csv(args.out, index=False)
    where = f"task {args.task}" if args.task else "all tasks combined"
    print(f"{ranking.attrs['method']}: {int(ranking['flagged'].sum())} of {len(ranking)} labels flagged ({where}); "
          f"ranking in {args.out}")  # fmt: skip
    shown = ["sample_id", "task", "score", "given_label", "suggested_label"]
    print(ranking[ranking["flagged"]].head(args.top)[shown].to_string(index=False))
    try:
        metrics = evaluate_ranking(ranking, run)
    except ValueError as exc:  # no ground truth: detection stands, evaluation cannot
        print(exc)
        return 0
    print(f"against the injected noise: AUROC {metrics['auroc']:.3f}, AP {metrics['ap']:.3f}, precision "
          f"{metrics['precision']:.3f} and recall {metrics['recall']:.3f} of the flagged labels")  # fmt: skip
    return 0
