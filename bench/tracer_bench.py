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


def _loop(n, path="/dev/zero", size=8, env=None) -> float:
    out = subprocess.run([_readloop(), path, str(n), str(size)], capture_output=True, text=True, check=True,
                         env=env)
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


def close_cost(n=500_000, reps=5) -> dict:
    """What tracing close() adds (bpf/vfs.bpf.c: the fd -> file walk at entry, a slot at
    exit): a C loop of dup() + close() of a regular file, below the threshold as nearly
    every close is, with the VFS family loaded (its syscall tracepoints, as on this host)
    against the same loop unprobed in the same run. ns per dup + close pair."""
    _setup()
    path, env, cleanup = _files(0)
    env = dict(env, READLOOP_CLOSE="1")
    try:
        _loop(200_000, path, env=env)                # warm up
        res: dict = {"none": [], "stallscope": []}
        for _ in range(reps):
            res["none"].append(_loop(n, path, env=env))
            p = _load_vfs(10_000_000)
            res["stallscope"].append(_loop(n, path, env=env))
            p.close()
    finally:
        cleanup()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"bench": "close_cost", "calls": n, "reps": reps, "ns_per_call_median": med,
            "ns_per_call_runs": res, "added_ns": round(med["stallscope"] - med["none"], 1),
            "ratio_to_none": round(med["stallscope"] / med["none"], 3)}


def _files(n_files: int) -> tuple:
    """(readloop FILE argument, env, cleanup) for n_files 4 KiB files (0: one file)."""
    d = tempfile.mkdtemp(prefix="stallscope-bench-", dir="/var/tmp")
    names = [os.path.join(d, f"f.{i}") for i in range(max(n_files, 1))] if n_files else [os.path.join(d, "f")]
    for nm in names:
        with open(nm, "wb") as f:
            f.write(b"x" * 4096)
    env = dict(os.environ, READLOOP_FILES=str(n_files)) if n_files else dict(os.environ)
    return os.path.join(d, "f"), env, lambda: subprocess.run(["rm", "-rf", d], check=False)


