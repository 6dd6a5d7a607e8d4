"""Engine benchmark: the cost of ``SampleGradients.compute()`` and of a whole SGS step against a plain step.

Run from the repository root::

    .venv/bin/python benchmarks/engine.py --quick         # about 2 min on 2 cores (the README's main job)
    .venv/bin/python benchmarks/engine.py                 # full run: more repeats, loop oracle where feasible
    .venv/bin/python benchmarks/engine.py --quick --markdown --csv engine.csv

Every number is a ratio to one *plain multitask step* (forward of encoder + heads, sum of the task mean
losses, backward, SGD step) of the same model and batch, timed in the same process, interleaved with the
variant: these machines are shared and noisy, so absolute times mean little and are printed for reference
only. Peak memory is measured per variant in a fresh subprocess: torch on CPU has no resettable peak counter.
When other jobs share the cores, ``--threads 1`` gives far steadier ratios than the default (all cores): an
OpenMP thread waiting for a preempted sibling slows small operations much more than large ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

import sgs_lab

LABELS = {
    "plain": "plain step (fwd + bwd + SGD)",
    "ghost": "statistics, ghost backend (auto strategy)",
    "ghost-gram": "statistics, ghost backend, strategy='gram'",
    "batched": "statistics, batched backend",
    "loop": "statistics, loop backend (oracle)",
    "vmap": "statistics, torch.func vmap(grad)",
    "sgs-step": "whole SGS step (stats + weights + backward + SGD)",
}
ALL = ("ghost", "batched", "loop", "vmap", "sgs-step")
NO_LOOP = ("ghost", "batched", "vmap", "sgs-step")
# (model, B, T, variants in the full run, variants with --quick). The loop oracle runs T·B backwards of the
# whole batch, so it only runs where that stays in seconds. The batched backend is the same T·B full-batch
# backwards, vectorised through (T·B, B, width) tensors: minutes and tens of GB at MLP B = 1024 or T = 8.
# At MLP B = 1024 the auto strategy picks "materialise"; the forced-gram row shows what that choice costs.
CONFIGS = [
    ("mlp", 64, 2, ALL, ALL),
    ("mlp", 256, 2, ALL, NO_LOOP),
    ("mlp", 1024, 2, ("ghost", "ghost-gram", "vmap", "sgs-step"), ("ghost", "ghost-gram", "sgs-step")),
    ("cnn", 256, 2, ALL, NO_LOOP),
    ("token", 64, 2, ALL, ALL),
    ("mlp", 256, 8, ("ghost", "sgs-step"), ("ghost", "sgs-step")),
]
# A memory subprocess costs an interpreter start and two steps: --quick measures only the configurations the
# goals are about, without the batched backend (seconds per step; it materialises T·B·|θ| floats like vmap).
QUICK_MEMORY = {("mlp", 256, 2), ("cnn", 256, 2)}
# (what, model, variant, "ratio" (time) | "mem_ratio", limit): the goals, all at B = 256 with 2 tasks.
GOALS = [
    ("statistics time, MLP", "mlp", "ghost", "ratio", 1.5),
    ("statistics time, CNN", "cnn", "ghost", "ratio", 2.0),
    ("statistics peak memory, MLP", "mlp", "ghost", "mem_ratio", 1.3),
    ("statistics peak memory, CNN", "cnn", "ghost", "mem_ratio", 1.3),
    ("whole SGS step time, MLP", "mlp", "sgs-step", "ratio", 1.6),
    ("whole SGS step time, CNN", "cnn", "sgs-step", "ratio", 2.5),
]
CSV_FIELDS = ["model", "B", "T", "variant", "ratio", "mem_ratio", "ms", "peak_mb", "reps"]
CSV_FIELDS += ["strategies", "note"]
METHOD = """
time: fastest variant run / fastest plain step over back-to-back (plain step, variant) pairs in one process,
after a warm-up pair; the loop oracle and variants slower than the repeat budget keep that one pair only.

plain step = forward of encoder + heads, sum of task mean losses, backward, SGD step. statistics = forward
inside capture() + heads + compute() over every encoder parameter, reference='batch' (no backward, no step).

