"""From tracer batches to verdicts: one :class:`~stallscope.analysis.verdict.Verdict` per GPU
idle interval.

The glue between ``stallscope.wire.schema`` batches and the array code in :mod:`stallscope.analysis.blame`:
gather each node's tables, give nodes small ids, build GPU and pid keys, run the four blame
steps, and turn stall indexes back into event dicts (DESIGN.md field names) and chains.

``analyze(batches)`` does a whole store or recording at once; :class:`LiveAnalyzer` does the
same over a sliding window as batches arrive and hands back each verdict once, as soon as its
interval has ended (the collector prints them within a couple of seconds).
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from stallscope.wire.schema import STALL_TABLES, TABLES, complete, concat_tables, empty_table, table_len

from . import blame
from .attribution import GpuHolders, owner_cgroup, pod_fields
from .http_episodes import episodes
from .verdict import Verdict, build_chain

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
            out[c] = np.asarray(table[c])
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
    """What the analysis knows about one node: its tables (kept as chunks, joined on demand),
    sample periods, GPU identities, clock uncertainty and counters."""

    def __init__(self, name: str):
        self.name = name
        self.chunks = collections.defaultdict(list)
        self.periods = {}         # gpu index -> ns (latest nonzero the tracer reported)
        self.uuids = {}           # gpu index -> uuid
        self.unc_ns = 0           # largest clock-mapping uncertainty reported
        self.counters = {}        # key -> largest value seen (counters are cumulative)
        self.gpu_unavailable = ""
        self.unsynced = False     # wall clock not NTP/PTP-synchronized (adjtimex)
        self.batches = 0
        self.holders = GpuHolders()   # gpu index -> pods and jobs over time (tracer attribution)

    def absorb(self, b) -> None:
        self.batches += 1
        for kind, t in (b.tables or {}).items():
            if kind in TABLES and table_len(t):
                self.chunks[kind].append(_normalize(kind, t))
        meta = b.meta or {}
        g = meta.get("gpu") or {}
        if isinstance(g, dict):
            for k, v in (g.get("sample_period_ns") or {}).items():
                if v:
                    self.periods[int(k)] = int(v)
            for info in g.get("gpus") or []:
                if isinstance(info, dict) and "index" in info:
                    self.uuids[int(info["index"])] = _py(info.get("uuid", ""))
            if g.get("unavailable"):
                self.gpu_unavailable = str(g["unavailable"])
        clock = meta.get("clock") or {}
        if isinstance(g, dict) and g.get("gpus"):
            self.holders.absorb(g["gpus"], int(clock.get("sent_ns") or 0) if isinstance(clock, dict) else 0)
        if isinstance(clock, dict) and clock.get("uncertainty_ns"):
            self.unc_ns = max(self.unc_ns, int(clock["uncertainty_ns"]))
        if isinstance(clock, dict) and clock.get("ntp_synced") is False:
            self.unsynced = True
        for k, v in (b.counters or {}).items():
            if isinstance(v, (int, float, np.integer)):
                self.counters[k] = max(self.counters.get(k, 0), int(v))

    def table(self, kind: str) -> dict:
        ch = self.chunks.get(kind)
        if not ch:
            return empty_table(kind)
        if len(ch) > 1:
            self.chunks[kind] = ch = [concat_tables(kind, ch)]
        return ch[0]

    def stall_table(self, kind: str) -> dict:
        """A table as blame sees it: HTTP requests joined into retry episodes."""
        t = self.table(kind)
        return episodes(t) if kind == "http" and table_len(t) > 1 else t

    def proc(self) -> dict:
        """The node's proc table, one row per pid (the latest report wins)."""
        t = self.table("proc")
        n = table_len(t)
        if n > 1:
            pid = np.asarray(t["pid"], dtype=np.int64)
            o = np.lexsort((np.arange(n), pid))
            last = o[np.r_[pid[o][1:] != pid[o][:-1], True]]
            if len(last) < n:
                t = {c: v[last] for c, v in t.items()}
                self.chunks["proc"] = [t]
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
    res.nodes = {n: {"tables": {k: (nd.proc() if k == "proc" else nd.stall_table(k))
                                for k in ("gpu", "gpu_proc", "proc", *STALL_TABLES)},
                     "gpu_uuids": dict(nd.uuids)} for n, nd in nodes.items()}
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


