"""Causes across the nodes of one job, and what a local culprit cost the rest of the job.

The per-job stage of the analysis: it takes what the per-node stage found on each node of a
job (:class:`NodeFacts`: its idle intervals with their local culprits, its TCP loss episodes,
the exits of its ranks, the GPUs its ranks held, its addresses, its clock uncertainty) and
gives

* for each interval left unexplained locally, a remote cause (:class:`RemoteCause`), one of
  :data:`CAUSES`, first listed first:

  - ``peer_exit``: a rank of the job on another GPU died (exit code != 0 or a signal) at most
    ``exit_window_ns`` before the interval began, and the interval began at or after the
    death (within the clock uncertainty and one sample period): this rank waited at the next
    collective. A death leaves nothing to wait for, so it comes before everything else. Not
    when this GPU's own rank died in that window (the whole job went down: the idle is no
    wait). The earliest death wins (the first of a cascade of aborts).
  - ``peer_net``: a TCP loss episode traced on another node whose destination address is one
    of this node's (and of no other node of the job), from a process of the same job,
    overlapping the interval and starting no later than its start + one period: the peer's
    data to this node was retransmitting. More direct than the peer's own stall (the same
    flow is often the sender's local culprit), so it comes before ``peer_io``. The episode
    that starts first wins, then the one covering more.
  - ``peer_io``: another rank's local culprit chain overlapping the interval and starting no
    later than its start + one period (:func:`~stallscope.analysis.blame.remote_blame`,
    unchanged: the earliest chain wins, then the first interval in (node, gpu, start) order).

  Times on two nodes are compared within ``u``, the sum of both nodes' clock uncertainty
  (+ ``clock_skew_ns`` each); on one node ``u`` is 0. Other GPUs of the same node count as
  peers unless ``remote_same_node`` is false (``peer_net`` always needs two nodes).
* for each interval with a local culprit, its :class:`~stallscope.analysis.verdict.JobCost`:
  the job's other GPUs it held up (GPUs the job held while it idled, from NVML's process
  lists, plus any GPU of the job idle then), ``gpu_seconds`` = that count x the idle time its
  chain covers, an ``estimate`` unless every one of them shows an idle interval overlapping
  the stall (ranks spinning in an NCCL collective look busy to NVML).

Everything here is numpy and plain Python on the facts given; no I/O. :func:`analyze_job` is
the entry point (one call per job); the ``*_from_*`` helpers turn a node's tables (as
``wire.schema`` defines them) and batch meta into facts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import signal as _signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import blame
from .verdict import Chain, JobCost, Verdict, build_chain

#: parameters and their defaults (the first two are the single-node analysis' own)
DEFAULTS = {
    "remote_same_node": True,              # peers on the same node count too
    "clock_skew_ns": 0,                    # extra per-node wall-clock error to assume
    "exit_window_ns": 60_000_000_000,      # a peer's death explains idle beginning this long after
}
#: remote causes, in priority order
CAUSES = ("peer_exit", "peer_net", "peer_io")
_NEVER = np.iinfo(np.int64).max


# --------------------------------------------------------------------------- facts

@dataclass
class Interval:
    """One GPU idle interval as the node stage judged it. ``culprit`` (the local culprit's
    representative stall event) is None when nothing local explains it; ``links`` are the
    local culprit chain's stalls as (start, end), by start (their union inside another rank's
    interval is what they explain there; without them the chain's span stands in), ``chain``
    and ``basis`` as the local verdict has them. Without ``chain``, ``events`` (the chain's
    stall event dicts, or an object whose ``chain(covered_ns)`` sums them when first asked)
    lets a peer_io cause build the chain for the interval it explains."""

    gpu: int
    start_ns: int
    end_ns: int
    res_ns: int
    lost_ns: int = 0
    rank: int = -1
    job: str = ""
    culprit: dict | None = None
    links: tuple = ()
    chain: Chain | None = None
    basis: str | None = None
    events: Any = ()
    local: bool = False         # a local culprit whose event ``events.culprit`` makes when asked

    @property
    def explained(self) -> bool:
        return self.local or self.culprit is not None

    def culprit_event(self) -> dict | None:
        """The local culprit's event; made from ``events`` when first needed (a node has
        many local culprits, few become another rank's remote culprit)."""
        if self.culprit is None and self.local:
            self.culprit = getattr(self.events, "culprit", None)
        return self.culprit

    def span(self) -> tuple:
        """(first start, last end) of the local culprit chain; (0, 0) when none."""
        if self.links:
            return min(int(a) for a, _b in self.links), max(int(b) for _a, b in self.links)
        if self.chain is not None:
            return self.chain.start_ns, self.chain.end_ns
        c = self.culprit_event()
        if c is not None:
            ts = int(c["ts_ns"])
            return ts, ts + int(c["dur_ns"])
        return 0, 0

    def covered(self, s: int, e: int) -> int:
        """The union of the chain's stalls inside [s, e)."""
        links = self.links or ((self.span(),) if self.explained else ())
        cover, reach = 0, s
        for a, b in sorted((int(a), int(b)) for a, b in links):
            lo, hi = max(a, reach), min(b, e)
            if hi > lo:
                cover += hi - lo
            reach = max(reach, hi)
        return cover

    @classmethod
    def from_verdict(cls, v: Verdict, links=None) -> "Interval":
        """The facts of a node-stage verdict (only a local culprit counts as explained)."""
        local = v.verdict == "culprit" and v.culprit is not None
        return cls(gpu=v.gpu, start_ns=v.idle_start_ns, end_ns=v.idle_end_ns, res_ns=v.resolution_ns,
                   lost_ns=v.lost_ns, rank=v.rank, job=v.job, culprit=v.culprit if local else None,
                   links=tuple(links or ()) if local else (), chain=v.chain if local else None,
                   basis=v.basis if local else None)


