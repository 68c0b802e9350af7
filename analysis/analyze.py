"""From tracer batches to verdicts: one :class:`~stallscope.analysis.verdict.Verdict` per GPU
idle interval.

The glue between ``stallscope.wire.schema`` batches and the array code in :mod:`stallscope.analysis.blame`:
gather each node's tables, give nodes small ids, build GPU and pid keys, run the four blame
steps, and turn stall indexes back into event dicts (DESIGN.md field names) and chains.

``analyze(batches)`` does a whole store or recording at once; :class:`LiveAnalyzer` does the
same over a sliding window as batches arrive and hands back each verdict once, as soon as its
interval has ended (the collector prints them within a couple of seconds).  Both run two
stages, :func:`node_stage` per node and :func:`job_stage` per job, which the fleet report
(``analysis/fleet.py``) runs as Dask tasks: the same code, so the same verdicts.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import pickle
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stallscope.wire.schema import STALL_TABLES, TABLES, GrowingTable, complete, empty_table, table_len, take

from . import blame, crossnode
from .attribution import GpuHolders, owner_cgroup, pod_fields
from .http_episodes import episodes
from .verdict import GROUP_FIELDS, Chain, Verdict, build_chain, chain_of_groups, cpu_bound, lifecycle, net_wait

#: analysis parameters and their defaults (``analyze(batches, min_explained=0.7)``)
DEFAULTS = {
    "idle_threshold": blame.IDLE_THRESHOLD,      # util (%) below which a sample is fully idle
    "partial_threshold": blame.PARTIAL_THRESHOLD,  # ... mostly idle: joins an idle run
    "min_periods": blame.MIN_PERIODS,            # shortest interval, in sample periods ...
    "min_idle_ns": blame.MIN_IDLE_NS,            # ... and in ns (both must hold)
    "max_gap_ns": blame.MAX_GAP_NS,              # samples further apart: a hole in the data
    "owner_slack_ns": blame.OWNER_SLACK_NS,      # NVML process lists this close count as owners
    "min_explained": blame.MIN_EXPLAINED,        # below this share: "unexplained"
    "link_gap_ns": blame.LINK_GAP_NS,            # stalls this close are back to back (or one period)
    "max_contributors": blame.MAX_CONTRIBUTORS,  # contributors listed per verdict
    "remote_same_node": True,                    # other GPUs of a job on the culprit's node too
    "clock_skew_ns": 0,                          # extra per-node wall-clock error to assume
    "exit_window_ns": crossnode.DEFAULTS["exit_window_ns"],  # a peer's death explains idle this long after
}
VERDICTS = ("culprit", "remote", "unexplained")
#: stall kind codes for the alignment: one per table, scheduler rows split by op
_KIND_CODE = {k: i for i, k in enumerate(STALL_TABLES)}
_RUNQ_CODE = len(STALL_TABLES)
_BASIS = (None, "specific", "backstop")


def _params(params: dict) -> dict:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown analysis parameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update(params)
    return out


def _normalize(kind: str, table: dict) -> dict:
    """All of the kind's columns, at one length (a hand-made table may omit some)."""
    table = complete(kind, table)
    n = table_len(table)
    out = {}
    for c, k in TABLES[kind].items():
        if c in table:
            out[c] = np.asanyarray(table[c])     # a schema.Cat stays one
        elif k == "s":
            out[c] = np.full(n, "", dtype=object)
        else:
            out[c] = np.zeros(n, dtype=np.int64 if k == "i" else np.uint64)
    return out


def _py(v):
    """numpy scalar / bytes -> plain JSON-ready Python value."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v


class _Node:
    """What the analysis knows about one node: its tables (each a :class:`GrowingTable`:
    appending a batch costs its rows, not the window's), sample periods, GPU identities,
    clock uncertainty and counters."""

    def __init__(self, name: str):
        self.name = name
        self.tables: dict = {}    # kind -> GrowingTable
        self.periods = {}         # gpu index -> ns (latest nonzero the tracer reported)
        self.uuids = {}           # gpu index -> uuid
        self.unc_ns = 0           # largest clock-mapping uncertainty reported
        self.counters = {}        # key -> largest value seen (counters are cumulative)
        self.gpu_unavailable = ""
        self.unsynced = False     # wall clock not NTP/PTP-synchronized (adjtimex)
        self.batches = 0
        self.holders = GpuHolders()   # gpu index -> pods and jobs over time (tracer attribution)
        self.addrs: set = set()   # the node's addresses (meta.node.addrs): peers' flows to it
        self.net_open_since = 0     # the latest batch's meta.net.open_since_ns: 0 when none
        self._episodes: tuple | None = None    # (http table, its episodes): joined once

    def absorb(self, b) -> None:
        self.batches += 1
        for kind, t in (b.tables or {}).items():
            if kind in TABLES and table_len(t):
                self._grow(kind).append(_normalize(kind, t))
        meta = b.meta or {}
        self.addrs.update(crossnode.addrs_from_meta(meta))
        net = meta.get("net")
        # the tracer's loss episodes still open at this batch (0: none): the node's data is
        # complete only up to their start
        self.net_open_since = int(net.get("open_since_ns") or 0) if isinstance(net, dict) else 0
        g = meta.get("gpu") or {}
        self._absorb_gpu_meta(g)
        clock = meta.get("clock") or {}
        if isinstance(g, dict) and g.get("gpus"):
            self.holders.absorb(g["gpus"], self._sent(clock))
        self._absorb_clock(clock)
        self._absorb_counters(b.counters)

    def absorb_columns(self, nc) -> None:
        """A node's batches as the lake joins them (``wire.lake.NodeColumns``: tables in batch
        order, meta in runs, clocks, counter tops): the state :meth:`absorb` leaves after
        each of those batches in turn, without building them."""
        self.batches += nc.batches
        for kind, t in nc.tables.items():
            if kind in TABLES and table_len(t):
                self._grow(kind).append(_normalize(kind, t))
        if nc.clocks is None:   # the lake's flat clock columns
            sent = nc.sent_ns.tolist() if nc.sent_ns is not None else [0] * nc.batches
            clocks = []
        else:
            clocks = [c if isinstance(c, dict) else {} for c in nc.clocks]
            sent = [int(c.get("sent_ns") or 0) for c in clocks]
        k, latest = 0, -1       # the newest time holders were given at (sent_ns >= 0)
        for n, meta in nc.meta_runs:
            g = (meta or {}).get("gpu") or {}
            self._absorb_gpu_meta(g)          # n times the same value: once is the same
            self.addrs.update(crossnode.addrs_from_meta(meta or {}))
            gpus = g.get("gpus") if isinstance(g, dict) else None
            if gpus:
                ours = False    # the holders at the newest time are this run's
                for t in sent[k:k + n]:
                    if not (ours and t >= latest):    # else: the same holders again, no change
                        self.holders.absorb(gpus, t)
                    if t >= latest:
                        latest, ours = t, True
            k += n
        # what _absorb_clock leaves after every clock, in one pass
        unc = [int(c["uncertainty_ns"]) for c in clocks if c.get("uncertainty_ns")] + [nc.unc_ns]
        self.unc_ns = max(self.unc_ns, max(unc))
        if nc.unsynced or any(c.get("ntp_synced") is False for c in clocks):
            self.unsynced = True
        self._absorb_counters(nc.counters)

    def _absorb_gpu_meta(self, g) -> None:
        if isinstance(g, dict):
            for k, v in (g.get("sample_period_ns") or {}).items():
                if v:
                    self.periods[int(k)] = int(v)
            for info in g.get("gpus") or []:
                if isinstance(info, dict) and "index" in info:
                    self.uuids[int(info["index"])] = _py(info.get("uuid", ""))
            if g.get("unavailable"):
                self.gpu_unavailable = str(g["unavailable"])

    @staticmethod
    def _sent(clock) -> int:
        return int(clock.get("sent_ns") or 0) if isinstance(clock, dict) else 0

    def _absorb_clock(self, clock) -> None:
        if isinstance(clock, dict) and clock.get("uncertainty_ns"):
            self.unc_ns = max(self.unc_ns, int(clock["uncertainty_ns"]))
        if isinstance(clock, dict) and clock.get("ntp_synced") is False:
            self.unsynced = True

    def _absorb_counters(self, counters) -> None:
        for k, v in (counters or {}).items():
            if isinstance(v, (int, float, np.integer)):
                self.counters[k] = max(self.counters.get(k, 0), int(v))

    def _grow(self, kind: str) -> GrowingTable:
        g = self.tables.get(kind)
        if g is None:
            g = self.tables[kind] = GrowingTable(kind)
        return g

    def table(self, kind: str) -> dict:
        g = self.tables.get(kind)
        return g.view() if g is not None and len(g) else empty_table(kind)

    def replace(self, kind: str, table: dict) -> None:
        """The node's ``kind`` rows become ``table``'s (a trim)."""
        self._grow(kind).replace(table)

    def stall_table(self, kind: str) -> dict:
        """A table as blame sees it: HTTP requests joined into retry episodes."""
        t = self.table(kind)
        if kind != "http" or table_len(t) <= 1:
            return t
        if self._episodes is None or self._episodes[0] is not t:   # new rows or trimmed
            self._episodes = (t, episodes(t))
        return self._episodes[1]

    def proc(self) -> dict:
        """The node's proc table, one row per pid (the latest report wins)."""
        t = self.table("proc")
        n = table_len(t)
        if n > 1:
            pid = np.asarray(t["pid"], dtype=np.int64)
            o = np.lexsort((np.arange(n), pid))
            last = o[np.r_[pid[o][1:] != pid[o][:-1], True]]
            if len(last) < n:
                self.replace("proc", {c: take(v, last) for c, v in t.items()})
                t = self.table("proc")
        return t


