"""The VFS family (bpf/vfs.bpf.c): every way a thread waits on a file, by file.

Attach methods, best first: fentry/fexit on vfs_read, vfs_write, plus
vfs_readv/vfs_writev where this kernel has them as functions (optional targets:
one missing or inlined costs that op, reported in the detail line);
kprobe/kretprobe on all four; syscall enter/exit tracepoints. With each, the
ops no vfs_* function sees reliably (fsync and fdatasync, sendfile,
splice, copy_file_range, openat, stat, getdents, io_uring and AIO waits) come
from syscall tracepoints, each compiled in only where the kernel has it.
Records become the ``io`` table; storms of short ops arrive as aggregate
records (``count`` ops, ``blocked_ns`` summed latency), and :func:`sweep`
finishes the storms whose thread went quiet.
"""

from __future__ import annotations

import ctypes as ct
import functools
import os
import re
import time

import numpy as np

from stallscope.tracer import kernel
from stallscope.tracer.bpfload import (
    ProbeError,
    base_cflags,
    detach_kfuncs,
    fentry_targets,
    fentry_works,
    kfuncs_unattached,
    load_bpf,
    load_optional,
    tp_exists,
)
from stallscope.tracer.decode import fs_names, ops, paths
from stallscope.wire.schema import DEFINES, RECORD_DTYPE, T_VFS

NAME = "vfs"
RECORD_TYPES = (T_VFS,)
AGGREGATE = DEFINES["SS_F_AGGREGATE"]
KPROBES = (("vfs_read", "ss_kp_read"), ("vfs_write", "ss_kp_write"),
           ("vfs_readv", "ss_kp_readv"), ("vfs_writev", "ss_kp_writev"))
#: kretprobe instances per function. Every thread blocked in read() on a pipe, tty or socket
#: holds one of vfs_read's while it blocks; the kernel's default (one per CPU on a non-preemptible
#: kernel such as Debian 11's 5.10) ran out in the guest and every other read's return was lost.
#: 4096 is the kernel's maximum (KRETPROBE_MAXACTIVE_MAX).
KRETPROBE_MAXACTIVE = 4096
#: fentry targets the family needs (the method fails without both entry and exit of each)
FENTRY_BASE = ("vfs_read", "vfs_write")
#: fentry targets the family uses where the kernel has them (static in fs/read_write.c)
FENTRY_OPTIONAL = ("vfs_readv", "vfs_writev")
BASE_SYSCALLS = ("read", "write", "pread64", "pwrite64", "readv", "writev")
#: syscalls traced by tracepoint with every attach method (-DSS_TP_<name> where present).
#: fsync and fdatasync too: vfs_fsync_range is inlined into sys_fdatasync on 5.10 and 6.1
#: (datasync constant), so function probes never saw an fdatasync there.
EXTRA_SYSCALLS = ("fsync", "fdatasync", "close", "sendfile64", "splice", "copy_file_range", "openat", "openat2",
                  "statx", "newfstatat", "getdents64", "io_uring_enter", "io_getevents", "io_pgetevents")
#: the shared exit program of each syscall (by what its fd or argument is)
EXIT_FN = {**{s: "ss_exit_fd" for s in (*BASE_SYSCALLS, "fsync", "fdatasync", "sendfile64", "splice",
                                          "copy_file_range")},
           "openat": "ss_exit_open", "openat2": "ss_exit_open", "statx": "ss_exit_stat",
           "newfstatat": "ss_exit_stat", "getdents64": "ss_exit_dir",
           "io_uring_enter": "ss_exit_wait", "io_getevents": "ss_exit_wait",
           "io_pgetevents": "ss_exit_wait", "close": "ss_exit_close"}
#: struct ss_storm in bpf/vfs.bpf.c: a storm's record and when it may be flushed
STORM_DTYPE = np.dtype([("e", RECORD_DTYPE), ("deadline", "<u8"), ("last_file", "<u8")])
_RET_AT_16 = re.compile(r"field:long ret;\s*offset:16;\s*size:8;")


def _exit_layout_ok(tracefs: str, syscall: str) -> bool:
    """sys_exit_<syscall> has `long ret` at offset 16, as struct ss_sys_exit assumes."""
    try:
        with open(os.path.join(tracefs, "events/syscalls", f"sys_exit_{syscall}", "format")) as f:
            return bool(_RET_AT_16.search(f.read()))
    except OSError:
        return False


def extra_ops(tracefs: str) -> tuple:
    """(-D flags, names, note) for the extra syscalls: those whose enter and exit
    tracepoints this kernel has, and a note naming the others (that op only is lost)."""
    have = [s for s in EXTRA_SYSCALLS
            if tp_exists(tracefs, f"syscalls/sys_enter_{s}") and _exit_layout_ok(tracefs, s)]
    missing = [s for s in EXTRA_SYSCALLS if s not in have]
    note = f" (no tracepoint, not traced: {' '.join(missing)})" if missing else ""
    return [f"-DSS_TP_{s}" for s in have], have, note


def load_and_attach(cflags, syscalls):
    """Compile (enter tracepoints attach themselves), then attach each syscall's exit
    tracepoint to its kind's shared exit program; nothing stays attached on failure."""
    b = load_bpf(NAME, cflags)
    try:
        for s in syscalls:
            b.attach_tracepoint(tp=f"syscalls:sys_exit_{s}".encode(), fn_name=EXIT_FN[s].encode())
    except Exception:
        b.cleanup()
        raise
    return b


