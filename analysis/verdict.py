"""Typed verdicts: one :class:`Verdict` per GPU idle interval, its culprit :class:`Chain`, the
failure-mode class of a chain, and the grouping of repeated culprits for reports.

``Verdict.to_json()`` gives the DESIGN.md field names (plus ``class``, ``chain``, ``basis``);
everything else reads the attributes.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import numpy as np

from .http_episodes import full_reason, http_class, statuses_of

#: failure modes a culprit chain can be classed as
CLASSES = ("dataset_read", "checkpoint_write", "metadata", "network", "cpu", "blocked",
           "api_throttling", "api_error", "api_timeout", "api_slow",
           "rank_exit")   # a remote verdict: another rank of the job died (no chain of stalls)

#: (stall type, op) -> class; ops not listed take the type's default (_TYPE_CLASS).
#: Copies (sendfile, splice, copy_file_range) count as reads of their source: a row carries
#: one path and nothing marks it as the destination.
OP_CLASS = {
    **{("io", op): "dataset_read" for op in (
        "read", "pread", "readv", "page_fault", "sendfile", "splice", "copy_file_range",
        "io_uring_enter", "io_getevents")},
    # a slow close() is a flush of what was written (NFS writeback, FUSE FLUSH: an upload)
    **{("io", op): "checkpoint_write" for op in ("write", "pwrite", "writev", "fsync", "fdatasync", "close")},
    **{("io", op): "metadata" for op in ("openat", "stat", "getdents")},
    ("nfs", "nfs_read"): "dataset_read",
    **{("nfs", op): "checkpoint_write" for op in ("nfs_write", "nfs_commit", "nfs_fsync")},
    **{("nfs", op): "metadata" for op in ("nfs_open", "nfs_getattr")},
    ("nfs", "nfs_rpc"): "network",
    ("block", "blk_read"): "dataset_read",
    **{("block", op): "checkpoint_write" for op in ("blk_write", "blk_flush")},
    ("sched", "runq"): "cpu",
    ("sched", "blocked"): "blocked",
}
_TYPE_CLASS = {"io": "blocked", "nfs": "blocked", "block": "blocked", "net": "network",
               "rdma": "network", "sched": "blocked", "http": "api_slow"}


def op_class(kind: str, op: str) -> str:
    """Failure-mode class of one stall."""
    return OP_CLASS.get((kind, op)) or _TYPE_CLASS.get(kind, "blocked")


def event_class(e: dict) -> str:
    """Failure-mode class of one stall event dict: HTTP by its answers (throttled, error,
    timeout, slow), the others by type and op."""
    if e.get("type") == "http":
        return http_class(e)
    return op_class(e.get("type", ""), e.get("op", "") or e.get("type", ""))


@dataclass
class Target:
    """What a chain waited on, one entry per file (io, nfs), flow (net), device (block,
    rdma), kernel function (sched blocked) or process that ran instead (sched runq)."""

    name: str
    fs: str = ""
    server: str = ""
    ops: dict = field(default_factory=dict)   # op -> summed count
    count: int = 0
    blocked_ns: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "fs": self.fs, "server": self.server, "ops": dict(self.ops),
                "count": self.count, "blocked_ns": self.blocked_ns}


@dataclass
class Chain:
    """One owner process's stalls of one type that explain an interval, back to back."""

    kind: str                      # stall type: io, nfs, block, net, rdma, sched
    pid: int
    comm: str
    klass: str                     # failure mode (CLASSES)
    ops: dict                      # op -> summed count, first seen first
    count: int                     # sum of the stalls' ``count`` (1 for a plain row)
    links: int                     # rows
    blocked_ns: int                # summed time blocked (``blocked_ns``, else the duration)
    covered_ns: int                # the union of its stalls inside the interval
    start_ns: int                  # first stall's start
    end_ns: int                    # last end
    targets: list = field(default_factory=list)   # Target, most blocked first
    other_pid: int = 0             # sched runq: who held the CPU longest
    other_comm: str = ""
    answers: dict = field(default_factory=dict)   # http: status -> attempts answered so (0: none)
    reasons: dict = field(default_factory=dict)   # http: status -> reason phrase
    # io: op -> the files its rows went to: their distinct paths plus their ``more_files``
    # (a storm over many small files of one filesystem is one target, named after one)
    op_files: dict = field(default_factory=dict)

    @property
    def files(self) -> list:
        return [t.name for t in self.targets] if self.kind in ("io", "nfs") else []

    def to_json(self) -> dict:
        d = {"kind": self.kind, "class": self.klass, "pid": self.pid, "comm": self.comm,
             "ops": dict(self.ops), "count": self.count, "links": self.links,
             "blocked_ns": self.blocked_ns, "covered_ns": self.covered_ns,
             "start_ns": self.start_ns, "end_ns": self.end_ns, "files": self.files,
             "op_files": dict(self.op_files),
             "targets": [t.to_json() for t in self.targets]}
        if self.kind == "sched" and "runq" in self.ops:
            d.update(other_pid=self.other_pid, other_comm=self.other_comm)
        if self.kind == "http":
            d.update(answers={str(k): v for k, v in self.answers.items()},
                     reasons={str(k): v for k, v in self.reasons.items()})
        return d