@dataclass
class Result:
    """``verdicts``: one :class:`Verdict` per idle interval, sorted by node, gpu,
    idle_start_ns.  ``summary``: counts, sample periods, lost-event counters, nodes."""

    verdicts: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    #: what the timeline exports draw, per node: ``{"tables": {kind: table}`` (gpu, gpu_proc,
    #: proc and the stall tables), ``"gpu_uuids": {index: uuid}}``; filled by analyze() only
    nodes: dict = field(default_factory=dict)


#: the steps of analyze(), in order, as its ``on_phase`` callback names them
PHASES = ("gather", "idle intervals", "owners", "blame", "jobs", "verdicts")


def _collect(batches) -> dict:
    nodes = {}
    for b in sorted(batches, key=lambda b: (b.node, b.seq)):
        nodes.setdefault(b.node, _Node(b.node)).absorb(b)
    return nodes


def analyze(batches, on_phase=None, **params) -> Result:
    """Verdicts for every GPU idle interval in ``batches`` (any nodes, any order).

    Parameters are the keys of :data:`DEFAULTS`; an unknown one raises TypeError.
    ``on_phase(name)`` is called as each of :data:`PHASES` begins (a progress display).
    """
    p = _params(params)
    if on_phase:
        on_phase(PHASES[0])
    nodes = _collect(batches)
    res = _analyze_nodes(nodes, p, on_phase=on_phase)
    res.nodes = {n: export_tables(nd) for n, nd in nodes.items()}
    return res


