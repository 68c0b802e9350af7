"""The sched family on this kernel: lineage of short-lived workers, off-CPU time of GPU
owner threads (FUSE waits, CPU starvation) and page faults on a FUSE-mapped file, with
the real tracer, the NVML simulator through real pynvml and a FUSE filesystem that stalls
on purpose.

Workloads run as separate processes (functions of this module, started with ``python -c``)
so that they, not pytest, are the GPU's processes."""

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time

import pytest

from stallscope.sim import nvmlsim
from stallscope.sim.slowfs import SlowFS
from stallscope.wire.recording import read_recording
from tests.bpf.tracerun import ROOT, Trace, run_cli

pytestmark = pytest.mark.bpf
WORKERS = 7
READ_MS = 300


def _name(comm: str):
    ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)        # PR_SET_NAME


def _wait_go():
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()


# ---------------------------------------------------------------- workloads (child processes)

def parent_main(state, path, log):
    """A training process on GPU 0 that forks one short-lived worker per step: the worker
    reads a stalled shard and exits 20 ms later, while the GPU idles waiting for it."""
    gpu = nvmlsim.SimGpu(0, state)
    gpu.register()
    _wait_go()
    out = []
    for _ in range(WORKERS):
        with gpu.busy():
            time.sleep(0.5)
        pid = os.fork()
        if pid == 0:
            _name("pt_data_worker")
            t0 = time.time_ns()
            with open(path, "rb", buffering=0) as f:
                f.read(4096)
            t1 = time.time_ns()
            with open(f"{log}.{os.getpid()}", "w") as f:
                json.dump({"pid": os.getpid(), "start_ns": t0, "end_ns": t1}, f)
            time.sleep(0.02)
            os._exit(0)
        os.waitpid(pid, 0)
        out.append(pid)
    with gpu.busy():
        time.sleep(0.5)
    with open(log, "w") as f:
        json.dump({"parent": os.getpid(), "workers": out}, f)


def owner_read_main(state, path):
    """A GPU process whose reader thread waits 0.5 s in a FUSE read, then exits."""
    import threading
    nvmlsim.SimGpu(0, state).register()
    time.sleep(0.6)                     # the tracer polls NVML every 200 ms: it knows us now
    _wait_go()

    def reader():
        _name("ss_reader")
        with open(path, "rb", buffering=0) as f:
            f.read(4096)
    t = threading.Thread(target=reader)
    t.start()
    t.join()


def twice_then_quiet_main(state, path, log):
    """A GPU process whose thread waits in FUSE twice (the first wait teaches the tracer
    that this kernel stack is a stall, so the second is merged in the kernel like a D-state
    wait), then sleeps 2.5 s before exiting."""
    import threading
    nvmlsim.SimGpu(0, state).register()
    time.sleep(0.6)
    _wait_go()
    marks = {}

    def reader():
        _name("ss_reader")
        # one open for both reads: a close() between them waits in FUSE too (FLUSH), and on
        # a loaded machine that wait is long enough to join the read's group
        fd = os.open(path, os.O_RDONLY)
        for i, pause in enumerate((0.5, 2.5)):
            marks[f"read{i}_start_ns"] = time.time_ns()
            os.pread(fd, 4096, i * 4096)
            marks[f"read{i}_end_ns"] = time.time_ns()
            time.sleep(pause)          # one voluntary sleep: the thread does not switch again
        marks["exit_ns"] = time.time_ns()
        os.close(fd)
    t = threading.Thread(target=reader)
    t.start()
    t.join()
    with open(log, "w") as f:
        json.dump(marks, f)


def plain_read_main(path):
    """The same read from a process that has nothing to do with the GPU."""
    _wait_go()
    with open(path, "rb", buffering=0) as f:
        f.read(4096)


