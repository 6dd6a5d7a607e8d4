"""Per-step records: every sample's statistics for every task (DESIGN §5 column names), handed to a sink."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..grads.stats import masked_mean

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


def _prediction_columns(output: Tensor, label: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """pred, probability of the given label, margin (its logit minus the largest other logit)."""
    if kind != "classification":
        nan = torch.full_like(label, float("nan"), dtype=torch.float32)
        return output.squeeze(1).float(), nan, nan
    logits = output.float()
    given = logits.gather(1, label[:, None]).squeeze(1)
    others = logits.scatter(1, label[:, None], float("-inf")).max(1).values
    p_label = torch.softmax(logits, 1).gather(1, label[:, None]).squeeze(1)
    return logits.argmax(1).float(), p_label, given - others


def step_records(
    *, epoch: int, step: int, batch, outputs: dict[str, Tensor], stats, weights: Tensor, task_weights: Tensor,
    sgs_batch: Tensor, sgs_class: Tensor, specs: dict,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """One step's rows: (samples, steps) as {column: array}, tasks in the order of ``stats.tasks``."""
    n_tasks, size = stats.cosine.shape
    # the minimum over the *other* tasks that label the sample (NaN pairs are tasks without its label)
    conflict = stats.conflict.nan_to_num(nan=float("inf"))
    eye = torch.eye(n_tasks, dtype=torch.bool, device=conflict.device)
    conflict[:, eye] = float("inf")
    per_task_conflict = conflict.amin(2).T  # (T, B)
    per_task_conflict = per_task_conflict.masked_fill(per_task_conflict.isinf(), float("nan"))
    columns: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}
    for t, task in enumerate(stats.tasks):
        label = batch.labels[task]
        pred, p_label, margin = _prediction_columns(outputs[task].detach(), label, specs[task].kind)
        present = batch.present[task]
        missing = lambda v: torch.where(present, v.float(), torch.full_like(v, float("nan"), dtype=torch.float32))  # noqa: E731
        values = {  # a missing label leaves NaN in everything derived from it (the present column says why)
            "label": missing(label), "clean_label": batch.clean[task].float(), "noisy": batch.noisy[task],
            "present": present, "pred": pred, "p_label": missing(p_label), "margin": missing(margin),
            "loss": missing(stats.losses[t]), "sgs": stats.cosine[t], "sgs_batch": sgs_batch[t],
            "sgs_class": sgs_class[t], "grad_norm": stats.norm[t], "weight": missing(weights[t]),
            "conflict": per_task_conflict[t],
        }  # fmt: skip
        for name, value in values.items():
            columns[name].append(value.detach().float().cpu().numpy() if name not in ("noisy", "present") else value.cpu().numpy())
        columns["task"].append(np.full(size, task, dtype=object))
        columns["sample_id"].append(batch.sample_id.cpu().numpy())
    samples = {c: np.concatenate(v) for c, v in columns.items() if v}
    samples["epoch"] = np.full(n_tasks * size, epoch, dtype=np.int32)
    samples["step"] = np.full(n_tasks * size, step, dtype=np.int64)
    consistency = masked_mean(stats.cosine, stats.mask)
    mean_loss = masked_mean(stats.losses, stats.mask)
    steps = {
        "epoch": np.full(n_tasks, epoch, dtype=np.int32),
        "step": np.full(n_tasks, step, dtype=np.int64),
        "task": np.array(stats.tasks, dtype=object),
        "task_weight": task_weights.detach().float().cpu().numpy(),
        "loss": mean_loss.float().cpu().numpy(),
        "consistency": consistency.float().cpu().numpy(),
    }
    return samples, steps