def _target_name(e: dict) -> tuple:
    """(name, fs, server) of one stall event dict."""
    kind = e["type"]
    if kind in ("io", "nfs"):
        return e.get("path") or "?", e.get("fs", ""), e.get("server", "") or ""
    if kind == "net":
        return f"{e.get('saddr')}:{e.get('sport')}->{e.get('daddr')}:{e.get('dport')}", "", \
            f"{e.get('daddr')}:{e.get('dport')}"
    if kind == "rdma":
        return f"{e.get('device') or '?'} qp {e.get('qp', 0)}", "", e.get("device", "")
    if kind == "block":
        return e.get("device") or "?", "", ""
    if kind == "sched" and e.get("op") == "runq":
        return f"{e.get('other_comm') or '?'} pid {e.get('other_pid', 0)}", "", ""
    if kind == "sched":
        return e.get("reason") or "?", "", ""
    if kind == "http":
        return f"{e.get('host') or '?'}{e.get('path') or ''}", "", e.get("host") or "?"
    return e.get("op", "?"), "", ""


def build_chain(links: list, covered_ns: int) -> Chain:
    """A :class:`Chain` from its stall event dicts (one pid, one type, by start)."""
    groups = [(e, max(int(e.get("count", 1) or 1), 1), int(e.get("blocked_ns", 0) or 0) or int(e["dur_ns"]),
               int(e["ts_ns"]) + int(e["dur_ns"])) for e in links]
    ch = chain_of_groups(links[0], groups, len(links), covered_ns)
    if ch.kind == "http":
        for e in links:
            sts = statuses_of(e)
            for code in sts:
                ch.answers[code] = ch.answers.get(code, 0) + 1
            if e.get("reason") and sts:
                code = next((c for c in sts if c >= 400), sts[-1])
                ch.reasons.setdefault(code, full_reason(code, e["reason"]))
    return ch


#: stall type -> the fields :func:`event_class` and :func:`_target_name` read (besides the
#: type): rows alike in all of them add to the same op, class and target, so a chain can be
#: summed per distinct row (:func:`chain_of_groups`).  http is absent: its class and answers
#: read every attempt.
GROUP_FIELDS = {
    "io": ("op", "path", "fs", "server"),
    "nfs": ("op", "path", "fs", "server"),
    "net": ("op", "saddr", "sport", "daddr", "dport"),
    "rdma": ("op", "device", "qp"),
    "block": ("op", "device"),
    "sched": ("op", "other_comm", "other_pid", "reason"),
}