def _job_of(roots, info) -> tuple:
    """(job, rank) of a GPU from the processes NVML listed: the most common job among them,
    and the lowest rank among the processes of that job (-1 when unknown)."""
    jobs = collections.Counter(info[r][1] for r in roots if r in info and info[r][1])
    if not jobs:
        return "", -1
    job = sorted(jobs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    ranks = [info[r][2] for r in roots if r in info and info[r][1] == job and info[r][2] >= 0]
    return job, (min(ranks) if ranks else -1)


def _analyze_nodes(nodes: dict, p: dict, select=None, on_phase=None) -> Result:
    """Verdicts for the nodes' data.  ``select(cols) -> bool mask`` (cols: per-interval
    arrays node, gpu, idle_end_ns, resolution_ns, open, verdict, job) limits which verdict
    dicts get built; the summary always counts every interval."""
    names = sorted(nodes)
    phase = on_phase or (lambda _name: None)

    # samples -> idle intervals
    phase(PHASES[1])
    keys, ts, util, synth, periods = [], [], [], [], {}
    for nid, name in enumerate(names):
        nd = nodes[name]
        g = nd.table("gpu")
        keys.append(blame.gpu_key(nid, np.asarray(g["gpu"], dtype=np.int64)))
        ts.append(np.asarray(g["ts_ns"], dtype=np.int64))
        util.append(np.asarray(g["util"], dtype=np.int64))
        synth.append(np.asarray(g["synth"], dtype=np.int64))
        for gpu, per in nd.periods.items():
            periods[int(blame.gpu_key(nid, gpu))] = per
    cat = (lambda xs, dt=np.int64: np.concatenate(xs).astype(dt) if xs else np.empty(0, dt))
    keys, ts, util, synth = cat(keys), cat(ts), cat(util), cat(synth)
    idle = blame.find_idle(keys, ts, util, synth, periods, threshold=p["idle_threshold"],
                           partial_threshold=p["partial_threshold"],
                           min_periods=p["min_periods"], min_ns=p["min_idle_ns"],
                           max_gap_ns=p["max_gap_ns"])

    # owners: NVML process lists + lineage
    phase(PHASES[2])
    gk, gt, gpid, p_node, p_pid, p_ppid = [], [], [], [], [], []
    info = {}  # node id -> {pid: (comm, job, rank, pod_uid, container_id)}
    for nid, name in enumerate(names):
        nd = nodes[name]
        t = nd.table("gpu_proc")
        gk.append(blame.gpu_key(nid, np.asarray(t["gpu"], dtype=np.int64)))
        gt.append(np.asarray(t["ts_ns"], dtype=np.int64))
        gpid.append(np.asarray(t["pid"], dtype=np.int64))
        pr = nd.proc()
        p_node.append(np.full(table_len(pr), nid, dtype=np.int64))
        p_pid.append(np.asarray(pr["pid"], dtype=np.int64))
        p_ppid.append(np.asarray(pr["ppid"], dtype=np.int64))
        info[nid] = {int(a): (_py(c), _py(j) or "", int(r), _py(pu) or "", _py(ci) or "")
                     for a, c, j, r, pu, ci in zip(pr["pid"], pr["comm"], pr["job"], pr["rank"],
                                                   pr["pod_uid"], pr["container_id"])}
    own = blame.owner_groups(idle.key, idle.start, idle.end, cat(gk), cat(gt), cat(gpid),
                             cat(p_node), cat(p_pid), cat(p_ppid), slack_ns=p["owner_slack_ns"])

    # stalls -> local verdicts
    phase(PHASES[3])
    st = _Stalls(names, nodes)
    al = blame.align(idle.start, idle.end, idle.res, own.group, st.start, st.dur, st.key,
                     own.pair_key, own.pair_group, min_explained=p["min_explained"],
                     max_contributors=p["max_contributors"], iv_lost=idle.lost,
                     st_kind=st.code, st_backstop=st.backstop, link_gap_ns=p["link_gap_ns"])

    # jobs -> remote verdicts: a local culprit chain, as one span, for the other ranks
    phase(PHASES[4])
    g_job = [_job_of([int(r) for r in roots], info[nd]) for nd, roots in zip(own.node, own.roots)]
    # no job in the owners' environment or cgroup: the one the GPU's Slurm job mapping names
    map_job = [""] * len(idle)
    if any(nodes[n].holders.hist for n in names):
        map_job = [nodes[names[int(blame.key_node(k))]].holders.job(int(blame.key_low(k)), int(t))
                   if g < 0 or not g_job[g][0] else "" for k, t, g in zip(idle.key, idle.start, own.group)]
    job_names = sorted({j for j, _r in g_job if j} | set(map_job) - {""})
    job_code = {j: i for i, j in enumerate(job_names)}
    g_code = np.array([job_code.get(j, -1) for j, _r in g_job] + [-1], dtype=np.int64)
    iv_job = g_code[own.group]      # group -1 picks the trailing -1
    iv_job = np.where(iv_job >= 0, iv_job, np.array([job_code.get(j, -1) for j in map_job], dtype=np.int64))
    unc = np.array([nodes[n].unc_ns + int(p["clock_skew_ns"]) for n in names] or [0],
                   dtype=np.int64)
    local = np.where(al.culprit >= 0, np.arange(len(idle)), -1)
    src, src_unc = blame.remote_blame(idle.key, iv_job, idle.start, idle.end, idle.res,
                                      local, al.best_start, al.best_end - al.best_start, unc,
                                      same_node=p["remote_same_node"])

    kind = np.where(al.culprit >= 0, 0, np.where(src >= 0, 1, 2))
    iv_names = np.array(names + [""], dtype=object)[blame.key_node(idle.key)]
    iv_jobs = np.array(job_names + [""], dtype=object)[iv_job]     # -1 picks ""
    build = np.ones(len(idle), dtype=bool)
    if select is not None:
        build = np.asarray(select({
            "node": iv_names, "gpu": blame.key_low(idle.key), "idle_end_ns": idle.end,
            "resolution_ns": idle.res, "open": idle.open,
            "verdict": np.array(VERDICTS, dtype=object)[kind], "job": iv_jobs}), dtype=bool)

    def chain_of(i, s=None, e=None):
        """The top chain of interval i (its stalls, by start); covered within [s, e) if given."""
        a, b = al.chain_ptr[i], al.chain_ptr[i + 1]
        idx = [int(x) for x in al.chain_stall[a:b]]
        if s is None:
            cover = int(al.best_cover[i])
        else:
            cover, reach = 0, s
            for j in idx:
                lo, hi = max(int(st.start[j]), reach), min(int(st.start[j] + st.dur[j]), e)
                if hi > lo:
                    cover += hi - lo
                reach = max(reach, hi)
        return build_chain([st.event(j) for j in idx], cover)

    phase(PHASES[5])
    verdicts = []
    for i in np.flatnonzero(build):
        nid, gpu = int(blame.key_node(idle.key[i])), int(blame.key_low(idle.key[i]))
        name = names[nid]
        s, e = int(idle.start[i]), int(idle.end[i])
        lost_ns = max(int(idle.lost[i]), 1)
        g = int(own.group[i])
        job, rank = g_job[g] if g >= 0 else ("", -1)
        job = job or map_job[i]
        who = pod_fields(nodes[name].holders.at(gpu, s)[0])
        who.update(owner_cgroup([int(x) for x in own.roots[g]], info[nid]) if g >= 0 else {})
        a, b = al.contrib_ptr[i], al.contrib_ptr[i + 1]
        contributors = [st.event(int(x), ov) for x, ov in
                        zip(al.contrib_stall[a:b], al.contrib_overlap[a:b])]
        local_x = float(al.explained[i])
        remote, culprit_node, c_unc, chain, basis = False, None, 0, None, None
        if al.culprit[i] >= 0:
            verdict, culprit = "culprit", st.event(int(al.culprit[i]), al.best_overlap[i])
            explained, culprit_node = local_x, name
            chain, basis = chain_of(i), _BASIS[int(al.basis[i])]
        elif src[i] >= 0:
            si = int(src[i])
            c = int(al.culprit[si])
            cs, ce = int(st.start[c]), int(st.start[c] + st.dur[c])
            ov = max(0, min(ce, e) - max(cs, s))
            verdict, culprit, remote = "remote", st.event(c, ov), True
            culprit_node = culprit["node"]
            c_unc = int(src_unc[i])
            chain, basis = chain_of(si, s, e), _BASIS[int(al.basis[si])]
            explained = min(chain.covered_ns / lost_ns, 1.0)
        else:
            verdict, culprit, explained = "unexplained", None, local_x
        verdicts.append(Verdict(
            node=name, gpu=gpu, gpu_uuid=nodes[name].uuids.get(gpu, ""),
            idle_start_ns=s, idle_end_ns=e, resolution_ns=int(idle.res[i]),
            open=bool(idle.open[i]), open_start=bool(idle.open_start[i]),
            synth_samples=int(idle.n_synth[i]), verdict=verdict, culprit=culprit, remote=remote,
            culprit_node=culprit_node, clock_uncertainty_ns=c_unc,
            explained_fraction=float(explained), local_explained_fraction=local_x,
            contributors=contributors,
            owners=[int(x) for x in own.members[g]] if g >= 0 else [],
            gpu_pids=[int(x) for x in own.roots[g]] if g >= 0 else [],
            job=job, rank=int(rank), klass=None if chain is None else chain.klass,
            chain=chain, basis=basis, lost_ns=int(idle.lost[i]), **who))

    lost = collections.Counter()
    for nd in nodes.values():
        for k, v in nd.counters.items():
            if "lost" in k or "dropped" in k:
                lost[k] += v
    sample_period = {}
    for k, per in idle.periods.items():
        sample_period.setdefault(names[int(blame.key_node(k))], {})[str(int(blame.key_low(k)))] = per
    summary = {
        "nodes": names,
        "gpus": len(idle.periods),
        "samples": int(len(ts)),
        "intervals": len(idle),
        "verdicts": {v: int(np.sum(kind == k)) for k, v in enumerate(VERDICTS)},
        "idle_ns": int(np.sum(idle.end - idle.start)) if len(idle) else 0,
        "lost_ns": int(np.sum(idle.lost)) if len(idle) else 0,
        "stalls": st.counts(),
        "sample_period_ns": sample_period,
        "clock_uncertainty_ns": {n: nodes[n].unc_ns for n in names},
        "lost": dict(lost),
        "lost_total": int(sum(lost.values())),
        "clock_unsynced": [n for n in names if nodes[n].unsynced],
        "gpu_unavailable": {n: nodes[n].gpu_unavailable for n in names
                            if nodes[n].gpu_unavailable},
        "params": dict(p),
    }
    return Result(verdicts, summary)


# --------------------------------------------------------------------------- live

class LiveAnalyzer:
    """Verdicts as batches stream in, each reported once, memory bounded by a time window.

    ``add(batches)`` keeps the last ``window_ns`` of every node's data (newest sample across
    nodes as "now"; NVML stamps, not this host's clock, so a replay behaves like a live run),
    re-analyzes it and returns the verdicts that became final: the interval has closed (or was
    cut by a hole in the samples) and its GPU has a sample at least one period past its end.  An unexplained interval of a job also
    waits until every node running that job has data that far (a remote culprit may still
    arrive), but no longer than ``wait_ns`` past its end.  ``min_gap_s`` rate-limits the
    re-analysis (wall clock); ``flush()`` returns whatever is left, open intervals included.
    An interval is identified by (node, gpu, idle_end_ns), which trimming cannot change.
    """

    def __init__(self, window_ns: int = 600_000_000_000, wait_ns: int = 2_000_000_000,
                 min_gap_s: float = 0.5, clock=time.monotonic, **params):
        self.params = _params(params)
        self.window_ns = int(window_ns)
        self.wait_ns = int(wait_ns)
        self.min_gap_s = min_gap_s
        self.clock = clock
        self.nodes = {}
        self.reported = set()
        self._last_run = None
        self._dirty = False

    def add(self, batches) -> list:
        for b in batches:
            self.nodes.setdefault(b.node, _Node(b.node)).absorb(b)
            self._dirty = True
        now = self.clock()
        if not self._dirty or (self._last_run is not None and self.min_gap_s
                               and now - self._last_run < self.min_gap_s):
            return []
        self._last_run = now
        self._dirty = False
        return self._run(final=False)

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
        return per_node, per_gpu

    def _run(self, final: bool) -> list:
        node_wm, gpu_wm = self._watermarks()
        if not node_wm:
            return []
        self._trim(max(node_wm.values()) - self.window_ns)
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

        out = _analyze_nodes(self.nodes, self.params, select=ready).verdicts
        self.reported.update((v.node, v.gpu, v.idle_end_ns) for v in out)
        return out

    def _trim(self, cutoff: int) -> None:
        """Drop rows that ended before ``cutoff`` and verdict ids that can no longer recur."""
        for nd in self.nodes.values():
            for kind in list(nd.chunks):
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
                nd.chunks[kind] = [{c: v[keep] for c, v in t.items()}] if keep.any() else []
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
        used = [np.asarray(nd.table(k)["pid"], dtype=np.int64) for k in STALL_TABLES + ("gpu_proc",)]
        used = np.unique(np.concatenate(used))
        pid, anc = blame.lineage(pr["pid"], pr["ppid"])
        needed = np.unique(anc[np.isin(pid, used)])
        keep = np.isin(np.asarray(pr["pid"], dtype=np.int64), needed)
        if not keep.all():
            nd.chunks["proc"] = [{c: v[keep] for c, v in pr.items()}]
