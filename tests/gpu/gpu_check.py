"""gpu tier, Part B: real CUDA workloads (torch) starved by an injected IO stall, on a real GPU.

Needs BPF (bpf(), BTF), BCC, pyzmq and FUSE besides the GPU, as root; tests/gpu/run.sh runs
it only where `nvml_check.py --bpf-gate` says all are there (on the project's GPU test
machine, whose image has no BCC, with the bundle tests/gpu/bundle.sh builds).  The NVML side
alone is Part A, tests/gpu/nvml_check.py.  Three scenarios, each with its own tracer:

* ``read``: the training process itself reads a shard between compute phases; one read
  stalls 3 s (SlowFS). Traced with ``--families vfs``.
* ``dataloader``: a real ``torch.utils.data.DataLoader`` (2 worker processes, prefetch 2)
  whose Dataset reads 64 KiB shards; in the first of two epochs one item's read stalls 3 s
  in a worker, the trainer waits for it in order and the GPU idles; the workers exit at the
  end of that epoch (short-lived, as without ``persistent_workers``). Traced as users run
  it: the default families.

* ``cpu_worker``: a ``DataLoader`` with one persistent worker that spends 1.5 s of CPU on
  each of 5 items (a CPU-bound transform; nothing stalls) while the loop computes 0.25 s on
  the GPU, so the GPU waits about 1.25 s per batch. The default families.

``read`` and ``dataloader`` check that the verdict for the idle interval around the stalled
read names that read (its path, and the pid of the process that made it: the worker, not
the trainer) and explains >= 80% of the interval; ``dataloader`` also that the idle
intervals at the run's two ends are named as the trainer's start-up and exit (classes
process_start, process_exit). ``cpu_worker`` checks that each wait of the loop after the
first is "unexplained", classed cpu_bound, naming the worker (the trainer spins in CUDA's
synchronization while the GPU computes: its CPU share in the busy phases must not leak into
the judgement). Prints one JSON object per scenario and a summary; exit 0 when all pass.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


# both workloads: argv (the data folder, the ground-truth log), the GPU busy 3 s first
_PRELUDE = r"""
import json, os, sys, time, torch
data, log = sys.argv[1], sys.argv[2]
x = torch.randn(8192, 8192, device="cuda")
def compute(sec):
    t = time.time()
    while time.time() - t < sec:
        y = x @ x
        torch.cuda.synchronize()
compute(3.0)
"""

READ_WORKLOAD = _PRELUDE + r"""
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

DATALOADER_WORKLOAD = _PRELUDE + r"""
from torch.utils.data import DataLoader, Dataset
SLOW_ITEM = 10          # epoch 0 only; with 2 workers, worker 0 loads the even items

class Shards(Dataset):
    def __init__(self):
        self.epoch = 0
    def __len__(self):
        return 16
    def __getitem__(self, i):
        name = "slow-shard.bin" if (self.epoch == 0 and i == SLOW_ITEM) else f"shard-{i % 4}.bin"
        path = os.path.join(data, name)
        t0 = time.time_ns()
        with open(path, "rb", buffering=0) as f:
            buf = f.read(65536)
        rec = {"kind": "read", "path": path, "pid": os.getpid(), "ppid": os.getppid(), "item": i,
               "epoch": self.epoch, "start_ns": t0, "end_ns": time.time_ns()}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return torch.frombuffer(bytearray(buf[:64]), dtype=torch.uint8).float()

ds = Shards()
for epoch in range(2):
    ds.epoch = epoch    # the workers fork with it at the epoch's start
    for batch in DataLoader(ds, batch_size=1, num_workers=2, prefetch_factor=2):
        batch = batch.cuda()
        compute(0.25)
compute(2.0)
with open(log, "a") as f:
    f.write(json.dumps({"kind": "trainer", "pid": os.getpid()}) + "\n")
"""