def chain_of_groups(first: dict, groups, links: int, covered_ns: int) -> Chain:
    """A :class:`Chain` from groups of its stalls, in the order of each group's first stall:
    ``(event dict, summed count, summed blocked ns, latest end)``, each group's rows alike
    in every field :data:`GROUP_FIELDS` names (one row per group for http; two groups may be
    alike too: they add up as their rows would); ``first`` is the
    chain's first stall, ``links`` its number of rows.  The same chain as
    :func:`build_chain` over the rows, for work that scales with the distinct rows."""
    kind = first["type"]
    ops = {}
    by_class = collections.Counter()
    targets = {}
    op_more: dict = {}
    op_names: dict = {}
    count = blocked = 0
    end = 0
    for e, c, b, e_end in groups:
        op = e.get("op", "") or kind
        ops[op] = ops.get(op, 0) + c
        count += c
        blocked += b
        end = max(end, e_end)
        by_class[event_class(e)] += b
        name, fs, server = _target_name(e)
        t = targets.get(name)
        if t is None:
            t = targets[name] = Target(name, fs, server)
        t.ops[op] = t.ops.get(op, 0) + c
        t.count += c
        t.blocked_ns += b
        op_more[op] = op_more.get(op, 0) + int(e.get("more_files", 0) or 0)
        op_names.setdefault(op, set()).add(name)
    klass = max(by_class, key=lambda k: (by_class[k], -CLASSES.index(k)))
    ts = sorted(targets.values(), key=lambda t: -t.blocked_ns)
    ch = Chain(kind, int(first["pid"]), first.get("comm", ""), klass, ops, count, links,
               blocked, int(covered_ns), int(first["ts_ns"]), end, ts,
               op_files={op: len(op_names[op]) + op_more.get(op, 0) for op in op_names})
    runq = [t for t in ts if "runq" in t.ops] if kind == "sched" else []
    if runq:                # who held the CPU longest
        ch.other_comm, _, pid = runq[0].name.rpartition(" pid ")
        ch.other_pid = int(pid)
    return ch


@dataclass
class JobCost:
    """What a local culprit cost the rest of its job: ``ranks`` (the job's other GPUs held
    up while it stalled), ``gpu_seconds`` = ranks x the time it explains, and ``estimate``
    when some of those ranks show no idle interval then (ranks waiting in an NCCL collective
    keep their GPU busy, so NVML cannot confirm their wait); ``idle_ranks`` did go idle."""

    ranks: int
    gpu_seconds: float
    estimate: bool
    idle_ranks: int = 0

    def to_json(self) -> dict:
        return {"ranks": self.ranks, "gpu_seconds": self.gpu_seconds, "estimate": self.estimate,
                "idle_ranks": self.idle_ranks}