def spin_main(seconds, cpu, comm, fifo, state=None):
    """Spin on one CPU for ``seconds`` (SCHED_FIFO when ``fifo`` is "1"; a GPU process when
    ``state`` is given)."""
    _name(comm)
    os.sched_setaffinity(0, {int(cpu)})
    if fifo == "1":
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    if state:
        nvmlsim.SimGpu(0, state).register()
        time.sleep(0.6)
    _wait_go()
    end = time.monotonic() + float(seconds)
    x = 0
    while time.monotonic() < end:
        x += 1


def mmap_main(state, path, pages, log):
    """A GPU process that maps a stalled file and touches ``pages`` pages 256 KiB apart
    (each a separate readahead window, so each fault waits for the filesystem), then exits
    at once: the tracer must have named the file while it lived."""
    nvmlsim.SimGpu(0, state).register()
    time.sleep(0.6)
    _wait_go()
    fd = os.open(path, os.O_RDONLY)
    # MAP_PRIVATE: FUSE maps direct-io files privately only (shared needs FUSE_DIRECT_IO_ALLOW_MMAP)
    m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    t0 = time.time_ns()
    s = sum(m[i * (256 << 10)] for i in range(int(pages)))
    t1 = time.time_ns()
    with open(log, "w") as f:
        json.dump({"start_ns": t0, "end_ns": t1, "sum": s}, f)
    os._exit(0)


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def simlib():
    return nvmlsim.build()


class Child:
    """A workload function of ``MODULE`` in its own process, started and then released; the
    variables in ``DROP_ENV`` are not inherited."""

    MODULE = "tests.bpf.test_sched"
    DROP_ENV: tuple = ()

    def __init__(self, fn, *args, env=None):
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); import {self.MODULE} as t; "
                f"t.{fn}(*{[str(a) for a in args]!r})")
        inherited = {k: v for k, v in os.environ.items() if k not in self.DROP_ENV}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**inherited, "PYTHONPATH": ROOT, **(env or {})})
        self.pid = self.proc.pid

    def ready(self, timeout=30):
        line = self.proc.stdout.readline()
        assert line and json.loads(line)["ready"] == self.pid, line
        return self

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self

    def wait(self, timeout=60):
        assert self.proc.wait(timeout) == 0
        return self


def _gpu_trace(tmp_path, simlib, families="vfs,sched"):
    state = nvmlsim.create_state(str(tmp_path / "sim.state"), n_gpus=1, period_ms=100)
    env = {"STALLSCOPE_NVMLSIM_STATE": state}
    rec = str(tmp_path / "rec.ssrec")
    t = Trace("--quiet", "--output", rec, "--min-latency-ms", "50", "--nvml-lib", simlib,
              families=families, gpu=True, env=env)
    return t, state, env, rec


def _tables(rec, kind):
    rows = []
    for b in read_recording(rec):
        t = b.tables.get(kind)
        if t is None:
            continue
        cols = list(t)
        for vals in zip(*(t[c] for c in cols)):
            rows.append({c: (v.item() if hasattr(v, "item") else v) for c, v in zip(cols, vals)})
    return rows


# ---------------------------------------------------------------- tests

