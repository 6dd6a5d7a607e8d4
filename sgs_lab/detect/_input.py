"""Reading a run's per-sample records for the detectors: any run object or a samples DataFrame, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# Every detector reads these: who, when, which label, and the two columns behind the flag count and the suggestion.
KEY_COLUMNS = ("epoch", "task", "sample_id", "label", "margin", "pred")


def run_meta(run) -> dict:
    """The run's ``meta`` dict ({} for a bare DataFrame or a fit result)."""
    meta = getattr(run, "meta", None)
    return dict(meta) if isinstance(meta, dict) else {}


def _available_columns(run) -> list[str] | None:
    columns = getattr(run, "columns", None)
    if callable(columns):  # a cached run lists its columns without reading any rows
        try:
            return list(columns())
        except (TypeError, ValueError, OSError):
            return None
    return None


def _missing_error(missing: Sequence[str], why: str, have: Sequence[str]) -> ValueError:
    return ValueError(f"the run lacks the column(s) {list(missing)} needed {why}; it has {list(have)}")


def read_samples(run, columns: Sequence[str], *, why: str = "", epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """The per-sample rows of ``run`` with at least ``columns`` (and ``present`` when recorded).

    Parameters
    ----------
    run : a cached run (``.samples(epochs=, columns=)``), a fit result (``.sink``), a sink, or a DataFrame
        of sample rows (DESIGN §5 columns).
    columns : the columns the caller needs.
    why : completes the error message, e.g. "by the 'aum' detector".
    epochs : keep only these epochs (None: all).

    Returns
    -------
    DataFrame with one row per (epoch, task, sample_id) record, ``task`` as str, rows without a label dropped;
    ``attrs["recorded_tasks"]`` lists every task with records (labelled or not) in the chosen epochs.
    """
    wanted = list(dict.fromkeys([*columns]))
    if isinstance(run, pd.DataFrame):
        table = run
    elif hasattr(run, "sink") and callable(getattr(run.sink, "samples", None)):
        table = pd.DataFrame(run.sink.samples())  # a RunResult straight from sgs_lab.train.fit
    elif callable(getattr(run, "samples", None)):
        table = _read_from_object(run, wanted, why, epochs)
    else:
        raise TypeError(
            f"run must be a cached run (sgs_lab.cache.open_run), a fit result or a samples DataFrame; "
            f"got {type(run).__name__}"
        )
    if isinstance(table, dict):
        table = pd.DataFrame(table)
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise _missing_error(missing, why, table.columns)
    if epochs is not None:
        table = table[table["epoch"].isin(list(epochs))]
    table = table[[*wanted, *(["present"] if "present" in table.columns and "present" not in wanted else [])]]
    table = table.assign(task=table["task"].astype(str))
    keep = table["label"].notna()
    if "present" in table.columns:  # a missing label has no verdict to give; its rows say so
        keep = keep & table["present"].fillna(False).astype(bool)
    labelled = table[keep].reset_index(drop=True)
    labelled.attrs["recorded_tasks"] = list(dict.fromkeys(table["task"].tolist()))
    return labelled


def _read_from_object(run, wanted: list[str], why: str, epochs) -> pd.DataFrame | dict:
    available = _available_columns(run)
    if available is not None:
        missing = [c for c in wanted if c not in available]
        if missing:
            raise _missing_error(missing, why, available)
        columns = wanted + (["present"] if "present" in available and "present" not in wanted else [])
        return run.samples(epochs=None if epochs is None else list(epochs), columns=columns)
    try:
        return run.samples(columns=wanted)
    except TypeError:  # a sink or adapter without keyword options
        return run.samples()


def tasks_of(table: pd.DataFrame, meta: dict | None = None) -> list[str]:
    """Task names in the run's order (its meta when it has one, else first appearance)."""
    seen = list(dict.fromkeys(table["task"].tolist()))
    ordered = [t for t in (meta or {}).get("tasks", []) if t in seen]
    return ordered + [t for t in seen if t not in ordered]


def check_task(table: pd.DataFrame, task: str, meta: dict | None = None) -> None:
    """ValueError for a task the run does not have (listing the ones it has), one without labelled samples (every
    label missing) or one without class labels."""
    tasks = tasks_of(table, meta)
    if task not in tasks:
        recorded = list(dict.fromkeys([*(meta or {}).get("tasks", []), *table.attrs.get("recorded_tasks", [])]))
        if task in recorded:
            raise ValueError(
                f"task {task!r} has no labelled samples in the run (every one of its labels is missing in the records "
                f"read): there is nothing to check; the tasks with labels are {tasks}"
            )
        raise ValueError(f"the run has no task {task!r}; its tasks are {recorded or tasks}")
    rows = table[table["task"] == task]
    labels = rows["label"].to_numpy(dtype=float)
    if rows["margin"].isna().all() or not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"task {task!r} has no class labels (a regression task?): label noise detection needs classes")


def classification_tasks(table: pd.DataFrame, meta: dict | None = None) -> list[str]:
    """The run's tasks that have class labels (regression tasks have no margin)."""
    tasks = []
    for task in tasks_of(table, meta):
        try:
            check_task(table, task, meta)
        except ValueError:
            continue
        tasks.append(task)
    return tasks