class _Stalls:
    """Every stall of every node as arrays, plus the way back to its row."""

    def __init__(self, names, nodes):
        self.segments = []   # (first index, node name, kind, table)
        starts, durs, keys, codes = [], [], [], []
        n = 0
        for nid, name in enumerate(names):
            for kind in STALL_TABLES:
                t = nodes[name].stall_table(kind)
                m = table_len(t)
                if not m:
                    continue
                self.segments.append((n, name, kind, t))
                starts.append(np.asarray(t["ts_ns"], dtype=np.int64))
                durs.append(np.asarray(t["dur_ns"], dtype=np.int64))
                keys.append(blame.pid_key(nid, np.asarray(t["pid"], dtype=np.int64)))
                code = np.full(m, _KIND_CODE[kind], dtype=np.int64)
                if kind == "sched":
                    code[np.asarray(t["op"], dtype=object) == "runq"] = _RUNQ_CODE
                codes.append(code)
                n += m
        self.n = n
        cat = (lambda xs: np.concatenate(xs) if xs else np.empty(0, np.int64))
        self.start, self.dur, self.key, self.code = cat(starts), cat(durs), cat(keys), cat(codes)
        self.backstop = self.code >= _KIND_CODE["sched"]
        self._firsts = [s[0] for s in self.segments]
        self._seen = {}

    def counts(self) -> dict:
        c = collections.Counter()
        for _f, _name, kind, t in self.segments:
            c[kind] += table_len(t)
        return dict(c)

    def event(self, i: int, overlap_ns=None) -> dict:
        """Stall ``i`` as a DESIGN.md event dict (type, ts_ns, dur_ns, pid, tid, comm, node,
        type fields), plus ``overlap_ns`` with the interval when given."""
        d = self._seen.get(i)
        if d is None:                # a culprit is also a link of its chain: built once
            f, name, kind, t = self.segments[bisect_right(self._firsts, i) - 1]
            r = i - f
            d = {"type": kind}
            for c in TABLES[kind]:
                d[c] = _py(t[c][r])
            d["node"] = name
            self._seen[i] = d
        d = dict(d)
        if overlap_ns is not None:
            d["overlap_ns"] = int(overlap_ns)
        return d

    def chain(self, idx, covered_ns: int) -> Chain:
        """The chain of stalls ``idx`` (one pid, one type, by start): ``build_chain`` of
        their event dicts, summed per distinct row (``GROUP_FIELDS``) with numpy, so a storm
        of thousands of alike reads costs a few small dicts (the fields grouped by), not an
        event dict per read."""
        idx = np.asarray(idx, dtype=np.int64)
        first = self.event(int(idx[0]))
        fields = GROUP_FIELDS.get(first["type"])
        if fields is None or len(idx) < 16:
            return build_chain([self.event(int(j)) for j in idx], covered_ns)
        seg = np.searchsorted(np.asarray(self._firsts, dtype=np.int64), idx, side="right") - 1
        groups = []     # (first position, event, count, blocked, end) per distinct row
        for sg in np.unique(seg).tolist():
            pos = np.flatnonzero(seg == sg)
            f, _name, kind, t = self.segments[sg]
            rows = idx[pos] - f
            code, span = np.zeros(len(rows), dtype=np.int64), 1
            for c in fields:
                if c in t:
                    v, m = _row_codes(t[c], rows)
                    if span * m >= 1 << 62:         # renumber before the product overflows
                        code = np.unique(code, return_inverse=True)[1].reshape(-1)
                        span = int(code.max()) + 1
                    code, span = code * m + v, span * m
            col = (lambda c: np.asarray(t[c])[rows].astype(np.int64))    # rows first: no whole-column copy
            dur = col("dur_ns")
            cnt = np.maximum(col("count"), 1) if "count" in t else np.ones(len(rows), dtype=np.int64)
            blk = col("blocked_ns") if "blocked_ns" in t else dur
            blk = np.where(blk != 0, blk, dur)
            end = col("ts_ns") + dur
            order = np.argsort(code, kind="stable")
            starts = np.flatnonzero(np.r_[True, code[order][1:] != code[order][:-1]])
            firsts = pos[order][starts]         # each group's first position (stable sort)
            nf = col("more_files") if "more_files" in t else np.zeros(len(rows), dtype=np.int64)
            sums = [np.add.reduceat(x[order], starts) for x in (cnt, blk, nf)]
            ends = np.maximum.reduceat(end[order], starts)
            for k, p0 in enumerate(firsts.tolist()):
                r = int(idx[p0]) - f
                e = {"type": kind, **{c: _py(t[c][r]) for c in fields if c in t},
                     "more_files": int(sums[2][k])}
                groups.append((p0, e, int(sums[0][k]), int(sums[1][k]), int(ends[k])))
        # two groups alike in value (equal text under two codes) sum alike in chain_of_groups
        groups.sort(key=lambda g: g[0])
        return chain_of_groups(first, [g[1:] for g in groups], len(idx), covered_ns)


def _row_codes(col, rows: np.ndarray) -> tuple:
    """(codes, m): integers in [0, m) equal where column ``col``'s values at ``rows`` are
    equal: a categorical column's codes, text numbered by a dict (hashing, not sorting
    strings), numbers by their rank."""
    codes = getattr(col, "codes", None)
    if codes is not None:
        return np.asarray(codes)[rows].astype(np.int64), max(len(col.cats), 1)
    a = np.asarray(col)[rows]
    if a.dtype == object:
        seen: dict = {}
        v = np.fromiter((seen.setdefault(x, len(seen)) for x in a.tolist()), dtype=np.int64, count=len(a))
        return v, max(len(seen), 1)
    u, inv = np.unique(a, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), max(len(u), 1)

