"""The committed notebooks are commit-ready: the set is complete, each is valid, under 1 MB, free of widget state
and of outputs other than its summary, opens by saying what it teaches and ends with the tagged summary cell that
``pytest --nbval-lax`` compares. The checker itself is tested on synthetic notebooks.

Executing them is the job of ``SGS_LAB_FAST=1 pytest --nbval-lax --nbval-current-env notebooks/``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = [
    "00_quickstart", "01_gradient_conflict_101", "02_task_conflicts", "03_sample_weights", "04_noisy_label_detection",
    "05_training_dynamics", "06_method_comparison", "07_bring_your_own_model",
]  # fmt: skip
TAG = "NBVAL_CHECK_OUTPUT"
WIDGET_MIME = ("application/vnd.jupyter.widget-state+json", "application/vnd.jupyter.widget-view+json")


def _tool():
    spec = importlib.util.spec_from_file_location("strip_notebooks", REPO / "tools" / "strip_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


strip_notebooks = _tool()


def test_the_notebook_set_is_complete():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_commit_ready(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    raw = path.read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size <= 1_000_000
    for mime in WIDGET_MIME:
        assert mime not in raw, f"{name} holds widget state or views ({mime}): run tools/strip_notebooks.py"
    assert "widgets" not in nb.metadata
    assert strip_notebooks.problems(nb, path.stat().st_size) == []
    assert nb.metadata.kernelspec.name == "python3"

    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert "What this notebook teaches" in first.source
    assert last.cell_type == "code" and TAG in last.metadata.get("tags", [])
    assert [o.output_type for o in last.outputs] == ["stream"] and last.outputs[0].name == "stdout"
    assert last.outputs[0].text.strip(), "the summary cell's stored output is what nbval compares"
    for cell in nb.cells[:-1]:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert len(cell.source.splitlines()) <= 30, "notebook cells stay thin: logic belongs in sgs_lab"


@pytest.mark.parametrize("name", EXPECTED)
def test_summary_prints_no_raw_floats(name):
    """Summary cells print counts, booleans and coarse values only: nothing that moves with CPU kernels."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    text = nb.cells[-1].outputs[0].text
    for token in text.replace(",", " ").replace("]", " ").replace("(", " ").replace(")", " ").split():
        if token.count(".") == 1 and token.replace(".", "").replace("-", "").isdigit():
            assert len(token.split(".")[1]) <= 1, f"{name}: the summary prints {token}"


# ---------------------------------------------------------------------------------------------------------------------
# the checker and the stripper on synthetic notebooks
def _summary_cell(text: str = "rows: 3\n"):
    cell = new_code_cell('print("rows:", 3)', execution_count=7)
    cell.metadata["tags"] = [TAG]
    cell.outputs = [new_output("stream", name="stdout", text=text)]
    return cell


def _widget_output():
    return new_output(
        "display_data",
        data={"text/plain": "VBox(...)", WIDGET_MIME[1]: {"model_id": "abc", "version_major": 2, "version_minor": 0}},
    )


def _clean_notebook():
    nb = new_notebook(cells=[
        new_markdown_cell("# Synthetic\n\n**What this notebook teaches.** Nothing."),
        new_code_cell("x = 1"),
        _summary_cell(),
    ])  # fmt: skip
    nb.cells[-1].execution_count = 1
    return nb


def test_checker_passes_a_clean_notebook():
    assert strip_notebooks.problems(_clean_notebook(), size=1000) == []


def test_checker_catches_widget_state_in_the_metadata():
    nb = _clean_notebook()
    nb.metadata["widgets"] = {WIDGET_MIME[0]: {"state": {"abc": {"model_name": "IntSliderModel"}}, "version_major": 2}}
    assert any("widget state" in p for p in strip_notebooks.problems(nb))


def test_checker_catches_widget_views_and_stray_outputs():
    nb = _clean_notebook()
    nb.cells[1].outputs = [_widget_output()]
    nb.cells[1].execution_count = 3
    found = strip_notebooks.problems(nb)
    assert any("widget output" in p for p in found)
    assert any("has outputs" in p for p in found) and any("execution count" in p for p in found)
    tagged = _clean_notebook()
    tagged.cells[-1].outputs.append(_widget_output())  # even the summary cell may not keep a widget view
    assert any("widget output" in p for p in strip_notebooks.problems(tagged))


def test_checker_catches_size_and_structure():
    nb = _clean_notebook()
    assert any("over the" in p for p in strip_notebooks.problems(nb, size=1_000_001))
    no_intro = _clean_notebook()
    no_intro.cells = no_intro.cells[1:]
    assert any("first cell" in p for p in strip_notebooks.problems(no_intro))
    untagged = _clean_notebook()
    untagged.cells[-1].metadata["tags"] = []
    assert any("last cell" in p for p in strip_notebooks.problems(untagged))
    unrun = _clean_notebook()
    unrun.cells[-1].execution_count = None
    assert any("no execution count" in p for p in strip_notebooks.problems(unrun))
    empty = _clean_notebook()
    empty.cells[-1].outputs = []
    assert any("no stored output" in p for p in strip_notebooks.problems(empty))


def test_strip_keeps_only_the_summary_output():
    nb = _clean_notebook()
    nb.metadata["widgets"] = {WIDGET_MIME[0]: {"state": {}}}
    nb.cells[1].outputs = [_widget_output(), new_output("stream", name="stdout", text="noise\n")]
    nb.cells[1].execution_count = 2
    nb.cells[1].metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    nb.cells[-1].outputs.insert(0, _widget_output())
    stripped = strip_notebooks.strip(nb)
    assert strip_notebooks.problems(stripped) == []
    assert "widgets" not in stripped.metadata and not any(m in json.dumps(stripped) for m in WIDGET_MIME)
    assert stripped.cells[1].outputs == [] and stripped.cells[1].execution_count is None
    assert "execution" not in stripped.cells[1].metadata
    assert [o.text for o in stripped.cells[-1].outputs] == ["rows: 3\n"]
    assert stripped.cells[-1].execution_count == 1 and stripped.cells[-1].metadata["tags"] == [TAG]
    assert "widgets" in nb.metadata  # the input is left alone
    nbformat.validate(stripped)


def test_strip_tool_command_line(tmp_path, capsys):
    dirty = _clean_notebook()
    dirty.metadata["widgets"] = {WIDGET_MIME[0]: {"state": {}}}
    path = tmp_path / "dirty.ipynb"
    nbformat.write(dirty, path)
    assert strip_notebooks.main(["--check", str(path)]) == 1
    assert "dirty.ipynb" in capsys.readouterr().out
    assert strip_notebooks.main([str(path)]) == 0
    assert strip_notebooks.main(["--check", str(path)]) == 0
    assert "widgets" not in nbformat.read(path, as_version=4).metadata
