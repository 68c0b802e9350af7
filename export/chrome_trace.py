"""A report as a Chrome trace (the Trace Event Format's JSON Object Format), which Perfetto UI
and chrome://tracing open, and the timeline model that the HTML report draws too.

Tracks:

* one process per node/GPU (``process_name`` "node gpuN (UUID)"): NVML utilization as a
  counter (``C``) and each idle interval as a complete slice (``X``) named by its verdict:
  the culprit's class (``dataset_read``), ``remote dataset_read``, ``unexplained`` or
  ``unexplained (cpu_bound)`` (a class of its GPU's own processes: process_start...);
* one thread per owner thread (the GPU's processes and their descendants) with its stalls as
  ``X`` slices (args: op, path, bytes, latency ...), under its real pid and tid;
* a flow arrow (``s`` on the culprit stall, ``f`` with ``bp: "e"`` on the idle slice, same
  ``id`` and ``cat``) from each culprit stall to the interval it explains.

Timestamps are wall-clock epoch microseconds written with three decimals (exact ns, as text:
a double cannot hold epoch ns), so the file lines up with a PyTorch profiler (Kineto) trace
of the same run; ``base_ns`` shifts them to another origin (a Kineto trace's
``baseTimeNanoseconds``).

Identifiers (real ones stay below :data:`PID_LIMIT`, Linux's PID_MAX_LIMIT):

* the first node (by name) keeps real pids and tids; node ``k`` adds ``k * PID_LIMIT`` so two
  nodes' pid 4242 stay apart (``args.pid``/``args.tid`` keep the real ones);
* GPU tracks are ``GPU_PID_BASE + k * 1024 + gpu``: above every real or node-shifted pid and
  far from the small device pids Kineto gives GPU streams;
* a thread whose stalls overlap (a read and the scheduler row inside it) gets extra lanes,
  tids from ``LANE_TID_BASE`` up, so each lane's slices never overlap (Perfetto drops
  complete events that overlap their parent without nesting) and a flow binds to exactly
  its stall.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

import numpy as np

from stallscope.analysis.text import describe, verdict_line
from stallscope.analysis.verdict import UNEXPLAINED_CLASSES, op_class
from stallscope.wire.schema import STALL_TABLES, TABLES, table_len

PID_LIMIT = 1 << 22          # Linux PID_MAX_LIMIT (64-bit): no real pid or tid reaches it
GPU_PID_BASE = 1 << 30       # GPU tracks; node-shifted pids stay below it (MAX_NODES)
LANE_TID_BASE = 1 << 31      # extra lanes of a thread with overlapping stalls
MAX_NODES = GPU_PID_BASE // PID_LIMIT
GPU_TID = 1                  # the idle-interval slices' thread inside a GPU track
UTIL_COUNTER = "GPU utilization"
FLOW_CAT = "blame"


# --------------------------------------------------------------------------- model

@dataclass
class GpuTrack:
    node: str
    gpu: int
    uuid: str
    period_ns: int
    ts_ns: np.ndarray            # NVML sample stamps, sorted (each ends the window it covers)
    util: np.ndarray
    intervals: list = field(default_factory=list)    # verdict indexes

    @property
    def label(self) -> str:
        return f"{self.node} gpu{self.gpu}" + (f" ({self.uuid})" if self.uuid else "")

    def windows(self) -> list:
        """(start_ns, util) steps: each sample's value from the start of the window it covers
        (the spacing to the previous sample, one period after a hole or when the spacing
        exceeds 1.5 periods); a missing stretch before it reads 0 (docs/design.md: the
        driver skips samples while a GPU idles)."""
        out = []
        p = self.period_ns
        prev = None
        for t, u in zip(self.ts_ns.tolist(), self.util.tolist()):
            gap = None if prev is None else t - prev
            if gap is not None and p and gap > 1.5 * p:
                out.append((prev, 0, True))                  # the missing stretch
                start = t - p
            elif gap is not None and (gap <= 1.5 * p or not p):
                start = prev
            else:
                start = t - p
            out.append((start, int(u), False))
            prev = t
        return out


@dataclass
class ThreadTrack:
    node: str
    pid: int
    tid: int
    comm: str            # the thread's
    proc_comm: str       # its process's
    stalls: list = field(default_factory=list)       # stall indexes, by start


@dataclass
class Stall:
    event: dict          # DESIGN.md event dict (type, ts_ns, dur_ns, pid, tid, comm, node, ...)
    thread: int          # ThreadTrack index
    explains: list = field(default_factory=list)     # verdict indexes it is the culprit of

    @property
    def start_ns(self) -> int:
        return int(self.event["ts_ns"])

    @property
    def end_ns(self) -> int:
        return int(self.event["ts_ns"]) + int(self.event["dur_ns"])

    @property
    def klass(self) -> str:
        return op_class(self.event["type"], self.event.get("op", ""))


@dataclass
class Timeline:
    """What both timeline exports draw: GPU tracks, owner-thread tracks, stalls, verdicts
    and the links culprit stall -> verdict."""

    nodes: list
    gpus: list
    threads: list
    stalls: list
    verdicts: list
    links: list          # (stall index, verdict index)
    gpu_of: list         # verdict index -> GpuTrack index


def interval_name(v) -> str:
    """The idle slice's name: the culprit's class, ``remote <class>``, ``unexplained`` or,
    where the GPU's own processes account for it, ``unexplained (<class>)`` (process_start,
    cpu_bound...)."""
    if v.verdict == "unexplained" or not v.klass:
        return f"unexplained ({v.klass})" if v.klass in UNEXPLAINED_CLASSES else "unexplained"
    return f"remote {v.klass}" if v.remote else v.klass


def _owners(tables: dict, extra) -> set:
    """The pids NVML listed on the node's GPUs, all their descendants, and ``extra``."""
    roots = {int(p) for p in np.asarray(tables["gpu_proc"]["pid"]).tolist()} | set(extra)
    kids = collections.defaultdict(list)
    pr = tables["proc"]
    for pid, ppid in zip(np.asarray(pr["pid"]).tolist(), np.asarray(pr["ppid"]).tolist()):
        kids[int(ppid)].append(int(pid))
    seen, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(kids.get(p, ()))
    return seen


