"""The Parquet run cache: round trips, pruning, aggregates, crash safety (real SIGKILL), resume, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sgs_lab import cache
from sgs_lab.cache import CacheError, RunLockedError, RunWriter, open_run
from sgs_lab.cli import main
from sgs_lab.data import make_multidigits
from sgs_lab.train import TrainConfig, fit
from sgs_lab.train.recorder import SAMPLE_COLUMNS, STEP_COLUMNS

TASKS = ("left", "right")


def records(step: int, epoch: int = 0, size: int = 4, seed: int = 0):
    """Synthetic (samples, steps) records of one step with every stored column (NaN for one missing label)."""
    rng = np.random.default_rng(seed * 1000 + step)
    n = len(TASKS) * size
    samples = {c: rng.normal(size=n).astype(np.float32) for c in SAMPLE_COLUMNS}
    samples.update(epoch=np.full(n, epoch, np.int32), step=np.full(n, step, np.int64),
                   task=np.repeat(np.array(TASKS, dtype=object), size), sample_id=np.tile(np.arange(size), 2) + 100,
                   noisy=rng.random(n) < 0.3, present=np.ones(n, bool))  # fmt: skip
    samples["present"][0] = False
    samples["sgs"][0] = np.nan
    steps = {c: rng.normal(size=len(TASKS)).astype(np.float32) for c in STEP_COLUMNS}
    steps.update(epoch=np.full(2, epoch, np.int32), step=np.full(2, step, np.int64), task=np.array(TASKS, dtype=object))
    return samples, steps


def synthetic_run(path, steps_per_flush=((0, 1, 2), (3, 4)), meta=None, finish=True, **writer_options):
    with RunWriter(path, {"method": "ew", "tasks": list(TASKS), **(meta or {})}, **writer_options) as writer:
        for group in steps_per_flush:
            for step in group:
                writer.write(*records(step, epoch=step // 3))
            writer.flush()
        if finish:
            writer.finish(test_accuracy={"left": 0.5, "right": 0.7})
    return open_run(path)


def frame(columns: dict) -> pd.DataFrame:
    return pd.DataFrame({k: v for k, v in columns.items()})


# -- round trip and readers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real run in the cache and the same run's records kept in memory."""
    train, test = make_multidigits(192, 64, seed=3)
    train = train.with_noise(0.3, seed=3).with_missing({"right": 0.2}, seed=3)
    config = TrainConfig(method="sgs", knobs={"warmup": 1}, epochs=3, batch_size=64, seed=3)
    root = tmp_path_factory.mktemp("runs")
    run = cache.train_run(train, test, config, root / "run", progress=False, checkpoint_every=2)
    memory = fit(train, test, config, progress=False)
    return run, memory


def test_a_stored_run_reads_back_exactly_what_training_recorded(trained):
    run, memory = trained
    stored = run.samples()
    expected = frame(memory.sink.samples())
    assert list(stored.columns) == list(SAMPLE_COLUMNS)
    assert len(stored) == 3 * 2 * 192
    assert isinstance(stored["task"].dtype, pd.CategoricalDtype)
    assert stored["epoch"].dtype == np.int32 and stored["sgs"].dtype == np.float32
    for column in SAMPLE_COLUMNS:
        left, right = stored[column], expected[column]
        if column == "task":
            assert (left.astype(str).to_numpy() == right.to_numpy()).all()
        else:
            np.testing.assert_array_equal(left.to_numpy(), right.to_numpy().astype(left.dtype), err_msg=column)
    steps = run.steps()
    np.testing.assert_array_equal(steps["task_weight"], frame(memory.sink.steps())["task_weight"].astype(np.float32))
    meta = run.meta
    assert meta["status"] == "finished" and meta["method"] == "sgs" and meta["seed"] == 3
    assert meta["noise"] == {"left": round(58 / 192, 4), "right": round(58 / 192, 4)}  # the flipped fraction
    assert set(meta["test_accuracy"]) == set(TASKS)
    assert meta["data"]["train_size"] == 192 and meta["versions"]["sgs_lab"] and meta["schema_version"] == 1
    assert [h["epoch"] for h in run.history] == [0, 1, 2]
    assert meta["test_metrics"] == memory.test_metrics


