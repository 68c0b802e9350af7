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
import time

import numpy as np

from stallscope.wire.schema import COUNTER_NAMES, HIST_SLOTS, NOPS, OP_NAMES

from . import bpfload, kernel
from .bpfload import base_cflags, source_text
from .families import BY_NAME, DEFAULT_FAMILIES
from .ring import RingReader

ATTACH_CHOICES = ("auto", "fentry", "kprobe", "uprobe", "raw_tracepoint", "tracepoint")
#: how often a family's user-space finishing (vfs: tails of storms whose thread went quiet)
#: runs: a map walk each time, so not on every 10-50 ms drain; a tail waits at most this long
SWEEP_S = 0.1


@dataclasses.dataclass
class ProbeConfig:
    min_latency_ns: int = 10_000_000
    pid: int = 0
    cgroup_id: int = 0
    families: tuple = DEFAULT_FAMILIES
    attach: str = "auto"
    ringbuf_pages: int = 4096          # 16 MiB per family
    extra_cflags: tuple = ()


class LoadedProbe:
    """One loaded family: its BPF object, ring reader and counters."""

    def __init__(self, family: str, method: str, bpf, detail: str = ""):
        self.family = family
        self.method = method
        self.detail = detail
        self.bpf = bpf
        ring = bpf[b"events"]
        size = int(ring.max_entries) if hasattr(ring, "max_entries") else map_max_entries(ring.map_fd)
        self.ring = RingReader(ring.map_fd, size)
        # records a family finishes in user space (vfs: storm tails of quiet threads)
        self._sweep = getattr(BY_NAME.get(family), "sweep", None)
        self._hist_total: int | None = None     # sum of the histogram at its last read
        self._swept_at = -SWEEP_S

    def drain(self, final: bool = False) -> np.ndarray:
        """The records committed so far, and (every SWEEP_S, and when ``final``) what the
        family finishes in user space."""
        recs = self.ring.drain()
        now = time.monotonic()
        if self._sweep is not None and (final or now - self._swept_at >= SWEEP_S):
            self._swept_at = now
            extra = self._sweep(self.bpf)
            if len(extra):
                recs = np.concatenate([recs, extra]) if len(recs) else extra
        return recs

    def counters(self) -> dict:
        sums = percpu_array_sums(self.bpf[b"counters"], max(COUNTER_NAMES) + 1)
        out = {name: int(sums[idx]) for idx, name in COUNTER_NAMES.items()}
        out["odd_records"] = self.ring.odd_records
        if self.family == "vfs":      # the hot path skips the counter: the histogram has it
            if self._hist_total is None:
                self._hist()
            out["below_threshold"] = self._hist_total      # as of the last histogram read
        return out

    def _hist(self) -> np.ndarray:
        vals = percpu_array_sums(self.bpf[b"hist"], NOPS * HIST_SLOTS)
        self._hist_total = int(vals.sum())
        return vals

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


def map_max_entries(fd: int) -> int:
    """A BPF map's max_entries from the kernel (BPF_OBJ_GET_INFO_BY_FD), for BCC versions whose
    table objects do not carry it (Debian 11's 0.18); 0 when the kernel does not say."""
    import ctypes as ct

    from bcc import libbcc
    info = (ct.c_uint32 * 32)()       # struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
    size = ct.c_uint32(ct.sizeof(info))
    lib = libbcc.lib
    lib.bpf_obj_get_info.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    if lib.bpf_obj_get_info(fd, info, ct.byref(size)) != 0:
        return 0
    return int(info[4])


_NCPU = None


def percpu_array_sums(table, n: int) -> np.ndarray:
    """Sum over CPUs of every slot of a BPF_PERCPU_ARRAY, in one batch syscall
    (BPF_MAP_LOOKUP_BATCH, Linux 5.6+) instead of one lookup per key; falls back
    to per-key lookups where batching is missing (in the kernel, or in libbcc: 0.18,
    Debian 11's, has no bpf_lookup_batch)."""
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
    batch = getattr(libbcc.lib, "bpf_lookup_batch", None)
    res = -1 if batch is None else batch(table.map_fd, None, ct.byref(out_batch),
                                         keys.ctypes.data_as(ct.c_void_p), vals.ctypes.data_as(ct.c_void_p),
                                         ct.byref(cnt))
    if res == 0 or (batch is not None and ct.get_errno() == errno.ENOENT and cnt.value == n):
        return vals.sum(axis=1)
    out = np.zeros(n, dtype=np.uint64)
    for k, v in table.items():        # every key of the map: it may have more slots than asked for
        if k.value < n:
            out[k.value] = sum(v)
    return out


