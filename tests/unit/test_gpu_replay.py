"""gpu tier, replayed: the Part A checks of tests/gpu/nvml_check.py on recorded and synthesized NVML data.

tests/gpu/recorded/*.json are runs of ``tests/gpu/run.sh`` on a real GPU: the samples the
project's GpuSampler produced, every NVML call it made (return codes and values), and the
workload's ground truth (wall-clock start/end of each busy and idle phase).  Here, with no
GPU, the same ``check()`` runs on them, and the sampler is replayed call by call through the
recorded NVML answers and must produce the same samples.  Synthesized runs of the same shape
(a driver that samples every period, or that stops recording while idle) cover both empty
-buffer behaviours and show that each check can fail.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import random

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_DIR = os.path.join(os.path.dirname(HERE), "gpu")
RECORDED = sorted(glob.glob(os.path.join(GPU_DIR, "recorded", "*.json")))
MS = 1_000_000


def _load_check():
    spec = importlib.util.spec_from_file_location("nvml_check", os.path.join(GPU_DIR, "nvml_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nc = _load_check()


def _explain(res):
    bad = {k: v for k, v in res["checks"].items() if not v["ok"]}
    return json.dumps({"failed": bad, "phases": res["phases"]}, default=str)[:4000]


# --------------------------------------------------------------------------- synthesized runs

def synth_recording(period_us=166_667, quiet_ms=None, poll_ms=200, seed=1, busy_util=100):
    """A run shaped like a recorded one: the schedule run.sh uses, a driver that stamps one
    utilization sample per period (percent of the period that was busy, wall-clock us) and
    keeps the last 100, polled every ``poll_ms`` through the sampler's calls.  ``quiet_ms``:
    the driver stops recording after that long idle (nvmlDeviceGetSamples -> NOT_FOUND)."""
    rnd = random.Random(seed)
    t = 1_790_000_000_000_000_000 + rnd.randrange(10 ** 9)
    opened = t
    ctx = t + 2_000 * MS                        # child has its context after 2 s
    t = ctx + 1_000 * MS                        # warm-up (busy)
    phases, spans = [], [(ctx, t)]
    for kind, sec in nc.schedule(seed=seed):
        d = int(sec * 1e9) + rnd.randrange(2 * MS)
        phases.append({"kind": kind, "nominal_s": sec, "start_ns": t, "end_ns": t + d})
        if kind == "busy":
            spans.append((t, t + d))
        t += d
    exit_ns = t + 5 * MS
    end = exit_ns + 2_500 * MS
    p = period_us * 1000
    first = opened - 30 * p + rnd.randrange(p)  # the driver's sample grid
    grid = list(range(first, end, p))

    def util(w_end):
        cover = sum(max(0, min(w_end, b) - max(w_end - p, a)) for a, b in spans)
        return round(busy_util * cover / p)

    def recorded(w_end):
        if quiet_ms is None:
            return True
        last_busy = max((b for a, b in spans if a < w_end), default=None)
        return util(w_end) > 0 or last_busy is None or w_end - last_busy < quiet_ms * MS

    calls, last, now = [], 0, opened + rnd.randrange(5 * MS)
    while now < end:
        calls.append({"fn": "poll", "t_ns": now})
        procs = [[4242, 1 << 30]] if ctx <= now <= exit_ns else []
        calls.append({"fn": "procs_v3", "gpu": 0, "t_ns": now, "code": 0, "p": procs})
        fresh = [[w // 1000, util(w)] for w in grid if w <= now and w // 1000 > last and recorded(w)]
        fresh = fresh[-100:]
        e = {"fn": "samples", "gpu": 0, "t_ns": now, "last": last}
        if fresh:
            e.update(code=0, vtype=1, s=fresh)
            last = fresh[-1][0]
        else:
            e["code"] = 6                      # NVML_ERROR_NOT_FOUND
        calls.append(e)
        now += poll_ms * MS + rnd.randrange(3 * MS)
    return {"version": 1, "source": "synthesized", "driver": "synth", "poll_ms": poll_ms,
            "gpu": {"index": 0, "uuid": "GPU-synth", "name": "synth"},
            "opened_ns": opened, "boot_offset_ns": opened - 10 ** 12, "nvml_calls": calls,
            "truth": {"pid": 4242, "phases": phases, "exit_ns": exit_ns}}


def sampled(rec):
    samples, meta = nc.replay_sampler(rec)
    return samples, meta["sample_period_ns"][0]


@pytest.mark.parametrize("period_us,quiet_ms", [(166_667, None), (166_667, 300), (100_000, None),
                                                (1_000_000, None), (20_000, None)])
def test_synthesized_run_passes(period_us, quiet_ms):
    rec = synth_recording(period_us, quiet_ms)
    samples, period = sampled(rec)
    assert period == period_us * 1000
    if quiet_ms:
        assert sum(samples["synth"]) > 0, "empty buffer while owned: the sampler must synthesize idle"
    res = nc.check(samples, rec["truth"], period)
    assert res["ok"], _explain(res)
    assert nc.window_fit(samples, rec["truth"], period)["offset_ms"] == 0
    # the 3.0 s phases are required whatever the period; the 0.2 s ones never (under the
    # 200 ms minimum plus one period), though they are found at short periods
    req = {r["nominal_s"] for r in res["phases"] if r["required"]}
    assert 3.0 in req and 0.2 not in req


def test_checks_fail_when_they_should():
    rec = synth_recording()
    samples, period = sampled(rec)
    truth = rec["truth"]
    assert nc.check(samples, truth, period)["ok"]

    # the driver reports a long idle phase as busy: not found
    t3 = next(ph for ph in truth["phases"] if ph["nominal_s"] == 3.0)
    s = copy.deepcopy(samples)
    s["util"] = [100 if t3["start_ns"] < t <= t3["end_ns"] else u for t, u in zip(s["ts_ns"], s["util"])]
    res = nc.check(s, truth, period)
    assert not res["checks"]["found"]["ok"] and res["checks"]["edges"]["ok"]

    # stamps two periods late (another clock base): edges off, idle reaches into busy
    s = copy.deepcopy(samples)
    s["ts_ns"] = [t + 2 * period for t in s["ts_ns"]]
    res = nc.check(s, truth, period)
    assert not res["checks"]["edges"]["ok"] and not res["checks"]["no_idle_in_busy"]["ok"]

    # idle samples in the middle of a busy phase
    b = next(ph for ph in truth["phases"] if ph["kind"] == "busy" and ph["start_ns"] > t3["end_ns"])
    mid = (b["start_ns"] + b["end_ns"]) // 2
    s = copy.deepcopy(samples)
    s["util"] = [0 if abs(t - mid) < 300 * MS else u for t, u in zip(s["ts_ns"], s["util"])]
    res = nc.check(s, truth, period)
    assert not res["checks"]["no_idle_in_busy"]["ok"]

    # no samples at all
    assert not nc.check({"ts_ns": [], "util": [], "synth": []}, truth, None)["ok"]


# --------------------------------------------------------------------------- real recordings

def test_recordings_present_and_small():
    if not RECORDED:
        pytest.skip("no real-GPU recording in tests/gpu/recorded/ yet (run tests/gpu/run.sh on a GPU)")
    for path in RECORDED:
        assert os.path.getsize(path) < 200_000, path
        rec = json.load(open(path))
        assert rec["source"] == "real" and rec["samples"]["ts_ns"] and rec["truth"]["phases"]


@pytest.mark.parametrize("path", RECORDED, ids=[os.path.basename(p) for p in RECORDED])
def test_recorded_real_gpu_passes(path):
    rec = json.load(open(path))
    res = nc.check(rec["samples"], rec["truth"], rec["sample_period_ns"])
    assert res["ok"], _explain(res)


@pytest.mark.parametrize("path", RECORDED, ids=[os.path.basename(p) for p in RECORDED])
def test_recorded_sampler_replay(path):
    """GpuSampler fed the recorded NVML answers gives the samples it gave on the GPU; and
    those samples pass the checks (so a change to tracer/nvml.py is checked against the
    real driver's behaviour)."""
    rec = json.load(open(path))
    samples, meta = nc.replay_sampler(rec)
    period = meta["sample_period_ns"][rec["gpu"]["index"]]
    assert period == rec["sample_period_ns"]
    res = nc.check(samples, rec["truth"], period)
    assert res["ok"], _explain(res)
    assert samples == rec["samples"]


@pytest.mark.parametrize("path", RECORDED, ids=[os.path.basename(p) for p in RECORDED])
def test_recorded_driver_window_semantics(path):
    """What blame.find_idle assumes of a sample (it covers (previous ts, ts]) holds on the
    real driver: the window that best explains the recorded values ends at the stamp (within
    10 ms), and placing each interval edge inside its edge sample's window by that sample's
    busy share would bring the edges from up to one period to within ~20 ms of the truth."""
    rec = json.load(open(path))
    fit = nc.window_fit(rec["samples"], rec["truth"], rec["sample_period_ns"])
    assert abs(fit["offset_ms"]) <= 10, fit
    res = nc.check(rec["samples"], rec["truth"], rec["sample_period_ns"])
    assert res["refined_edge_err_ms_max"] <= 25, _explain(res)