def _stall_key(e: dict) -> tuple:
    return (e.get("node", ""), e["type"], int(e["ts_ns"]), int(e["dur_ns"]), int(e["pid"]),
            int(e["tid"]))


def build_timeline(res, all_stalls: bool = True) -> Timeline:
    """The timeline of an analysis :class:`~stallscope.analysis.analyze.Result` (from
    ``analyze()``, which fills ``res.nodes``).  ``all_stalls``: every stall of the owner
    threads (the trace); otherwise only the culprit stalls (the HTML)."""
    names = sorted(res.nodes) or sorted({v.node for v in res.verdicts})
    if len(names) > MAX_NODES:
        raise ValueError(f"{len(names)} nodes: a trace holds at most {MAX_NODES}; "
                         "report on fewer nodes at a time")
    periods = res.summary.get("sample_period_ns", {})
    by_key: dict = {}

    def gpu_track(node, gpu, uuid="") -> GpuTrack:
        t = by_key.get((node, gpu))
        if t is None:
            t = by_key[(node, gpu)] = GpuTrack(
                node, gpu, uuid, int(periods.get(node, {}).get(str(gpu), 0)),
                np.empty(0, np.int64), np.empty(0, np.int64))
        t.uuid = t.uuid or uuid
        return t

    for name in names:
        nd = res.nodes.get(name)
        if not nd:
            continue
        g = nd["tables"]["gpu"]
        gi = np.asarray(g["gpu"], dtype=np.int64)
        ts = np.asarray(g["ts_ns"], dtype=np.int64)
        util = np.asarray(g["util"], dtype=np.int64)
        for gpu in sorted(set(gi.tolist())):
            m = gi == gpu
            o = np.argsort(ts[m], kind="stable")
            t = gpu_track(name, gpu, nd["gpu_uuids"].get(gpu, ""))
            t.ts_ns, t.util = ts[m][o], util[m][o]
    for i, v in enumerate(res.verdicts):
        gpu_track(v.node, v.gpu, v.gpu_uuid).intervals.append(i)
    rank = {n: i for i, n in enumerate(names)}
    keys = sorted(by_key, key=lambda k: (rank.get(k[0], len(names)), k[0], k[1]))
    gpus = [by_key[k] for k in keys]
    slot = {k: i for i, k in enumerate(keys)}
    gpu_of = [slot[(v.node, v.gpu)] for v in res.verdicts]

    # stalls: every owner thread's (or only the culprits), then the culprits, linked
    stalls, index = [], {}
    threads, thread_index = [], {}
    proc_comm = {}
    for name in names:
        nd = res.nodes.get(name)
        if not nd:
            continue
        pr = nd["tables"]["proc"]
        for pid, comm in zip(np.asarray(pr["pid"]).tolist(), pr["comm"]):
            proc_comm[(name, int(pid))] = str(comm)

    def add(e: dict) -> int:
        k = _stall_key(e)
        if k in index:
            return index[k]
        tk = (e.get("node", ""), int(e["pid"]), int(e["tid"]))
        ti = thread_index.get(tk)
        if ti is None:
            ti = thread_index[tk] = len(threads)
            threads.append(ThreadTrack(tk[0], tk[1], tk[2], str(e.get("comm", "")),
                                       proc_comm.get(tk[:2], str(e.get("comm", "")))))
        index[k] = len(stalls)
        stalls.append(Stall(e, ti))
        return index[k]

    if all_stalls:
        for name in names:
            nd = res.nodes.get(name)
            if not nd:
                continue
            extra = [o for v in res.verdicts if v.node == name for o in v.owners]
            owners = np.array(sorted(_owners(nd["tables"], extra)), dtype=np.int64)
            for kind in STALL_TABLES:
                t = nd["tables"][kind]
                if not table_len(t):
                    continue
                sel = np.flatnonzero(np.isin(np.asarray(t["pid"], dtype=np.int64), owners))
                cols = list(TABLES[kind])
                values = [np.asarray(t[c])[sel].tolist() for c in cols]
                for row in zip(*values):
                    e = {"type": kind, **dict(zip(cols, row)), "node": name}
                    add(e)
    links = []
    for vi, v in enumerate(res.verdicts):
        if v.culprit is not None:
            si = add(dict(v.culprit))
            stalls[si].explains.append(vi)
            links.append((si, vi))
    for th in threads:
        th.stalls = []
    for si, s in enumerate(stalls):
        threads[s.thread].stalls.append(si)
    for th in threads:
        th.stalls.sort(key=lambda i: (stalls[i].start_ns, -stalls[i].end_ns))
    threads_order = sorted(range(len(threads)), key=lambda i: (
        rank.get(threads[i].node, len(names)), threads[i].node, threads[i].pid, threads[i].tid))
    new = {old: n for n, old in enumerate(threads_order)}
    threads = [threads[i] for i in threads_order]
    for s in stalls:
        s.thread = new[s.thread]
    return Timeline(names, gpus, threads, stalls, list(res.verdicts), links, gpu_of)