def _job_of(roots, info) -> tuple:
    """(job, rank) of a GPU from the processes NVML listed: the most common job among them,
    and the lowest rank among the processes of that job (-1 when unknown)."""
    jobs = collections.Counter(info[r][1] for r in roots if r in info and info[r][1])
    if not jobs:
        return "", -1
    job = sorted(jobs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    ranks = [info[r][2] for r in roots if r in info and info[r][1] == job and info[r][2] >= 0]
    return job, (min(ranks) if ranks else -1)


# --------------------------------------------------------------------------- the two stages
#
# analyze(), LiveAnalyzer and the fleet report (analysis/fleet.py) run the same two stages:
# node_stage() does everything one node's data decides (idle intervals, owners, local blame,
# each interval's job and rank, its verdict as the node sees it) and keeps only a small,
# picklable NodePart; job_stage() takes every node's JobFacts for one job and decides what
# crosses nodes (today: a local culprit chain of one rank is the remote culprit of another
# rank's unexplained interval); each node's part takes the findings for it, and assemble()
# builds the verdicts asked for and sums up.

class Source:
    """A local culprit chain as the job stage carries it to other ranks: the culprit stall
    (``culprit`` event dict, ``start_ns``/``end_ns``), the chain's stalls' times
    (``link_start``/``link_end``, by start) and its summary (:meth:`chain`).  Both are made
    from the node's stalls when first asked for; ``freeze()`` (or pickling) makes them and
    drops the stalls."""

    def __init__(self, st: _Stalls, stall: int, chain: np.ndarray, basis):
        self.start_ns = int(st.start[stall])
        self.end_ns = self.start_ns + int(st.dur[stall])
        self.link_start = st.start[chain]
        self.link_end = self.link_start + st.dur[chain]
        self.basis = basis
        self._st: _Stalls | None = st
        self._stall, self._chain = stall, chain
        self._culprit: dict | None = None
        self._summary: Chain | None = None

    @property
    def culprit(self) -> dict:
        if self._culprit is None:
            assert self._st is not None
            self._culprit = self._st.event(self._stall)
        return self._culprit

    def chain(self, covered_ns: int) -> Chain:
        """The chain as a verdict elsewhere shows it, covering ``covered_ns`` of that interval."""
        if self._summary is None:
            assert self._st is not None
            self._summary = self._st.chain(self._chain, 0)
        return dataclasses.replace(self._summary, covered_ns=int(covered_ns))

    def freeze(self) -> None:
        if self._st is not None:
            self._culprit = self.culprit
            self.chain(0)
            self._st = self._chain = None

    def __getstate__(self):
        self.freeze()
        return self.__dict__


@dataclass
class JobFacts:
    """One node's share of one job, all that :func:`job_stage` reads: the node's intervals of
    the job (``idx``: their positions in its :class:`NodePart`) and their local culprit
    chains (``sources``, by position).  Small and picklable."""

    node: str
    unc_ns: int                 # the node's clock uncertainty, plus clock_skew_ns
    idx: np.ndarray
    gpu: np.ndarray
    start: np.ndarray
    end: np.ndarray
    res: np.ndarray
    lost: np.ndarray
    rank: np.ndarray
    culprit: np.ndarray         # bool: a local culprit
    best_start: np.ndarray      # the local top chain's span
    best_end: np.ndarray
    sources: collections.abc.Mapping
    extra: dict = field(default_factory=dict)   # the node's facts for other cross-node causes


@dataclass
class NodePart:
    """What :func:`node_stage` keeps of one node: per interval (by gpu, start) its span, job,
    rank, local culprit and verdict kind, the local culprit chains of intervals of a job, and
    the node's counts for the summary.

    ``take(findings)`` folds in the job stages' findings; ``build(mask)`` makes the verdicts
    of the masked intervals (they need the node's tables), findings applied, in either
    order; ``release()`` drops the tables, after which the part pickles small; ``pack()``
    keeps the verdicts as one pickled blob while the part waits (on a Dask worker)."""

    name: str
    gpu: np.ndarray
    start: np.ndarray
    end: np.ndarray
    res: np.ndarray
    open: np.ndarray
    lost: np.ndarray
    job: np.ndarray             # object: job name, "" for none
    rank: np.ndarray
    culprit: np.ndarray         # bool
    best_start: np.ndarray
    best_end: np.ndarray
    unc_ns: int
    has_source: np.ndarray      # bool: a local culprit and a job (a Source for the job stage)
    counts: dict                # the node's share of the summary
    kind: np.ndarray            # index in VERDICTS: culprit, remote, unexplained
    verdicts: list = field(default_factory=list)   # per interval: Verdict, or None (not built)
    findings: dict = field(default_factory=dict)   # interval -> finding, for verdicts not built
    extra: dict = field(default_factory=dict)      # node facts for other cross-node causes
    tables: dict = field(default_factory=dict)     # for the exports, when asked
    sources: dict = field(default_factory=dict)    # interval -> Source, made on demand
    packed: bytes = b""                            # the verdicts, pickled (pack())
    _make: Callable[[int], Verdict] | None = field(default=None, repr=False, compare=False)
    _source: Callable[[int], Source] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.start)

    def __sizeof__(self) -> int:
        """Bytes held, roughly: Dask sizes task results by this (which worker runs a node's
        next task, how near a worker is to its memory limit).  Arrays, ~4 KiB per verdict,
        source or finding (unpickled verdicts measured 3.9-4.6 KiB), the export tables."""
        arrays = sum(a.nbytes for a in (self.gpu, self.start, self.end, self.res, self.open,
                                         self.lost, self.job, self.rank, self.culprit,
                                         self.best_start, self.best_end, self.has_source, self.kind))
        objects = sum(v is not None for v in self.verdicts) + len(self.sources) + len(self.findings)
        tables = sum(c.nbytes * (8 if c.dtype == object else 1)
                     for t in (self.tables.get("tables") or {}).values() for c in t.values())
        return object.__sizeof__(self) + arrays + 4096 * objects + tables + len(self.packed)

    def pack(self) -> None:
        """The verdicts as one pickled blob: several times smaller than the objects, nothing
        for the garbage collector to scan, cheap to move or spill.  ``unpack()`` undoes it."""
        if not self.packed:
            self.packed = pickle.dumps(self.verdicts, protocol=pickle.HIGHEST_PROTOCOL)
            self.verdicts = []

    def unpack(self) -> None:
        if self.packed:
            self.verdicts, self.packed = pickle.loads(self.packed), b""

    def build(self, mask=None) -> None:
        """The node's verdicts for the intervals in ``mask`` (all when None)."""
        self.unpack()
        todo = range(len(self)) if mask is None else np.flatnonzero(mask).tolist()
        for i in todo:
            if self.verdicts[i] is None:
                if self._make is None:
                    raise RuntimeError(f"node {self.name}: verdicts asked after release()")
                v = self._make(i)
                f = self.findings.pop(i, None)
                self.verdicts[i] = v if f is None else f.apply(v)

    def take(self, findings: dict) -> None:
        """A job stage's findings for this node (interval -> finding): applied to the
        verdicts built, kept for the others."""
        self.unpack()
        for i, f in findings.items():
            self.kind[i] = VERDICTS.index(f.verdict)
            if self.verdicts[i] is not None:
                self.verdicts[i] = f.apply(self.verdicts[i])
            else:
                self.findings[i] = f

    def source(self, i: int) -> Source:
        """The local culprit chain of interval i (which ``has_source``)."""
        src = self.sources.get(i)
        if src is None:
            if self._source is None:
                raise RuntimeError(f"node {self.name}: a source asked after release()")
            src = self.sources[i] = self._source(i)
        return src

    def release(self) -> None:
        """Make every source, then forget the node's tables (the builders keep them)."""
        for i in np.flatnonzero(self.has_source).tolist():
            self.source(i).freeze()
        self._make = self._source = None

    def jobs(self) -> list:
        """The jobs this node takes part in: of its intervals, and of the ranks, exits and
        loss episodes it saw (a node whose GPUs stayed busy still counts for a job's cost,
        and the node of a rank that died for the others' waits)."""
        jobs = set(self.job.tolist())
        for k in ("members", "exits", "losses"):
            jobs.update(x.job for x in self.extra.get(k, ()))
        jobs.update(self.extra.get("jobs", ()))     # a part of some intervals: the node's own
        return sorted(jobs - {""})

    def job_facts(self) -> dict:
        """job -> this node's :class:`JobFacts` for it."""
        out = {}
        for job in self.jobs():
            idx = np.flatnonzero(self.job == job)
            out[job] = JobFacts(
                self.name, self.unc_ns, idx, self.gpu[idx], self.start[idx], self.end[idx],
                self.res[idx], self.lost[idx], self.rank[idx], self.culprit[idx],
                self.best_start[idx], self.best_end[idx], _Sources(self, idx), self.extra)
        return out


class _Sources(collections.abc.Mapping):
    """``JobFacts.sources``: position in ``idx`` -> the part's :class:`Source`, made when
    first asked for; pickles as a plain dict of them all."""

    def __init__(self, part: NodePart, idx: np.ndarray):
        self._part, self._idx = part, idx
        self._pos = np.flatnonzero(part.has_source[idx]).tolist()

    def __getitem__(self, k):
        i = int(self._idx[k])
        if not self._part.has_source[i]:
            raise KeyError(k)
        return self._part.source(i)

    def __iter__(self):
        return iter(self._pos)

    def __len__(self) -> int:
        return len(self._pos)

    def __reduce__(self):
        return dict, (dict(self.items()),)


