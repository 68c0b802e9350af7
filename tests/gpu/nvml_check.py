"""gpu tier, Part A: the real NVML sampler and the real idle detection against known idle phases.

A child process (torch on the GPU; ``--sim``: the NVML simulator) holds a CUDA context and
alternates busy phases (bf16/fp32 matmuls, synchronized every step) with idle phases of known
length (sleeping, context alive), writing each phase's wall-clock start and end.  Meanwhile
this process runs the project's ``GpuSampler`` at the agent's default poll period, logging
every NVML call the sampler makes (arguments, return code, values), and afterwards derives
idle intervals with ``analysis.blame.find_idle`` (defaults, the sampler's reported period:
what the collector does).  :func:`check` then asserts:

* found: every idle phase of at least ``min_interval + period`` is covered by an interval,
  where ``min_interval = max(MIN_PERIODS * period, MIN_IDLE_NS)`` is the documented minimum.
  An interval's edges are the sample stamps around the idle run, so a phase of length ``d``
  guarantees an interval of only ``d - period``; shorter phases are reported, not required;
* edges: each found phase's start and end are within ``period + tolerance`` of the truth;
* no_idle_in_busy: no interval reaches more than ``period + tolerance`` into a busy phase.

tolerance = 20 ms + 5% of the period: a window that is busy for less than 5% (the idle
threshold) already counts as idle; the CPU-side stamps are taken after ``synchronize()``
and before the next launch (sub-ms); and the driver, the sleeping child and the polling
parent are scheduled by a shared kernel (milliseconds).

Usage (from run.sh, with PYTHONPATH set so that ``import stallscope`` works):
  nvml_check.py OUT_DIR [--sim] [--quick]   Part A; writes summary/analysis/nvml/env/recording JSON
  nvml_check.py --bpf-gate                  Part B gate: one line, exit 0 if BPF+BCC+FUSE usable
The checking logic (:func:`check`) and the sampler replay (:func:`replay_sampler`) are shared
with tests/unit/test_gpu_replay.py, which runs them on tests/gpu/recorded/.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MS = 1_000_000
IDLE_PHASES = (0.2, 0.5, 1.0, 3.0)
IDLE_PHASES_2 = (3.0, 0.2, 1.0, 0.5)   # second round, other order
BUSY_S = (1.5, 2.0)                    # busy phase length: uniform in this range, so that
                                       # phase edges fall anywhere on the driver's sample grid
TAIL_S = 2.0                           # idle with the context alive, then exit
EDGE_SLACK_NS = 20 * MS


def agent_gpu_poll_ms() -> int:
    """The agent's default GPU poll period, read from AgentConfig in tracer/agent.py without
    importing it (the agent module pulls BCC-side modules)."""
    try:
        tree = ast.parse(open(os.path.join(ROOT, "tracer", "agent.py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "AgentConfig":
                for st in node.body:
                    if isinstance(st, ast.AnnAssign) and getattr(st.target, "id", "") == "gpu_poll_ms":
                        return int(ast.literal_eval(st.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return 200


def schedule(quick: bool = False, seed=None) -> list:
    import random
    rnd = random.Random(seed)
    rounds = (IDLE_PHASES,) if quick else (IDLE_PHASES, IDLE_PHASES_2)
    busy = (lambda: 0.8) if quick else (lambda: round(rnd.uniform(*BUSY_S), 3))
    out = []
    for r in rounds:
        for idle in r:
            out += [["busy", busy()], ["idle", idle]]
    return out + [["busy", busy()], ["tail", TAIL_S]]


# --------------------------------------------------------------------------- the workload

WORKLOAD = r"""
import json, os, sys, time
out, mode, sched = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
info = {"mode": mode, "pid": os.getpid()}
if mode == "torch":
    import torch
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    a16 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a32 = torch.randn(4096, 4096, device="cuda", dtype=torch.float32)
    n = [0]
    def step():
        n[0] += 1
        (a16 @ a16) if n[0] % 2 else (a32 @ a32)
        torch.cuda.synchronize()
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0))
else:
    from stallscope.sim import nvmlsim
    gpu = nvmlsim.SimGpu(0)
    gpu.register()
    def step():
        with gpu.busy():
            t = time.time_ns() + 5_000_000
            while time.time_ns() < t:
                pass
info["context_ns"] = time.time_ns()
t = time.time()
while time.time() - t < 1.0:          # warm-up: cuBLAS handles, clocks up
    step()
phases = []
for kind, sec in sched:
    t0 = time.time_ns()
    if kind == "busy":
        steps = 0
        while time.time_ns() - t0 < sec * 1e9:
            step()
            steps += 1
    else:
        time.sleep(sec)
    phases.append({"kind": kind, "nominal_s": sec, "start_ns": t0, "end_ns": time.time_ns(),
                   **({"steps": steps} if kind == "busy" else {})})
