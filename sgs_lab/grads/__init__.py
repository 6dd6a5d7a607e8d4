"""Exact per-sample, per-task gradient statistics (DESIGN §3): the probe, its rules, references and statistics."""

from .probe import BACKENDS, SCOPES, SampleGradients, SGSFallbackWarning
from .references import REFERENCES, EMAReference
from .rules import register_grad_rule
from .stats import GradStats, Similarity

__all__ = [
    "BACKENDS",
    "REFERENCES",
    "SCOPES",
    "EMAReference",
    "GradStats",
    "SGSFallbackWarning",
    "SampleGradients",
    "Similarity",
    "register_grad_rule",
]
