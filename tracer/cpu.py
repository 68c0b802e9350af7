"""CPU time of the GPUs' processes: the "cpu" table.

A GPU can go idle with nothing blocked at all: its process computes on the CPU (Python-side
preprocessing, metrics, a CPU-bound augmentation, serializing a checkpoint), or its DataLoader
workers are all busy decoding while it waits for them in a queue. No stall probe sees that,
so the analysis needs the processes' CPU time: every ``period`` the sampler reads the user +
system time of each owner process (the GPUs' processes and their descendants) from
``/proc/<pid>/stat`` (the whole thread group's, in clock ticks) and sends it as a running
total; the analysis takes the difference across an idle interval (``verdict.cpu_bound``).

Which processes: those NVML lists on a GPU that a poll found mostly idle in the last second
(tracer/agent.py; the analysis reads CPU time inside idle intervals only, so while every GPU
computes nothing is read), and their descendants from the kernel's
``/proc/<pid>/task/<tid>/children`` lists (re-read every ``children_s``).

Cost (bench/tracer_bench.py ``cpu_sampler``): while GPUs idle, one small read per process per
period (about 10 us); 72 processes (8 GPUs, 8 workers each) at the 250 ms default measured
0.62-0.67% of a core on this 2-core machine. The period bounds what can be judged: an interval
needs two samples inside it, half its length apart.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .procinfo import stat_fields

TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def read_cpu_ns(pid: int, proc: str = "/proc"):
    """User + system time of process ``pid`` (all its threads) in ns, or None if it is gone."""
    got = read_cpu(pid, proc)
    return None if got is None else got[1]


def read_cpu(pid: int, proc: str = "/proc"):
    """(comm, user + system ns) of process ``pid`` (all its threads), or None if it is gone:
    the name it has now (a DataLoader worker renames itself after the fork)."""
    st = stat_fields(pid, proc)
    if st is None:
        return None
    comm, rest = st
    try:
        return comm, (int(rest[11]) + int(rest[12])) * TICK_NS      # utime, stime (fields 14, 15)
    except (IndexError, ValueError):
        return None


def children_of(pids, proc: str = "/proc") -> set:
    """Living descendants of ``pids`` from the kernel's per-thread children lists
    (CONFIG_PROC_CHILDREN; an empty set where the files are absent)."""
    out: set = set()
    todo = [int(p) for p in pids]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


class CpuSampler:
    """``poll(roots, all_owners)`` -> ``{"cpu": {ts_ns, pid, comm, cpu_ns}}`` or None: ``roots``
    and their descendants (found through the kernel's children lists, re-read every
    ``children_s`` or when the roots change). Where those lists do not exist
    (CONFIG_PROC_CHILDREN off), ``all_owners()``, when given (the sched family's owner set:
    every GPU's processes and descendants), stands in for the descendants."""

    def __init__(self, proc: str = "/proc", children_s: float = 2.0):
        self.proc = proc
        self.children_s = children_s
        self._kids: set = set()
        self._kids_of: frozenset = frozenset()
        self._kids_at = -1e18
        self.have_children = None      # whether the kernel has the children lists (once known)

    def owners(self, roots, all_owners=None) -> set:
        roots = {int(p) for p in roots if int(p) > 0}
        if self.have_children is None and roots:
            r = next(iter(roots))
            self.have_children = os.path.exists(f"{self.proc}/{r}/task/{r}/children") or \
                not os.path.exists(f"{self.proc}/{r}")
        if self.have_children is False:
            return roots | ({int(p) for p in all_owners()} if all_owners is not None else set())
        now = time.monotonic()
        if frozenset(roots) != self._kids_of or now - self._kids_at >= self.children_s:
            self._kids, self._kids_of, self._kids_at = children_of(roots, self.proc), frozenset(roots), now
        return roots | self._kids

    def poll(self, roots, all_owners=None):
        pids, comms, vals = [], [], []
        for pid in sorted(self.owners(roots, all_owners)):
            got = read_cpu(pid, self.proc)
            if got is not None:
                pids.append(pid)
                comms.append(got[0])
                vals.append(got[1])
        if not pids:
            return None
        n = len(pids)
        comm = np.empty(n, dtype=object)
        comm[:] = comms
        return {"cpu": {"ts_ns": np.full(n, time.time_ns(), dtype=np.uint64),
                        "pid": np.array(pids, dtype=np.uint64), "comm": comm,
                        "cpu_ns": np.array(vals, dtype=np.uint64)}}