info["phases"] = phases
info["exit_ns"] = time.time_ns()
with open(out, "w") as f:
    json.dump(info, f)
"""


# --------------------------------------------------------------------------- NVML call log

class NvmlLog:
    """Stands in for the pynvml module inside a GpuSampler: forwards everything, and logs the
    calls whose results the sampler turns into data (samples, processes, rates), with the
    wall, monotonic and boot clocks at the call, so the run can be replayed (replay_sampler)."""

    LOGGED = {"nvmlDeviceGetSamples": "samples",
              "nvmlDeviceGetComputeRunningProcesses_v3": "procs_v3",
              "nvmlDeviceGetComputeRunningProcesses_v2": "procs_v2",
              "nvmlDeviceGetUtilizationRates": "rates"}

    def __init__(self, nv, handles: dict):
        self._nv, self._index = nv, handles   # handle value -> GPU index
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self._nv, name)
        if name not in self.LOGGED:
            return attr

        def logged(handle, *args):
            e = {"fn": self.LOGGED[name], "gpu": self._index.get(_hkey(handle), -1),
                 "t_ns": time.time_ns(), "mono_ns": time.monotonic_ns(),
                 "boot_ns": time.clock_gettime_ns(time.CLOCK_BOOTTIME)}
            if args[1:]:
                e["last"] = args[1]
            self.calls.append(e)
            try:
                r = attr(handle, *args)
            except self._nv.NVMLError as err:
                e["code"] = err.value
                raise
            e["code"] = 0
            if e["fn"] == "samples":
                vtype, samples = r
                field = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal"}.get(vtype, "uiVal")
                e["vtype"] = vtype
                e["s"] = [[s.timeStamp, getattr(s.sampleValue, field)] for s in samples]
            elif e["fn"].startswith("procs"):
                e["p"] = [[p.pid, p.usedGpuMemory or 0] for p in r]
            else:
                e["gpu_pct"], e["mem_pct"] = r.gpu, r.memory
            return r
        return logged

    def repoll(self, handle, last):
        """nvmlDeviceGetSamples again right after the sampler's call, with lastSeenTimeStamp =
        the newest sample it has: what the driver answers when nothing newer exists yet."""
        e = {"fn": "repoll", "gpu": self._index.get(_hkey(handle), -1), "t_ns": time.time_ns(),
             "last": last}
        try:
            vt, smp = self._nv.nvmlDeviceGetSamples(handle, self._nv.NVML_GPU_UTILIZATION_SAMPLES, last)
            e.update(code=0, n=len(smp), s=[[x.timeStamp, 0] for x in smp][:5])
        except self._nv.NVMLError as err:
            e["code"] = err.value
        self.calls.append(e)

    def mark_poll(self):
        self.calls.append({"fn": "poll", "t_ns": time.time_ns()})


def _hkey(handle):
    return ctypes.cast(handle, ctypes.c_void_p).value if handle is not None else None


def replay_sampler(recording: dict):
    """Run the project's GpuSampler on the NVML calls logged in ``recording`` (same results,
    same return codes, same clocks at each poll) and return its samples for the recorded GPU
    as ``{"ts_ns", "util", "synth"}`` lists plus its meta().  Needs pynvml (for its error
    classes and constants), not a GPU."""
    import types

    import pynvml

    from stallscope.tracer import nvml as mod

    queues = {}
    for c in recording["nvml_calls"]:
        queues.setdefault(c["fn"], []).append(c)
    polls = queues.pop("poll", [])
    pos = {k: 0 for k in queues}
    clock = {"t": recording["opened_ns"]}

    def player(fn):
        def call(handle, *args):
            q = queues.get(fn, [])
            if pos.get(fn, 0) >= len(q):
                raise AssertionError(f"replay: more {fn} calls than recorded")
            e = q[pos[fn]]
            pos[fn] += 1
            if "last" in e and args[1:] and args[1] != e["last"]:
                raise AssertionError(f"replay: sampler asked for samples after {args[1]}, "
                                     f"recorded call asked after {e['last']}")
            if e["code"]:
                raise pynvml.NVMLError(e["code"])
            if fn == "samples":
                vals = [types.SimpleNamespace(timeStamp=t, sampleValue=types.SimpleNamespace(
                    dVal=v, uiVal=v, ulVal=v, ullVal=v)) for t, v in e["s"]]
                return e["vtype"], vals
            if fn.startswith("procs"):
                return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in e["p"]]
            return types.SimpleNamespace(gpu=e["gpu_pct"], memory=e["mem_pct"])
        return call

    nv = types.SimpleNamespace(**{k: getattr(pynvml, k) for k in dir(pynvml) if k.startswith("NVML")})
    nv.nvmlDeviceGetSamples = player("samples")
    nv.nvmlDeviceGetComputeRunningProcesses_v3 = player("procs_v3")
    nv.nvmlDeviceGetComputeRunningProcesses_v2 = player("procs_v2")
    nv.nvmlDeviceGetUtilizationRates = player("rates")
    if "procs_v3" not in queues and "procs_v2" in queues:
        def v3_missing(handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        nv.nvmlDeviceGetComputeRunningProcesses_v3 = v3_missing
    nv.nvmlShutdown = lambda: None

    fake_time = types.SimpleNamespace(time_ns=lambda: clock["t"], CLOCK_BOOTTIME=time.CLOCK_BOOTTIME,
                                      clock_gettime_ns=lambda _c: clock["t"] - recording["boot_offset_ns"])
    gpu = recording["gpu"]
    real_time = mod.time
    mod.time = fake_time
    try:
        s = mod.GpuSampler(nv, [mod._Gpu(gpu["index"], gpu["index"], gpu["uuid"], gpu["name"])],
                           recording.get("driver", ""), 0)
        s._opened_ns = recording["opened_ns"]
        out = {"ts_ns": [], "util": [], "synth": []}
        for p in polls:
            clock["t"] = p["t_ns"]
            g = s.poll()["gpu"]
            for k in out:
                out[k] += [int(x) for x in g[k]]
        return out, s.meta()
    finally:
        mod.time = real_time


# --------------------------------------------------------------------------- the checks

def check(samples: dict, truth: dict, period_ns: int | None = None,
          slack_ns: int = EDGE_SLACK_NS) -> dict:
    """Derive idle intervals from one GPU's samples (``{"ts_ns", "util", "synth"}`` lists) with
    the collector's find_idle and defaults, and check them against ``truth["phases"]``
    (``kind`` busy / idle / tail, ``start_ns``, ``end_ns``).  ``period_ns``: the period the
    sampler reported (the collector passes it to find_idle); None: find_idle's own median.
    Returns a JSON-ready dict with ``ok``, ``checks`` (each ``ok`` + details) and the intervals."""
    import numpy as np

    from stallscope.analysis import blame

    ts = np.asarray(samples["ts_ns"], dtype=np.int64)
    util = np.asarray(samples["util"], dtype=np.int64)
    synth = np.asarray(samples.get("synth") or [0] * len(ts), dtype=np.int64)
    key = np.zeros(len(ts), dtype=np.int64)
    idle = blame.find_idle(key, ts, util, synth, {0: int(period_ns)} if period_ns else None)
    p = int(idle.periods.get(0) or blame.sample_period(ts))
    observed = blame.sample_period(np.sort(ts[synth == 0]))
    min_interval = max(blame.MIN_PERIODS * p, blame.MIN_IDLE_NS)
    tol = slack_ns + p * blame.IDLE_THRESHOLD // 100
    margin = p + tol

    phases = truth["phases"]
    busy = [(ph["start_ns"], ph["end_ns"]) for ph in phases if ph["kind"] == "busy"]
    lo, hi = phases[0]["start_ns"], phases[-1]["end_ns"]
    util_at = dict(zip(ts.tolist(), util.tolist()))
    ivs = []
    for i in range(len(idle)):
        s, e = int(idle.start[i]), int(idle.end[i])
        ivs.append({"start_ns": s, "end_ns": e, "dur_ms": round((e - s) / MS, 1),
                    "open": bool(idle.open[i]), "open_start": bool(idle.open_start[i]),
                    "n_idle": int(idle.n_idle[i]), "n_synth": int(idle.n_synth[i]),
                    "phase": None, "where": "before" if e <= lo + margin else
                    "after" if s >= hi else "schedule"})

    per_phase, found_bad, edge_bad = [], [], []
    for j, ph in enumerate(phases):
        if ph["kind"] == "busy":
            continue
        t0, t1 = ph["start_ns"], ph["end_ns"]
        d = t1 - t0
        tail = ph["kind"] == "tail"
        required = d >= min_interval + p
        hit = [iv for iv in ivs if iv["start_ns"] < t1 and iv["end_ns"] > t0]
        r = {"phase": j, "kind": ph["kind"], "nominal_s": ph["nominal_s"],
             "dur_ms": round(d / MS, 1), "required": required, "found": bool(hit),
             "intervals": len(hit)}
        for iv in hit:
            iv["phase"] = j
        if hit:
            u0 = min(iv["start_ns"] for iv in hit)
            u1 = max(iv["end_ns"] for iv in hit)
            r["start_err_ms"] = round((u0 - t0) / MS, 1)
            r["end_err_ms"] = None if tail else round((u1 - t1) / MS, 1)
            r["edges_ok"] = abs(u0 - t0) <= margin and (tail or abs(u1 - t1) <= margin)
            # informational: edges placed inside the edge samples' windows by their busy
            # share (window (ts - period, ts], busy at its start / end), not what blame does
            first, last = min(hit, key=lambda iv: iv["start_ns"]), max(hit, key=lambda iv: iv["end_ns"])
            if not first["open_start"]:        # (an edge off the stamps is placed already)
                r["refined_start_err_ms"] = r["start_err_ms"] if u0 not in util_at else round(
                    (u0 - p + min(util_at[u0], 100) * p / 100 - t0) / MS, 1)
            if not tail and not last["open"]:
                r["refined_end_err_ms"] = r["end_err_ms"] if u1 not in util_at else round(
                    (u1 - min(util_at[u1], 100) * p / 100 - t1) / MS, 1)
            if not r["edges_ok"]:
                edge_bad.append(j)
        elif required:
            found_bad.append(j)
        per_phase.append(r)

    in_busy = []
    for iv in ivs:
        for b0, b1 in busy:
            ov = min(iv["end_ns"], b1 - margin) - max(iv["start_ns"], b0 + margin)
            if ov > 0:
                in_busy.append({"interval_start_ns": iv["start_ns"], "busy_start_ns": b0,
                                "overlap_ms": round(ov / MS, 1)})
    n_required = sum(r["required"] for r in per_phase)
    checks = {
        "samples": {"ok": bool(len(ts)) and bool(((ts >= lo) & (ts <= hi)).any()) and p > 0,
                    "n": int(len(ts)), "n_synth": int(synth.sum()),
                    "n_in_schedule": int(((ts >= lo) & (ts <= hi)).sum())},
        "found": {"ok": not found_bad and n_required > 0, "required": n_required,
                  "missing_phases": found_bad},
        "edges": {"ok": not edge_bad and any(r["found"] for r in per_phase),
                  "bad_phases": edge_bad, "margin_ms": round(margin / MS, 1)},
        "no_idle_in_busy": {"ok": not in_busy, "violations": in_busy},
    }
    ref = [abs(r[k]) for r in per_phase for k in ("refined_start_err_ms", "refined_end_err_ms")
           if r.get(k) is not None]
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks,
            "refined_edge_err_ms_max": max(ref) if ref else None,
            "period_ns": p, "observed_period_ns": observed, "min_interval_ns": min_interval,
            "tolerance_ns": tol, "phases": per_phase, "intervals": ivs}


def window_fit(samples: dict, truth: dict, period_ns: int, offsets_ms=range(-100, 101, 2)) -> dict:
    """Which window a sample's value describes: the offset ``off`` for which "sample stamped
    ts = busy share of (ts - period + off, ts + off]" best fits the values (blame.py assumes
    off = 0).  Busy level: the median value of samples wholly inside busy phases."""
    import numpy as np
    phases = truth["phases"]
    busy = [(ph["start_ns"], ph["end_ns"]) for ph in phases if ph["kind"] == "busy"]
    ts = np.asarray(samples["ts_ns"], dtype=np.int64)
    util = np.asarray(samples["util"], dtype=np.float64)
    lo, hi = phases[0]["start_ns"] + period_ns + 100 * MS, phases[-1]["start_ns"]
    m = (ts > lo) & (ts < hi) & (np.asarray(samples.get("synth") or [0] * len(ts)) == 0)
    ts, util = ts[m], util[m]
    if not len(ts) or not period_ns:
        return {"offset_ms": None}
    inside = [any(a <= t - period_ns and t <= b for a, b in busy) for t in ts]
    level = float(np.median(util[inside])) if any(inside) else 100.0
    best = None
    for off in offsets_ms:
        a, b = ts - period_ns + off * MS, ts + off * MS
        cover = sum(np.clip(np.minimum(b, y) - np.maximum(a, x), 0, None) for x, y in busy)
        err = float(np.abs(level * cover / period_ns - util).mean())
        if best is None or err < best[0]:
            best = (err, off)
    return {"offset_ms": best[1], "mean_abs_err_pct": round(best[0], 2), "busy_level_pct": level,
            "n": int(len(ts))}


# --------------------------------------------------------------------------- BPF (Part B gate)

def bpf_probe() -> dict:
    """Can this machine load BPF programs at all, and is the rest of Part B here?"""
    r = {"kernel": os.uname().release,
         "btf_vmlinux": os.path.exists("/sys/kernel/btf/vmlinux"),
         "tracefs": any(os.path.isdir(p) for p in ("/sys/kernel/tracing/events",
                                                    "/sys/kernel/debug/tracing/events")),
         "dev_fuse": os.path.exists("/dev/fuse")}
    try:
        r["bpffs_mounted"] = any(len(x.split()) > 2 and x.split()[2] == "bpf"
                                 for x in open("/proc/mounts"))
    except OSError as e:
        r["bpffs_mounted"] = f"unreadable: {e}"
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

    def bpf(cmd, attr):
        ctypes.set_errno(0)
        fd = libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        err = ctypes.get_errno()
        if fd >= 0:
            os.close(fd)
            return "ok"
        return f"{os.strerror(err)} (errno {err})"

    if nr is None:
        r["map_create"] = r["prog_load"] = "unknown architecture"
    else:
        m = (ctypes.c_uint32 * 30)()
        m[0], m[1], m[2], m[3] = 2, 4, 8, 1          # BPF_MAP_TYPE_ARRAY, key 4, value 8, 1 entry
        r["map_create"] = bpf(0, m)
        insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)     # r0 = 0; exit
        lic = ctypes.create_string_buffer(b"GPL")
        a = (ctypes.c_uint64 * 15)()
        a[0] = 1 | (2 << 32)                          # SOCKET_FILTER, 2 instructions
        a[1] = ctypes.addressof(insns)
        a[2] = ctypes.addressof(lic)
        r["prog_load"] = bpf(5, a)
    import importlib.util
    r["bcc"] = importlib.util.find_spec("bcc") is not None
    r["pyzmq"] = importlib.util.find_spec("zmq") is not None
    need = []
    if r["map_create"] != "ok" or r["prog_load"] != "ok":
        need.append(f"bpf() fails (map: {r['map_create']}; prog: {r['prog_load']})")
    if not r["btf_vmlinux"]:
        need.append("no /sys/kernel/btf/vmlinux")
    if not r["bcc"]:
        need.append("BCC (python3-bpfcc) not installed and no registry to get it")
    if not r["pyzmq"]:
        need.append("no pyzmq")
    if not r["dev_fuse"]:
        need.append("no /dev/fuse")
    r["bpf_usable"] = r["map_create"] == "ok" and r["prog_load"] == "ok"
    r["part_b_ready"] = not need
    r["why_not"] = "; ".join(need)
    return r


# --------------------------------------------------------------------------- Part A run

def _summ(xs):
    xs = sorted(xs)
    if not xs:
        return None
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]
    return {"n": len(xs), "min": xs[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": xs[-1]}


def _code(code) -> str:
    """NVML return code with its name: "6 NOT_FOUND"."""
    try:
        import pynvml
        names = {getattr(pynvml, n): n[len("NVML_ERROR_"):] for n in dir(pynvml)
                 if n.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, n), int)}
    except ImportError:
        names = {}
    return f"{code} {'SUCCESS' if code == 0 else names.get(code, '?')}"


def _where(t, phases, exit_ns, start_ns):
    if t < start_ns:
        return "pre_workload"
    if exit_ns and t > exit_ns:
        return "post_exit"
    for ph in phases:
        if ph["start_ns"] <= t < ph["end_ns"]:
            return ph["kind"]
    return "workload_other"


def describe_nvml(calls, ticks, truth, child_pid, start_ns, gpu_index):
    """What the real NVML did: sample period, empty-buffer answers, timestamp base, rates,
    process lists; per stage (pre_workload, busy, idle, tail, post_exit)."""
    phases, exit_ns = truth.get("phases", []), truth.get("exit_ns")
    codes, lags, stamps = {}, {"wall": [], "mono": [], "boot": []}, []
    for c in calls:
        if c.get("gpu") != gpu_index or c["fn"] != "samples":
            continue
        st = _where(c["t_ns"], phases, exit_ns, start_ns)
        d = codes.setdefault(st, {"calls": 0, "codes": {}, "samples": 0, "values": set(),
                                  "empty_success": 0, "stale": 0})
        d["calls"] += 1
        d["codes"][_code(c["code"])] = d["codes"].get(_code(c["code"]), 0) + 1
        if c["code"] == 0:
            new = [s for s in c["s"] if s[0] > c.get("last", 0)]
            d["samples"] += len(new)
            d["stale"] += len(c["s"]) - len(new)     # returned although not after lastSeen
            d["values"].update(v for _, v in new)
            d["empty_success"] += not new
            if c["s"]:
                ts = max(s[0] for s in c["s"])
                lags["wall"].append(c["t_ns"] // 1000 - ts)
                lags["mono"].append(c["mono_ns"] // 1000 - ts)
                lags["boot"].append(c["boot_ns"] // 1000 - ts)
            stamps += [s[0] for s in new]
    for d in codes.values():
        v = sorted(d["values"])
        d["values"] = v if len(v) <= 40 else v[:20] + ["..."] + v[-20:]
    stamps = sorted(set(stamps))
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    lag = {k: _summ(v) for k, v in lags.items()}
    base = [k for k, s in lag.items() if s and -1_000_000 <= s["median"] <= 10_000_000]
    first_call = next((c for c in calls if c["fn"] == "samples" and c.get("gpu") == gpu_index), None)

    repoll = {}
    for c in calls:
        if c["fn"] == "repoll" and c.get("gpu") == gpu_index:
            st = _where(c["t_ns"], phases, exit_ns, start_ns)
            d = repoll.setdefault(st, {"calls": 0, "codes": {}, "returned_samples": 0})
            d["calls"] += 1
            d["codes"][_code(c["code"])] = d["codes"].get(_code(c["code"]), 0) + 1
            d["returned_samples"] += c.get("n", 0)

    procs = {}
    for c in calls:
        if c["fn"].startswith("procs") and c.get("gpu") == gpu_index:
            st = _where(c["t_ns"], phases, exit_ns, start_ns)
            d = procs.setdefault(st, {"calls": 0, "codes": {}, "lists": {}})
            d["calls"] += 1
            d["codes"][_code(c["code"])] = d["codes"].get(_code(c["code"]), 0) + 1
            if c["code"] == 0:
                k = json.dumps(sorted(p for p, _ in c["p"]))
                d["lists"][k] = d["lists"].get(k, 0) + 1
    for d in procs.values():
        d["child_listed"] = any(child_pid in json.loads(k) for k in d["lists"])

    rates = {}
    for t in ticks:
        if t.get("rates") is None:
            continue
        st = _where(t["t_ns"], phases, exit_ns, start_ns)
        rates.setdefault(st, []).append(t["rates"][0])
    rate_delay = []
    for ph in phases:
        if ph["kind"] not in ("busy", "idle"):
            continue
        want = (lambda g: g >= 50) if ph["kind"] == "busy" else (lambda g: g < 5)
        hit = next((t for t in ticks if t.get("rates") and ph["start_ns"] <= t["t_ns"] < ph["end_ns"]
                    and want(t["rates"][0])), None)
        rate_delay.append({"kind": ph["kind"], "nominal_s": ph["nominal_s"],
                           "reached_ms": round((hit["t_ns"] - ph["start_ns"]) / MS) if hit else None,
                           "values": [t["rates"][0] for t in ticks if t.get("rates")
                                      and ph["start_ns"] <= t["t_ns"] < ph["end_ns"]]})
    return {
        "sample_period_us": {"median": statistics.median(deltas) if deltas else None,
                             "deltas": _summ(deltas), "distinct_deltas": sorted(set(deltas))[:30]},
        "getsamples_by_stage": codes,
        "repoll_newest_by_stage": repoll,
        "first_call_lastseen0": {"code": first_call["code"], "n": len(first_call.get("s") or []),
                                 "span_us": (first_call["s"][-1][0] - first_call["s"][0][0])
                                 if first_call and first_call.get("s") else None}
        if first_call else None,
        "timestamp_lag_us": lag,
        "timestamp_base": base,
        "procs_by_stage": procs,
        "util_rates_by_stage": {k: _summ(v) for k, v in rates.items()},
        "util_rates_per_phase": rate_delay,
    }


def run(out: str, sim: bool = False, quick: bool = False, sim_quiet_ms: int = 0) -> int:
    os.makedirs(out, exist_ok=True)
    poll_ms = agent_gpu_poll_ms()
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "uname": list(platform.uname()),
           "python": sys.version.split()[0], "mode": "sim" if sim else "torch",
           "agent_gpu_poll_ms": poll_ms}
    t = time.time()
    env["bpf"] = bpf_probe()
    env["bpf"]["probe_s"] = round(time.time() - t, 3)
    try:
        from importlib.metadata import version
        env["nvidia_ml_py"] = version("nvidia-ml-py")
    except Exception as e:  # noqa: BLE001
        env["nvidia_ml_py"] = f"? {e}"
    write = lambda name, obj: open(os.path.join(out, name), "w").write(
        json.dumps(obj, indent=1, default=str) + "\n")
    write("env.json", env)
    print(f"kernel {env['bpf']['kernel']}; bpf usable: {env['bpf']['bpf_usable']}; "
          f"agent GPU poll {poll_ms} ms", flush=True)

    tmp = tempfile.mkdtemp(prefix="stallscope-nvml-")
    lib = None
    child_env = dict(os.environ)
    if sim:
        from stallscope.sim import nvmlsim
        lib = nvmlsim.build()
        state = nvmlsim.create_state(os.path.join(tmp, "sim.state"), n_gpus=1,
                                     idle_quiet_ms=sim_quiet_ms)
        os.environ[nvmlsim.STATE_ENV] = child_env[nvmlsim.STATE_ENV] = state

    from stallscope.tracer.nvml import GpuSampler, NvmlUnavailable
    summary = {"ok": False, "date": env["date"], "kernel": env["bpf"]["kernel"], "mode": env["mode"]}
    try:
        sampler = GpuSampler.open(lib_path=lib)
    except NvmlUnavailable as e:
        summary["error"] = str(e)
        write("summary.json", summary)
        print(f"FAIL: {e}")
        return 1
    nv = sampler._nv
    gpus = sampler._gpus
    log = NvmlLog(nv, {_hkey(g.handle): g.index for g in gpus})
    sampler._nv = log
    try:
        cuda_driver = nv.nvmlSystemGetCudaDriverVersion_v2()
    except Exception:  # noqa: BLE001
        cuda_driver = None
    meta0 = sampler.meta()
    summary.update(driver=meta0["driver"], gpus=meta0["gpus"], cuda_driver_version=cuda_driver)
    print(f"NVML: driver {meta0['driver']}, GPUs {[g['name'] for g in meta0['gpus']]}", flush=True)

    acc = {g.index: {"ts_ns": [], "util": [], "synth": []} for g in gpus}
    ticks = []

    def tick():
        t = time.time_ns()
        log.mark_poll()
        got = sampler.poll()["gpu"]
        for i in range(len(got["ts_ns"])):
            a = acc[int(got["gpu"][i])]
            a["ts_ns"].append(int(got["ts_ns"][i]))
            a["util"].append(int(got["util"][i]))
            a["synth"].append(int(got["synth"][i]))
        if len(ticks) % 3 == 0:
            for g_ in gpus:
                if g_.last_ts_us:
                    log.repoll(g_.handle, g_.last_ts_us)
        rec = {"t_ns": t, "rates": None}
        try:
            u = nv.nvmlDeviceGetUtilizationRates(gpus[0].handle)
            rec["rates"] = [u.gpu, u.memory]
        except nv.NVMLError as e:
            rec["rates_error"] = str(e)
        ticks.append(rec)

    def ticks_for(seconds, until=None):
        t_end = time.monotonic() + seconds
        nxt = time.monotonic()
        while time.monotonic() < t_end and not (until and until()):
            tick()
            nxt += poll_ms / 1000
            time.sleep(max(0.0, nxt - time.monotonic()))

    # the GPU idle with no process, then the workload, then after it exits
    ticks_for(2.0)
    start_ns = time.time_ns()
    gt_path = os.path.join(tmp, "truth.json")
    child = subprocess.Popen([sys.executable, "-c", WORKLOAD, gt_path, "sim" if sim else "torch",
                              json.dumps(schedule(quick))], env=child_env)
    ticks_for(200.0, until=lambda: child.poll() is not None)
    if child.poll() is None:
        child.kill()
    rc = child.wait()
    exit_seen_ns = time.time_ns()
    ticks_for(2.5)
    try:
        buf = nv.nvmlDeviceGetSamples(gpus[0].handle, nv.NVML_GPU_UTILIZATION_SAMPLES, 0)[1]
        final_buffer = {"code": 0, "n": len(buf),
                        "span_us": (buf[-1].timeStamp - buf[0].timeStamp) if buf else None}
    except Exception as e:  # noqa: BLE001
        final_buffer = {"code": getattr(e, "value", None), "error": f"{type(e).__name__}: {e}"}
    try:
        procs_after = [[p.pid, p.usedGpuMemory] for p in
                       nv.nvmlDeviceGetComputeRunningProcesses_v3(gpus[0].handle)]
    except Exception as e:  # noqa: BLE001
        procs_after = f"{type(e).__name__}: {e}"
    meta = sampler.meta()
    sampler._nv = nv
    sampler.close()

    if rc != 0 or not os.path.exists(gt_path):
        summary["error"] = f"workload exited {rc}"
        write("summary.json", summary)
        print(f"FAIL: workload exited {rc}")
        return 1
    truth = json.load(open(gt_path))
    truth["exit_seen_ns"] = exit_seen_ns
    gi = next((g.index for g in gpus if any(
        c.get("gpu") == g.index and truth["pid"] in [p for p, _ in c.get("p", [])]
        for c in log.calls)), gpus[0].index)
    g = next(x for x in gpus if x.index == gi)
    period_ns = meta["sample_period_ns"].get(gi) or None
    recording = {
        "version": 1, "source": "sim" if sim else "real", "date": env["date"],
        "kernel": env["bpf"]["kernel"], "driver": meta["driver"], "poll_ms": poll_ms,
        "gpu": {"index": gi, "uuid": g.uuid, "name": g.name},
        "sample_period_ns": period_ns, "opened_ns": sampler._opened_ns,
        "boot_offset_ns": time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        "samples": acc[gi], "truth": truth,
        "nvml_calls": [c for c in log.calls if c.get("gpu", gi) == gi],
        "rates": [[t["t_ns"], t["rates"][0]] for t in ticks if t.get("rates")],
    }
    with open(os.path.join(out, "recording.json"), "w") as f:
        json.dump(recording, f, separators=(",", ":"))
    summary.update(gpu_name=g.name, source=meta["source"],
                   sampler_period_ms=round((period_ns or 0) / MS, 3),
                   bpf_usable=env["bpf"]["bpf_usable"], part_b_ready=env["bpf"]["part_b_ready"],
                   recording_bytes=os.path.getsize(os.path.join(out, "recording.json")))
    try:
        nvml = describe_nvml(log.calls, ticks, truth, truth["pid"], start_ns, gi)
        nvml.update(driver=meta["driver"], cuda_driver_version=cuda_driver, gpu_name=g.name,
                    source=meta["source"], nvml_errors=meta["errors"],
                    sampler_period_ns=meta["sample_period_ns"], final_buffer_lastseen0=final_buffer,
                    procs_after_exit_direct=procs_after,
                    workload={k: v for k, v in truth.items() if k not in ("phases",)})
        write("nvml.json", nvml)
        res = check(acc[gi], truth, period_ns)
        res["window_fit"] = window_fit(acc[gi], truth, period_ns or res["period_ns"])
        write("analysis.json", res)
    except Exception:  # noqa: BLE001
        import traceback
        summary["error"] = traceback.format_exc()
        write("summary.json", summary)
        print(f"FAIL: analysis crashed:\n{summary['error']}")
        return 1
    # the sampler replayed from its own logged calls must give what it gave live
    try:
        rep, _ = replay_sampler(recording)
        replay_ok = rep == acc[gi]
    except Exception as e:  # noqa: BLE001
        replay_ok = f"replay failed: {type(e).__name__}: {e}"
    summary.update(
        ok=res["ok"], checks={k: v["ok"] for k, v in res["checks"].items()},
        observed_period_ms=round(res["observed_period_ns"] / MS, 3),
        min_interval_ms=round(res["min_interval_ns"] / MS, 1),
        tolerance_ms=round(res["tolerance_ns"] / MS, 1),
        window_fit=res["window_fit"], refined_edge_err_ms_max=res["refined_edge_err_ms_max"],
        repoll_newest_codes={k: v["codes"] for k, v in nvml["repoll_newest_by_stage"].items()},
        phases=[{k: r.get(k) for k in ("kind", "nominal_s", "required", "found", "intervals",
                                        "start_err_ms", "end_err_ms", "edges_ok",
                                        "refined_start_err_ms", "refined_end_err_ms")}
                for r in res["phases"]],
        timestamp_base=nvml["timestamp_base"],
        getsamples_codes_by_stage={k: v["codes"] for k, v in nvml["getsamples_by_stage"].items()},
        child_listed_while_idle=(nvml["procs_by_stage"].get("idle") or {}).get("child_listed"),
        procs_after_exit=list((nvml["procs_by_stage"].get("post_exit") or {}).get("lists", {})),
        replay_matches_live=replay_ok)
    write("summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("ok", "checks", "gpu_name", "driver", "kernel",
                                               "sampler_period_ms", "observed_period_ms",
                                               "timestamp_base", "getsamples_codes_by_stage",
                                               "repoll_newest_codes", "window_fit",
                                               "child_listed_while_idle", "replay_matches_live")},
                     default=str))
    for r in summary["phases"]:
        print("  phase", json.dumps(r))
    print(("PASS" if res["ok"] else "FAIL") + ": Part A (NVML idle intervals vs known phases)")
    return 0 if res["ok"] else 1


def main(argv) -> int:
    if argv[:1] == ["--bpf-gate"]:
        r = bpf_probe()
        print("Part B possible" if r["part_b_ready"] else
              f"kernel {r['kernel']}: {r['why_not']}")
        return 0 if r["part_b_ready"] else 3
    args = [a for a in argv if not a.startswith("--")]
    quiet = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--sim-quiet-ms=")), 0)
    return run(args[0] if args else "gpu-out", sim="--sim" in argv, quick="--quick" in argv,
               sim_quiet_ms=quiet)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
