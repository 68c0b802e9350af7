"""The NFS probe family (bpf/nfs.bpf.c): attach methods and decoding.

``methods(cfg, tracefs)`` returns ``[(name, fn), ...]`` best
first; ``fn()`` returns ``(bpf_object, detail)``. Two methods:

* ``kprobe``: kprobe/kretprobe on the NFS client's file operations (read, write,
  fsync, open, getattr: the caller's latency, with its pid, the file path and
  the server), plus the RPC part below.
* ``tracepoint``: the RPC part only: raw tracepoints ``sunrpc:rpc_stats_latency``
  (latency, xid, server, owner, procedure of every RPC) and
  ``sunrpc:xprt_retransmit`` (retransmissions). Per-file ops need kprobes: the
  NFS tracepoints carry no file path in the caller's context.

Everything lives in modules (nfs, nfsv4, sunrpc) on distribution kernels: the
family loads only once the NFS client is (after the first NFS mount); struct
offsets come from their BTF (:mod:`stallscope.tracer.btf_modules`).
"""

from __future__ import annotations

import os

import numpy as np

from stallscope.tracer import btf, btf_modules, kernel
from stallscope.tracer.bpfload import ProbeError, base_cflags, kallsyms_present, load_bpf
from stallscope.tracer.decode import constant, fs_names, key64, ops, paths, servers, unique_map
from stallscope.wire.schema import T_NFS, T_NFS_RPC

NAME = "nfs"
RECORD_TYPES = (T_NFS, T_NFS_RPC)

# (kernel function, entry handler, return handler)
FILE_OPS = (
    ("nfs_file_read", "ss_nfs_read", "ss_nfs_read_ret"),
    ("nfs_file_write", "ss_nfs_write", "ss_nfs_write_ret"),
    ("nfs_file_fsync", "ss_nfs_fsync", "ss_nfs_fsync_ret"),
    ("nfs_file_open", "ss_nfs_open", "ss_nfs_open_ret"),      # v2/v3
    ("nfs4_file_open", "ss_nfs_open", "ss_nfs_open_ret"),     # v4.x (nfsv4 module)
    ("nfs_getattr", "ss_nfs_getattr", "ss_nfs_getattr_ret"),
)
RPC_TRACEPOINTS = ("sunrpc/rpc_stats_latency", "sunrpc/xprt_retransmit")
# NFS ops block for whole RPC round trips, many at once with parallel readers:
# the kernel's default of max(10, 2 * CPUs) kretprobe instances would miss returns
KRETPROBE_MAXACTIVE = 256

#: -D macro -> (struct, member path, modules that may define the struct)
FILE_FIELDS = {
    "OFF_KIOCB_FILP": ("kiocb", "ki_filp", ()),
    "OFF_SB_FS_INFO": ("super_block", "s_fs_info", ()),
    "OFF_PATH_DENTRY": ("path", "dentry", ()),
    "OFF_PATH_MNT": ("path", "mnt", ()),
    "OFF_DENTRY_INODE": ("dentry", "d_inode", ()),
    "OFF_NFS_SERVER_CLIENT": ("nfs_server", "nfs_client", ("nfs",)),
    "OFF_NFS_CLIENT_ADDR": ("nfs_client", "cl_addr", ("nfs",)),
}
RPC_FIELDS = {
    "OFF_TASK_RQSTP": ("rpc_task", "tk_rqstp", ("sunrpc",)),
    "OFF_TASK_OWNER": ("rpc_task", "tk_owner", ("sunrpc",)),
    "OFF_TASK_CLIENT": ("rpc_task", "tk_client", ("sunrpc",)),
    "OFF_TASK_PROC": ("rpc_task", "tk_msg.rpc_proc", ("sunrpc",)),
    "OFF_TASK_STATUS": ("rpc_task", "tk_status", ("sunrpc",)),
    "OFF_RQST_XID": ("rpc_rqst", "rq_xid", ("sunrpc",)),
    "OFF_RQST_XPRT": ("rpc_rqst", "rq_xprt", ("sunrpc",)),
    "OFF_RQST_REPLY_BYTES": ("rpc_rqst", "rq_reply_bytes_recvd", ("sunrpc",)),
    "OFF_RQST_TASK": ("rpc_rqst", "rq_task", ("sunrpc",)),
    "OFF_XPRT_ADDR": ("rpc_xprt", "addr", ("sunrpc",)),
    "OFF_CLNT_PROGRAM": ("rpc_clnt", "cl_program", ("sunrpc",)),
    "OFF_CLNT_VERS": ("rpc_clnt", "cl_vers", ("sunrpc",)),
    "OFF_PROGRAM_NAME": ("rpc_program", "name", ("sunrpc",)),
    "OFF_PROCINFO_NAME": ("rpc_procinfo", "p_name", ("sunrpc",)),
}
_FAKE_FILE_LEN = 1024      # NFS_FAKE_FILE_LEN in nfs.bpf.c


