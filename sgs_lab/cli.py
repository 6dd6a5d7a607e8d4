"""The ``sgs-lab`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__


def _check(args: argparse.Namespace) -> int:
    """Compare the engine with the per-sample loop oracle on a small model, on the chosen device."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from .grads import SampleGradients
    from .testing import compare_stats, oracle_stats

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])
    encoder, heads = encoder.double().to(device), heads.double().to(device)
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64, device=device)
    ys = [torch.randint(0, 3, (12,), device=device) for _ in heads]
    worst = 0.0
    for backend in ("auto", "batched"):
        probe = SampleGradients(encoder, backend=backend)
        for reference in ("batch", "loo", "class"):
            with probe.capture():
                z = encoder(x)
            losses = {f"task{t}": F.cross_entropy(h(z), y, reduction="none") for t, (h, y) in enumerate(zip(heads, ys))}
            labels = dict(zip(losses, ys))
            stats = probe.compute(losses, labels=labels, reference=reference)
            errors = compare_stats(stats, oracle_stats(losses, list(encoder.parameters()), labels, reference))
            worst = max(worst, *errors.values())
            print(f"{backend:8s} {reference:6s} max error {max(errors.values()):.2e}")
    print(f"engine agrees with the loop oracle on {device} (float64): max error {worst:.2e}")
    return 0


def fast() -> bool:
    """True when ``SGS_LAB_FAST`` is set to anything but ``""`` or ``"0"``: every default run is then tiny."""
    return os.environ.get("SGS_LAB_FAST", "").strip() not in ("", "0")


def _defaults() -> dict:
    """Run sizes; SGS_LAB_FAST=1 shrinks them so the demo and tests take seconds."""
    if fast():
        return {"epochs": 3, "train_size": 600, "test_size": 300}
    return {"epochs": 30, "train_size": 6000, "test_size": 2000}


SGS_KNOBS = {  # CLI option → (knob name, type, help)
    "reference": (str, "what a sample's gradient is compared with: batch | loo | class | ema"),
    "scope": (str, "where gradients live: all (every encoder parameter) | last (its last layer) | output (z_i)"),
    "similarity": (str, "cosine (scale-free) | dot"),
    "sample_rule": (str, "sample weights from similarities: relu | softmax | affine"),
    "temperature": (float, "softmax sample-rule temperature τ"),
    "alpha": (float, "affine sample-rule slope α: w = max(0, 1 + α·s)"),
    "task_rule": (str, "task weights: consistency (softmax of mean similarity) | coherence | none"),
    "task_temperature": (float, "consistency task-rule temperature τ_T"),
    "warmup": (int, "epochs with uniform weights before SGS weighting starts"),
    "ema_decay": (float, "decay of the EMA reference (with --reference ema)"),
}


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a noise rate must lie in [0, 1); got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    d = _defaults()
    parser.add_argument("--noise", type=_rate, default=0.0, help="symmetric label-noise rate on every task, in [0, 1)")
    parser.add_argument("--noise-kind", default="symmetric", choices=["symmetric", "pairflip"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=_positive, default=d["epochs"])
    parser.add_argument("--batch-size", type=_positive, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model", default="mlp", choices=["mlp", "lenet"])
    parser.add_argument("--train-size", type=_positive, default=d["train_size"])
    parser.add_argument("--test-size", type=_positive, default=d["test_size"])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:1 …")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    parser.add_argument("--checkpoint-every", type=_positive, default=50, metavar="N",
                        help="commit records and a checkpoint every N steps (and at each epoch end)")  # fmt: skip
    parser.add_argument("--float16", action="store_true", help="store per-sample statistics as float16 (half size)")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="model and statistics")


def _data(args):
    from .data import make_multidigits

    train, test = make_multidigits(args.train_size, args.test_size, seed=args.seed)
    return train.with_noise(args.noise, kind=args.noise_kind, seed=args.seed), test


def _config(args, method: str, knobs: dict):
    from .train import TrainConfig

    return TrainConfig(
        method=method, knobs=knobs, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, bf16=args.bf16, optimizer=args.optimizer, dtype=args.dtype,
    )  # fmt: skip