CPU_WORKER_WORKLOAD = _PRELUDE + r"""
from torch.utils.data import DataLoader, Dataset

class Decoded(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        t0 = time.time_ns()
        end = time.thread_time() + 1.5      # decode/augment: CPU only
        while time.thread_time() < end:
            pass
        with open(log, "a") as f:
            f.write(json.dumps({"kind": "item", "pid": os.getpid(), "item": i, "start_ns": t0,
                                "end_ns": time.time_ns()}) + "\n")
        return torch.zeros(64)

it = iter(DataLoader(Decoded(), batch_size=1, num_workers=1, persistent_workers=True, prefetch_factor=2))
for _ in range(6):
    t0 = time.time_ns()
    batch = next(it)
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "wait", "start_ns": t0, "end_ns": time.time_ns()}) + "\n")
    batch = batch.cuda()
    compute(0.25)
compute(2.0)
with open(log, "a") as f:
    f.write(json.dumps({"kind": "trainer", "pid": os.getpid()}) + "\n")
"""


def _trace_and_run(name: str, workload: str, files: list, tracer_args: list, tmp: str) -> dict:
    """SlowFS (reads of slow-* stall 3 s) with ``files``, a tracer, the workload; then the
    offline report of the recording. Returns the ground truth and the verdicts."""
    from stallscope.sim.slowfs import SlowFS
    rec = os.path.join(tmp, f"{name}.ssrec")
    log = os.path.join(tmp, f"{name}-gt.json")
    with SlowFS(delay_ms=3000, ops=("read",)) as fs:
        for f in files:
            fs.make_file(f, 1 << 20)
        tr = subprocess.Popen([sys.executable, "-m", "stallscope", "trace", "--quiet", "--gpu",
                               "--min-latency-ms", "100", "--output", rec, *tracer_args], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
        buf = ""
        while "tracing stalls" not in buf:
            line = tr.stderr.readline()
            if not line:
                return {"error": f"tracer failed: {buf[-2000:]}"}
            buf += line
        t0, start_ns = time.monotonic(), time.time_ns()
        w = subprocess.run([sys.executable, "-c", workload, fs.mountpoint, log], capture_output=True, text=True)
        wall = time.monotonic() - t0
        time.sleep(3)
        tr.terminate()
        _, err = tr.communicate(timeout=60)
    if w.returncode != 0:
        return {"error": f"workload failed: {w.stderr[-2000:]}"}
    text = open(log).read()
    gt = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    r = subprocess.run([sys.executable, "-m", "stallscope", "report", "--json", rec], cwd=ROOT,
                       capture_output=True, text=True)
    vs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    return {"gt": gt, "verdicts": vs, "workload_s": round(wall, 1), "start_ns": start_ns,
            "tracer_log": (buf + err)[-1500:]}


def _brief(v: dict, start_ns: int) -> dict:
    """One verdict in a line: its interval in seconds from the workload's start, and why."""
    c = v.get("culprit") or {}
    return {"from_s": round((v["idle_start_ns"] - start_ns) / 1e9, 2), "to_s": round((v["idle_end_ns"] - start_ns) / 1e9, 2),
            "verdict": v["verdict"], "class": v.get("class"), "process": v.get("process"),
            "explained": round(v.get("explained_fraction") or 0, 3),
            "open": [v.get("open_start"), v.get("open")], "gpu_pids": v.get("gpu_pids"),
            "culprit": f"{c.get('comm')} {c.get('op')} {os.path.basename(c.get('path') or '')}" if c else None,
            "contributors": len(v.get("contributors") or [])}


def _judge(name: str, run: dict, edges_named: bool = False) -> dict:
    """The verdict whose idle interval overlaps the stalled read must name it; with
    ``edges_named``, the first and last intervals are the trainer's start-up and exit."""
    out = {"scenario": name, "ok": False}
    if "error" in run:
        out["error"] = run["error"]
        return out
    slow = next(e for e in run["gt"] if e.get("kind") == "read" and "slow-" in e["path"])
    trainer = next((e["pid"] for e in run["gt"] if e.get("kind") == "trainer"), slow["pid"])
    hit = [v for v in run["verdicts"] if v["idle_start_ns"] < slow["end_ns"] and v["idle_end_ns"] > slow["start_ns"]]
    c = hit[0]["culprit"] if hit else None
    out.update({"verdicts": len(run["verdicts"]), "verdict_kinds": sorted(v["verdict"] for v in run["verdicts"]),
                "slow_read_ms": round((slow["end_ns"] - slow["start_ns"]) / 1e6, 1), "reader_pid": slow["pid"],
                "trainer_pid": trainer, "workload_s": run["workload_s"],
                "all": [_brief(v, run["start_ns"]) for v in run["verdicts"]],
                "verdict": hit[0] if hit else None})
    out["ok"] = bool(hit) and c is not None and c.get("path") == slow["path"] and c.get("pid") == slow["pid"] \
        and hit[0]["explained_fraction"] >= 0.8
    # the run's own edges: GPU idle before its first work and after its last; with the
    # default families (sched: exit times) both are named (analysis/verdict.py lifecycle)
    vs = sorted(run["verdicts"], key=lambda v: v["idle_start_ns"])
    out["edges"] = [vs[0].get("class"), vs[-1].get("class")] if vs else []
    if edges_named:
        out["ok"] = out["ok"] and out["edges"] == ["process_start", "process_exit"]
    if not out["ok"]:
        out["tracer_log"] = run["tracer_log"]
    return out


def _judge_cpu(name: str, run: dict) -> dict:
    """Each wait of the loop after the first (the worker's start-up) lasting >= 0.8 s: the
    verdict overlapping it most is "unexplained", classed cpu_bound, naming the worker."""
    out = {"scenario": name, "ok": False}
    if "error" in run:
        out["error"] = run["error"]
        return out
    worker = {e["pid"] for e in run["gt"] if e.get("kind") == "item"}
    trainer = next((e["pid"] for e in run["gt"] if e.get("kind") == "trainer"), None)
    waits = [e for e in run["gt"] if e.get("kind") == "wait"][1:]
    waits = [w for w in waits if w["end_ns"] - w["start_ns"] >= 800_000_000]
    got = []
    for w in waits:
        over = [v for v in run["verdicts"] if v["idle_start_ns"] < w["end_ns"] and v["idle_end_ns"] > w["start_ns"]]
        v = max(over, key=lambda v: min(v["idle_end_ns"], w["end_ns"]) - max(v["idle_start_ns"], w["start_ns"]),
                default=None)
        got.append(None if v is None else (v["verdict"], v.get("class"), (v.get("process") or {}).get("pid"),
                                           (v.get("process") or {}).get("share")))
    out.update({"worker_pids": sorted(worker), "trainer_pid": trainer, "workload_s": run["workload_s"],
                "waits": [round((w["end_ns"] - w["start_ns"]) / 1e6) for w in waits], "got": got,
                "all": [_brief(v, run["start_ns"]) for v in run["verdicts"]]})
    out["ok"] = len(worker) == 1 and len(waits) >= 3 and all(
        g is not None and g[:3] == ("unexplained", "cpu_bound", next(iter(worker))) for g in got)
    if not out["ok"]:
        out["tracer_log"] = run.get("tracer_log", "")
    return out


def main():
    try:
        import torch
        assert torch.cuda.is_available(), "torch sees no CUDA device"
    except Exception as e:
        print(json.dumps({"ok": False, "error": f"torch with CUDA is needed for the gpu tier: {e}"}))
        return 1
    tmp = tempfile.mkdtemp(prefix="stallscope-gpu-")
    results = [
        _judge("read", _trace_and_run("read", READ_WORKLOAD, ["shard.bin", "slow-shard.bin"],
                                      ["--families", "vfs"], tmp)),
        _judge("dataloader", _trace_and_run("dataloader", DATALOADER_WORKLOAD,
                                            [f"shard-{i}.bin" for i in range(4)] + ["slow-shard.bin"], [], tmp),
               edges_named=True),
        _judge_cpu("cpu_worker", _trace_and_run("cpu_worker", CPU_WORKER_WORKLOAD, [], [], tmp)),
    ]
    for r in results:
        print(json.dumps(r, default=str))
    ok = all(r["ok"] for r in results)
    print(json.dumps({"ok": ok, "scenarios": {r["scenario"]: r["ok"] for r in results}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
