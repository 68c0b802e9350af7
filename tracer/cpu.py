"""CPU time of the GPUs' processes: the "cpu" table.

A GPU can go idle with nothing blocked at all: its process computes on the CPU (Python-side
preprocessing, metrics, a CPU-bound augmentation, serializing a checkpoint), or its DataLoader
workers are all busy decoding while it waits for them in a queue. No stall probe sees that,
so the analysis needs the processes' CPU time: every ``period`` the sampler reads the user +
system time of each owner process (the GPUs' processes and their descendants) from
``/proc/<pid>/stat`` (the whole thread group's, in clock ticks) and sends it as a running
total; the analysis takes the difference across an idle interval (``verdict.cpu_bound``).

Owners: the sched family's set when it is loaded (NVML's processes and every descendant, kept
by the kernel at fork), else NVML's processes and their descendants from their
``/proc/<pid>/task/<tid>/children`` lists (refreshed every ``children_s``).

Cost: one small read per owner per period (about 10 us): 72 owners (8 GPUs, 8 workers each)
at the 500 ms default are about 1.5 ms of CPU per second.
"""

from __future__ import annotations

import os
import time

import numpy as np

TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def read_cpu_ns(pid: int, proc: str = "/proc"):
    """User + system time of process ``pid`` (all its threads) in ns, or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return (int(rest[11]) + int(rest[12])) * TICK_NS      # utime, stime (fields 14, 15)
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
    """``poll(roots, owners)`` -> ``{"cpu": {ts_ns, pid, cpu_ns}}`` or None. ``owners`` is the
    full owner set when the caller has one (the sched family's), else None: the descendants
    of ``roots`` are then found here."""

    def __init__(self, proc: str = "/proc", children_s: float = 2.0):
        self.proc = proc
        self.children_s = children_s
        self._kids: set = set()
        self._kids_of: frozenset = frozenset()
        self._kids_at = -1e18
        self.reads = 0

    def owners(self, roots, owners=None) -> set:
        roots = {int(p) for p in roots if int(p) > 0}
        if owners is not None:
            return {int(p) for p in owners} | roots
        now = time.monotonic()
        if frozenset(roots) != self._kids_of or now - self._kids_at >= self.children_s:
            self._kids, self._kids_of, self._kids_at = children_of(roots, self.proc), frozenset(roots), now
        return roots | self._kids

    def poll(self, roots, owners=None):
        pids, vals = [], []
        for pid in sorted(self.owners(roots, owners)):
            v = read_cpu_ns(pid, self.proc)
            self.reads += 1
            if v is not None:
                pids.append(pid)
                vals.append(v)
        if not pids:
            return None
        n = len(pids)
        return {"cpu": {"ts_ns": np.full(n, time.time_ns(), dtype=np.uint64),
                        "pid": np.array(pids, dtype=np.uint64), "cpu_ns": np.array(vals, dtype=np.uint64)}}
