"""Which pod, container and job a verdict's GPU belonged to.

Two sources, both from the tracer: the GPU meta of each batch lists, per GPU, the pods the
kubelet allocated it to (``pods``: [{namespace, pod, container}]) and the Slurm jobs of
the HPC job-mapping directory (``jobs``); the ``proc`` table gives each process's pod UID and
container id from its cgroup. A GPU's holders change as jobs come and go, so they are kept as
a history (changes only, by the batch's send time) and looked up at the interval's start.
"""

from __future__ import annotations

import bisect
import collections


def _holder_key(p) -> tuple:
    return (str(p.get("namespace", "")), str(p.get("pod", "")), str(p.get("container", "")))


class GpuHolders:
    """Per GPU index, the history of (time ns, pods, jobs) as the tracer reported it."""

    def __init__(self) -> None:
        self.hist: dict = {}        # gpu index -> ([time ns], [(pods, jobs)])

    def absorb(self, gpus, t_ns: int) -> None:
        """One batch's GPU entries (``meta["gpu"]["gpus"]``) as of ``t_ns``."""
        for g in gpus or ():
            if not isinstance(g, dict) or "index" not in g:
                continue
            pods = tuple(sorted({_holder_key(p) for p in g.get("pods") or () if isinstance(p, dict)}))
            jobs = tuple(str(j) for j in g.get("jobs") or ())
            times, states = self.hist.setdefault(int(g["index"]), ([], []))
            i = bisect.bisect_right(times, t_ns)
            if i > 0 and states[i - 1] == (pods, jobs):
                continue            # unchanged: keep the earlier entry
            times.insert(i, t_ns)
            states.insert(i, (pods, jobs))

    def at(self, gpu: int, t_ns: int) -> tuple:
        """(pods, jobs) of a GPU at ``t_ns``: the latest report at or before it (the first
        report for times before any); ((), ()) when never reported."""
        h = self.hist.get(int(gpu))
        if not h:
            return (), ()
        times, states = h
        return states[max(bisect.bisect_right(times, t_ns) - 1, 0)]

    def trim(self, cutoff_ns: int) -> None:
        """Forget changes before ``cutoff_ns`` except the last one (still in force then): the
        live window's memory stays bounded however often holders change."""
        for times, states in self.hist.values():
            i = bisect.bisect_right(times, cutoff_ns) - 1
            if i > 0:
                del times[:i]
                del states[:i]

    def job(self, gpu: int, t_ns: int) -> str:
        """The one job the mapping names for a GPU at ``t_ns``; "" for none or several."""
        jobs = self.at(gpu, t_ns)[1]
        return jobs[0] if len(jobs) == 1 else ""


def pod_fields(pods: tuple) -> dict:
    """{namespace, pod, container} of the one container holding a GPU; {} when none or
    several (a shared GPU: the API does not say which of them idled it)."""
    if len(pods) != 1:
        return {}
    ns, pod, container = pods[0]
    return {k: v for k, v in (("namespace", ns), ("pod", pod), ("container", container)) if v}


def owner_cgroup(roots, info: dict) -> dict:
    """{pod_uid, container_id} most common among a GPU's processes (``info[pid]`` is
    (comm, job, rank, pod_uid, container_id)); only the known keys."""
    out = {}
    for k, col in (("pod_uid", 3), ("container_id", 4)):
        c = collections.Counter(info[r][col] for r in roots if r in info and len(info[r]) > col and info[r][col])
        if c:
            out[k] = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return out
