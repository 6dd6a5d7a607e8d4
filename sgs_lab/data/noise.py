"""Label noise and missing labels, injected per task with the ground truth kept."""

from __future__ import annotations

import numpy as np

NOISE_KINDS = ("symmetric", "pairflip")


def inject_noise(
    labels: np.ndarray, rate: float, n_classes: int, *, kind: str = "symmetric", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flip a fraction ``rate`` of ``labels`` (N,) and return (noisy labels, flipped mask).

    ``symmetric``: a flipped label goes uniformly to one of the *other* classes; ``pairflip``: class c goes to
    (c + 1) mod K. Exactly round(rate · N) labels are flipped, chosen uniformly; each is guaranteed to change.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must lie in [0, 1); got {rate}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {list(NOISE_KINDS)}")
    if n_classes < 2 and rate > 0:
        raise ValueError("label noise needs at least two classes")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.permutation(len(labels))[: int(round(rate * len(labels)))]] = True
    noisy = labels.copy()
    if kind == "symmetric":
        shift = rng.integers(1, n_classes, size=len(labels))  # 1..K-1: never the true class
    else:
        shift = np.ones(len(labels), dtype=np.int64)
    noisy[flipped] = (labels[flipped] + shift[flipped]) % n_classes
    return noisy, flipped


def missing_mask(n: int, rate: float, *, seed: int | list[int] = 0) -> np.ndarray:
    """(N,) bool: True where the label is present; a fraction ``rate`` is missing."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing-label rate must lie in [0, 1); got {rate}")
    present = np.ones(n, dtype=bool)
    present[np.random.default_rng(seed).permutation(n)[: int(round(rate * n))]] = False
    return present