RUN_OPTIONS = ("noise", "noise_kind", "seed", "epochs", "batch_size", "lr", "model", "train_size", "test_size", "bf16",
               "checkpoint_every", "float16", "optimizer", "dtype", "device")  # fmt: skip


def _run(args, method: str, knobs: dict, out: Path, *, resume: bool = False, tasks=None):
    """One run stored in the cache at ``out`` (see sgs_lab.cache); returns the opened run."""
    from .cache import train_run

    train, test = _data(args)
    if tasks is not None:
        train, test = train.only(tasks), test.only(tasks)
    meta = {"method": method, "knobs": knobs, "seed": args.seed, "noise": {t: args.noise for t in train.tasks},
            "noise_kind": args.noise_kind, "tasks": list(train.tasks),
            "options": {k: getattr(args, k) for k in RUN_OPTIONS}}  # fmt: skip
    return train_run(train, test, _config(args, method, knobs), out, meta=meta, resume=resume,
                     checkpoint_every=args.checkpoint_every, float16=args.float16)  # fmt: skip


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun on ``--nproc`` local processes (gloo on CPU, NCCL on GPUs)."""
    import subprocess

    from .distributed import torchrun_command

    rest, skip = [], False
    for item in argv:  # the same command without --nproc N
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    command = torchrun_command(args.nproc, rest)
    print("running: " + " ".join(command), flush=True)
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))  # no oversubscription
    return subprocess.run(command, env=env).returncode


def _train(args: argparse.Namespace) -> int:
    from . import distributed
    from .cache import CacheError
    from .cache._writer import read_manifest

    if args.nproc > 1:
        return _launch(args, args.argv)
    context = distributed.init(args.device) if distributed.launched_by_torchrun() else None

    knobs = {k: getattr(args, k) for k in SGS_KNOBS if getattr(args, k) is not None}
    if args.clamp is not None:
        knobs["clamp"] = tuple(args.clamp)
    try:
        if args.resume:
            if args.out is not None or knobs:
                raise SystemExit(
                    "sgs-lab train: --resume DIR takes the run's own options; give no --out or SGS options"
                )
            out = Path(args.resume)
            try:
                meta = read_manifest(out)
            except CacheError as exc:
                raise SystemExit(f"sgs-lab train: {out} holds no run ({exc}); start one with --out") from None
            if meta["status"] == "finished":
                raise SystemExit(f"sgs-lab train: the run in {out} has finished; nothing to resume")
            if "options" not in meta:
                raise SystemExit(
                    f"sgs-lab train: the run in {out} was not made by sgs-lab train (it records no command-line "
                    "options); finish it from Python with sgs_lab.cache.get_or_train or train_run(..., resume=True)"
                )
            for key, value in meta["options"].items():
                setattr(args, key, value)
            args.method = meta["method"]
            knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["knobs"].items()}  # JSON made lists
            try:
                run = _run(args, args.method, knobs, out, resume=True, tasks=meta["tasks"])
            except FileNotFoundError as exc:
                raise SystemExit(f"sgs-lab train: {exc} (the run stopped before its first checkpoint: remove it with "
                                 f"sgs-lab cache rm {out} and start it again)") from None  # fmt: skip
        else:
            if knobs and args.method != "sgs":
                options = ", ".join("--" + k.replace("_", "-") for k in knobs)
                raise SystemExit(f"sgs-lab train: {options} apply to --method sgs only")
            if args.out is None:
                raise SystemExit("sgs-lab train: --out DIR is required (or --resume DIR)")
            run = _run(args, args.method, knobs, Path(args.out))
    except (CacheError, ValueError) as exc:
        raise SystemExit(f"sgs-lab train: {exc}") from None
    if context is None or context.rank == 0:
        summary = {"method": args.method, **run.meta["test_metrics"], "seconds": round(run.meta["seconds"], 1)}
        print(json.dumps(summary, indent=1))
    if context is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _stored_or_run(args, method: str, knobs: dict, out: Path, *, tasks=None):
    """The finished run in ``out`` when it was made with these very options (a repeated demo), else a new one."""
    from .cache import CacheError, open_run

    if (out / "manifest.json").exists():
        try:
            run = open_run(out)
        except CacheError as exc:
            raise SystemExit(f"sgs-lab demo: {exc}") from None
        same = run.meta.get("options") == {k: getattr(args, k) for k in RUN_OPTIONS} and run.meta.get("knobs") == knobs
        if run.status == "finished" and same:
            return run
        raise SystemExit(
            f"sgs-lab demo: {out} holds an earlier {run.status} run with other options; remove it "
            f"(sgs-lab cache rm {out}) or choose another --out"
        )
    try:
        return _run(args, method, knobs, out, tasks=tasks)
    except CacheError as exc:
        raise SystemExit(f"sgs-lab demo: {exc}") from None


def _demo(args: argparse.Namespace) -> int:
    from .report import report_runs
    from .train import delta_m

    out = Path(args.out)
    runs, rows = {}, []
    single = {}
    for task in ("left", "right"):  # single-task references for Δm%
        single.update(_stored_or_run(args, "ew", {}, out / f"single-{task}", tasks=[task]).meta["test_metrics"])
    for method in ("ew", "sgs"):
        # short runs (SGS_LAB_FAST) shorten the warm-up too, or SGS would never leave it
        knobs = {"warmup": min(5, max(1, args.epochs // 6))} if method == "sgs" else {}
        run = runs[method] = _stored_or_run(args, method, knobs, out / method)
        accuracy = {k: v for k, v in run.meta["test_metrics"].items() if k.endswith("accuracy")}
        rows.append({"method": method, **{k.split("/")[0]: v for k, v in accuracy.items()},
                     "Δm% vs single-task": delta_m(accuracy, single), "seconds": round(run.meta["seconds"], 1)})  # fmt: skip
    report = report_runs(runs, out / "report.html", "sgs_lab demo: MultiDigits, 40 % symmetric label noise", rows)
    width = max(len(c) for c in rows[0])
    print(" ".join(f"{c:>{width}}" for c in rows[0]))
    for row in rows:
        print(" ".join(f"{v:>{width}.3f}" if isinstance(v, float) else f"{v!s:>{width}}" for v in row.values()))
    print(f"report: {report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .cache import CacheError, find_runs, open_run
    from .report import report_runs

    root = Path(args.dir)
    try:
        paths = find_runs(root)
        if not paths:
            raise SystemExit(f"sgs-lab report: no runs under {root}")
        runs = {}
        for path in paths:
            try:
                runs[str(path.relative_to(root)) if path != root else path.name] = open_run(path)
            except CacheError as exc:  # one unreadable run does not sink the report of the others
                print(f"skipped: {exc}", file=sys.stderr)
        if not runs:
            raise SystemExit(f"sgs-lab report: no readable runs under {root}")
        out = Path(args.out) if args.out else root / "report.html"
        report_runs(runs, out, args.title or f"sgs_lab report: {root}")
    except CacheError as exc:
        raise SystemExit(f"sgs-lab report: {exc}") from None
    print(f"report: {out} ({len(runs)} run(s))")
    return 0


def _size(text: str) -> int:
    """Bytes from 500M, 2G, 10k or a plain number."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    text = text.strip().lower().removesuffix("b")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500M or 2G)") from None


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""  # unreachable


