"""Distributed benchmark: throughput at 1 and 2 processes, and the bytes each rank all-reduces per step.

Run from the repository root::

    .venv/bin/python benchmarks/distributed.py            # about 2 min on 2 cores
    .venv/bin/python benchmarks/distributed.py --epochs 1 # quicker

It launches itself under ``torchrun --nproc_per_node=N`` (gloo on CPU, one thread per process) for N = 1 and 2 and
trains on MultiDigits (MLP, global batch 128) with

- ``sgs``: ``sgs_lab.train.fit`` with SGS weighting at its default scope (the encoder output z_i), recording every
  statistic (sample rows in memory): exact global statistics, so per step it all-reduces each task's gradient sums
  (batch reference: T vectors of the probed size; the recorded class reference adds T × classes of them), counts
  and normalisers, then the gradient;
- ``sgs-all``: the same with ``scope="all"``: the sums are parameter-sized (T + T × classes weight gradients);
- ``ddp-ew``: a plain DistributedDataParallel loop with equal weighting (autograd backward, DDP's bucketed
  gradient all-reduce), the baseline.

Bytes are the payload each rank hands to all-reduce per step (a ring all-reduce moves about 2(N−1)/N times that
over the wire): counted by wrapping ``torch.distributed`` calls for ``sgs``; for ``ddp-ew`` it is the gradient
(every parameter once). Throughput is training samples per second over the measured epochs (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("sgs", "sgs-all", "ddp-ew")


def worker(kind: str, epochs: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from sgs_lab import distributed
    from sgs_lab.data import make_multidigits
    from sgs_lab.models import build_model
    from sgs_lab.train import TrainConfig, fit
    from sgs_lab.train.fit import task_losses

    context = distributed.init("cpu")
    train, test = make_multidigits(6000, 500, seed=0)
    train = train.with_noise(0.4, seed=0)
    sent = {"bytes": 0, "calls": 0}
    for name in ("all_reduce", "all_gather_object", "broadcast_object_list"):
        original = getattr(dist, name)

        def counted(value, *args, _original=original, **kwargs):
            if isinstance(value, torch.Tensor):
                sent["bytes"] += value.numel() * value.element_size()
            sent["calls"] += 1
            return _original(value, *args, **kwargs)

        setattr(dist, name, counted)
    knobs = {"sgs": {"warmup": 0}, "sgs-all": {"warmup": 0, "scope": "all"}}.get(kind, {})
    config = TrainConfig(method="ew" if kind == "ddp-ew" else "sgs", knobs=knobs, epochs=epochs, batch_size=128,
                         optimizer="sgd", lr=0.05)  # fmt: skip
    steps = epochs * -(-len(train) // config.batch_size)
    if kind != "ddp-ew":
        started = time.perf_counter()
        fit(train, test, config, progress=False)
        seconds = time.perf_counter() - started
        per_step = sent["bytes"] / steps
    else:
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(0)
        model = DistributedDataParallel(build_model("mlp", tuple(train.x.shape[1:]), train.tasks))
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
        started = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
            for lo in range(0, len(train), config.batch_size):
                batch = train.subset(distributed.shard(order[lo : lo + config.batch_size], context))
                losses = task_losses(model(batch.x), batch)
                optimizer.zero_grad(set_to_none=True)
                sum(loss.mean() for loss in losses.values()).backward()  # DDP averages over ranks
                optimizer.step()
        seconds = time.perf_counter() - started
        per_step = sum(p.numel() * p.element_size() for p in model.parameters())  # DDP's buckets, once per step
    if context.rank == 0:
        result = {"kind": kind, "world": context.world_size, "samples_per_s": epochs * len(train) / seconds,
                  "bytes_per_step": per_step}  # fmt: skip
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(kind: str, nproc: int, epochs: int, tmp: Path) -> dict:
    out = tmp / f"{kind}-{nproc}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", kind, "--epochs", str(epochs), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.epochs, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {(k, n): launch(k, n, args.epochs, Path(tmp)) for k in KINDS for n in (1, 2)}
    print("| run | samples/s, 1 process | samples/s, 2 processes | speed-up | all-reduced per step per rank |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        one, two = results[(kind, 1)], results[(kind, 2)]
        print(f"| {kind} | {one['samples_per_s']:.0f} | {two['samples_per_s']:.0f} | "
              f"{two['samples_per_s'] / one['samples_per_s']:.2f}x | {two['bytes_per_step'] / 1e6:.2f} MB |")  # fmt: skip
    for kind in KINDS[:2]:
        ratio = results[(kind, 2)]["bytes_per_step"] / results[("ddp-ew", 2)]["bytes_per_step"]
        print(f"{kind} all-reduces {ratio:.1f}x the bytes of plain DDP per step (T = 2 tasks, 10 classes each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
