"""Testing helpers: a slow, obviously correct oracle and a checker for per-layer rules.

The oracle takes one backward per task and sample, flattens every per-sample gradient into a vector and computes
each statistic from its definition (DESIGN §2). It shares no code with the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def per_sample_gradients(losses: dict[str, Tensor], params: Sequence[Tensor]) -> Tensor:
    """(T, B, D) per-sample gradients ∂ℓ_{t,i}/∂θ by one backward per task and sample, flattened over ``params``."""
    rows = []
    for loss in losses.values():
        task = []
        for i in range(loss.shape[0]):
            grads = torch.autograd.grad(loss[i], list(params), retain_graph=True, allow_unused=True)
            task.append(
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
            )
        rows.append(torch.stack(task))
    return torch.stack(rows)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    na, nb = a.norm(), b.norm()
    return a.dot(b) / (na * nb) if na > 0 and nb > 0 else a.new_zeros(())


def oracle_stats(
    losses: dict[str, Tensor],
    params: Sequence[Tensor],
    labels: dict[str, Tensor] | None = None,
    reference: str = "batch",
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The statistics of DESIGN §5 from explicit per-sample gradients: cosine, dot, norm, ref_norm, task_cosine,
    conflict. Masked samples read NaN; a sample with no reference (alone in its class, or B = 1 for ``loo``) reads 0.
    """
    g = per_sample_gradients(losses, params).detach()
    tasks = list(losses)
    n_tasks, batch, _ = g.shape
    keep = torch.ones(n_tasks, batch, dtype=torch.bool)
    for t, task in enumerate(tasks):
        if masks and task in masks:
            keep[t] = masks[task].cpu()
    nan = float("nan")
    out = {k: torch.full((n_tasks, batch), nan, dtype=g.dtype) for k in ("cosine", "dot", "norm", "ref_norm")}
    means = []
    for t, task in enumerate(tasks):
        kept = [j for j in range(batch) if keep[t, j]]
        means.append(sum((g[t, j] for j in kept), torch.zeros_like(g[t, 0])) / max(len(kept), 1))
        for i in kept:
            if reference == "batch":
                others = kept
            elif reference == "loo":
                others = [j for j in kept if j != i]
            elif reference == "class":
                y = labels[task]
                others = [j for j in kept if j != i and y[j] == y[i]]
            else:
                raise ValueError(f"the oracle knows batch, loo and class; got {reference!r}")
            ref = sum((g[t, j] for j in others), torch.zeros_like(g[t, i])) / max(len(others), 1)
            out["dot"][t, i] = g[t, i].dot(ref)
            out["norm"][t, i] = g[t, i].norm()
            out["ref_norm"][t, i] = ref.norm()
            out["cosine"][t, i] = _cos(g[t, i], ref)
    out["task_cosine"] = torch.stack([torch.stack([_cos(a, b) for b in means]) for a in means])
    conflict = torch.full((batch, n_tasks, n_tasks), nan, dtype=g.dtype)
    for i in range(batch):
        for s in range(n_tasks):
            for t in range(n_tasks):
                if keep[s, i] and keep[t, i]:
                    conflict[i, s, t] = _cos(g[s, i], g[t, i])
    out["conflict"] = conflict
    return out


STATISTICS = ("cosine", "dot", "norm", "ref_norm", "task_cosine", "conflict")


def compare_stats(stats, expected: dict[str, Tensor], atol: float = 1e-6) -> dict[str, float]:
    """Max relative-to-scale error of each statistic; raises AssertionError naming the first that exceeds ``atol``.

    Errors are divided by max(1, max |expected|), so ``dot`` and ``norm`` of large gradients compare in relative
    terms and cosines in absolute terms. NaN must sit exactly where the expectation has NaN.
    """
    errors = {}
    for name in STATISTICS:
        got, want = getattr(stats, name).detach().cpu().to(expected[name].dtype), expected[name]
        if not torch.equal(torch.isnan(got), torch.isnan(want)):
            raise AssertionError(f"{name}: NaN pattern differs from the oracle")
        finite = ~torch.isnan(want)
        if finite.any():
            scale = max(1.0, float(want[finite].abs().max()))
            errors[name] = float((got[finite] - want[finite]).abs().max()) / scale
        else:
            errors[name] = 0.0
        if errors[name] > atol:
            raise AssertionError(f"{name} differs from the per-sample loop oracle by {errors[name]:.3g} (> {atol:g})")
    return errors


def check_grad_rule(
    layer: nn.Module, *inputs: Tensor, tasks: int = 2, atol: float = 1e-6, seed: int = 0
) -> dict[str, float]:
    """Check the rule registered for ``layer`` against the loop oracle, in float64.

    Builds per-sample losses of the layer's output for ``tasks`` random tasks, computes every statistic and the
    weighted gradient through ``sgs_lab.SampleGradients(layer, backend="ghost")`` and compares them with the
    oracle and with autograd. ``inputs`` are the layer's batched inputs (floating ones are cast to float64).
    Returns the largest error per statistic; raises AssertionError when one exceeds ``atol``.
    """
    from .grads import SampleGradients

    layer = copy.deepcopy(layer).double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    gen = torch.Generator().manual_seed(seed)
    probe = SampleGradients(layer, backend="ghost")
    with probe.capture():
        out = layer(*inputs)
    batch = out.shape[0]
    coeffs = [torch.randn(out.shape[1:], generator=gen, dtype=out.dtype) for _ in range(tasks)]
    losses = {f"task{t}": (torch.tanh(out) * c).flatten(1).sum(1) ** 2 for t, c in enumerate(coeffs)}
    labels = {name: torch.randint(0, 2, (batch,), generator=gen) for name in losses}
    params = [p for p in layer.parameters() if p.requires_grad]
    errors = {}
    for reference in ("batch", "loo", "class"):
        stats = probe.compute(losses, labels=labels, reference=reference)
        expected = oracle_stats(losses, params, labels=labels, reference=reference)
        errors.update({f"{reference}:{k}": v for k, v in compare_stats(stats, expected, atol).items()})
    weights = torch.rand(tasks, batch, generator=gen, dtype=out.dtype)
    lam = torch.rand(tasks, generator=gen, dtype=out.dtype)
    total = sum(lam[t] * (weights[t] * loss).mean() for t, loss in enumerate(losses.values()))
    want = torch.autograd.grad(total, params, retain_graph=True)
    for p in params:
        p.grad = None
    stats.backward(weights, lam)
    for p, w in zip(params, want):
        err = float((p.grad - w).abs().max()) / max(1.0, float(w.abs().max()))
        errors["backward"] = max(errors.get("backward", 0.0), err)
        if err > atol:
            raise AssertionError(f"stats.backward differs from autograd by {err:.3g} (> {atol:g})")
    return errors
