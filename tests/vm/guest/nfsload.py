"""A known NFS workload for the probe tests, run as its own process (its pid is the one to find).

    python3 nfsload.py DIR COUNT [--opens]
    python3 nfsload.py DIR COUNT --xfer

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

With ``--xfer``, instead, the calls that move data without read(2) (their source files,
``sdata``, ``pdata``, ``cdata`` and ``udata`` of COUNT * XFER_SPACING bytes each, and an empty
``cout``, created by the caller), COUNT of each, every one reading 4 KiB at offset
i * XFER_SPACING of its source, whose cached pages are dropped and whose readahead is off
(``POSIX_FADV_RANDOM``: NFS reads ahead up to 15 x rsize), so each reads from the server:

* ``sendfile``         sendfile(2) from ``sdata`` to /dev/null
* ``splice``           splice(2) from ``pdata`` into a pipe (drained after the timed call)
* ``copy_file_range``  copy_file_range(2) from ``cdata`` to ``cout`` on the same mount (one
  filesystem: across filesystems it is EXDEV since 5.19; NFSv4.2 sends a COPY, v3 splices)
* ``io_uring``         one IORING_OP_READ of ``udata`` submitted and waited for in one
  io_uring_enter(GETEVENTS, min_complete=1) (raw syscalls: tests/fixtures/workload.py's ring)

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
XFER_SPACING = 256 << 10
XFER_FILES = ("sdata", "pdata", "cdata", "udata")
AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF


class Timer:
    """The timed calls of one run: ``call(op, path, fn)`` runs fn and records it."""

    def __init__(self):
        self.ops = []

    def call(self, op, path, fn):
        s_w, s_m = time.time_ns(), time.monotonic_ns()
        ret = fn()
        e_m, e_w = time.monotonic_ns(), time.time_ns()
        self.ops.append({"op": op, "path": path, "start_wall_ns": s_w, "end_wall_ns": e_w,
                         "start_mono_ns": s_m, "end_mono_ns": e_m, "ret": ret if isinstance(ret, int) else 0})
        return ret


def xfer(directory: str, count: int, libc) -> list:
    """The --xfer calls (see the module docstring); returns their timings."""
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    from tests.fixtures.workload import _Uring

    path = {n: os.path.join(directory, n) for n in (*XFER_FILES, "cout")}
    fds = {n: os.open(path[n], os.O_RDONLY) for n in XFER_FILES}
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    cout = os.open(path["cout"], os.O_WRONLY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    pipe_r, pipe_w = os.pipe()
    libc.splice.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong), ctypes.c_int, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_uint]
    libc.splice.restype = ctypes.c_ssize_t
    ring = _Uring(libc)
    ubuf = ctypes.create_string_buffer(BLOCK)
    t = Timer()

    def splice(fd, off):       # os.splice is python 3.10+; Debian 11 has 3.9
        n = libc.splice(fd, ctypes.byref(ctypes.c_longlong(off)), pipe_w, None, BLOCK, 0)
        if n < 0:
            raise OSError(ctypes.get_errno(), "splice")
        return n

    calls = (("sendfile", "sdata", lambda fd, off: os.sendfile(devnull, fd, off, BLOCK)),
             ("splice", "pdata", splice),
             ("copy_file_range", "cdata", lambda fd, off: os.copy_file_range(fd, cout, BLOCK, off, off)),
             ("io_uring", "udata", lambda fd, off: ring.read(fd, ubuf, BLOCK, off)))
    for op, name, fn in calls:
        fd = fds[name]
        for i in range(count):
            off = i * XFER_SPACING
            os.posix_fadvise(fd, off, BLOCK, os.POSIX_FADV_DONTNEED)
            n = t.call(op, path[name], lambda: fn(fd, off))
            if n != BLOCK:
                raise SystemExit(f"{op} #{i} moved {n} bytes, not {BLOCK}")
            if op == "splice":
                os.read(pipe_r, BLOCK)
    for fd in (*fds.values(), cout, devnull, pipe_r, pipe_w):
        os.close(fd)
    return t.ops


def main(argv: list[str]) -> None:
    directory, count, opens = argv[0], int(argv[1]), "--opens" in argv
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, COMM.encode(), 0, 0, 0)  # PR_SET_NAME
    if "--xfer" in argv:
        ops = xfer(directory, count, libc)
        print(json.dumps({"pid": os.getpid(), "tid": threading.get_native_id(), "comm": COMM, "ops": ops}))
        return
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
    timer = Timer()
    ops = timer.ops

    def timed(op, name, call):
        return timer.call(op, path[name], call)

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