def test_selection_reads_only_what_is_asked_and_prunes_chunks(trained, tmp_path):
    run, _ = trained
    everything = run.samples()
    picked = run.samples(epochs=[1, 2], tasks="right", columns=["sample_id", "sgs"])
    expected = everything[(everything["epoch"] >= 1) & (everything["task"] == "right")][["sample_id", "sgs"]]
    assert list(picked.columns) == ["sample_id", "sgs"]
    np.testing.assert_array_equal(picked.to_numpy(), expected.to_numpy())
    # epoch-0 chunks are never opened: corrupt them in a copy and the selection still reads
    import shutil

    copy = Path(shutil.copytree(run.path, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["chunks"]["samples"]:
        if entry["epochs"][1] == 0:
            (copy / entry["file"]).write_bytes(b"garbage")
    assert len(open_run(copy).samples(epochs=2)) == 2 * 192
    with pytest.raises(CacheError, match="unreadable"):
        open_run(copy).samples()
    with pytest.raises(ValueError, match="unknown column"):
        run.samples(columns=["nope"])
    with pytest.raises(ValueError, match="this run's tasks are"):
        run.samples(tasks="middle")


def test_aggregates_equal_pandas_over_all_rows(trained):
    run, _ = trained
    rows = run.samples()
    expected = rows.assign(task=rows["task"].astype(str)).groupby(["task", "sample_id"])["loss"]
    expected = expected.agg(["mean", lambda v: v.std(ddof=0), "min", "max", "count"]).reset_index()
    got = run.per_sample("loss")
    assert got["count"].min() < 3  # missing labels leave NaN losses out
    np.testing.assert_allclose(got[["mean", "std", "min", "max"]].to_numpy(), expected.iloc[:, 2:6].to_numpy(),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    np.testing.assert_array_equal(got["count"], expected.iloc[:, 6])
    epochs = run.per_epoch(["sgs", "weight"])
    check = rows.assign(task=rows["task"].astype(str)).groupby(["epoch", "task", "noisy"])[["sgs", "weight"]].mean()
    np.testing.assert_allclose(epochs[["sgs", "weight"]].to_numpy(), check.to_numpy(), rtol=1e-6)
    assert epochs["rows"].sum() == len(rows)


def test_float16_storage_halves_the_statistics(tmp_path):
    full = synthetic_run(tmp_path / "f32")
    half = synthetic_run(tmp_path / "f16", float16=True)
    schema = pq.read_schema(half.path / half._manifest["chunks"]["samples"][0]["file"])
    assert str(schema.field("sgs").type) == "halffloat" and str(schema.field("label").type) == "float"
    np.testing.assert_allclose(half.samples()["loss"], full.samples()["loss"], rtol=1e-3)


# -- crash safety and resume ------------------------------------------------------------------------------------
def test_truncate_drops_later_rows_rewrites_a_straddling_chunk_and_removes_orphans(tmp_path):
    synthetic_run(tmp_path / "run", steps_per_flush=((0, 1, 2), (3, 4)), finish=False)
    orphan = tmp_path / "run" / "samples" / "part-999999.parquet"  # renamed into place, never committed
    orphan.write_bytes(b"x")
    with RunWriter(tmp_path / "run", resume=True) as writer:
        writer.truncate(2)
    run = open_run(tmp_path / "run")
    assert sorted(run.samples()["step"].unique()) == [0, 1] and sorted(run.steps()["step"].unique()) == [0, 1]
    assert run._manifest["committed_step"] == 2 and not orphan.exists()
    assert len(list((tmp_path / "run" / "samples").glob("*.parquet"))) == 1


def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sgs_lab.cli", "train", "--method", "sgs", "--warmup", "1", "--noise", "0.3",
            "--seed", "5", "--epochs", "4", "--train-size", "512", "--test-size", "64", "--batch-size", "16",
            "--checkpoint-every", "3", "--out", str(out), *extra]  # fmt: skip


def _committed(path: Path) -> int:
    try:
        return json.loads((path / "manifest.json").read_text())["committed_step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_mid_run_then_resume_stores_every_row_exactly_once(tmp_path):
    env = {**os.environ, "SGS_LAB_FAST": "1", "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_command(straight), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    child = subprocess.Popen(_train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reads = 0
    try:
        deadline = time.monotonic() + 120
        while _committed(killed) < 45 and time.monotonic() < deadline:  # mid epoch 1 (32 steps per epoch)
            if _committed(killed) > 0:  # a second process reads while the trainer writes
                live = open_run(killed)
                rows = live.samples(columns=["step", "task", "sample_id"])
                assert live.status == "running"
                assert len(rows) == 2 * 16 * live._manifest["committed_step"]  # whole steps only, never partial
                assert not rows.duplicated().any()
                reads += 1
            time.sleep(0.02)
        assert child.poll() is None, "the run finished before it could be killed: make it longer"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert reads > 0
    run = open_run(killed)
    assert run.status == "interrupted"  # the manifest still says running; its writer's lock died with it
    done = run._manifest["committed_step"]
    assert len(run.samples()) == 2 * 16 * done  # every committed chunk is readable
    resume = [sys.executable, "-m", "sgs_lab.cli", "train", "--resume", str(killed)]
    subprocess.run(resume, env=env, check=True, capture_output=True)  # same threads as the other runs: same bits
    resumed, reference = open_run(killed).samples(), open_run(straight).samples()
    key = ["epoch", "task", "sample_id"]
    assert not resumed.duplicated(key).any() and len(resumed) == 4 * 2 * 512
    pd.testing.assert_frame_equal(resumed.sort_values(key, ignore_index=True),
                                  reference.sort_values(key, ignore_index=True))  # fmt: skip
    assert open_run(killed).meta["test_metrics"] == open_run(straight).meta["test_metrics"]


def test_a_live_writer_locks_the_run_and_its_end_marks_it(tmp_path):
    with RunWriter(tmp_path / "run", {"method": "ew"}) as writer:
        writer.write(*records(0))
        writer.flush()
        assert open_run(tmp_path / "run").status == "running"
        with pytest.raises(RunLockedError, match="another live process"):
            RunWriter(tmp_path / "run", resume=True)
        with pytest.raises(RunLockedError, match="live process"):
            cache.remove_run(tmp_path / "run")
    assert open_run(tmp_path / "run").status == "interrupted"
    with pytest.raises(CacheError, match="already holds a run"):
        RunWriter(tmp_path / "run", {"method": "ew"})
    finished = synthetic_run(tmp_path / "done")
    with pytest.raises(CacheError, match="has finished"):
        RunWriter(finished.path, resume=True)


# -- bad input --------------------------------------------------------------------------------------------------
def test_a_corrupt_chunk_is_named_and_the_others_stay_readable(tmp_path):
    run = synthetic_run(tmp_path / "run")
    bad = run.path / run._manifest["chunks"]["samples"][0]["file"]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(CacheError, match=f"{bad}.*skip_bad_chunks=True"):
        run.samples()
    with pytest.warns(UserWarning, match="skipped"):
        rest = run.samples(skip_bad_chunks=True)
    assert sorted(rest["step"].unique()) == [3, 4]
    bad.unlink()
    with pytest.raises(CacheError, match="is missing"):
        run.samples()


def test_schema_versions_and_directories_that_are_not_runs(tmp_path):
    run = synthetic_run(tmp_path / "runs" / "a")
    manifest = json.loads((run.path / "manifest.json").read_text())
    (run.path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(CacheError, match="schema 99, newer.*upgrade sgs_lab"):
        open_run(run.path)
    (run.path / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "schema_version"}))
    with pytest.raises(CacheError, match="no schema_version"):
        open_run(run.path)
    (run.path / "manifest.json").write_text("{ half a fil")
    with pytest.raises(CacheError, match="unreadable"):
        open_run(run.path)
    with pytest.raises(CacheError, match=r"not an sgs_lab run .*it holds runs: .*runs/a"):
        open_run(tmp_path / "runs")
    with pytest.raises(CacheError, match="not an sgs_lab run"):
        open_run(tmp_path / "nowhere")
    with pytest.raises(CacheError, match="not an sgs_lab run"):
        cache.remove_run(tmp_path / "runs")  # never deletes a directory that is not a run
    assert (tmp_path / "runs" / "a").exists()


@pytest.mark.parametrize("code, remedy", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "not writable")])
def test_a_failed_write_says_why_and_leaves_the_manifest_and_chunks_intact(tmp_path, monkeypatch, code, remedy):
    writer = RunWriter(tmp_path / "run", {"method": "ew"})
    writer.write(*records(0))
    writer.flush()
    before = (tmp_path / "run" / "manifest.json").read_text()

    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pq, "write_table", fails)
    writer.write(*records(1))
    with pytest.raises(CacheError, match=f"part-000001.parquet.*{remedy}.*intact"):
        writer.flush()
    monkeypatch.undo()
    assert (tmp_path / "run" / "manifest.json").read_text() == before
    assert not list((tmp_path / "run").rglob("*.tmp")) and len(open_run(tmp_path / "run").samples()) == 8
    writer.flush()  # the failed rows stayed buffered: once there is room, nothing is lost
    assert len(open_run(tmp_path / "run").samples()) == 16
    before = (tmp_path / "run" / "manifest.json").read_text()
    monkeypatch.setattr(os, "replace", fails)  # now the manifest itself cannot be replaced
    with pytest.raises(CacheError, match=f"manifest.json.*{remedy}.*previous manifest.json is intact"):
        writer.close()
    monkeypatch.undo()
    assert (tmp_path / "run" / "manifest.json").read_text() == before
    assert not list((tmp_path / "run").rglob(".*.tmp"))


