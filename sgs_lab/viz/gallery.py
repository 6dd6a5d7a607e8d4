"""A gallery of sample images titled with their given and true labels (wrong labels in red)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import NOISE_COLORS, TEMPLATE, fill_doc, finish, require


def image_lookup(images, image_ids=None) -> Mapping:
    """{sample id: image array} from a TaskSet (its ``x`` and ``sample_id``), a mapping, or an (N, ...) array.

    Parameters
    ----------
    images : TaskSet, mapping or array-like
        The images; an array (or tensor) is indexed by ``image_ids``.
    image_ids : array-like or None
        Sample id of each row of an array; None: 0..N−1.

    Returns
    -------
    Mapping
        Sample id → ``numpy`` image, (H, W) or (H, W, 3).
    """
    if isinstance(images, Mapping):
        return {k: _as_image(v) for k, v in images.items()}
    if hasattr(images, "x") and hasattr(images, "sample_id"):  # a TaskSet
        images, image_ids = images.x, images.sample_id
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    image_ids = image_ids.cpu().numpy() if hasattr(image_ids, "cpu") else image_ids
    ids = np.arange(len(array)) if image_ids is None else np.asarray(image_ids)
    if len(ids) != len(array):
        raise ValueError(f"{len(ids)} image ids for {len(array)} images")
    return _LazyImages(array, {int(i): k for k, i in enumerate(ids)})


class _LazyImages(Mapping):
    """Converts an image only when it is shown (a data set may hold thousands)."""

    def __init__(self, array: np.ndarray, rows: dict[int, int]) -> None:
        self._array, self._rows = array, rows

    def __getitem__(self, sample_id) -> np.ndarray:
        return _as_image(self._array[self._rows[int(sample_id)]])

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _as_image(image) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour: a single channel is dropped, channels-first colour is moved last."""
    image = np.asarray(image, dtype=float)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"an image must be (H, W), (1, H, W), (3, H, W) or (H, W, 3); got shape {image.shape}")
    return image


def _image_trace(image: np.ndarray):
    if image.ndim == 2:  # ink dark on white; rows top to bottom (the axes are reversed)
        return go.Heatmap(z=image, colorscale="Greys", showscale=False, hoverinfo="skip")
    scale = 255.0 if image.max() <= 1.0 else 1.0
    return go.Image(z=np.clip(image * scale, 0, 255).astype(np.uint8), hoverinfo="skip")


def _caption(sample_id, rows: pd.DataFrame, label: str, true_label: str, task: str | None) -> tuple[str, bool]:
    """A panel title ("#id · task given (true t)"; task names only when ``task`` is given) and whether any label
    shown is wrong."""
    parts, wrong = [], False
    for _, row in rows.iterrows():
        given, true = row[label], row[true_label]
        prefix = f"{row[task]} " if task else ""
        if pd.isna(given):  # a missing label is not a wrong one
            text = f"missing (true {_fmt(true)})"
        else:
            text = _fmt(given) if given == true else f"{_fmt(given)} (true {_fmt(true)})"
            wrong |= given != true
        parts.append(prefix + text)
    return f"#{sample_id} · " + ", ".join(parts), wrong


def _fmt(value) -> str:
    return (
        str(int(value))
        if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer()
        else str(value)
    )


@fill_doc
def sample_gallery(
    data_frame: pd.DataFrame,
    images,
    *,
    sample_id: str = "sample_id",
    label: str = "label",
    true_label: str = "clean_label",
    task: str | None = "task",
    image_ids=None,
    columns: int = 6,
    max_images: int = 24,
    title: str | None = "Samples",
    template: str = TEMPLATE,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Images of the samples in ``data_frame`` (first appearance order), titled with given and true labels.

    Several rows for one sample (one per task) share its panel; its title lists each task's label, and turns red
    when a label is wrong. Only the first ``max_images`` samples are drawn.

    Parameters
    ----------
    data_frame : pandas.DataFrame
        The samples to show: ``sample_id``, ``label``, ``true_label`` (and ``task``) columns, e.g. the most suspect
        rows of a detection table joined with the records.
    images : TaskSet, mapping or array-like
        Where the pictures come from, see :func:`image_lookup`.
    sample_id, label, true_label, task : str
        Column names; titles name the tasks when ``data_frame`` holds several.
    image_ids : array-like or None
        Sample ids of the rows of an image array.
    columns : int
        Panels per row.
    max_images : int
        Most samples drawn.
    {layout}

    {returns}
        One image trace (``go.Heatmap`` for grey, ``go.Image`` for colour) per sample, in order; the panel titles
        are ``fig.layout.annotations``.
    """
    require(data_frame, sample_id, label, true_label)
    # name the tasks only when the gallery mixes several
    task = task if task in data_frame.columns and data_frame[task].nunique() > 1 else None
    lookup = image_lookup(images, image_ids)
    ids = list(pd.unique(data_frame[sample_id]))[:max_images]
    columns = max(1, min(columns, len(ids)))  # a short gallery keeps full-size panels
    n_rows = max(math.ceil(len(ids) / columns), 1)
    captions = [_caption(i, data_frame[data_frame[sample_id] == i], label, true_label, task) for i in ids]
    fig = make_subplots(rows=n_rows, cols=columns, subplot_titles=[c for c, _ in captions] or None,
                        horizontal_spacing=0.02, vertical_spacing=0.3 / n_rows)  # fmt: skip
    for k, i in enumerate(ids):
        fig.add_trace(_image_trace(lookup[i]), row=k // columns + 1, col=k % columns + 1)
    for annotation, (_, wrong) in zip(fig.layout.annotations, captions):
        annotation.font = {"size": 10, "color": NOISE_COLORS["wrong label"] if wrong else "black"}
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    for k in range(1, n_rows * columns + 1):  # square pixels: each panel's y axis follows its own x axis
        suffix = "" if k == 1 else str(k)
        fig.layout[f"yaxis{suffix}"].scaleanchor = f"x{suffix}"
    height = height if height is not None else 60 + 130 * n_rows
    return finish(fig, title=title, template=template, width=width, height=height)
