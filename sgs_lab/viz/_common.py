"""What every builder shares: parameter docs written once, colours, facets, binning, downsampling, layout."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
MAX_POINTS = 50_000
NOISE_LABELS = {False: "clean label", True: "wrong label"}
NOISE_COLORS = {"clean label": "#4c78a8", "wrong label": "#e45756"}
PALETTE = qualitative.Plotly

PARAMETERS = {
    "data_frame": """data_frame : pandas.DataFrame
    Tidy per-sample records, one row per (epoch, step, task, sample) with the columns of ``run.samples()``.""",
    "color": """color : str or None
    Column whose values split the data into coloured traces (``noisy`` reads "clean label" / "wrong label");
    None draws one trace.""",
    "facet_col": """facet_col : str or None
    Column whose values get one panel each, side by side; None: one panel.""",
    "color_discrete_map": """color_discrete_map : dict or None
    {trace name: CSS colour} overriding the default colours.""",
    "nbins": """nbins : int
    Number of bins, shared by every trace and panel so they can be compared.""",
    "histnorm": """histnorm : {"probability", "percent", "count"}
    Bar heights: the fraction (or percentage) of each trace's values per bin, or raw counts. Fractions compare
    groups of different sizes (clean labels usually outnumber wrong ones).""",
    "range_x": """range_x : (float, float) or None
    Range the bins cover; None: the finite values' minimum to maximum.""",
    "max_points": """max_points : int
    Past this many points the figure uses WebGL traces (``go.Scattergl``) and keeps a deterministic subsample of
    ``max_points`` rows (a fixed-seed uniform draw, in the original row order, so group proportions are kept in
    expectation and the same data always gives the same figure).""",
    "seed": """seed : int
    Seed of the deterministic draws (subsampling, the choice of lines).""",
    "layout": """title : str or None
    Figure title (each builder has a descriptive default); None: no title.
template : str
    Plotly template name.
width, height : int or None
    Figure size in pixels; None lets plotly choose.""",
    "returns": """Returns
-------
plotly.graph_objects.Figure""",
}


def fill_doc(func: Callable) -> Callable:
    """Replace ``{name}`` placeholders in ``func``'s docstring by the shared parameter texts."""
    doc = inspect.cleandoc(func.__doc__ or "")
    for name, text in PARAMETERS.items():
        doc = doc.replace("{" + name + "}", text)
    func.__doc__ = doc
    return func


def finish(
    fig: go.Figure, *, title: str | None, template: str, width: int | None, height: int | None, **layout
) -> go.Figure:
    """Apply the keywords every builder takes."""
    fig.update_layout(title=title, template=template, width=width, height=height, **layout)
    return fig


def group_label(column: str | None, value) -> str:
    """Trace name of one value of ``column``: injected noise reads as words, everything else as itself."""
    if column == "noisy" and isinstance(value, (bool, np.bool_)):
        return NOISE_LABELS[bool(value)]
    return str(value)


def color_for(name: str, position: int, color_discrete_map: dict | None) -> str:
    if color_discrete_map and name in color_discrete_map:
        return color_discrete_map[name]
    return NOISE_COLORS.get(name, PALETTE[position % len(PALETTE)])


def ordered_values(series: pd.Series) -> list:
    """Distinct values in a stable order: categories in their declared order, booleans and numbers sorted, other
    values in order of first appearance (tasks keep the order the run lists them in)."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        present = set(series.dropna().unique())
        return [c for c in series.cat.categories if c in present]
    values = pd.unique(series.dropna())
    if series.dtype == bool or pd.api.types.is_numeric_dtype(series.dtype):
        return sorted(values)
    return list(values)


def split(data_frame: pd.DataFrame, column: str | None) -> list[tuple[object, pd.DataFrame]]:
    """[(value, rows)] for each value of ``column``, or [(None, all rows)] when there is no column."""
    if column is None:
        return [(None, data_frame)]
    return [(value, data_frame[data_frame[column] == value]) for value in ordered_values(data_frame[column])]


def facet_figure(titles: Sequence, *, shared_yaxes: bool = True) -> go.Figure:
    """One row of panels (one per title); a single untitled panel when ``titles`` is [None]."""
    names = [None if t is None else str(t) for t in titles] or [None]
    subplot_titles = names if any(t is not None for t in names) else None
    return make_subplots(rows=1, cols=len(names), subplot_titles=subplot_titles, shared_yaxes=shared_yaxes)


def add(fig: go.Figure, trace, col: int) -> None:
    """Add ``trace`` to panel ``col`` (1-based) of a figure from :func:`facet_figure`."""
    fig.add_trace(trace, row=1, col=col)


def finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def bin_edges(values: np.ndarray, nbins: int, range_x: tuple[float, float] | None) -> np.ndarray:
    if range_x is None and len(values) == 0:
        range_x = (0.0, 1.0)  # nothing to bin: an empty axis rather than an error
    return np.histogram_bin_edges(values, bins=nbins, range=range_x)


def bar_heights(values: np.ndarray, edges: np.ndarray, histnorm: str) -> np.ndarray:
    """Counts per bin, normalised by the trace's own number of values (values outside the edges still count)."""
    counts = np.histogram(values, bins=edges)[0].astype(float)
    if histnorm == "count":
        return counts
    if histnorm not in ("probability", "percent"):
        raise ValueError(f"histnorm must be 'probability', 'percent' or 'count'; got {histnorm!r}")
    share = counts / max(len(values), 1)
    return share * 100 if histnorm == "percent" else share


def subsample(data_frame: pd.DataFrame, max_points: int, seed: int) -> tuple[pd.DataFrame, bool]:
    """(rows to draw, whether WebGL is needed): every row up to ``max_points``, else a fixed-seed uniform draw of
    ``max_points`` rows kept in their original order."""
    if len(data_frame) <= max_points:
        return data_frame, False
    keep = np.sort(np.random.default_rng(seed).choice(len(data_frame), size=max_points, replace=False))
    return data_frame.iloc[keep], True


def scatter_type(webgl: bool):
    return go.Scattergl if webgl else go.Scatter


def widen(data_frame: pd.DataFrame, *columns: str | None) -> pd.DataFrame:
    """``data_frame`` with its float16 columns (of ``columns`` when named; None entries are skipped) as float64;
    the frame itself when there are none.

    Runs stored with ``float16=True`` hand back half-precision statistics; pandas has no float16 kernel for some
    grouped reductions (``quantile``) and sums others in half precision, so the builders aggregate in float64.
    """
    names = [c for c in columns if c is not None] if columns else list(data_frame.columns)
    half = [c for c in dict.fromkeys(names) if c in data_frame.columns and data_frame[c].dtype == np.float16]
    return data_frame.astype(dict.fromkeys(half, np.float64)) if half else data_frame


def require(data_frame: pd.DataFrame, *columns: str | None) -> None:
    """Refuse a frame that lacks a named column, saying which ones it has."""
    missing = [c for c in columns if c is not None and c not in data_frame.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not in the data frame; it has {list(data_frame.columns)}")