peak memory: per (configuration, variant) a fresh subprocess builds model and data, resets the peak RSS
(/proc/self/clear_refs), runs a warm-up and one step; peak = VmHWM − baseline RSS (ru_maxrss would keep the
forking parent's peak); ratio to the plain step's peak in its own subprocess.
"""
ANCHORS = "earlier anchors (DESIGN §3, B=256, T=2): MLP vmap 340×, Opacus 450×, BackPACK 380×; CNN 3.1–3.7×"


# -- models: a shared encoder, one 10-class linear head per task ---------------------------------------------
class TokenEncoder(nn.Module):
    """Embedding over 32 tokens, two Linear layers applied per token; the heads read the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(1000, 64), nn.Linear(64, 128), nn.Linear(128, 128)

    def forward(self, idx):  # (B, 32) → (B, 128)
        return self.fc2(F.relu(self.fc1(self.embed(idx)))).mean(1)


def build(model: str, batch: int, tasks: int, seed: int = 0):
    torch.manual_seed(seed)
    if model == "mlp":
        enc = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        x, width = torch.randn(batch, 784), 512
    elif model == "cnn":  # LeNet-style on 1×28×28
        enc = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        )  # fmt: skip
        x, width = torch.randn(batch, 1, 28, 28), 84
    else:
        enc, x, width = TokenEncoder(), torch.randint(0, 1000, (batch, 32)), 128
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(tasks))
    return enc, heads, x, torch.randint(0, 10, (tasks, batch))


def task_losses(heads, z, ys) -> dict:
    return {f"task{t}": F.cross_entropy(h(z), ys[t], reduction="none") for t, h in enumerate(heads)}


def make_step(variant: str, enc, heads, x, ys):
    """A zero-argument callable doing one repetition of ``variant``."""
    opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=1e-4)  # tiny: weights barely drift
    n_tasks, batch = ys.shape
    if variant == "plain":

        def plain():
            opt.zero_grad()
            z = enc(x)
            sum(F.cross_entropy(h(z), y) for h, y in zip(heads, ys)).backward()
            opt.step()

        return plain
    if variant == "vmap":
        return vmap_statistics(enc, heads, x, ys)
    # statistics = forward inside capture() + heads + compute(); no backward into .grad, no optimizer step
    backend = {"ghost-gram": "ghost", "sgs-step": "auto"}.get(variant, variant)
    strategy = "gram" if variant == "ghost-gram" else "auto"
    probe = sgs_lab.SampleGradients(enc, backend=backend, strategy=strategy)

    def stats():
        with probe.capture():
            z = enc(x)
        return probe.compute(task_losses(heads, z, ys), reference="batch")

    if variant != "sgs-step":
        return stats

    def sgs_step():
        opt.zero_grad()
        s = stats()
        r = s.cosine.clamp(min=0)  # relu sample weights, mean 1 per task (uniform when all cosines are ≤ 0)
        total = r.sum(1, keepdim=True)
        w = torch.where(total > 0, batch * r / total.clamp(min=1e-30), torch.ones_like(r))
        lam = n_tasks * torch.softmax(s.cosine.mean(1) / 0.5, 0)  # consistency task weights, τ_T = 0.5
        s.backward(w, lam)
        opt.step()
        return s

    return sgs_step


