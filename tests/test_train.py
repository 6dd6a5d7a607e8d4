"""The trainer: repeatable, resumable, recording every statistic; the command line on top of it."""

import numpy as np
import pytest
import torch

from sgs_lab.cache import open_run
from sgs_lab.cli import main
from sgs_lab.data import make_multidigits
from sgs_lab.train import SAMPLE_COLUMNS, STEP_COLUMNS, MemorySink, TrainConfig, delta_m, fit


@pytest.fixture(scope="module")
def data():
    train, test = make_multidigits(192, 96, seed=0)
    return train.with_noise(0.4, seed=0), test


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fit_records_every_sample_of_every_task(data):
    train, test = data
    result = fit(train, test, TrainConfig(method="sgs", knobs={"warmup": 0}, epochs=2, batch_size=64), progress=False)
    samples, steps = result.sink.samples(), result.sink.steps()
    assert set(SAMPLE_COLUMNS) <= set(samples) and set(STEP_COLUMNS) <= set(steps)
    assert len(samples["sample_id"]) == 2 * 2 * len(train)  # epochs × tasks × samples
    keys = set(zip(samples["epoch"], samples["task"], samples["sample_id"]))
    assert len(keys) == len(samples["sample_id"])  # each (epoch, task, sample) exactly once
    assert samples["noisy"].mean() == pytest.approx(0.4, abs=0.02)
    for step in np.unique(samples["step"]):  # SGS sample weights have mean 1 per task and step
        for task in ("left", "right"):
            pick = (samples["step"] == step) & (samples["task"] == task)
            assert samples["weight"][pick].mean() == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(samples["sgs_class"]).all() and np.all(np.abs(samples["sgs"]) <= 1)
    assert len(result.history) == 2 and 0.0 <= result.test_metrics["left/accuracy"] <= 1.0


def test_fit_is_bit_for_bit_repeatable_on_cpu(data):
    train, test = data
    config = TrainConfig(method="sgs", epochs=1, batch_size=64, seed=3)
    a = fit(train, test, config, progress=False)
    b = fit(train, test, config, progress=False)
    assert torch.equal(_params(a.model), _params(b.model))


@pytest.mark.parametrize("method", ["sgs", "uw"])
def test_resume_continues_exactly_without_duplicate_rows(data, tmp_path, method):
    train, test = data
    knobs = {"reference": "ema", "warmup": 1} if method == "sgs" else {}
    config = TrainConfig(method=method, knobs=knobs, epochs=2, batch_size=64, seed=1)
    straight = fit(train, test, config, progress=False)
    sink = MemorySink()
    fit(train, test, config, out=tmp_path, sink=sink, progress=False, checkpoint_every=1, stop_after_steps=4)
    resumed = fit(train, test, config, out=tmp_path, sink=sink, resume=True, progress=False)
    assert torch.equal(_params(straight.model), _params(resumed.model))
    samples = sink.samples()
    assert len(samples["sample_id"]) == 2 * 2 * len(train)
    assert len(set(zip(samples["epoch"], samples["task"], samples["sample_id"]))) == len(samples["sample_id"])
    assert resumed.test_metrics == straight.test_metrics


def test_resume_refuses_another_configuration(data, tmp_path):
    train, test = data
    fit(train, test, TrainConfig(epochs=1, batch_size=64), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        fit(train, test, TrainConfig(epochs=1, batch_size=32), out=tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(train, test, TrainConfig(epochs=1), out=tmp_path / "empty", resume=True, progress=False)


def test_bad_configuration_and_data():
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown"):
        fit(*make_multidigits(64, 32), TrainConfig(method="nope", epochs=1), progress=False)


def test_delta_m_convention():
    single = {"left/accuracy": 0.8, "right/accuracy": 0.5}
    assert delta_m({"left/accuracy": 0.88, "right/accuracy": 0.5}, single) == pytest.approx(5.0)
    assert delta_m({"left/loss": 0.9}, {"left/loss": 1.0}) == pytest.approx(10.0)  # lower loss is better
    with pytest.raises(ValueError, match="at least one metric"):
        delta_m({"a": 1.0}, {"b": 1.0})


def test_cli_train_writes_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SGS_LAB_FAST", "1")
    out = tmp_path / "run"
    assert main(["train", "--method", "sgs", "--noise", "0.2", "--seed", "1", "--epochs", "1", "--out", str(out),
                 "--train-size", "128", "--test-size", "64", "--reference", "loo"]) == 0  # fmt: skip
    meta = open_run(out).meta
    assert meta["status"] == "finished" and meta["method"] == "sgs" and meta["noise"] == {"left": 0.2, "right": 0.2}
    assert set(meta["test_accuracy"]) == {"left", "right"} and meta["knobs"] == {"reference": "loo"}
    assert '"method": "sgs"' in capsys.readouterr().out


def test_cli_rejects_sgs_options_for_other_methods_and_unknown_methods(capsys):
    with pytest.raises(SystemExit, match="apply to --method sgs only"):
        main(["train", "--method", "ew", "--reference", "loo", "--out", "x"])
    with pytest.raises(SystemExit):
        main(["train", "--method", "nope", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_demo_writes_a_self_contained_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SGS_LAB_FAST", "1")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "128", "--test-size", "64"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "plotly" in page and '<script src="http' not in page  # the JavaScript is inlined
    printed = capsys.readouterr().out
    assert "Δm% vs single-task" in printed and "report:" in printed
    for run in ("ew", "sgs", "single-left", "single-right"):
        assert open_run(tmp_path / run).status == "finished"
    # the same demo again reuses its finished runs; other options are refused, nothing is overwritten
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "128", "--test-size", "64"]) == 0
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds an earlier finished run with other options"):
        main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "96", "--test-size", "64"])


