"""Distributed runs on torch.distributed: process-group set-up under ``torchrun``, batch sharding, gradient reduction.

A distributed run splits every global batch across the ranks of a process group (NCCL on GPUs, gloo on CPU). The
statistics stay exact for the global batch: ``SampleGradients(..., process_group=group)`` all-reduces each task's
gradient sums (per layer, the size of a weight gradient: T parameter-sized all-reduces per step for the batch and
leave-one-out references, T × classes for the class reference), the label counts and the sums weighting methods
normalise with; per-sample dots, norms and conflicts stay local. ``stats.backward`` writes ``.grad`` directly from
the captured tensors, so DistributedDataParallel's gradient hooks never see it: :func:`all_reduce_gradients` sums
the gradients explicitly, in one flat buffer. DDP still wraps the model, for its start-up broadcast of parameters
and buffers and its consistency checks; the forward runs on ``ddp.module``.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
from torch import Tensor

#: An upper bound on how long a collective waits for a rank that stopped answering; torchrun itself stops the
#: others within seconds when a worker process dies.
TIMEOUT = dt.timedelta(seconds=120)


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    group: object  # the process group (the default one)
    device: torch.device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment (NCCL with CUDA, gloo otherwise)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    else:
        target = torch.device("cpu" if device == "auto" else device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Context(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, target)


def current() -> Context | None:
    """The context of an initialised process group with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, device)


def shard(index: Tensor, context: Context | None) -> Tensor:
    """This rank's part of a global batch ``index``: contiguous, sizes differing by at most one, every sample in
    exactly one rank's part."""
    if context is None:
        return index
    return index.tensor_split(context.world_size)[context.rank]


def check_batches(n_samples: int, batch_size: int, world_size: int) -> None:
    """Every global batch must give each rank at least one sample."""
    sizes = {batch_size} if n_samples % batch_size == 0 else {batch_size, n_samples % batch_size}
    small = min(sizes | ({n_samples} if n_samples < batch_size else set()))
    if small < world_size:
        raise ValueError(
            f"a global batch of {small} sample(s) cannot be split over {world_size} processes: choose a batch size "
            f"and data size whose every batch holds at least {world_size} samples"
        )


def all_reduce_gradients(parameters, group) -> None:
    """Sum every parameter's ``.grad`` over the ranks, in one flat buffer (missing gradients count as zero)."""
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).clone()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``sgs-lab`` with ``argv`` on ``nproc`` local processes."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "sgs_lab.cli", *argv]  # fmt: skip
