"""A known NFS workload for the probe tests, run as its own process (its pid is the one to find).

    python3 nfsload.py DIR COUNT [--opens]

On files that the caller created on the server side (DIR is the client's view of
``/srv/nfs/<sub>``: ``data``, ``rdata`` and ``vdata`` of COUNT * 4 KiB each, empty ``out``,
``wout``, ``vout``, ``meta`` and ``opn``), it makes COUNT of each of these calls, every one
of which needs at least one RPC round trip (each op on its own file, so a probe's events
for a file are exactly one op's calls):

* ``pread``   4 KiB O_DIRECT pread(2)s of ``data`` (no page cache, no readahead: one READ each)
* ``read``    4 KiB O_DIRECT read(2)s of ``rdata``, in order (vfs_read, like pread)
* ``readv``   one-vector O_DIRECT readv(2)s of ``vdata`` (vfs_readv)
* ``pwrite``  4 KiB O_DIRECT pwrite(2)s to ``out`` (one WRITE each)
* ``write``   4 KiB O_DIRECT write(2)s to ``wout`` (vfs_write)
* ``writev``  one-vector O_DIRECT writev(2)s to ``vout`` (vfs_writev)
* ``fsync``   of ``ckpt`` after a buffered 4 KiB write (the flush: one WRITE each)
* ``fdatasync`` of ``dckpt`` after a buffered 4 KiB write (sys_fdatasync)
* ``statx``   of ``meta`` with AT_STATX_FORCE_SYNC (one GETATTR each)
* ``open``    of ``opn`` for writing (with ``--opens``; on NFSv4 one OPEN each, then a close)

Files are opened and looked up once before the timed calls, so those need no lookup.
pread/pwrite (not preadv/pwritev) go through vfs_read/vfs_write, which every VFS attach
method hooks; NFS takes O_DIRECT buffers at any alignment.
Prints one JSON object: ``pid``, ``tid``, ``comm`` and ``ops``, each with ``op``, ``path``,
wall-clock and CLOCK_MONOTONIC (= bpf_ktime_get_ns) start/end ns and the return value.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

COMM = "ss-nfsload"
BLOCK = 4096
AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF


def main(argv: list[str]) -> None:
    directory, count, opens = argv[0], int(argv[1]), "--opens" in argv
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, COMM.encode(), 0, 0, 0)  # PR_SET_NAME
    names = ("data", "rdata", "vdata", "out", "wout", "vout", "ckpt", "dckpt", "meta", "opn")
    path = {name: os.path.join(directory, name) for name in names}
    buf = b"\x5a" * BLOCK
    statx_buf = ctypes.create_string_buffer(256)
    fds = {n: os.open(path[n], os.O_RDONLY | os.O_DIRECT) for n in ("data", "rdata", "vdata")}
    fds.update({n: os.open(path[n], os.O_WRONLY | os.O_DIRECT) for n in ("out", "wout", "vout")})
    fds.update({n: os.open(path[n], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for n in ("ckpt", "dckpt")})
    data_fd, out_fd, ckpt_fd = fds["data"], fds["out"], fds["ckpt"]
    vbuf = bytearray(BLOCK)
    os.close(os.open(path["opn"], os.O_WRONLY))
    os.stat(path["meta"])
    ops = []

    def timed(op, name, call):
        s_w, s_m = time.time_ns(), time.monotonic_ns()
        ret = call()
        e_m, e_w = time.monotonic_ns(), time.time_ns()
        ops.append({"op": op, "path": path[name], "start_wall_ns": s_w, "end_wall_ns": e_w,
                    "start_mono_ns": s_m, "end_mono_ns": e_m, "ret": ret if isinstance(ret, int) else 0})
        return ret

    def statx():
        if libc.statx(AT_FDCWD, path["meta"].encode(), AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, statx_buf):
            raise OSError(ctypes.get_errno(), "statx")
        return 0

    for i in range(count):
        timed("pread", "data", lambda: len(os.pread(data_fd, BLOCK, i * BLOCK)))
    for i in range(count):
        timed("read", "rdata", lambda: len(os.read(fds["rdata"], BLOCK)))
    for i in range(count):
        timed("readv", "vdata", lambda: os.readv(fds["vdata"], [vbuf]))
    for i in range(count):
        timed("pwrite", "out", lambda: os.pwrite(out_fd, buf, i * BLOCK))
    for i in range(count):
        timed("write", "wout", lambda: os.write(fds["wout"], buf))
    for i in range(count):
        timed("writev", "vout", lambda: os.writev(fds["vout"], [buf]))
    for i in range(count):
        os.write(ckpt_fd, buf)
        timed("fsync", "ckpt", lambda: os.fsync(ckpt_fd))
    for i in range(count):
        os.write(fds["dckpt"], buf)
        timed("fdatasync", "dckpt", lambda: os.fdatasync(fds["dckpt"]))
    for i in range(count):
        timed("statx", "meta", statx)
    if opens:
        for i in range(count):
            fd = timed("open", "opn", lambda: os.open(path["opn"], os.O_WRONLY))
            os.close(fd)
    for fd in fds.values():
        os.close(fd)
    print(json.dumps({"pid": os.getpid(), "tid": threading.get_native_id(), "comm": COMM, "ops": ops}))


if __name__ == "__main__":
    main(sys.argv[1:])
