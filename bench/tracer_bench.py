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
  sched_cost    ns per round trip of two processes ping-ponging a byte over pipes on one
                CPU (two context switches, two wakeups): no program, a bare sched_switch
                counter, the sched family with no owners and with both processes owners
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

    from stallscope.tracer import decode
    from stallscope.tracer.agent import clock_mapping
    from stallscope.wire import codec
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


def _pingpong_exe() -> str:
    exe = os.path.join(tempfile.gettempdir(), "stallscope-pingpong")
    src = os.path.join(HERE, "pingpong.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def _pingpong(n, cpu, owners=None) -> tuple:
    """(wall, CPU) ns per round trip; ``owners(pids)`` is called with both processes
    before they start."""
    if owners is None:
        out = subprocess.run([_pingpong_exe(), str(n), str(cpu)], capture_output=True, text=True, check=True)
        return tuple(float(x) for x in out.stdout.split())
    proc = subprocess.Popen([_pingpong_exe(), str(n), str(cpu), "--wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    _ready, parent, child = proc.stdout.readline().split()
    owners([int(parent), int(child)])
    proc.stdin.write("g")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return tuple(float(x) for x in out.split())


def _prog_stats(bpf) -> dict:
    """{program: (run_time_ns, run_cnt)} of a BCC object's loaded programs, from their fds'
    fdinfo (filled while kernel.bpf_stats_enabled is 1)."""
    out = {}
    for name, fn in bpf.funcs.items():
        info = {}
        try:
            with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    info[k.strip()] = v.strip()
        except OSError:
            continue
        if "run_cnt" in info:
            out[name.decode()] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return out


class _BpfStats:
    """kernel.bpf_stats_enabled = 1 for the block (the kernel then times every program run)."""
    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self):
        with open(self.PATH) as f:
            self.saved = f.read().strip()
        with open(self.PATH, "w") as f:
            f.write("1")

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(self.saved)


def _per_call(before: dict, after: dict) -> dict:
    """ns per run of each program that ran in between, and its run count."""
    out = {}
    for name, (t1, c1) in after.items():
        t0, c0 = before.get(name, (0, 0))
        if c1 > c0:
            short = name.replace("raw_tracepoint__", "")
            out[short] = {"ns_per_run": round((t1 - t0) / (c1 - c0), 1), "runs": c1 - c0}
    return out


def sched_cost(n=50_000, reps=15) -> dict:
    """The sched family on the hooks every context switch runs (sched_switch and
    sched_wakeup; user page faults too): filtered in the kernel to GPU owners, so with no
    owner among the ping-pong processes it should cost about what a bare counter costs;
    with both owners every switch is traced.

    Two measures. Per program run: the kernel's own BPF run-time statistics
    (kernel.bpf_stats_enabled), ns per run of each program during the ping-pong, which no
    other job of a shared machine disturbs. End to end: the CPU time of the two processes
    per round trip (two switches, two wakeups), minimum and median over repetitions in
    which the configurations take turns (wall medians too; on a shared machine the wall
    clock also counts other jobs on that CPU)."""
    from bcc import BPF

    from stallscope.tracer import probes
    from stallscope.tracer.families.sched import Runtime
    _setup()
    cpu = max(os.sched_getaffinity(0))
    _pingpong(n // 4, cpu)                       # warm up
    with open(os.path.join(HERE, "sched_counter.bpf.c")) as f:
        counter_src = f.read().encode()
    names = ("none", "bare_counter", "sched_no_owners", "sched_owners")
    res = {k: [] for k in names}
    runs = {k: [] for k in names[1:]}
    switches = 0
    with _BpfStats():
        for _ in range(reps):
            res["none"].append(_pingpong(n, cpu))
            b = BPF(text=counter_src)
            s0 = _prog_stats(b)
            res["bare_counter"].append(_pingpong(n, cpu))
            runs["bare_counter"].append(_per_call(s0, _prog_stats(b)))
            switches = int(b[b"switches"][0].value)
            b.cleanup()
            loaded, failed = probes.load(probes.ProbeConfig(families=("sched",)))
            if not loaded:
                raise RuntimeError(f"sched probe did not load: {failed}")
            p = loaded[0]
            rt = Runtime(p.bpf, 10_000_000)
            s0 = _prog_stats(p.bpf)
            res["sched_no_owners"].append(_pingpong(n, cpu))
            s1 = _prog_stats(p.bpf)
            res["sched_owners"].append(_pingpong(n, cpu, owners=rt.add_owners))
            runs["sched_no_owners"].append(_per_call(s0, s1))
            runs["sched_owners"].append(_per_call(s1, _prog_stats(p.bpf)))
            p.drain()
            p.close()
    cpu_med = {k: statistics.median(c for _w, c in v) for k, v in res.items()}
    cpu_min = {k: min(c for _w, c in v) for k, v in res.items()}
    wall_med = {k: statistics.median(w for w, _c in v) for k, v in res.items()}
    per_run = {}
    for k, rs in runs.items():
        progs = sorted({p for r in rs for p in r})
        per_run[k] = {p: round(statistics.median(r[p]["ns_per_run"] for r in rs if p in r), 1)
                      for p in progs}

    def ratios(m):
        return {"no_owners_to_bare_counter": round(m["sched_no_owners"] / m["bare_counter"], 3),
                "owners_to_bare_counter": round(m["sched_owners"] / m["bare_counter"], 3),
                "bare_counter_to_none": round(m["bare_counter"] / m["none"], 3),
                "added_ns_no_owners_over_bare": round(m["sched_no_owners"] - m["bare_counter"], 1),
                "added_ns_owners_over_bare": round(m["sched_owners"] - m["bare_counter"], 1)}
    sw = per_run["bare_counter"].get("sched_switch", 0) or 1
    return {"bench": "sched_cost", "round_trips": n, "reps": reps, "cpu": cpu,
            "bpf_ns_per_run_median": per_run,
            "sched_switch_ratio_to_bare_counter": {
                k: round(per_run[k].get("sched_switch", 0) / sw, 2) for k in ("sched_no_owners", "sched_owners")},
            "cpu_ns_per_round_trip_min": cpu_min, "cpu_ns_per_round_trip_median": cpu_med,
            "wall_ns_per_round_trip_median": wall_med, "ratios_min": ratios(cpu_min),
            "ratios_median": ratios(cpu_med), "runs_wall_cpu": res, "runs_bpf": runs,
            "switches_seen_by_counter": switches}


ALL = {"syscall_cost": syscall_cost, "drain": drain, "overflow": overflow, "idle": idle,
       "sched_cost": sched_cost}


def main(names=None, quick=False):
    for name in names or ALL:
        fn = ALL[name]
        kw = {}
        if quick:
            kw = {"syscall_cost": {"n": 200_000, "reps": 2}, "drain": {"n": 300_000},
                  "overflow": {"n": 100_000}, "idle": {"seconds": 5},
                  "sched_cost": {"n": 20_000, "reps": 3}}[name]
        r = fn(**kw)
        r["machine"] = f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("-")] or None, quick="--quick" in sys.argv)