def methods(cfg, tracefs):
    flags, have, note = extra_ops(tracefs)
    extra = f"; syscall tracepoints {' '.join(have)}{note}" if have else note

    def fentry():
        ok, why = fentry_works()
        if not ok:
            raise ProbeError(why)
        present, missing = fentry_targets(FENTRY_OPTIONAL)
        b, attached, missing = load_optional(
            lambda opt: load_and_attach(base_cflags(cfg) + ["-DSS_VFS_FENTRY", *opt, *flags], have),
            lambda sym: f"-DSS_FENTRY_{sym}", present, missing)
        base_lost = kfuncs_unattached(b, FENTRY_BASE)
        if base_lost:
            b.cleanup()
            raise ProbeError("; ".join(f"{sym}: {why}" for sym, why in base_lost.items()))
        half = kfuncs_unattached(b, attached)
        detach_kfuncs(b, half)
        missing.update(half)
        attached = [s for s in attached if s not in half]
        lost = "; ".join(f"{sym}: {why}" for sym, why in missing.items())
        return b, ("fentry/fexit vfs_read vfs_write" + "".join(f" {s}" for s in attached)
                   + (f" (not attached: {lost})" if lost else "") + extra)

    def kprobe():
        if not kernel.has_kprobes(tracefs):
            raise ProbeError("kernel has no kprobes (CONFIG_KPROBES off)")
        b = load_and_attach(base_cflags(cfg) + ["-DSS_VFS_KPROBE", *flags], have)
        attached = []
        for sym, fn in KPROBES:
            if not kernel.kernel_has_symbol(sym):
                continue
            b.attach_kprobe(event=sym, fn_name=fn)
            b.attach_kretprobe(event=sym, fn_name="ss_kret", maxactive=KRETPROBE_MAXACTIVE)
            attached.append(sym)
        if "vfs_read" not in attached:
            raise ProbeError("vfs_read is not a kprobe-able symbol on this kernel")
        return b, "kprobe/kretprobe " + " ".join(attached) + extra

    def tracepoint():
        if not os.path.isdir(os.path.join(tracefs, "events/syscalls/sys_enter_read")):
            raise ProbeError("no syscall tracepoints (CONFIG_FTRACE_SYSCALLS off)")
        if not _exit_layout_ok(tracefs, "read"):
            raise ProbeError("sys_exit_read has no `long ret` at offset 16")
        b = load_and_attach(base_cflags(cfg) + flags, (*BASE_SYSCALLS, *have))
        return b, "syscall tracepoints " + " ".join((*BASE_SYSCALLS, *have)) + note
    return [("fentry", fentry), ("kprobe", kprobe), ("tracepoint", tracepoint)]


@functools.lru_cache(maxsize=1)
def _libbcc():
    from bcc import libbcc
    lib = libbcc.lib
    lib.bpf_lookup_and_delete.restype = ct.c_int
    lib.bpf_lookup_and_delete.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    return lib


def sweep(bpf, now_ns: int | None = None) -> np.ndarray:
    """The tails of storms whose thread went quiet, as records (RECORD_DTYPE).

    The kernel keeps a storm that has emitted a part in the ``storms`` map and
    emits its last part (the tail) itself when the thread's next counted op does
    not continue it. A thread that goes quiet never makes that op, so this takes
    every entry past its deadline (no op can still join it) out of the map and
    returns the tail. Whoever deletes an entry reports it, so a tail is never
    reported twice. Called with every drain; an empty map costs one syscall.
    """
    try:
        fd = bpf[b"storms"].map_fd
    except KeyError:
        return np.empty(0, RECORD_DTYPE)
    lib = _libbcc()
    now = time.monotonic_ns() if now_ns is None else now_ns     # = bpf_ktime_get_ns
    keys, key, nxt = [], ct.c_uint32(), ct.c_uint32()
    if lib.bpf_get_first_key(fd, ct.byref(key), ct.sizeof(key)) == 0:
        keys.append(key.value)
        while lib.bpf_get_next_key(fd, ct.byref(key), ct.byref(nxt)) == 0 and len(keys) < 65536:
            keys.append(nxt.value)
            key.value = nxt.value
    if not keys:
        return np.empty(0, RECORD_DTYPE)
    out = []
    val = np.zeros(1, STORM_DTYPE)
    for k in keys:
        key.value = k
        if lib.bpf_lookup_elem(fd, ct.byref(key), val.ctypes.data) != 0 or int(val["deadline"][0]) > now:
            continue
        if lib.bpf_lookup_and_delete(fd, ct.byref(key), val.ctypes.data) != 0:
            # kernels before 5.14 cannot look up and delete a hash entry at once: the
            # lookup above holds the value, and the delete decides who reports it
            if lib.bpf_lookup_elem(fd, ct.byref(key), val.ctypes.data) != 0 or \
                    lib.bpf_delete_elem(fd, ct.byref(key)) != 0:
                continue
        if int(val["e"]["aux"][0]):
            out.append(val["e"].copy())
    return np.concatenate(out) if out else np.empty(0, RECORD_DTYPE)


def decode(rtype, r, base, method) -> dict:
    agg = (r["flags"] & AGGREGATE) != 0
    return {"io": {**base, "op": ops(r["op"]), "bytes": r["ret"].astype(np.int64), "path": paths(r),
                   "fs": fs_names(r["fs_magic"]), "dev": r["dev"].astype(np.uint64),
                   "ino": r["ino"].astype(np.uint64), "cgroup": r["cgroup_id"].astype(np.uint64),
                   "method": method,
                   "count": np.where(agg, r["aux"], 1).astype(np.uint64),
                   # files a storm's ops went to besides the one its path names (a storm
                   # over many small files of one filesystem; 0: one file), so its parts sum
                   # to its files less one
                   "more_files": np.where(agg, r["segs"], 0).astype(np.uint64),
                   "blocked_ns": np.where(agg, r["key"], r["dur_ns"]).astype(np.uint64)}}
