"""References R_{t,i}: what a sample's gradient is compared with (DESIGN §2), from block-level contractions.

``batch`` ḡ_t (mean over the task's labelled samples), ``loo`` the same mean without sample i, ``class`` the mean of
the other samples with the same label (a sample alone in its class has no reference: its dot, reference norm and
cosine are 0), and :class:`EMAReference`, an exponential moving average of ḡ_t carried across steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._blocks import Block

REFERENCES = ("batch", "loo", "class")


class EMAReference:
    """An exponential moving average of each task's mean gradient, carried across ``compute()`` calls.

    At step k the reference is R_k = decay · R_{k−1} + (1 − decay) · ḡ_t(k), with R = ḡ_t at a task's first step
    with labelled samples, so that step equals the ``batch`` reference; a step without labelled samples leaves a
    task's reference as it was. It lives in the per-layer parameter space of the probe that fills it: reuse one
    object with one probe (same layers, same tasks). Every ``compute()`` or ``stats.similarity()`` that receives
    it advances it by one step. ``state_dict()``/``load_state_dict()`` checkpoint it.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMAReference decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.state: dict[str, Tensor] = {}
        self.started: Tensor | None = None  # (T,) bool: the task has had labelled samples
        self.tasks: tuple[str, ...] | None = None
        self.steps = 0

    def __repr__(self) -> str:
        return f"EMAReference(decay={self.decay}, steps={self.steps})"

    def update(self, blocks: list[Block], counts: Tensor, tasks: tuple[str, ...]) -> dict[str, Tensor]:
        """Fold this step's task means into the average and return the reference per block, (T, *space)."""
        if self.tasks is not None and tuple(tasks) != self.tasks:
            raise ValueError(f"this EMAReference tracks tasks {list(self.tasks)}; got {list(tasks)}")
        keys = {b.key for b in blocks}
        if self.state and set(self.state) != keys:
            raise ValueError(
                "this EMAReference was filled by a probe over other layers; use one EMAReference per probe "
                f"(known: {sorted(self.state)[:4]}…, now: {sorted(keys)[:4]}…)"
            )
        started = torch.zeros_like(counts, dtype=torch.bool) if self.started is None else self.started.to(counts.device)
        for block in blocks:
            sums = block.batch_sums()
            shape = (-1, *([1] * (sums.dim() - 1)))
            mean = sums / counts.to(sums.dtype).clamp(min=1).reshape(shape)
            prev = self.state.get(block.key, torch.zeros_like(mean)).to(mean)
            blended = torch.where(started.reshape(shape), self.decay * prev + (1 - self.decay) * mean, mean)
            self.state[block.key] = torch.where((counts > 0).reshape(shape), blended, prev)
        self.started = started | (counts > 0)
        self.tasks = tuple(tasks)
        self.steps += 1
        return self.state

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "steps": self.steps,
            "tasks": self.tasks,
            "started": self.started,
            "state": dict(self.state),
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        self.tasks = tuple(state["tasks"]) if state["tasks"] is not None else None
        self.started, self.state = state["started"], dict(state["state"])


def _safe_cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """dot / (‖a‖‖b‖) in [−1, 1] (rounding can step past ±1), and 0 where either norm is 0."""
    denom = (sq_a.clamp(min=0) * sq_b.clamp(min=0)).sqrt()
    cosine = (dot / denom.where(denom > 0, torch.ones_like(denom))).clamp(-1.0, 1.0)
    return torch.where(denom > 0, cosine, torch.zeros_like(dot))


