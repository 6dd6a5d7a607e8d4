"""GradStats: the per-sample, per-task statistics of one batch, and the weighted update from what was captured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._blocks import Block
from .references import _safe_cosine, global_group_sums, global_similarity, similarity


class Similarity(NamedTuple):
    cosine: Tensor  # (T, B)
    dot: Tensor  # (T, B)
    ref_norm: Tensor  # (T, B)


@dataclass(eq=False)
class GradStats:
    """Statistics of one captured batch; every tensor is detached, float32 (float64 for a float64 module).

    Samples that a task's mask leaves out read NaN in that task's rows (and in ``conflict`` pairs with that task).

    Attributes:
        tasks: task names, in the order of the ``losses`` given to ``compute``.
        cosine, dot, norm, ref_norm: (T, B) — cos(g_{t,i}, R_{t,i}), ⟨g_{t,i}, R_{t,i}⟩, ‖g_{t,i}‖, ‖R_{t,i}‖.
        task_cosine: (T, T) — cosine between the tasks' (masked) batch-mean gradients.
        gramian: (T, T) — ⟨ḡ_s, ḡ_t⟩ of those mean gradients (the Gramian that gradient-aggregation methods weigh).
        conflict: (B, T, T) — per-sample cosine between one sample's gradients for two tasks.
        mask: (T, B) bool — which samples count for which task.
        losses: (T, B) — the per-sample losses, detached.
        reference: the reference the similarity columns use.
        fallback: parameters computed by batched autograd because no rule covers them.
        strategies: block → how it was contracted ("gram", "materialise", "materialised", …).
    """

    tasks: tuple[str, ...]
    cosine: Tensor
    dot: Tensor
    norm: Tensor
    ref_norm: Tensor
    task_cosine: Tensor
    gramian: Tensor
    conflict: Tensor
    mask: Tensor
    losses: Tensor
    reference: object
    fallback: tuple[str, ...]
    strategies: dict[str, str]
    _blocks: list[Block] = field(repr=False)
    _sq: Tensor = field(repr=False)
    _labels: Tensor | None = field(repr=False)
    _attached_losses: list[Tensor] = field(repr=False)
    _autograd_leaves: list[Tensor] = field(repr=False)
    _head_leaves: list[Tensor] = field(repr=False)
    _used: bool = field(default=False, repr=False)
    _counts: Tensor | None = field(default=None, repr=False)  # (T,) labelled samples over the global batch
    _group: object = field(default=None, repr=False)  # the process group of a distributed run
    _global: dict = field(default_factory=dict, repr=False)  # all-reduced group sums, per reference kind

    def __repr__(self) -> str:
        return (
            f"GradStats(tasks={list(self.tasks)}, batch={self.cosine.shape[1]}, reference={self.reference!r}, "
            f"fallback={list(self.fallback)})"
        )

    def similarity(self, reference="class", labels: dict[str, Tensor] | None = None) -> Similarity:
        """Cosine, dot and reference norm against another reference, from the same capture (no new backward).

        ``labels`` are needed for ``"class"`` unless ``compute`` already had them.
        """
        from .probe import check_labels

        label_tensor = self._labels
        if labels is not None:
            label_tensor = check_labels(labels, self.tasks, self.mask.shape[1], self.mask.device)
        if reference == "class" and label_tensor is None:
            raise ValueError('reference="class" needs integer labels: pass labels={task: (B,) tensor}')
        cache = self._global
        if labels is not None:  # other labels: other class sums, kept out of the cache of the stats' own labels
            cache = {k: v for k, v in self._global.items() if k != "class"}
        return _similarity(reference, self._blocks, self._sq, self.mask, label_tensor, self.tasks, self._group,
                           cache)  # fmt: skip

    def total(self, values: Tensor) -> Tensor:
        """Σ over the samples (last dimension) of ``values`` — over the global batch in a distributed run (one
        all-reduce), so weighting methods normalise exactly as one process holding the whole batch would."""
        out = values.sum(-1)
        if self._group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self._group)
        return out

    def labelled_mean(self, values: Tensor) -> Tensor:
        """(T, B) values → (T,) mean over each task's labelled samples of the (global) batch; 0 where none."""
        count = self.total(self.mask.to(values.dtype)).clamp(min=1)
        return self.total(torch.where(self.mask, values, torch.zeros_like(values))) / count

    def batch_max(self, values: Tensor) -> Tensor:
        """Max over the samples (last dimension), over the global batch in a distributed run."""
        out = values.amax(-1)
        if self._group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self._group)
        return out

    def backward(
        self, sample_weights: Tensor | None = None, task_weights: Tensor | None = None, *, heads: bool = True
    ) -> None:
        """Accumulate the gradient of L = Σ_t λ_t · mean_i(w_{t,i} ℓ_{t,i}) into ``.grad``.

        The mean runs over each task's labelled (unmasked) samples. ``sample_weights`` (T, B) and ``task_weights``
        (T,) are treated as constants (default: ones). Parameters covered by a rule get their gradient from the
        captured activations and output gradients — no second backward through the module. Everything else the
        losses depend on (parameters out of scope, and with ``heads=True`` the heads' parameters, found by walking
        the loss graph down to the module's output) gets it from one ordinary backward of L that stops at the
        module's output. That backward frees the heads' graph: call ``backward`` once per ``compute``.
        """
        if self._used:
            raise RuntimeError("backward() was already called for these statistics; compute() again for a new step")
        n_tasks, batch = self.mask.shape
        ref = self.cosine
        w = torch.ones_like(ref) if sample_weights is None else _check_weights(sample_weights, (n_tasks, batch), ref)
        lam = torch.ones(n_tasks, dtype=ref.dtype, device=ref.device)
        if task_weights is not None:
            lam = _check_weights(task_weights, (n_tasks,), ref, "task_weights")
        coef = self._coefficients(lam[:, None] * w)
        self._start()
        for block in self._blocks:
            block.accumulate_grad(coef)
        self._backward_rest(coef, heads)

    def _coefficients(self, weights: Tensor) -> Tensor:
        """(T, B) weights → per-sample coefficients of L: weight / labelled count, 0 on masked samples."""
        counts = (self.mask.sum(1) if self._counts is None else self._counts).clamp(min=1).to(weights.dtype)
        return torch.where(self.mask, weights / counts[:, None], torch.zeros_like(weights))

    def _start(self) -> None:
        if self._used:
            raise RuntimeError("backward() was already called for these statistics; compute() again for a new step")
        self._used = True

    def _backward_rest(self, coef: Tensor, heads: bool) -> None:
        """One ordinary backward of Σ coef·ℓ for what no block covers (out of scope) and, with ``heads``, the heads."""
        leaves = self._autograd_leaves + (self._head_leaves if heads else [])
        if leaves:
            total = sum((loss * c.to(loss.dtype)).sum() for loss, c in zip(self._attached_losses, coef))
            torch.autograd.backward(total, inputs=leaves)

    def jacobian(self) -> Tensor:
        """(T, P): each task's mean gradient over the probed parameters (labelled samples), rows concatenated block
        by block — what a gradient-aggregation method combines. Needs a parameter scope (not ``"output"``)."""
        if self._group is not None:
            raise NotImplementedError("jacobian() is not supported in a distributed run (aggregators need the whole "
                                      "task gradients on one process); use a Gramian weighting, EW or SGS")  # fmt: skip
        blocks = [b for b in self._blocks if b.slots]
        if not blocks:
            raise ValueError('jacobian() needs parameters: probe with scope="all" or "last", not "output"')
        counts = self.mask.sum(1).clamp(min=1)[:, None]
        rows = [sums.flatten(1) / counts.to(sums.dtype) for sums in (b.batch_sums() for b in blocks)]
        return torch.cat(rows, 1)

    def apply_direction(self, direction: Tensor, *, heads: bool = True) -> None:
        """Add ``direction`` (P,), laid out as the columns of :meth:`jacobian`, to the probed parameters' ``.grad``.

        Everything else (parameters out of scope and, with ``heads=True``, the heads) gets the gradient of the
        equally weighted loss Σ_t mean_i ℓ_{t,i} from one ordinary backward that stops at the module's output.
        """
        blocks = [b for b in self._blocks if b.slots]
        like = [b.batch_sums()[0] for b in blocks]  # each block's parameter space (its shape and dtype)
        sizes = [t.numel() for t in like]
        if direction.dim() != 1 or direction.numel() != sum(sizes):
            raise ValueError(
                f"direction must have shape ({sum(sizes)},) like a row of jacobian(); got {tuple(direction.shape)}"
            )
        self._start()
        for block, part, space in zip(blocks, direction.detach().split(sizes), like):
            block.write_grad(part.reshape(space.shape).to(space.dtype))
        self._backward_rest(self._coefficients(torch.ones_like(self.cosine)), heads)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(T, B) values, (T, B) bool mask → (T,) mean over each row's kept entries (0 where none; NaN elsewhere ignored)."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum(1) / mask.sum(1).clamp(min=1).to(values.dtype)


