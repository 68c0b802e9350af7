"""The sched family (bpf/sched.bpf.c): process lineage from the kernel, GPU owners kept in
the kernel, and the off-CPU time of owner threads.

Records:
  SS_T_PROC   fork/exec/exit of every process -> ``_proc`` (the agent feeds it to
              tracer/procinfo.ProcCache, which ships ``proc`` rows); an exit carries the
              process's wait(2) status and whether it was an owner, and :class:`ExitReporter`
              turns the exits that matter into ``proc`` rows with ``exit_ns``/``exit_status``
  SS_T_SCHED  an owner thread's merged off-CPU spells -> ``_sched``; :class:`Runtime`
              finishes them into the ``sched`` table (op blocked|runq) and, for blocked
              page faults, ``io`` rows (op page_fault), since naming a reason needs this
              BPF object's stack map and naming a file needs /proc/<pid>/maps.

Owners (the ``owners`` map, by tgid) come from the agent (NVML's processes on the GPUs and
their descendants at that moment, or ``--pid``); the kernel adds every child forked by an
owner and drops a process at its exit.
"""

from __future__ import annotations

import ctypes as ct
import os
import platform
import re
import time

import numpy as np

from stallscope.tracer import btf
from stallscope.tracer.bpfload import ProbeError, base_cflags, load_bpf, tp_exists
from stallscope.tracer.decode import comm_str, ops, unique_map
from stallscope.wire.schema import OP_CODES, T_PROC, T_SCHED, concat_tables

NAME = "sched"
RECORD_TYPES = (T_PROC, T_SCHED)
TRACEPOINTS = ("sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit",
               "sched/sched_switch", "sched/sched_wakeup")
FAULT_TP = "exceptions/page_fault_user"

# mirrors of bpf/sched.bpf.c
GAP_NS = 10_000_000
STATE_D, STATE_S, STATE_S_UNKNOWN, STATE_PREEMPTED, STATE_WAKEUP = 1, 2, 3, 4, 5
CLASS_VOLUNTARY, CLASS_STALL = 1, 2
SP_NONE, SP_RUNQ, SP_BLOCKED, SP_FAULT = 0, 1, 2, 3
G_FAULT = 2
SP_GROUP = (SP_BLOCKED, SP_RUNQ, SP_FAULT)      # the spell kind that joins each group

OP_BLOCKED = OP_CODES["blocked"]
OP_EXIT = OP_CODES["exit"]
OP_RUNQ = OP_CODES["runq"]
OP_FAULT = OP_CODES["page_fault"]
UNKNOWN_MAPPING = "[unknown mapping]"

# Frames that only say "this thread slept" (below the tracing frames, which end at
# __schedule): the reason is the first frame below them.
SKIP_PREFIXES = ("__schedule", "schedule", "preempt_schedule", "__cond_resched", "io_schedule",
                 "__wait_for_common", "wait_for_common", "wait_for_completion", "__wait_on_bit",
                 "out_of_line_wait_on_bit", "bit_wait", "__wait_event", "folio_wait_bit",
                 "__folio_lock", "wait_on_page_bit", "__lock_page", "rwsem_down_", "__down",
                 "__mutex_lock", "mutex_lock", "__rt_mutex", "rt_mutex_", "percpu_rwsem_wait",
                 "__percpu_down")
# S-state sleeps in frames containing these words wait for work, a peer, a timer or a
# device, by design (futexes, poll/select/epoll, sleeps, child waits, signals, pipes,
# sockets, ttys, event files, io_uring and SysV/POSIX queues, a FUSE daemon's own
# /dev/fuse reads, ioctls such as GPU synchronisation): not stalls. Anything else asleep
# in S state (FUSE waiting for its daemon, a network filesystem) is.
VOLUNTARY = ("futex", "ep_poll", "epoll_wait", "do_sys_poll", "do_select", "core_sys_select",
             "do_pselect", "nanosleep", "pipe_read", "pipe_write", "wait_for_partner", "unix_",
             "sk_wait_data", "sk_stream_wait", "inet_csk_accept", "inet_csk_wait_for_connect",
             "skb_wait_for_more_packets", "skb_recv_datagram", "tcp_recvmsg", "sock_recvmsg",
             "sock_read_iter", "do_wait", "kernel_wait4", "kernel_waitid", "sigsuspend",
             "sigtimedwait", "sys_pause", "n_tty_read", "tty_read", "eventfd_read", "timerfd_read",
             "signalfd", "inotify_read", "fanotify_read", "io_cqring_wait", "io_uring",
             "do_msgrcv", "do_semtimedop", "wq_sleep", "fuse_dev_", "do_signal_stop", "get_signal",
             "ptrace_stop", "devkmsg_read", "sys_ioctl", "do_vfs_ioctl", "kthread", "wait_woken",
             "binder_")


