"""Distributed training under torchrun (2 processes, gloo, CPU): exact global statistics, the cache, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sgs_lab.cache import open_run
from sgs_lab.cli import main
from sgs_lab.distributed import check_batches, shard, torchrun_command

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SGS_LAB_FAST": "1"}
KEY = ["epoch", "task", "sample_id"]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_sharding_covers_every_sample_once_and_refuses_tiny_batches():
    from sgs_lab.distributed import Context

    index = torch.randperm(23)
    parts = [shard(index, Context(r, 3, None, torch.device("cpu"))) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(23)) and [len(p) for p in parts] == [8, 8, 7]
    check_batches(100, 32, 2)  # the last batch holds 4
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        check_batches(97, 32, 4)  # the last batch holds 1
    assert torchrun_command(2, ["train"])[-3:] == ["-m", "sgs_lab.cli", "train"]


def test_statistics_weights_and_update_equal_one_process_on_the_global_batch(tmp_path):
    done = torchrun(str(HERE / "distributed_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        worst = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert worst.pop("local_only_cosine") > 1e-3  # references over one shard would differ
        assert set(worst) >= {"cosine", "dot", "norm", "ref_norm", "conflict", "task_cosine", "gramian", "weights",
                              "task_weights", "parameters"}  # fmt: skip
        assert max(worst.values()) < 1e-8, worst


RUN = ["--method", "sgs", "--warmup", "0", "--reference", "loo", "--epochs", "2", "--train-size", "192",
       "--test-size", "64", "--batch-size", "24", "--checkpoint-every", "3", "--dtype", "float64", "--optimizer",
       "sgd", "--lr", "0.2", "--noise", "0.3"]  # fmt: skip


def test_two_processes_train_the_same_model_and_records_as_one(tmp_path):
    done = torchrun("-m", "sgs_lab.cli", "train", *RUN, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "sgs_lab.cli", "train", *RUN, "--out", str(tmp_path / "one")],
                            env=ENV, capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = open_run(tmp_path / "one"), open_run(tmp_path / "two")
    assert two.meta["world_size"] == 2 and two.status == "finished"
    assert {e["file"][-11:-8] for e in two._manifest["chunks"]["samples"]} == {"-r0", "-r1"}  # each rank wrote
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-8
    rows_one = one.samples().sort_values(KEY, ignore_index=True)
    rows_two = two.samples().sort_values(KEY, ignore_index=True)
    assert not rows_two.duplicated(KEY).any() and len(rows_two) == 2 * 2 * 192
    for column in ("sgs", "sgs_batch", "sgs_class", "weight", "loss", "grad_norm", "conflict", "p_label"):
        np.testing.assert_allclose(rows_two[column], rows_one[column], rtol=1e-6, atol=1e-7, err_msg=column)
    np.testing.assert_allclose(two.steps()["task_weight"], one.steps()["task_weight"], rtol=1e-6)
    assert two.meta["test_metrics"] == pytest.approx(one.meta["test_metrics"], abs=1e-9)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_a_dead_rank_stops_the_run_which_resumes_with_the_same_world_size_only(tmp_path):
    out = tmp_path / "run"
    options = [*RUN[:-10], "--epochs", "6", "--train-size", "384", "--batch-size", "16", "--checkpoint-every", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "sgs_lab.cli", "train", *options, "--out", str(out)]  # fmt: skip
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            manifest = out / "manifest.json"
            if manifest.exists() and json.loads(manifest.read_text() or "{}").get("committed_step", 0) >= 10:
                break
            time.sleep(0.05)
        workers = _children(launcher.pid)
        assert len(workers) == 2 and launcher.poll() is None, "the run ended before a rank could be killed"
        killed = time.monotonic()
        os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-run
        code = launcher.wait(timeout=90)
        stopped = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code != 0 and stopped < 60  # the other rank stopped too, with an error, in bounded time
    run = open_run(out)
    assert run.status == "interrupted" and len(run.samples()) > 0  # committed chunks stay readable
    with pytest.raises(SystemExit, match=r"written by 2 process\(es\); resume it with the same number"):
        main(["train", "--resume", str(out)])
    done = torchrun("-m", "sgs_lab.cli", "train", "--resume", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = open_run(out).samples()
    assert open_run(out).status == "finished"
    assert not rows.duplicated(KEY).any() and len(rows) == 6 * 2 * 384