def export_tables(nd: _Node, kinds=None) -> dict:
    """What the timeline exports draw of a node (``Result.nodes``): the ``kinds`` tables (gpu,
    gpu_proc, proc and the stall tables when None) and its GPU uuids."""
    kinds = ("gpu", "gpu_proc", "proc", *STALL_TABLES) if kinds is None else kinds
    return {"tables": {k: (nd.proc() if k == "proc" else nd.stall_table(k)) for k in kinds},
            "gpu_uuids": dict(nd.uuids)}


@dataclass
class _Base:
    """What a node's samples, process lists and lineage decide before any stall is looked
    at: its idle intervals, their owner groups, and each interval's job and rank."""

    idle: blame.Idle
    gpus: np.ndarray            # GPU index per interval
    own: blame.Owners
    gpu_proc: dict
    proc: dict
    info: dict                  # pid -> (comm, job, rank, pod_uid, container_id)
    job: np.ndarray             # object: per interval, "" for none
    rank: np.ndarray
    samples: int


def _node_base(nd: _Node, p: dict, phase) -> _Base:
    """Idle intervals, owners, jobs and ranks of one node (the node stage's first steps)."""
    # samples -> idle intervals (GPU keys of node id 0: one node at a time)
    phase(PHASES[1])
    g = nd.table("gpu")
    ts = np.asarray(g["ts_ns"], dtype=np.int64)
    periods = {int(blame.gpu_key(0, gpu)): per for gpu, per in nd.periods.items()}
    idle = blame.find_idle(blame.gpu_key(0, np.asarray(g["gpu"], dtype=np.int64)), ts,
                           np.asarray(g["util"], dtype=np.int64),
                           np.asarray(g["synth"], dtype=np.int64), periods,
                           threshold=p["idle_threshold"], partial_threshold=p["partial_threshold"],
                           min_periods=p["min_periods"], min_ns=p["min_idle_ns"],
                           max_gap_ns=p["max_gap_ns"])
    gpus = blame.key_low(idle.key)

    # owners: NVML process lists + lineage
    phase(PHASES[2])
    t = nd.table("gpu_proc")
    pr = nd.proc()
    info = {int(a): (_py(c), _py(j) or "", int(r), _py(pu) or "", _py(ci) or "")
            for a, c, j, r, pu, ci in zip(pr["pid"], pr["comm"], pr["job"], pr["rank"],
                                          pr["pod_uid"], pr["container_id"])}
    own = blame.owner_groups(idle.key, idle.start, idle.end,
                             blame.gpu_key(0, np.asarray(t["gpu"], dtype=np.int64)),
                             np.asarray(t["ts_ns"], dtype=np.int64), np.asarray(t["pid"], dtype=np.int64),
                             np.zeros(table_len(pr), dtype=np.int64), np.asarray(pr["pid"], dtype=np.int64),
                             np.asarray(pr["ppid"], dtype=np.int64), slack_ns=p["owner_slack_ns"])

    # job and rank of each interval: the owners' (environment or cgroup), else the job the
    # GPU's Slurm job mapping names
    g_job = [_job_of([int(r) for r in roots], info) for roots in own.roots]
    jobs = [g_job[gi][0] if gi >= 0 else "" for gi in own.group.tolist()]
    if nd.holders.hist:
        jobs = [j or nd.holders.job(int(gpu), int(s)) for j, gpu, s in zip(jobs, gpus, idle.start)]
    rank = np.array([g_job[gi][1] if gi >= 0 else -1 for gi in own.group.tolist()], dtype=np.int64)
    return _Base(idle, gpus, own, t, pr, info, np.array(jobs, dtype=object), rank, int(len(ts)))


def _take_idle(idle: blame.Idle, idx: np.ndarray) -> blame.Idle:
    """The intervals ``idx`` of ``idle`` (same periods)."""
    return blame.Idle(idle.key[idx], idle.start[idx], idle.end[idx], idle.res[idx], idle.open[idx],
                      idle.open_start[idx], idle.n_idle[idx], idle.n_synth[idx], idle.lost[idx],
                      idle.periods)


def node_stage(name: str, nd: _Node, p: dict, phase=None) -> NodePart:
    """Everything one node's data decides, as a :class:`NodePart` (verdicts not built yet).
    ``phase(name)`` is called as each of the idle/owners/blame steps begins."""
    phase = phase or (lambda _name: None)
    return _node_part(name, nd, _node_base(nd, p, phase), p, phase)


