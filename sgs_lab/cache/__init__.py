"""The gradient-statistics cache: one directory per run, Parquet chunks and an atomically replaced manifest.

Layout of a run directory::

    manifest.json        config, seed, noise, library versions, data fingerprints, schema version, status,
                         committed_step, the committed chunks (rows, epoch and step ranges), history, test metrics
    samples/part-*.parquet   one row per (epoch, step, task, sample_id): DESIGN §5 columns
    steps/part-*.parquet     one row per (epoch, step, task): task_weight, loss, consistency
    checkpoint.pt        the trainer's checkpoint at the last committed step (resume)
    writer.lock          flock-ed by the live writer; a run whose lock is free but reads "running" was interrupted

>>> import tempfile, sgs_lab.cache as cache
>>> from sgs_lab.data import make_multidigits
>>> from sgs_lab.train import TrainConfig
>>> train, test = make_multidigits(64, 32, seed=0)
>>> root = tempfile.mkdtemp()
>>> run = cache.get_or_train(TrainConfig(epochs=1, batch_size=32), root, train, test, progress=False)
>>> run.status, len(run.samples())          # one epoch x 2 tasks x 64 samples
('finished', 128)
>>> cache.get_or_train(TrainConfig(epochs=1, batch_size=32), root, train, test).path == run.path  # cached
True
"""

from ._manage import gc_runs, get_or_train, remove_run, run_key, train_run
from ._reader import Run, find_runs, list_runs, open_run
from ._schema import SCHEMA_VERSION
from ._writer import CacheError, RunLockedError, RunWriter

__all__ = [
    "SCHEMA_VERSION", "CacheError", "Run", "RunLockedError", "RunWriter", "find_runs", "gc_runs", "get_or_train",
    "list_runs", "open_run", "remove_run", "run_key", "train_run",
]  # fmt: skip