def vmap_statistics(enc, heads, x, ys):
    """The "materialise everything" baseline: torch.func per-sample gradients, then the same cosines."""
    params = {n: p.detach() for n, p in enc.named_parameters()}  # views: they follow in-place optimizer steps

    def per_sample(head, y):  # (B, |θ|)
        def loss(p, xi, yi):
            return F.cross_entropy(head(functional_call(enc, p, (xi[None],))), yi[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([v.flatten(1) for v in g.values()], 1)

    def stats():
        with torch.no_grad():  # torch.func.grad ignores an outer no_grad; this only stops the heads' graph
            g = torch.stack([per_sample(h, y) for h, y in zip(heads, ys)])  # (T, B, |θ|)
            mean = g.mean(1)  # (T, |θ|)
            dot = torch.einsum("tbd,td->tb", g, mean)
            cross = torch.einsum("sbd,tbd->bst", g, g)  # norms on the diagonal, conflicts off it
            norm = cross.diagonal(dim1=1, dim2=2).T.sqrt()  # (T, B)
            return dot / (norm * mean.norm(dim=1, keepdim=True)).clamp(min=1e-30), cross

    return stats


# -- timing --------------------------------------------------------------------------------------------------
def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_variant(plain, fn, variant: str, repeats: int, budget: float) -> tuple[float, float, int]:
    """Fastest variant run over fastest plain step, from back-to-back (plain, variant) pairs: on a shared
    machine noise only ever adds time, so minima are steadier than medians, and pairing keeps slow drift
    (frequency, other jobs) on both sides of the ratio."""
    # a warm-up pair (allocator, lazy kernels) that also sizes the repeats; the oracle and runs longer than the
    # whole budget keep it as their only pair: one-off costs are noise at that length, and reruns cost minutes
    pairs = [(seconds(plain), seconds(fn))]
    if variant != "loop" and pairs[0][1] <= budget:
        n = max(1, min(repeats, int(budget / pairs[0][1])))
        pairs = [(seconds(plain), seconds(fn)) for _ in range(n)]
    best = min(v for _, v in pairs)
    return best / min(p for p, _ in pairs), best, len(pairs)


def run_config(model, batch, tasks, variants, repeats, budget, bar) -> list[dict]:
    enc, heads, x, ys = build(model, batch, tasks)
    plain = make_step("plain", enc, heads, x, ys)
    for _ in range(3):  # warm-up
        plain()
    n = max(repeats, 5)
    key = {"model": model, "B": batch, "T": tasks}
    plain_ms = 1e3 * min(seconds(plain) for _ in range(n))
    rows = [{**key, "variant": "plain", "ms": plain_ms, "ratio": 1.0, "reps": n}]
    for variant in variants:
        bar.set_postfix_str(f"{model} B={batch} T={tasks} {variant}")
        fn = make_step(variant, enc, heads, x, ys)
        ratio, sec, reps = time_variant(plain, fn, variant, repeats, budget)
        row = {**key, "variant": variant, "ms": sec * 1e3, "ratio": ratio, "reps": reps}
        if variant == "ghost":  # which contraction each layer got (DESIGN §3 cost rule)
            row["strategies"] = " ".join(f"{k}:{v}" for k, v in fn().strategies.items())
        rows.append(row)
        bar.update()
    return rows


# -- peak memory, one subprocess per (configuration, variant) ------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(model: str, variant: str, batch: int, tasks: int) -> None:
    """Child process: build, reset the peak, run a warm-up and one step; print the peak above the baseline.

    Linux ≥ 4.0 resets the peak RSS (VmHWM) when 5 is written to /proc/self/clear_refs. VmHWM is read, not
    ru_maxrss: ru_maxrss also keeps the peak of the parent this child was forked from before its exec."""
    enc, heads, x, ys = build(model, batch, tasks)
    fn = make_step(variant, enc, heads, x, ys)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base_kb = _status_kb("VmRSS")
    except OSError:  # no reset: the peak so far is the baseline (over-stated, so the step's peak reads low)
        base_kb = _status_kb("VmHWM")
    fn()
    fn()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base_kb) / 1024}))


def peak_mb(model, variant, batch, tasks, threads) -> float | None:
    args = ["--measure-memory", model, variant, str(batch), str(tasks), "--threads", str(threads)]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"memory subprocess failed: {' '.join(args)}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# -- report --------------------------------------------------------------------------------------------------
def find(rows, model, variant, batch=256, tasks=2):
    key = (model, variant, batch, tasks)
    return next((r for r in rows if (r["model"], r["variant"], r["B"], r["T"]) == key), None)


def extrapolate_loop(rows: list[dict]) -> list[dict]:
    """Loop rows skipped where ghost ran, estimated ∝ B from the largest measured B: each of the T·B backwards
    runs over the whole batch, so loop/plain grows about linearly in B (per-call overhead at small B makes it
    an over-estimate). Labelled as such, never used for a goal."""
    extra = []
    for r in rows:
        if r["variant"] != "ghost" or find(rows, r["model"], "loop", r["B"], r["T"]):
            continue
        known = [o for o in rows if o["variant"] == "loop" and (o["model"], o["T"]) == (r["model"], r["T"])]
        if known:
            src = max(known, key=lambda o: o["B"])
            ratio = src["ratio"] * r["B"] / src["B"]
            extra.append({"model": r["model"], "B": r["B"], "T": r["T"], "variant": "loop", "ratio": ratio})
            extra[-1]["note"] = f"extrapolated ∝ B from B={src['B']}, not measured"
    return extra