def _cflags(cfg, tracefs):
    flags = base_cflags(cfg) + btf.offset_cflags(fields=btf.SCHED_FIELDS) + [f"-DSS_NCPUS={_ncpus()}"]
    notes = []
    x86 = platform.machine() == "x86_64"
    if x86:
        flags += btf.offset_cflags(fields=btf.SCHED_FIELDS_X86_64) + ["-DSS_SCHED_X86_64"]
    release = _release()
    if release >= (5, 18, 0):
        flags.append("-DSS_SWITCH_STATE_ARG")          # sched_switch passes prev_state
    if release < (5, 15, 0):
        flags.append("-DSS_NO_TASK_PT_REGS")           # no bpf_task_pt_regs: no syscall number
        notes.append("no page faults (kernel < 5.15)")
    elif not x86:
        notes.append("no page faults (x86-64 only)")
    elif not tp_exists(tracefs, FAULT_TP):
        notes.append(f"no page faults ({FAULT_TP} not found)")
    else:
        flags.append("-DSS_SCHED_FAULTS")
    return flags, notes


def _release() -> tuple:
    """The running kernel's (major, minor, patch)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", platform.release())
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


def _ncpus() -> int:
    """Possible CPUs (ids can be sparse: the highest id + 1)."""
    try:
        from bcc.utils import get_possible_cpus
        return max(get_possible_cpus()) + 1
    except Exception:
        return os.cpu_count() or 1024


def methods(cfg, tracefs):
    def tracepoint():
        missing = [tp for tp in TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        flags, notes = _cflags(cfg, tracefs)
        names = [tp.split("/")[1] for tp in TRACEPOINTS]
        if "-DSS_SCHED_FAULTS" in flags:
            names.append("page_fault_user")
        b = load_bpf(NAME, flags)
        b.load_func(b"ss_flush", _raw_tp_type())       # verified now, run by Runtime.flush
        return b, "raw tracepoints " + " ".join(names) + (f" ({'; '.join(notes)})" if notes else "")
    return [("tracepoint", tracepoint)]


def _raw_tp_type():
    from bcc import BPF
    return BPF.RAW_TRACEPOINT


def decode(rtype, r, base, method) -> dict:
    if rtype == T_PROC:
        ex = r["op"] == OP_EXIT
        return {"_proc": {"ts_ns": base["ts_ns"], "op": ops(r["op"]), "pid": base["pid"],
                          "tid": base["tid"], "ppid": r["key"].astype(np.uint64), "comm": base["comm"],
                          # exits only: the wait(2) status (-1 unknown), an owner when it died
                          "exit_status": np.where(ex, r["ret"], -1).astype(np.int64),
                          "owner": np.where(ex, r["state"], 0).astype(np.uint64)}}
    return {"_sched": {**base, "op": r["op"].astype(np.uint64), "key": r["key"].astype(np.uint64),
                       "sum_ns": r["ret"].astype(np.int64), "aux": r["aux"].astype(np.uint64),
                       "dev": r["dev"].astype(np.uint64), "state": r["state"].astype(np.uint64),
                       "cgroup": r["cgroup_id"].astype(np.uint64), "method": method,
                       "other_comm": unique_map(_comm_field(r), comm_str)}}


def _comm_field(r) -> np.ndarray:
    """The first SS_COMM_LEN bytes of path (runq: the comm of who ran instead)."""
    return r["path"].astype("S16")


# ---------------------------------------------------------------------- user space side

class ExitReporter:
    """``proc`` rows with ``exit_ns``/``exit_status`` for the exits that matter to blame
    across ranks: processes that were owners when they died (NVML's processes and their
    descendants, the kernel's flag) and processes with a job or a rank. Other exits on a busy
    host are not shipped.

    :meth:`add` takes the ``_proc`` columns of a drain after ``ProcCache.ingest`` (the exit is
    known, identity settled from the process or its parent); :meth:`take` (one call per
    batch) returns at most ``max_rows`` exits, ranks first, then owners, then the rest of the
    job's processes, each preceded by the process's own row and its ancestors where those
    were not reported yet (so its lineage is complete and its exit row comes last: readers
    keep a pid's latest row). Exits beyond the bound are counted in ``dropped``."""

    def __init__(self, procs, max_rows: int = 1024):
        self.procs = procs
        self.max_rows = int(max_rows)
        self.pending: list = []     # (priority, order, pid, exit ns, status, row)
        self.reported = 0
        self.dropped = 0
        self._order = 0

    def add(self, t: dict) -> None:
        if "exit_status" not in t:
            return
        for i in np.flatnonzero(np.asarray(t["op"], dtype=object) == "exit"):
            pid, ts = int(t["pid"][i]), int(t["ts_ns"][i])
            row = self.procs.lookup(pid, ts)
            if row is None:
                continue                # never known (gone before it was seen): nothing to say
            _ppid, _comm, _start, job, rank = row
            owner = bool(int(t["owner"][i]))
            if not (owner or job or rank >= 0):
                continue
            prio = 0 if rank >= 0 else 1 if owner else 2
            self._order += 1
            self.pending.append((prio, self._order, pid, ts, int(t["exit_status"][i]), row))

    def _ids(self, pid: int, start_ns: int) -> tuple:
        """(pod_uid, container_id) of the incarnation that started at start_ns."""
        for p in reversed(self.procs.info.get(pid, ())):
            if p.start_ns == start_ns:
                return p.pod_uid, p.container_id
        return "", ""

    def take(self) -> dict:
        """A ``proc`` table (possibly empty) for the exits added since the last call."""
        todo, self.pending = sorted(self.pending), []
        if len(todo) > self.max_rows:
            self.dropped += len(todo) - self.max_rows
            todo = todo[:self.max_rows]
        if not todo:
            return {}
        # their own rows and ancestors where not reported yet, then the exit rows
        pre = self.procs.table_for([x[2] for x in todo], [x[3] for x in todo])
        rows = [x[5] for x in todo]
        ids = [self._ids(x[2], x[5][2]) for x in todo]
        obj = (lambda vals: np.array(vals, dtype=object))
        exits = {"pid": np.array([x[2] for x in todo], dtype=np.uint64),
                 "ppid": np.array([r[0] for r in rows], dtype=np.uint64), "comm": obj([r[1] for r in rows]),
                 "start_ns": np.array([r[2] for r in rows], dtype=np.uint64), "job": obj([r[3] for r in rows]),
                 "rank": np.array([r[4] for r in rows], dtype=np.int64), "pod_uid": obj([i[0] for i in ids]),
                 "container_id": obj([i[1] for i in ids]), "exit_ns": np.array([x[3] for x in todo], dtype=np.uint64),
                 "exit_status": np.array([x[4] for x in todo], dtype=np.int64)}
        self.reported += len(todo)
        return concat_tables("proc", [pre, exits] if pre else [exits])


class _TestRunAttr(ct.Structure):
    """union bpf_attr for BPF_PROG_TEST_RUN (include/uapi/linux/bpf.h)."""
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
                ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("pad", ct.c_uint32)]


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_PROG_TEST_RUN = 10


class MapsCache:
    """Address -> mapped file of a process, from /proc/<pid>/maps. A fault is resolved from a
    copy read after it began (the agent reads one while a fault is in progress, since the
    process may unmap or exit right after); the last few copies of each process are kept,
    so a mapping gone by the time the record is decoded is still found, and a mapping at a
    reused address is never taken from a copy older than the fault."""

    KEEP = 8                       # copies per process

    def __init__(self, proc: str = "/proc", max_pids: int = 512):
        self.proc = proc
        self.max_pids = max_pids
        self.snaps: dict = {}      # pid -> [(read wall ns, sorted (start, end, dev, ino, path))]
        self._mounts: dict = {}    # (major, minor) -> fs type

    def _read(self, pid: int):
        try:
            with open(os.path.join(self.proc, str(pid), "maps")) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        out = []
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            lo, _, hi = parts[0].partition("-")
            major, _, minor = parts[3].partition(":")
            try:
                out.append((int(lo, 16), int(hi, 16), (int(major, 16), int(minor, 16)), int(parts[4]),
                            parts[5] if len(parts) > 5 else ""))
            except ValueError:
                continue
        return out

    @staticmethod
    def _find(entries, addr: int):
        for lo, hi, dev, ino, path in entries:
            if lo <= addr < hi:
                return dev, ino, path
        return None

    def refresh(self, pid: int) -> bool:
        fresh = self._read(pid)
        if fresh is None:
            return False
        if pid not in self.snaps and len(self.snaps) >= self.max_pids:
            self.snaps.pop(next(iter(self.snaps)))
        snaps = self.snaps.setdefault(pid, [])
        snaps.append((time.time_ns(), fresh))
        del snaps[:-self.KEEP]
        return True

    def _lookup(self, pid: int, addr: int, since_ns: int):
        for read_ns, entries in reversed(self.snaps.get(pid, ())):
            if read_ns < since_ns:
                break
            hit = self._find(entries, addr)
            if hit is not None:
                return hit
        return None

    def resolve(self, pid: int, addr: int, since_ns: int = 0):
        """(path, fs, dev, ino) of the mapping holding addr in a copy read at wall-clock
        ``since_ns`` or later (read now if there is none); path says when it is unknown."""
        hit = self._lookup(pid, addr, since_ns)
        if hit is None and self.refresh(pid):
            hit = self._lookup(pid, addr, since_ns)
        if hit is None:
            return UNKNOWN_MAPPING, "", 0, 0
        dev, ino, path = hit
        if not path:
            path = "[anon]"
        return path, self.fs_of(dev) if ino else "", (dev[0] << 20) | dev[1], ino

    def fs_of(self, dev) -> str:
        if dev not in self._mounts:
            self._mounts = {}
            try:
                with open(os.path.join(self.proc, "self", "mountinfo")) as f:
                    for line in f:
                        left, _, right = line.partition(" - ")
                        fields = left.split()
                        if len(fields) < 3 or not right:
                            continue
                        ma, _, mi = fields[2].partition(":")
                        fs = right.split()[0].split(".")[0]      # fuse.sshfs -> fuse
                        # named as VFS rows name it (by superblock magic: one "nfs" for
                        # v2-v4), so a fault and a read of one file say the same fs
                        self._mounts[(int(ma), int(mi))] = "nfs" if fs == "nfs4" else fs
            except (OSError, ValueError):
                pass
        return self._mounts.get(dev, "")


def _below_schedule(frames: list) -> list:
    """The frames below the scheduler: what the thread was doing when it slept (the ones
    above are the tracing program's, named whatever kallsyms held when first read)."""
    for i, f in enumerate(frames):
        if f.startswith("__schedule"):
            return frames[i:]
    return frames


def reason_of(frames: list) -> str:
    """'wait_fn < caller < caller' from a kernel stack (innermost first)."""
    frames = _below_schedule(frames)
    if not frames:
        return "[stack lost]"
    i = next((i for i, f in enumerate(frames) if not f.startswith(SKIP_PREFIXES)), len(frames))
    return " < ".join(frames[i:i + 3]) or frames[0]


def is_voluntary(frames: list) -> bool:
    """An S-state sleep that waits for work, a peer, a timer or a device (see VOLUNTARY)."""
    return any(w in f for f in _below_schedule(frames) for w in VOLUNTARY)


class Runtime:
    """The user-space half of a loaded sched family: owners, stack names and their
    classification, page-fault files, and the flush of groups gone quiet."""

    def __init__(self, bpf, min_latency_ns: int, proc: str = "/proc"):
        self.bpf = bpf
        self.min_ns = int(min_latency_ns)
        self.owners = bpf[b"owners"]
        self.ogen = bpf[b"ogen"]
        self._user_gen = 0
        self.threads = bpf[b"threads"]
        self.ripe = bpf[b"ripe"]
        self.stack_map = bpf[b"stacks"]
        self.sclass = bpf[b"sclass"]
        self.flush_fd = bpf.load_func(b"ss_flush", _raw_tp_type()).fd
        self.maps = MapsCache(proc)
        self.frames: dict = {}        # stack id -> [function names], innermost first
        self.classified = 0
        # (tid, op, first ns) of the groups resolved lately, oldest first: a group closed at
        # once by its thread (a new spell after the gap) and by ss_flush (quiet past the gap)
        # on another CPU is emitted twice (grp_close is not atomic, and the kernels before
        # 5.12 have no BPF exchange to make it so); seen on the 6.12 guest. The repeat is
        # dropped here and counted (sched.duplicate_groups)
        self._seen: dict = {}
        self.duplicates = 0
        self._faulting = False        # a thread was blocked in a page fault at the last look
        self._libc = ct.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ct.c_long

    # -------------------------------------------------------------- owners
    def add_owners(self, pids):
        """Make pids owners (those already are stay as they are). A change of the owners
        set moves its generation on, which invalidates the kernel's per-CPU owner caches."""
        added = False
        for pid in pids:
            pid = int(pid)
            if pid <= 0:
                continue
            key = self.owners.Key(pid)
            try:
                self.owners[key]
                continue
            except KeyError:
                pass
            self.owners[key] = self.owners.Leaf(1)
            added = True
        if added:
            self._user_gen += 1
            key = self.ogen.Key(0)
            try:
                g = self.ogen[key]
            except KeyError:
                return
            g.user = self._user_gen
            self.ogen[key] = g

    def owner_pids(self) -> set:
        return {int(k.value) for k in self.owners.keys()}

    def owners_generation(self) -> int:
        """The owners set's generation: it moves on when an owner forks a process (a worker,
        the ``curl`` a shard is read from) or a thread, when one exits, and when user space
        adds owners. One map lookup: the CPU sampler re-reads its descendants when it moved."""
        try:
            g = self.ogen[self.ogen.Key(0)]
        except KeyError:
            return 0
        return int(g.kernel) + int(g.user)

    # -------------------------------------------------------------- stacks
    def stack(self, sid: int) -> list:
        sid = int(sid)
        got = self.frames.get(sid)
        if got is not None:
            return got
        frames = []
        if sid >= 0:
            from bcc import BPF
            try:
                ips = self.stack_map[self.stack_map.Key(sid)].ip
            except KeyError:
                ips = []
            for ip in ips:
                if not ip:
                    break
                frames.append(BPF.ksym(ip).decode(errors="replace"))
        self.frames[sid] = frames
        return frames

    def classify(self, sid: int) -> bool:
        """Record in the kernel whether S-state sleeps in this stack are stalls; returns that."""
        stall = not is_voluntary(self.stack(sid))
        if sid >= 0:
            self.sclass[self.sclass.Key(int(sid))] = self.sclass.Leaf(CLASS_STALL if stall else CLASS_VOLUNTARY)
            self.classified += 1
        return stall

    # -------------------------------------------------------------- records -> tables
    def resolve(self, raw: dict) -> dict:
        """``_sched`` columns -> {"sched": ..., "io": ...} (page faults), dropping S-state sleeps
        that turn out voluntary (and classifying their stacks for the kernel)."""
        n = len(raw["ts_ns"])
        if not n:
            return {}
        op = np.asarray(raw["op"], dtype=np.int64)
        state = np.asarray(raw["state"], dtype=np.int64)
        key = np.asarray(raw["key"], dtype=np.uint64).view(np.int64)
        sums = np.asarray(raw["sum_ns"], dtype=np.int64)
        keep = np.ones(n, dtype=bool)
        for i, k in enumerate(zip(np.asarray(raw["tid"]).tolist(), op.tolist(),
                                  np.asarray(raw["ts_ns"]).tolist())):
            if k in self._seen:
                keep[i] = False
                self.duplicates += 1
            else:
                self._seen[k] = None
        while len(self._seen) > 8192:
            del self._seen[next(iter(self._seen))]
        for i in np.flatnonzero((state == STATE_S_UNKNOWN) & keep):
            stall = self.classify(int(key[i]))
            keep[i] = stall and sums[i] >= self.min_ns
        out = {}
        fault = keep & (op == OP_FAULT)
        if fault.any():
            out["io"] = self._faults(raw, fault, key)
        sched = keep & (op != OP_FAULT)
        if sched.any():
            out["sched"] = self._sched(raw, sched, op, state, key)
        return out

    def _sched(self, raw, m, op, state, key) -> dict:
        runq = op[m] == OP_RUNQ
        aux = np.asarray(raw["aux"], dtype=np.uint64)[m]
        dev = np.asarray(raw["dev"], dtype=np.uint64)[m]
        reasons = np.empty(int(m.sum()), dtype=object)
        for j, (r, st, k) in enumerate(zip(runq, state[m], key[m])):
            if r:
                reasons[j] = "wakeup" if st == STATE_WAKEUP else "preempted"
            else:
                reasons[j] = reason_of(self.stack(int(k)))
        other_comm = np.asarray(raw["other_comm"], dtype=object)[m]
        return {"ts_ns": np.asarray(raw["ts_ns"])[m], "dur_ns": np.asarray(raw["dur_ns"])[m],
                "pid": np.asarray(raw["pid"])[m], "tid": np.asarray(raw["tid"])[m],
                "comm": np.asarray(raw["comm"], dtype=object)[m],
                "op": np.where(runq, "runq", "blocked").astype(object), "reason": reasons,
                "count": np.where(runq, dev, aux).astype(np.uint64),
                "blocked_ns": np.asarray(raw["sum_ns"], dtype=np.int64)[m].astype(np.uint64),
                "other_pid": np.where(runq, aux, 0).astype(np.uint64),
                "other_comm": np.where(runq, other_comm, "").astype(object)}

    def _faults(self, raw, m, key) -> dict:
        idx = np.flatnonzero(m)
        pids = np.asarray(raw["pid"], dtype=np.int64)
        ts = np.asarray(raw["ts_ns"], dtype=np.int64)
        res = [self.maps.resolve(int(pids[i]), int(key[i]) & 0xFFFFFFFFFFFFFFFF, int(ts[i])) for i in idx]
        k = len(idx)
        return {"ts_ns": np.asarray(raw["ts_ns"])[m], "dur_ns": np.asarray(raw["dur_ns"])[m],
                "pid": np.asarray(raw["pid"])[m], "tid": np.asarray(raw["tid"])[m],
                "comm": np.asarray(raw["comm"], dtype=object)[m],
                "op": np.array(["page_fault"] * k, dtype=object), "bytes": np.zeros(k, dtype=np.int64),
                "path": np.array([r[0] for r in res], dtype=object),
                "fs": np.array([r[1] for r in res], dtype=object),
                "dev": np.array([r[2] for r in res], dtype=np.uint64),
                "ino": np.array([r[3] for r in res], dtype=np.uint64),
                "cgroup": np.asarray(raw["cgroup"], dtype=np.uint64)[m],
                "method": np.asarray(raw["method"], dtype=object)[m],
                "count": np.asarray(raw["aux"], dtype=np.uint64)[m],
                "blocked_ns": np.asarray(raw["sum_ns"], dtype=np.int64)[m].astype(np.uint64)}

    # -------------------------------------------------------------- flush
    def _run_flush(self, tid: int, force: int) -> bool:
        args = (ct.c_uint64 * 2)(tid, force)
        attr = _TestRunAttr(prog_fd=self.flush_fd, ctx_size_in=ct.sizeof(args), ctx_in=ct.addressof(args))
        return self._libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) == 0

    def _thread_items(self):
        """(key, value) of every owner thread's state: one batch syscall where the kernel
        has BPF_MAP_LOOKUP_BATCH (5.6+), else two syscalls per thread."""
        try:
            items = list(self.threads.items_lookup_batch())
        except Exception:
            items = list(self.threads.items())
        return [(k if isinstance(k, int) else k.value, v) for k, v in items]   # batch: plain ints

    def flush(self, force: bool = False) -> int:
        """Close the groups of threads quiet for longer than the merge gap (all groups, and
        spells in progress up to now, when ``force``): their records reach the ring. Also
        reads the mappings of processes blocked in a page fault now, while they live (a
        worker may exit before its fault record is drained). Returns how many threads were
        flushed."""
        if not force and self.ripe[self.ripe.Key(0)].value <= 0 and \
                self.ripe[self.ripe.Key(1)].value <= 0 and not self._faulting:
            return 0                  # nothing to emit, nobody in a fault: two lookups
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        n = 0
        refreshed: set = set()
        self._faulting = False
        for k, th in self._thread_items():
            if th.kind == SP_FAULT or th.g[G_FAULT].count:
                addr = th.fault_addr if th.kind == SP_FAULT else th.g[G_FAULT].key
                if int(th.tgid) not in refreshed:      # the mapping now, while it lives
                    refreshed.add(int(th.tgid))
                    self.maps.refresh(int(th.tgid))
                self.maps.resolve(int(th.tgid), int(addr))
                self._faulting = True     # look again next time, while it lasts
            if not force:
                # as close_stale in the kernel: a group is stale when the spell in progress
                # (which may join it) or else now comes more than the gap after its last
                joins = [th.start if th.kind == kind else now for kind in SP_GROUP]
                if not any(g.count and t > g.last + GAP_NS for g, t in zip(th.g, joins)):
                    continue
            if self._run_flush(int(k), 1 if force else 0):
                n += 1
        return n
