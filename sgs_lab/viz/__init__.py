"""Plotly figure builders: a tidy DataFrame in, a ``plotly.graph_objects.Figure`` out.

Every builder takes the frame first, then column names, then plotly-express-like keywords (``color``,
``facet_col``, ``title``, ``template``, ``width``, ``height``). The frames are the records of a run
(``run.samples()``, ``run.steps()``, ``run.meta["history"]``) or tables derived from them by the ``*_table``
functions here, so figures can be built and tested without a kernel.

Large data. Histograms are binned with NumPy (bars, whatever the number of samples). Scatter plots past
``max_points`` (50,000) points switch to WebGL (``go.Scattergl``) and draw a deterministic subsample: a fixed-seed
uniform draw of ``max_points`` rows kept in their original order. Trajectory plots draw a fixed-seed choice of
``max_lines`` samples.
"""

from ._common import MAX_POINTS, NOISE_LABELS, TEMPLATE
from .conflict import conflict_histogram, task_conflict_heatmap, task_conflict_over_steps, task_conflict_table
from .datamap import data_map, data_map_table
from .detection import flag_outcome, noise_pr, noise_roc, with_noise_truth
from .distributions import histogram, sample_history, sgs_histogram, weight_histogram, weight_trajectories
from .dynamics import dynamics_table, training_dynamics
from .gallery import image_lookup, sample_gallery

__all__ = [
    "MAX_POINTS",
    "NOISE_LABELS",
    "TEMPLATE",
    "conflict_histogram",
    "data_map",
    "data_map_table",
    "dynamics_table",
    "flag_outcome",
    "histogram",
    "image_lookup",
    "noise_pr",
    "noise_roc",
    "sample_gallery",
    "sample_history",
    "sgs_histogram",
    "task_conflict_heatmap",
    "task_conflict_over_steps",
    "task_conflict_table",
    "training_dynamics",
    "weight_histogram",
    "weight_trajectories",
    "with_noise_truth",
]