@dataclass
class Verdict:
    """What stallscope says about one GPU idle interval."""

    node: str
    gpu: int
    gpu_uuid: str
    idle_start_ns: int
    idle_end_ns: int
    resolution_ns: int
    open: bool
    open_start: bool
    synth_samples: int
    verdict: str                   # culprit | remote | unexplained
    culprit: dict | None = None           # the culprit chain's representative stall (event dict)
    remote: bool = False
    culprit_node: str | None = None
    clock_uncertainty_ns: int = 0
    explained_fraction: float = 0.0
    local_explained_fraction: float = 0.0
    contributors: list = field(default_factory=list)   # other chains' representative stalls
    owners: list = field(default_factory=list)
    gpu_pids: list = field(default_factory=list)
    job: str = ""
    rank: int = -1
    klass: str | None = None              # JSON "class": the culprit chain's failure mode
    chain: Chain | None = None            # the culprit chain (None when unexplained)
    basis: str | None = None              # "specific" | "backstop" (scheduler rows needed); None
    lost_ns: int = 0               # idle time the samples carry: the explained fraction's base
    # who held the GPU (analysis/attribution.py), "" when unknown: the kubelet's allocation
    # (namespace, pod, container) and the owner processes' cgroup (pod_uid, container_id)
    namespace: str = ""
    pod: str = ""
    container: str = ""
    pod_uid: str = ""
    container_id: str = ""
    # across ranks (analysis/crossnode.py), set only where known: a remote verdict's cause
    # ("peer_io" a peer's local stall, "peer_net" a peer's TCP flow to this node
    # retransmitting, "peer_exit" a peer rank died) and that peer's rank; a local culprit's
    # cost to the rest of its job
    cause: str | None = None
    culprit_rank: int = -1
    job_cost: JobCost | None = None
    # an interval nothing traced explains, at a GPU process's start or exit or while its
    # worker processes started (:func:`lifecycle`): which process and when; ``klass`` names it
    process: dict | None = None

    @property
    def duration_ns(self) -> int:
        return self.idle_end_ns - self.idle_start_ns

    @property
    def explained_ns(self) -> int:
        """Idle time explained: ``explained_fraction`` of the time lost."""
        return int(round(self.explained_fraction * self.lost_ns))

    def to_json(self) -> dict:
        return {
            "node": self.node, "gpu": self.gpu, "gpu_uuid": self.gpu_uuid,
            "idle_start_ns": self.idle_start_ns, "idle_end_ns": self.idle_end_ns,
            "duration_ns": self.duration_ns, "resolution_ns": self.resolution_ns,
            "open": self.open, "open_start": self.open_start,
            "synth_samples": self.synth_samples, "verdict": self.verdict,
            "culprit": self.culprit, "remote": self.remote, "culprit_node": self.culprit_node,
            "clock_uncertainty_ns": self.clock_uncertainty_ns,
            "explained_fraction": self.explained_fraction,
            "local_explained_fraction": self.local_explained_fraction,
            "contributors": self.contributors, "owners": self.owners,
            "gpu_pids": self.gpu_pids, "job": self.job, "rank": self.rank,
            "class": self.klass, "chain": None if self.chain is None else self.chain.to_json(),
            "basis": self.basis, "lost_ns": self.lost_ns,
            **{k: v for k, v in (("namespace", self.namespace), ("pod", self.pod),
                                 ("container", self.container), ("pod_uid", self.pod_uid),
                                 ("container_id", self.container_id)) if v},
            **({"cause": self.cause, "culprit_rank": self.culprit_rank} if self.cause else {}),
            **({"job_cost": self.job_cost.to_json()} if self.job_cost is not None else {}),
            **({"process": self.process} if self.process else {}),
        }


# --------------------------------------------------------------------------- lifecycle

#: classes of unexplained intervals at a process's edges (``Verdict.klass``), in priority order
LIFECYCLE = ("process_exit", "process_start", "workers_start")


