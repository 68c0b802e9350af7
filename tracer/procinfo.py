"""Process facts: lineage, start time, job identity, socket owners.

Lineage comes from the kernel (the sched family's fork/exec/exit records) where that
family is loaded, else from /proc. Every function takes the proc root so tests can point
it at a fixture tree. The collector needs lineage (a dataloader worker is a child of the
training process that NVML lists on the GPU) and the job id/rank (to line up ranks of one
job across nodes); the tracer ships both in a ``proc`` table.
"""

from __future__ import annotations

import os
import time

import numpy as np

from stallscope.wire.cgroup import read_cgroup

from .decode import safe_text

# environment variables that name the job and the rank, most specific first
JOB_VARS = ("STALLSCOPE_JOB", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR")
RANK_VARS = ("STALLSCOPE_RANK", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def boot_time_ns(proc: str = "/proc") -> int:
    try:
        with open(os.path.join(proc, "stat")) as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1]) * 1_000_000_000
    except OSError:
        pass
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def stat_fields(pid: int, proc: str = "/proc"):
    """(comm, the fields after it) of /proc/<pid>/stat, or None if gone: ``rest[0]`` is
    field 3 (state), ``rest[k]`` field k + 3 (proc(5))."""
    try:
        fd = os.open(os.path.join(proc, str(pid), "stat"), os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    lp, rp = data.find(b"("), data.rfind(b")")
    return safe_text(data[lp + 1: rp]), data[rp + 2:].split()


def read_stat(pid: int, proc: str = "/proc"):
    """(ppid, comm, start_ticks) from /proc/<pid>/stat, or None if gone."""
    st = stat_fields(pid, proc)
    if st is None:
        return None
    comm, rest = st
    return int(rest[1]), comm, int(rest[19])


def read_env(pid: int, proc: str = "/proc") -> dict:
    try:
        with open(os.path.join(proc, str(pid), "environ"), "rb") as f:
            data = f.read()
    except OSError:
        return {}
    env = {}
    for item in data.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and (k.decode(errors="replace") in JOB_VARS or k.decode(errors="replace") in RANK_VARS
                    or k == b"MASTER_PORT"):
            env[k.decode(errors="replace")] = safe_text(v)
    return env


def job_of(env: dict):
    """(job id, rank) from a training process's environment; ("", -1) if none."""
    job = ""
    for k in JOB_VARS:
        if env.get(k):
            job = env[k]
            if k == "MASTER_ADDR" and env.get("MASTER_PORT"):
                job = f"{env[k]}:{env['MASTER_PORT']}"
            break
    rank = -1
    for k in RANK_VARS:
        if env.get(k, "").strip().lstrip("-").isdigit():
            rank = int(env[k])
            break
    return job, rank


class Proc:
    """One incarnation of a pid: lineage and job identity, and whether it was reported."""

    __slots__ = ("pid", "ppid", "comm", "start_ns", "job", "rank", "exit_ns", "env", "sent", "kernel",
                 "pod_uid", "container_id", "ticks", "checked_ns")

    def __init__(self, pid, ppid, comm, start_ns, job="", rank=-1, env=False, kernel=False, ticks=None):
        self.pid, self.ppid, self.comm, self.start_ns = pid, ppid, comm, start_ns
        self.job, self.rank = job, rank
        self.exit_ns = 0            # wall ns of its exit, 0 while alive (or not known to be dead)
        self.env = env              # job/rank are final
        self.sent = False           # reported in a proc table
        self.kernel = kernel        # learned from a kernel fork record (else from /proc)
        self.ticks = ticks          # start time in clock ticks since boot, as /proc gave it
        self.checked_ns = start_ns  # wall ns when it was last known alive
        self.pod_uid = ""           # from its cgroup (wire/cgroup.py), settled with env
        self.container_id = ""

    def read_identity(self, proc: str):
        """Job and rank from its environment, pod and container from its cgroup (a Slurm job
        from the cgroup when the environment names none)."""
        self.job, self.rank = job_of(read_env(self.pid, proc))
        cg = read_cgroup(self.pid, proc)
        if cg is not None:
            self.pod_uid, self.container_id = cg.pod_uid, cg.container_id
            if not self.job and cg.slurm_job:
                self.job = cg.slurm_job

    def inherit(self, parent: "Proc"):
        """What fork hands down: environment and cgroup."""
        self.job, self.rank = parent.job, parent.rank
        self.pod_uid, self.container_id = parent.pod_uid, parent.container_id

    def row(self):
        return (self.ppid, self.comm, self.start_ns, self.job, self.rank)


class ProcCache:
    """What the tracer knows about each process, reported once (with its ancestors) to the
    collector in ``proc`` tables.

    With the sched probe family loaded, the kernel reports every fork, exec and exit
    (:meth:`ingest`), so a worker that lived for milliseconds is still known with its parent
    and start time; /proc is then read only for processes that existed before (or whose fork
    record was lost). A process is identified by (pid, start time): a pid reused after an
    exit is a new incarnation, and a stall is matched to the incarnation alive at its time,
    never to a later one. Exited incarnations are forgotten ``grace_s`` after their exit
    (rows that still name them arrive well within that).

    Staying bounded (:meth:`sweep`, every ``sweep_s``): a process read from /proc is
    checked again there by its start time in clock ticks (the identity /proc gives: the same
    pid with another start is another process), and before a stall row newer than the last
    check is matched to it; a process whose /proc entry is gone is marked exited, even when
    its kernel exit record was lost. Exited incarnations are dropped after the grace period,
    and beyond ``max_exited`` the oldest go first, except pids the caller still holds rows
    for (``keep``). The cache is then at most the live processes plus ``max_exited``.
    """

    SLACK_NS = 200_000_000          # start times from /proc are precise to a clock tick
    RECHECK_NS = 1_000_000_000      # a lookup without a time trusts a check this recent

    def __init__(self, proc: str = "/proc", grace_s: float = 30.0, sweep_s: float = 2.0,
                 max_exited: int = 16384):
        self.proc = proc
        self.hz = os.sysconf("SC_CLK_TCK")
        self.grace_ns = int(grace_s * 1e9)
        self.sweep_ns = int(sweep_s * 1e9)
        self.max_exited = max_exited
        self.info: dict = {}        # pid -> [Proc], oldest first
        self.kernel_since_ns = 0    # wall ns since when forks come from the kernel (0: never)
        self.forgotten = 0          # incarnations dropped (exited past the grace period, or the cap)
        self.reuse_seen = 0         # pids found in /proc with another start time than cached
        self._swept_ns = 0

    # ---------------------------------------------------------------- kernel events
    def kernel_lineage(self, since_ns: int):
        """Forks, execs and exits will be ingested from the kernel from ``since_ns`` (wall) on."""
        self.kernel_since_ns = int(since_ns)

    def ingest(self, t: dict):
        """Apply kernel lineage records, in ring order: columns ts_ns (wall), op
        (fork|exec|exit), pid (the process), ppid, comm."""
        for ts, op, pid, ppid, comm in zip(t["ts_ns"], t["op"], t["pid"], t["ppid"], t["comm"]):
            ts, pid, ppid = int(ts), int(pid), int(ppid)
            if op == "fork":
                old = self._latest(pid)
                if old is not None and not old.exit_ns:
                    old.exit_ns = ts        # its exit record was lost: the pid is someone else's now
                parent = self._find(ppid, ts)
                p = Proc(pid, ppid, str(comm), ts, kernel=True)
                if parent is not None and parent.env:
                    p.inherit(parent)       # env and cgroup are inherited
                    p.env = True
                self.info.setdefault(pid, []).append(p)
            elif op == "exec":
                p = self._latest(pid)
                if p is not None and not p.exit_ns:
                    if p.comm != str(comm):
                        p.comm = str(comm)
                        p.sent = False      # report the new name with the next stall
                    p.env = False           # exec may bring another environment (a rank)
            elif op == "exit":
                p = self._latest(pid)
                if p is not None and not p.exit_ns:
                    p.exit_ns = ts

    # ---------------------------------------------------------------- lookups
    def _latest(self, pid: int):
        incs = self.info.get(pid)
        return incs[-1] if incs else None

    def _find(self, pid: int, at_ns=None):
        """The known incarnation of pid alive at at_ns (None: the latest), or None."""
        incs = self.info.get(pid)
        if not incs:
            return None
        if at_ns is None:
            return incs[-1]
        for p in reversed(incs):
            if p.start_ns <= at_ns + self.SLACK_NS:
                return p
        return None                 # older than anything known: never guess

    def _read_proc(self, pid: int, st=None):
        """A Proc from /proc/<pid> (start time from its stat), or None if gone."""
        st = st or read_stat(pid, self.proc)
        if st is None:
            return None
        ppid, comm, ticks = st
        # wall = now - age; precise to a clock tick (btime in /proc/stat is whole seconds)
        now = time.time_ns()
        start = now - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - ticks * 1_000_000_000 // self.hz)
        p = Proc(pid, ppid, comm, start, ticks=ticks)
        p.checked_ns = now
        return p

    def _verify(self, p: Proc, now: int):
        """Check a live-looking incarnation against /proc: gone -> exited (by now); another
        start time (for one read from /proc) -> exited when the new one started, which is
        added. Kernel-known ones are checked for presence only: their start is the fork
        record's, on another clock path than /proc's ticks."""
        st = read_stat(p.pid, self.proc)
        if st is None:
            p.exit_ns = max(now, p.start_ns)
        elif p.ticks is None or st[2] == p.ticks:
            p.checked_ns = now
        else:
            new = self._read_proc(p.pid, st)
            if new is None:
                return
            self.reuse_seen += 1
            p.exit_ns = max(min(new.start_ns, now), p.start_ns)
            new.read_identity(self.proc)
            new.env = True
            self.info.setdefault(p.pid, []).append(new)

    def _get(self, pid: int, at_ns=None):
        """The incarnation alive at at_ns (None: now): known, else read from /proc (if that
        process is not younger than at_ns, which would mean the pid was reused). One read
        from /proc is checked again before a row newer than its last check is matched to it."""
        p = self._find(pid, at_ns)
        if p is not None and not p.exit_ns and not p.kernel:
            now = time.time_ns()
            if (now - self.RECHECK_NS if at_ns is None else at_ns) > p.checked_ns:
                self._verify(p, now)
                p = self._find(pid, at_ns)
        if p is not None and p.exit_ns and (at_ns is None or p.exit_ns < at_ns - self.SLACK_NS):
            # gone before at_ns: a later incarnation whose fork was lost; without a time, the
            # living one if there is one, else what is known
            q = self._read_from_proc(pid, at_ns)
            return q if q is not None or at_ns is not None else p
        if p is not None or self.info.get(pid):
            return p
        return self._read_from_proc(pid, at_ns)

    def _read_from_proc(self, pid: int, at_ns):
        p = self._read_proc(pid)
        if p is None or (at_ns is not None and p.start_ns > at_ns + self.SLACK_NS):
            return None
        if any(q.ticks == p.ticks for q in self.info.get(pid, ())):
            return None             # the one known (and ended): not a new process
        p.read_identity(self.proc)
        p.env = True
        self.info.setdefault(pid, []).append(p)
        return p

    def _settle_env(self, p: Proc, depth: int = 0):
        """Job and rank of a kernel-known process: its own environment while it lives (checked to
        be the same incarnation), else its parent's (what fork hands down)."""
        if p.env:
            return
        cur = None if p.exit_ns else self._read_proc(p.pid)
        if cur is not None and abs(cur.start_ns - p.start_ns) <= self.SLACK_NS:
            p.read_identity(self.proc)
        elif p.ppid > 0 and depth < 64:
            parent = self._get(p.ppid, p.start_ns)
            if parent is not None:
                self._settle_env(parent, depth + 1)
                p.inherit(parent)
        p.env = True

    def lookup(self, pid: int, at_ns=None):
        """(ppid, comm, start_ns, job, rank) of pid (alive at at_ns when given), or None."""
        p = self._get(int(pid), at_ns)
        if p is None:
            return None
        self._settle_env(p)
        return p.row()

    def descendants(self, pids) -> set:
        """Living descendants of pids, from one scan of /proc (for owners found by NVML)."""
        children = {}
        try:
            names = [n for n in os.listdir(self.proc) if n.isdigit()]
        except OSError:
            return set()
        for n in names:
            st = read_stat(int(n), self.proc)
            if st is not None:
                children.setdefault(st[0], []).append(int(n))
        out, todo = set(), [int(p) for p in pids]
        while todo:
            for c in children.get(todo.pop(), ()):
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return out

    # ---------------------------------------------------------------- reporting
    def table_for(self, pids, ts=None) -> dict:
        """A ``proc`` table for the processes behind pids (their incarnations alive at ts, the
        rows' times, when given) and their ancestors, not yet reported."""
        pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        todo: list[tuple[int, int | None]] = []
        if ts is None:
            todo = [(int(p), None) for p in np.unique(pids)]
        elif len(pids):
            ts = np.asarray(ts, dtype=np.int64).reshape(-1)
            for p in np.unique(pids):
                at = ts[pids == p]
                if len(self.info.get(int(p), ())) > 1:
                    todo += [(int(p), int(a)) for a in np.unique(at)]     # pid reused meanwhile
                else:
                    todo.append((int(p), int(at.max())))
        rows, seen = [], set()
        while todo:
            pid, at = todo.pop()
            if pid <= 0:
                continue
            p = self._get(pid, at)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.sent:
                continue
            self._settle_env(p)
            p.sent = True
            rows.append(p)
            if p.ppid > 1:
                todo.append((p.ppid, p.start_ns))
        if not rows:
            return {}
        return {"pid": np.array([p.pid for p in rows], dtype=np.uint64),
                "ppid": np.array([p.ppid for p in rows], dtype=np.uint64),
                "comm": np.array([p.comm for p in rows], dtype=object),
                "start_ns": np.array([p.start_ns for p in rows], dtype=np.uint64),
                "job": np.array([p.job for p in rows], dtype=object),
                "rank": np.array([p.rank for p in rows], dtype=np.int64),
                "pod_uid": np.array([p.pod_uid for p in rows], dtype=object),
                "container_id": np.array([p.container_id for p in rows], dtype=object)}

    # ---------------------------------------------------------------- forgetting
    def __len__(self) -> int:
        """Incarnations held."""
        return sum(len(v) for v in self.info.values())

    def sweep(self, now_ns=None, keep=(), force: bool = False) -> bool:
        """Every ``sweep_s`` (or when forced): mark exited what /proc no longer holds, then
        :meth:`expire`. ``keep``: pids that rows not yet reported still name. True if it ran."""
        now = time.time_ns() if now_ns is None else int(now_ns)
        if not force and now - self._swept_ns < self.sweep_ns:
            return False
        self._swept_ns = now
        for incs in list(self.info.values()):
            if not incs[-1].exit_ns:
                self._verify(incs[-1], now)
        self.expire(now, keep)
        return True

    def expire(self, now_ns=None, keep=()):
        """Forget incarnations that exited more than the grace period ago, then the oldest
        exited ones beyond ``max_exited``; never those of pids in ``keep``."""
        cutoff = (time.time_ns() if now_ns is None else int(now_ns)) - self.grace_ns
        keep = {int(k) for k in keep}
        exited = []
        for pid in list(self.info):
            if pid in keep:
                continue
            incs = [p for p in self.info[pid] if not p.exit_ns or p.exit_ns > cutoff]
            self.forgotten += len(self.info[pid]) - len(incs)
            if incs:
                self.info[pid] = incs
                exited += [p for p in incs if p.exit_ns]
            else:
                del self.info[pid]
        if len(exited) > self.max_exited:
            exited.sort(key=lambda p: p.exit_ns)
            for p in exited[:len(exited) - self.max_exited]:
                incs = self.info[p.pid]
                incs.remove(p)
                self.forgotten += 1
                if not incs:
                    del self.info[p.pid]


def socket_inodes(pid: int, proc: str = "/proc") -> list:
    """Inodes of the sockets process ``pid`` holds open (its fd table, in fd-listing order)."""
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            out.append(int(link[8:-1]))
    return out


class SocketOwners:
    """Socket inode -> owning pid, by scanning /proc/<pid>/fd on a miss (rate limited).

    Bounded: a scan replaces the map with what it found plus the previous scan's entries
    (a socket closed just before its record is decoded is still named once), so sockets
    closed two scans ago are forgotten."""

    def __init__(self, proc: str = "/proc", min_rescan_s: float = 0.2):
        self.proc = proc
        self.map = {}
        self._previous: dict = {}
        self.min_rescan_s = min_rescan_s
        self._last_scan = 0.0
        self.scans = 0

    def _scan(self):
        self.scans += 1
        self._last_scan = time.monotonic()
        found = {}
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return
        for p in pids:
            for ino in socket_inodes(int(p), self.proc):
                found.setdefault(ino, int(p))
        self.map = {**self._previous, **found}
        self._previous = found

    def owner(self, ino: int) -> int:
        ino = int(ino)
        if not ino:
            return 0
        if ino not in self.map and time.monotonic() - self._last_scan >= self.min_rescan_s:
            self._scan()
        return self.map.get(ino, 0)


def cgroup2_mount(proc: str = "/proc") -> str:
    """Where the cgroup v2 hierarchy is mounted (``<proc>/self/mountinfo``); "" if nowhere."""
    try:
        with open(os.path.join(proc, "self", "mountinfo")) as f:
            for line in f:
                pre, sep, post = line.partition(" - ")
                if sep and post.split(" ", 1)[0] == "cgroup2":
                    return pre.split()[4]
    except OSError:
        pass
    return ""


def pid_cgroup_id(pid: int, proc: str = "/proc", mount: str | None = None) -> int:
    """The cgroup v2 id (its directory's inode number, what bpf_get_current_cgroup_id gives)
    of a process; 0 when it is gone or has no v2 cgroup."""
    mount = cgroup2_mount(proc) if mount is None else mount
    if not mount or pid <= 0:
        return 0
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            for line in f:
                if line.startswith("0::"):
                    return os.stat(mount + line[3:].strip().rstrip("/")).st_ino
    except OSError:
        pass
    return 0
