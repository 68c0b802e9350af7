"""Load the probe families in bpf/ with BCC, choosing the best attach method.

Each family (vfs, tcp, block, nfs, rdma) is its own BPF object with its own
ring buffer, so a kernel without one probe point loses that family only, with
a one-line reason, and the rest keep running. For every family the methods are
tried best first (fentry, then kprobe, then tracepoints); which one was used is
reported in ``LoadedProbe.method`` and shipped in every batch's meta.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np

from . import btf, kernel
from .ring import RingReader
from .schema import BPF_DIR, COUNTER_NAMES, HIST_SLOTS, NOPS, OP_NAMES

ALL_FAMILIES = ("vfs", "tcp", "block", "nfs", "rdma")
ATTACH_CHOICES = ("auto", "fentry", "kprobe", "uprobe", "tracepoint")


@dataclasses.dataclass
class ProbeConfig:
    min_latency_ns: int = 10_000_000
    pid: int = 0
    cgroup_id: int = 0
    families: tuple = ALL_FAMILIES
    attach: str = "auto"
    ringbuf_pages: int = 4096          # 16 MiB per family
    extra_cflags: tuple = ()


class ProbeError(RuntimeError):
    """A probe family could not be loaded; the message is one line."""


def _source_text(family: str) -> str:
    parts = []
    for name in ("common.bpf.h", f"{family}.bpf.c"):
        path = os.path.join(BPF_DIR, name)
        with open(path) as f:
            parts.append(f'#line 1 "{path}"\n{f.read()}')
    # BCC rewrites map calls (events.ringbuf_reserve(...)) only in the main
    # file, so the shared header is placed into the text rather than #included.
    return "\n".join(parts)


def base_cflags(cfg: ProbeConfig) -> list:
    return [f"-I{BPF_DIR}", f"-DSS_MIN_NS={int(cfg.min_latency_ns)}ULL",
            f"-DSS_FILTER_PID={int(cfg.pid)}", f"-DSS_FILTER_CGROUP={int(cfg.cgroup_id)}ULL",
            f"-DSS_RINGBUF_PAGES={int(cfg.ringbuf_pages)}",
            *btf.offset_cflags(), *cfg.extra_cflags]


class LoadedProbe:
    """One loaded family: its BPF object, ring reader and counters."""

    def __init__(self, family: str, method: str, bpf, detail: str = ""):
        self.family = family
        self.method = method
        self.detail = detail
        self.bpf = bpf
        ring = bpf[b"events"]
        size = int(ring.max_entries) if hasattr(ring, "max_entries") else 0
        self.ring = RingReader(ring.map_fd, size)

    def drain(self) -> np.ndarray:
        return self.ring.drain()

    def counters(self) -> dict:
        sums = percpu_array_sums(self.bpf[b"counters"], max(COUNTER_NAMES) + 1)
        out = {name: int(sums[idx]) for idx, name in COUNTER_NAMES.items()}
        out["odd_records"] = self.ring.odd_records
        if self.family == "vfs":      # the hot path skips the counter: the histogram has it
            out["below_threshold"] = int(self._hist().sum())
        return out

    def _hist(self) -> np.ndarray:
        return percpu_array_sums(self.bpf[b"hist"], NOPS * HIST_SLOTS)

    def hist(self) -> dict:
        """Cumulative log2(us) histograms of ops below the threshold: {op: [counts]}."""
        vals = self._hist().reshape(NOPS, HIST_SLOTS)
        return {OP_NAMES.get(op, str(op)): [int(x) for x in vals[op]]
                for op in np.flatnonzero(vals.sum(axis=1))}

    def close(self):
        self.ring.close()
        try:
            self.bpf.cleanup()
        except Exception:
            pass


_NCPU = None


def percpu_array_sums(table, n: int) -> np.ndarray:
    """Sum over CPUs of every slot of a BPF_PERCPU_ARRAY, in one batch syscall
    (BPF_MAP_LOOKUP_BATCH, Linux 5.6+) instead of one lookup per key; falls back
    to per-key lookups where batching is missing."""
    global _NCPU
    import ctypes as ct

    from bcc import libbcc
    if _NCPU is None:
        from bcc.utils import get_possible_cpus
        _NCPU = len(get_possible_cpus())
    keys = np.zeros(n, dtype=np.uint32)
    vals = np.zeros((n, _NCPU), dtype=np.uint64)
    cnt = ct.c_uint32(n)
    out_batch = ct.c_uint32(0)
    res = libbcc.lib.bpf_lookup_batch(table.map_fd, None, ct.byref(out_batch),
                                      keys.ctypes.data_as(ct.c_void_p), vals.ctypes.data_as(ct.c_void_p),
                                      ct.byref(cnt))
    if res == 0 or (ct.get_errno() == errno.ENOENT and cnt.value == n):
        return vals.sum(axis=1)
    out = np.zeros(n, dtype=np.uint64)
    for k, v in table.items():
        out[k.value] = sum(v)
    return out


# ------------------------------------------------------------------ families
def _load(family, cflags, text=None):
    from bcc import BPF
    return BPF(text=(text or _source_text(family)).encode(), cflags=cflags)


_FENTRY_OK = None


class _quiet_stderr:
    """Silence fd 2 (C libraries write there directly) for a capability probe."""

    def __enter__(self):
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


def fentry_works() -> tuple:
    """Try a trivial fentry program once: (ok, reason). BCC's support_kfunc()
    only checks BTF; hosts that block ftrace trampolines fail at attach."""
    global _FENTRY_OK
    if _FENTRY_OK is None:
        try:
            from bcc import BPF
            if not BPF.support_kfunc():
                _FENTRY_OK = (False, "kernel lacks BTF trampolines (fentry)")
            else:
                with _quiet_stderr():      # libbpf prints the expected EPERM itself
                    b = BPF(text=b"KFUNC_PROBE(vfs_read) { return 0; }")
                b.cleanup()
                _FENTRY_OK = (True, "")
        except Exception as e:
            msg = str(e).splitlines()[-1] if str(e) else type(e).__name__
            if "super-user" in msg or "ermission" in msg:      # BCC's words for EPERM
                msg = "EPERM (BPF trampolines/ftrace blocked on this kernel)"
            _FENTRY_OK = (False, f"fentry attach failed: {msg}")
    return _FENTRY_OK


_VFS_KPROBES = (("vfs_read", "ss_kp_read"), ("vfs_write", "ss_kp_write"),
                ("vfs_readv", "ss_kp_readv"), ("vfs_writev", "ss_kp_writev"),
                ("vfs_fsync_range", "ss_kp_fsync"))


def _vfs_methods(cfg, tracefs):
    def fentry():
        ok, why = fentry_works()
        if not ok:
            raise ProbeError(why)
        return _load("vfs", base_cflags(cfg) + ["-DSS_VFS_FENTRY"]), \
            "fentry/fexit vfs_read vfs_write vfs_fsync_range"

    def kprobe():
        if not kernel.has_kprobes(tracefs):
            raise ProbeError("kernel has no kprobes (CONFIG_KPROBES off)")
        b = _load("vfs", base_cflags(cfg) + ["-DSS_VFS_KPROBE"])
        attached = []
        for sym, fn in _VFS_KPROBES:
            if not kernel.kernel_has_symbol(sym):
                continue
            b.attach_kprobe(event=sym, fn_name=fn)
            b.attach_kretprobe(event=sym, fn_name="ss_kret")
            attached.append(sym)
        if "vfs_read" not in attached:
            raise ProbeError("vfs_read is not a kprobe-able symbol on this kernel")
        return b, "kprobe/kretprobe " + " ".join(attached)

    def tracepoint():
        if not os.path.isdir(os.path.join(tracefs, "events/syscalls/sys_enter_read")):
            raise ProbeError("no syscall tracepoints (CONFIG_FTRACE_SYSCALLS off)")
        return _load("vfs", base_cflags(cfg)), "syscall tracepoints read write pread64 pwrite64 " \
            "readv writev fsync fdatasync"
    return [("fentry", fentry), ("kprobe", kprobe), ("tracepoint", tracepoint)]


def _tp_has_field(tracefs, tp, field):
    try:
        with open(os.path.join(tracefs, "events", tp, "format")) as f:
            return f" {field};" in f.read()
    except OSError:
        return False


def _tp_family(family, needed):
    def methods(cfg, tracefs):
        def tracepoint():
            missing = [tp for tp in needed if not os.path.isdir(os.path.join(tracefs, "events", tp))]
            if missing:
                raise ProbeError(f"tracepoint {missing[0]} not found")
            extra = []
            if family == "tcp" and _tp_has_field(tracefs, "tcp/tcp_retransmit_skb", "err"):
                extra.append("-DSS_TCP_HAS_ERR")
            return _load(family, base_cflags(cfg) + extra), "tracepoints " + " ".join(needed)
        return [("tracepoint", tracepoint)]
    return methods


def _plugin_methods(family):
    """nfs and rdma describe their own methods in tracer/probes_<family>.py."""
    def methods(cfg, tracefs):
        import importlib
        try:
            mod = importlib.import_module(f"tracer.probes_{family}")
        except ImportError:
            return []
        return mod.methods(cfg, tracefs, _load, base_cflags)
    return methods


FAMILY_METHODS = {
    "vfs": _vfs_methods,
    "tcp": _tp_family("tcp", ["tcp/tcp_retransmit_skb", "tcp/tcp_retransmit_synack",
                              "sock/inet_sock_set_state"]),
    "block": _tp_family("block", ["block/block_rq_issue", "block/block_rq_complete"]),
    "nfs": _plugin_methods("nfs"),
    "rdma": _plugin_methods("rdma"),
}


def load(cfg: ProbeConfig, log=lambda msg: None):
    """Load every requested family. Returns (loaded probes, {family: reason not loaded})."""
    tracefs = kernel.tracefs_root()
    loaded, failed = [], {}
    for fam in cfg.families:
        try:
            methods = FAMILY_METHODS[fam](cfg, tracefs)
        except Exception as e:     # a family's own capability checks failing loses that family only
            failed[fam] = f"{type(e).__name__}: {e}"
            log(f"{fam}: not loaded ({failed[fam]})")
            continue
        if cfg.attach != "auto":
            methods = [m for m in methods if m[0] == cfg.attach] or methods[-1:]
        reasons = []
        for name, fn in methods:
            try:
                b, detail = fn()
                loaded.append(LoadedProbe(fam, name, b, detail))
                log(f"{fam}: {detail}" + (f" (not {'; not '.join(reasons)})" if reasons else ""))
                break
            except Exception as e:
                msg = str(e).strip().splitlines()
                reasons.append(f"{name}: {msg[-1] if msg else type(e).__name__}")
        else:
            failed[fam] = "; ".join(reasons) or "no probe source for this kernel"
            log(f"{fam}: not loaded ({failed[fam]})")
    return loaded, failed


def dump(cfg: ProbeConfig, family: str) -> str:
    """The final program text and flags for one family (like BCC's --ebpf)."""
    return "// cflags: " + " ".join(base_cflags(cfg)) + "\n" + _source_text(family)
