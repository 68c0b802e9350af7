"""Host checks of the vm tier's plumbing that need no VM: README's kernel table is the
rendering of the recorded per-kernel results, the renderer's cells, and devtree's
pyproject reader for the guests' python 3.9 (no tomllib)."""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import devtree  # noqa: E402
import matrix  # noqa: E402


def test_readme_kernel_table_is_rendered_from_the_recorded_results():
    recorded = matrix.load_results(matrix.RECORDED)
    assert set(recorded) == set(matrix.KERNELS), f"results recorded for {sorted(recorded)} only"
    assert matrix.main(["--check"]) == 0, "README's kernel table was edited by hand or the results changed: " \
        "run tests/vm/matrix.py --write"


def _result(release, cells):
    return {"kernel_release": release, "python": "3.9.2", "bcc": "0.18.0", "cells": cells}


def test_cells_show_the_method_that_worked_or_why_not():
    row = "VFS read"
    results = {
        "5.10": _result("5.10.0-46-amd64", [
            {"row": row, "method": "kprobe", "status": "proven", "note": ""},
            {"row": row, "method": "fentry", "status": "proven", "note": "not attached: vfs_readv: inlined"},
            {"row": row, "method": "tracepoint", "status": "failed", "note": "AssertionError: 6 events for 7 calls"},
        ]),
        "6.1": _result("6.1.0-56-amd64", [
            {"row": row, "method": "kprobe", "status": "proven", "note": ""},
            {"row": row, "method": "kprobe", "status": "unavailable", "note": "no module BTF"},   # v4.2 case
        ]),
    }
    table = matrix.render(results)
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == ("**fentry** (not attached: vfs_readv: inlined); **kprobe**; "
                        "tracepoint FAILED: AssertionError: 6 events for 7 calls")
    assert cells[2] == "no kprobe: no module BTF"       # the worse of the two cases
    assert "Debian 11 5.10.0-46-amd64" in table.splitlines()[0] and "6.12" not in table.splitlines()[0]


def test_splice_rewrites_only_the_marked_region():
    text = "intro\n<!-- kernel-matrix:begin (generated) -->\nold | table\n<!-- kernel-matrix:end -->\ntail\n"
    out = matrix.splice_readme(text, "| new |")
    assert out == "intro\n<!-- kernel-matrix:begin (generated) -->\n| new |\n<!-- kernel-matrix:end -->\ntail\n"


def test_devtree_reads_package_dir_without_tomllib():
    text = (HERE.parents[1] / "pyproject.toml").read_text()
    assert devtree.package_dir_table(text) == tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
