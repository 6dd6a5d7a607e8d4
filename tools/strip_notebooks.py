#!/usr/bin/env python3
"""Make notebooks commit-ready: drop widget state and every output except those of the summary cells.

    python tools/strip_notebooks.py notebooks/*.ipynb            # strip in place
    python tools/strip_notebooks.py --check notebooks/*.ipynb    # exit 1 naming each notebook that is not stripped
    python tools/strip_notebooks.py --execute notebooks/*.ipynb  # run each (SGS_LAB_FAST=1, fresh run cache), strip

Kept: the outputs of code cells tagged ``NBVAL_CHECK_OUTPUT`` (what ``pytest --nbval-lax`` compares), minus any
widget view, with execution count 1 (nbval refuses a reference cell with outputs but no count; a constant keeps
diffs quiet). Removed: ``metadata.widgets`` (the saved widget state), every other output and execution count, and
per-cell execution timings. ``--execute`` refreshes the kept outputs: each notebook runs in its own directory under
``SGS_LAB_FAST=1`` with ``SGS_LAB_RUNS`` pointing at a fresh temporary directory shared by the notebooks of one
call, exactly as the notebook test runs them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat

CHECK_TAG = "NBVAL_CHECK_OUTPUT"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MAX_BYTES = 1_000_000
SUMMARY_COUNT = 1
CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "jupyter")


def is_summary(cell) -> bool:
    return cell.get("cell_type") == "code" and CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def problems(nb, size: int | None = None) -> list[str]:
    """What keeps ``nb`` (a notebook node or dict) from being commit-ready; empty when it is.

    Checks: widget state in the metadata or anywhere in an output, outputs or execution counts outside the tagged
    summary cells, a first cell that is not markdown, a last cell that is not a tagged code cell, a tagged cell
    without output, and (given ``size`` in bytes) a file over 1 MB.
    """
    found = []
    if size is not None and size > MAX_BYTES:
        found.append(f"{size} bytes, over the {MAX_BYTES} byte limit")
    if "widgets" in nb.get("metadata", {}):
        found.append("metadata.widgets holds widget state")
    cells = nb.get("cells", [])
    for index, cell in enumerate(cells):
        outputs = cell.get("outputs", [])
        text = json.dumps(outputs)
        if WIDGET_STATE in text or WIDGET_VIEW in text:
            found.append(f"cell {index} has a widget output")
        if cell.get("cell_type") == "code" and not is_summary(cell):
            if outputs:
                found.append(f"cell {index} has outputs (only {CHECK_TAG} cells keep theirs)")
            if cell.get("execution_count") is not None:
                found.append(f"cell {index} has an execution count")
        if WIDGET_STATE in json.dumps(cell.get("metadata", {})):
            found.append(f"cell {index} metadata holds widget state")
    if not cells or cells[0].get("cell_type") != "markdown":
        found.append("the first cell must be markdown saying what the notebook teaches")
    if not cells or not is_summary(cells[-1]):
        found.append(f"the last cell must be a code cell tagged {CHECK_TAG}")
    elif not cells[-1].get("outputs"):
        found.append(f"the {CHECK_TAG} cell has no stored output to compare against")
    elif cells[-1].get("execution_count") is None:
        found.append(f"the {CHECK_TAG} cell has outputs but no execution count (nbval would call it unrun)")
    return found


def strip(nb):
    """A stripped copy of ``nb``: see the module docstring."""
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        metadata = cell.get("metadata", {})
        for key in CELL_METADATA_DROPPED:
            metadata.pop(key, None)
        if cell.get("cell_type") != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        if not is_summary(cell):
            cell["execution_count"] = None
            cell["outputs"] = []
            continue
        cell["execution_count"] = SUMMARY_COUNT
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data or WIDGET_STATE in data:
                continue
            if "execution_count" in output:
                output["execution_count"] = SUMMARY_COUNT
            output.get("metadata", {}).pop(WIDGET_STATE, None)
            kept.append(output)
        cell["outputs"] = kept
    return nb


def execute(nb, path: Path, timeout: int = 600):
    """Run ``nb`` in ``path``'s directory with the current environment (set SGS_LAB_FAST / SGS_LAB_RUNS first)."""
    from nbclient import NotebookClient

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not stripped")
    group.add_argument("--execute", action="store_true", help="run each notebook (fast, fresh cache) before stripping")
    args = parser.parse_args(argv)
    failed = False
    if args.execute:
        os.environ["SGS_LAB_FAST"] = "1"
        os.environ["SGS_LAB_RUNS"] = tempfile.mkdtemp(prefix="sgs_lab_runs_")
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        if args.check:
            found = problems(nb, path.stat().st_size)
            if found:
                failed = True
                print(f"{path}: " + "; ".join(found))
            continue
        if args.execute:
            print(f"executing {path} …", flush=True)
            nb = execute(nb, path)
        stripped = strip(nb)
        nbformat.validate(stripped)
        nbformat.write(stripped, path)
        left = problems(stripped, path.stat().st_size)
        print(f"{path}: stripped" + (f" — still: {'; '.join(left)}" if left else ""))
        failed |= bool(left)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