# -- content addressing and housekeeping -----------------------------------------------------------------------
def test_get_or_train_reopens_a_stored_run_without_training(tmp_path, monkeypatch):
    import sgs_lab.train

    train, test = make_multidigits(64, 32, seed=0)
    config = TrainConfig(epochs=1, batch_size=32)
    first = cache.get_or_train(config, tmp_path, train, test, progress=False)
    assert first.status == "finished" and first.path.name.startswith("ew-")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(sgs_lab.train, "fit", no_training)
    again = cache.get_or_train(config, tmp_path, train, test)
    assert again.path == first.path and len(again.samples()) == 128
    noisy = train.with_noise(0.2, seed=0)
    assert cache.run_key(config, noisy, test) != cache.run_key(config, train, test)  # data is part of the key
    assert cache.run_key(TrainConfig(epochs=2, batch_size=32), train, test) != cache.run_key(config, train, test)


def test_list_remove_and_collect_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    old = synthetic_run(root / "old")
    manifest = json.loads((old.path / "manifest.json").read_text())
    manifest["updated"] = "2020-01-01T00:00:00+00:00"
    (old.path / "manifest.json").write_text(json.dumps(manifest))
    synthetic_run(root / "broken", finish=False)
    synthetic_run(root / "new")
    runs = cache.list_runs(root)
    assert sorted(runs["path"].map(lambda p: Path(p).name)) == ["broken", "new", "old"]
    assert dict(zip(runs["path"].map(lambda p: Path(p).name), runs["status"])) == {
        "old": "finished", "broken": "interrupted", "new": "finished"}  # fmt: skip
    assert (runs["rows"] == 5 * 8).all() and (runs["bytes"] > 0).all()
    assert main(["cache", "ls", str(root)]) == 0
    assert "interrupted" in capsys.readouterr().out
    assert main(["cache", "gc", str(root), "--status", "interrupted", "--dry-run"]) == 0
    assert "would remove 1 run(s)" in capsys.readouterr().out and (root / "broken").exists()
    removed = cache.gc_runs(root, older_than_hours=24 * 365)
    assert list(removed["path"].map(lambda p: Path(p).name)) == ["old"] and not (root / "old").exists()
    total = cache.list_runs(root)["bytes"]
    removed = cache.gc_runs(root, keep_bytes=int(total.max()))  # the oldest goes until the rest fit
    assert list(removed["path"].map(lambda p: Path(p).name)) == ["broken"]
    assert main(["cache", "rm", str(root / "new")]) == 0 and not (root / "new").exists()
    with pytest.raises(SystemExit, match="not an sgs_lab run"):
        main(["cache", "rm", str(tmp_path)])
    with pytest.raises(SystemExit, match="give --older-than"):
        main(["cache", "gc", str(root)])