def _show_runs(runs) -> None:
    if runs.empty:
        print("no runs")
        return
    table = runs.assign(size=runs["bytes"].map(_human), age=runs["age_hours"].map(lambda h: f"{h:.1f} h"))
    table = table[["path", "method", "seed", "noise", "status", "epochs", "rows", "size", "age", "test_accuracy"]]
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))


def _cache(args: argparse.Namespace) -> int:
    from .cache import CacheError, gc_runs, list_runs, remove_run

    try:
        if args.action == "ls":
            _show_runs(list_runs(args.root))
        elif args.action == "rm":
            for path in args.runs:
                print(f"removed {path} ({_human(remove_run(path))})")
        else:
            if args.older_than is None and args.status is None and args.max_size is None:
                raise SystemExit("sgs-lab cache gc: give --older-than, --status and/or --max-size")
            removed = gc_runs(args.root, older_than_hours=args.older_than, status=args.status,
                              keep_bytes=args.max_size, dry_run=args.dry_run)  # fmt: skip
            print(("would remove" if args.dry_run else "removed") + f" {len(removed)} run(s), "
                  f"{_human(removed['bytes'].sum())}")  # fmt: skip
            _show_runs(removed)
    except CacheError as exc:
        raise SystemExit(f"sgs-lab cache: {exc}") from None
    return 0


