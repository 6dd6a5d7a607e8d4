"""The training loop: per-sample statistics every step, any weighting method, checkpoints that resume exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed
from ..data import TaskSet
from ..grads import SampleGradients
from ..grads.stats import masked_mean
from ..models import MultiTaskNet, build_model
from .recorder import MemorySink, step_records

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint; a resumed run must use the same)."""

    method: str = "ew"
    knobs: dict = field(default_factory=dict)  # the method's options, e.g. {"reference": "loo"}
    model: str = "mlp"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present
    bf16: bool = False  # bf16 autocast for the forward (statistics accumulate in float32)
    dtype: str = "float32"  # "float64": model, inputs and statistics in double precision (exactness checks)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive; got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'adam' or 'sgd'")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")


@dataclass
class RunResult:
    model: MultiTaskNet
    history: list[dict]  # one dict per epoch: epoch, seconds, train loss, test accuracy/loss per task
    test_metrics: dict[str, float]
    seconds: float
    sink: object


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names: Adam, or SGD with momentum 0.9."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_losses(outputs: dict[str, Tensor], batch: TaskSet) -> dict[str, Tensor]:
    """Per-sample losses: cross-entropy for classification, squared error for regression."""
    losses = {}
    for task, spec in batch.tasks.items():
        out = outputs[task]
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 → float32; float64 stays
        if spec.kind == "classification":
            losses[task] = F.cross_entropy(out, batch.labels[task], reduction="none")
        else:
            losses[task] = (out.squeeze(1) - batch.labels[task].float()) ** 2
    return losses


@torch.no_grad()
def evaluate(model: MultiTaskNet, data: TaskSet, device: torch.device, batch_size: int = 1024) -> dict[str, float]:
    """Per task: accuracy (classification, against clean labels) or mean squared error (regression), and loss."""
    model.eval()
    sums: dict[str, float] = {}
    dtype = next(model.parameters()).dtype
    for lo in range(0, len(data), batch_size):
        batch = data.subset(torch.arange(lo, min(lo + batch_size, len(data)))).to(device, dtype)
        outputs = model(batch.x)
        clean = dataclasses.replace(batch, labels=batch.clean)
        for task, loss in task_losses(outputs, clean).items():
            sums[f"{task}/loss"] = sums.get(f"{task}/loss", 0.0) + float(loss.sum())
            if data.tasks[task].kind == "classification":
                hits = float((outputs[task].argmax(1) == batch.clean[task]).sum())
                sums[f"{task}/accuracy"] = sums.get(f"{task}/accuracy", 0.0) + hits
    model.train()
    return {k: v / len(data) for k, v in sums.items()}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors whatever the map_location
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees half a checkpoint