# -- regressions found in review -------------------------------------------------------------------------------
def test_a_run_goes_only_into_a_new_or_empty_directory_outside_other_runs(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "thesis.tex").write_text("months of work")
    with pytest.raises(CacheError, match="not empty and holds no run"):
        RunWriter(tmp_path / "project", {"method": "ew"})
    outer = synthetic_run(tmp_path / "outer")
    with pytest.raises(CacheError, match="is inside the run"):
        RunWriter(outer.path / "inner", {"method": "ew"})
    (tmp_path / "empty").mkdir()
    synthetic_run(tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "project" / "thesis.tex").exists() and not (tmp_path / "project" / "manifest.json").exists()


def test_removing_a_run_deletes_only_its_own_files(tmp_path):
    run = synthetic_run(tmp_path / "run")
    (run.path / "notes.txt").write_text("added by hand later")
    cache.remove_run(run.path)
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]  # the run is gone, the notes stay


def test_foreign_and_corrupt_manifests_neither_list_as_runs_nor_stop_gc(tmp_path):
    root = tmp_path / "runs"
    synthetic_run(root / "good")
    (root / "webapp").mkdir(parents=True)
    (root / "webapp" / "manifest.json").write_text(json.dumps({"name": "some web app"}))  # another tool's file
    broken = synthetic_run(root / "broken")
    (broken.path / "manifest.json").write_text("{ half")
    runs = cache.list_runs(root)
    assert sorted(Path(p).name for p in runs["path"]) == ["broken", "good"]
    assert dict(zip(runs["path"].map(lambda p: Path(p).name), runs["status"]))["broken"] == "corrupt"
    removed = cache.gc_runs(root, older_than_hours=-1)  # everything is "old": the good run goes, not the corrupt one
    assert list(removed["path"].map(lambda p: Path(p).name)) == ["good"] and broken.path.exists()
    removed = cache.gc_runs(root, status="corrupt")
    assert list(removed["path"].map(lambda p: Path(p).name)) == ["broken"] and not broken.path.exists()
    assert (root / "webapp" / "manifest.json").exists()