def fmt(value, spec, suffix="") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def render(rows: list[dict], markdown: bool) -> str:
    head = ["model", "B", "T", "variant", "× plain time", "× plain peak", "ms", "peak MB", "reps", "note"]
    body = [
        [
            r["model"], str(r["B"]), str(r["T"]), LABELS[r["variant"]],
            "~" * ("note" in r) + fmt(r.get("ratio"), ".2f", "×"), fmt(r.get("mem_ratio"), ".2f", "×"),
            fmt(r.get("ms"), ".1f"), fmt(r.get("peak_mb"), ".0f"), str(r.get("reps", "")), r.get("note", ""),
        ]
        for r in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def summary(rows: list[dict], markdown: bool) -> str:
    bullet = "- " if markdown else "  "
    out = ["", "Goals (B = 256, T = 2, ratio to a plain step of the same model and batch):"]
    for what, model, variant, field, limit in GOALS:
        value = (find(rows, model, variant) or {}).get(field)
        verdict = "not measured" if value is None else ("MET" if value <= limit else "NOT MET")
        out.append(f"{bullet}{what}: {fmt(value, '.2f', '×')} (goal ≤ {limit}×) — {verdict}")
    two, eight = find(rows, "mlp", "ghost", 256, 2), find(rows, "mlp", "ghost", 256, 8)
    if two and eight:
        growth = eight["ratio"] / two["ratio"]
        out += [
            "",
            (
                f"Tasks (MLP, B = 256, statistics): T = 2 {two['ratio']:.2f}×, T = 8 {eight['ratio']:.2f}×"
                f" ({growth:.2f}× for 4× the tasks; DESIGN §3: 1 forward + T backwards ≈ (1 + T)/3 plain"
                " steps, plus the contractions)"
            ),
        ]
    out += ["", "Per-layer strategy chosen by the ghost backend (stats.strategies):"]
    out += [f"{bullet}{r['model']} B={r['B']} T={r['T']}: {r['strategies']}" for r in rows if "strategies" in r]
    return "\n".join(out)


def header(args) -> str:
    lines = [" ".join(part.split()) for part in METHOD.split("\n\n")] + [ANCHORS]
    title = (
        f"sgs_lab {sgs_lab.__version__} engine benchmark ({'quick' if args.quick else 'full'}), torch "
        f"{torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at start"
    )
    if os.getloadavg()[0] + args.threads > os.cpu_count() + 0.5:  # see the module docstring
        lines.append("WARNING: the CPUs were busy in the last minute; ratios may be unreliable (try --threads 1)")
    return "\n".join([title, *(("- " if args.markdown else "  ") + line for line in lines), ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, loop oracle only at B=64 (~2 min)")
    parser.add_argument("--csv", metavar="PATH", help="write every row to PATH")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (for the README)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    parser.add_argument("--measure-memory", nargs=4, metavar=("MODEL", "VARIANT", "B", "T"), help="internal")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        model, variant, batch, tasks = args.measure_memory
        measure_memory(model, variant, int(batch), int(tasks))
        return 0
    repeats, budget = (5, 2.0) if args.quick else (15, 15.0)  # budget: seconds of repeats for one variant
    configs = [(m, b, t, quick if args.quick else full) for m, b, t, full, quick in CONFIGS]
    memory = [(m, b, t, ("plain", *vs)) for m, b, t, vs in configs]
    if args.quick:
        memory = [(m, b, t, tuple(v for v in vs if v != "batched")) for m, b, t, vs in memory]
        memory = [c for c in memory if c[:3] in QUICK_MEMORY]
    print(header(args), flush=True)
    rows = []
    with tqdm(total=sum(len(c[3]) for c in configs + memory), desc="engine", file=sys.stderr) as bar:
        for model, batch, tasks, variants in configs:
            rows += run_config(model, batch, tasks, variants, repeats, budget, bar)
        for model, batch, tasks, variants in memory:
            for variant in variants:
                bar.set_postfix_str(f"memory {model} B={batch} T={tasks} {variant}")
                peak = peak_mb(model, variant, batch, tasks, args.threads)
                find(rows, model, variant, batch, tasks)["peak_mb"] = peak
                bar.update()
            base = find(rows, model, "plain", batch, tasks)["peak_mb"]
            for variant in variants:
                r = find(rows, model, variant, batch, tasks)
                r["mem_ratio"] = r["peak_mb"] / base if r["peak_mb"] and base else None
    rows += extrapolate_loop(rows)
    order = {c[:3]: i for i, c in enumerate(CONFIGS)}
    rows.sort(key=lambda r: (order[r["model"], r["B"], r["T"]], list(LABELS).index(r["variant"])))
    print(render(rows, args.markdown))
    print(summary(rows, args.markdown))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; quote numbers from an idle machine only.")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
