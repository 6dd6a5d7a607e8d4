"""Noisy-label detection: which labels of a run are wrong, ranked from its training records (``docs/detect.md``).

>>> import pandas as pd
>>> from sgs_lab.detect import find_noisy
>>> rows = pd.DataFrame({  # two epochs of one task; sample 2's label keeps losing to class 0
...     "epoch": [0, 0, 0, 1, 1, 1], "task": "digit", "sample_id": [1, 2, 3, 1, 2, 3],
...     "label": [1.0, 1.0, 0.0] * 2, "pred": [1.0, 0.0, 0.0] * 2,
...     "margin": [2.0, -1.5, 1.0, 3.0, -0.5, 2.0], "loss": [0.1, 2.0, 0.3, 0.05, 1.2, 0.1]})
>>> suspects = find_noisy(rows, "digit", method="loss")
>>> suspects[["sample_id", "score", "flagged", "given_label", "suggested_label"]]
   sample_id  score  flagged  given_label  suggested_label
0          2  1.600     True            1                0
1          3  0.200    False            0                0
2          1  0.075    False            1                1
"""

from ._crossval import cross_val_probabilities
from ._evaluate import detection_metrics, evaluate_detection, evaluate_ranking, noise_mask
from ._find import DETECTORS, METHODS, available_detectors, find_noisy
from ._retrain import clean_and_retrain, clean_labels

__all__ = [
    "DETECTORS",
    "METHODS",
    "available_detectors",
    "clean_and_retrain",
    "clean_labels",
    "cross_val_probabilities",
    "detection_metrics",
    "evaluate_detection",
    "evaluate_ranking",
    "find_noisy",
    "noise_mask",
]