def test_get_or_train_restarts_a_run_interrupted_before_its_first_checkpoint(tmp_path):
    train, test = make_multidigits(64, 32, seed=0)
    config = TrainConfig(epochs=1, batch_size=32)
    out = tmp_path / f"ew-{cache.run_key(config, train, test)}"
    with RunWriter(out, {"method": "ew"}):
        pass  # killed before any checkpoint
    assert open_run(out).status == "interrupted" and not (out / "checkpoint.pt").exists()
    run = cache.get_or_train(config, tmp_path, train, test, progress=False)
    assert run.status == "finished" and len(run.samples()) == 128


def test_an_epoch_that_ends_right_after_a_flush_is_committed_to_the_history(tmp_path):
    with RunWriter(tmp_path / "run", {"method": "ew"}) as writer:
        writer.write(*records(0))
        writer.flush()
        writer.commit_epoch({"epoch": 0, "train_loss": 1.0})
        writer.flush()  # nothing buffered: the summary alone must still reach the manifest
        assert [h["epoch"] for h in open_run(tmp_path / "run").history] == [0]


def test_epochs_may_be_numpy_integers(tmp_path):
    run = synthetic_run(tmp_path / "run")
    frame = run.samples()
    last = frame["epoch"].max()  # a numpy integer
    assert len(run.samples(epochs=last)) == (frame["epoch"] == last).sum() > 0
