"""Process exit status from the kernel (sched family): a GPU process that exits with code 3,
one killed by SIGKILL while a second thread runs, and a worker forked by a GPU process that
exits with code 4 each get a ``proc`` row with ``exit_ns`` and the wait(2) ``exit_status``;
a process that has nothing to do with a GPU or a job exits with code 5 and gets none. Real
tracer, the NVML simulator through real pynvml.

Workloads run as separate processes (functions of this module, started with ``python -c``)
so that they, not pytest, are the GPU's processes."""

import json
import os
import signal
import sys
import threading
import time

import pytest

from stallscope.sim import nvmlsim
from stallscope.wire.recording import read_recording
from tests.bpf.test_sched import Child as _SchedChild
from tests.bpf.tracerun import Trace

pytestmark = pytest.mark.bpf


def _ready():
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()


# ---------------------------------------------------------------- workloads (child processes)

def gpu_exit_main(state, code):
    """A GPU process (listed by NVML, so an owner once the tracer has polled) that exits
    with ``code``."""
    nvmlsim.SimGpu(0, state).register()
    time.sleep(0.6)                 # the tracer polls NVML every 200 ms: it knows us now
    _ready()
    os._exit(int(code))


def gpu_wait_main(state):
    """A GPU process with a second thread, waiting to be killed."""
    nvmlsim.SimGpu(0, state).register()
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    time.sleep(0.6)
    _ready()
    time.sleep(600)


def gpu_fork_main(state, log):
    """A GPU process that forks a worker (an owner by inheritance, in the kernel) which
    exits with code 4; the GPU process itself exits 0."""
    nvmlsim.SimGpu(0, state).register()
    time.sleep(0.6)
    _ready()
    pid = os.fork()
    if pid == 0:
        time.sleep(0.05)
        os._exit(4)
    _pid, status = os.waitpid(pid, 0)
    with open(log, "w") as f:
        json.dump({"worker": pid, "status": status}, f)


def plain_exit_main(code):
    """A process with no GPU and no job."""
    _ready()
    os._exit(int(code))


@pytest.fixture(scope="module")
def simlib():
    return nvmlsim.build()


class Child(_SchedChild):
    """A workload function of this module; no job identity inherited from the test run."""

    MODULE = "tests.bpf.test_exit_status"
    DROP_ENV = ("SLURM_JOB_ID", "RANK", "STALLSCOPE_JOB", "STALLSCOPE_RANK", "MASTER_ADDR")


def _exit_rows(rec):
    """Every proc row with an exit, in the order the batches carried them."""
    rows = []
    for b in read_recording(rec):
        t = b.tables.get("proc")
        if t is None:
            continue
        for i in range(len(t["pid"])):
            if int(t["exit_ns"][i]):
                rows.append({c: (t[c][i].item() if hasattr(t[c][i], "item") else t[c][i]) for c in t})
    return rows


def test_exit_status_of_gpu_processes(tmp_path, simlib):
    state = nvmlsim.create_state(str(tmp_path / "sim.state"), n_gpus=1, period_ms=100)
    env = {"STALLSCOPE_NVMLSIM_STATE": state}
    rec = str(tmp_path / "rec.ssrec")
    log = str(tmp_path / "fork.json")
    t = Trace("--quiet", "--output", rec, "--min-latency-ms", "50", "--nvml-lib", simlib,
              families="sched", gpu=True, env=env)
    with t:
        coder = Child("gpu_exit_main", state, 3, env=env).ready()
        victim = Child("gpu_wait_main", state, env=env).ready()
        forker = Child("gpu_fork_main", state, log, env=env).ready()
        plain = Child("plain_exit_main", 5).ready()
        before = time.time_ns()
        coder.go()
        plain.go()
        forker.go()
        os.kill(victim.pid, signal.SIGKILL)
        assert coder.proc.wait(30) == 3 and plain.proc.wait(30) == 5
        assert victim.proc.wait(30) == -signal.SIGKILL and forker.proc.wait(30) == 0
        after = time.time_ns()
        time.sleep(0.5)             # the drain and the next batch
    t.stop()
    assert t.rc == 0 and "tick failed" not in t.stderr, t.stderr
    worker = json.load(open(log))
    assert os.WEXITSTATUS(worker["status"]) == 4

    rows = _exit_rows(rec)
    by_pid = {}
    for r in rows:
        assert r["pid"] not in by_pid, ("one exit row per process", r, by_pid)
        by_pid[r["pid"]] = r
    assert by_pid[coder.pid]["exit_status"] == 3 << 8, by_pid[coder.pid]
    assert by_pid[victim.pid]["exit_status"] == signal.SIGKILL, by_pid[victim.pid]
    assert by_pid[worker["worker"]]["exit_status"] == 4 << 8, by_pid.get(worker["worker"])
    assert by_pid[worker["worker"]]["ppid"] == forker.pid
    assert by_pid[forker.pid]["exit_status"] == 0
    for pid in (coder.pid, victim.pid, forker.pid, worker["worker"]):
        r = by_pid[pid]
        assert before - 1_000_000_000 < r["exit_ns"] < after + 1_000_000_000, r
        assert r["start_ns"] < r["exit_ns"], r
    # not every process on the host: a stranger's exit is not shipped
    assert plain.pid not in by_pid, by_pid[plain.pid]
    batches = list(read_recording(rec))
    # the node's addresses ride in every batch (the host's here: the GPU processes share its netns)
    from stallscope.tracer.agent import node_addrs
    assert {tuple(b.meta["node"]["addrs"]) for b in batches} == {tuple(node_addrs())}
    counters = batches[-1].counters
    assert counters["proc.exits_reported"] >= 4, counters
    assert counters.get("proc.exits_dropped", 0) == 0, counters