@dataclass
class NetLoss:
    """A TCP loss episode (a ``net`` row) on its sender's node, with the sending process's
    job and rank from that node's ``proc`` table. ``event``: the row as an event dict, if
    the caller has it (else one is built from these fields)."""

    ts_ns: int
    dur_ns: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    retransmits: int = 0
    pid: int = 0
    comm: str = ""
    job: str = ""
    rank: int = -1
    event: dict | None = None

    def as_event(self, node: str) -> dict:
        d = dict(self.event) if self.event else {
            "type": "net", "ts_ns": self.ts_ns, "dur_ns": self.dur_ns, "pid": self.pid, "tid": 0,
            "comm": self.comm, "op": "retransmit", "saddr": self.saddr, "sport": self.sport,
            "daddr": self.daddr, "dport": self.dport, "state": "", "retransmits": self.retransmits,
            "sock_ino": 0}
        d["node"] = node
        return d


@dataclass
class Exit:
    """A rank's process that exited: ``exit_status`` is the wait(2) status (signal in bits
    0-6, 0x80 core dumped, exit code in bits 8-15; -1 unknown); ``gpu`` the GPU NVML listed it
    on (-1 unknown)."""

    pid: int
    exit_ns: int
    exit_status: int
    rank: int = -1
    job: str = ""
    comm: str = ""
    gpu: int = -1

    @property
    def abnormal(self) -> bool:
        """Died of a signal or exited with a nonzero code (status 0 or unknown: no cause)."""
        return self.exit_status > 0

    def as_event(self, node: str) -> dict:
        st = self.exit_status
        return {"type": "exit", "ts_ns": self.exit_ns, "dur_ns": 0, "pid": self.pid, "tid": self.pid,
                "comm": self.comm, "node": node, "op": "exit", "exit_status": st,
                "signal": st & 0x7F if st > 0 else 0, "exit_code": (st >> 8) & 0xFF if st > 0 else 0,
                "core_dumped": bool(st > 0 and st & 0x80), "job": self.job, "rank": self.rank}


@dataclass
class Member:
    """A GPU held by a job's processes between ``first_ns`` and ``last_ns`` (NVML's process
    lists), and the rank running there (-1 unknown)."""

    gpu: int
    job: str
    rank: int = -1
    first_ns: int = 0
    last_ns: int = _NEVER


@dataclass
class NodeFacts:
    """What the node stage knows about one node for the job stage. ``unc_ns``: the node's
    clock uncertainty (largest reported); ``addrs``: its addresses (``meta.node.addrs``)."""

    name: str
    addrs: tuple = ()
    unc_ns: int = 0
    intervals: list = field(default_factory=list)   # Interval
    losses: list = field(default_factory=list)      # NetLoss sent from this node
    exits: list = field(default_factory=list)       # Exit of this node's ranks
    members: list = field(default_factory=list)     # Member


# --------------------------------------------------------------------------- results