def _producer(n, n_files):
    """A readloop waiting to start: (proc, pid, cleanup)."""
    path, env, cleanup = _files(n_files)
    proc = subprocess.Popen([_readloop(), path, str(n), "8", "--wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    pid = int(proc.stdout.readline().split()[1])
    return proc, pid, cleanup


def _go(proc):
    proc.stdin.write("g")
    proc.stdin.flush()


def _agent(min_ns, pid=0, pages=4096, shed=False, sink=None):
    """The real node agent (tracer/agent.py) with the vfs family only, no GPU."""
    from stallscope.tracer import probes
    from stallscope.tracer.agent import Agent, AgentConfig
    cfg = AgentConfig(probe=probes.ProbeConfig(min_latency_ns=min_ns, pid=pid, families=("vfs",),
                                               attach="tracepoint", ringbuf_pages=pages),
                      gpu="off", shed=shed)
    ag = Agent(cfg, [sink or (lambda b: None)], log=lambda m: None)
    ag.start()
    return ag


def _cpu_stat() -> list:
    """The machine's CPU time by kind, from /proc/stat (user nice system idle iowait irq
    softirq steal ...), in ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _machine_share(before: list, after: list) -> dict:
    """What else the machine did during a run: busy and steal (the hypervisor ran someone
    else on our vCPUs) as % of all CPU time, so a noisy figure can be told from a slow one."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    return {"busy_pct": round(100 * (total - d[3] - d[4]) / total, 1), "steal_pct": round(100 * d[7] / total, 1)}


def _drain_once(n, n_files, mode) -> dict:
    """One run: the producer traced at threshold 0 (only its pid, so the rest of a shared
    machine does not enter), drained by ``mode``: "agent" = the node agent's own loop (drain
    every poll_ms, decode, a batch every batch_ms encoded with the wire codec), "copy" = the
    ring copy alone in the same loop (the baseline)."""
    from stallscope.wire import codec
    proc, pid, cleanup = _producer(n, n_files)
    wire = [0, 0]

    def sink(batch):
        wire[0] += len(codec.encode(batch)[0])
        wire[1] += batch.n_events()
    ag = _agent(0, pid=pid, sink=sink)
    p = ag.loaded[0]
    try:
        _go(proc)
        st0 = _cpu_stat()
        c0, t0 = time.thread_time(), time.monotonic()
        got = 0
        if mode == "agent":
            ag.run(stop=lambda: proc.poll() is not None and ag._drained == 0)
            got = ag.events_out
        else:
            while True:
                recs = p.drain()
                got += len(recs)
                if proc.poll() is not None and not len(recs):
                    break
                time.sleep(ag.cfg.poll_ms / 1000 if len(recs) else ag.cfg.idle_poll_ms / 1000)
        cpu = time.thread_time() - c0
        wall = time.monotonic() - t0
        machine = _machine_share(st0, _cpu_stat())
        c = p.counters()
    finally:
        ag.close()
        cleanup()
    ns_call = float(proc.stdout.read().strip() or 0)
    offered = c["emitted"] + c["lost_ringbuf"]
    return {"events": got, "emitted": c["emitted"], "lost_ringbuf": c["lost_ringbuf"],
            "ringbuf_retry_saved": c["ringbuf_retry_saved"],
            "loss_fraction": round(c["lost_ringbuf"] / offered, 4) if offered else None,
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "events_per_cpu_s": round(got / cpu) if cpu else None,
            "producer_ns_per_call": ns_call,
            "offered_per_s": round(1e9 / ns_call) if ns_call else None,
            "wire_bytes_per_event": round(wire[0] / wire[1], 2) if wire[1] else None, **machine}


def drain(n=1_000_000, reps=3, n_files=(0, 16)) -> dict:
    """Events per CPU-second of the node agent's own drain loop (ring copy, decode, batch,
    wire encode) with every op of a C pread loop emitted (threshold 0), and the ring's lost
    counter at the rate that producer offers. Workloads: one file, and 16 files read round
    robin (no two records in a row alike: the worst case for the run-length interning).
    Baselines, same run: the producer untraced (ns per call) and the ring copy alone."""
    _setup()
    path, _env, cleanup = _files(0)
    try:
        untraced = statistics.median(_loop(n // 4, path) for _ in range(3))
    finally:
        cleanup()
    out = {"bench": "drain", "calls": n, "reps": reps, "producer_untraced_ns_per_call": untraced,
           "goal_events_per_cpu_s": 1_000_000, "workloads": {}}
    for nf in n_files:
        runs = {"agent": [], "copy": []}
        for _ in range(reps):
            runs["copy"].append(_drain_once(n, nf, "copy"))
            runs["agent"].append(_drain_once(n, nf, "agent"))
        med = {k: statistics.median(r["events_per_cpu_s"] for r in v) for k, v in runs.items()}
        w = {"events_per_cpu_s_median": med["agent"],
             "events_per_cpu_s_runs": [r["events_per_cpu_s"] for r in runs["agent"]],
             "baseline_copy_only_events_per_cpu_s_median": med["copy"],
             "ratio_to_copy_only": round(med["agent"] / med["copy"], 3),
             "lost_ringbuf_runs": [r["lost_ringbuf"] for r in runs["agent"]],
             "ringbuf_retry_saved_runs": [r["ringbuf_retry_saved"] for r in runs["agent"]],
             "offered_per_s_runs": [r["offered_per_s"] for r in runs["agent"]],
             "wire_bytes_per_event_runs": [r["wire_bytes_per_event"] for r in runs["agent"]],
             "machine_busy_pct_runs": [r["busy_pct"] for r in runs["agent"]],
             "steal_pct_runs": [r["steal_pct"] for r in runs["agent"]],
             "runs": runs}
        out["workloads"]["one_file" if not nf else f"{nf}_files_round_robin"] = w
    return out


def shed(n=1_500_000, pages=64, delay_ms=30, slow_reads=20) -> dict:
    """Overload on purpose: a 256 KiB ring (~990 records) drained every 10 ms by the node
    agent while a C loop offers a few hundred thousand preads a second at threshold 0, and a
    thread reads a FUSE file that stalls ``delay_ms`` per read ``slow_reads`` times. With
    shedding (the default) the agent raises the in-kernel threshold until the ring keeps up,
    and says so in the batches; the baseline, in the same run, is the same load with
    shedding off (records lost to whichever happen to meet a full ring). The figure that
    matters: how many of the long stalls each keeps."""
    import threading

    from stallscope.sim.slowfs import SlowFS
    _setup()
    res = {}
    with SlowFS(delay_ms=delay_ms, slow_prefix="slow") as fs:
        fs.make_file("slow.bin", 1 << 16)
        slow_path = fs.path("slow.bin")
        for mode in ("shed_off", "shed_on"):
            batches = []
            ag = _agent(0, pages=pages, shed=(mode == "shed_on"), sink=batches.append)
            path, env, cleanup = _files(0)
            proc = subprocess.Popen([_readloop(), path, str(n), "8"], stdout=subprocess.PIPE, text=True, env=env)

            def slow_reader():
                time.sleep(0.3)
                fd = os.open(slow_path, os.O_RDONLY)     # direct_io on SlowFS: every read stalls
                try:
                    for _ in range(slow_reads):
                        os.pread(fd, 4096, 0)
                        time.sleep(0.02)
                finally:
                    os.close(fd)
            th = threading.Thread(target=slow_reader)
            th.start()
            try:
                ag.run(stop=lambda: proc.poll() is not None and not th.is_alive())
            finally:
                th.join()
                p = ag.loaded[0]
                c = p.counters()
                sh = ag.shedders.get("vfs")
                shed_n = sh.counters(p)["vfs.shed"] if sh else 0
                ag.close()
                cleanup()
            proc.wait()
            kept = 0
            announced = 0
            peak = 0
            for b in batches:
                io = b.tables.get("io")
                if b.meta.get("shed"):
                    announced += 1
                    peak = max(peak, b.meta["shed"]["vfs"]["min_ns"])
                if io is not None and len(io["path"]):
                    kept += int(sum(1 for pth, d in zip(io["path"], io["dur_ns"])
                                    if pth == slow_path and d >= delay_ms * 1_000_000 * 0.9))
            offered = c["emitted"] + c["lost_ringbuf"] + shed_n
            res[mode] = {"offered": offered, "emitted": c["emitted"], "lost_ringbuf": c["lost_ringbuf"],
                         "shed": shed_n, "shed_fraction": round(shed_n / offered, 4) if offered else None,
                         "lost_fraction": round(c["lost_ringbuf"] / offered, 4) if offered else None,
                         "long_stalls_kept": kept, "long_stalls_made": slow_reads,
                         "batches_announcing_shed": announced, "batches": len(batches),
                         "peak_threshold_ms": round(peak / 1e6, 3),
                         "raises": sh.raises if sh else 0}
    return {"bench": "shed", "ring_bytes": pages * 4096, "calls": n, "slow_delay_ms": delay_ms, **res}


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


def _idle_run(seconds, extra, env, rec):
    """CPU (every thread of the process, and any children) and RSS of `stallscope trace`
    after start-up, and the bytes it recorded (what it would send) over the interval."""
    argv = [sys.executable, "-m", "stallscope", "trace", "--quiet", "--output", rec,
            "--duration", str(seconds + 30), *extra]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    buf = ""
    deadline = time.time() + 120
    while "tracing stalls" not in buf and time.time() < deadline and proc.poll() is None:
        buf += proc.stderr.readline()
    hz = os.sysconf("SC_CLK_TCK")

    def cpu():
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / hz      # utime stime cutime cstime
    time.sleep(2)
    c0, t0, b0 = cpu(), time.monotonic(), os.path.getsize(rec)
    time.sleep(seconds)
    c1, t1, b1 = cpu(), time.monotonic(), os.path.getsize(rec)
    with open(f"/proc/{proc.pid}/status") as f:
        st = {line.split(":")[0]: line.split()[1] for line in f
              if line.startswith(("VmRSS", "RssAnon", "RssFile", "Threads"))}
    proc.terminate()
    proc.wait(timeout=30)
    return {"seconds": round(t1 - t0, 1), "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 2),
            "threads": int(st["Threads"]), "rss_mib": round(int(st["VmRSS"]) / 1024, 1),
            "rss_anon_mib": round(int(st["RssAnon"]) / 1024, 1),
            "recorded_bytes_per_hour": round((b1 - b0) * 3600 / (t1 - t0))}


def idle(seconds=15) -> dict:
    """The real CLI when nothing is slow, every default family loaded, polling NVML of 8
    simulated GPUs (sim/nvmlsim, 100 ms sample period), CPU of all its threads. Baseline, same
    run: the same with --no-gpu. Also what it records per hour (heartbeats and GPU samples)."""
    from stallscope.sim import nvmlsim
    lib = nvmlsim.build()
    d = tempfile.mkdtemp(prefix="stallscope-bench-")
    state = nvmlsim.create_state(os.path.join(d, "sim.state"), n_gpus=8, period_ms=100)
    env = dict(os.environ, **{nvmlsim.STATE_ENV: state})
    try:
        gpu = _idle_run(seconds, ["--nvml-lib", lib, "--gpu"], env, os.path.join(d, "gpu.ssrec"))
        base = _idle_run(seconds, ["--no-gpu"], env, os.path.join(d, "nogpu.ssrec"))
    finally:
        subprocess.run(["rm", "-rf", d], check=False)
    return {"bench": "idle", "gpus_simulated": 8, **gpu, "baseline_no_gpu": base,
            "cpu_ratio_to_no_gpu": round(gpu["cpu_percent_of_one_core"] /
                                         max(base["cpu_percent_of_one_core"], 0.01), 2),
            "goal_cpu_percent": 1.0}


def _exe(name: str) -> str:
    exe = os.path.join(tempfile.gettempdir(), f"stallscope-{name}")
    src = os.path.join(HERE, f"{name}.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


UPROBE_PROG = b"""
BPF_ARRAY(hits, u64, 1);
int on_call(struct pt_regs *ctx) { int z = 0; u64 *c = hits.lookup(&z); if (c) __sync_fetch_and_add(c, 1); return 0; }
"""


def uprobe_cost(n=200_000, reps=5) -> dict:
    """ns per call of a 3-instruction function: no probe (baseline), a uprobe (counting
    program) on an instruction the x86 kernel emulates (`push %rbp`, one trap), and on one it
    must single-step out of line (`mov`, two traps), in turns within the same run. Why the
    tracer puts uprobes only where a call is already slow (RDMA verbs waits, TLS reads)."""
    from bcc import BPF
    _setup()
    exe = _exe("uprobe_target")

    def call(which):
        out = subprocess.run([exe, str(n), which], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[0])
    res = {"none": [], "emulated": [], "single_stepped": []}
    hits = 0
    for _ in range(reps):
        res["none"].append(call("emul"))
        for key, sym, which in (("emulated", "f_emul", "emul"), ("single_stepped", "f_step", "step")):
            b = BPF(text=UPROBE_PROG)
            b.attach_uprobe(name=exe, sym=sym, fn_name="on_call")
            res[key].append(call(which))
            hits += int(b[b"hits"][0].value)
            b.cleanup()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"bench": "uprobe_cost", "calls": n, "reps": reps, "ns_per_call_median": med, "ns_per_call_runs": res,
            "added_ns_emulated": round(med["emulated"] - med["none"], 1),
            "added_ns_single_stepped": round(med["single_stepped"] - med["none"], 1),
            "single_stepped_to_emulated": round((med["single_stepped"] - med["none"]) /
                                                max(med["emulated"] - med["none"], 1e-9), 2),
            "probe_hits": hits, "hits_expected": 2 * n * reps}


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


def _dd_direct(dev: str, n: int) -> float:
    """Wall seconds of ``n`` O_DIRECT 4 KiB reads of ``dev`` by dd: one request each."""
    t = time.perf_counter()
    subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4096", f"count={n}", "iflag=direct"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def block_cost(n=40_000, reps=7) -> dict:
    """The block family on every block request, both variants, below the threshold as most
    requests are (each only feeds the histogram): ``raw`` (raw tracepoints keyed by the
    request, the default) and ``tracepoint`` (keyed by device and sector, the fallback).
    The device is a loop device over a file in /dev/shm, read by dd with O_DIRECT (one
    4 KiB request per read, about as fast as a request gets on this machine: a real NVMe
    read takes longer, so the share shrinks there).

    Per program run: the kernel's BPF run-time statistics. End to end: dd's wall time per
    request with no probe, the raw variant and the tracepoint variant taking turns in each
    repetition (the baseline is the no-probe turn of the same repetition); medians."""

    from stallscope.tracer import probes
    _setup()
    backing = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="ss-blockcost-")
    backing.truncate(64 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", backing.name],
                         check=True, capture_output=True, text=True).stdout.strip()
    names = ("none", "raw", "tracepoint")
    wall = {k: [] for k in names}
    runs: dict = {k: [] for k in names[1:]}
    lines = {}
    try:
        _dd_direct(dev, n // 4)                  # warm up (the backing file's pages)
        with _BpfStats():
            for _ in range(reps):
                wall["none"].append(_dd_direct(dev, n) / n)
                for name, attach in (("raw", "raw_tracepoint"), ("tracepoint", "tracepoint")):
                    log: list = []
                    loaded, failed = probes.load(probes.ProbeConfig(families=("block",), attach=attach), log.append)
                    if not loaded:
                        raise RuntimeError(f"block probe did not load: {failed}")
                    lines[name] = log[-1] if log else ""
                    p = loaded[0]
                    s0 = _prog_stats(p.bpf)
                    wall[name].append(_dd_direct(dev, n) / n)
                    runs[name].append(_per_call(s0, _prog_stats(p.bpf)))
                    p.drain()
                    p.close()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        backing.close()
    med = {k: round(statistics.median(v) * 1e9, 1) for k, v in wall.items()}
    per_run = {}
    for k, rs in runs.items():
        progs = sorted({p for r in rs for p in r})
        per_run[k] = {p.replace("tracepoint__block__", ""): round(statistics.median(r[p]["ns_per_run"] for r in rs if p in r), 1)
                      for p in progs}
    return {"bench": "block_cost", "requests": n, "reps": reps, "device": "loop over /dev/shm, dd iflag=direct bs=4k",
            "methods": lines, "bpf_ns_per_run_median": per_run, "wall_ns_per_request_median": med,
            "added_ns_per_request": {k: round(med[k] - med["none"], 1) for k in names[1:]},
            "ratio_to_none": {k: round(med[k] / med["none"], 3) for k in names[1:]},
            "runs_wall_ns": {k: [round(x * 1e9) for x in v] for k, v in wall.items()}, "runs_bpf": runs}


def cpu_sampler(seconds=5.0, roots=8, workers=8, trainer_threads=32) -> dict:
    """The agent's CPU-time sampler (tracer/cpu.py) as it runs beside 8 GPUs' trainers with 8
    DataLoader workers each (72 real sleeping processes; their descendants found through the
    kernel's children lists, as without the sched family), polled every 250 ms: its CPU per
    second. Each trainer has ``trainer_threads`` more threads asleep (an OpenMP pool, CUDA's and
    pin-memory threads) and its main thread waits on one of them (a futex), so every pass may
    read its threads for a network wait (the dearest case for that; the workers sleep, one
    thread each). Baseline, same run: the sampler's loop with no GPU process (nothing to read)."""
    from stallscope.tracer.cpu import CpuSampler
    code = ("import os,sys,threading,time\n"
            "for _ in range(int(sys.argv[1])):\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(3600)\n"
            "        os._exit(0)\n"
            "ev = threading.Event()\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    threading.Thread(target=ev.wait, daemon=True).start()\n"
            "print('ready', flush=True)\n"
            "ev.wait(3600)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(workers), str(trainer_threads)],
                              stdout=subprocess.PIPE, text=True)
             for _ in range(roots)]
    try:
        for p in procs:
            p.stdout.readline()
        pids = [p.pid for p in procs]

        def loop(roots_now):
            s = CpuSampler()
            rows, polls = 0, 0
            c0, t0 = time.process_time(), time.monotonic()
            while time.monotonic() - t0 < seconds:
                got = s.poll(roots_now)
                rows += len(got["cpu"]["pid"]) if got else 0
                polls += 1
                time.sleep(0.25)
            return {"cpu_s_per_s": (time.process_time() - c0) / (time.monotonic() - t0),
                    "rows_per_poll": rows / max(polls, 1), "polls": polls,
                    "thread_reads_per_s": s.thread_reads / (time.monotonic() - t0)}
        full, base = loop(pids), loop([])
    finally:
        for p in procs:
            subprocess.run(["pkill", "-9", "-P", str(p.pid)], check=False)
            p.kill()
            p.wait()
    return {"bench": "cpu_sampler", "owners": roots * (workers + 1), "period_ms": 250,
            "trainer_threads": trainer_threads, "seconds": seconds,
            "percent_of_one_core": round(100 * full["cpu_s_per_s"], 3),
            "rows_per_poll": full["rows_per_poll"],
            "thread_reads_per_s": round(full["thread_reads_per_s"], 1),
            "baseline_no_gpu_process_percent": round(100 * base["cpu_s_per_s"], 3),
            "added_percent_of_one_core": round(100 * (full["cpu_s_per_s"] - base["cpu_s_per_s"]), 3)}


ALL = {"syscall_cost": syscall_cost, "uprobe_cost": uprobe_cost, "drain": drain, "shed": shed, "overflow": overflow, "idle": idle,
       "sched_cost": sched_cost, "block_cost": block_cost, "close_cost": close_cost, "cpu_sampler": cpu_sampler}


def main(names=None, quick=False):
    for name in names or ALL:
        fn = ALL[name]
        kw = {}
        if quick:
            kw = {"syscall_cost": {"n": 200_000, "reps": 2}, "drain": {"n": 300_000, "reps": 1}, "uprobe_cost": {"n": 50_000, "reps": 2}, "shed": {"n": 400_000},
                  "overflow": {"n": 100_000}, "idle": {"seconds": 5},
                  "sched_cost": {"n": 20_000, "reps": 3}, "block_cost": {"n": 10_000, "reps": 2},
                  "close_cost": {"n": 200_000, "reps": 2}, "cpu_sampler": {"seconds": 2.0}}[name]
        r = fn(**kw)
        r["machine"] = f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("-")] or None, quick="--quick" in sys.argv)
