"""GpuSampler through the real pynvml bindings, against the simulated libnvidia-ml.so.1.

Every test builds (make, once) sim/nvmlsim, writes its own state file, and drives the
simulated GPUs as a workload would; pynvml loads the simulator by SONAME exactly as it
would load the driver's library.  Spans are mostly marked with explicit wall-clock times,
so the expected utilization of every sample period is known exactly and the tests do not
depend on how promptly this (shared, 2-core) machine schedules them.
"""
import ctypes.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from stallscope.sim import nvmlsim
from stallscope.tracer.nvml import GpuSampler, NvmlUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P_MS = 50
P_NS = P_MS * 1_000_000


@pytest.fixture(scope="session")
def simlib():
    if not (shutil.which("make") and shutil.which("cc")):
        pytest.skip("needs make and a C compiler to build sim/nvmlsim")
    return nvmlsim.build()


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A fresh 2-GPU state file, selected for the simulator through the environment."""
    def make(**kw):
        kw.setdefault("n_gpus", 2)
        kw.setdefault("period_ms", P_MS)
        path = nvmlsim.create_state(str(tmp_path / "nvmlsim.state"), **kw)
        monkeypatch.setenv(nvmlsim.STATE_ENV, path)
        return path
    return make


@pytest.fixture
def open_sampler(simlib):
    opened = []

    def open_():
        s = GpuSampler.open(lib_path=simlib)
        opened.append(s)
        return s
    yield open_
    for s in opened:
        s.close()


def sleep_until(t_ns):
    while (d := t_ns - time.time_ns()) > 0:
        time.sleep(d / 1e9)


def rows(batch, gpu, key="gpu"):
    """(ts_ns, util, synth) rows of one GPU from a poll result."""
    b = batch[key]
    m = b["gpu"] == gpu
    return list(zip(b["ts_ns"][m].tolist(), b["util"][m].tolist(), b["synth"][m].tolist()))


def expected_util(end_ns, spans):
    """Percent of the period ending at end_ns covered by the (disjoint) spans."""
    start = end_ns - P_NS
    cover = sum(max(0, min(end_ns, b) - max(start, a)) for a, b in spans)
    return 100 * cover / P_NS


def test_layout_matches_library(simlib):
    nvmlsim.check_abi(simlib)


def test_identity_and_meta(state, open_sampler):
    state(names=["Sim A100", "Sim H100"], uuids=["GPU-aaaa", "GPU-bbbb"])
    s = open_sampler()
    import pynvml
    assert pynvml.nvmlSystemGetNVMLVersion() == "nvmlsim-1"  # pynvml really loaded the simulator
    assert s.gpus == [{"index": 0, "uuid": "GPU-aaaa", "name": "Sim A100"},
                      {"index": 1, "uuid": "GPU-bbbb", "name": "Sim H100"}]
    m = s.meta()
    assert m["driver"] == "nvmlsim-1" and m["source"] == "samples" and m["errors"] == 0
    assert m["gpus"] == s.gpus


def test_busy_span_gives_full_util_at_the_right_times(state, open_sampler):
    path = state()
    s = open_sampler()
    t0 = (time.time_ns() // P_NS + 4) * P_NS + 17_000_000  # 17 ms into a period: partial edges
    span = (t0, t0 + 7 * P_NS)
    nvmlsim.SimGpu(1, path).mark(*span)
    sleep_until(span[1] + 4 * P_NS)
    batch = s.poll()
    got = rows(batch, 1)
    assert len(got) >= 12
    for ts, util, synth in got:
        assert synth == 0
        assert abs(util - expected_util(ts, [span])) <= 1, (ts - t0, util)
    utils = [u for _, u, _ in got]
    assert utils.count(100) >= 6 and utils[0] == 0 and utils[-1] == 0
    # the busy samples sit inside the span, give or take one period
    busy_ts = [ts for ts, u, _ in got if u == 100]
    assert span[0] <= min(busy_ts) - P_NS and max(busy_ts) <= span[1]
    idle = rows(batch, 0)                                  # the other GPU did nothing
    assert len(idle) >= 12 and all(u == 0 and sy == 0 for _, u, sy in idle)


def test_live_busy_context_follows_the_workload(state, open_sampler):
    path = state()
    s = open_sampler()
    gpu = nvmlsim.SimGpu(0, path)
    sleep_until(time.time_ns() + 2 * P_NS)
    before = time.time_ns()
    with gpu.busy():
        inside = time.time_ns()
        time.sleep(6 * P_NS / 1e9)
        first = rows(s.poll(), 0)            # polled while the kernel still runs
        inside_end = time.time_ns()
    after = time.time_ns()
    sleep_until(after + 3 * P_NS)
    got = first + rows(s.poll(), 0)
    for ts, util, _ in got:
        if ts - P_NS >= inside and ts <= inside_end:
            assert util == 100, (ts - before, util)
        if ts <= before or ts - P_NS >= after:
            assert util == 0, (ts - before, util)
    assert sum(u == 100 for _, u, _ in got) >= 4
    assert any(ts > after and u == 0 for ts, u, _ in got)


def test_paging_returns_each_sample_once(state, open_sampler):
    path = state()
    s = open_sampler()
    gpu = nvmlsim.SimGpu(0, path)
    start = time.time_ns()
    ts_all = []
    for i in range(6):
        t = time.time_ns()
        gpu.mark(t, t + P_NS // 2)
        time.sleep(1.5 * P_NS / 1e9)
        last_poll = time.time_ns()
        ts_all += [ts for ts, _, _ in rows(s.poll(), 0)]
    ts = np.array(ts_all)
    assert len(ts) == len(set(ts_all)), "a sample came back twice"
    assert np.all(np.diff(ts) == P_NS), "a sample was lost or misplaced"
    assert ts[0] <= start + P_NS and ts[-1] > last_poll - P_NS   # nothing left behind
    assert s.meta()["sample_period_ns"][0] == P_NS
    sleep_until(time.time_ns() + 2 * P_NS)
    later = rows(s.poll(), 0)
    assert later and later[0][0] == ts[-1] + P_NS


def test_compute_processes_listed(state, open_sampler):
    path = state()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        nvmlsim.SimGpu(0, path).register()
        nvmlsim.SimGpu(1, path).register(child.pid, used_bytes=1 << 30)
        s = open_sampler()
        p = s.poll()["gpu_proc"]
        assert sorted(zip(p["gpu"].tolist(), p["pid"].tolist())) == [(0, os.getpid()), (1, child.pid)]
        assert p["ts_ns"].dtype == np.uint64 and p["pid"].dtype == np.uint32
        child.kill()
        child.wait()
        p = s.poll()["gpu_proc"]                 # its context died with it
        assert list(zip(p["gpu"].tolist(), p["pid"].tolist())) == [(0, os.getpid())]
    finally:
        child.kill()
        child.wait()


def test_workload_in_another_process(state, open_sampler):
    """The control channel is the state file: a separate workload process drives GPU 0."""
    path = state()
    s = open_sampler()
    code = ("import sys, time\n"
            "from stallscope.sim import nvmlsim\n"
            "gpu = nvmlsim.SimGpu(0, sys.argv[1])\n"
            "gpu.register()\n"
            "print(time.time_ns(), flush=True)\n"
            "with gpu.busy():\n"
            "    t = time.time_ns(); print(t, flush=True); time.sleep(0.3)\n"
            "    print(time.time_ns(), flush=True)\n"
            "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code, path], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        before, inside, inside_end = (int(child.stdout.readline()) for _ in range(3))
        sleep_until(inside_end + 3 * P_NS)
        batch = s.poll()
        procs = batch["gpu_proc"]
        assert (0, child.pid) in zip(procs["gpu"].tolist(), procs["pid"].tolist())
    finally:
        child.communicate("", timeout=30)
    got = rows(batch, 0)
    full = [u for ts, u, _ in got if ts - P_NS >= inside and ts <= inside_end]
    assert len(full) >= 4 and set(full) == {100}
    assert all(u == 0 for ts, u, _ in got if ts <= before)
    assert all(u == 0 for ts, u, _ in rows(batch, 1))


def test_process_list_falls_back_to_v2(state, open_sampler, monkeypatch):
    import pynvml

    def no_v3(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v3", no_v3)
    path = state()
    nvmlsim.SimGpu(1, path).register()
    s = open_sampler()
    p = s.poll()["gpu_proc"]
    assert list(zip(p["gpu"].tolist(), p["pid"].tolist())) == [(1, os.getpid())]
    assert s.meta()["errors"] == 0


def test_empty_buffer_on_gpu_with_process_is_idle(state, open_sampler):
    path = state(idle_quiet_ms=2 * P_MS)    # the driver stops recording after 100 ms idle
    gpu = nvmlsim.SimGpu(0, path)
    gpu.register()
    t = time.time_ns()
    gpu.mark(t, t + 4 * P_NS)
    s = open_sampler()
    sleep_until(t + 8 * P_NS)
    real = rows(s.poll(), 0)
    assert real and all(sy == 0 for *_, sy in real) and max(u for _, u, _ in real) == 100
    last_real = real[-1][0]
    assert last_real <= t + 4 * P_NS + 2 * P_NS          # the buffer ran dry after the span
    sleep_until(time.time_ns() + 10 * P_NS)
    polled_at = time.time_ns()
    batch = s.poll()
    synth = rows(batch, 0)
    assert len(synth) >= 8
    assert all(u == 0 and sy == 1 for _, u, sy in synth)
    ts = np.array([r[0] for r in synth])
    assert ts[0] > last_real and ts[-1] <= polled_at
    assert np.all(np.diff(ts) == P_NS)                   # at the observed period
    assert rows(batch, 1) == []                          # no process on GPU 1: no data, not idle


def test_rates_fallback_when_driver_has_no_samples(state, open_sampler):
    path = state()
    gpu = nvmlsim.SimGpu(0, path)
    gpu.set_faults(no_samples=True)
    s = open_sampler()
    with gpu.busy():
        time.sleep(3 * P_NS / 1e9)
        t1 = time.time_ns()
        batch = s.poll()
        t2 = time.time_ns()
    busy = rows(batch, 0)
    sleep_until(time.time_ns() + 3 * P_NS)
    idle = rows(s.poll(), 0)
    assert len(busy) == 1 and t1 <= busy[0][0] <= t2 and busy[0][1:] == (100, 0)
    assert len(idle) == 1 and idle[0][1] == 0
    assert s.meta()["source"] == "rates"
    assert len(rows(batch, 1)) >= 3                     # GPU 1 still pages its own samples
    assert s.meta()["errors"] == 0


def test_error_on_one_gpu_is_counted_and_skipped(state, open_sampler):
    path = state()
    s = open_sampler()
    lost = nvmlsim.SimGpu(1, path)
    lost.set_faults(lost=True)
    sleep_until(time.time_ns() + 3 * P_NS)
    b = s.poll()
    assert rows(b, 0) and not rows(b, 1)
    assert s.meta()["errors"] == 1
    lost.set_faults()
    sleep_until(time.time_ns() + 2 * P_NS)
    b = s.poll()
    assert rows(b, 1), "the GPU came back but the sampler gave up on it"
    assert s.meta()["errors"] == 1


def test_no_driver_state_is_one_line(simlib, tmp_path, monkeypatch):
    monkeypatch.setenv(nvmlsim.STATE_ENV, str(tmp_path / "absent.state"))
    with pytest.raises(NvmlUnavailable) as e:
        GpuSampler.open(lib_path=simlib)
    assert str(e.value) == "NVML not available: the NVIDIA driver is not loaded"


def test_unloadable_library_path_is_one_line(tmp_path):
    with pytest.raises(NvmlUnavailable) as e:
        GpuSampler.open(lib_path=str(tmp_path / "libnvidia-ml.so.1"))
    msg = str(e.value)
    assert msg.startswith("NVML not available: cannot load ") and "\n" not in msg


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="this machine has a real libnvidia-ml")
def test_missing_library_is_one_line():
    env = {k: v for k, v in os.environ.items()
           if k not in ("STALLSCOPE_NVML_LIB", "LD_LIBRARY_PATH", "LD_PRELOAD")}
    code = ("from stallscope.tracer.nvml import GpuSampler, NvmlUnavailable\n"
            "try:\n    GpuSampler.open()\nexcept NvmlUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "NVML not available: libnvidia-ml.so.1 not found (no NVIDIA driver?)\n"
    assert out.stderr == ""