def _node_part(name: str, nd: _Node, base: _Base, p: dict, phase, keep=None, stalls=None,
               extra=None) -> NodePart:
    """The node stage's blame steps on ``base``: all of its intervals, or only those in the
    bool mask ``keep`` (the live analyzer's unsettled ones), with the stall tables of
    ``stalls`` (an object with ``stall_table(kind)``; default ``nd``) and the cross-node
    facts ``extra`` (default: from ``nd``'s tables)."""
    idle, own, info = base.idle, base.own, base.info
    group, job, rank, gpus = own.group, base.job, base.rank, base.gpus
    if keep is not None:
        idx = np.flatnonzero(keep)
        idle = _take_idle(idle, idx)
        group, job, rank, gpus = group[idx], job[idx], rank[idx], gpus[idx]
    n = len(idle)

    # stalls -> local verdicts
    phase(PHASES[3])
    st = _Stalls([name], {name: nd if stalls is None else stalls})
    al = blame.align(idle.start, idle.end, idle.res, group, st.start, st.dur, st.key,
                     own.pair_key, own.pair_group, min_explained=p["min_explained"],
                     max_contributors=p["max_contributors"], iv_lost=idle.lost,
                     st_kind=st.code, st_backstop=st.backstop, link_gap_ns=p["link_gap_ns"])
    culprit = al.culprit >= 0

    def source(i: int) -> Source:
        return Source(st, int(al.culprit[i]), al.chain_stall[al.chain_ptr[i]:al.chain_ptr[i + 1]],
                      _BASIS[int(al.basis[i])])

    def comm_of(pid: int) -> str:
        return (info.get(pid) or ("?",))[0]

    def make(i: int) -> Verdict:
        """Interval i's verdict as this node sees it: culprit or unexplained."""
        gpu = int(gpus[i])
        s, e = int(idle.start[i]), int(idle.end[i])
        gi = int(group[i])
        who = pod_fields(nd.holders.at(gpu, s)[0])
        who.update(owner_cgroup([int(x) for x in own.roots[gi]], info) if gi >= 0 else {})
        a, b = al.contrib_ptr[i], al.contrib_ptr[i + 1]
        contributors = [st.event(int(x), ov) for x, ov in
                        zip(al.contrib_stall[a:b], al.contrib_overlap[a:b])]
        local_x = float(al.explained[i])
        culprit_ev, culprit_node, chain, basis = None, None, None, None
        if al.culprit[i] >= 0:
            culprit_ev, culprit_node = st.event(int(al.culprit[i]), al.best_overlap[i]), name
            chain = st.chain(al.chain_stall[al.chain_ptr[i]:al.chain_ptr[i + 1]], int(al.best_cover[i]))
            basis = _BASIS[int(al.basis[i])]
        klass, process = (None, None) if chain is None else (chain.klass, None)
        if chain is None and gi >= 0:
            life = lifecycle(base.proc, own.roots[gi], own.members[gi], s, e, int(idle.res[i]), bool(idle.open[i]))
            if life is not None and life[0] != "workers_start":
                klass, process = life
            else:
                # children starting in it (workers_start) is a hint: one of the GPU's processes
                # waiting on the network through it (the curl a worker just started for a
                # shard) says more; one computing (a worker's own start-up) says less
                got = cpu_bound(nd.table("cpu"), own.members[gi], s, e, comm_of) if life is None else None
                klass, process = got or net_wait(nd.table("wait"), nd.table("cpu"), own.members[gi], s, e,
                                                 comm_of) or life or (None, None)
        return Verdict(
            node=name, gpu=gpu, gpu_uuid=nd.uuids.get(gpu, ""),
            idle_start_ns=s, idle_end_ns=e, resolution_ns=int(idle.res[i]),
            open=bool(idle.open[i]), open_start=bool(idle.open_start[i]),
            synth_samples=int(idle.n_synth[i]),
            verdict="culprit" if culprit_ev is not None else "unexplained",
            culprit=culprit_ev, remote=False, culprit_node=culprit_node, clock_uncertainty_ns=0,
            explained_fraction=local_x, local_explained_fraction=local_x,
            contributors=contributors,
            owners=[int(x) for x in own.members[gi]] if gi >= 0 else [],
            gpu_pids=[int(x) for x in own.roots[gi]] if gi >= 0 else [],
            job=str(job[i]), rank=int(rank[i]), klass=klass, process=process,
            chain=chain, basis=basis, lost_ns=int(idle.lost[i]), **who)

    counts = {
        "gpus": len(idle.periods),
        "samples": base.samples,
        "idle_ns": int(np.sum(idle.end - idle.start)) if n else 0,
        "lost_ns": int(np.sum(idle.lost)) if n else 0,
        "stalls": st.counts(),
        "sample_period_ns": {str(int(blame.key_low(k))): per for k, per in idle.periods.items()},
        "clock_uncertainty_ns": nd.unc_ns,
        "lost": {k: v for k, v in nd.counters.items() if "lost" in k or "dropped" in k},
        "clock_unsynced": nd.unsynced,
        "gpu_unavailable": nd.gpu_unavailable,
    }
    if extra is None:
        extra = crossnode.node_extra({"net": nd.table("net"), "proc": base.proc,
                                      "gpu_proc": base.gpu_proc}, nd.addrs)
    return NodePart(name, gpus, idle.start, idle.end, idle.res, idle.open, idle.lost, job, rank,
                    culprit, al.best_start, al.best_end, nd.unc_ns + int(p["clock_skew_ns"]),
                    culprit & (job != ""), counts, np.where(culprit, 0, 2), [None] * n,
                    extra=extra, _make=make, _source=source)


def job_stage(job: str, facts: list, p: dict) -> dict:
    """What crosses nodes within one job, from every node's :class:`JobFacts` for it (any
    order): ``{node: {interval: finding}}``, a finding per interval whose node-level verdict
    changes (``analysis/crossnode.py``): an interval without a local culprit takes a remote
    cause (a peer rank's death, a peer's TCP flow to this node retransmitting, a peer's local
    culprit chain), and a local culprit gets its cost to the rest of the job."""
    facts = sorted(facts, key=lambda f: f.node)     # node order = analyze()'s node ids
    out: dict = {f.node: {} for f in facts}
    if not facts:
        return out
    res = crossnode.analyze_job([crossnode.node_facts(f, job, p) for f in facts], p)
    idx = {f.node: f.idx for f in facts}
    for (node, k), cause in res.causes.items():
        out[node][int(idx[node][k])] = cause
    for (node, k), cost in res.costs.items():
        out[node][int(idx[node][k])] = crossnode.CostFinding(cost)
    return out


def jobs_of(parts) -> dict:
    """job -> [JobFacts], from every node's part (in-process: the fleet does this on Dask)."""
    by_job = collections.defaultdict(list)
    for part in parts:
        for job, f in part.job_facts().items():
            by_job[job].append(f)
    return by_job


def assemble(parts, p: dict, select=None) -> Result:
    """The verdicts (sorted by node, gpu, idle_start_ns) and the summary from every node's
    part, the job stages' findings taken.  ``select(cols) -> bool mask`` (cols: per-interval
    arrays node, gpu, idle_end_ns, resolution_ns, open, verdict, job) limits which verdicts
    get built; the summary counts every interval."""
    parts = sorted(parts, key=lambda x: x.name)
    kind = np.concatenate([x.kind for x in parts]) if parts else np.empty(0, np.int64)
    if select is not None:
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt))
        mask = np.asarray(select({
            "node": cat([np.full(len(x), x.name, dtype=object) for x in parts], object),
            "gpu": cat([x.gpu for x in parts], np.int64),
            "idle_end_ns": cat([x.end for x in parts], np.int64),
            "resolution_ns": cat([x.res for x in parts], np.int64),
            "open": cat([x.open for x in parts], bool),
            "verdict": np.array(VERDICTS, dtype=object)[kind],
            "job": cat([x.job for x in parts], object)}), dtype=bool)
    else:
        mask = np.ones(len(kind), dtype=bool)

    verdicts, lo = [], 0
    for part in parts:
        m = mask[lo:lo + len(part)]
        lo += len(part)
        part.build(m)
        verdicts.extend(part.verdicts[i] for i in np.flatnonzero(m).tolist())

    lost = collections.Counter()
    stalls = collections.Counter()
    for part in parts:
        lost.update(part.counts["lost"])
        stalls.update(part.counts["stalls"])
    names = [x.name for x in parts]
    c = [x.counts for x in parts]
    summary = {
        "nodes": names,
        "gpus": sum(x["gpus"] for x in c),
        "samples": sum(x["samples"] for x in c),
        "intervals": int(len(kind)),
        "verdicts": {v: int(np.sum(kind == k)) for k, v in enumerate(VERDICTS)},
        "idle_ns": sum(x["idle_ns"] for x in c),
        "lost_ns": sum(x["lost_ns"] for x in c),
        "stalls": dict(stalls),
        "sample_period_ns": {n: x["sample_period_ns"] for n, x in zip(names, c) if x["sample_period_ns"]},
        "clock_uncertainty_ns": {n: x["clock_uncertainty_ns"] for n, x in zip(names, c)},
        "lost": dict(lost),
        "lost_total": int(sum(lost.values())),
        "clock_unsynced": [n for n, x in zip(names, c) if x["clock_unsynced"]],
        "gpu_unavailable": {n: x["gpu_unavailable"] for n, x in zip(names, c) if x["gpu_unavailable"]},
        "params": dict(p),
    }
    return Result(verdicts, summary)


