"""The sched family's events on this kernel: process lifecycle, off-CPU time and page faults
of an owner process whose waits are real NFS round trips.

The sched family traces the off-CPU time of "owner" threads only (NVML's GPU processes and
their descendants, or ``--pid``). Here the owner is schedload.py, started first and paused,
then one tracer, ``stallscope trace --families sched --pid OWNER --output REC``, compiled
once for the module. Released under netem delay on lo (NETEM_DELAY_MS per crossing: a READ
round trip waits >= 2 x that), the owner forks two children (one exits with
CHILD_EXIT_CODE, one is killed by SIGKILL), then its thread ``ss-reader`` makes READS
O_DIRECT preads and its thread ``ss-mapper`` touches FAULTS pages of a mapped file, each
wait its own off-CPU group, all on the v3 mount. The tracer is stopped (its last groups
flushed) before the checks, which read its recording:

* each child is in the ``proc`` table with the owner as parent and the exit status the
  owner's wait(2) saw;
* each pread is one ``blocked`` row of the reader thread, inside the call, naming an NFS
  wait, with the time the call waited;
* where the kernel lets the family tell a fault from a syscall (5.15+, x86-64), the FAULTS
  faults are ``page_fault`` rows of the io table naming the mapped file, and no blocked row;
  before 5.15 the tracer says why not, and the faults' waits are blocked rows instead.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guestutil import kernel_at_least, run
from probe_env import GUEST_DIR, MIN_LATENCY_MS, NETEM_DELAY_MS, TracerProcess, recording_rows
from schedload import CHILD_EXIT_CODE, SPACING
from test_probes_vfs import _family_line

SCHED_ROW = "sched: process lifecycle, off-CPU time of owner threads"
FAULT_ROW = "sched: page faults of owner threads (mapped files)"
READS = 5
FAULTS = 3
RTT_NS = 2 * NETEM_DELAY_MS * 1_000_000


@dataclass
class SchedRun:
    owner: dict             # schedload.py's report
    directory: str
    tracer: TracerProcess
    tables: dict            # table name -> rows of the recording


def _line(f, timeout_s: float, what: str) -> str:
    if not select.select([f], [], [], timeout_s)[0]:
        pytest.fail(f"{what}: nothing in {timeout_s:.0f} s", pytrace=False)
    return f.readline()


def run_sched_load(directory: Path, server_dir: Path, rec: Path, delay: bool = True) -> SchedRun:
    """schedload.py on ``directory`` (the client's view of ``server_dir``), traced by its own
    sched tracer into ``rec``, with netem delay on lo while it works (``delay``)."""
    server_dir.mkdir(exist_ok=True)
    for name, pages in (("rdata", READS), ("mdata", FAULTS)):
        (server_dir / name).write_bytes(b"\xa5" * (pages * SPACING))
    owner = subprocess.Popen([sys.executable, str(GUEST_DIR / "schedload.py"), str(directory), str(READS),
                              str(FAULTS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        ready = _line(owner.stdout, 60, "schedload.py did not get ready")
        assert json.loads(ready)["ready"] == owner.pid, ready
        tracer = TracerProcess("sched", ["--families", "sched", "--pid", str(owner.pid), "--no-gpu",
                                         "--min-latency-ms", str(MIN_LATENCY_MS), "--output", str(rec)])
        tracer.wait_ready()
        if delay:
            run("stallscope-netem", "lo", "delay", f"{NETEM_DELAY_MS}ms")
        try:
            owner.stdin.write("go\n")
            owner.stdin.flush()
            report = json.loads(_line(owner.stdout, 180, "schedload.py did not finish"))
        finally:
            if delay:
                run("stallscope-netem", "lo", "off")
        time.sleep(1.0)         # the last groups go quiet; the next drain ships them
    finally:
        if tracer is not None:
            tracer.stop()
        if owner.poll() is None:
            owner.stdin.write("exit\n")
            owner.stdin.flush()
        try:
            owner.wait(30)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait()
    assert tracer.proc.returncode == 0, tracer.stderr[-3000:]
    return SchedRun(report, str(directory), tracer, {k: recording_rows(rec, k) for k in ("proc", "sched", "io")})


@pytest.fixture(scope="module")
def sched_run(nfs_mounts, tmp_path_factory) -> SchedRun:
    return run_sched_load(nfs_mounts["3"] / "sched", Path("/srv/nfs/sched"),
                          tmp_path_factory.mktemp("sched") / "sched.ssrec")


def _sched_line(r: SchedRun) -> str:
    line = _family_line(r.tracer.stderr, "sched")
    assert line.startswith("stallscope: sched: raw tracepoints sched_process_fork"), r.tracer.stderr
    return line


def _blocked(r: SchedRun, thread: dict) -> list:
    return sorted((x for x in r.tables["sched"] if x["pid"] == r.owner["pid"] and x["tid"] == thread["tid"]
                   and x["op"] == "blocked"), key=lambda x: x["ts_ns"])


def _check_waits(rows: list, thread: dict, what: str) -> None:
    """One row per call, inside it, with (about) the time it waited: >= one round trip."""
    calls = thread["calls"]
    assert len(rows) == len(calls), f"{what}: {len(rows)} rows for {len(calls)} calls:\n" + \
        "\n".join(map(str, rows)) + f"\ncalls: {calls}"
    for row, call in zip(rows, calls):
        assert row["count"] == 1 and row["comm"] == thread["comm"], (what, row)
        assert call["start_ns"] - 5_000_000 <= row["ts_ns"], (what, row, call)
        assert row["ts_ns"] + row["dur_ns"] <= call["end_ns"] + 5_000_000, (what, row, call)
        assert 0.9 * RTT_NS <= row["blocked_ns"] <= row["dur_ns"] + 1, (what, row, call)


@pytest.mark.matrix(SCHED_ROW, "raw tracepoint")
def test_sched_children_have_lineage_and_exit_status(sched_run):
    """Both children: a proc row with the owner as parent, and their exit: code 23, SIGKILL."""
    r = sched_run
    _sched_line(r)
    kids = r.owner["children"]
    assert [k["status"] for k in kids] == [CHILD_EXIT_CODE << 8, 9], kids     # as wait(2) saw them
    for k in kids:
        rows = [x for x in r.tables["proc"] if x["pid"] == k["pid"]]
        assert rows, (k, r.tables["proc"])
        assert {x["ppid"] for x in rows} == {r.owner["pid"]}, rows
        exits = [x for x in rows if x["exit_ns"]]
        assert len(exits) == 1, rows
        ex = exits[0]
        assert ex["exit_status"] == k["status"], (ex, k)
        assert k["fork_ns"] - 5_000_000 <= ex["start_ns"] <= ex["exit_ns"] <= k["reaped_ns"] + 5_000_000, (ex, k)
        assert ex["exit_ns"] - ex["start_ns"] >= 150_000_000, ex      # the child slept 0.2 s first


@pytest.mark.matrix(SCHED_ROW, "raw tracepoint")
def test_sched_owner_thread_blocked_in_nfs_reads(sched_run):
    """Each O_DIRECT pread of the reader thread: one blocked row naming the NFS wait."""
    r = sched_run
    _sched_line(r)
    rows = _blocked(r, r.owner["reader"])
    _check_waits(rows, r.owner["reader"], "pread")
    for row in rows:
        assert "nfs" in row["reason"], row
    # syscall waits are not taken for page faults (the family's io rows)
    assert not [x for x in r.tables["io"] if x["tid"] == r.owner["reader"]["tid"]], r.tables["io"]


@pytest.mark.matrix(FAULT_ROW, "raw tracepoint")
def test_sched_page_faults_on_mapped_nfs_file(sched_run, matrix_unavailable):
    r = sched_run
    line = _sched_line(r)
    mapper = r.owner["mapper"]
    faults = sorted((x for x in r.tables["io"] if x["pid"] == r.owner["pid"] and x["op"] == "page_fault"),
                    key=lambda x: x["ts_ns"])
    if not kernel_at_least(5, 15):
        # no bpf_task_pt_regs: a wait cannot be told to be a fault's; each is a blocked row
        assert "(no page faults (kernel < 5.15))" in line, line
        assert not faults, faults
        _check_waits(_blocked(r, mapper), mapper, "page fault (as blocked)")
        return matrix_unavailable("kernel < 5.15 (no bpf_task_pt_regs: a fault's wait is a blocked row)")
    assert line.endswith(" page_fault_user"), line
    path = f"{r.directory}/mdata"
    assert sum(x["count"] for x in faults) == FAULTS, faults
    for x in faults:
        assert (x["path"], x["fs"], x["bytes"], x["tid"], x["comm"]) == (path, "nfs", 0, mapper["tid"],
                                                                         mapper["comm"]), x
    _check_waits(faults, mapper, "page fault")
    assert not _blocked(r, mapper), _blocked(r, mapper)      # a fault is an io row, not also a blocked one
