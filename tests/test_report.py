"""The HTML report: figures built from cached runs, one self-contained page, the `sgs-lab report` command."""

from __future__ import annotations

import numpy as np
import pytest

from sgs_lab import cache
from sgs_lab.cli import main
from sgs_lab.data import make_multidigits
from sgs_lab.report import report_runs, run_figures, run_summary
from sgs_lab.train import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train, test = make_multidigits(96, 48, seed=1)
    train = train.with_noise(0.4, seed=1)
    made = {}
    for method, knobs in (("ew", {}), ("sgs", {"warmup": 0})):
        config = TrainConfig(method=method, knobs=knobs, epochs=2, batch_size=32, seed=1)
        made[method] = cache.get_or_train(config, root, train, test, progress=False)
    return root, made


def test_figures_show_every_run_and_the_last_epoch_of_each(runs):
    _, made = runs
    figures = run_figures(made)
    titles = [f.layout.title.text for f in figures]
    assert titles[0] == "Training dynamics"
    names = {trace.name for trace in figures[0].data}
    assert any("ew" in n for n in names) and any("sgs" in n for n in names)
    # EW weights are all 1: no weight histogram for it; SGS reweights: one for it
    assert not any(t.startswith("ew: sample weights") for t in titles)
    assert any(t.startswith("sgs: sample weights") for t in titles)
    sgs_hist = figures[titles.index("sgs: sample gradient similarity, last epoch")]
    last = made["sgs"].samples(epochs=1)
    heights = sum(np.asarray(trace.y).sum() for trace in sgs_hist.data)  # probabilities: 1 per (task, label group)
    groups = last.groupby(["task", "noisy"], observed=True).ngroups
    assert heights == pytest.approx(groups)
    rows = run_summary(made)
    assert [r["run"] for r in rows] == ["ew", "sgs"] and rows[1]["noise"] == pytest.approx(0.4, abs=0.02)
    assert rows[0]["left accuracy"] == made["ew"].meta["test_accuracy"]["left"]


def test_the_page_is_self_contained(runs, tmp_path):
    _, made = runs
    page = report_runs(made, tmp_path / "r.html", "title <&>").read_text()
    assert "<h1>title &lt;&amp;&gt;</h1>" in page and '<script src="http' not in page
    assert page.count("Plotly.newPlot") == len(run_figures(made))


def test_report_command_on_a_root_and_on_one_run(runs, tmp_path, capsys):
    root, made = runs
    assert main(["report", str(root), "--out", str(tmp_path / "all.html")]) == 0
    assert "(2 run(s))" in capsys.readouterr().out
    page = (tmp_path / "all.html").read_text()
    assert made["ew"].path.name in page and made["sgs"].path.name in page
    assert main(["report", str(made["sgs"].path)]) == 0
    assert (made["sgs"].path / "report.html").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no runs under"):
        main(["report", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["report", str(tmp_path / "missing")])
