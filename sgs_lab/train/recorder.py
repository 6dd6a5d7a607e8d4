"""Per-step records: every sample's statistics for every task (DESIGN §5 column names), handed to a sink."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SAMPLE_COLUMNS = (
    "epoch", "step", "task", "sample_id", "label", "clean_label", "noisy", "present", "pred", "p_label", "margin",
    "loss", "sgs", "sgs_batch", "sgs_class", "grad_norm", "weight", "conflict",
)  # fmt: skip
STEP_COLUMNS = ("epoch", "step", "task", "task_weight", "loss", "consistency")


class MemorySink:
    """Keeps every record in memory: ``samples()`` / ``steps()`` give {column: array} over all steps."""

    def __init__(self) -> None:
        self._samples: list[dict] = []
        self._steps: list[dict] = []

    def write(self, samples: dict[str, np.ndarray], steps: dict[str, np.ndarray]) -> None:
        self._samples.append(samples)
        self._steps.append(steps)

    def flush(self) -> None:
        """Nothing to do in memory; persistent sinks write their buffer here (called at each epoch end)."""

    @staticmethod
    def _concat(parts: list[dict], columns) -> dict[str, np.ndarray]:
        if not parts:
            return {c: np.array([]) for c in columns}
        return {c: np.concatenate([p[c] for p in parts]) for c in columns}

    def samples(self) -> dict[str, np.ndarray]:
        return self._concat(self._samples, SAMPLE_COLUMNS)

    def steps(self) -> dict[str, np.ndarray]:
        return self._concat(self._steps, STEP_COLUMNS)

    def truncate(self, step: int) -> None:
        """Drop records of steps ≥ ``step`` (a resumed run replays them)."""
        self._samples = [p for p in self._samples if p["step"][0] < step]
        self._steps = [p for p in self._steps if p["step"][0] < step]


def margin(logits: Tensor, label: Tensor) -> Tensor:
    """(B,) the given label's logit minus the largest other logit (positive exactly when it is the arg-max)."""
    given = logits.gather(1, label[:, None]).squeeze(1)
    return given - logits.scatter(1, label[:, None], float("-inf")).max(1).values


def _prediction_columns(output: Tensor, label: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """pred, probability of the given label, margin (its logit minus the largest other logit)."""
    if kind != "classification":
        nan = torch.full_like(label, float("nan"), dtype=torch.float32)
        return output.squeeze(1).float(), nan, nan
    logits = output.float()
    p_label = torch.softmax(logits, 1).gather(1, label[:, None]).squeeze(1)
    return logits.argmax(1).float(), p_label, margin(logits, label)


def step_records(
    *, epoch: int, step: int, batch, outputs: dict[str, Tensor], stats, weights: Tensor, task_weights: Tensor,
    sgs_batch: Tensor, sgs_class: Tensor, specs: dict,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """One step's rows: (samples, steps) as {column: array}, tasks in the order of ``stats.tasks``.

    Every value is formed on the statistics' device and copied to the host in one transfer: recording runs each
    step, so per-column copies would cost more than the statistics themselves on small models.
    """
    n_tasks, size = stats.cosine.shape
    # the minimum over the *other* tasks that label the sample (NaN pairs are tasks without its label)
    conflict = stats.conflict.nan_to_num(nan=float("inf"))
    eye = torch.eye(n_tasks, dtype=torch.bool, device=conflict.device)
    conflict[:, eye] = float("inf")
    per_task_conflict = conflict.amin(2).T  # (T, B)
    per_task_conflict = per_task_conflict.masked_fill(per_task_conflict.isinf(), float("nan"))
    per_task = [
        _prediction_columns(outputs[task].detach(), batch.labels[task], specs[task].kind) for task in stats.tasks
    ]
    present = torch.stack([batch.present[t] for t in stats.tasks])  # (T, B)
    noisy = torch.stack([batch.noisy[t] for t in stats.tasks])
    labels = torch.stack([batch.labels[t].float() for t in stats.tasks])
    clean = torch.stack([batch.clean[t].float() for t in stats.tasks])
    pred, p_label, margin = (torch.stack([columns[k] for columns in per_task]) for k in range(3))
    given = {"label": labels, "p_label": p_label, "margin": margin, "loss": stats.losses, "weight": weights}
    values = {  # a missing label leaves NaN in everything derived from it (the present column says why)
        **{name: torch.where(present, v.float(), torch.nan) for name, v in given.items()},
        "clean_label": clean, "pred": pred, "sgs": stats.cosine, "sgs_batch": sgs_batch, "sgs_class": sgs_class,
        "grad_norm": stats.norm, "conflict": per_task_conflict,
    }  # fmt: skip
    floats = torch.stack([v.detach().float() for v in values.values()]).reshape(len(values), -1).cpu().numpy()
    flags = torch.stack([noisy, present]).reshape(2, -1).cpu().numpy()
    samples = dict(zip(values, floats))
    samples.update(noisy=flags[0], present=flags[1])
    samples["task"] = np.repeat(np.array(stats.tasks, dtype=object), size)
    samples["sample_id"] = np.tile(batch.sample_id.cpu().numpy(), n_tasks)
    samples["epoch"] = np.full(n_tasks * size, epoch, dtype=np.int32)
    samples["step"] = np.full(n_tasks * size, step, dtype=np.int64)
    means = [stats.labelled_mean(v) for v in (stats.losses, stats.cosine)]  # over the global batch when distributed
    task_values = torch.stack([task_weights.detach().float(), *(m.float() for m in means)]).cpu().numpy()
    steps = {
        "epoch": np.full(n_tasks, epoch, dtype=np.int32),
        "step": np.full(n_tasks, step, dtype=np.int64),
        "task": np.array(stats.tasks, dtype=object),
        "task_weight": task_values[0],
        "loss": task_values[1],
        "consistency": task_values[2],
    }
    return {c: samples[c] for c in SAMPLE_COLUMNS}, steps
