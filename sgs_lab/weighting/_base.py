r"""The weighting interface: statistics of one step in, (sample weights, task weights) out.

A method never applies its weights: the trainer hands them to ``stats.backward``, which minimises

.. math::
    L = \sum_t \lambda_t \, \mathrm{mean}_{i \in \mathcal{M}_t} (w_{t,i} \ell_{t,i})

over each task's labelled samples :math:`\mathcal{M}_t`. Everything a method returns is detached.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from ..grads.stats import masked_mean

SCOPES = ("all", "last", "output")


class Method(ABC):
    """Base of every weighting method.

    Subclasses set :attr:`name` (the lowercase CLI name), may set :attr:`reference` (what the probe's ``compute``
    receives) and :attr:`scope` (the probe scope they want), and implement :meth:`weights`. Stateful methods override
    :meth:`after_step`, :meth:`end_epoch`, :meth:`state_dict` and :meth:`load_state_dict`.
    """

    name: ClassVar[str] = ""
    reference: Any = "batch"
    scope: str = "all"
    #: when True the trainer recomputes the mean task losses on the same batch after the optimizer step and passes
    #: them to :meth:`after_step`
    needs_new_losses: bool = False
    #: when True the method's weights depend only on statistics that are exact over the global batch of a
    #: distributed run (``stats.total``, ``stats.gramian``, the references): it may train under torchrun
    distributed: bool = False

    @abstractmethod
    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        """(sample weights (T, B) or None = all ones, task weights (T,) or None = all ones) for this step.

        Detached, finite (masked samples may get any finite value: they are ignored), on ``stats``' device/dtype.
        """

    def after_step(self, stats, new_losses: Tensor | None) -> None:
        """Called after the optimizer step; ``new_losses`` (T,) only when :attr:`needs_new_losses`."""

    def end_epoch(self, epoch: int) -> None:
        """Called once at the end of every epoch."""

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (a deep copy: later steps do not change it)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scope={self.scope!r})"


class EW(Method):
    r"""Equal weighting: every sample and every task weighs 1, :math:`L = \sum_t \mathrm{mean}_i \ell_{t,i}`."""

    name = "ew"
    distributed = True

    def __init__(self, *, scope: str = "all") -> None:
        self.scope = check_choice("scope", scope, SCOPES)

    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        return None, None


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the methods
def check_choice(knob: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{knob} must be one of {list(choices)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_knobs(method: str, knobs: dict, valid: list[str] | tuple[str, ...]) -> None:
    """TypeError naming every unknown knob (and the valid ones)."""
    unknown = [k for k in knobs if k not in valid]
    if unknown:
        raise TypeError(f"unknown knob(s) {unknown} for method {method!r}; valid knobs: {sorted(valid)}")


def signature_knobs(fn) -> list[str] | None:
    """Keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (it then checks them itself)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def task_mean_losses(stats) -> Tensor:
    """(T,) mean loss of each task over its labelled samples (0 for a task without any this step)."""
    return masked_mean(stats.losses, stats.mask)


def uniform_sample_weights(stats) -> Tensor:
    """(T, B): 1 on labelled samples, 0 on masked ones."""
    return stats.mask.to(stats.cosine.dtype)


def snapshot(state: Any) -> Any:
    """A deep copy of a (nested) state, tensors detached, so that later in-place updates do not leak into it."""
    return copy.deepcopy(state)


def to_cpu(state: Any) -> Any:
    """Tensors of a nested state moved to the CPU (checkpoints may be loaded with ``map_location='cuda'``)."""
    if isinstance(state, Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