def _once(on_phase):
    """``on_phase``, called once per phase name (the node stage runs once per node)."""
    seen = set()

    def phase(name):
        if on_phase and name not in seen:
            seen.add(name)
            on_phase(name)
    return phase


def _analyze_nodes(nodes: dict, p: dict, select=None, on_phase=None) -> Result:
    """Verdicts for the nodes' data: :func:`node_stage` per node, :func:`job_stage` per job,
    :func:`assemble` (``select``: see there)."""
    phase = _once(on_phase)
    parts = {name: node_stage(name, nodes[name], p, phase) for name in sorted(nodes)}
    phase(PHASES[4])
    for job, facts in sorted(jobs_of(parts.values()).items()):
        for node, found in job_stage(job, facts, p).items():
            parts[node].take(found)
    phase(PHASES[5])
    return assemble(parts.values(), p, select)


# --------------------------------------------------------------------------- live

class LiveAnalyzer:
    """Verdicts as batches stream in, each reported once, memory bounded by a time window.

    ``add(batches)`` keeps the last ``window_ns`` of every node's data (newest sample across
    nodes as "now"; NVML stamps, not this host's clock, so a replay behaves like a live run;
    cut when the cut would move by a 16th of the window, so up to 1 1/16 windows are kept),
    re-analyzes it and returns the verdicts that became final: the interval has closed (or was
    cut by a hole in the samples) and its GPU has a sample at least one period past its end.  An unexplained interval of a job also
    waits until every node running that job has data that far (a remote culprit may still
    arrive), but no longer than ``wait_ns`` past its end.  ``min_gap_s`` rate-limits the
    re-analysis (wall clock); ``flush()`` returns whatever is left, open intervals included.
    An interval is identified by (node, gpu, idle_end_ns), which trimming cannot change.
    Under load the runs space out so that they take at most ``max_share`` of the caller's
    time (the next waits ``last run's cost / max_share``): ingest keeps up, verdicts come
    later.

    Each run finds the window's idle intervals, owners and jobs (vectorized, cheap), then
    blames only the intervals near those it could report now (:meth:`_unsettled`): the stall
    alignment and the job stage, the costly part, scale with the unsettled data, not the
    window, and give the same verdicts as blaming the whole window (``incremental=False``,
    kept as the reference the tests compare with).
    """

    def __init__(self, window_ns: int = 600_000_000_000, wait_ns: int = 2_000_000_000,
                 min_gap_s: float = 0.5, clock=time.monotonic, incremental: bool = True,
                 max_share: float = 1 / 3, **params):
        self.params = _params(params)
        self.incremental = incremental
        self.window_ns = int(window_ns)
        self.wait_ns = int(wait_ns)
        self.min_gap_s = min_gap_s
        self.max_share = max_share
        self._last_cost = 0.0
        self.clock = clock
        self.nodes = {}
        self.reported = set()
        self._last_run = None
        self._dirty = False
        # where the window was last cut: it is cut again once the cut would move by a 16th of
        # the window, so data is kept 1 to 1 1/16 windows and a cut (which copies what is
        # kept) happens every window/16 of data time, not on every run
        self._trimmed_at = -(1 << 62)

    def add(self, batches) -> list:
        for b in batches:
            self.nodes.setdefault(b.node, _Node(b.node)).absorb(b)
            self._dirty = True
        now = self.clock()
        gap = max(self.min_gap_s, self._last_cost / self.max_share) if self.min_gap_s else 0
        if not self._dirty or (self._last_run is not None and gap and now - self._last_run < gap):
            return []
        self._last_run = now
        self._dirty = False
        out = self._run(final=False)
        self._last_cost = self.clock() - now
        return out

    def flush(self) -> list:
        """Every verdict not reported yet, open intervals included."""
        return self._run(final=True)

    def _watermarks(self):
        """(node -> newest sample ts, (node, gpu) -> newest sample ts)."""
        per_node, per_gpu = {}, {}
        for name, nd in self.nodes.items():
            g = nd.table("gpu")
            if not table_len(g):
                continue
            gts = np.asarray(g["ts_ns"], dtype=np.int64)
            gid = np.asarray(g["gpu"], dtype=np.int64)
            for x in np.unique(gid):
                per_gpu[(name, int(x))] = int(gts[gid == x].max())
            per_node[name] = int(gts.max())
            if nd.net_open_since:   # a loss episode still open there: its row is still to come
                per_node[name] = min(per_node[name], nd.net_open_since - 1)
        return per_node, per_gpu

    def _run(self, final: bool) -> list:
        node_wm, gpu_wm = self._watermarks()
        if not node_wm:
            return []
        cutoff = max(node_wm.values()) - self.window_ns
        if cutoff - self._trimmed_at >= self.window_ns // 16:
            self._trim(cutoff)
            self._trimmed_at = cutoff
        job_nodes = collections.defaultdict(set)
        for name, nd in self.nodes.items():
            for j in set(_py(x) for x in nd.proc()["job"]):
                if j:
                    job_nodes[j].add(name)

        def ready(c):
            mask = np.zeros(len(c["node"]), dtype=bool)
            for i in range(len(mask)):
                node, gpu, end = c["node"][i], int(c["gpu"][i]), int(c["idle_end_ns"][i])
                if (node, gpu, end) in self.reported:
                    continue
                if not final:
                    own_wm = gpu_wm.get((node, gpu), 0)
                    if c["open"][i] and own_wm <= end:
                        continue    # still idle at the newest sample: may grow
                    due = end + int(c["resolution_ns"][i])
                    if own_wm < due:
                        continue
                    job = c["job"][i]
                    if c["verdict"][i] == "unexplained" and job:
                        behind = [n for n in job_nodes[job] if node_wm.get(n, 0) < due]
                        if behind and own_wm < end + self.wait_ns:
                            continue    # a remote culprit may still arrive
                mask[i] = True
            return mask

        if self.incremental:
            out = self._unsettled(gpu_wm, final, ready).verdicts
        else:
            out = _analyze_nodes(self.nodes, self.params, select=ready).verdicts
        self.reported.update((v.node, v.gpu, v.idle_end_ns) for v in out)
        return out

    def _unsettled(self, gpu_wm: dict, final: bool, select) -> Result:
        """What ``_analyze_nodes(self.nodes, params, select)`` returns, blaming only the
        intervals that can matter this run.

        Every node's idle intervals, owner groups, jobs and ranks come from the whole window,
        as before: owner groups merge the GPU pids of all intervals with the same owners
        (``owner_groups``), which sets gpu_pids, job and rank, and a node takes part in a job
        stage for any interval, loss episode, exit or GPU listing of that job in the window.
        ``select`` can pick only an interval that is not reported and, unless ``final``, has
        closed and is one period old; the earliest start ``s`` of those bounds what its
        verdict reads: a remote source, an idle peer GPU for the job cost or a peer's TCP
        loss episode must end after ``s - 2u`` (``u``: the largest clock uncertainty plus
        skew, the most two nodes' times are compared within); a local culprit is a stall
        overlapping the interval.  So each node keeps its intervals ending at or after
        ``s - 2u - 1``, the stalls ending at or after the earliest start of those with owners
        (HTTP retries joined over the whole window first), the net rows ending at or after
        the same cut, and its exits and GPU listings (job members) from the whole window.  The
        alignment and the job stage only compare the kept intervals with each other and with
        these rows, in the same relative order (ties break alike), so the selected verdicts
        are the whole-window ones."""
        p = self.params
        quiet = (lambda _name: None)
        names = sorted(self.nodes)
        bases = {name: _node_base(self.nodes[name], p, quiet) for name in names}
        s_min = None
        for name, b in bases.items():
            iv = b.idle
            if not len(iv):
                continue
            fresh = np.fromiter(((name, int(g), int(e)) not in self.reported
                                 for g, e in zip(b.gpus.tolist(), iv.end.tolist())), bool, len(iv))
            if not final:
                wm = np.array([gpu_wm.get((name, int(g)), 0) for g in b.gpus.tolist()], dtype=np.int64)
                fresh &= ~(iv.open & (wm <= iv.end)) & (wm >= iv.end + iv.res)
            if fresh.any():
                s = int(iv.start[fresh].min())
                s_min = s if s_min is None else min(s_min, s)
        if s_min is None:
            return Result()
        u = max([nd.unc_ns + int(p["clock_skew_ns"]) for nd in self.nodes.values()] + [0])
        cut = s_min - 2 * u - 1
        parts = {}
        for name in names:
            nd, b = self.nodes[name], bases[name]
            keep = b.idle.end >= cut
            owned = keep & (b.own.group >= 0)
            st_cut = min(cut, int(b.idle.start[owned].min())) if owned.any() else cut
            parts[name] = _node_part(name, nd, b, p, quiet, keep=keep, stalls=_StallView(nd, st_cut),
                                     extra=_live_extra(nd, b, cut))
        for job, facts in sorted(jobs_of(parts.values()).items()):
            for node, found in job_stage(job, facts, p).items():
                parts[node].take(found)
        return assemble(parts.values(), p, select)

    def _trim(self, cutoff: int) -> None:
        """Drop rows that ended before ``cutoff`` and verdict ids that can no longer recur."""
        for nd in self.nodes.values():
            for kind in list(nd.tables):
                if kind == "proc":
                    continue
                t = nd.table(kind)
                tsv = np.asarray(t["ts_ns"], dtype=np.int64)
                if not len(tsv):
                    continue
                last = tsv + np.asarray(t["dur_ns"], dtype=np.int64) if "dur_ns" in t else tsv
                if last.min() >= cutoff:
                    continue
                keep = last >= cutoff
                nd.replace(kind, {c: take(v, keep) for c, v in t.items()} if keep.any() else {})
            nd.holders.trim(cutoff)
            self._trim_proc(nd)
        self.reported = {r for r in self.reported if r[2] >= cutoff}

    @staticmethod
    def _trim_proc(nd: _Node, at_least: int = 4096) -> None:
        """Keep lineage rows only for pids still referenced and their ancestors."""
        pr = nd.proc()
        n = table_len(pr)
        if n < at_least:
            return
        used = [np.asarray(nd.table(k)["pid"], dtype=np.int64) for k in STALL_TABLES + ("gpu_proc", "cpu")]
        used = np.unique(np.concatenate(used))
        pid, anc = blame.lineage(pr["pid"], pr["ppid"])
        needed = np.unique(anc[np.isin(pid, used)])
        keep = np.isin(np.asarray(pr["pid"], dtype=np.int64), needed)
        if not keep.all():
            nd.replace("proc", {c: take(v, keep) for c, v in pr.items()})


