"""Tracer benchmarks (issue: node tracer). Run as root: `python -m bench tracer`.

Figures, each against a baseline measured in the same run:
  syscall_cost  ns per traced pread(2) below the threshold, as a ratio to a bare
                enter/exit tracepoint pair that only counts into a map
  drain         events/s that one core drains and decodes with every op emitted
                (threshold 0), with the kernel's lost counter; bytes per IO event
                on the wire (encoded batches)
  overflow      a deliberately tiny ring and no draining: emitted + lost must
                equal the number of calls exactly
  idle          CPU and RSS of `stallscope trace` when nothing is slow
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _readloop() -> str:
    exe = os.path.join(tempfile.gettempdir(), "stallscope-readloop")
    src = os.path.join(HERE, "readloop.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def _loop(n, path="/dev/zero", size=8) -> float:
    out = subprocess.run([_readloop(), path, str(n), str(size)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _setup():
    from stallscope.tracer import kernel
    kernel.require_root()
    kernel.import_bcc()
    kernel.tracefs_root()
    kernel.ensure_headers()


def _load_vfs(min_ns, pages=4096):
    from stallscope.tracer import probes
    cfg = probes.ProbeConfig(min_latency_ns=min_ns, families=("vfs",), attach="tracepoint", ringbuf_pages=pages)
    loaded, failed = probes.load(cfg)
    if not loaded:
        raise RuntimeError(f"vfs probe did not load: {failed}")
    return loaded[0]


def syscall_cost(n=1_000_000, reps=7) -> dict:
    from bcc import BPF
    _setup()
    _loop(200_000)                       # warm up
    res = {"none": [], "baseline": [], "timestamps_only": [], "stallscope": []}
    srcs = {}
    for name, fname in (("baseline", "baseline.bpf.c"), ("timestamps_only", "timestamps.bpf.c")):
        with open(os.path.join(HERE, fname)) as f:
            srcs[name] = f.read().encode()
    for _ in range(reps):
        res["none"].append(_loop(n))
        for name, src in srcs.items():
            b = BPF(text=src)
            res[name].append(_loop(n))
            b.cleanup()
        p = _load_vfs(10_000_000)
        res["stallscope"].append(_loop(n))
        assert p.counters()["below_threshold"] >= n
        p.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"bench": "syscall_cost", "calls": n, "reps": reps, "ns_per_call_median": med,
            "ns_per_call_runs": res,
            "ratio_to_baseline": round(med["stallscope"] / med["baseline"], 3),
            "added_ns_over_baseline": round(med["stallscope"] - med["baseline"], 1),
            "ratio_to_timestamps_only": round(med["stallscope"] / med["timestamps_only"], 3),
            "goal_ratio": 1.15}


def drain(n=2_000_000) -> dict:
    """Every pread of a regular file emitted (threshold 0); one Python thread drains,
    decodes and encodes batches; CPU time of that thread gives events/s per core."""

    from stallscope.tracer.agent import clock_mapping
    from stallscope.wire import codec, decode
    from stallscope.wire.schema import Batch, concat_tables
    _setup()
    p = _load_vfs(0)
    tmpf = tempfile.NamedTemporaryFile(prefix="stallscope-bench-", dir="/var/tmp", delete=False)
    tmpf.write(b"x" * 4096)
    tmpf.close()
    proc = subprocess.Popen([_readloop(), tmpf.name, str(n), "8"], stdout=subprocess.PIPE, text=True)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    got = 0
    wire = 0
    wire_events = 0
    parts = []
    last_batch = time.monotonic()
    try:
        while True:
            off, _ = clock_mapping()
            recs = p.drain()
            mine = recs[recs["pid"] == proc.pid] if len(recs) else recs
            got += len(mine)
            if len(recs):
                parts.append(decode.split(recs, off, {1: "tracepoint"}))
            now = time.monotonic()
            if now - last_batch >= 0.25 and parts:
                t = concat_tables("io", [x["io"] for x in parts if "io" in x])
                payload = codec.encode(Batch("bench", 0, {"io": t}))[0]
                wire += len(payload)
                wire_events += len(t["ts_ns"])
                parts = []
                last_batch = now
            if proc.poll() is not None and not len(recs):
                break
            if not len(recs):
                time.sleep(0.005)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - t0
        counters = p.counters()
    finally:
        p.close()
        os.unlink(tmpf.name)
    ns_call = float(proc.stdout.read().strip() or 0)
    return {"bench": "drain", "calls": n, "drained_for_pid": got, "lost_ringbuf": counters["lost_ringbuf"],
            "emitted": counters["emitted"], "consumer_cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "events_per_cpu_s": round(got / cpu) if cpu else None,
            "producer_ns_per_call": ns_call,
            "wire_bytes_per_io_event": round(wire / wire_events, 2) if wire_events else None,
            "goal_events_per_s": 500_000, "goal_wire_bytes": 32}


def overflow(n=300_000, pages=16) -> dict:
    """A 64 KiB ring that nobody drains while a filtered pid makes n emitted calls:
    the kernel must count every record it could not store (drained + lost == n)."""
    from stallscope.tracer import probes
    _setup()
    tmpf = tempfile.NamedTemporaryFile(prefix="stallscope-bench-", dir="/var/tmp", delete=False)
    tmpf.write(b"x" * 4096)
    tmpf.close()
    proc = subprocess.Popen([_readloop(), tmpf.name, str(n), "8", "--wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline().split()[1])
    cfg = probes.ProbeConfig(min_latency_ns=0, families=("vfs",), attach="tracepoint", ringbuf_pages=pages,
                             pid=pid)
    loaded, failed = probes.load(cfg)
    p = loaded[0]
    try:
        proc.stdin.write("g")
        proc.stdin.flush()
        proc.wait(timeout=300)
        recs = p.drain()
        c = p.counters()
    finally:
        p.close()
        os.unlink(tmpf.name)
    drained = int((recs["pid"] == pid).sum())
    return {"bench": "overflow", "calls": n, "ring_bytes": pages * 4096, "drained": drained,
            "emitted": c["emitted"], "lost_ringbuf": c["lost_ringbuf"],
            "exact": drained == c["emitted"] and drained + c["lost_ringbuf"] == n}


def idle(seconds=20) -> dict:
    """CPU and RSS of the real CLI when nothing is slow (after start-up)."""
    argv = [sys.executable, "-m", "stallscope", "trace", "--quiet", "--no-gpu", "--duration", str(seconds + 30)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    buf = ""
    deadline = time.time() + 90
    while "tracing stalls" not in buf and time.time() < deadline:
        buf += proc.stderr.readline()
    hz = os.sysconf("SC_CLK_TCK")

    def cpu():
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / hz
    time.sleep(2)
    c0, t0 = cpu(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu(), time.monotonic()
    with open(f"/proc/{proc.pid}/status") as f:
        st = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
    rss = st["VmRSS"]
    proc.terminate()
    proc.wait(timeout=30)
    return {"bench": "idle", "seconds": round(t1 - t0, 1), "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 2),
            "rss_mib": round(int(rss) / 1024, 1), "rss_anon_mib": round(int(st["RssAnon"]) / 1024, 1),
            "rss_file_mib": round(int(st["RssFile"]) / 1024, 1), "goal_cpu_percent": 1.0}


ALL = {"syscall_cost": syscall_cost, "drain": drain, "overflow": overflow, "idle": idle}


def main(names=None, quick=False):
    for name in names or ALL:
        fn = ALL[name]
        kw = {}
        if quick:
            kw = {"syscall_cost": {"n": 200_000, "reps": 2}, "drain": {"n": 300_000},
                  "overflow": {"n": 100_000}, "idle": {"seconds": 5}}[name]
        r = fn(**kw)
        r["machine"] = f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("-")] or None, quick="--quick" in sys.argv)