@dataclass
class RemoteCause:
    """The remote cause of interval ``index`` of node ``node`` (its position in that node's
    ``intervals``): ``culprit`` is the event (the peer's stall, loss episode or exit) with its
    ``overlap_ns``; ``covered_ns`` the idle time it explains; ``source_index`` the peer's
    interval for ``peer_io`` (-1 otherwise); :meth:`get_chain` the culprit chain (peer_io: the
    peer's, covering this interval, built when first asked; peer_net: the one episode;
    peer_exit: none). As a job-stage finding: ``verdict`` is what it makes, :meth:`apply`
    makes it."""

    node: str
    index: int
    cause: str
    source_node: str
    source_rank: int
    culprit: dict
    covered_ns: int
    clock_uncertainty_ns: int
    source_index: int = -1
    chain: Chain | None = None
    basis: str | None = None
    source: Interval | None = field(default=None, repr=False, compare=False)
    verdict: str = "remote"

    def get_chain(self) -> Chain | None:
        sv = self.source
        if self.chain is None and sv is not None:
            if sv.chain is not None:
                self.chain = dataclasses.replace(sv.chain, covered_ns=self.covered_ns)
            else:
                ev = sv.events
                if hasattr(ev, "chain"):        # a node stage's Source: summed there
                    self.chain = ev.chain(self.covered_ns)
                else:
                    links = list(ev or ())
                    self.chain = build_chain(links, self.covered_ns) if links else None
        return self.chain

    def apply(self, v: Verdict) -> Verdict:
        return apply(v, self)


@dataclass
class CostFinding:
    """A local culprit's :class:`~stallscope.analysis.verdict.JobCost` as a job-stage finding."""

    cost: JobCost
    verdict: str = "culprit"

    def apply(self, v: Verdict) -> Verdict:
        return apply(v, cost=self.cost)


@dataclass
class JobResult:
    """``causes`` and ``costs`` keyed by (node, interval index)."""

    causes: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)


def params(p: dict | None = None) -> dict:
    """:data:`DEFAULTS` updated with the keys of ``p`` that are ours (``p`` may be the whole
    analysis parameter dict)."""
    out = dict(DEFAULTS)
    for k in DEFAULTS:
        if p and k in p:
            out[k] = p[k]
    return out


def analyze_job(nodes: list, p: dict | None = None) -> JobResult:
    """Remote causes and job costs for the nodes of one job (the job stage's one call)."""
    flat = _Flat(nodes, params(p))
    return JobResult(_remote_causes(flat), _job_cost(flat))


def remote_causes(nodes: list, p: dict | None = None) -> dict:
    """(node, index) -> :class:`RemoteCause` for the intervals left unexplained locally."""
    return _remote_causes(_Flat(nodes, params(p)))


def job_cost(nodes: list, p: dict | None = None) -> dict:
    """(node, index) -> :class:`~stallscope.analysis.verdict.JobCost` of each local culprit."""
    return _job_cost(_Flat(nodes, params(p)))


def apply(v: Verdict, cause: RemoteCause | None = None, cost: JobCost | None = None) -> Verdict:
    """The verdict with the job stage's findings: a remote cause turns an interval without
    a local culprit into a ``remote`` verdict (culprit, node, clock uncertainty, explained
    share, chain, class, cause, culprit rank); a cost is attached to a local culprit."""
    if cause is not None and v.verdict != "culprit":
        chain = cause.get_chain()
        v = dataclasses.replace(
            v, verdict="remote", culprit=cause.culprit, remote=True, culprit_node=cause.source_node,
            clock_uncertainty_ns=cause.clock_uncertainty_ns,
            explained_fraction=float(min(cause.covered_ns / max(v.lost_ns, 1), 1.0)),
            chain=chain, basis=cause.basis,
            klass="rank_exit" if cause.cause == "peer_exit" else (None if chain is None else chain.klass),
            process=None,       # what the local classes (lifecycle, cpu_bound) said no longer stands
            cause=cause.cause, culprit_rank=cause.source_rank)
    if cost is not None and v.verdict == "culprit":
        v = dataclasses.replace(v, job_cost=cost)
    return v


# --------------------------------------------------------------------------- the job's arrays

