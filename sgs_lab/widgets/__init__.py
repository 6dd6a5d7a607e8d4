"""ipywidgets dashboards over a run's records, composed from the :mod:`sgs_lab.viz` figures.

A run is anything with ``samples(columns=...)`` and ``steps()`` returning DataFrames and a ``meta`` dict (as
``sgs_lab.cache.open_run`` returns). Each dashboard function returns an ``ipywidgets.VBox`` subclass: display it
in a notebook, or nest it in another layout. Its controls and ``go.FigureWidget`` figures are attributes, and its
interaction logic lives in plain methods that the controls call, so setting a control's ``.value`` from code (or a
test) redraws exactly as a user's move does.
"""

from .compare import CompareRuns, compare_runs
from .conflict import ConflictDashboard, conflict_dashboard
from .explorer import SampleExplorer, sample_explorer
from .noise import NoiseDashboard, default_scorer, mean_loss_scores, noise_dashboard
from .weights import WeightDashboard, weight_dashboard

__all__ = [
    "CompareRuns",
    "ConflictDashboard",
    "NoiseDashboard",
    "SampleExplorer",
    "WeightDashboard",
    "compare_runs",
    "conflict_dashboard",
    "default_scorer",
    "mean_loss_scores",
    "noise_dashboard",
    "sample_explorer",
    "weight_dashboard",
]
