"""Small shared-encoder + heads models for the bundled task sets."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..data import TaskSpec


class MultiTaskNet(nn.Module):
    """A shared ``encoder`` and one head per task; ``forward`` returns {task: head output}."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.encoder(x)
        return {task: head(z) for task, head in self.heads.items()}


def _heads(width: int, tasks: dict[str, TaskSpec]) -> dict[str, nn.Module]:
    return {t: nn.Linear(width, spec.n_classes if spec.kind == "classification" else 1) for t, spec in tasks.items()}


def mlp(in_shape: tuple[int, ...], tasks: dict[str, TaskSpec], hidden: tuple[int, ...] = (256, 256)) -> MultiTaskNet:
    """Flatten → (Linear → ReLU) per hidden width, then a linear head per task (DESIGN §2: 144-256-256)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return MultiTaskNet(nn.Sequential(*layers), _heads(width, tasks))


def lenet(in_shape: tuple[int, ...], tasks: dict[str, TaskSpec], channels: tuple[int, int] = (16, 32)) -> MultiTaskNet:
    """A LeNet-style encoder for small images: two 3×3 conv + ReLU + 2×2 max-pool stages, then Linear(·, 128)."""
    c, h, w = in_shape
    encoder = nn.Sequential(
        nn.Conv2d(c, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), 128), nn.ReLU(),
    )  # fmt: skip
    return MultiTaskNet(encoder, _heads(128, tasks))


MODELS = {"mlp": mlp, "lenet": lenet}


def build_model(name: str, in_shape: tuple[int, ...], tasks: dict[str, TaskSpec]) -> MultiTaskNet:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return MODELS[name](in_shape, tasks)


__all__ = ["MODELS", "MultiTaskNet", "build_model", "lenet", "mlp"]
