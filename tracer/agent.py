"""The node agent loop: drain probes, sample NVML, stamp clocks, hand batches to sinks.

Start-up errors (no root, no BCC, no tracefs, no probe at all) are fatal and
one line; everything after start-up survives: a failing tick is counted and
logged once, and the loop goes on.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import socket
import sys
import time

import numpy as np

from stallscope.wire.schema import ABI_VERSION, SCHEMA_VERSION, STALL_TABLES, T_PROC, Batch, concat_tables
from stallscope.wire.sink import loss_counters

from . import attribution, decode, kernel, podresources, probes
from .families import BY_NAME
from .net import EpisodeBuilder
from .procinfo import ProcCache, SocketOwners, cgroup2_mount, pid_cgroup_id
from .ring import Shedder


@dataclasses.dataclass
class AgentConfig:
    probe: probes.ProbeConfig = dataclasses.field(default_factory=probes.ProbeConfig)
    node: str = dataclasses.field(default_factory=socket.gethostname)
    poll_ms: int = 10               # ring poll period while events flow
    idle_poll_ms: int = 50          # ... and while nothing came (a 16 MiB ring holds ~63k records)
    batch_ms: int = 250             # batch period while stalls flow
    idle_batch_ms: int = 1000       # otherwise: GPU samples, counters, clock (a heartbeat)
    batch_max_records: int = 32768  # ... or sooner, once this many records came since the last:
                                    # building a batch is the loop's longest step, and a ring
                                    # (16 MiB: ~63k records) must not fill meanwhile
    counters_ms: int = 1000         # the kernel's counters are read this often (and in the last batch)
    # ... and the latency histograms, sent when read: a read copies 2,048 slots per CPU of each
    # family's map (about 1 ms a family on 2 CPUs, more on a 128-CPU node), so not every second
    hist_ms: int = 10000
    gpu: str = "auto"               # auto | on | off
    nvml_lib: str | None = None
    gpu_poll_ms: int = 200
    cpu_poll_ms: int = 250          # CPU time of the GPUs' processes (tracer/cpu.py), with a GPU
    shed: bool = True               # overload: raise the in-kernel threshold (ring.Shedder)
    rdma_poll_ms: int = 1000        # RDMA port counters (sysfs), with the rdma family
    http_tls_poll_ms: int = 500     # owners' libssl mappings (http family's TLS uprobes)
    rdma_root: str = "/sys/class/infiniband"
    proc_root: str = "/proc"
    net_gap_ms: int = 1000
    sched_flush_ms: int = 200       # close off-CPU groups of threads gone quiet (sched family)
    # who holds each GPU (tracer/attribution.py): kubelet pod-resources socket, Slurm job map
    pod_resources_socket: str = dataclasses.field(default_factory=lambda: os.environ.get(
        podresources.SOCKET_ENV, podresources.DEFAULT_SOCKET))
    job_mapping_dir: str = dataclasses.field(default_factory=lambda: os.environ.get(
        attribution.JOB_MAPPING_ENV, attribution.DEFAULT_JOB_MAPPING_DIR))
    attribution_refresh_s: float = 10.0
    addrs_refresh_s: float = 10.0   # this node's addresses (meta.node.addrs), re-read this often


#: tables of periodic samples: pending alone, they wait for the once-a-second batch
SAMPLE_TABLES = frozenset(("gpu", "gpu_proc", "cpu", "wait", "rdma_counter"))

#: the CPU time of a GPU's processes is sampled while the GPU is mostly idle (a sample under
#: this utilization: analysis/blame.py's PARTIAL_THRESHOLD, the bar of an idle run) and this
#: long after
PARTIAL_THRESHOLD = 50
CPU_AFTER_IDLE_S = 1.0
#: CPU samples a third of a period apart after a GPU's idle spell's first (tracer/cpu.py)
QUICK_CPU_SAMPLES = 2

#: a change of the wall - monotonic offset larger than this between two reads is a step (NTP
#: slews at most 500 ppm: 0.5 ms per second)
CLOCK_STEP_NS = 10_000_000


def clock_mapping():
    """(wall - monotonic offset in ns, uncertainty ns): the tightest of a few brackets."""
    best = None
    for _ in range(5):
        a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        w = time.time_ns()
        b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or b - a < best[1]:
            best = (w - (a + b) // 2, b - a)
    return best


#: at most this many addresses in meta.node.addrs
MAX_ADDRS = 64


def node_addrs(proc: str = "/proc", pids=()) -> list:
    """The IPv4 and IPv6 addresses of this network namespace and of the namespaces of
    ``pids`` (the GPU processes: a trainer in a pod of its own receives on the pod's
    address), as text, sorted: the /32 LOCAL host entries of ``net/fib_trie`` and the entries
    of ``net/if_inet6``, without loopback, link-local, multicast and unspecified ones (which
    name no node to another node). Each namespace is read once (by its ``ns/net`` inode):
    two small /proc reads each, no dependency; what cannot be read gives no addresses."""
    import ipaddress
    found: set = set()
    dirs, seen = [os.path.join(proc, "net")], set()
    for pid in sorted({int(p) for p in pids})[:256]:
        try:
            ino = os.stat(os.path.join(proc, str(pid), "ns", "net")).st_ino
        except OSError:
            continue
        if ino not in seen:
            seen.add(ino)
            dirs.append(os.path.join(proc, str(pid), "net"))
    for d in dirs:
        _netns_addrs(d, found)
    out = []
    for a in found:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified):
            out.append(str(ip))
    return sorted(out)[:MAX_ADDRS]


def _netns_addrs(net_dir: str, found: set) -> None:
    """Add the local addresses listed in one ``/proc/.../net`` directory to ``found``."""
    import ipaddress
    try:
        with open(os.path.join(net_dir, "fib_trie")) as f:
            last = ""
            for line in f:
                s = line.strip()
                if s.startswith("|-- "):
                    last = s[4:]
                elif last and s.startswith("/32 host LOCAL"):
                    found.add(last)
    except OSError:
        pass
    try:
        with open(os.path.join(net_dir, "if_inet6")) as f:
            for line in f:
                h = line.split(None, 1)[0] if line.strip() else ""
                if len(h) == 32:
                    found.add(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    except (OSError, ValueError):
        pass


def _release_compiler_memory():
    """BCC compiles with an in-process LLVM whose heap stays mapped after the
    programs are loaded; hand the free part back to the OS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Timex(ctypes.Structure):
    """struct timex (adjtimex(2)), up to the fields read here plus padding."""
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("rest", ctypes.c_long * 32)]