def test_short_lived_workers_have_lineage_and_are_blamed(tmp_path, simlib):
    """7 workers forked by the GPU process, each gone 20 ms after its 300 ms stalled read
    (long before the tracer's next batch): all 7 are in the proc table with their parent,
    and the idle intervals they caused are blamed on their reads."""
    t, state, env, rec = _gpu_trace(tmp_path, simlib)
    log = str(tmp_path / "parent.json")
    with SlowFS(delay_ms=READ_MS, ops=("read",)) as fs:
        path = fs.make_file("slow-shard.bin", 1 << 20)
        with t:
            parent = Child("parent_main", state, path, log, env=env).ready()
            parent.go().wait(120)
        t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    info = json.load(open(log))
    workers = info["workers"]
    assert len(set(workers)) == WORKERS and info["parent"] == parent.pid
    reads = {w: json.load(open(f"{log}.{w}")) for w in workers}

    procs = {r["pid"]: r for r in _tables(rec, "proc")}
    for w in workers:
        assert w in procs, (w, sorted(procs))
        assert procs[w]["ppid"] == parent.pid, procs[w]
        # start time from the kernel's fork record: before the worker's read began
        assert procs[w]["start_ns"] <= reads[w]["start_ns"] < procs[w]["start_ns"] + 500_000_000
    io = [r for r in _tables(rec, "io") if r["pid"] in reads and r["path"] == path]
    assert sorted(r["pid"] for r in io) == sorted(workers)

    r = run_cli("report", "--json", rec)
    assert r.returncode == 0, r.stderr
    verdicts = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    blamed = {}
    for w, rd in reads.items():
        for v in verdicts:
            if v["idle_start_ns"] < rd["end_ns"] and v["idle_end_ns"] > rd["start_ns"] and v["culprit"]:
                blamed[w] = v["culprit"]
    assert len(blamed) >= WORKERS - 1, (blamed, verdicts)      # one interval may straddle a sample edge
    for w, c in blamed.items():
        assert (c["type"], c["op"], c["path"], c["pid"]) == ("io", "read", path, w), c
        assert parent.pid in next(v["owners"] for v in verdicts
                                  if v["culprit"] and v["culprit"]["pid"] == w)


def test_owner_fuse_wait_is_a_blocked_row_and_a_stranger_is_not(tmp_path, simlib):
    """An owner thread's 0.5 s FUSE read (an S-state wait in request_wait_answer) is a
    sched "blocked" row naming fuse; the same read by a process off the GPU is traced by
    the vfs family but gives no sched row."""
    t, state, env, rec = _gpu_trace(tmp_path, simlib)
    with SlowFS(delay_ms=500, ops=("read",)) as fs:
        path = fs.make_file("slow-a.bin", 1 << 20)
        with t:
            owner = Child("owner_read_main", state, path, env=env).ready()
            stranger = Child("plain_read_main", path).ready()
            owner.go()
            stranger.go()
            owner.wait()
            stranger.wait()
        t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    sched = _tables(rec, "sched")
    mine = [r for r in sched if r["pid"] == owner.pid and r["op"] == "blocked"]
    assert len(mine) == 1, sched
    row = mine[0]
    assert "fuse" in row["reason"] and row["comm"] == "ss_reader", row
    assert 480e6 <= row["blocked_ns"] <= 700e6 and row["count"] == 1, row
    # the distractor's read was traced (so its absence below means something) ...
    io = [r for r in _tables(rec, "io") if r["pid"] == stranger.pid and r["path"] == path]
    assert len(io) == 1 and io[0]["dur_ns"] >= 480e6, io
    # ... but it is no GPU owner: nothing of it in the sched table
    assert not [r for r in sched if r["pid"] == stranger.pid], sched


def test_quiet_owner_thread_rows_arrive_while_it_sleeps(tmp_path, simlib):
    """The second FUSE wait of a thread goes through the kernel's merging (its stack was
    classified after the first); the thread then sleeps 2.5 s: the agent's flush closes
    the group, so the row is shipped long before the thread's exit would have closed it."""
    t, state, env, rec = _gpu_trace(tmp_path, simlib, families="sched")
    log = str(tmp_path / "marks.json")
    with SlowFS(delay_ms=300, ops=("read",)) as fs:
        path = fs.make_file("slow-b.bin", 1 << 20)
        with t:
            owner = Child("twice_then_quiet_main", state, path, log, env=env).ready()
            owner.go().wait()
        t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    marks = json.load(open(log))
    sent = []          # (row, when its batch left the tracer)
    for b in read_recording(rec):
        tab = b.tables.get("sched")
        if tab is None:
            continue
        for i in range(len(tab["pid"])):
            if int(tab["pid"][i]) == owner.pid and tab["op"][i] == "blocked" \
                    and int(tab["ts_ns"][i]) < marks["exit_ns"]:     # not the final close's
                sent.append(({c: tab[c][i] for c in tab}, b.meta["clock"]["sent_ns"]))
    assert len(sent) == 2, sent
    (first, _), (second, second_sent) = sorted(sent, key=lambda x: int(x[0]["ts_ns"]))
    for row in (first, second):
        assert "fuse" in row["reason"] and row["comm"] == "ss_reader" and int(row["count"]) == 1, row
        assert 280e6 <= int(row["blocked_ns"]) <= 600e6, row
    assert abs(int(second["ts_ns"]) - marks["read1_start_ns"]) < 50e6, (second, marks)
    # closed by the flush within ~0.5 s of the wait's end, not by the exit 2.5 s later
    assert second_sent < marks["read1_end_ns"] + 1.2e9 < marks["exit_ns"], (second_sent, marks)


