"""Bundled task sets built from scikit-learn's offline digits (1,797 8×8 images): nothing is downloaded."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .noise import inject_noise, missing_mask

MISSING_STREAM = 7  # separates the random draws of missing labels from those of label noise


@dataclass(frozen=True)
class TaskSpec:
    """``kind`` is "classification" (with ``n_classes``) or "regression"."""

    kind: str
    n_classes: int = 0


@dataclass
class TaskSet(Dataset):
    """A multitask data set held in memory; item i is ``(x[i], {task: label[i]})``.

    Attributes:
        x: (N, *shape) float32 inputs.
        labels: {task: (N,)} the labels training sees (after noise); long for classification, float for regression.
        clean: {task: (N,)} the true labels. noisy: {task: (N,) bool} where labels differ from the truth.
        present: {task: (N,) bool} where a label is given (False: missing, masked out of that task).
        sample_id: (N,) stable ids, unique within the set.
        tasks: {task: TaskSpec}.
    """

    x: Tensor
    labels: dict[str, Tensor]
    tasks: dict[str, TaskSpec]
    sample_id: Tensor
    clean: dict[str, Tensor] = field(default_factory=dict)
    noisy: dict[str, Tensor] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        if n == 0:
            raise ValueError("the data set is empty")
        for task in self.tasks:
            self.clean.setdefault(task, self.labels[task].clone())
            self.noisy.setdefault(task, torch.zeros(n, dtype=torch.bool))
            self.present.setdefault(task, torch.ones(n, dtype=torch.bool))
        for name, mapping in (("labels", self.labels), ("clean", self.clean), ("present", self.present)):
            if set(mapping) != set(self.tasks):
                raise ValueError(f"{name} must cover the tasks {list(self.tasks)}; got {list(mapping)}")
            for task, value in mapping.items():
                if len(value) != n:
                    raise ValueError(f"{name}[{task!r}] has {len(value)} entries for {n} samples")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {task: y[i] for task, y in self.labels.items()}

    def to(self, device, dtype: torch.dtype | None = None) -> TaskSet:
        """The same set on ``device``; inputs also cast to ``dtype`` when given (labels and masks keep theirs)."""

        def move(mapping: dict[str, Tensor]) -> dict[str, Tensor]:
            return {t: v.to(device) for t, v in mapping.items()}

        return TaskSet(
            self.x.to(device, dtype), move(self.labels), self.tasks, self.sample_id.to(device), move(self.clean),
            move(self.noisy), move(self.present),
        )  # fmt: skip

    def fingerprint(self) -> str:
        """A SHA-256 hex digest of the inputs, labels (given and clean), masks, ids and task specs: two sets with
        the same fingerprint train identically (the run cache keys runs by it)."""
        digest = hashlib.sha256()
        # task order matters (it orders the heads and their initialisation): no sorting
        digest.update(repr([(t, s.kind, s.n_classes) for t, s in self.tasks.items()]).encode())
        tensors = [self.x, self.sample_id] + [
            m[t] for t in self.tasks for m in (self.labels, self.clean, self.noisy, self.present)
        ]
        for tensor in tensors:
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def with_noise(self, rates: dict[str, float] | float, *, kind: str = "symmetric", seed: int = 0) -> TaskSet:
        """A copy with ``rates`` of each classification task's labels flipped (see :func:`inject_noise`)."""
        rates = {t: rates for t in self.tasks} if isinstance(rates, (int, float)) else dict(rates)
        labels, noisy = dict(self.labels), dict(self.noisy)
        for k, (task, rate) in enumerate(rates.items()):
            spec = self.tasks[task]
            if spec.kind != "classification":
                if rate:
                    raise ValueError(f"task {task!r} is a regression task: label noise applies to classes only")
                continue
            flipped_labels, flipped = inject_noise(
                self.clean[task].numpy(), rate, spec.n_classes, kind=kind, seed=seed * 1000 + k
            )
            labels[task], noisy[task] = torch.as_tensor(flipped_labels), torch.as_tensor(flipped)
        return TaskSet(self.x, labels, self.tasks, self.sample_id, dict(self.clean), noisy, dict(self.present))

    def with_missing(self, rates: dict[str, float], *, seed: int = 0) -> TaskSet:
        """A copy where a fraction of each named task's labels is missing (``present`` False)."""
        present = dict(self.present)
        for k, (task, rate) in enumerate(rates.items()):
            # a stream of its own: with with_noise's seed the hidden labels would be exactly the flipped ones
            hidden = missing_mask(len(self), rate, seed=[seed, k, MISSING_STREAM])
            present[task] = self.present[task] & torch.as_tensor(hidden)
        return TaskSet(
            self.x, dict(self.labels), self.tasks, self.sample_id, dict(self.clean), dict(self.noisy), present
        )

    def only(self, tasks) -> TaskSet:
        """The same samples with only ``tasks`` (for single-task runs)."""
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are {list(self.tasks)}")

        def pick(mapping: dict[str, Tensor]) -> dict[str, Tensor]:
            return {t: mapping[t] for t in tasks}

        return TaskSet(
            self.x, pick(self.labels), {t: self.tasks[t] for t in tasks}, self.sample_id, pick(self.clean),
            pick(self.noisy), pick(self.present),
        )  # fmt: skip

    def subset(self, index: Tensor) -> TaskSet:
        def pick(mapping: dict[str, Tensor]) -> dict[str, Tensor]:
            return {t: v[index] for t, v in mapping.items()}

        return TaskSet(
            self.x[index],
            pick(self.labels),
            self.tasks,
            self.sample_id[index],
            pick(self.clean),
            pick(self.noisy),
            pick(self.present),
        )