def _offsets(fields: dict) -> list:
    try:
        return btf_modules.offset_cflags(fields)
    except btf.BtfError as e:
        raise ProbeError(f"struct offsets unavailable: {e}") from e


def _need_rpc_tracepoints(tracefs: str):
    for tp in RPC_TRACEPOINTS:
        if not os.path.isdir(os.path.join(tracefs, "events", tp)):
            raise ProbeError(f"tracepoint {tp.replace('/', ':')} not found (the sunrpc module is "
                             "not loaded: no NFS mount yet?)")


def _fake_file_fits(cflags: list):
    """nfs.bpf.c lays out a stand-in struct file in NFS_FAKE_FILE_LEN bytes."""
    for flag in cflags:
        name, _, val = flag[2:].partition("=")
        if name in ("OFF_FILE_PATH_DENTRY", "OFF_FILE_PATH_MNT", "OFF_FILE_INODE") and \
                int(val) + 8 > _FAKE_FILE_LEN:
            raise ProbeError(f"struct file member {name} at {val} is beyond the getattr stand-in")


def methods(cfg, tracefs):
    def rpc_detail():
        return "raw tracepoints " + " ".join(tp.replace("/", ":") for tp in RPC_TRACEPOINTS)

    def kprobe():
        if not kernel.has_kprobes(tracefs):
            raise ProbeError("kernel has no kprobes (CONFIG_KPROBES off)")
        _need_rpc_tracepoints(tracefs)
        syms = kallsyms_present(s for s, _, _ in FILE_OPS)
        if "nfs_file_read" not in syms:
            raise ProbeError("the NFS client is not loaded (no nfs_file_read in /proc/kallsyms): "
                             "no NFS mount yet")
        base = base_cflags(cfg)
        _fake_file_fits(base)
        extra = ["-DSS_NFS_KPROBE"]
        ops = [op for op in FILE_OPS if op[0] in syms]
        skipped = ""
        try:
            arg = btf_modules.param_index("nfs_getattr", "path", ("nfs",))
        except btf.BtfError as e:
            arg, skipped = -1, f"; nfs_getattr skipped: {e}"
        if arg in (0, 1):
            extra.append(f"-DNFS_GETATTR_PATH_ARG={arg}")
        else:
            extra.append("-DNFS_GETATTR_PATH_ARG=1")
            skipped = skipped or f"; nfs_getattr skipped: its path is parameter {arg}"
            ops = [op for op in ops if op[0] != "nfs_getattr"]
        b = load_bpf("nfs", base + _offsets(FILE_FIELDS) + _offsets(RPC_FIELDS) + extra)
        attached = []
        for sym, entry, ret in ops:
            b.attach_kprobe(event=sym.encode(), fn_name=entry.encode())
            b.attach_kretprobe(event=sym.encode(), fn_name=ret.encode(), maxactive=KRETPROBE_MAXACTIVE)
            attached.append(sym)
        return b, f"kprobe/kretprobe {' '.join(attached)} (file ops); {rpc_detail()} (RPCs){skipped}"

    def tracepoint():
        _need_rpc_tracepoints(tracefs)
        b = load_bpf("nfs", base_cflags(cfg) + _offsets(RPC_FIELDS))
        return b, f"{rpc_detail()} (RPCs only: per-file ops need kprobes)"

    return [("kprobe", kprobe), ("tracepoint", tracepoint)]


def decode(rtype, r, base, method) -> dict:
    """File ops and RPCs both become rows of the ``nfs`` table."""
    if rtype == T_NFS:
        return {"nfs": {**base, "op": ops(r["op"]), "bytes": r["ret"].astype(np.int64), "path": paths(r),
                        "fs": fs_names(r["fs_magic"]), "server": servers(r),
                        "xid": r["key"].astype(np.uint64), "rpc_retrans": r["aux"].astype(np.uint64),
                        "method": method}}
    # an RPC record's path holds "PROC\0prog\0" and state the program version: "nfsv3 READ"
    with np.errstate(over="ignore"):
        key = key64(r["path"]) * np.uint64(257) + r["state"].astype(np.uint64)
    names = unique_map(r[["path", "state"]], lambda x: rpc_name(bytes(x["path"]), int(x["state"])), key=key)
    return {"nfs": {**base, "op": ops(r["op"]), "bytes": r["ret"].astype(np.int64), "path": names,
                    "fs": constant("nfs", len(r)), "server": servers(r),
                    "xid": r["key"].astype(np.uint64), "rpc_retrans": r["aux"].astype(np.uint64),
                    "method": method}}


def rpc_name(raw: bytes, vers: int) -> str:
    """An NFS_RPC record's path field ("PROC\\0prog\\0") -> "progvN PROC" ("nfsv3 READ")."""
    parts = raw.split(b"\0")
    proc = parts[0].decode("utf-8", "replace")
    prog = parts[1].decode("utf-8", "replace") if len(parts) > 1 else ""
    return f"{prog}v{vers} {proc}" if prog else proc
