"""Weighting methods: per-step statistics (:class:`~sgs_lab.GradStats`) in, sample and task weights out.

Every method is a :class:`Method`; :func:`make_method` builds one from its lowercase name and keyword knobs.

>>> import torch
>>> from sgs_lab.weighting import make_method
>>> method = make_method("sgs", warmup=0)
>>> method
SGS(reference='batch', scope='output', similarity='cosine', sample_rule='affine', temperature=1.0, alpha=1.0, \
clamp=None, task_rule='consistency', task_temperature=0.5, warmup=0)
>>> make_method("upgrad")
TorchJDWeighting('upgrad', scope='all')

Three kinds: loss weightings (``ew``, ``sgs``, ``gradnorm``, torchjd's scalarizers) and Gramian weightings (MGDA,
PCGrad, …) return weights for ``stats.backward``; aggregators that need the task gradients themselves (GradDrop,
ConFIG, ExcessMTL, Nash-MTL — the last needs ``pip install "torchjd[nash-mtl]"``) set ``needs_jacobian`` and
return a direction for ``stats.apply_direction``.
"""

from __future__ import annotations

from functools import partial

from ._base import EW, Method, check_knobs, signature_knobs
from ._gradnorm import GradNorm
from ._sgs import SGS
from ._torchjd import AGGREGATORS, GRAMIAN, SCALARIZERS, TorchJDAggregator, TorchJDScalarizer, TorchJDWeighting

#: name → factory taking the method's keyword knobs
METHODS: dict = {
    "ew": EW,
    "sgs": SGS,
    "gradnorm": GradNorm,
    **{name: partial(TorchJDWeighting, name) for name in GRAMIAN},
    **{name: partial(TorchJDScalarizer, name) for name in SCALARIZERS},
    **{name: partial(TorchJDAggregator, name) for name in AGGREGATORS},
}

#: name → one-line description (the CLI lists these)
METHOD_HELP: dict[str, str] = {
    "ew": "equal weighting: every sample and task weighs 1",
    "sgs": "sample gradient similarity (Peng et al. 2023): robust samples and consistent tasks weigh more",
    "gradnorm": "GradNorm (Chen et al. 2018): learned task weights equalising gradient norms by training rate",
    **{name: spec.help for name, spec in GRAMIAN.items()},
    **{name: spec.help for name, spec in SCALARIZERS.items()},
    **{name: spec.help for name, spec in AGGREGATORS.items()},
}

_NOT_PROVIDED: dict[str, str] = {}


def make_method(name: str, **knobs) -> Method:
    """The weighting method ``name`` (see :data:`METHOD_HELP`) with its keyword ``knobs``.

    :raises ValueError: for an unknown name (the message lists the valid ones).
    :raises TypeError: for a knob the method does not take (the message names it).
    :raises ImportError: when the method needs an optional solver that is not installed (e.g. ``cagrad``).
    """
    if name not in METHODS:
        why = f" ({_NOT_PROVIDED[name]})" if name in _NOT_PROVIDED else ""
        raise ValueError(f"unknown method {name!r}{why}; valid methods: {sorted(METHODS)}")
    factory = METHODS[name]
    valid = signature_knobs(factory)
    if valid is not None:
        check_knobs(name, knobs, valid)
    return factory(**knobs)


def available_methods() -> list[str]:
    """Names of the methods usable here (those whose optional solvers are installed), in :data:`METHODS` order."""
    usable = []
    for name in METHODS:
        try:
            make_method(name)
        except ImportError:
            continue
        usable.append(name)
    return usable


__all__ = [
    "AGGREGATORS",
    "EW",
    "GRAMIAN",
    "METHODS",
    "METHOD_HELP",
    "SCALARIZERS",
    "SGS",
    "GradNorm",
    "Method",
    "TorchJDAggregator",
    "TorchJDScalarizer",
    "TorchJDWeighting",
    "available_methods",
    "make_method",
]