def _check_weights(value: Tensor, shape: tuple, like: Tensor, name: str = "sample_weights") -> Tensor:
    value = torch.as_tensor(value)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (tasks in the order of the losses); got {tuple(value.shape)}")
    value = value.detach().to(like)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return value


def _similarity(reference, blocks, sq, keep, labels, tasks, group=None, cache=None) -> Similarity:
    if group is None:
        dot, ref_sq = similarity(reference, blocks, sq, keep, labels, tasks)
    else:
        dot, ref_sq = global_similarity(reference, blocks, sq, keep, labels, group, cache)
    cosine = _safe_cosine(dot, sq, ref_sq)
    nan = torch.full_like(dot, float("nan"))
    return Similarity(
        cosine=torch.where(keep, cosine, nan),
        dot=torch.where(keep, dot, nan),
        ref_norm=torch.where(keep, ref_sq.clamp(min=0).sqrt(), nan),
    )


def assemble(
    blocks: list[Block],
    *,
    tasks: tuple[str, ...],
    keep: Tensor,
    labels: Tensor | None,
    reference,
    losses: list[Tensor],
    dtype: torch.dtype,
    autograd_leaves: list[Tensor],
    head_leaves: list[Tensor],
    fallback: tuple[str, ...],
    group=None,
) -> GradStats:
    n_tasks, batch = keep.shape
    device = keep.device
    cross = torch.zeros(batch, n_tasks, n_tasks, dtype=dtype, device=device)
    gram = torch.zeros(n_tasks, n_tasks, dtype=dtype, device=device)
    for block in blocks:  # cross first: a materialising block then forms its per-sample gradients once
        cross += block.cross()
        if group is None:
            gram += block.task_gram()
    global_sums, counts = {}, keep.sum(1)
    if group is not None:  # the tasks' sums over the global batch: one all-reduce, reused by the batch reference
        global_sums["batch"] = global_group_sums("batch", blocks, keep, labels, group)
        _, sums, group_counts = global_sums["batch"]
        flat = torch.cat([s[:, 0].flatten(1) for s in sums], 1)  # (T, Σ|θ_b|)
        gram, counts = flat @ flat.T, group_counts[:, 0]
    sq = torch.diagonal(cross, dim1=1, dim2=2).T.contiguous()  # (T, B)
    sim = _similarity(reference, blocks, sq, keep, labels, tasks, group, global_sums)
    diag = torch.diagonal(cross, dim1=1, dim2=2)  # (B, T)
    conflict = _safe_cosine(cross, diag[:, :, None], diag[:, None, :])
    both = keep.T[:, :, None] & keep.T[:, None, :]
    conflict = torch.where(both, conflict, torch.full_like(conflict, float("nan")))
    gram_diag = torch.diagonal(gram)
    task_cosine = _safe_cosine(gram, gram_diag[:, None], gram_diag[None, :])
    n = counts.clamp(min=1).to(dtype)
    gramian = gram / (n[:, None] * n[None, :])
    norm = torch.where(keep, sq.clamp(min=0).sqrt(), torch.full_like(sq, float("nan")))
    return GradStats(
        tasks=tasks,
        cosine=sim.cosine,
        dot=sim.dot,
        norm=norm,
        ref_norm=sim.ref_norm,
        task_cosine=task_cosine,
        gramian=gramian,
        conflict=conflict,
        mask=keep,
        losses=torch.stack([loss.detach().to(dtype) for loss in losses]),
        reference=reference,
        fallback=fallback,
        strategies={b.key: getattr(b, "strategy", "materialised") for b in blocks},
        _blocks=blocks,
        _sq=sq,
        _labels=labels,
        _attached_losses=losses,
        _autograd_leaves=autograd_leaves,
        _head_leaves=head_leaves,
        _counts=counts if group is not None else None,
        _group=group,
        _global=global_sums,
    )


def module_dtype(module: nn.Module) -> torch.dtype:
    """Statistics dtype: float64 for a float64 module, else float32 (bf16/fp16 accumulate in float32)."""
    for p in module.parameters():
        if p.is_floating_point():
            return torch.promote_types(p.dtype, torch.float32)
    return torch.float32