class _Flat:
    """Every interval of the job's nodes in one set of arrays, in (node name, gpu, start)
    order: the order the single-process analysis numbers intervals in, so ties break alike."""

    def __init__(self, nodes: list, p: dict):
        self.p = p
        by_name = {}
        for nd in nodes:
            if nd.name in by_name:
                raise ValueError(f"node {nd.name!r} appears twice in one job's facts")
            by_name[nd.name] = nd
        self.names = sorted(by_name)
        self.nodes = [by_name[n] for n in self.names]
        self.unc = np.array([int(nd.unc_ns) + int(p["clock_skew_ns"]) for nd in self.nodes] or [0],
                            dtype=np.int64)
        rows = []
        for nid, nd in enumerate(self.nodes):
            for i, iv in enumerate(nd.intervals):
                rows.append((nid, int(iv.gpu), int(iv.start_ns), i))
        rows.sort()
        self.ivs = [self.nodes[nid].intervals[i] for nid, _g, _s, i in rows]
        n = len(rows)
        col = (lambda f, dt=np.int64: np.fromiter((f(x) for x in self.ivs), dtype=dt, count=n))
        self.node = np.array([r[0] for r in rows], dtype=np.int64)
        self.index = np.array([r[3] for r in rows], dtype=np.int64)
        self.gpu = col(lambda iv: iv.gpu)
        self.start = col(lambda iv: iv.start_ns)
        self.end = col(lambda iv: iv.end_ns)
        self.res = col(lambda iv: iv.res_ns)
        self.rank = col(lambda iv: iv.rank)
        self.explained = col(lambda iv: iv.explained, bool)
        spans = [iv.span() for iv in self.ivs]
        self.span_s = np.array([s for s, _e in spans], dtype=np.int64)
        self.span_e = np.array([e for _s, e in spans], dtype=np.int64)
        self.jobs = sorted({iv.job for iv in self.ivs if iv.job}
                           | {x.job for nd in self.nodes for x in nd.exits + nd.losses + nd.members if x.job})
        code = {j: c for c, j in enumerate(self.jobs)}
        self.code = code
        self.job = np.array([code.get(iv.job, -1) for iv in self.ivs], dtype=np.int64)
        self.key = blame.gpu_key(self.node, self.gpu)
        self.gpu_keys, self.gpu_code = np.unique(self.key, return_inverse=True)   # dense GPU codes
        self.gpu_code = self.gpu_code.reshape(-1).astype(np.int64)
        # per node: its intervals by start, for range lookups
        self.by_start = []
        for nid in range(len(self.nodes)):
            idx = np.flatnonzero(self.node == nid)
            idx = idx[np.argsort(self.start[idx], kind="stable")]
            self.by_start.append((idx, self.start[idx], int(self.res[idx].max()) if len(idx) else 0))

    def u(self, a: int, b: int) -> int:
        return 0 if a == b else int(self.unc[a] + self.unc[b])

    def starting(self, nid: int, lo: int, hi: int) -> np.ndarray:
        """Intervals of node nid starting in [lo, hi]."""
        idx, starts, _r = self.by_start[nid]
        return idx[np.searchsorted(starts, lo, "left"):np.searchsorted(starts, hi, "right")]

    def key_of(self, t: int) -> tuple:
        return self.names[int(self.node[t])], int(self.index[t])


# --------------------------------------------------------------------------- remote causes

def _remote_causes(f: _Flat) -> dict:
    found = {}
    for kind, pick in (("peer_io", _peer_io), ("peer_net", _peer_net), ("peer_exit", _peer_exit)):
        for t, c in pick(f).items():
            have = found.get(t)
            if have is None or CAUSES.index(kind) < CAUSES.index(have.cause):
                found[t] = c
    return {f.key_of(t): c for t, c in sorted(found.items())}


def _peer_io(f: _Flat) -> dict:
    if not len(f.start):
        return {}
    local = np.where(f.explained, np.arange(len(f.start)), -1)
    src, unc = blame.remote_blame(f.key, f.job, f.start, f.end, f.res, local, f.span_s,
                                  f.span_e - f.span_s, f.unc, same_node=f.p["remote_same_node"])
    out = {}
    for t in np.flatnonzero(src >= 0):
        s = int(src[t])
        sv = f.ivs[s]
        a, b = int(f.start[t]), int(f.end[t])
        c = dict(sv.culprit_event() or {})
        cs = int(c.get("ts_ns", 0))
        c["overlap_ns"] = max(0, min(cs + int(c.get("dur_ns", 0)), b) - max(cs, a))
        out[int(t)] = RemoteCause(f.names[int(f.node[t])], int(f.index[t]), "peer_io",
                                  f.names[int(f.node[s])], int(f.rank[s]), c, sv.covered(a, b), int(unc[t]),
                                  source_index=int(f.index[s]), basis=sv.basis, source=sv)
    return out