def fit(
    train: TaskSet,
    test: TaskSet,
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    sink=None,
    callbacks: Sequence[Callable[[dict], None]] = (),
    progress: bool = True,
    checkpoint_every: int = 0,
    stop_after_steps: int | None = None,
    record: bool = True,
) -> RunResult:
    """Train ``config.method`` on ``train``, evaluate on ``test`` after every epoch.

    Every step records, for every task and sample, the statistics of DESIGN §5 (the training reference, plus the
    batch and class references) to ``sink`` (default: a MemorySink). With ``out`` a checkpoint is written at each
    epoch end (and every ``checkpoint_every`` steps); ``resume=True`` continues from it exactly: same batches, same
    random state, same method state. ``callbacks`` receive each epoch's summary dict.
    ``stop_after_steps`` ends the run early (for tests of resuming). ``record=False`` records nothing (no batch
    and class references either): the baseline the cache benchmark measures the recorder against.
    """
    from ..weighting import make_method

    if len(train) == 0 or len(test) == 0:
        raise ValueError("train and test sets must not be empty")
    context = distributed.current()
    device = context.device if context else resolve_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    sink = MemorySink() if sink is None else sink
    out = Path(out) if out is not None else None
    torch.manual_seed(config.seed)
    model = build_model(config.model, tuple(train.x.shape[1:]), train.tasks).to(device, dtype)
    method = make_method(config.method, **config.knobs)
    if context:
        if not method.distributed:
            raise ValueError(
                f"{config.method!r} cannot train distributed: its weights read per-process means (losses, an EMA "
                "reference or the task gradients themselves); use ew, sgs (batch, loo or class reference) or a "
                "Gramian method (mgda, pcgrad, imtlg, upgrad, ...)"
            )
        distributed.check_batches(len(train), config.batch_size, context.world_size)
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers and checks they agree; the forward runs on ddp.module,
        # because stats.backward writes .grad without autograd (see sgs_lab.distributed)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None).module
    params = list(model.parameters())
    optimizer = make_optimizer(params, config)
    probe = SampleGradients(model.encoder, scope=method.scope, process_group=context.group if context else None)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    start_epoch, start_step, history, elapsed = 0, 0, [], 0.0
    epoch_loss, epoch_steps = 0.0, 0
    if getattr(method, "warmup", 0) >= config.epochs:
        warnings.warn(
            f"{config.method}: warm-up ({method.warmup} epochs) covers the whole run ({config.epochs} epochs): "
            "every weight stays uniform",
            stacklevel=2,
        )
    if resume:
        if out is None or not (out / CHECKPOINT).exists():
            raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT} in {out}")
        state = torch.load(out / CHECKPOINT, map_location=device, weights_only=False)  # our own file
        saved, asked = dict(state["config"]), dataclasses.asdict(config)
        saved.pop("device", None), asked.pop("device")  # a run may resume on another device
        saved.setdefault("dtype", "float32")  # checkpoints written before the dtype option
        if saved != asked:
            changed = sorted(k for k in asked if saved.get(k) != asked[k])
            raise ValueError(f"the checkpoint was written with another configuration ({', '.join(changed)} differ); "
                             "resume with the same options")  # fmt: skip
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        start_epoch, start_step, history, elapsed = state["epoch"], state["step"], state["history"], state["seconds"]
        epoch_loss, epoch_steps = state["epoch_loss"]
        if not hasattr(sink, "truncate"):
            raise TypeError("resuming needs a sink with truncate(step): rows after the checkpoint would be duplicated")
        sink.truncate(start_epoch * steps_per_epoch + start_step)

    def save(epoch: int, step: int) -> None:
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        sink.flush()
        if context and context.rank != 0:
            return  # every rank holds the same model and state: rank 0 keeps the checkpoint
        _save_atomic(
            {
                "config": dataclasses.asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "method": method.state_dict(), "rng": _rng_state(), "epoch": epoch, "step": step,
                "history": history, "seconds": elapsed + time.perf_counter() - started,
                "epoch_loss": (epoch_loss, epoch_steps),
            },
            out / CHECKPOINT,
        )  # fmt: skip

    started = time.perf_counter()
    steps_done = 0
    bar = tqdm(
        range(start_epoch, config.epochs),
        desc=config.method,
        disable=not progress or bool(context and context.rank),
        leave=False,
    )
    for epoch in bar:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 10007 + epoch))
        first = start_step if epoch == start_epoch else 0
        if epoch != start_epoch:
            epoch_loss, epoch_steps = 0.0, 0
        for step in range(first, steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = train.subset(distributed.shard(index, context)).to(device, dtype)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16), probe.capture():
                z = model.encoder(batch.x)
                outputs = {task: head(z) for task, head in model.heads.items()}
            losses = task_losses(outputs, batch)
            labels = {t: batch.labels[t] if s.kind == "classification" else torch.zeros_like(batch.labels[t], dtype=torch.long)
                      for t, s in train.tasks.items()}  # fmt: skip
            stats = probe.compute(losses, labels=labels, reference=method.reference, masks=batch.present)
            if record:
                sgs_batch = stats.cosine if method.reference == "batch" else stats.similarity("batch").cosine
                sgs_class = stats.cosine if method.reference == "class" else stats.similarity("class").cosine
            weights, task_weights = method.weights(stats, epoch=epoch)
            weights = torch.ones_like(stats.cosine) if weights is None else weights
            task_weights = torch.ones(len(losses), device=device) if task_weights is None else task_weights
            optimizer.zero_grad(set_to_none=True)
            if getattr(method, "needs_jacobian", False):  # aggregators that need the task gradients themselves
                stats.apply_direction(method.aggregate(stats.jacobian()))
            else:
                stats.backward(weights, task_weights)
            if context:  # coefficients use global counts: the sum over ranks is the global batch's gradient
                distributed.all_reduce_gradients(params, context.group)
            optimizer.step()
            if method.needs_new_losses:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    new = task_losses(model(batch.x), batch)
                present = torch.stack([batch.present[t] for t in new])
                method.after_step(stats, masked_mean(torch.stack(list(new.values())), present))
            global_step = epoch * steps_per_epoch + step
            if record:
                sink.write(*step_records(
                    epoch=epoch, step=global_step, batch=batch, outputs=outputs, stats=stats, weights=weights,
                    task_weights=task_weights, sgs_batch=sgs_batch, sgs_class=sgs_class, specs=train.tasks,
                ))  # fmt: skip
            epoch_loss += float(stats.labelled_mean(stats.losses).mean())  # over the global batch
            epoch_steps += 1
            steps_done += 1
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                save(epoch, step + 1)
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                save(epoch, step + 1)
                return RunResult(model, history, {}, elapsed + time.perf_counter() - started, sink)
        method.end_epoch(epoch)
        summary = {"epoch": epoch, "train_loss": epoch_loss / max(epoch_steps, 1)}
        summary.update({f"test/{k}": v for k, v in evaluate(model, test, device).items()})
        summary["seconds"] = elapsed + time.perf_counter() - started
        history.append(summary)
        for callback in callbacks:
            callback(summary)
        bar.set_postfix({k.split("/")[1]: round(v, 3) for k, v in summary.items() if k.endswith("accuracy")})
        save(epoch + 1, 0)
    test_metrics = {k.removeprefix("test/"): v for k, v in history[-1].items() if k.startswith("test/")}
    if out is not None and not (context and context.rank != 0):
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return RunResult(model, history, test_metrics, elapsed + time.perf_counter() - started, sink)
