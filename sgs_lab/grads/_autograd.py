"""Autograd pieces: batched vector–Jacobian products over tasks, per-sample fallbacks, and the loss-graph walk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _zeros_for_unused(grads, inputs, lead: tuple[int, ...]) -> list[Tensor]:
    return [
        torch.zeros(lead + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def task_vjp(
    losses: list[Tensor], inputs: list[Tensor], weights: Tensor, outputs: list[Tensor] | None = None
) -> list[Tensor]:
    """∂(Σ_i weights[t,i] ℓ_{t,i})/∂x for every task t and input x, batched over tasks: each (T, *x.shape).

    With ``outputs`` (the module's outputs, through which every loss reaches ``inputs``) it goes in two stages:
    each task's gradient at the outputs through its own head, then one backward through the module batched over
    tasks — so each head is traversed once, not T times.
    """
    n_tasks = len(losses)
    if outputs is not None and n_tasks > 1:
        at_outputs = [
            _zeros_for_unused(torch.autograd.grad(loss, outputs, w, retain_graph=True, allow_unused=True), outputs, ())
            for loss, w in zip(losses, weights)
        ]
        seeds = [torch.stack([task[k] for task in at_outputs]) for k in range(len(outputs))]
        grads = torch.autograd.grad(outputs, inputs, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
        return _zeros_for_unused(grads, inputs, (n_tasks,))
    if n_tasks == 1:
        grads = torch.autograd.grad(losses, inputs, [weights[0]], retain_graph=True, allow_unused=True)
        return [g.unsqueeze(0) for g in _zeros_for_unused(grads, inputs, ())]
    eye = torch.eye(n_tasks, dtype=weights.dtype, device=weights.device)
    grad_outputs = [eye[:, t, None] * weights[t] for t in range(n_tasks)]  # task t's loss seeds row t only
    grads = torch.autograd.grad(
        losses, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    return _zeros_for_unused(grads, inputs, (n_tasks,))


def per_sample_batched(losses: list[Tensor], params: list[Tensor], weights: Tensor) -> list[Tensor]:
    """Per-sample gradients ∂ℓ_{t,i}/∂θ by one batched backward over all (t, i): each (T, B, *θ.shape)."""
    n_tasks, batch = weights.shape
    seeds = torch.zeros(n_tasks, batch, n_tasks, batch, dtype=weights.dtype, device=weights.device)
    for t in range(n_tasks):
        seeds[t, :, t, :] = torch.diag(weights[t])
    grad_outputs = [seeds[:, :, t].reshape(n_tasks * batch, batch) for t in range(n_tasks)]
    grads = torch.autograd.grad(
        losses, params, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    grads = _zeros_for_unused(grads, params, (n_tasks * batch,))
    return [g.reshape(n_tasks, batch, *g.shape[1:]) for g in grads]


def per_sample_loop(losses: list[Tensor], params: list[Tensor], weights: Tensor) -> list[Tensor]:
    """The slow oracle: one backward per task and sample. Each (T, B, *θ.shape)."""
    n_tasks, batch = weights.shape
    out = [torch.zeros(n_tasks, batch, *p.shape, dtype=p.dtype, device=p.device) for p in params]
    for t, loss in enumerate(losses):
        for i in range(batch):
            if weights[t, i] == 0:
                continue
            grads = torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
            for o, g in zip(out, grads):
                if g is not None:
                    o[t, i] = g * weights[t, i]
    return out


@dataclass
class GraphFacts:
    """What one walk of the loss graph tells: the heads' leaves, how often each rule-covered parameter is consumed,
    whether a loss taps a captured layer output other than through the module's outputs, and whether one module
    output is computed from another."""

    head_leaves: list[Tensor]
    consumers: dict[int, int]
    bypass: bool
    chained_outputs: bool


def _walk(roots, stop=frozenset()):
    """Iterate over the autograd nodes reachable from ``roots`` without expanding nodes in ``stop``."""
    seen, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node not in stop:
            todo.extend(next_node for next_node, _ in node.next_functions)


def inspect_graph(
    tasks, losses: list[Tensor], outputs: list[Tensor], module_param_ids: set[int], internal: set, watched: set[int]
) -> GraphFacts:
    stop = {z.grad_fn for z in outputs if z.grad_fn is not None}
    leaves: dict[int, Tensor] = {}
    bypass = False
    for task, loss in zip(tasks, losses):
        reached = False
        for node in _walk([loss.grad_fn], stop):
            if node in stop:
                reached = True
                continue
            bypass = bypass or node in internal
            variable = getattr(node, "variable", None)  # AccumulateGrad holds its leaf
            if variable is not None and id(variable) not in module_param_ids:
                leaves[id(variable)] = variable
        if not reached:
            raise ValueError(
                f"loss {task!r} is not connected to the captured forward: compute it from the module's output "
                "produced inside `with probe.capture():`"
            )
    consumers: dict[int, int] = {}
    for node in _walk([loss.grad_fn for loss in losses]):
        for next_node, _ in node.next_functions:
            variable = getattr(next_node, "variable", None)
            if variable is not None and id(variable) in watched:
                consumers[id(variable)] = consumers.get(id(variable), 0) + 1
    chained = False
    if len(stop) > 1:
        for z in stop:
            chained = chained or any(node in stop and node is not z for node in _walk(n for n, _ in z.next_functions))
    return GraphFacts(list(leaves.values()), consumers, bypass, chained)