def lanes(starts: list, ends: list) -> list:
    """A lane per slice (0 first) so that slices of one lane never overlap: greedy by start
    (the input is sorted by start, longest first)."""
    lane_end: list = []
    out = []
    for s, e in zip(starts, ends):
        for li, le in enumerate(lane_end):
            if le <= s:
                lane_end[li] = e
                out.append(li)
                break
        else:
            lane_end.append(e)
            out.append(len(lane_end) - 1)
    return out


def flow_point(a0: int, a1: int, b0: int, b1: int) -> tuple:
    """Where a flow leaves slice a and enters slice b: the middle of their overlap when they
    overlap (the moment the stall starved the GPU), else each one's middle; strictly after
    each start so the viewer finds the slice already open."""
    lo, hi = max(a0, b0), min(a1, b1)
    if hi - lo >= 2:
        m = lo + (hi - lo) // 2
        return m, m
    return a0 + max((a1 - a0) // 2, min(1, a1 - a0)), b0 + max((b1 - b0) // 2, min(1, b1 - b0))


# --------------------------------------------------------------------------- trace events

def _stall_args(e: dict) -> dict:
    skip = {"ts_ns", "dur_ns", "pid", "tid", "comm", "type"}
    args = {k: v for k, v in e.items() if k not in skip and v not in ("", None)}
    args.update({"type": e["type"], "pid": int(e["pid"]), "tid": int(e["tid"]),
                 "comm": e.get("comm", ""), "latency_ms": round(int(e["dur_ns"]) / 1e6, 6),
                 "class": op_class(e["type"], e.get("op", "")), "ts_ns": int(e["ts_ns"])})
    return args


def _verdict_args(v) -> dict:
    return {"verdict": v.verdict, "class": v.klass, "text": verdict_line(v),
            "culprit": describe(v.culprit) if v.culprit else None,
            "explained_fraction": round(v.explained_fraction, 4),
            "lost_ms": round(v.lost_ns / 1e6, 3), "resolution_ms": round(v.resolution_ns / 1e6, 3),
            "idle_start_ns": v.idle_start_ns, "idle_end_ns": v.idle_end_ns,
            "open": v.open, "owners": v.owners, "job": v.job, "rank": v.rank,
            "basis": v.basis, "culprit_node": v.culprit_node,
            "chain": None if v.chain is None else v.chain.to_json()}


def trace_events(tl: Timeline) -> list:
    """The trace's events as dicts; ``ts`` and ``dur`` are int epoch ns here (see
    :func:`write`, which writes them as microseconds)."""
    node_k = {n: k for k, n in enumerate(tl.nodes)}
    ev = []
    gpu_pid = []
    for gi, g in enumerate(tl.gpus):
        pid = GPU_PID_BASE + node_k.get(g.node, 0) * 1024 + g.gpu
        gpu_pid.append(pid)
        ev.append({"ph": "M", "name": "process_name", "pid": pid, "tid": GPU_TID,
                   "args": {"name": g.label}})
        ev.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": GPU_TID,
                   "args": {"sort_index": gi}})
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": GPU_TID,
                   "args": {"name": "idle intervals"}})
        for start, u, missing in g.windows():
            ev.append({"ph": "C", "name": UTIL_COUNTER, "pid": pid, "tid": GPU_TID,
                       "ts": start, "args": {"util": u}, **({"cat": "missing"} if missing else {})})
        for vi in g.intervals:
            v = tl.verdicts[vi]
            ev.append({"ph": "X", "name": interval_name(v), "cat": "idle", "pid": pid,
                       "tid": GPU_TID, "ts": v.idle_start_ns, "dur": v.duration_ns,
                       "args": _verdict_args(v)})
    # owner threads, one lane per overlap level
    track = {}                          # stall index -> (pid, tid)
    named_procs = set()
    lane_seq = 0
    for th in tl.threads:
        shift = node_k.get(th.node, 0) * PID_LIMIT
        pid = th.pid + shift
        if pid not in named_procs:
            named_procs.add(pid)
            ev.append({"ph": "M", "name": "process_name", "pid": pid, "tid": th.tid + shift,
                       "args": {"name": f"{th.node}: {th.proc_comm} (pid {th.pid})"}})
            ev.append({"ph": "M", "name": "process_sort_index", "pid": pid,
                       "tid": th.tid + shift, "args": {"sort_index": len(tl.gpus) + len(named_procs)}})
        lanes_of = lanes([tl.stalls[i].start_ns for i in th.stalls],
                         [tl.stalls[i].end_ns for i in th.stalls])
        lane_tid = {0: th.tid + shift}
        for li in sorted(set(lanes_of)):
            if li:
                lane_tid[li] = LANE_TID_BASE + lane_seq
                lane_seq += 1
            suffix = f" [overlap lane {li}]" if li else ""
            ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane_tid[li],
                       "args": {"name": f"{th.comm} (tid {th.tid}){suffix}"}})
        for si, li in zip(th.stalls, lanes_of):
            s = tl.stalls[si]
            e = s.event
            track[si] = (pid, lane_tid[li])
            args = _stall_args(e)
            if s.explains:
                args["culprit_of"] = [interval_name(tl.verdicts[v]) + " " +
                                      f"{tl.verdicts[v].node} gpu{tl.verdicts[v].gpu}"
                                      for v in s.explains]
            ev.append({"ph": "X", "name": f"{e.get('op') or e['type']}", "cat": e["type"],
                       "pid": pid, "tid": lane_tid[li], "ts": s.start_ns,
                       "dur": s.end_ns - s.start_ns, "args": args})
    for fid, (si, vi) in enumerate(tl.links, 1):
        s, v = tl.stalls[si], tl.verdicts[vi]
        a, b = flow_point(s.start_ns, s.end_ns, v.idle_start_ns, v.idle_end_ns)
        pid, tid = track[si]
        ev.append({"ph": "s", "name": "explains", "cat": FLOW_CAT, "id": fid, "pid": pid,
                   "tid": tid, "ts": a})
        ev.append({"ph": "f", "bp": "e", "name": "explains", "cat": FLOW_CAT, "id": fid,
                   "pid": gpu_pid[tl.gpu_of[vi]], "tid": GPU_TID, "ts": b})
    return ev


