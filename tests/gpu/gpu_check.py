"""gpu tier, Part B: a real CUDA workload (torch) starved by an injected IO stall, on a real GPU.

Needs BPF (bpf(), BTF), BCC, pyzmq and FUSE besides the GPU, as root; tests/gpu/run.sh runs
it only where `nvml_check.py --bpf-gate` says all are there (not on the project's GPU test
machine, whose image has no BCC).  The NVML side alone is Part A, tests/gpu/nvml_check.py.
Checks that the verdict for the stalled read's idle interval names that read.  Prints one
JSON object; exit 0 on pass.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


WORKLOAD = r"""
import os, sys, time, json, torch
data, log = sys.argv[1], sys.argv[2]
x = torch.randn(8192, 8192, device="cuda")
def compute(sec):
    t = time.time()
    while time.time() - t < sec:
        y = x @ x
        torch.cuda.synchronize()
compute(3.0)
ev = []
for step in range(4):
    name = "slow-shard.bin" if step == 2 else "shard.bin"
    t0 = time.time_ns()
    with open(os.path.join(data, name), "rb", buffering=0) as f:
        f.read(65536)
    ev.append({"kind": "read", "path": os.path.join(data, name), "pid": os.getpid(),
               "start_ns": t0, "end_ns": time.time_ns()})
    compute(2.0)
json.dump(ev, open(log, "w"))
"""


def main():
    report = {"ok": False}
    try:
        import torch
        assert torch.cuda.is_available(), "torch sees no CUDA device"
    except Exception as e:
        report["error"] = f"torch with CUDA is needed for the gpu tier: {e}"
        print(json.dumps(report))
        return 1
    from stallscope.sim.slowfs import SlowFS
    tmp = tempfile.mkdtemp(prefix="stallscope-gpu-")
    rec = os.path.join(tmp, "rec.ssrec")
    log = os.path.join(tmp, "gt.json")
    with SlowFS(delay_ms=3000, ops=("read",)) as fs:
        fs.make_file("shard.bin", 1 << 20)
        fs.make_file("slow-shard.bin", 1 << 20)
        tr = subprocess.Popen([sys.executable, "-m", "stallscope", "trace", "--quiet", "--gpu", "--families",
                               "vfs", "--min-latency-ms", "100", "--output", rec], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
        buf = ""
        while "tracing stalls" not in buf:
            line = tr.stderr.readline()
            if not line:
                report["error"] = f"tracer failed: {buf[-2000:]}"
                print(json.dumps(report))
                return 1
            buf += line
        w = subprocess.run([sys.executable, "-c", WORKLOAD, fs.mountpoint, log], capture_output=True, text=True)
        time.sleep(3)
        tr.terminate()
        tr.wait(60)
    if w.returncode != 0:
        report["error"] = f"workload failed: {w.stderr[-2000:]}"
        print(json.dumps(report))
        return 1
    gt = json.load(open(log))
    slow = next(e for e in gt if "slow-" in e["path"])
    r = subprocess.run([sys.executable, "-m", "stallscope", "report", "--json", rec], cwd=ROOT,
                       capture_output=True, text=True)
    vs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    hit = [v for v in vs if v["idle_start_ns"] < slow["end_ns"] and v["idle_end_ns"] > slow["start_ns"]]
    report["verdicts"] = len(vs)
    report["slow_read_ms"] = (slow["end_ns"] - slow["start_ns"]) / 1e6
    report["verdict"] = hit[0] if hit else None
    report["ok"] = bool(hit) and hit[0]["culprit"] is not None and hit[0]["culprit"]["path"] == slow["path"] \
        and hit[0]["explained_fraction"] >= 0.8
    print(json.dumps(report, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
