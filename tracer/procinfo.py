"""Process facts from /proc: lineage, start time, job identity, socket owners.

Every function takes the proc root so tests can point it at a fixture tree.
The collector needs lineage (a dataloader worker is a child of the training
process that NVML lists on the GPU) and the job id/rank (to line up ranks of
one job across nodes); the tracer ships both in a ``proc`` table.
"""

from __future__ import annotations

import os
import time

import numpy as np

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


def read_stat(pid: int, proc: str = "/proc"):
    """(ppid, comm, start_ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    lp, rp = data.find(b"("), data.rfind(b")")
    comm = data[lp + 1: rp].decode("utf-8", "replace")
    rest = data[rp + 2:].split()
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
            env[k.decode(errors="replace")] = v.decode("utf-8", "replace")
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


class ProcCache:
    """Remembers what it learned about each pid and reports each pid (with its
    ancestors) once to the collector."""

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self.hz = os.sysconf("SC_CLK_TCK")
        self.btime = boot_time_ns(proc)
        self.info = {}          # pid -> (ppid, comm, start_ns, job, rank)
        self.sent = set()

    def lookup(self, pid: int):
        pid = int(pid)
        if pid in self.info:
            return self.info[pid]
        st = read_stat(pid, self.proc)
        if st is None:
            return None
        ppid, comm, ticks = st
        job, rank = job_of(read_env(pid, self.proc))
        self.info[pid] = (ppid, comm, self.btime + ticks * 1_000_000_000 // self.hz, job, rank)
        return self.info[pid]

    def table_for(self, pids) -> dict:
        """A ``proc`` table for pids (and their ancestors) not yet reported."""
        rows = []
        todo = [int(p) for p in set(int(p) for p in pids) if p]
        while todo:
            pid = todo.pop()
            if pid in self.sent or pid <= 0:
                continue
            inf = self.lookup(pid)
            if inf is None:
                continue
            self.sent.add(pid)
            rows.append((pid, *inf))
            if inf[0] > 1:
                todo.append(inf[0])
        if not rows:
            return {}
        cols = list(zip(*rows))
        return {"pid": np.array(cols[0], dtype=np.uint64), "ppid": np.array(cols[1], dtype=np.uint64),
                "comm": np.array(cols[2], dtype=object), "start_ns": np.array(cols[3], dtype=np.uint64),
                "job": np.array(cols[4], dtype=object), "rank": np.array(cols[5], dtype=np.int64)}

    def forget_dead(self):
        """Drop cached pids that exited (pid reuse would otherwise mislabel)."""
        for pid in list(self.info):
            if not os.path.exists(os.path.join(self.proc, str(pid))):
                self.info.pop(pid, None)
                self.sent.discard(pid)


class SocketOwners:
    """Socket inode -> owning pid, by scanning /proc/<pid>/fd on a miss (rate limited)."""

    def __init__(self, proc: str = "/proc", min_rescan_s: float = 0.2):
        self.proc = proc
        self.map = {}
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
            fd_dir = os.path.join(self.proc, p, "fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(os.path.join(fd_dir, fd))
                except OSError:
                    continue
                if link.startswith("socket:["):
                    found.setdefault(int(link[8:-1]), int(p))
        self.map.update(found)

    def owner(self, ino: int) -> int:
        ino = int(ino)
        if not ino:
            return 0
        if ino not in self.map and time.monotonic() - self._last_scan >= self.min_rescan_s:
            self._scan()
        return self.map.get(ino, 0)