def lifecycle(proc: dict, roots, members, start_ns: int, end_ns: int, res_ns: int, open_end: bool):
    """``(class, process)`` for an interval nothing traced explains, when the GPU's own
    processes account for it, else None. From the node's proc table (one row per pid):

    * ``process_exit``: a process NVML listed on the GPU (a root) exited in it: the job ended
      or crashed (``exit_status``);
    * ``process_start``: a root started in it, or less than a sample period before it (the
      GPU was idle since its last work, before this process ran): start-up (imports, CUDA
      context, model load) before its first GPU work;
    * ``workers_start``: processes descending from a root started in it (DataLoader workers
      re-forked each epoch, say): the GPU waited while they started. A hint, not a proof.

    ``process`` holds pid, comm and ``at_ns`` (the start or exit), with ``exit_status`` (a
    wait(2) status, -1 unknown) or, for workers, ``pids`` (up to 8) and ``count``."""
    if proc is None or not len(proc.get("pid", ())):
        return None
    pid = np.asarray(proc["pid"], dtype=np.int64)
    start = np.asarray(proc["start_ns"], dtype=np.int64)
    ex = np.asarray(proc["exit_ns"], dtype=np.int64) if "exit_ns" in proc else np.zeros(len(pid), np.int64)
    roots = np.asarray(list(roots), dtype=np.int64)
    r = np.flatnonzero(np.isin(pid, roots))
    hi = np.iinfo(np.int64).max if open_end else end_ns + res_ns

    def row(j, at, **more):
        return {"pid": int(pid[j]), "comm": str(proc["comm"][j]), "at_ns": int(at), **more}

    ended = r[(ex[r] > 0) & (ex[r] >= start_ns - res_ns) & (ex[r] <= hi)]
    if len(ended):
        j = ended[np.argmin(ex[ended])]
        status = int(proc["exit_status"][j]) if "exit_status" in proc else -1
        return "process_exit", row(j, ex[j], exit_status=status)
    began = r[(start[r] > 0) & (start[r] >= start_ns - res_ns) & (start[r] <= end_ns)]
    if len(began):
        j = began[np.argmin(start[began])]
        return "process_start", row(j, start[j])
    kids = np.flatnonzero(np.isin(pid, np.setdiff1d(np.asarray(list(members), dtype=np.int64), roots)))
    kids = kids[(start[kids] >= start_ns) & (start[kids] <= end_ns)]
    if len(kids):
        kids = kids[np.argsort(start[kids], kind="stable")]
        return "workers_start", row(kids[0], start[kids[0]], pids=[int(x) for x in pid[kids[:8]]],
                                    count=int(len(kids)))
    return None


#: the least CPU (a share of one core over the interval) a process of the GPU must have used
#: for ``cpu_bound``: one waiting for data or IO sleeps (near 0); one computing on a machine
#: short of CPU gets part of a core and waits for the rest (its runq time, when not enough
#: to blame, is not counted here)
CPU_BOUND_SHARE = 0.5
#: for ``cpu_bound``: the least part of the interval a process's samples inside it must span.
#: A third, not a half: the agent sees an idle spell 0.1-0.3 s late (its NVML poll and sample
#: periods), so a window of 0.55 s had samples spanning 0.2 s, and computing went unnamed
CPU_SPAN = 1 / 3
#: classes of an unexplained interval that its GPU's own processes account for
UNEXPLAINED_CLASSES = (*LIFECYCLE, "cpu_bound", "net_wait")
#: for ``net_wait``: the least share of a process's samples inside the interval that found it
#: waiting on a TCP receive
NET_WAIT_SHARE = 0.5