def from_dataset(dataset, tasks: dict[str, TaskSpec] | None = None) -> TaskSet:
    """A :class:`TaskSet` from any map-style dataset whose items are ``(x, {task: label})``.

    ``tasks`` gives each task's kind; by default integer labels make a classification task with
    ``max + 1`` classes and float labels a regression task. Sample ids are the dataset indices; noise and missing
    labels can then be injected with :meth:`TaskSet.with_noise` / :meth:`TaskSet.with_missing`.
    """
    if len(dataset) == 0:
        raise ValueError("the data set is empty")
    items = [dataset[i] for i in range(len(dataset))]
    for i, item in enumerate(items[:1]):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
            raise TypeError(f"item {i} must be (x, {{task: label}}); got {type(item).__name__}")
    x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
    names = list(items[0][1])
    labels = {t: torch.stack([torch.as_tensor(item[1][t]) for item in items]) for t in names}
    if tasks is None:
        tasks = {
            t: TaskSpec("classification", int(y.max()) + 1) if not y.is_floating_point() else TaskSpec("regression")
            for t, y in labels.items()
        }
    labels = {t: y.long() if tasks[t].kind == "classification" else y.float() for t, y in labels.items()}
    return TaskSet(x, labels, tasks, torch.arange(len(items)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the bundled digits come from scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _split_sources(n_sources: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n_sources)
    n_test = int(round(test_fraction * n_sources))
    return order[n_test:], order[:n_test]


def make_multidigits(
    n_train: int = 6000, n_test: int = 2000, *, seed: int = 0, jitter: int = 1, test_fraction: float = 0.3
) -> tuple[TaskSet, TaskSet]:
    """MultiDigits: two digits overlaid on a 12×12 canvas; tasks "left" (top-left digit) and "right" (bottom-right).

    Train and test draw their digits from disjoint source images (``test_fraction`` of the 1,797 go to test).
    Each digit is shifted by up to ``jitter`` pixels; overlapping pixels take the maximum. Inputs are (N, 1, 12, 12)
    in [0, 1]. Sample ids are 0..n_train−1 for train and n_train.. for test.
    """
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"MultiDigits needs positive sizes; got n_train={n_train}, n_test={n_test}")
    images, targets = _digits()
    train_src, test_src = _split_sources(len(images), test_fraction, seed)
    rng = np.random.default_rng(seed + 1)

    def compose(sources: np.ndarray, n: int, first_id: int) -> TaskSet:
        left, right = rng.choice(sources, n), rng.choice(sources, n)
        canvas = np.zeros((n, 14, 14), dtype=np.float32)
        shifts = rng.integers(0, 2 * jitter + 1, size=(n, 4))
        for i in range(n):  # left digit near the top-left corner, right digit near the bottom-right
            r, c = shifts[i, 0], shifts[i, 1]
            canvas[i, r : r + 8, c : c + 8] = images[left[i]]
            r, c = 4 + shifts[i, 2], 4 + shifts[i, 3]
            np.maximum(canvas[i, r : r + 8, c : c + 8], images[right[i]], out=canvas[i, r : r + 8, c : c + 8])
        x = torch.from_numpy(canvas[:, 1:13, 1:13].copy()).unsqueeze(1)
        labels = {"left": torch.from_numpy(targets[left]), "right": torch.from_numpy(targets[right])}
        tasks = {t: TaskSpec("classification", 10) for t in labels}
        return TaskSet(x, labels, tasks, torch.arange(first_id, first_id + n))

    return compose(train_src, n_train, 0), compose(test_src, n_test, n_train)


LOOPED_DIGITS = (0, 6, 8, 9)


def make_digit_attributes(*, seed: int = 0, test_fraction: float = 0.3) -> tuple[TaskSet, TaskSet]:
    """Related tasks on single 8×8 digits: "digit" (10 classes), "parity" (odd), "large" (≥ 5), "loop"
    (0, 6, 8 or 9) and the regression target "ink" (standardised total ink). Inputs (N, 1, 8, 8)."""
    images, targets = _digits()
    train_src, test_src = _split_sources(len(images), test_fraction, seed)
    ink = images.reshape(len(images), -1).sum(1)
    ink = (ink - ink[train_src].mean()) / ink[train_src].std()

    def build(index: np.ndarray) -> TaskSet:
        y = torch.from_numpy(targets[index])
        labels = {
            "digit": y,
            "parity": y % 2,
            "large": (y >= 5).long(),
            "loop": torch.isin(y, torch.tensor(LOOPED_DIGITS)).long(),
            "ink": torch.from_numpy(ink[index].astype(np.float32)),
        }
        tasks = {"digit": TaskSpec("classification", 10), "ink": TaskSpec("regression")}
        tasks.update({t: TaskSpec("classification", 2) for t in ("parity", "large", "loop")})
        tasks = {t: tasks[t] for t in labels}
        return TaskSet(
            torch.from_numpy(images[index]).unsqueeze(1), labels, tasks, torch.from_numpy(index.astype(np.int64))
        )

    return build(np.sort(train_src)), build(np.sort(test_src))