def _methods(cfg: ProbeConfig, family: str, tracefs: str) -> list:
    """The family's (name, loader) methods, best first; only the one --attach names (or the
    last) when it names one."""
    methods = BY_NAME[family].methods(cfg, tracefs)
    if cfg.attach != "auto":
        methods = [m for m in methods if m[0] == cfg.attach] or methods[-1:]
    return methods


def _why(name: str, e: Exception) -> str:
    """Why method ``name`` did not load: the last line of its error."""
    msg = str(e).strip().splitlines()
    return f"{name}: {msg[-1] if msg else type(e).__name__}"


def _not(reasons: list) -> str:
    """`` (not kprobe: ...; not fentry: ...)`` after the method that loaded."""
    return f" (not {'; not '.join(reasons)})" if reasons else ""


def load(cfg: ProbeConfig, log=lambda msg: None):
    """Load every requested family. Returns (loaded probes, {family: reason not loaded})."""
    tracefs = kernel.tracefs_root()
    removed, stuck = kernel.remove_stale_bcc_probes(tracefs)
    if removed or stuck:
        log(f"removed {len(removed)} probe event(s) left registered by BCC processes that died"
            + (f" ({len(stuck)} in use, left)" if stuck else "") + ": " + " ".join(removed + stuck))
    loaded, failed = [], {}
    for fam in cfg.families:
        try:
            methods = _methods(cfg, fam, tracefs)
        except Exception as e:     # a family's own capability checks failing loses that family only
            failed[fam] = f"{type(e).__name__}: {e}"
            log(f"{fam}: not loaded ({failed[fam]})")
            continue
        reasons = []
        for name, fn in methods:
            try:
                b, detail = fn()
                loaded.append(LoadedProbe(fam, name, b, detail))
                log(f"{fam}: {detail}{_not(reasons)}")
                break
            except Exception as e:
                reasons.append(_why(name, e))
        else:
            failed[fam] = "; ".join(reasons) or "no probe source for this kernel"
            log(f"{fam}: not loaded ({failed[fam]})")
    return loaded, failed


def dump(cfg: ProbeConfig, family: str) -> str:
    """The program one family would load on this kernel (like BCC's --ebpf): its methods are
    tried in order, as :func:`load` does, up to the compile, which is not done. The text
    starts with the method and the exact flags, so it compiles on its own. Where no method
    gets that far, the base flags and the reasons are given instead."""
    try:
        headers = kernel.ensure_headers()      # as the agent does: capability checks compile
    except kernel.Unavailable as e:
        headers = str(e)
    reasons = []
    try:
        methods = _methods(cfg, family, kernel.tracefs_root())
    except Exception as e:         # the family's own capability checks, as in load()
        methods, reasons = [], [f"{type(e).__name__}: {e}"]
    for name, fn in methods:
        try:
            with bpfload.dumping():
                loaded = fn()
        except bpfload.DumpOnly as d:
            return (f"// {family}: method {name}{_not(reasons)}\n// headers: {headers}\n"
                    f"// cflags: {' '.join(d.cflags)}\n{d.text or source_text(family)}")
        except Exception as e:
            reasons.append(_why(name, e))
        else:         # a method that loads without load_bpf: nothing to show but what it got
            loaded[0].cleanup()
            reasons.append(f"{name}: loads without a program of its own")
    return (f"// {family}: no method loads on this kernel ({'; '.join(reasons)}); "
            f"the family's own flags are missing below\n// headers: {headers}\n"
            f"// cflags: {' '.join(base_cflags(cfg))}\n{source_text(family)}")