def cpu_bound(cpu: dict, members, start_ns: int, end_ns: int, comm_of=None,
              share: float = CPU_BOUND_SHARE):
    """``("cpu_bound", process)`` for an interval nothing traced explains, when a process of
    the GPU (one NVML listed, or a descendant: a DataLoader worker) ran on the CPU for at
    least ``share`` of it (``share`` x its length of CPU time, user + system, all threads),
    else None: the GPU waited while its side of the host computed (Python-side preprocessing,
    a CPU-bound augmentation in busy workers, serializing a checkpoint), which no stall probe
    sees. A GPU process that waits for its workers sleeps (its CPU share drops); one that
    waits for the GPU spins only while the GPU is busy.

    From the ``cpu`` table's running totals per pid (tracer/cpu.py): a member's share is its
    CPU time between its first and last sample inside the interval (5% slack at each edge)
    over the time between them, which must be at least CPU_SPAN of the interval: samples
    outside it would mix in the busy phases around it (a process waiting on a busy GPU
    often spins: CUDA's default synchronization). ``process``: the busiest member's pid, comm, ``cpu_ns`` and
    ``share``, with ``busy``: every member at ``share`` or more, busiest first (up to 8;
    pid, comm, cpu_ns, share) and ``count``."""
    if cpu is None or not len(cpu.get("pid", ())) or end_ns <= start_ns:
        return None
    ts = np.asarray(cpu["ts_ns"], dtype=np.int64)
    length = end_ns - start_ns
    near = (ts >= start_ns - length // 20) & (ts <= end_ns + length // 20)
    pid = np.asarray(cpu["pid"], dtype=np.int64)[near]
    mine = np.isin(pid, np.asarray(list(members), dtype=np.int64))
    if not mine.any():
        return None
    rows_at = np.flatnonzero(near)[mine]
    pid, ts, tot = pid[mine], ts[near][mine], np.asarray(cpu["cpu_ns"], dtype=np.int64)[near][mine]
    found = []
    for p in np.unique(pid).tolist():
        k = np.flatnonzero(pid == p)
        o = k[np.argsort(ts[k], kind="stable")]
        t, v = ts[o], tot[o]
        span = int(t[-1] - t[0])
        if span < length * CPU_SPAN:
            continue
        used = float(v[-1] - v[0])
        found.append((used / span, int(p), int(used * length / span), int(rows_at[o[-1]])))
    busy = sorted((f for f in found if f[0] >= share), reverse=True)
    if not busy:
        return None

    def name(p: int, row: int) -> str:      # its name as sampled (a worker renames itself)
        c = str(cpu["comm"][row]) if "comm" in cpu else ""
        return c or (comm_of(p) if comm_of else "?")
    rows = [{"pid": p, "comm": name(p, r), "cpu_ns": used, "share": round(sh, 3)} for sh, p, used, r in busy]
    return "cpu_bound", {**rows[0], "busy": rows[:8], "count": len(rows)}


def net_wait(wait: dict, cpu: dict, members, start_ns: int, end_ns: int, comm_of=None,
             share: float = NET_WAIT_SHARE):
    """``("net_wait", process)`` for an interval nothing traced explains, when a process of
    the GPU was found asleep receiving on a TCP socket in at least ``share`` of its samples
    inside it (at least two), else None: a DataLoader worker streaming samples over HTTP or
    from an object store, a trainer waiting on a rendezvous store or a parameter server.
    Nothing is blocked in a probe's sense (a socket wait is voluntary), so only the
    sampler's ``wait`` rows (tracer/cpu.py) see it; the ``cpu`` table's rows of the same
    passes count the samples. ``process``: the member waiting in the most samples: pid,
    comm, ``peer`` (``ip:port``, the commonest), ``call`` and ``share``; ``waiting``: every
    such member (up to 8), and ``count``."""
    if wait is None or cpu is None or not len(wait.get("pid", ())) or end_ns <= start_ns:
        return None
    mem = np.asarray(list(members), dtype=np.int64)
    cts, cpid = np.asarray(cpu["ts_ns"], dtype=np.int64), np.asarray(cpu["pid"], dtype=np.int64)
    c_in = (cts >= start_ns) & (cts <= end_ns) & np.isin(cpid, mem)
    wts, wpid = np.asarray(wait["ts_ns"], dtype=np.int64), np.asarray(wait["pid"], dtype=np.int64)
    w_in = np.flatnonzero((wts >= start_ns) & (wts <= end_ns) & np.isin(wpid, mem))
    if not len(w_in):
        return None
    samples = dict(zip(*np.unique(cpid[c_in], return_counts=True)))
    found = []
    for p in np.unique(wpid[w_in]).tolist():
        rows = w_in[wpid[w_in] == p]
        n = int(samples.get(p, 0))
        if n < 2 or len(rows) < share * n:
            continue
        peers, counts = np.unique(np.asarray(wait["peer"], dtype=object)[rows].astype(str), return_counts=True)
        peer = str(peers[np.argmax(counts)])
        last = int(rows[-1])
        found.append((len(rows) / n, len(rows), int(p), peer, str(wait["call"][last])))
    if not found:
        return None
    found.sort(key=lambda f: (-f[0], -f[1], f[2]))

    def name(p: int) -> str:      # its name as sampled (a worker renames itself)
        at = np.flatnonzero(c_in & (cpid == p))
        c = str(cpu["comm"][int(at[-1])]) if "comm" in cpu and len(at) else ""
        return c or (comm_of(p) if comm_of else "?")
    rows_out = [{"pid": p, "comm": name(p), "peer": peer, "call": call, "share": round(sh, 3), "samples": k}
                for sh, k, p, peer, call in found]
    return "net_wait", {**rows_out[0], "waiting": rows_out[:8], "count": len(rows_out)}


# --------------------------------------------------------------------------- groups

def path_pattern(name: str) -> str:
    """A path with every run of digits collapsed: ``/data/shard-17.bin`` -> ``/data/shard-#.bin``."""
    return re.sub(r"\d+", "#", name)


def group_key(v: Verdict) -> tuple:
    """(class, where, pattern) of a verdict's culprit chain: where = NFS server or filesystem
    (io, nfs), peer (net), device (rdma); pattern = its main target with digits collapsed."""
    ch = v.chain
    assert ch is not None, "only verdicts with a culprit chain are grouped"
    t = ch.targets[0] if ch.targets else Target("?")
    where = t.server or t.fs
    if ch.kind == "sched" and "runq" in ch.ops:
        pattern = path_pattern(ch.other_comm or t.name)
    elif ch.kind == "net":
        pattern = path_pattern(t.server)
        where = ""
    elif ch.kind == "http":
        pattern = f"{'+'.join(ch.ops)} {path_pattern(t.name[len(t.server):] if t.name.startswith(t.server) else t.name)}"
    else:
        pattern = path_pattern(t.name)
    return ch.klass, where, pattern


def group_verdicts(verdicts) -> list:
    """Repeated culprits: verdicts with a culprit (local or remote) grouped by
    :func:`group_key`, most idle time explained first.  Each group is a dict: ``class``,
    ``where``, ``pattern``, ``intervals``, ``explained_ns`` (GPU time, summed), ``lost_ns``,
    ``blocked_ns`` (the chains'), ``count``, ``nodes``, ``gpus``, ``ranks``, ``files`` (up to
    10 examples) and, for checkpoint writes, ``breakdown``: explained time by (rank, file,
    filesystem or server)."""
    groups = {}
    for v in verdicts:
        if v.verdict == "unexplained" or v.chain is None:
            continue
        k = group_key(v)
        g = groups.get(k)
        if g is None:
            g = groups[k] = {"class": k[0], "where": k[1], "pattern": k[2], "intervals": 0,
                             "explained_ns": 0, "lost_ns": 0, "blocked_ns": 0, "count": 0,
                             "nodes": set(), "gpus": set(), "ranks": set(), "files": [],
                             "_bd": collections.Counter()}
        g["intervals"] += 1
        g["explained_ns"] += v.explained_ns
        g["lost_ns"] += v.lost_ns
        g["blocked_ns"] += v.chain.blocked_ns
        g["count"] += v.chain.count
        g["nodes"].add(v.node)
        g["gpus"].add(f"{v.node}/{v.gpu}")
        if v.rank >= 0:
            g["ranks"].add(v.rank)
        for t in v.chain.targets:
            if len(g["files"]) < 10 and t.name not in g["files"]:
                g["files"].append(t.name)
            if k[0] == "checkpoint_write":
                share = v.explained_ns * t.blocked_ns // max(v.chain.blocked_ns, 1)
                g["_bd"][(v.rank, t.name, t.server or t.fs)] += share
    out = []
    for g in groups.values():
        bd = g.pop("_bd")
        g["nodes"] = sorted(g["nodes"])
        g["gpus"] = len(g["gpus"])
        g["ranks"] = sorted(g["ranks"])
        if g["class"] == "checkpoint_write":
            g["breakdown"] = [{"rank": r, "file": f, "where": w, "explained_ns": int(ns)}
                              for (r, f, w), ns in sorted(bd.items(), key=lambda kv: (-kv[1], kv[0]))]
        out.append(g)
    out.sort(key=lambda g: (-g["explained_ns"], g["class"], g["where"], g["pattern"]))
    return out
