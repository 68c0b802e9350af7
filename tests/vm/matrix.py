"""Render README's kernel table from the vm tier's per-kernel results.

Each kernel's guest run writes ``result.json`` (``tests/vm/guest/conftest.py``): one cell
per guest test marked ``@pytest.mark.matrix(ROW, METHOD)``, with its outcome on that
kernel (proven, failed, skipped, or unavailable with the reason the test asserted), plus
the kernel release, BCC and python versions. The vm tier copies them to
``build/vm-results/<kernel>.json``. This script turns them into the table between
``<!-- kernel-matrix:begin ... -->`` and ``<!-- kernel-matrix:end -->`` in README.md
(probe x kernel, each cell the attach methods that worked there, or why not) and
touches nothing else in README.

    python3 tests/vm/matrix.py                  # print the table from build/vm-results
    python3 tests/vm/matrix.py --write          # record the results in tests/vm/results/, rewrite README
    python3 tests/vm/matrix.py --check          # README's table == the rendering of tests/vm/results/

The host column (this development machine's 6.18 kernel) is not measured by the vm tier:
it is kept by hand in ``HOST`` below, from the bpf tier's tests, and labelled so.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("5.10", "6.1", "6.12")        # the order of the columns (vmrun.KERNELS)
SUITES = {"5.10": "Debian 11", "6.1": "Debian 12", "6.12": "Debian 13"}
FRESH = REPO / "build" / "vm-results"
RECORDED = Path(__file__).resolve().parent / "results"
README = REPO / "README.md"
BEGIN = re.compile(r"^<!-- kernel-matrix:begin.*-->$", re.M)
END = "<!-- kernel-matrix:end -->"
#: the methods in a cell, in this order
METHOD_ORDER = ("fentry", "kprobe", "uprobe", "raw tracepoint", "tracepoint", "sysfs", "forced")
#: worst outcome wins when a row and method has several cases (NFS v3 and v4.2, ...)
SEVERITY = {"failed": 3, "skipped": 2, "unavailable": 1, "proven": 0}
#: the host column, kept by hand from the bpf tier (tests/bpf) on this machine's 6.18 kernel
HOST_KERNEL = "host 6.18 (bpf tier; hand-kept)"
#: rows in this order (others after them, as the results list them); the host column per row
HOST = {
    "VFS read, write, readv, writev, fsync, fdatasync": "**tracepoint** (fentry: EPERM; no kprobes)",
    "VFS sendfile, splice, copy_file_range, io_uring waits": "**tracepoint** (FUSE)",
    "NFS file ops (v3, v4.2)": "no NFS here",
    "NFS RPCs: latency, xid, server, owner": "no NFS here",
    "NFS RPC retransmits": "no NFS here",
    "NFS blame (simulated GPU, report)": "no NFS here",
    "RDMA verbs completion waits (soft-RoCE)": "no RDMA here",
    "RDMA port counters (soft-RoCE)": "no RDMA here",
    "TCP retransmits (netem loss)": "**tracepoint** (netns loss)",
    "block IO: request latency by device, pid, sector": "**raw tracepoint**, **tracepoint** (loop device on FUSE)",
    "sched: process lifecycle, off-CPU time of owner threads": "**raw tracepoint** (FUSE)",
    "sched: page faults of owner threads (mapped files)": "**raw tracepoint** (FUSE)",
    "fallback: fentry -> kprobe -> tracepoint (VFS), kprobe -> tracepoint (NFS), raw -> tracepoint (block)":
        "VFS: fentry EPERM -> tracepoint (no kprobes), as the bpf tier runs; block: tracepoint by --attach",
}
ROW_ORDER = tuple(HOST)


def load_results(directory: Path) -> dict:
    """{kernel: result.json} for the kernels with a result in ``directory``."""
    out = {}
    for k in KERNELS:
        path = directory / f"{k}.json"
        if path.exists():
            out[k] = json.loads(path.read_text())
    return out


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def cell(cases: list) -> str:
    """One table cell from the cases of one row on one kernel."""
    if not cases:
        return "not run"
    by_method: dict = {}
    for c in cases:
        by_method.setdefault(c["method"], []).append(c)
    parts = []
    for method in sorted(by_method, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
        worst = max(by_method[method], key=lambda c: SEVERITY.get(c["status"], 3))
        note = _esc(worst.get("note", ""))
        status = worst["status"]
        if status == "proven":
            parts.append(f"**{method}**" + (f" ({note})" if note else ""))
        elif status == "unavailable":
            parts.append(f"no {method}: {note}")
        else:
            parts.append(f"{method} {status.upper()}" + (f": {note[:120]}" if note else ""))
    return "; ".join(parts)


def render(results: dict) -> str:
    """The table (and its footnote) for README, from {kernel: result}."""
    kernels = [k for k in KERNELS if k in results]
    rows: list = [r for r in ROW_ORDER if any(c["row"] == r for k in kernels for c in results[k].get("cells", []))]
    for k in kernels:
        for c in results[k].get("cells", []):
            if c["row"] not in rows:
                rows.append(c["row"])
    head = ["probe", *(f"{SUITES[k]} {results[k].get('kernel_release', k)}" for k in kernels), HOST_KERNEL]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [cell([c for c in results[k].get("cells", []) if c["row"] == row]) for k in kernels]
        lines.append("| " + " | ".join([_esc(row), *cells, HOST.get(row, "-")]) + " |")
    lines.append("")
    lines.append("Generated by `tests/vm/matrix.py` from the vm tier's per-kernel results "
                 "(`tests/vm/results/`): **method** = proven there by the guest tests that carry "
                 "`@pytest.mark.matrix` (`tests/vm/guest/`), with exact counts against the workload; "
                 "`no method: why` = the kernel cannot, and the test asserts that reason; FAILED = the "
                 "test failed there. Guests: " + "; ".join(
                     f"{SUITES[k]} {results[k].get('kernel_release', '?')} (python {results[k].get('python', '?')}, "
                     f"BCC {results[k].get('bcc', '?')})" for k in kernels) + ".")
    return "\n".join(lines)


def splice_readme(text: str, table: str) -> str:
    """README text with the region between the markers replaced by ``table``."""
    m = BEGIN.search(text)
    end = text.find(END)
    if not m or end < m.end():
        raise SystemExit("README.md has no <!-- kernel-matrix:begin ... --> ... <!-- kernel-matrix:end --> region")
    return text[:m.end()] + "\n" + table + "\n" + text[end:]


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render README's kernel table from the vm tier's results.",
                                 epilog="examples:\n  matrix.py\n  matrix.py --write\n  matrix.py --check",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=FRESH, help=f"fresh per-kernel results (default {FRESH})")
    ap.add_argument("--readme", type=Path, default=README)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true",
                      help=f"copy the fresh results to {RECORDED} and rewrite README's table from them")
    mode.add_argument("--check", action="store_true", help=f"exit 1 unless README's table renders {RECORDED}")
    args = ap.parse_args(argv)
    if args.check:
        want = splice_readme(args.readme.read_text(), render(load_results(RECORDED)))
        if want != args.readme.read_text():
            print(f"{args.readme}: the kernel table is not the rendering of {RECORDED} "
                  "(run tests/vm/matrix.py --write after the vm tier)", file=sys.stderr)
            return 1
        return 0
    results = load_results(args.results)
    if not results:
        print(f"no results in {args.results} (run the vm tier: pytest -m vm tests/vm)", file=sys.stderr)
        return 1
    if args.write:
        RECORDED.mkdir(exist_ok=True)
        for k in results:
            shutil.copy(args.results / f"{k}.json", RECORDED / f"{k}.json")
        args.readme.write_text(splice_readme(args.readme.read_text(), render(load_results(RECORDED))))
        print(f"{args.readme}: kernel table rewritten from {', '.join(results)}", file=sys.stderr)
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
