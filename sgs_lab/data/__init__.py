"""Task sets: MultiDigits and digit attributes (bundled, offline), toy 2-D problems, label noise, user data."""

from .digits import LOOPED_DIGITS, TaskSet, TaskSpec, make_digit_attributes, make_multidigits
from .noise import NOISE_KINDS, inject_noise, missing_mask

__all__ = [
    "LOOPED_DIGITS",
    "NOISE_KINDS",
    "TaskSet",
    "TaskSpec",
    "inject_noise",
    "make_digit_attributes",
    "make_multidigits",
    "missing_mask",
]