def _add_cache_command(commands) -> None:
    cache = commands.add_parser("cache", help="list and prune stored runs")
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="runs under ROOT: method, status, size, age")
    ls.add_argument("root", metavar="ROOT")
    rm = actions.add_parser("rm", help="remove run directories (never a live one, never a non-run)")
    rm.add_argument("runs", nargs="+", metavar="DIR")
    gc = actions.add_parser("gc", help="remove runs under ROOT by age, status or total size")
    gc.add_argument("root", metavar="ROOT")
    gc.add_argument("--older-than", type=float, metavar="HOURS", help="runs not updated for HOURS")
    gc.add_argument("--status", choices=["interrupted", "finished", "corrupt"], help="runs with this status")
    gc.add_argument("--max-size", type=_size, metavar="SIZE", help="then the oldest runs until the rest fit (e.g. 2G)")
    gc.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    cache.set_defaults(run=_cache)


def main(argv: list[str] | None = None) -> int:
    from .weighting import METHOD_HELP

    parser = argparse.ArgumentParser(
        prog="sgs-lab", description="Per-sample gradient similarity for multitask learning."
    )
    parser.add_argument("--version", action="version", version=f"sgs_lab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="check the engine against the per-sample loop oracle on this machine")
    check.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    check.set_defaults(run=_check)
    methods = "; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items())
    train = commands.add_parser("train", help="one training run on MultiDigits", description=f"Methods — {methods}")
    from .weighting import available_methods

    train.add_argument(
        "--method", default="ew", choices=available_methods(), metavar="M", help="weighting method (see above)"
    )
    train.add_argument("--out", help="run directory (Parquet records, manifest.json, checkpoint)")
    train.add_argument("--resume", metavar="DIR", help="finish the interrupted run in DIR exactly")
    train.add_argument("--nproc", type=_positive, default=1, metavar="N",
                       help="train on N local processes under torchrun (DDP; gloo on CPU, NCCL on GPUs)")  # fmt: skip
    _add_run_options(train)
    sgs = train.add_argument_group("SGS options (DESIGN §2; only with --method sgs)")
    from .weighting._sgs import REFERENCES, SAMPLE_RULES, TASK_RULES

    choices = {"reference": REFERENCES, "sample_rule": SAMPLE_RULES, "task_rule": TASK_RULES,
               "scope": ("all", "last", "output"), "similarity": ("cosine", "dot")}  # fmt: skip
    for knob, (kind, help_text) in SGS_KNOBS.items():
        sgs.add_argument(
            f"--{knob.replace('_', '-')}", dest=knob, type=kind, default=None, help=help_text, choices=choices.get(knob)
        )
    sgs.add_argument("--clamp", type=float, nargs=2, metavar=("LO", "HI"), help="clamp sample weights, renormalise")
    train.set_defaults(run=_train)
    demo = commands.add_parser("demo", help="EW vs SGS at 40 %% label noise: runs, report.html and a summary table")
    demo.add_argument("--out", required=True, help="directory for the runs and report.html")
    _add_run_options(demo)
    demo.set_defaults(noise=0.4)
    demo.set_defaults(run=_demo)
    _add_cache_command(commands)
    from .detect.cli import add_detect_command

    add_detect_command(commands)
    report = commands.add_parser("report", help="one self-contained HTML page of the runs in DIR (a run or a root)")
    report.add_argument("dir", metavar="DIR")
    report.add_argument("--out", help="the HTML file (default: DIR/report.html)")
    report.add_argument("--title")
    report.set_defaults(run=_report)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