def ntp_state():
    """(synchronized, max error ns) of the wall clock, from adjtimex(2).

    The bound between two nodes' clocks is the sum of their max errors; an
    unsynchronized clock (STA_UNSYNC) gives no bound at all."""
    try:
        t = _Timex()
        rc = ctypes.CDLL("libc.so.6", use_errno=True).adjtimex(ctypes.byref(t))
    except (OSError, AttributeError):
        return False, None
    synced = rc != 5 and not (t.status & 0x40)            # TIME_ERROR, STA_UNSYNC
    return synced, int(t.maxerror) * 1000


class Agent:
    def __init__(self, cfg: AgentConfig, sinks: list, log=None):
        self.cfg = cfg
        self.sinks = sinks
        self.log = log or (lambda m: print(f"stallscope: {m}", file=sys.stderr, flush=True))
        self.loaded = []
        self.failed = {}
        self.gpu = None
        self.gpu_reason = ""
        self.attribution = None         # GPU -> pods and jobs, with a GPU
        self.rdma_counters = None
        self.cpu = None                 # CPU time of the GPUs' processes (tracer/cpu.py), with a GPU
        self._gpu_idle_at: dict = {}    # gpu -> monotonic time of the last poll that found it mostly idle
        self._pids_by_gpu: dict = {}    # gpu -> the processes NVML listed on it at its last poll
        self._newly_idle = False        # a poll found a GPU gone idle (after a busy sample, or a second)
        self._gpu_busy: dict = {}       # gpu -> whether its last sample was busy
        self.seq = 0
        self.pending = []
        self.tick_errors = 0
        self.clock_steps = 0            # wall-clock steps seen (settimeofday, NTP step)
        self.last_step_ns = 0
        self._last_offset = None
        self._last_tick_error = ""
        self.procs = ProcCache(cfg.proc_root)
        self.sched = None               # the sched family's user-space half, when loaded
        self.exits = None               # proc rows for exits that matter (sched family)
        self._addrs: list = []          # meta.node.addrs, re-read every addrs_refresh_s
        self._addrs_at = None
        self._gpu_pids: set = set()     # the processes NVML listed at its last poll
        self._addrs_pids: set = set()   # ... when the addresses were last read
        self.http_tls = None            # the http family's per-owner libssl uprobes, when loaded
        self._owner_roots = set()       # (pid, start_ns) of processes made owners from user space
        self.owners = SocketOwners(cfg.proc_root)
        keep = None
        if cfg.probe.cgroup_id:
            # tcp:tcp_retransmit_skb fires (mostly in softirq) for every socket of the host and
            # every network namespace: keep the episodes whose owner is in the traced cgroup
            mount = cgroup2_mount(cfg.proc_root)
            keep = (lambda pid: pid_cgroup_id(pid, cfg.proc_root, mount) == cfg.probe.cgroup_id)
        self.episodes = EpisodeBuilder(self.owners, gap_ns=cfg.net_gap_ms * 1_000_000, keep=keep)
        self.headers = ""
        self.events_out = 0
        self._hist_at = None
        self._probe_counters = {}
        self._counters_at = None
        self.last_counters = {}
        self._drained = 0
        self._since_batch = 0           # records drained since the last batch
        self.shedders = {}              # family -> ring.Shedder (overload control)

    # ------------------------------------------------------------ start-up
    def start(self):
        kernel.require_root()
        kernel.import_bcc()
        kernel.tracefs_root()
        self.headers = kernel.ensure_headers()
        self.log(self.headers)
        self.loaded, self.failed = probes.load(self.cfg.probe, self.log)
        if not self.loaded:
            raise kernel.Unavailable("no probe could be loaded: " +
                                     "; ".join(f"{k}: {v}" for k, v in self.failed.items()))
        self.methods = {t: p.method for p in self.loaded for t in BY_NAME[p.family].RECORD_TYPES}
        self.started_ns = time.time_ns()
        self._start_sched()
        self._start_http()
        if self.cfg.gpu != "off":
            self._open_gpu()
        if self.gpu is not None and self.cfg.cpu_poll_ms > 0:
            from .cpu import CpuSampler
            self.cpu = CpuSampler(self.cfg.proc_root)
        if "rdma" in self.cfg.probe.families:
            from .rdma_counters import RdmaCounterSampler
            self.rdma_counters = RdmaCounterSampler.open(self.cfg.rdma_root)
            if self.rdma_counters is None:
                self.log(f"rdma counters: {self.cfg.rdma_root} absent (no RDMA devices)")
        if self.cfg.shed:
            for p in self.loaded:
                sh = Shedder.for_probe(p, self.cfg.probe.min_latency_ns, self.log)
                if sh is not None:
                    self.shedders[p.family] = sh
        _release_compiler_memory()

    def _start_sched(self):
        """Lineage from the kernel's fork/exec/exit records; owners seeded with --pid."""
        probe = next((p for p in self.loaded if p.family == "sched"), None)
        if probe is None:
            return
        from .families.sched import ExitReporter, Runtime
        self.sched = Runtime(probe.bpf, self.cfg.probe.min_latency_ns, self.cfg.proc_root)
        self.exits = ExitReporter(self.procs)
        self.procs.kernel_lineage(self.started_ns)
        if self.cfg.probe.pid:
            self._add_owners([self.cfg.probe.pid])

    def _start_http(self):
        """TLS requests: uprobes on the libssl of each owner process, attached as owners appear
        (``_tick_http``)."""
        probe = next((p for p in self.loaded if p.family == "http"), None)
        if probe is not None and "libssl" in probe.detail:
            from .families.http import TlsAttacher
            self.http_tls = TlsAttacher(probe.bpf, self.log, self.cfg.proc_root)

    def _tick_http(self):
        """Attach TLS uprobes to owners (the kernel's set: NVML's processes and every
        descendant) and to --pid; detach those gone."""
        pids = set(self.sched.owner_pids()) if self.sched is not None else set()
        if self.cfg.probe.pid:
            pids.add(self.cfg.probe.pid)
        self.http_tls.tick(pids)

    def _add_owners(self, pids):
        """Make pids owners in the kernel (every call: a pid NVML lists may have been reused),
        with the descendants they have now when a process is seen for the first time (the
        kernel adds later children itself)."""
        pids = [int(p) for p in pids if int(p) > 0]
        new = []
        for pid in pids:
            inf = self.procs.lookup(pid)
            ident = (pid, inf[2] if inf else 0)
            if ident not in self._owner_roots:
                self._owner_roots.add(ident)
                new.append(pid)
        self.sched.add_owners(pids)
        if new:
            self.sched.add_owners(self.procs.descendants(new))

    def _open_gpu(self):
        try:
            from .nvml import GpuSampler, NvmlUnavailable
        except ImportError as e:
            self.gpu_reason = f"GPU sampling unavailable: {e}"
            self.log(self.gpu_reason)
            return
        try:
            self.gpu = GpuSampler.open(self.cfg.nvml_lib or os.environ.get("STALLSCOPE_NVML_LIB"))
            names = ", ".join(f"{g['index']}:{g['name']}" for g in self.gpu.gpus)
            self.log(f"GPUs: {names or 'none'}")
            self.attribution = attribution.GpuAttribution(
                self.gpu.gpus, self.cfg.pod_resources_socket, self.cfg.job_mapping_dir,
                self.cfg.attribution_refresh_s, log=self.log)
        except NvmlUnavailable as e:
            self.gpu_reason = str(e)
            if self.cfg.gpu == "on":
                raise kernel.Unavailable(str(e)) from e
            self.log(f"{e}; tracing IO and network only")

    # ------------------------------------------------------------ loop
    def run(self, duration: float | None = None, stop=lambda: False):
        deadline = None if duration is None else time.monotonic() + duration
        next_batch = time.monotonic() + self.cfg.batch_ms / 1000
        next_gpu = next_cpu = next_rdma = next_sched = next_http = time.monotonic()
        quick = 0                       # CPU samples left at a third of the period
        last_flush = time.monotonic()
        try:
            while not stop():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                self._drained = 0
                if self.sched is not None and now >= next_sched:
                    self._guard(self.sched.flush)       # records land in the ring: drained now
                    next_sched = now + self.cfg.sched_flush_ms / 1000
                self._guard(self._drain)
                if self.gpu is not None and now >= next_gpu:
                    self._guard(self._sample_gpu)
                    next_gpu = now + self.cfg.gpu_poll_ms / 1000
                    if self._newly_idle:            # its first CPU sample now, not a period later
                        next_cpu, self._newly_idle, quick = now, False, QUICK_CPU_SAMPLES
                if self.cpu is not None and now >= next_cpu:
                    self._guard(self._sample_cpu)
                    # a spell's first samples come a third of a period apart: an interval needs
                    # two samples a third of its length apart, and one of 0.55 s seen 0.2 s late
                    # had two 0.25 s apart (a worker's computing left unnamed)
                    next_cpu = now + self.cfg.cpu_poll_ms / 1000 / (3 if quick else 1)
                    quick = max(0, quick - 1)
                if self.http_tls is not None and now >= next_http:
                    self._guard(self._tick_http)
                    next_http = now + self.cfg.http_tls_poll_ms / 1000
                if self.rdma_counters is not None and now >= next_rdma:
                    self._guard(self._sample_rdma)
                    next_rdma = now + self.cfg.rdma_poll_ms / 1000
                if self._since_batch >= self.cfg.batch_max_records or (
                        now >= next_batch and (self._stalls_pending()
                                               or now - last_flush >= self.cfg.idle_batch_ms / 1000)):
                    # stalls go out every batch_ms; GPU samples alone and the heartbeat once a second
                    self._guard(self.flush)
                    last_flush = now
                    next_batch = now + self.cfg.batch_ms / 1000
                # the next tick poll_ms after this one began, not after it ended: while a storm
                # makes a tick's work take longer, the loop drains back to back instead of
                # sleeping as the ring fills (at 1M records/s a 16 MiB ring holds ~60 ms)
                period = (self.cfg.poll_ms if self._drained else self.cfg.idle_poll_ms) / 1000
                time.sleep(max(0.0, now + period - time.monotonic()))
        except KeyboardInterrupt:
            pass
        finally:
            if self.sched is not None:
                self._guard(lambda: self.sched.flush(force=True))
            self._guard(lambda: self._drain(final=True))
            if self.gpu is not None:
                self._guard(self._sample_gpu)
            if self.cpu is not None:
                self._guard(self._sample_cpu)
            if self.rdma_counters is not None:
                self._guard(self._sample_rdma)
            self._guard(lambda: self.flush(final=True))

    def _stalls_pending(self) -> bool:
        """Anything pending besides periodic samples (GPU, GPU processes, RDMA counters), or a
        TCP loss episode still open (a batch closes it once its flow is quiet)."""
        return bool(self.episodes.waiting()) or any(k not in SAMPLE_TABLES for part in self.pending for k in part)

    def _guard(self, fn):
        try:
            fn()
        except Exception as e:  # a failing tick is counted and skipped
            self.tick_errors += 1
            msg = f"{type(e).__name__}: {e}"
            if msg != self._last_tick_error:
                self._last_tick_error = msg
                self.log(f"tick failed (counted, continuing): {msg}")

    def _drain(self, final: bool = False):
        off, _unc = self._clock()
        for p in self.loaded:
            recs = p.drain(final)
            sh = self.shedders.get(p.family)
            if sh is not None:
                sh.update(p.ring.fill, recs)
            # lineage records (every fork on the node) do not make the loop poll faster
            self._drained += len(recs) - int(np.count_nonzero(recs["type"] == T_PROC)) if len(recs) else 0
            self._since_batch += len(recs)
            if len(recs):
                tables = decode.split(recs, off, self.methods)
                if "_proc" in tables:           # lineage first: later rows may name these pids
                    lineage = tables.pop("_proc")
                    self.procs.ingest(lineage)
                    if self.exits is not None:
                        self.exits.add(lineage)
                if "_sched" in tables:          # stack names, mapped files: while the process lives
                    raw = tables.pop("_sched")
                    if self.sched is not None:
                        tables.update(self.sched.resolve(raw))
                if tables:
                    self.pending.append(tables)

    def _clock(self):
        """clock_mapping(), re-read every tick; a jump of the offset (the wall clock stepped:
        durations are monotonic and stay right, timestamps follow the new wall time) is
        counted and logged."""
        off, unc = clock_mapping()
        last = self._last_offset
        if last is not None and abs(off - last) > CLOCK_STEP_NS + unc:
            self.clock_steps += 1
            self.last_step_ns = off - last
            self.log(f"wall clock stepped {(off - last) / 1e9:+.3f} s (step {self.clock_steps}; "
                     "durations unaffected, timestamps on the new wall time)")
        self._last_offset = off
        return off, unc

    def _sample_gpu(self):
        got = self.gpu.poll()
        g = got.get("gpu") if got else None
        if g is not None and len(g["ts_ns"]) and int(g["ts_ns"].min()) < self.started_ns:
            # the driver's buffer reaches back before tracing began; stalls from
            # then were never traced, so those samples could only read "unexplained"
            keep = g["ts_ns"] >= self.started_ns
            got["gpu"] = {k: v[keep] for k, v in g.items()}
        if got and any(len(t.get("ts_ns", ())) for t in got.values()):
            self.pending.append(got)
            now = time.monotonic()
            if self.cpu is not None and (got["gpu"]["util"] >= PARTIAL_THRESHOLD).any():
                self.cpu.rearm()            # a GPU computed: its next idle spell scans afresh
            order = np.argsort(got["gpu"]["ts_ns"], kind="stable")
            gpu, util = got["gpu"]["gpu"][order], got["gpu"]["util"][order]
            for x in np.unique(gpu).tolist():
                busy = util[gpu == x] >= PARTIAL_THRESHOLD
                if busy.all():
                    self._gpu_busy[int(x)] = True
                    continue
                # newly idle: after a busy sample (this poll's or the last one's), or after a
                # second without an idle sample; a busy phase shorter than that second (a
                # training step between two waits) must not leave the next wait without its
                # quick first samples
                was = np.concatenate(([self._gpu_busy.get(int(x), False)], busy))
                if (was[:-1] & ~was[1:]).any() or now - self._gpu_idle_at.get(int(x), -1e18) > CPU_AFTER_IDLE_S:
                    self._newly_idle = True
                self._gpu_idle_at[int(x)] = now
                self._gpu_busy[int(x)] = bool(busy[-1])
        if got:
            gp = got["gpu_proc"]
            self._pids_by_gpu = {}
            for x, pid in zip(gp["gpu"].tolist(), gp["pid"].tolist()):
                self._pids_by_gpu.setdefault(int(x), set()).add(int(pid))
        if got and len(got["gpu_proc"]["pid"]):
            self._gpu_pids = {int(x) for x in np.unique(got["gpu_proc"]["pid"])}
            if self.sched is not None:
                self._add_owners(np.unique(got["gpu_proc"]["pid"]))

    def _sample_cpu(self):
        """CPU time of the processes of each GPU found mostly idle in the last second (and
        their descendants): the analysis reads it inside idle intervals only, so a busy
        node's processes are never read."""
        now = time.monotonic()
        roots = set()
        for x, at in self._gpu_idle_at.items():
            if now - at <= CPU_AFTER_IDLE_S:
                roots |= self._pids_by_gpu.get(x, set())
        if not roots:
            return
        got = self.cpu.poll(roots, self.sched.owner_pids if self.sched is not None else None,
                            self.sched.owners_generation() if self.sched is not None else None)
        if got:
            self.pending.append(got)

    def _sample_rdma(self):
        got = self.rdma_counters.poll()
        if got:
            self.pending.append(got)

    def build_batch(self, final: bool = False) -> Batch:
        tables = {}
        parts = self.pending
        self.pending = []
        kinds = {k for p in parts for k in p}
        for kind in kinds:
            if kind == "_retrans":
                for p in parts:
                    if "_retrans" in p:
                        self.episodes.add(p["_retrans"])
                continue
            tables[kind] = concat_tables(kind, [p[kind] for p in parts if kind in p])
        net = self.episodes.flush(time.time_ns(), force=final,
                                  proc_comm=lambda pid: (self.procs.lookup(pid) or (0, ""))[1])
        if net:
            if self.cfg.probe.pid:
                keep = net["pid"] == self.cfg.probe.pid
                net = {k: v[keep] for k, v in net.items()}
            tables["net"] = net
        # lineage of every process in a stall or on a GPU, as it was at the row's time
        pids, at = [], []
        for kind in STALL_TABLES + ("gpu_proc", "cpu"):
            if kind in tables and len(tables[kind]["pid"]):
                pids.append(np.asarray(tables[kind]["pid"], dtype=np.int64))
                at.append(np.asarray(tables[kind]["ts_ns"], dtype=np.int64))
        proc = self.procs.table_for(np.concatenate(pids), np.concatenate(at)) if pids else {}
        exits = self.exits.take() if self.exits is not None else {}
        if proc or exits:               # exit rows last: a pid's latest row is its exit
            tables["proc"] = concat_tables("proc", [t for t in (proc, exits) if t])
        # bounded: exited processes forgotten, except those open net episodes still name
        self.procs.sweep(keep={ep["pid"] for ep in self.episodes.waiting()})
        off, unc = self._clock()
        synced, maxerr = ntp_state()
        now = time.monotonic()
        # histograms first: vfs.below_threshold (in the counters) is their sum as of this read
        hist = {}           # cumulative: sent when re-read (receivers keep the latest)
        if final or self._hist_at is None or now - self._hist_at >= self.cfg.hist_ms / 1000:
            self._hist_at = now
            hist = {p.family: p.hist() for p in self.loaded}
        if final or self._counters_at is None or now - self._counters_at >= self.cfg.counters_ms / 1000:
            # BPF map reads: a batch every 250 ms need not read them all each time
            self._counters_at = now
            self._probe_counters = {f"{p.family}.{k}": v for p in self.loaded for k, v in p.counters().items()}
        counters = dict(self._probe_counters)
        counters.update(loss_counters(self.sinks))
        for p in self.loaded:
            if p.family in self.shedders:
                counters.update(self.shedders[p.family].counters(p))
        counters["tick_errors"] = self.tick_errors
        if self.sched is not None:
            counters["sched.duplicate_groups"] = self.sched.duplicates
        counters["clock.steps"] = self.clock_steps
        counters["proc.cached"] = len(self.procs)
        counters["proc.forgotten"] = self.procs.forgotten
        counters["proc.pid_reuse_seen"] = self.procs.reuse_seen
        if self.exits is not None:
            counters["proc.exits_reported"] = self.exits.reported
            counters["proc.exits_dropped"] = self.exits.dropped
        if self.http_tls is not None:
            counters["http.tls_pids"] = len(self.http_tls.pids())
            counters["http.tls_attach_errors"] = self.http_tls.errors
        self.last_counters = counters
        counters["tcp.retransmits"] = self.episodes.total_retransmits
        counters["tcp.retransmit_failed"] = self.episodes.failed
        counters["tcp.retransmits_untraced"] = self.episodes.untraced
        meta = {"clock": {"wall_minus_mono_ns": off, "sent_ns": time.time_ns(), "ntp_synced": synced,
                          "ntp_maxerror_ns": maxerr,
                          # what another node may trust: read bracket + NTP's bound when synced
                          "uncertainty_ns": unc + (maxerr if synced and maxerr else 0),
                          "steps": self.clock_steps, "last_step_ns": self.last_step_ns},
                "abi": ABI_VERSION, "schema": SCHEMA_VERSION,
                "min_latency_ns": self.cfg.probe.min_latency_ns,
                "attach": {p.family: p.detail for p in self.loaded},
                "not_loaded": self.failed, "final": final, "node": {"addrs": self._node_addrs()}}
        open_since = [ep["start"] for ep in self.episodes.waiting() if ep.get("keep", True)]
        if open_since:      # loss episodes still open: their rows come later (the live analysis waits)
            meta["net"] = {"open_since_ns": int(min(open_since))}
        shed = {f: m for f, sh in self.shedders.items() if (m := sh.meta()) is not None}
        if shed:                # announced: these stalls are sampled by duration, not all kept
            meta["shed"] = shed
        if self.gpu is not None:
            meta["gpu"] = self.gpu.meta()
            if self.attribution is not None:
                self._guard(self.attribution.refresh)       # at most every 10 s
                meta["gpu"] = self.attribution.annotate(meta["gpu"])
        elif self.gpu_reason:
            meta["gpu"] = {"unavailable": self.gpu_reason}
        batch = Batch(self.cfg.node, self.seq, tables, counters, hist, meta)
        self.seq += 1
        return batch

    def _node_addrs(self) -> list:
        """meta.node.addrs (this namespace's and the GPU processes'): read at most every
        ``addrs_refresh_s``."""
        now = time.monotonic()
        if (self._addrs_at is None or now - self._addrs_at >= self.cfg.addrs_refresh_s
                or self._gpu_pids != self._addrs_pids):       # a new GPU process: maybe a new netns
            self._addrs_at, self._addrs_pids = now, set(self._gpu_pids)
            self._addrs = node_addrs(self.cfg.proc_root, self._gpu_pids)
        return list(self._addrs)

    def flush(self, final: bool = False):
        self._since_batch = 0
        batch = self.build_batch(final)
        self.events_out += batch.n_events()
        for s in self.sinks:
            s(batch)

    def close(self):
        for p in self.loaded:
            p.close()
        if self.gpu is not None:
            try:
                self.gpu.close()
            except Exception:
                pass
        for s in self.sinks:
            if hasattr(s, "close"):
                s.close()
