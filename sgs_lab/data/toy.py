"""Toy 2-D two-objective problems with controllable conflict, for teaching gradient conflict."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ToyProblem:
    """Two quadratic bowls f_k(θ) = ½‖A_k(θ − c_k)‖² on θ ∈ ℝ², their minima ``angle`` degrees apart as seen
    from the origin (on the unit circle); ``anisotropy`` stretches each bowl along its own axis.

    At the origin the two gradients point towards their minima, so their cosine is cos(angle): 0° — aligned,
    90° — orthogonal, above 90° — conflicting. ``losses(θ)`` works on a batch of points (N, 2) and is
    differentiable, so the engine and every weighting method run on it like on a network.
    """

    angle: float = 120.0
    anisotropy: float = 1.0

    def centres(self) -> Tensor:
        half = math.radians(self.angle) / 2
        return torch.tensor([[math.cos(half), math.sin(half)], [math.cos(half), -math.sin(half)]])

    def scales(self) -> Tensor:
        """(2, 2, 2): A_k, each a rotation of diag(anisotropy, 1) aligned with its centre."""
        mats = []
        for c in self.centres():
            rot = torch.stack([c, torch.stack([-c[1], c[0]])])  # rows: along the centre, across it
            mats.append(rot.T @ torch.diag(torch.tensor([self.anisotropy, 1.0])) @ rot)
        return torch.stack(mats)

    def losses(self, theta: Tensor) -> Tensor:
        """(2, N) objective values at points ``theta`` (N, 2)."""
        diff = theta[None] - self.centres()[:, None].to(theta)  # (2, N, 2)
        scaled = torch.einsum("kij,knj->kni", self.scales().to(theta), diff)
        return 0.5 * scaled.pow(2).sum(-1)

    def gradients(self, theta: Tensor) -> Tensor:
        """(2, N, 2) ∇f_k at each point (closed form: A_kᵀA_k(θ − c_k))."""
        diff = theta[None] - self.centres()[:, None].to(theta)
        gram = self.scales().to(theta)
        return torch.einsum("kij,kjl,knl->kni", gram.transpose(1, 2), gram, diff)

    def conflict(self, theta: Tensor) -> Tensor:
        """(N,) cosine between the two gradients at each point."""
        g = self.gradients(theta)
        return torch.nn.functional.cosine_similarity(g[0], g[1], dim=-1)
