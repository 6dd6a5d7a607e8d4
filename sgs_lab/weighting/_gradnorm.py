r"""GradNorm: task weights that equalise the tasks' gradient norms at rates set by their training progress.

Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, `GradNorm: Gradient Normalization for Adaptive Loss Balancing
in Deep Multitask Networks <https://proceedings.mlr.press/v80/chen18a.html>`_, ICML 2018. torchjd has no GradNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import SCOPES, Method, check_choice, snapshot, task_mean_losses, to_cpu


class GradNorm(Method):
    r"""Learnable task weights :math:`\lambda` (initially 1) moved by one gradient step on the GradNorm loss per step.

    With :math:`\lVert \bar g_t \rVert = \sqrt{\mathrm{gramian}_{tt}}` the norm of the gradient of task :math:`t`'s
    mean loss with respect to the probed (shared) parameters — read from the statistics, no extra backward —,
    :math:`L_t` the task's mean loss over its labelled samples and :math:`L_t(0)` its value at the first step the
    task had labels:

    .. math::
        G_t = \lambda_t \lVert \bar g_t \rVert, \quad
        r_t = \frac{L_t / L_t(0)}{\mathrm{mean}_k L_k / L_k(0)}, \quad
        \mathrm{target}_t = \mathrm{mean}_k(G_k) \, r_t^{\alpha} \ \text{(a constant)},

    .. math::
        \frac{\partial}{\partial \lambda_t} \sum_k \lvert G_k - \mathrm{target}_k \rvert
        = \mathrm{sign}(G_t - \mathrm{target}_t) \lVert \bar g_t \rVert, \quad
        \lambda \leftarrow \max(0, \lambda - \mathrm{lr} \cdot \nabla), \quad \lambda \leftarrow T \lambda / \sum \lambda.

    :meth:`weights` returns :math:`(\mathrm{None}, \lambda)` with the :math:`\lambda` from *before* this step's update
    (as in the paper: the step's loss uses :math:`\lambda(k)`, the update gives :math:`\lambda(k+1)`). A task
    without labelled samples in a step has :math:`r_t = 1`. Plain gradient descent on :math:`\lambda` (the paper uses
    the model's optimizer). Use ``scope="all"`` or ``"last"`` (the paper's last shared layer).

    :param alpha: the asymmetry :math:`\alpha` (larger pulls lagging tasks harder).
    :param lr: the learning rate of :math:`\lambda`.
    """

    name = "gradnorm"

    def __init__(self, *, alpha: float = 1.5, lr: float = 0.025, scope: str = "all") -> None:
        if lr < 0:
            raise ValueError(f"lr must be non-negative; got {lr}")
        self.alpha, self.lr = float(alpha), float(lr)
        self.scope = check_choice("scope", scope, SCOPES)
        self.task_weights: Tensor | None = None  # (T,) float64 on the CPU
        self.initial_losses: Tensor | None = None  # (T,) L_t(0); NaN until the task had labelled samples

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, lr={self.lr}, scope={self.scope!r})"

    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        like = stats.cosine
        n_tasks = stats.mask.shape[0]
        losses = task_mean_losses(stats).detach().to("cpu", torch.float64)  # (T,)
        present = stats.mask.any(1).cpu()
        norms = torch.diagonal(stats.gramian).detach().to("cpu", torch.float64).clamp(min=0).sqrt()  # (T,)
        if self.task_weights is None:
            self.task_weights = torch.ones(n_tasks, dtype=torch.float64)
            self.initial_losses = torch.full((n_tasks,), float("nan"), dtype=torch.float64)
        if self.task_weights.shape[0] != n_tasks:
            raise ValueError(f"GradNorm was tracking {self.task_weights.shape[0]} tasks; got {n_tasks}")
        first = present & self.initial_losses.isnan()
        self.initial_losses = torch.where(first, losses, self.initial_losses)
        used = self.task_weights.clone()

        known = present & (self.initial_losses > 0)
        ratio = torch.where(known, losses / self.initial_losses.where(known, torch.ones_like(losses)), 1.0)
        mean_ratio = ratio.mean()
        relative = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)  # r_t
        weighted = used * norms  # G_t
        target = weighted.mean() * relative**self.alpha
        grad = torch.sign(weighted - target) * norms
        updated = (used - self.lr * grad).clamp(min=0)
        total = updated.sum()
        self.task_weights = n_tasks * updated / total if total > 0 else torch.ones_like(updated)
        return None, used.to(device=like.device, dtype=like.dtype)

    def state_dict(self) -> dict:
        return snapshot({"task_weights": self.task_weights, "initial_losses": self.initial_losses})

    def load_state_dict(self, state: dict) -> None:
        state = to_cpu(snapshot(state))
        self.task_weights, self.initial_losses = state["task_weights"], state["initial_losses"]