def _ending_from(t: dict, cutoff: int) -> dict:
    """The rows of a stall table from the first that ends at or after ``cutoff`` on, in their
    order, as views (no copy): every row that ends then or later (``LiveAnalyzer._trim``'s
    rule), and amid them any that ended earlier (a tracer emits a stall as it ends, so rows
    come about in order of end and these are few; in a table in order of start, short stalls
    after a long one). Those end before anything they are aligned against begins, and the
    whole window, which the selected verdicts equal, holds them as well."""
    if not table_len(t):
        return t
    last = np.asarray(t["ts_ns"], dtype=np.int64) + np.asarray(t["dur_ns"], dtype=np.int64)
    keep = last >= cutoff
    first = int(np.argmax(keep))
    if first == 0 and keep[0]:
        return t
    sel = slice(first, None) if keep[first] else slice(0, 0)
    return {c: take(v, sel) for c, v in t.items()}


class _StallView:
    """A node's stall tables as :meth:`LiveAnalyzer._unsettled` aligns them: the rows ending
    at or after ``cutoff``; HTTP requests joined into retry episodes over the whole window
    first (an episode's first attempts may have ended long before)."""

    def __init__(self, nd: _Node, cutoff: int):
        self.nd, self.cutoff = nd, cutoff

    def stall_table(self, kind: str) -> dict:
        return _ending_from(self.nd.stall_table(kind), self.cutoff)


def _live_extra(nd: _Node, base: _Base, cutoff: int) -> dict:
    """A node's cross-node facts (``crossnode.node_extra``) for :meth:`LiveAnalyzer._unsettled`:
    the loss episodes ending at or after ``cutoff``; exits and job members from the whole
    window (a member's first listing and an exit's GPU look back without bound); and, under
    ``jobs``, every job the node's whole window names (its intervals', its senders' of loss
    episodes), so that it takes part in the same job stages."""
    net = nd.table("net")
    extra = crossnode.node_extra({"net": _ending_from(net, cutoff), "proc": base.proc,
                                  "gpu_proc": base.gpu_proc}, nd.addrs)
    jobs = set(base.job.tolist())
    for pid in np.unique(np.asarray(net["pid"], dtype=np.int64)).tolist():
        who = base.info.get(pid)
        if who:
            jobs.add(who[1])
    extra["jobs"] = tuple(sorted(jobs - {""}))
    return extra