def test_callbacks_see_every_epoch_and_bf16_autocast_trains(data):
    train, test = data
    seen = []
    result = fit(train, test, TrainConfig(method="sgs", knobs={"warmup": 0}, epochs=2, batch_size=64, bf16=True),
                 callbacks=[seen.append], progress=False)  # fmt: skip
    assert [s["epoch"] for s in seen] == [0, 1] and "test/left/accuracy" in seen[0]
    samples = result.sink.samples()
    assert np.isfinite(samples["sgs"]).all() and np.isfinite(samples["weight"]).all()


def test_cli_rejects_a_noise_rate_outside_the_unit_interval(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--noise", "1.5", "--out", str(tmp_path / "run")])
    assert "noise rate must lie in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def test_recorded_columns_match_the_statistics_and_masked_rows_read_nan():
    train, test = make_multidigits(128, 64, seed=0)
    train = train.with_missing({"right": 0.25}, seed=0)
    result = fit(train, test, TrainConfig(method="sgs", knobs={"warmup": 0}, epochs=1, batch_size=128), progress=False)
    s = result.sink.samples()
    left, right = s["task"] == "left", s["task"] == "right"
    missing = right & ~s["present"]
    assert missing.sum() == 32 and np.isnan(s["weight"][missing]).all() and np.isnan(s["loss"][missing]).all()
    assert np.isfinite(s["weight"][left]).all() and np.isfinite(s["p_label"][left]).all()
    # for two tasks the conflict column is the per-sample cosine to the other task (NaN where it has no label)
    both = s["present"][left] & s["present"][right]
    assert np.allclose(s["conflict"][left][both], s["conflict"][right][both])
    assert np.isnan(s["conflict"][left][~both]).all()
    # p_label is a probability of the given label, the margin positive exactly when it is the arg-max
    assert ((s["p_label"][left] > 0) & (s["p_label"][left] < 1)).all()
    assert np.array_equal(s["margin"][left] > 0, s["pred"][left] == s["label"][left])


def test_cli_resume_finishes_an_interrupted_run_like_a_straight_one(tmp_path, monkeypatch):
    import sgs_lab.train

    monkeypatch.setenv("SGS_LAB_FAST", "1")
    options = ["--method", "sgs", "--noise", "0.3", "--seed", "2", "--epochs", "2", "--train-size", "256",
               "--test-size", "64", "--clamp", "0", "3", "--warmup", "0", "--device", "cpu"]  # fmt: skip
    assert main(["train", *options, "--out", str(tmp_path / "straight")]) == 0
    real_fit = sgs_lab.train.fit

    def dies_midway(*args, **kwargs):
        real_fit(*args, **{**kwargs, "checkpoint_every": 1, "stop_after_steps": 3})
        raise KeyboardInterrupt

    monkeypatch.setattr(sgs_lab.train, "fit", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *options, "--out", str(tmp_path / "resumed")])
    assert open_run(tmp_path / "resumed").status == "interrupted"
    monkeypatch.setattr(sgs_lab.train, "fit", real_fit)
    assert main(["train", "--resume", str(tmp_path / "resumed")]) == 0
    straight, resumed = open_run(tmp_path / "straight").meta, open_run(tmp_path / "resumed").meta
    assert resumed["status"] == "finished" and resumed["test_metrics"] == straight["test_metrics"]
    with pytest.raises(SystemExit, match="has finished"):
        main(["train", "--resume", str(tmp_path / "resumed")])
    with pytest.raises(SystemExit, match="holds no run"):
        main(["train", "--resume", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="run's own options"):
        main(["train", "--resume", str(tmp_path / "resumed"), "--out", str(tmp_path / "x")])


def test_cli_resume_refuses_a_run_without_command_line_options(tmp_path):
    from sgs_lab.cache import train_run

    train, test = make_multidigits(64, 32, seed=0)
    train_run(train, test, TrainConfig(epochs=2, batch_size=32), tmp_path / "run", progress=False,
              stop_after_steps=2)  # fmt: skip
    with pytest.raises(SystemExit, match="not made by sgs-lab train"):
        main(["train", "--resume", str(tmp_path / "run")])
