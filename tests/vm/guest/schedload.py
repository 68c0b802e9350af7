"""The owner workload of the sched probe tests, run as its own process (the tracer's --pid).

    python3 schedload.py DIR READS FAULTS

DIR holds ``rdata`` and ``mdata`` of at least READS (FAULTS) * SPACING bytes, on the delayed NFS
mount. Before it reports ready the process opens both (``rdata`` O_DIRECT) and maps ``mdata``
(MADV_RANDOM: a fault reads its one page, no read-around; NFS would otherwise read up to
15 x rsize around it). On "go" (a line on stdin) it:

* forks CHILD_EXIT_CODE's child, which exits 0.2 s later with that code, and then one that
  kills itself with SIGKILL 0.2 s later; each is reaped and its wait(2) status kept;
* starts thread ``ss-reader``: READS O_DIRECT preadv(2)s of 4 KiB at i * SPACING of ``rdata``
  (each waits in D state for one READ round trip);
* then thread ``ss-mapper``: touches FAULTS pages of the mapping, SPACING apart (each a
  major fault that waits for one READ).

Each call is preceded, and the last one followed, by a 50 ms sleep (longer than the sched
family's 10 ms merge gap), so each wait is its own off-CPU group. It prints one JSON object (pid, the children, each
thread's tid and timed calls, wall-clock ns) and exits on the next line on stdin, so the
mapping and the process outlive the tracer's last look.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import sys
import threading
import time

SPACING = 256 << 10
CHILD_EXIT_CODE = 23
GAP_S = 0.05


def _name(comm: str) -> None:
    ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)       # PR_SET_NAME: this thread's comm


def _in_thread(comm: str, count: int, call) -> dict:
    """``call(i)`` count times in a new thread named comm, each after a GAP_S sleep, timed."""
    out = {"comm": comm, "calls": []}

    def body():
        _name(comm)
        out["tid"] = threading.get_native_id()
        try:
            for i in range(count):
                time.sleep(GAP_S)
                s = time.time_ns()
                call(i)
                out["calls"].append({"start_ns": s, "end_ns": time.time_ns()})
            time.sleep(GAP_S)             # the thread's exit is not part of the last call's group
        except BaseException as e:        # re-raised in the main thread: the run fails
            out["error"] = e
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out


def _child(how: str) -> dict:
    fork_ns = time.time_ns()
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        if how == "exit":
            os._exit(CHILD_EXIT_CODE)
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)             # not reached
    _, status = os.waitpid(pid, 0)
    return {"pid": pid, "how": how, "status": status, "fork_ns": fork_ns, "reaped_ns": time.time_ns()}


def main(argv: list) -> None:
    directory, reads, faults = argv[0], int(argv[1]), int(argv[2])
    _name("ss-owner")
    rfd = os.open(os.path.join(directory, "rdata"), os.O_RDONLY | os.O_DIRECT)
    mfd = os.open(os.path.join(directory, "mdata"), os.O_RDONLY)
    m = mmap.mmap(mfd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    m.madvise(mmap.MADV_RANDOM)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()
    children = [_child("exit"), _child("kill")]
    buf = mmap.mmap(-1, 4096)       # page-aligned, as O_DIRECT wants it on most filesystems
    reader = _in_thread("ss-reader", reads, lambda i: os.preadv(rfd, [buf], i * SPACING))
    mapper = _in_thread("ss-mapper", faults, lambda i: m[i * SPACING])
    print(json.dumps({"pid": os.getpid(), "children": children, "reader": reader, "mapper": mapper}), flush=True)
    sys.stdin.readline()
    m.close()
    os.close(mfd)
    os.close(rfd)


if __name__ == "__main__":
    main(sys.argv[1:])
