"""Reading runs: ``open_run`` for one run, ``list_runs`` for a directory of them."""

from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Iterable
from pathlib import Path

from ._schema import LOCK, MANIFEST, TABLES
from ._writer import CacheError, read_manifest, writer_alive


def _as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (numbers.Integral, str)):  # numpy integers too (e.g. frame["epoch"].max())
        return [int(value) if isinstance(value, numbers.Integral) else value]
    return [int(v) if isinstance(v, numbers.Integral) else v for v in value]


AGGREGATES = ("mean", "std", "min", "max", "count")


class Run:
    """A stored run (see :func:`open_run`). ``meta`` is the manifest as of opening; :meth:`refresh` re-reads it
    (for a run that is still training)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.refresh()

    def refresh(self) -> Run:
        self._manifest = read_manifest(self.path)
        return self

    @property
    def meta(self) -> dict:
        meta = {k: v for k, v in self._manifest.items() if k != "chunks"}
        meta["status"] = self.status
        return meta

    @property
    def status(self) -> str:
        """ "running", "interrupted" (its writer died or stopped) or "finished"."""
        status = self._manifest["status"]
        if status == "running" and not writer_alive(self.path):
            return "interrupted"  # a killed writer cannot update its manifest; its lock died with it
        return status

    @property
    def history(self) -> list[dict]:
        return list(self._manifest.get("history", []))

    @property
    def tasks(self) -> list[str]:
        return list(self._manifest.get("tasks", []))

    def __repr__(self) -> str:
        rows = sum(e["rows"] for e in self._manifest["chunks"]["samples"])
        return f"Run({str(self.path)!r}, method={self._manifest.get('method')!r}, status={self.status!r}, rows={rows})"

    # -- tables -------------------------------------------------------------------------------------------------
    def table(self, kind: str = "samples", *, epochs=None, tasks=None, columns=None, skip_bad_chunks: bool = False):
        """The stored rows as one pyarrow Table, reading only the chunks that hold ``epochs`` and only ``columns``."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if kind not in TABLES:
            raise ValueError(f"kind must be one of {list(TABLES)}; got {kind!r}")
        epochs, tasks, columns = _as_list(epochs), _as_list(tasks), _as_list(columns)
        if columns is not None:
            unknown = [c for c in columns if c not in self.columns(kind)]
            if unknown:
                raise ValueError(f"unknown column(s) {unknown}; the {kind} table has {self.columns(kind)}")
        if tasks is not None and self.tasks:
            unknown = [t for t in tasks if t not in self.tasks]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; this run's tasks are {self.tasks}")
        # the row filters need their columns; they are dropped again below when not asked for
        needed = None if columns is None else list(dict.fromkeys([*columns, *(["epoch"] if epochs else []),
                                                                  *(["task"] if tasks else [])]))  # fmt: skip
        pieces = []
        for entry in self._manifest["chunks"][kind]:
            lo, hi = entry["epochs"]
            if epochs is not None and not any(lo <= e <= hi for e in epochs):
                continue  # pruned by the manifest's epoch range: the file is never opened
            path = self.path / entry["file"]
            try:
                table = pq.read_table(path, columns=needed)
            except FileNotFoundError as exc:
                error = CacheError(
                    f"chunk {path} listed in {self.path / MANIFEST} is missing (if the run was being resumed, "
                    "refresh() re-reads its manifest)"
                )
                if not skip_bad_chunks:
                    raise error from exc
                warnings.warn(f"{error}; skipped", stacklevel=2)
                continue
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                error = CacheError(
                    f"chunk {path} is unreadable ({exc}); pass skip_bad_chunks=True to read the other chunks"
                )
                if not skip_bad_chunks:
                    raise error from exc
                warnings.warn(f"{error}; skipped", stacklevel=2)
                continue
            mask = None
            if epochs is not None:
                mask = pc.is_in(table["epoch"], pa.array(epochs, pa.int32()))
            if tasks is not None:
                in_tasks = pc.is_in(table["task"].cast(pa.string()), pa.array(tasks, pa.string()))
                mask = in_tasks if mask is None else pc.and_(mask, in_tasks)
            pieces.append(table if mask is None else table.filter(mask))
        if not pieces:
            from ._schema import table_schema

            schema = table_schema(kind, self._manifest.get("float16", False))
            empty = schema.empty_table()
            return empty if columns is None else empty.select(columns)
        table = pa.concat_tables(pieces, promote_options="permissive")
        return table if columns is None else table.select(columns)

    def samples(self, epochs=None, tasks=None, columns=None, *, skip_bad_chunks: bool = False):
        """One row per (epoch, step, task, sample_id) as a pandas DataFrame (DESIGN §5 columns; task categorical).

        ``epochs`` / ``tasks``: an int or name, or a list of them; ``columns``: the columns to read (the others are
        never read from disk).
        """
        table = self.table("samples", epochs=epochs, tasks=tasks, columns=columns, skip_bad_chunks=skip_bad_chunks)
        return table.to_pandas()

    def steps(self, epochs=None, tasks=None, columns=None, *, skip_bad_chunks: bool = False):
        """One row per (epoch, step, task): task_weight (λ), loss, consistency."""
        table = self.table("steps", epochs=epochs, tasks=tasks, columns=columns, skip_bad_chunks=skip_bad_chunks)
        return table.to_pandas()

    def columns(self, kind: str = "samples") -> list[str]:
        from ._schema import table_schema

        entries = self._manifest["chunks"][kind]
        if entries:
            import pyarrow.parquet as pq

            try:
                return list(pq.read_schema(self.path / entries[0]["file"]).names)
            except (OSError, ValueError):
                pass  # a bad first chunk: fall back to the schema of this version
        return list(table_schema(kind).names)

    # -- aggregates ---------------------------------------------------------------------------------------------
    def per_sample(self, column: str = "sgs", *, epochs=None, tasks=None, aggregates=AGGREGATES,
                   skip_bad_chunks: bool = False):  # fmt: skip
        """Per (task, sample_id): ``aggregates`` of ``column`` over the chosen epochs (any of mean, std, min,
        max, count), one column each.

        Reads only task, sample_id and ``column`` and groups in Arrow; NaN entries (missing labels, masked rows)
        are left out. Over 10 M cached rows the mean takes about a second (``benchmarks/cache.py``).
        """
        import pyarrow.compute as pc

        aggregates = list(aggregates)
        unknown = [a for a in aggregates if a not in AGGREGATES]
        if unknown:
            raise ValueError(f"unknown aggregate(s) {unknown}; choose from {list(AGGREGATES)}")
        table = self.table("samples", epochs=epochs, tasks=tasks, columns=["task", "sample_id", column],
                           skip_bad_chunks=skip_bad_chunks)  # fmt: skip
        values = table[column]
        values = pc.if_else(pc.is_nan(values), None, values)  # NaN is "no value" here, not a poisoned mean
        table = table.set_column(2, column, values.cast("float64"))
        spread = pc.VarianceOptions(ddof=0)
        specs = [(column, "stddev", spread) if a == "std" else (column, a) for a in aggregates]
        frame = table.group_by(["task", "sample_id"]).aggregate(specs).to_pandas()
        frame.columns = [c.removeprefix(f"{column}_") for c in frame.columns]
        frame = frame.rename(columns={"stddev": "std"})
        frame["task"] = frame["task"].astype(str)
        return frame.sort_values(["task", "sample_id"], ignore_index=True)[["task", "sample_id", *aggregates]]

    def per_epoch(self, columns: Iterable[str] = ("loss", "sgs", "weight"), *, by: Iterable[str] = ("task", "noisy")):
        """Per (epoch, *by): the mean of each of ``columns`` and the row count (NaN entries left out)."""
        import pyarrow.compute as pc

        columns, by = list(columns), list(by)
        table = self.table("samples", columns=list(dict.fromkeys(["epoch", *by, *columns])))
        for name in columns:
            values = table[name].cast("float64")
            table = table.set_column(
                table.schema.get_field_index(name), name, pc.if_else(pc.is_nan(values), None, values)
            )
        grouped = table.group_by(["epoch", *by]).aggregate([*[(c, "mean") for c in columns], ([], "count_all")])
        frame = grouped.to_pandas().rename(columns={f"{c}_mean": c for c in columns} | {"count_all": "rows"})
        if "task" in frame:
            frame["task"] = frame["task"].astype(str)
        return frame.sort_values(["epoch", *by], ignore_index=True)


