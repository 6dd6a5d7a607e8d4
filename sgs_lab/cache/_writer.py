"""Writing a run: a sink for ``fit`` that buffers records and commits Parquet chunks and the manifest atomically.

Commit protocol. Each ``flush`` (``fit`` calls it right before every checkpoint) writes the buffered rows as one
Parquet chunk per table — to a temporary name, renamed into place — and then replaces the manifest, which lists the
committed chunks and ``committed_step`` (every step below it is stored). Readers read only the chunks the manifest
lists, so they never see a partial file or an uncommitted row. A writer killed at any point leaves the last
manifest and its chunks intact; resuming from the checkpoint (written after the flush, so never ahead of the
manifest) drops every row at or after the checkpoint's step and replays from there, so each row ends up stored
exactly once.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ._schema import LOCK, MANIFEST, SCHEMA_VERSION, TABLES, table_schema, to_table

# Manifest keys the writer owns; caller metadata may not override them.
_BOOKKEEPING = ("schema_version", "status", "committed_step", "chunks", "next_chunk", "created", "updated", "writer")


class CacheError(RuntimeError):
    """A run directory cannot be read or written; the message names the file and what to do."""


class RunLockedError(CacheError):
    """Another live process is writing this run."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import pyarrow
    import torch

    return {"sgs_lab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version()}  # fmt: skip


def write_json_atomic(path: Path, value: dict) -> None:
    """Replace ``path`` by ``value`` in one rename: a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(value, handle, separators=(",", ":"), default=_jsonable)
        os.replace(tmp, path)  # atomic against a killed process; no fsync: power-loss safety would cost ms per flush
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"could not write {path}: {exc}; {_remedy(exc)} (the previous {path.name} is intact)") from exc


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _remedy(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full: free space and resume the run"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the directory is not writable: choose a writable --out or fix its permissions"
    return "check the directory and resume the run"


class WriterLock:
    """An exclusive ``flock`` on DIR/writer.lock held for the writer's lifetime; the kernel drops it when the
    process dies (even by SIGKILL), which is how readers tell a live run from an interrupted one."""

    def __init__(self, directory: Path, timeout: float = 2.0) -> None:
        import fcntl

        self.path = directory / LOCK
        self._handle = open(self.path, "a+")  # noqa: SIM115 - held open: the lock lives as long as the handle
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:  # a reader's probe lasts microseconds; a writer holds it for good
                    self._handle.close()
                    raise RunLockedError(
                        f"{directory} is being written by another live process (pid {holder_pid(directory)}); "
                        "wait for it to finish or stop it first"
                    ) from None
                time.sleep(0.05)
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing drops the flock


def holder_pid(directory: Path) -> str:
    try:
        return (directory / LOCK).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def writer_alive(directory: Path) -> bool:
    """Whether a live process holds the run's writer lock (a shared probe fails while it does)."""
    import fcntl

    path = Path(directory) / LOCK
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


# What a run directory holds; removing a run deletes these and nothing else.
RUN_FILES = (MANIFEST, LOCK, "checkpoint.pt", "checkpoint.pt.tmp", "history.json", "report.html", *TABLES)


def check_new_run_directory(path: Path) -> None:
    """A new run goes into a new or empty directory that is not inside another run: removing it later can then
    never delete anything else."""
    for parent in path.resolve().parents:
        if (parent / MANIFEST).exists():
            raise CacheError(f"{path} is inside the run {parent}; choose a directory outside it")
    if path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
        raise CacheError(f"{path} is not empty and holds no run: choose a new or empty directory for the run")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        hint = ""
        if Path(directory).is_dir():
            inside = sorted(str(p.parent) for p in Path(directory).glob(f"*/{MANIFEST}"))[:5]
            hint = (
                f"; it holds runs: {', '.join(inside)}" if inside else "; list runs with sgs_lab.cache.list_runs(ROOT)"
            )
        raise CacheError(f"{directory} is not an sgs_lab run (no {MANIFEST}){hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is unreadable ({exc}); the chunks in {directory} are untouched") from exc
    return migrate(manifest, path)


def migrate(manifest: dict, path: Path) -> dict:
    """Bring a manifest to SCHEMA_VERSION, or refuse one written by a newer sgs_lab."""
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise CacheError(f"{path} has no schema_version: it was not written by sgs_lab")
    if version > SCHEMA_VERSION:
        raise CacheError(
            f"{path} uses cache schema {version}, newer than this sgs_lab ({__version__}, schema {SCHEMA_VERSION}) "
            "reads: upgrade sgs_lab (pip install -U sgs_lab)"
        )
    return manifest  # version 1 is the first; older versions would be migrated here, step by step


class RunWriter:
    """A ``fit`` sink that stores a run in ``directory`` (see the module docstring for the commit protocol).

    Parameters
    ----------
    directory : the run directory (created).
    meta : the caller's description of the run (method, seed, noise, config, …), stored in the manifest.
    resume : continue the interrupted run in ``directory`` (``fit(..., resume=True)`` then truncates it).
    float16 : store the per-sample statistics as float16 (half the bytes; about 3 significant digits).

    Use it as a context manager: leaving the block by an exception marks the run "interrupted"; call
    :meth:`finish` with the test metrics to mark it "finished".
    """

    def __init__(self, directory: str | Path, meta: dict | None = None, *, resume: bool = False, float16: bool = False,
                 context=None):  # fmt: skip
        self.path = Path(directory)
        self.context = context  # sgs_lab.distributed.Context of a distributed run, else None
        self.rank = context.rank if context else 0
        self._buffer: dict[str, list[dict]] = {kind: [] for kind in TABLES}
        self._history_changed = False  # an epoch summary waits for the next commit
        error = None
        if self.rank == 0:  # rank 0 owns the lock and the manifest; every rank writes its own chunks
            try:
                self._open_directory(meta or {}, resume, float16)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                error = exc
        shared = {"error": None if error is None else f"{type(error).__name__}: {error}"}
        if self.rank == 0 and error is None:
            shared.update(next_chunk=self.manifest["next_chunk"], float16=self.manifest["float16"])
        if context:
            shared = _broadcast(shared, context)
        if error is not None:
            raise error
        if shared["error"] is not None:
            raise CacheError(f"rank 0 could not open {self.path}: {shared['error']}")
        if self.rank != 0:
            self.manifest = {"next_chunk": shared["next_chunk"], "float16": shared["float16"]}
        self._schemas = {kind: table_schema(kind, self.manifest["float16"]) for kind in TABLES}

    def _open_directory(self, meta: dict, resume: bool, float16: bool) -> None:
        if not resume:
            check_new_run_directory(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the run directory {self.path}: {exc}; {_remedy(exc)}") from exc
        self._lock = WriterLock(self.path)
        try:
            self.manifest = self._open(meta, resume, float16)
            world = self.context.world_size if self.context else 1
            if resume and self.manifest.get("world_size", 1) != world:
                raise CacheError(
                    f"the run in {self.path} was written by {self.manifest.get('world_size', 1)} process(es); resume "
                    f"it with the same number (--nproc {self.manifest.get('world_size', 1)}), not {world}"
                )
            self.manifest.update(status="running", world_size=world,
                                 writer={"pid": os.getpid(), "host": platform.node(), "since": now()})  # fmt: skip
            self._commit()
        except BaseException:
            self._lock.release()
            raise

    def _open(self, meta: dict, resume: bool, float16: bool) -> dict:
        exists = (self.path / MANIFEST).exists()
        if resume:
            manifest = read_manifest(self.path)
            if manifest["status"] == "finished":
                raise CacheError(f"the run in {self.path} has finished; nothing to resume")
            return manifest
        if exists:
            raise CacheError(
                f"{self.path} already holds a run; resume it (sgs-lab train --resume {self.path}), remove it "
                f"(sgs-lab cache rm {self.path}) or choose another directory"
            )
        clash = sorted(set(meta) & set(_BOOKKEEPING))
        if clash:
            raise ValueError(f"meta may not set the cache's own keys {clash}")
        manifest = {"schema_version": SCHEMA_VERSION, **meta, "versions": library_versions(), "float16": float16,
                    "created": now(), "committed_step": 0, "chunks": {kind: [] for kind in TABLES},
                    "next_chunk": 0, "history": []}  # fmt: skip
        return manifest

    # -- the sink interface used by fit -------------------------------------------------------------------------
    def write(self, samples: dict[str, np.ndarray], steps: dict[str, np.ndarray]) -> None:
        self._buffer["samples"].append(samples)
        if self.rank == 0:  # step rows hold global-batch values, the same on every rank: stored once
            self._buffer["steps"].append(steps)

    def flush(self) -> None:
        """Write the buffered rows as one chunk per table, then commit them in the manifest (in a distributed run
        every rank writes its chunk and rank 0 commits them all)."""
        if not self._buffer["samples"] and not self.context:
            if self._history_changed:
                self._commit()  # an epoch ended right after a flush: its summary must not wait for the next one
            return
        number = self.manifest["next_chunk"]
        written = []
        try:
            for kind, parts in self._buffer.items():
                if parts:
                    columns = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
                    written.append(self._write_chunk(kind, self._chunk_name(kind, number), columns))
        except BaseException:
            for kind, entry in written:  # the manifest never listed them: leave no orphan behind
                (self.path / entry["file"]).unlink(missing_ok=True)
            raise
        if self.context:  # every rank's chunks are on disk before rank 0 commits any of them
            written = [entry for part in _gather(written, self.context) for entry in part]
        self._buffer = {kind: [] for kind in TABLES}
        if not written:
            if self.rank == 0 and self._history_changed:
                self._commit()  # an epoch ended right after a flush: its summary must not wait for the next one
            return
        self.manifest["next_chunk"] = number + 1
        if self.rank != 0:
            return
        for kind, entry in written:
            self.manifest["chunks"][kind].append(entry)
        self.manifest["committed_step"] = max(e["steps"][1] for _, e in written) + 1
        self._commit()

    def _chunk_name(self, kind: str, number: int, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        suffix = f"-r{rank}" if self.context else ""
        return f"{kind}/part-{number:06d}{suffix}.parquet"

    def commit_epoch(self, summary: dict) -> None:
        """Record one epoch's summary in the manifest's history (committed with the next flush)."""
        if self.rank != 0:
            return
        history = [h for h in self.manifest["history"] if h["epoch"] != summary["epoch"]]  # a replayed epoch
        self.manifest["history"] = [*history, dict(summary)]
        self._history_changed = True

    def truncate(self, step: int) -> None:
        """Drop every stored row of steps ≥ ``step`` (a resumed run replays them) and any uncommitted file."""
        self._buffer = {kind: [] for kind in TABLES}
        if self.rank == 0:
            self._truncate(step)
        if self.context:  # the others wait for it and continue its chunk numbering
            self.manifest["next_chunk"] = _broadcast({"next_chunk": self.manifest["next_chunk"]}, self.context)[
                "next_chunk"
            ]

    def _truncate(self, step: int) -> None:
        doomed = []
        for kind, entries in self.manifest["chunks"].items():
            kept = []
            for entry in entries:
                first, last = entry["steps"]
                if last < step:
                    kept.append(entry)
                    continue
                doomed.append(self.path / entry["file"])
                if first < step:  # straddles the resume point: keep its early rows in a new chunk
                    import pyarrow.parquet as pq

                    table = pq.read_table(self.path / entry["file"])
                    table = table.filter(np.asarray(table["step"]) < step)
                    rank = int(entry["file"].rsplit("-r", 1)[1].split(".")[0]) if "-r" in entry["file"] else 0
                    name = self._chunk_name(kind, self.manifest["next_chunk"], rank)
                    kept.append(self._write_chunk(kind, name, table)[1])
                    self.manifest["next_chunk"] += 1
            self.manifest["chunks"][kind] = kept
        self.manifest["committed_step"] = min(self.manifest["committed_step"], step)
        self._commit()
        listed = {e["file"] for entries in self.manifest["chunks"].values() for e in entries}
        for kind in TABLES:  # chunks a killed writer renamed into place but never committed
            for file in (self.path / kind).glob("*.parquet"):
                if f"{kind}/{file.name}" not in listed:
                    doomed.append(file)
        for file in doomed:
            file.unlink(missing_ok=True)

    # -- the end of a run ---------------------------------------------------------------------------------------
    def finish(self, **fields) -> None:
        """Flush, store ``fields`` (test metrics, seconds, …) and mark the run finished."""
        self.flush()
        if self.rank != 0:
            return
        self.manifest.update(fields)
        self.manifest["status"] = "finished"
        self.manifest["finished"] = now()
        self._commit()
        self._lock.release()

    def close(self, status: str = "interrupted") -> None:
        """Release the run without finishing it; rows after the last flush are dropped (resume replays them)."""
        if self.rank != 0 or self._lock._handle.closed:
            return
        try:
            if self.manifest["status"] != "finished":
                self.manifest["status"] = status
                self._commit()
        finally:
            self._lock.release()  # also after a finish() whose last commit failed

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close()

    # -- files --------------------------------------------------------------------------------------------------
    def _write_chunk(self, kind: str, relative: str, columns) -> tuple[str, dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = columns if isinstance(columns, pa.Table) else to_table(columns, self._schemas[kind])
        final = self.path / relative
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            final.parent.mkdir(exist_ok=True)
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)  # readers never see a partial chunk
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CacheError(f"could not write {final}: {exc}; {_remedy(exc)} (committed chunks are intact)") from exc
        steps = np.asarray(table["step"])
        epochs = np.asarray(table["epoch"])
        entry = {"file": relative, "rows": table.num_rows, "bytes": final.stat().st_size,
                 "steps": [int(steps.min()), int(steps.max())], "epochs": [int(epochs.min()), int(epochs.max())]}  # fmt: skip
        return kind, entry

    def _commit(self) -> None:
        self.manifest["updated"] = now()
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self._history_changed = False


def _broadcast(value: dict, context) -> dict:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=context.group)
    return box[0]


def _gather(value: list, context) -> list[list]:
    import torch.distributed as dist

    out = [None] * context.world_size
    dist.all_gather_object(out, value, group=context.group)
    return out