def _leave_one_out(group_dot: Tensor, group_sq: Tensor, sq: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Sample i against (S − G_i)/(n − 1): dot and squared reference norm; both 0 where n ≤ 1."""
    others = (count - 1).to(sq.dtype)
    alone = others <= 0
    others = others.clamp(min=1)
    dot = (group_dot - sq) / others
    ref_sq = (group_sq - 2 * group_dot + sq).clamp(min=0) / others**2
    # cancellation can leave rounding noise where the reference vanishes: call it zero
    noise = 64 * torch.finfo(sq.dtype).eps * (group_sq.abs() + sq.abs()) / others**2
    ref_sq = torch.where(ref_sq <= noise, torch.zeros_like(ref_sq), ref_sq)
    return dot.masked_fill(alone, 0), ref_sq.masked_fill(alone, 0)


def similarity(
    kind, blocks: list[Block], sq: Tensor, keep: Tensor, labels: Tensor | None, tasks: tuple[str, ...]
) -> tuple[Tensor, Tensor]:
    """(dot, squared reference norm), each (T, B), of every sample against reference ``kind``."""
    if isinstance(kind, EMAReference):
        refs = kind.update(blocks, keep.sum(1), tasks)
        dot = sum(b.ref_dots(refs[b.key]) for b in blocks)
        ref_sq = sum(refs[b.key].flatten(1).pow(2).sum(1) for b in blocks)
        return dot, ref_sq[:, None].expand_as(dot).to(dot)
    if kind == "class":
        ids = torch.where(keep, labels, torch.full_like(labels, -1))
        n_groups = int(labels[keep].max()) + 1 if keep.any() else 1
    else:
        ids = torch.where(keep, torch.zeros_like(keep, dtype=torch.long), torch.full_like(keep, -1, dtype=torch.long))
        n_groups = 1
    group_dot = sum(b.group_dots(ids, n_groups) for b in blocks)  # (T, B): ⟨G_i, S_{k(i)}⟩
    tasks_n = group_dot.shape[0]
    own = ids.clamp(min=0)
    group_sq = torch.zeros(tasks_n, n_groups, dtype=sq.dtype, device=sq.device)
    group_sq.scatter_add_(1, own, group_dot * keep)  # ‖S_k‖² = Σ_{i∈k} ⟨G_i, S_k⟩
    counts = torch.zeros(tasks_n, n_groups, dtype=torch.long, device=sq.device)
    counts.scatter_add_(1, own, keep.long())
    group_sq, count = group_sq.gather(1, own), counts.gather(1, own)
    if kind == "batch":
        n = count.clamp(min=1).to(sq.dtype)
        return group_dot / n, group_sq / n**2
    return _leave_one_out(group_dot, group_sq, sq, count)


def global_group_sums(kind, blocks: list[Block], keep: Tensor, labels: Tensor | None, group) -> tuple:
    """Group sums over the *global* batch of a distributed run: (ids, per-block sums (T, K, *space), counts (T, K)).

    Each rank sums its own samples per group; one all-reduce of the concatenated sums (T·K·|θ| floats: the size of
    T·K weight gradients) and one of the counts give every rank the global sums. Per-sample dots stay local.
    """
    import torch.distributed as dist

    if kind == "class":
        top = labels[keep].max() if keep.any() else torch.tensor(-1, device=keep.device)
        top = top.reshape(1).to(torch.long)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)  # every rank needs the same number of classes
        n_groups = max(int(top) + 1, 1)
        ids = torch.where(keep, labels, torch.full_like(labels, -1))
    else:
        n_groups = 1
        ids = torch.where(keep, torch.zeros_like(keep, dtype=torch.long), torch.full_like(keep, -1, dtype=torch.long))
    sums = [b.group_sums(ids, n_groups) for b in blocks]
    flat = torch.cat([s.flatten(2) for s in sums], 2)  # (T, K, Σ|θ_b|)
    counts = torch.zeros(keep.shape[0], n_groups, dtype=torch.long, device=keep.device)
    counts.scatter_add_(1, ids.clamp(min=0), keep.long())
    dist.all_reduce(flat, group=group)
    dist.all_reduce(counts, group=group)
    sizes = [s[0, 0].numel() for s in sums]
    parts = [part.reshape(s.shape) for part, s in zip(flat.split(sizes, 2), sums)]
    return ids, parts, counts


def global_similarity(kind, blocks: list[Block], sq: Tensor, keep: Tensor, labels, group, cache: dict):
    """``similarity`` against references over the global batch of a distributed run (``cache`` keeps the
    all-reduced sums per kind, so one step communicates each kind once)."""
    if isinstance(kind, EMAReference):
        raise NotImplementedError("an EMA reference is not supported in a distributed run; use batch, loo or class")
    key = "class" if kind == "class" else "batch"
    if key not in cache:
        cache[key] = global_group_sums(key, blocks, keep, labels, group)
    ids, sums, counts = cache[key]
    group_dot = sum(b.group_ref_dots(s, ids) for b, s in zip(blocks, sums))  # (T, B)
    group_sq = sum(s.flatten(2).pow(2).sum(2) for s in sums)  # (T, K): ‖S_{t,k}‖²
    own = ids.clamp(min=0)
    group_sq, count = group_sq.gather(1, own), counts.gather(1, own)
    if kind == "batch":
        n = count.clamp(min=1).to(sq.dtype)
        return group_dot / n, group_sq / n**2
    return _leave_one_out(group_dot, group_sq, sq, count)
