"""Training into the cache, content-addressed runs, and housekeeping (remove, garbage-collect)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from .. import __version__, distributed
from ._reader import Run, _is_run, directory_size, find_runs, list_runs, open_run
from ._schema import MANIFEST, SCHEMA_VERSION
from ._writer import RUN_FILES, CacheError, RunLockedError, RunWriter, read_manifest, writer_alive


def run_key(config, train, test) -> str:
    """16 hex digits hashing the training configuration, both data sets' fingerprints, the sgs_lab version and
    the cache schema: equal keys mean the run would come out the same."""
    described = {
        "config": dataclasses.asdict(config), "train": train.fingerprint(), "test": test.fingerprint(),
        "sgs_lab": __version__, "schema": SCHEMA_VERSION,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()[:16]


def train_run(train, test, config, out, *, meta: dict | None = None, resume: bool = False, progress: bool = True,
              checkpoint_every: int = 50, float16: bool = False, **fit_options) -> Run:  # fmt: skip
    """Train ``config`` with :func:`sgs_lab.train.fit` and store the run in ``out`` (or finish the interrupted run
    there with ``resume=True``). Rows are committed every ``checkpoint_every`` steps and at each epoch end, each
    time with a checkpoint. Returns the finished :class:`Run`."""
    from ..train import fit

    meta = dict(meta or {})
    meta.setdefault("method", config.method)
    meta.setdefault("knobs", config.knobs)
    meta.setdefault("seed", config.seed)
    meta.setdefault("tasks", list(train.tasks))
    meta.setdefault("noise", {t: round(float(train.noisy[t].float().mean()), 4) for t in train.tasks})
    meta.setdefault("config", dataclasses.asdict(config))
    meta.setdefault("data", {"train": train.fingerprint(), "test": test.fingerprint(), "train_size": len(train),
                             "test_size": len(test)})  # fmt: skip
    context = distributed.current()
    with RunWriter(out, None if resume else meta, resume=resume, float16=float16, context=context) as writer:
        result = fit(train, test, config, out=out, resume=resume, sink=writer, progress=progress,
                     checkpoint_every=checkpoint_every, callbacks=[writer.commit_epoch], **fit_options)  # fmt: skip
        if result.history and result.history[-1]["epoch"] == config.epochs - 1:
            accuracy = {k.split("/")[0]: v for k, v in result.test_metrics.items() if k.endswith("accuracy")}
            writer.finish(test_metrics=result.test_metrics, test_accuracy=accuracy, seconds=round(result.seconds, 2))
    if context:
        import torch.distributed as dist

        dist.barrier(group=context.group)  # rank 0 has committed the finished manifest
    return open_run(out)


def get_or_train(config, root, train, test, *, meta: dict | None = None, progress: bool = True) -> Run:
    """The run of ``config`` on (``train``, ``test``) under ``root``: opened when already stored (instant),
    finished when interrupted, trained otherwise. The directory is ``root/<method>-<key>`` (see :func:`run_key`)."""
    key = run_key(config, train, test)
    out = Path(root) / f"{config.method}-{key}"
    if (out / MANIFEST).exists():
        run = open_run(out)
        if run.status == "finished":
            return run
        if run.status == "running":
            raise RunLockedError(f"{out} is being trained by another live process; open it with open_run to watch")
        if (out / "checkpoint.pt").exists():
            return train_run(train, test, config, out, resume=True, progress=progress)
        remove_run(out)  # interrupted before its first checkpoint: nothing to resume, start it again
    return train_run(train, test, config, out, meta={**(meta or {}), "key": key}, progress=progress)


def remove_run(directory: str | Path, *, corrupt: bool = False) -> int:
    """Delete one run: its own files (manifest, lock, checkpoint, history, report, chunk folders) and then the
    directory if nothing else is left in it. Returns the bytes freed.

    Refuses a directory that is not a run (``corrupt=True`` accepts an unreadable manifest in a directory laid out
    like a run), a run whose writer is alive, and a run with other runs inside it.
    """
    directory = Path(directory)
    if not (corrupt and _is_run(directory)):
        read_manifest(directory)  # raises for a directory that is not a run: never delete anything else
    if writer_alive(directory):
        raise RunLockedError(f"{directory} is being written by a live process; stop it before removing the run")
    nested = [p for p in find_runs(directory) if p != directory]
    if nested:
        raise CacheError(f"{directory} holds other runs ({', '.join(map(str, nested[:3]))}); remove those first")
    size = 0
    for name in RUN_FILES:
        path = directory / name
        if path.is_dir():
            size += directory_size(path)
            shutil.rmtree(path)
        elif path.exists():
            size += path.stat().st_size
            path.unlink()
    for leftover in directory.glob(".*.tmp"):  # a killed writer's temporary files
        size += leftover.stat().st_size
        leftover.unlink()
    if not any(directory.iterdir()):
        directory.rmdir()
    return size


def gc_runs(root: str | Path, *, older_than_hours: float | None = None, status: str | None = None,
            keep_bytes: int | None = None, dry_run: bool = False):  # fmt: skip
    """Remove runs under ``root`` that are older than ``older_than_hours`` and/or have ``status`` ("interrupted",
    "finished", "corrupt"); then, with ``keep_bytes``, the oldest remaining runs until the rest fit. Live runs are
    never removed, and corrupt runs only when ``status="corrupt"`` asks for them. Returns the DataFrame of removed
    (or, with ``dry_run``, removable) runs; a run that cannot be removed is skipped with a warning."""
    import warnings

    runs = list_runs(root)
    runs = runs[(runs["status"] != "running") & ((runs["status"] != "corrupt") | (status == "corrupt"))]
    runs = runs.sort_values("updated", na_position="first")
    chosen = runs.iloc[0:0]
    if older_than_hours is not None or status is not None:
        pick = runs["status"].notna()
        if older_than_hours is not None:
            pick &= runs["age_hours"].fillna(float("inf")) > older_than_hours
        if status is not None:
            pick &= runs["status"] == status
        chosen = runs[pick]
    if keep_bytes is not None:
        rest = runs.drop(chosen.index)
        excess = rest["bytes"].sum() - keep_bytes
        extra = rest[rest["bytes"].cumsum().shift(fill_value=0) < excess]  # oldest first until under the budget
        chosen = runs.loc[chosen.index.union(extra.index)]
    if dry_run:
        return chosen.reset_index(drop=True)
    removed = []
    for index, row in chosen.iterrows():
        try:
            remove_run(row["path"], corrupt=row["status"] == "corrupt")
            removed.append(index)
        except CacheError as exc:
            warnings.warn(f"not removed: {exc}", stacklevel=2)
    return chosen.loc[removed].reset_index(drop=True)


__all__ = ["find_runs", "gc_runs", "get_or_train", "remove_run", "run_key", "train_run"]