def open_run(directory: str | Path) -> Run:
    """Open the run stored in ``directory`` (written by ``sgs-lab train``, ``fit`` with a RunWriter, or
    :func:`get_or_train`). It may still be training: reads see every committed chunk."""
    return Run(Path(directory))


def _is_run(directory: Path) -> bool:
    """A manifest written by sgs_lab, or an unreadable one in a directory laid out like a run (a corrupt run);
    other tools' manifest.json files are not runs."""
    try:
        return "schema_version" in json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return (directory / "samples").is_dir() or (directory / LOCK).exists()


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"{root} is not a directory")
    candidates = [root] if (root / MANIFEST).exists() else []
    candidates += sorted(p.parent for p in root.rglob(f"*/{MANIFEST}"))
    return [p for p in candidates if _is_run(p)]


def directory_size(directory: Path) -> int:
    """Bytes under ``directory``; files that vanish meanwhile (a live writer's renames) are skipped."""
    total = 0
    for file in directory.rglob("*"):
        try:
            if file.is_file():
                total += file.stat().st_size
        except FileNotFoundError:
            pass
    return total


def list_runs(root: str | Path):
    """Every run under ``root`` as a DataFrame: path, method, seed, noise (mean rate), status, epochs done, rows,
    bytes, created, updated, age_hours and mean test accuracy. An unreadable manifest shows as status "corrupt"."""
    import datetime as dt

    import pandas as pd

    rows = []
    now = dt.datetime.now(dt.timezone.utc)
    for path in find_runs(root):
        size = directory_size(path)
        try:
            run = Run(path)
        except CacheError:
            rows.append({"path": str(path), "status": "corrupt", "bytes": size})
            continue
        m = run._manifest
        noise = m.get("noise") or {}
        accuracy = m.get("test_accuracy") or {}
        updated = dt.datetime.fromisoformat(m["updated"])
        rows.append({
            "path": str(path), "method": m.get("method"), "seed": m.get("seed"),
            "noise": sum(noise.values()) / len(noise) if noise else None, "status": run.status,
            "epochs": len(m.get("history", [])), "rows": sum(e["rows"] for e in m["chunks"]["samples"]),
            "bytes": size, "created": m.get("created"), "updated": m["updated"],
            "age_hours": round((now - updated).total_seconds() / 3600, 2),
            "test_accuracy": sum(accuracy.values()) / len(accuracy) if accuracy else None, "key": m.get("key"),
        })  # fmt: skip
    columns = ["path", "method", "seed", "noise", "status", "epochs", "rows", "bytes", "created", "updated",
               "age_hours", "test_accuracy", "key"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