def normalize_addr(a) -> str:
    """An address as one canonical text (IPv4-mapped IPv6 as IPv4); "" if it is none."""
    try:
        ip = ipaddress.ip_address(str(a).strip().split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _peer_net(f: _Flat) -> dict:
    owners: dict = {}
    for nid, nd in enumerate(f.nodes):
        for a in nd.addrs:
            na = normalize_addr(a)
            if na:
                owners.setdefault(na, set()).add(nid)
    best: dict = {}
    for sn, nd in enumerate(f.nodes):
        for li, loss in enumerate(nd.losses):
            jc = f.code.get(loss.job, -1) if loss.job else -1
            tn_set = owners.get(normalize_addr(loss.daddr), ())
            if jc < 0 or len(tn_set) != 1:
                continue                 # no job, not to a node of the job, or ambiguous
            (tn,) = tn_set
            if tn == sn:
                continue
            u = f.u(sn, tn)
            ls, le = int(loss.ts_ns), int(loss.ts_ns) + int(loss.dur_ns)
            cand = f.starting(tn, ls - f.by_start[tn][2] - u, le + u)
            if not len(cand):
                continue
            ok = ((~f.explained[cand]) & (f.job[cand] == jc) & (ls < f.end[cand] + u)
                  & (le > f.start[cand] - u) & (ls <= f.start[cand] + f.res[cand] + u))
            for t in cand[ok]:
                t = int(t)
                a, b = int(f.start[t]), int(f.end[t])
                cover = max(0, min(le, b) - max(ls, a))
                rank_key = (ls, -cover, f.names[sn], li)
                if t in best and best[t][0] <= rank_key:
                    continue
                ev = loss.as_event(f.names[sn])
                ev["overlap_ns"] = cover
                chain = build_chain([ev], cover)
                best[t] = (rank_key, RemoteCause(
                    f.names[tn], int(f.index[t]), "peer_net", f.names[sn], int(loss.rank), ev, cover, u,
                    chain=chain, basis="specific"))
    return {t: c for t, (_k, c) in best.items()}


def _peer_exit(f: _Flat) -> dict:
    window = int(f.p["exit_window_ns"])
    same_node = bool(f.p["remote_same_node"])
    # every exit of each node by (job, rank) and (job, gpu): a GPU whose own rank died just
    # before its idle began is not waiting for anyone
    own: dict = {}
    for nid, nd in enumerate(f.nodes):
        for x in nd.exits:
            if x.rank >= 0:
                own.setdefault((nid, x.job, "r", x.rank), []).append(int(x.exit_ns))
            if x.gpu >= 0:
                own.setdefault((nid, x.job, "g", x.gpu), []).append(int(x.exit_ns))

    def died_before(t: int) -> bool:
        nid, s = int(f.node[t]), int(f.start[t])
        job = f.jobs[int(f.job[t])]
        times = own.get((nid, job, "r", int(f.rank[t])), []) if f.rank[t] >= 0 else []
        times = times + own.get((nid, job, "g", int(f.gpu[t])), [])
        return any(s - window <= x <= s + int(f.res[t]) for x in times)

    best: dict = {}
    for sn, nd in enumerate(f.nodes):
        for xi, x in enumerate(nd.exits):
            jc = f.code.get(x.job, -1) if x.job else -1
            if jc < 0 or not x.abnormal:
                continue
            xt = int(x.exit_ns)
            for tn in range(len(f.nodes)):
                if tn == sn and not same_node:
                    continue
                u = f.u(sn, tn)
                cand = f.starting(tn, xt - u - f.by_start[tn][2], xt + window + u)
                if not len(cand):
                    continue
                ok = ((~f.explained[cand]) & (f.job[cand] == jc)
                      & (f.start[cand] >= xt - u - f.res[cand]))
                if tn == sn:        # not the dead rank's own GPU
                    if x.rank >= 0:
                        ok &= f.rank[cand] != x.rank
                    if x.gpu >= 0:
                        ok &= f.gpu[cand] != x.gpu
                for t in cand[ok]:
                    t = int(t)
                    rank_key = (xt, f.names[sn], x.pid, xi)
                    if (t in best and best[t][0] <= rank_key) or died_before(t):
                        continue
                    a, b = int(f.start[t]), int(f.end[t])
                    cover = max(0, b - max(a, xt))
                    ev = x.as_event(f.names[sn])
                    ev["overlap_ns"] = cover
                    best[t] = (rank_key, RemoteCause(f.names[tn], int(f.index[t]), "peer_exit", f.names[sn],
                                                     int(x.rank), ev, cover, u))
    return {t: c for t, (_k, c) in best.items()}


# --------------------------------------------------------------------------- job cost

def _job_cost(f: _Flat) -> dict:
    src = np.flatnonzero(f.explained & (f.job >= 0))
    if not len(src):
        return {}
    # the job's GPUs: one span per (node, gpu, job) from NVML's process lists
    spans: dict = {}
    for nid, nd in enumerate(f.nodes):
        for m in nd.members:
            jc = f.code.get(m.job, -1) if m.job else -1
            if jc < 0:
                continue
            k = (jc, int(blame.gpu_key(nid, m.gpu)))
            a, b = spans.get(k, (_NEVER, 0))
            spans[k] = (min(a, int(m.first_ns)), max(b, int(m.last_ns)))
    umax = 2 * int(f.unc.max()) if len(f.unc) else 0
    out = {}
    for jc in np.unique(f.job[src]):
        ks = sorted(k for (j, k) in spans if j == jc)
        m_key = np.array(ks, dtype=np.int64)
        m_first = np.array([spans[(jc, k)][0] for k in ks], dtype=np.int64)
        m_last = np.array([spans[(jc, k)][1] for k in ks], dtype=np.int64)
        first_sorted, last_sorted = np.sort(m_first), np.sort(m_last)
        e = src[f.job[src] == jc]
        # the stall's reach inside its own interval: when the others waited
        lo = np.maximum(f.span_s[e], f.start[e])
        hi = np.maximum(np.minimum(f.span_e[e], f.end[e]), lo + 1)
        # GPUs of the job active then (span overlaps), without the culprit's own
        active = (np.searchsorted(first_sorted, hi + umax, "left")
                  - np.searchsorted(last_sorted, lo - umax, "left"))
        pos = np.searchsorted(m_key, f.key[e])
        pos_c = np.minimum(pos, max(len(m_key) - 1, 0))
        own = ((pos < len(m_key)) & (m_key[pos_c] == f.key[e]) & (m_first[pos_c] < hi + umax)
               & (m_last[pos_c] >= lo - umax)) if len(m_key) else np.zeros(len(e), dtype=bool)
        held = active - own
        # GPUs of the job idle then: (stall, interval) pairs, exact per node pair
        iv = np.flatnonzero(f.job == jc)
        iv = iv[np.argsort(f.start[iv], kind="stable")]
        q, j = _range_join(f.start[iv], f.end[iv], lo - umax, hi + umax)
        t = iv[j]
        u = np.where(f.node[e[q]] == f.node[t], 0, f.unc[f.node[e[q]]] + f.unc[f.node[t]])
        keep = (f.key[t] != f.key[e[q]]) & (f.start[t] < hi[q] + u) & (f.end[t] > lo[q] - u)
        q, t = q[keep], t[keep]
        # distinct (stall, GPU) pairs: one code per pair, q major (a sort, then runs)
        nk = max(len(f.gpu_keys), 1)
        pair = np.sort(q.astype(np.int64) * nk + f.gpu_code[t])
        pair = pair[np.r_[True, pair[1:] != pair[:-1]]] if len(pair) else pair
        pq, pkey = pair // nk, f.gpu_keys[pair % nk]
        idle = np.bincount(pq, minlength=len(e))
        # an idle GPU the process lists did not show as the job's at that time is held up too
        if len(pair):
            ppos = np.searchsorted(m_key, pkey)
            ppos_c = np.minimum(ppos, max(len(m_key) - 1, 0))
            listed = ((ppos < len(m_key)) & (m_key[ppos_c] == pkey)
                      & (m_first[ppos_c] < hi[pq] + umax) & (m_last[ppos_c] >= lo[pq] - umax)) \
                if len(m_key) else np.zeros(len(pair), dtype=bool)
            held = held + np.bincount(pq[~listed], minlength=len(e))
        for k, i in enumerate(e):
            n = int(held[k])
            if n <= 0:
                continue
            dur = f.ivs[i].covered(int(f.start[i]), int(f.end[i]))
            out[f.key_of(int(i))] = JobCost(ranks=n, gpu_seconds=round(n * dur / 1e9, 3),
                                             estimate=bool(idle[k] < n), idle_ranks=int(idle[k]))
    return dict(sorted(out.items()))


def _range_join(item_start, item_end, q_lo, q_hi):
    """Pairs (query, item) with item_start < q_hi and item_end > q_lo; items sorted by start."""
    if len(item_start) == 0 or len(q_lo) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    reach = np.maximum.accumulate(item_end)
    lo = np.searchsorted(reach, q_lo, side="right")
    hi = np.searchsorted(item_start, q_hi, side="left")
    cnt = np.maximum(hi - lo, 0)
    q = np.repeat(np.arange(len(q_lo)), cnt)
    j = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
    keep = item_end[j] > q_lo[q]
    return q[keep], j[keep]


# --------------------------------------------------------------------------- facts from tables

def _col(t: dict, c: str, n: int, fill, dt):
    v = t.get(c)
    return np.full(n, fill, dtype=dt) if v is None else np.asarray(v)


def _latest_by_pid(proc: dict) -> dict:
    """pid -> (job, rank, comm) from a proc table, the latest row of each pid."""
    out = {}
    n = len(proc.get("pid", ()))
    jobs = _col(proc, "job", n, "", object)
    ranks = _col(proc, "rank", n, -1, np.int64)
    comms = _col(proc, "comm", n, "", object)
    for i, pid in enumerate(np.asarray(proc.get("pid", ()), dtype=np.int64)):
        out[int(pid)] = (str(jobs[i] or ""), int(ranks[i]), str(comms[i] or ""))
    return out


def losses_from_tables(net: dict, proc: dict) -> list:
    """:class:`NetLoss` facts from a node's ``net`` and ``proc`` tables (its own flows)."""
    n = len(net.get("ts_ns", ()))
    who = _latest_by_pid(proc)
    out = []
    cols = list(net)
    for i in range(n):
        ev = {"type": "net"}
        for c in cols:
            v = net[c][i]
            ev[c] = v.item() if hasattr(v, "item") else v
        job, rank, _comm = who.get(int(ev["pid"]), ("", -1, ""))
        out.append(NetLoss(int(ev["ts_ns"]), int(ev["dur_ns"]), str(ev["saddr"]), int(ev["sport"]),
                           str(ev["daddr"]), int(ev["dport"]), int(ev.get("retransmits", 0)), int(ev["pid"]),
                           str(ev.get("comm", "")), job, rank, ev))
    return out


def exits_from_tables(proc: dict, gpu_proc: dict | None = None, slack_ns: int = 5_000_000_000) -> list:
    """:class:`Exit` facts from a node's ``proc`` rows with an ``exit_ns`` (every row, not
    only a pid's latest: a pid may be reused after its exit). With ``gpu_proc``, only
    processes NVML listed on a GPU between their start and their exit (+- ``slack_ns``), i.e.
    a rank's own process, not a dataloader worker that inherited its RANK; without it, only
    processes with a rank."""
    n = len(proc.get("pid", ()))
    exit_ns = _col(proc, "exit_ns", n, 0, np.int64).astype(np.int64)
    rows = np.flatnonzero(exit_ns > 0)
    if not len(rows):
        return []
    pid = np.asarray(proc["pid"], dtype=np.int64)
    start = _col(proc, "start_ns", n, 0, np.int64).astype(np.int64)
    status = _col(proc, "exit_status", n, -1, np.int64).astype(np.int64)
    job = _col(proc, "job", n, "", object)
    rank = _col(proc, "rank", n, -1, np.int64).astype(np.int64)
    comm = _col(proc, "comm", n, "", object)
    if gpu_proc is not None:
        gp = np.asarray(gpu_proc.get("pid", ()), dtype=np.int64)
        want = np.isin(gp, pid[rows])
        gp = gp[want]
        gts = np.asarray(gpu_proc.get("ts_ns", ()), dtype=np.int64)[want]
        ggpu = np.asarray(gpu_proc.get("gpu", ()), dtype=np.int64)[want]
        o = np.lexsort((ggpu, gts, gp))             # by pid, then time, then GPU
        gp, gts, ggpu = gp[o], gts[o], ggpu[o]
    out = []
    for i in rows:
        g = -1
        if gpu_proc is not None:
            # the GPU NVML listed it on last between its start and its exit (+- slack): the
            # latest (time, gpu) of its rows in that span
            a, b = np.searchsorted(gp, pid[i], "left"), np.searchsorted(gp, pid[i], "right")
            ts = gts[a:b]
            lo = a + int(np.searchsorted(ts, start[i] - slack_ns, "left"))
            hi = a + int(np.searchsorted(ts, exit_ns[i] + slack_ns, "right"))
            if hi <= lo:
                continue
            g = int(ggpu[hi - 1])
        elif rank[i] < 0:
            continue
        out.append(Exit(int(pid[i]), int(exit_ns[i]), int(status[i]), int(rank[i]), str(job[i] or ""),
                        str(comm[i] or ""), g))
    return out


def members_from_tables(gpu_proc: dict, proc: dict) -> list:
    """:class:`Member` facts: per GPU and job, the first and last time NVML listed a process
    of that job there, and the lowest rank among them."""
    gp = np.asarray(gpu_proc.get("pid", ()), dtype=np.int64)
    if not len(gp):
        return []
    gts = np.asarray(gpu_proc["ts_ns"], dtype=np.int64)
    ggpu = np.asarray(gpu_proc["gpu"], dtype=np.int64)
    who = _latest_by_pid(proc)
    acc: dict = {}
    for p_ in np.unique(gp):
        job, rank, _comm = who.get(int(p_), ("", -1, ""))
        if not job:
            continue
        m = gp == p_
        for g in np.unique(ggpu[m]):
            ts = gts[m & (ggpu == g)]
            a, b, r = acc.get((int(g), job), (_NEVER, 0, -1))
            r = rank if r < 0 else (min(r, rank) if rank >= 0 else r)
            acc[(int(g), job)] = (min(a, int(ts.min())), max(b, int(ts.max())), r)
    return [Member(g, job, r, a, b) for (g, job), (a, b, r) in sorted(acc.items())]


def node_facts(jf, job: str, p: dict | None = None) -> NodeFacts:
    """:class:`NodeFacts` from the node stage's per-job facts (``analysis.analyze.JobFacts``,
    read by attribute: node, unc_ns (which includes ``clock_skew_ns``), gpu, start, end, res,
    lost, rank, culprit, sources, and ``extra`` with the keys ``addrs``, ``losses``, ``exits``,
    ``members`` as :func:`node_extra` makes them) for ``job``. Interval k is position k of
    ``jf`` (``jf.idx[k]`` in the node's part)."""
    p = params(p)
    sources = jf.sources
    ivs = []
    for k in range(len(jf.start)):
        src = sources[k] if bool(jf.culprit[k]) and k in sources else None
        links = tuple(zip(src.link_start.tolist(), src.link_end.tolist())) if src is not None else ()
        ivs.append(Interval(int(jf.gpu[k]), int(jf.start[k]), int(jf.end[k]), int(jf.res[k]), int(jf.lost[k]),
                            int(jf.rank[k]), job, links=links, basis=None if src is None else src.basis,
                            events=() if src is None else src, local=src is not None))
    extra = jf.extra or {}
    return NodeFacts(jf.node, tuple(extra.get("addrs", ())), int(jf.unc_ns) - int(p["clock_skew_ns"]), ivs,
                     list(extra.get("losses", ())), list(extra.get("exits", ())), list(extra.get("members", ())))


def node_extra(tables: dict, addrs=()) -> dict:
    """What the node stage keeps of a node for these causes (``JobFacts.extra``), from its
    tables (``net``, ``proc``, ``gpu_proc``) and its addresses (:func:`addrs_from_meta` of its
    batches, gathered)."""
    empty: dict = {}
    proc, gpu_proc = tables.get("proc") or empty, tables.get("gpu_proc") or empty
    addrs = sorted({a for a in (normalize_addr(x) for x in addrs) if a})
    return {"addrs": tuple(addrs), "losses": losses_from_tables(tables.get("net") or empty, proc),
            "exits": exits_from_tables(proc, gpu_proc if len(gpu_proc.get("pid", ())) else None),
            "members": members_from_tables(gpu_proc, proc)}


def addrs_from_meta(meta) -> tuple:
    """The node's addresses from a batch's meta (``meta.node.addrs``), canonical, sorted;
    () when absent or malformed (an older tracer)."""
    node = meta.get("node") if isinstance(meta, dict) else None
    addrs = node.get("addrs") if isinstance(node, dict) else None
    if not isinstance(addrs, (list, tuple)):
        return ()
    return tuple(sorted({a for a in (normalize_addr(x) for x in addrs[:256] if isinstance(x, str)) if a}))


def signal_name(status: int) -> str:
    """``SIGKILL``, ``SIGSEGV, core dumped``, ``code 3``, ``code 0`` or ``status unknown``
    for a wait(2) status."""
    if status < 0:
        return "status unknown"
    sig = status & 0x7F
    if not sig:
        return f"code {(status >> 8) & 0xFF}"
    try:
        name = _signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return name + (", core dumped" if status & 0x80 else "")
