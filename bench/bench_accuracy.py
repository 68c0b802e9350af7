"""Blame accuracy: randomized idle windows with known causes on the simulated GPU.

A trainer (sim/scenarios.py) registered on the NVML simulator's GPU alternates busy
phases with idle windows of 0.3-3 s, each caused by one thing (a short-lived worker's
stalled read, a thread's read, write+fsync, a storm of small reads, page faults on a
memory-mapped file, a file copy, a slow stat, CPU contention, the trainer or its
persistent worker computing on the CPU, a worker streaming from a slow HTTP server, or
nothing at all), half of them with an unrelated
process doing the same stall at the same time. The real tracer
(`stallscope trace --output`, default settings) records it; `stallscope report --json`
judges it; each window's verdict is scored against the workload's ground truth:

  top-1        the verdict names the right culprit: the process (or its worker) and the
               file (CPU contention: a runq stall of the process; computing: "unexplained"
               classed cpu_bound naming the process that computed; a worker streaming from a
               slow HTTP server: "unexplained" classed net_wait naming it; nothing: "unexplained",
               unclassed)
  false blame  any verdict whose culprit is the distractor's process or file
  unexplained  an explainable window judged "unexplained" (or no idle interval found)

    python -m bench accuracy [--quick]          # root; about 10 min for 108 windows, 3 for 27
    python -m bench.bench_accuracy --windows 40 --seed 7 --details out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_line(proc, needle: str, timeout_s: float) -> str:
    import select
    buf = b""
    end = time.monotonic() + timeout_s
    while needle.encode() not in buf:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"tracer did not start: {buf.decode(errors='replace')[-1500:]}")
        r, _, _ = select.select([proc.stderr], [], [], left)
        if r:
            buf += os.read(proc.stderr.fileno(), 65536)
    return buf.decode(errors="replace")


def score(windows: list, verdicts: list) -> dict:
    """Match each window to the verdict overlapping it most and score it (see module doc)."""
    from stallscope.sim.scenarios import FOLDER_CAUSES, NET_CAUSES
    out = {"windows": 0, "top1": 0, "false_blames": 0, "unexplained_when_explainable": 0,
           "missed": 0, "by_cause": {}, "details": []}
    other_pids = {w["other_pid"] for w in windows if w.get("other_pid")}
    other_files = {os.path.basename(w["other_path"]) for w in windows if w.get("other_path")}
    for v in verdicts:
        c = v.get("culprit")
        if c and (c.get("pid") in other_pids or os.path.basename(c.get("path") or "") in other_files
                  or os.path.basename(os.path.dirname(c.get("path") or "")) in other_files):
            out["false_blames"] += 1
    for w in windows:
        best, best_ov = None, 0
        for v in verdicts:
            ov = min(v["idle_end_ns"], w["end_ns"]) - max(v["idle_start_ns"], w["start_ns"])
            if ov > best_ov:
                best, best_ov = v, ov
        c = best.get("culprit") if best else None
        cause = w["cause"]
        if cause == "nothing":
            ok = best is not None and c is None and best.get("class") is None
        elif cause in ("compute", "worker_compute"):
            # nothing blocked: "unexplained", classed cpu_bound, naming the process that
            # computed; or, on a machine short of CPU, the trainer's own wait for a CPU
            ok = best is not None and (
                (c is None and best.get("class") == "cpu_bound"
                 and (best.get("process") or {}).get("pid") in w["pids"][-1:])
                or (c is not None and c.get("pid") in w["pids"] and c.get("op") == "runq"))
            if not ok and best is not None and c is None:
                out["unexplained_when_explainable"] += 1
        elif cause in NET_CAUSES:
            # nothing blocked: "unexplained", classed net_wait, naming the worker that waited
            ok = best is not None and c is None and best.get("class") == "net_wait" \
                and (best.get("process") or {}).get("pid") in w["pids"][-1:]
            if not ok and best is not None and c is None:
                out["unexplained_when_explainable"] += 1
        elif c is None:
            ok = False
            if best is None:
                out["missed"] += 1
            else:
                out["unexplained_when_explainable"] += 1
        elif cause == "cpu":
            ok = c.get("pid") in w["pids"] and c.get("op") == "runq"
        elif cause in FOLDER_CAUSES:     # any of the folder's files, or the folder
            p = c.get("path") or ""
            ok = c.get("pid") in w["pids"] and (p == w["path"] or os.path.dirname(p) == w["path"])
        else:
            ok = c.get("pid") in w["pids"] and \
                os.path.basename(c.get("path") or "") == os.path.basename(w["path"])
        out["windows"] += 1
        out["top1"] += ok
        bc = out["by_cause"].setdefault(cause, [0, 0])
        bc[0] += ok
        bc[1] += 1
        out["details"].append({"idx": w["idx"], "cause": cause, "dur_ms": w["dur_ms"], "ok": bool(ok),
                               "distractor": bool(w.get("other_path")),
                               "verdict": None if best is None else {
                                   k: best.get(k) for k in ("verdict", "explained_fraction", "class",
                                                            "process")},
                               "culprit": None if c is None else {
                                   k: c.get(k) for k in ("type", "op", "pid", "path", "count", "dur_ns")}})
    return out


def run(n_windows: int, seed: int, details: str | None = None, log=print, plan: list | None = None,
        trace_args: tuple = (), keep: bool = False) -> dict:
    """Run a plan (default: a random one of ``n_windows``) and score it. The result also names
    the recording (``rec``) and the distractor's pid, for tests that look inside."""
    from stallscope.sim import nvmlsim, scenarios
    from stallscope.sim.slowfs import DELAYABLE_OPS, SlowFS
    if os.geteuid() != 0:
        raise SystemExit("bench accuracy needs root (BPF, FUSE)")
    lib = nvmlsim.build()
    tmp = tempfile.mkdtemp(prefix="stallscope-accuracy-")
    state = nvmlsim.create_state(os.path.join(tmp, "sim.state"), n_gpus=1, period_ms=100)
    env = {**os.environ, "STALLSCOPE_NVMLSIM_STATE": state}
    plan = plan if plan is not None else scenarios.make_plan(n_windows, seed=seed)
    plan_path = os.path.join(tmp, "plan.json")
    gt_path = os.path.join(tmp, "truth.jsonl")
    rec = os.path.join(tmp, "rec.ssrec")
    scratch = os.path.join(tmp, "scratch")
    os.makedirs(scratch)
    json.dump(plan, open(plan_path, "w"))
    cpu = max(os.sched_getaffinity(0))
    flag = os.path.join(tmp, "hog.on")
    procs = []
    t0 = time.monotonic()
    with SlowFS(delay_ms=0, slow_prefix="\0none", ops=DELAYABLE_OPS) as fs:
        scenarios.prepare(fs, plan)
        cmd_r, cmd_w = os.pipe()             # trainer -> distractor: "cause path dur_ms"
        done_r, done_w = os.pipe()           # distractor -> trainer: "done"
        dis = subprocess.Popen([sys.executable, "-c", "import sys; from stallscope.sim.scenarios import "
                                "distractor_main; distractor_main(sys.argv[1:])", scratch],
                               stdin=cmd_r, stdout=done_w)
        procs.append(dis)
        os.close(cmd_r)
        os.close(done_w)
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(done_r, 1)
        dis_pid = json.loads(line)["pid"]
        hog = subprocess.Popen([sys.executable, "-c", "import sys; from stallscope.sim.scenarios import "
                                "hog_main; hog_main(sys.argv[1:])", str(cpu), flag], stdout=subprocess.PIPE,
                               text=True)
        procs.append(hog)
        hog_pid = json.loads(hog.stdout.readline())["pid"]
        tracer = subprocess.Popen([sys.executable, "-m", "stallscope", "trace", "--quiet", "--gpu", "--nvml-lib",
                                   lib, "--output", rec, *trace_args], env=env, stderr=subprocess.PIPE)
        procs.append(tracer)
        try:
            head = _wait_line(tracer, "stallscope: tracing", 120)
            log(f"accuracy: {n_windows} windows (seed {seed}); tracer: "
                + "; ".join(x for x in head.splitlines() if ":" in x)[-400:])
            trainer = subprocess.Popen(
                [sys.executable, "-m", "stallscope.sim.scenarios", "--state", state, "--plan", plan_path,
                 "--fs", fs.mountpoint, "--scratch", scratch, "--log", gt_path,
                 "--distractor-in", str(cmd_w), "--distractor-out", str(done_r),
                 "--distractor-pid", str(dis_pid), "--hog-flag", flag, "--hog-pid", str(hog_pid),
                 "--hog-cpu", str(cpu)], env=env, pass_fds=(cmd_w, done_r))
            os.close(cmd_w)
            os.close(done_r)
            rc = trainer.wait(timeout=60 + sum(w["dur_ms"] / 1000 + w["busy_s"] + 1 for w in plan) * 3)
            if rc != 0:
                raise RuntimeError(f"workload failed (exit {rc})")
            time.sleep(2.0)
        finally:
            tracer.send_signal(signal.SIGINT)
            try:
                tracer.wait(60)
            except subprocess.TimeoutExpired:
                tracer.kill()
            for p in procs[:2]:
                p.kill()
                p.wait()
    r = subprocess.run([sys.executable, "-m", "stallscope", "report", "--json", rec], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"report failed: {r.stderr[-1000:]}")
    verdicts = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    windows = [json.loads(x) for x in open(gt_path) if '"window"' in x]
    res = score(windows, verdicts)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["seed"] = seed
    res["distractors_done"] = sum(1 for w in windows if w.get("other_done"))
    res.update(rec=rec, distractor_pid=dis_pid, hog_pid=hog_pid, truth=windows, verdicts=verdicts)
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
        res["rec"] = None
    if details:
        with open(details, "w") as f:
            for d in res["details"]:
                f.write(json.dumps(d) + "\n")
    return res


def main(quick: bool = False, argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_accuracy")
    ap.add_argument("--windows", type=int, default=27 if quick else 108)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--details", default=None, help="write each window's verdict here (JSON lines)")
    a = ap.parse_args(argv if argv is not None else [])
    res = run(a.windows, a.seed, a.details, log=lambda m: print(m, file=sys.stderr, flush=True))
    n = res["windows"]
    out = {"bench": "accuracy", "windows": n, "top1": res["top1"],
           "top1_pct": round(100 * res["top1"] / max(n, 1), 1), "false_blames": res["false_blames"],
           "unexplained_when_explainable": res["unexplained_when_explainable"], "missed": res["missed"],
           "by_cause": {k: f"{a}/{b}" for k, (a, b) in sorted(res["by_cause"].items())},
           "distractors_done": res["distractors_done"], "seed": res["seed"], "wall_s": res["wall_s"]}
    print(json.dumps(out), flush=True)
    return res


if __name__ == "__main__":
    main(argv=sys.argv[1:])
