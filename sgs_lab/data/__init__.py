"""Task sets: MultiDigits and digit attributes (bundled, offline), toy 2-D problems, label noise, user data."""

from .digits import LOOPED_DIGITS, TaskSet, TaskSpec, from_dataset, make_digit_attributes, make_multidigits
from .noise import NOISE_KINDS, inject_noise, missing_mask
from .toy import ToyProblem

__all__ = [
    "LOOPED_DIGITS",
    "NOISE_KINDS",
    "TaskSet",
    "TaskSpec",
    "ToyProblem",
    "from_dataset",
    "inject_noise",
    "make_digit_attributes",
    "make_multidigits",
    "missing_mask",
]
