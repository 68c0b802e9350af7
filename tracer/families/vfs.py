"""The VFS family (bpf/vfs.bpf.c): read/write/fsync latency by file.

Attach methods, best first: fentry/fexit on vfs_read, vfs_write,
vfs_fsync_range; kprobe/kretprobe on those plus vfs_readv/vfs_writev; syscall
enter/exit tracepoints. Records become the ``io`` table.
"""

from __future__ import annotations

import os

import numpy as np

from stallscope.tracer import kernel
from stallscope.tracer.bpfload import ProbeError, base_cflags, fentry_works, load_bpf
from stallscope.tracer.decode import fs_names, ops, paths
from stallscope.wire.schema import DEFINES, T_VFS

NAME = "vfs"
RECORD_TYPES = (T_VFS,)
AGGREGATE = DEFINES["SS_F_AGGREGATE"]
KPROBES = (("vfs_read", "ss_kp_read"), ("vfs_write", "ss_kp_write"),
           ("vfs_readv", "ss_kp_readv"), ("vfs_writev", "ss_kp_writev"),
           ("vfs_fsync_range", "ss_kp_fsync"))


def methods(cfg, tracefs):
    def fentry():
        ok, why = fentry_works()
        if not ok:
            raise ProbeError(why)
        return load_bpf(NAME, base_cflags(cfg) + ["-DSS_VFS_FENTRY"]), \
            "fentry/fexit vfs_read vfs_write vfs_fsync_range"

    def kprobe():
        if not kernel.has_kprobes(tracefs):
            raise ProbeError("kernel has no kprobes (CONFIG_KPROBES off)")
        b = load_bpf(NAME, base_cflags(cfg) + ["-DSS_VFS_KPROBE"])
        attached = []
        for sym, fn in KPROBES:
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
        return load_bpf(NAME, base_cflags(cfg)), "syscall tracepoints read write pread64 pwrite64 " \
            "readv writev fsync fdatasync"
    return [("fentry", fentry), ("kprobe", kprobe), ("tracepoint", tracepoint)]


def decode(rtype, r, base, method) -> dict:
    agg = (r["flags"] & AGGREGATE) != 0
    return {"io": {**base, "op": ops(r["op"]), "bytes": r["ret"].astype(np.int64), "path": paths(r),
                   "fs": fs_names(r["fs_magic"]), "dev": r["dev"].astype(np.uint64),
                   "ino": r["ino"].astype(np.uint64), "cgroup": r["cgroup_id"].astype(np.uint64),
                   "method": method,
                   "count": np.where(agg, r["aux"], 1).astype(np.uint64),
                   "blocked_ns": np.where(agg, r["key"], r["dur_ns"]).astype(np.uint64)}}