def us_text(ns: int) -> str:
    """Epoch ns as the JSON number of microseconds with three decimals, exactly."""
    q, r = divmod(abs(int(ns)), 1000)
    return f"{'-' if ns < 0 else ''}{q}.{r:03d}"


def write(events: list, fp, base_ns: int = 0, other: dict | None = None, progress=None) -> int:
    """Write ``events`` (``ts``/``dur`` in ns) as a JSON Object Format trace to the text file
    ``fp``; ``ts`` is relative to ``base_ns`` (0: epoch).  ``progress(written, total)`` follows
    every 10000 events.  Returns the event count."""
    head = {"displayTimeUnit": "ms", "otherData": other or {}}
    if base_ns:
        head["baseTimeNanoseconds"] = int(base_ns)
    fp.write(json.dumps(head, separators=(",", ":"))[:-1] + ',"traceEvents":[\n')
    encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
    for i, e in enumerate(events):
        if progress and i % 10_000 == 0:
            progress(i, len(events))
        rest = {k: v for k, v in e.items() if k not in ("ts", "dur")}
        text = encode(rest)[:-1]
        if "ts" in e:
            text += ',"ts":' + us_text(int(e["ts"]) - base_ns)
        if "dur" in e:
            text += ',"dur":' + us_text(int(e["dur"]))
        fp.write(("," if i else "") + text + "}\n")
    fp.write("]}\n")
    if progress:
        progress(len(events), len(events))
    return len(events)


def export(res, path: str, base_ns: int = 0, progress=None) -> dict:
    """Write the trace of ``res`` to ``path``; returns counts (events, intervals, stalls,
    flows) for the caller to report.  ``progress`` as for :func:`write`."""
    tl = build_timeline(res, all_stalls=True)
    events = trace_events(tl)
    other = {"generator": "stallscope report --trace",
             "pids": f"node k (of {tl.nodes}) shifts pids and tids by k*{PID_LIMIT}; GPU "
                     f"tracks are {GPU_PID_BASE} + k*1024 + gpu; overlap lanes are tids from "
                     f"{LANE_TID_BASE}; args.pid/args.tid are the real ones",
             "clock_uncertainty_ns": res.summary.get("clock_uncertainty_ns", {}),
             "sample_period_ns": res.summary.get("sample_period_ns", {})}
    with open(path, "w", encoding="utf-8") as fp:
        n = write(events, fp, base_ns, other, progress)
    return {"events": n, "intervals": len(tl.verdicts), "stalls": len(tl.stalls),
            "flows": len(tl.links), "gpus": len(tl.gpus), "threads": len(tl.threads)}