def test_owner_starved_of_cpu_names_the_hog(tmp_path, simlib):
    """An owner spinning on one CPU, and a hog pinned to the same CPU for 0.6 s: a runq row
    of about 0.6 s naming the hog. The hog is SCHED_FIFO so that it owns the CPU: a nice-0
    hog shares it with whatever else this shared machine runs there (a VM's vCPU threads
    in another cgroup took half of it when tried), and the row would rightly name those."""
    cpu = max(os.sched_getaffinity(0))
    t, state, env, rec = _gpu_trace(tmp_path, simlib, families="sched")
    with t:
        owner = Child("spin_main", 1.4, cpu, "ss_owner", 0, state, env=env).ready()
        hog = Child("spin_main", 0.6, cpu, "ss_hog", 1).ready()
        owner.go()
        time.sleep(0.3)
        hog.go()
        hog.wait()
        owner.wait()
    t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    runq = [r for r in _tables(rec, "sched") if r["pid"] == owner.pid and r["op"] == "runq"]
    assert runq, _tables(rec, "sched")
    big = max(runq, key=lambda r: r["blocked_ns"])
    # the hog's 0.6 s, plus whatever else kept the owner waiting on this shared machine
    assert 550e6 <= big["blocked_ns"] <= big["dur_ns"] + 1 <= 1.5e9, big
    assert (big["other_pid"], big["other_comm"]) == (hog.pid, "ss_hog"), big
    assert big["reason"] == "preempted", big
    assert big["comm"] == "ss_owner" and big["tid"] == owner.pid


def test_page_faults_on_mapped_fuse_file(tmp_path, simlib):
    """An owner that maps a stalled FUSE file and touches 3 pages in distinct readahead
    windows: page_fault rows in the io table naming the file, though it exits at once."""
    pages = 3
    t, state, env, rec = _gpu_trace(tmp_path, simlib, families="sched")
    log = str(tmp_path / "mmap.json")
    with SlowFS(delay_ms=300, ops=("read",)) as fs:
        path = fs.make_file("slow-mapped.bin", 1 << 20)
        with t:
            owner = Child("mmap_main", state, path, pages, log, env=env).ready()
            owner.go().wait()
        t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    done = json.load(open(log))
    faults = [r for r in _tables(rec, "io") if r["pid"] == owner.pid and r["op"] == "page_fault"]
    assert faults, _tables(rec, "io")
    assert {r["path"] for r in faults} == {path}, faults
    assert {r["fs"] for r in faults} == {"fuse"} and {r["bytes"] for r in faults} == {0}
    assert sum(r["count"] for r in faults) == pages, faults
    assert sum(r["blocked_ns"] for r in faults) >= pages * 280e6, faults
    for r in faults:
        assert done["start_ns"] - 5e6 <= r["ts_ns"] and r["ts_ns"] + r["dur_ns"] <= done["end_ns"] + 5e6
    assert not [r for r in _tables(rec, "sched") if r["pid"] == owner.pid and r["op"] == "blocked"
                and r["blocked_ns"] >= 250e6]    # the fault is an io row, not also a blocked one
