"""GPU idle intervals, their owners, and which traced stall starved them: on numpy arrays.

This is the join DESIGN.md calls "Blame: the core semantics", kept free of sockets, BCC, NVML
and storage so it can be tested against a plain-Python reference and benchmarked alone
(``collector/analyze.py`` turns tracer batches into these arrays and verdicts back into dicts).

Conventions shared by every function here:

* times are wall-clock ns as ``int64``;
* a GPU is named by a *GPU key* ``node_id << 32 | gpu_index`` and a process by a *pid key*
  ``node_id << 32 | pid`` (:func:`gpu_key`, :func:`pid_key`), so one array covers all nodes;
* a stall is ``[start, start + dur)`` and belongs to the thread group ``pid`` (0 = unknown,
  never owned).

The steps, each one function:

1. :func:`find_idle`: NVML samples -> idle intervals.  A sample stamped ``ts`` covers
   ``(previous ts, ts]``; an interval runs from the last busy sample before a run of idle
   samples to the first busy sample after it, so its edges are as precise as the sample
   period, which travels with it (``res``).
2. :func:`owner_groups`: the processes NVML listed on the GPU around the interval, plus all
   their descendants (dataloader workers are children of the training process).  Intervals
   with the same owner set share an *owner group*, so a stall is matched against a group
   once, not against every interval.
3. :func:`align`: for each interval, the candidate stalls (owned, overlapping it, starting
   no later than its start plus the resolution), the share of the interval their union
   covers, the culprit (largest overlap, then earliest start) and the contributors.
4. :func:`remote_blame`: a rank that stalls makes every rank of the job idle at the next
   collective; an unexplained interval inherits the earliest-starting local culprit of an
   overlapping interval of the same job on another GPU, with the clock uncertainty stated.

Everything is vectorized (sorts, ``searchsorted`` range joins, ``reduceat``); Python loops
run only over GPUs, owner groups, duration classes and jobs, never over stalls or intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NODE_SHIFT = 32
_PID_MASK = (1 << NODE_SHIFT) - 1
_I64 = np.int64

#: idle means utilization strictly below this (percent)
IDLE_THRESHOLD = 5
#: an idle interval must last at least this many sample periods ...
MIN_PERIODS = 2
#: ... and at least this long
MIN_IDLE_NS = 200_000_000
#: a process NVML listed on a GPU within this much of an interval owns it
OWNER_SLACK_NS = 5_000_000_000
#: below this explained share, an interval gets no culprit ("unexplained")
MIN_EXPLAINED = 0.5
#: contributors listed per interval
MAX_CONTRIBUTORS = 10
#: max depth of a ppid chain followed for descendants
_MAX_DEPTH = 64


def gpu_key(node_id, gpu):
    """Key naming GPU ``gpu`` of node ``node_id`` (scalars or arrays)."""
    return (np.asarray(node_id, dtype=_I64) << NODE_SHIFT) | np.asarray(gpu, dtype=_I64)


def pid_key(node_id, pid):
    """Key naming process ``pid`` on node ``node_id`` (scalars or arrays)."""
    return (np.asarray(node_id, dtype=_I64) << NODE_SHIFT) | np.asarray(pid, dtype=_I64)


def key_node(key):
    """Node id of a GPU or pid key."""
    return np.asarray(key, dtype=_I64) >> NODE_SHIFT


def key_low(key):
    """GPU index or pid of a key."""
    return np.asarray(key, dtype=_I64) & _PID_MASK


def _i64(a):
    return np.ascontiguousarray(a, dtype=_I64)


def _group_starts(sorted_keys):
    """Start index of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _expand(lo, hi):
    """Every (i, j) with lo[i] <= j < hi[i], as two arrays ordered by i then j."""
    cnt = np.maximum(hi - lo, 0)
    total = int(cnt.sum())
    if total == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=_I64)
    i = np.repeat(np.arange(len(lo)), cnt)
    first = np.cumsum(cnt) - cnt
    j = np.arange(total, dtype=_I64) - np.repeat(first - lo, cnt)
    return i, j


def _bits(x: int) -> int:
    return max(int(x), 0).bit_length()


# --------------------------------------------------------------------------- 1. idle intervals

@dataclass
class Idle:
    """Idle intervals, one row per interval, ordered by (GPU key, start)."""

    key: np.ndarray         # GPU key
    start: np.ndarray       # ts of the last busy sample before the idle run
    end: np.ndarray         # ts of the first busy sample after it (last idle sample if open)
    res: np.ndarray         # sample period of the GPU: how precise start and end are
    open: np.ndarray        # bool: the data ends while the GPU is still idle
    open_start: np.ndarray  # bool: the data starts idle (start = first idle sample - period)
    n_idle: np.ndarray      # idle samples in the run
    n_synth: np.ndarray     # of which synthesized (driver buffer empty while processes ran)
    periods: dict = field(default_factory=dict)  # GPU key -> period used

    def __len__(self):
        return len(self.start)


def sample_period(ts) -> int:
    """Median positive spacing of sorted timestamps (0 when fewer than two)."""
    d = np.diff(_i64(ts))
    d = d[d > 0]
    return int(np.median(d)) if len(d) else 0


def find_idle(key, ts, util, synth=None, period=None, threshold=IDLE_THRESHOLD,
              min_periods=MIN_PERIODS, min_ns=MIN_IDLE_NS) -> Idle:
    """Idle intervals from utilization samples of any number of GPUs.

    ``key``/``ts``/``util``/``synth`` are one row per sample, any order (duplicates of a
    (key, ts) are dropped, the last kept).  ``period`` maps GPU key -> sample period in ns; a
    GPU missing from it or at 0 gets the median spacing of its own samples.  A run of samples
    with ``util < threshold`` becomes an interval when ``end - start`` is at least
    ``max(min_periods * period, min_ns)``.
    """
    key, ts = _i64(key), _i64(ts)
    util = np.asarray(util)
    synth = np.zeros(len(ts), dtype=bool) if synth is None else np.asarray(synth).astype(bool)
    period = period or {}
    if len(ts):
        same_order = (np.all(key[1:] >= key[:-1]) and
                      np.all((key[1:] != key[:-1]) | (ts[1:] > ts[:-1])))
        if not same_order:
            o = np.lexsort((np.arange(len(ts)), ts, key))
            key, ts, util, synth = key[o], ts[o], util[o], synth[o]
            last = np.r_[(key[1:] != key[:-1]) | (ts[1:] != ts[:-1]), True]
            key, ts, util, synth = key[last], ts[last], util[last], synth[last]

    starts = _group_starts(key)
    ends = np.r_[starts[1:], len(key)] if len(key) else starts
    per = np.zeros(len(key), dtype=_I64)
    periods = {}
    for a, b in zip(starts, ends):
        k = int(key[a])
        p = int(period.get(k, 0) or 0) or sample_period(ts[a:b])
        periods[k] = p
        per[a:b] = p

    idle = util < threshold
    same_prev = np.r_[False, key[1:] == key[:-1]]
    same_next = np.r_[key[1:] == key[:-1], False]
    idle_prev = np.r_[False, idle[:-1]]
    idle_next = np.r_[idle[1:], False]
    rs = np.flatnonzero(idle & ~(same_prev & idle_prev))
    re = np.flatnonzero(idle & ~(same_next & idle_next))
    open_start = ~same_prev[rs]
    start = np.where(open_start, ts[rs] - per[rs], ts[np.maximum(rs - 1, 0)])
    is_open = ~same_next[re]
    end = np.where(is_open, ts[re], ts[np.minimum(re + 1, len(ts) - 1)])
    csyn = np.r_[0, np.cumsum(synth, dtype=_I64)]
    n_synth = csyn[re + 1] - csyn[rs]
    res = per[rs]
    keep = (end - start) >= np.maximum(min_periods * res, min_ns)
    return Idle(key[rs][keep], start[keep], end[keep], res[keep], is_open[keep],
                open_start[keep], (re - rs + 1)[keep], n_synth[keep], periods)


# --------------------------------------------------------------------------- 2. owners

@dataclass
class Owners:
    """Owner groups: the set of (node, pid) owning each interval, interned."""

    group: np.ndarray                              # per interval; -1: no process seen on the GPU
    node: list = field(default_factory=list)       # per group: node id
    roots: list = field(default_factory=list)      # per group: sorted pids NVML listed
    members: list = field(default_factory=list)    # per group: sorted roots + descendants
    pair_key: np.ndarray = None                    # (pid key, group) for every member
    pair_group: np.ndarray = None


def _lineage(pid, ppid):
    """(sorted unique pids, ancestor matrix): row i is pid i, its parent, grandparent, ... 0."""
    pid, ppid = _i64(pid), _i64(ppid)
    o = np.lexsort((np.arange(len(pid)), pid))
    pid, ppid = pid[o], ppid[o]
    last = np.r_[pid[1:] != pid[:-1], True] if len(pid) else np.empty(0, bool)
    pid, ppid = pid[last], ppid[last]  # a pid reported twice: the later row wins
    cols = [pid]
    cur = ppid.copy()
    for _ in range(_MAX_DEPTH):
        if not np.any(cur):
            break
        cols.append(cur)
        j = np.searchsorted(pid, cur)
        j = np.minimum(j, len(pid) - 1)
        known = (pid[j] == cur) & (cur != 0)
        nxt = np.where(known, ppid[j], 0)
        nxt[nxt == cur] = 0  # a pid that is its own parent (pid 0/1 quirks) ends the chain
        cur = nxt
    return pid, np.stack(cols, axis=1)


def descendants(roots, lineage):
    """Sorted ``roots`` plus every pid whose ancestor chain passes through one of them."""
    roots = np.unique(_i64(roots))
    roots = roots[roots != 0]
    pid, anc = lineage
    if len(pid) == 0 or len(roots) == 0:
        return roots
    hit = np.isin(anc, roots).any(axis=1)
    return np.union1d(roots, pid[hit])


def owner_groups(iv_key, iv_start, iv_end, gp_key, gp_ts, gp_pid, proc_node, proc_pid,
                 proc_ppid, slack_ns=OWNER_SLACK_NS) -> Owners:
    """Owner group of each interval.

    The roots of interval i on GPU k are the pids with a ``gpu_proc`` row (``gp_*``: GPU
    key, time, pid) for k within ``[start - slack, end + slack]``; the owners are the roots and
    their descendants per the node's lineage (``proc_*``).  Computed without visiting each
    interval: a pid's rows on a GPU are merged into presence spans (split at gaps over
    ``2 * slack``, so "a row inside the window" == "the window meets a span"), and the set of
    spans a window meets is fixed by two counts (spans starting before the window ends, spans
    ending before it starts), which intervals share.
    """
    iv_key, iv_start, iv_end = _i64(iv_key), _i64(iv_start), _i64(iv_end)
    n = len(iv_key)
    out = Owners(group=np.full(n, -1, dtype=_I64))
    gp_key, gp_ts, gp_pid = _i64(gp_key), _i64(gp_ts), _i64(gp_pid)
    nz = gp_pid != 0
    gp_key, gp_ts, gp_pid = gp_key[nz], gp_ts[nz], gp_pid[nz]
    if n == 0 or len(gp_key) == 0:
        out.pair_key, out.pair_group = np.empty(0, _I64), np.empty(0, _I64)
        return out

    o = np.lexsort((gp_ts, gp_pid, gp_key))
    k, p, t = gp_key[o], gp_pid[o], gp_ts[o]
    new = np.r_[True, (k[1:] != k[:-1]) | (p[1:] != p[:-1]) | (t[1:] - t[:-1] > 2 * slack_ns)]
    si = np.flatnonzero(new)
    sp_key, sp_pid, sp_start = k[si], p[si], t[si]
    sp_end = t[np.r_[si[1:] - 1, len(t) - 1]]

    proc_node, proc_pid, proc_ppid = _i64(proc_node), _i64(proc_pid), _i64(proc_ppid)
    lineages = {}
    interned = {}
    w_lo, w_hi = iv_start - slack_ns, iv_end + slack_ns
    iv_order = np.argsort(iv_key, kind="stable")
    iv_sorted = iv_key[iv_order]
    sp_groups = _group_starts(sp_key)
    for a, b in zip(sp_groups, np.r_[sp_groups[1:], len(sp_key)]):
        gk = sp_key[a]
        i0, i1 = np.searchsorted(iv_sorted, [gk, gk + 1])
        if i0 == i1:
            continue
        ivs = iv_order[i0:i1]
        s_start, s_end, s_pid = sp_start[a:b], sp_end[a:b], sp_pid[a:b]
        n_started = np.searchsorted(np.sort(s_start), w_hi[ivs], side="right")
        n_ended = np.searchsorted(np.sort(s_end), w_lo[ivs], side="left")
        code = n_started * (b - a + 1) + n_ended
        _u, first, inv = np.unique(code, return_index=True, return_inverse=True)
        gids = np.full(len(first), -1, dtype=_I64)
        node = int(gk >> NODE_SHIFT)
        for j, f in enumerate(first):
            lo_, hi_ = w_lo[ivs[f]], w_hi[ivs[f]]
            roots = np.unique(s_pid[(s_start <= hi_) & (s_end >= lo_)])
            if len(roots) == 0:
                continue
            if node not in lineages:
                m = proc_node == node
                lineages[node] = _lineage(proc_pid[m], proc_ppid[m])
            members = descendants(roots, lineages[node])
            ident = (node, members.tobytes())
            gid = interned.get(ident)
            if gid is None:
                gid = interned[ident] = len(out.node)
                out.node.append(node)
                out.roots.append(roots)
                out.members.append(members)
            elif not np.array_equal(roots, out.roots[gid]):
                out.roots[gid] = np.union1d(out.roots[gid], roots)  # same owners, more listed
            gids[j] = gid
        out.group[ivs] = gids[inv.ravel()]

    if out.members:
        out.pair_key = np.concatenate([pid_key(nd, m) for nd, m in zip(out.node, out.members)])
        out.pair_group = np.concatenate([np.full(len(m), g, dtype=_I64)
                                         for g, m in enumerate(out.members)])
    else:
        out.pair_key, out.pair_group = np.empty(0, _I64), np.empty(0, _I64)
    return out


# --------------------------------------------------------------------------- 3. alignment

@dataclass
class Alignment:
    """Per interval (same order as the input): what explains it."""

    explained: np.ndarray        # |union of candidate stalls ∩ interval| / interval length
    union_ns: np.ndarray         # that union, ns
    n_candidates: np.ndarray
    best: np.ndarray             # stall index with the largest overlap (-1: no candidate)
    best_overlap: np.ndarray
    culprit: np.ndarray          # = best when explained >= min_explained, else -1
    contrib_ptr: np.ndarray      # CSR over intervals: contributors of i are [ptr[i], ptr[i+1])
    contrib_stall: np.ndarray
    contrib_overlap: np.ndarray


def _owned_stalls(st_key, pair_key, pair_group):
    """(stall index, group) for every stall whose pid key is an owner, stall indexes ascending.

    Per node, a dense pid -> slot table replaces a binary search per stall (10M random
    ``searchsorted`` calls cost seconds; a gather costs tens of ms).
    """
    ns = len(st_key)
    empty = (np.empty(0, _I64), np.empty(0, _I64))
    if ns == 0 or len(pair_key) == 0:
        return empty
    st_node = st_key >> NODE_SHIFT
    node_sorted = bool(np.all(st_node[1:] >= st_node[:-1]))
    order = None if node_sorted else np.argsort(st_node, kind="stable")
    sn = st_node if node_sorted else st_node[order]
    po = np.lexsort((pair_group, pair_key))
    pk, pg = pair_key[po], pair_group[po]
    pnode = pk >> NODE_SHIFT
    out_s, out_g = [], []
    for a, b in zip(_group_starts(pnode), np.r_[_group_starts(pnode)[1:], len(pk)]):
        node = pnode[a]
        s0, s1 = np.searchsorted(sn, [node, node + 1])
        if s0 == s1:
            continue
        pids = pk[a:b] & _PID_MASK
        groups = pg[a:b]
        ustart = _group_starts(pids)
        upid = pids[ustart]
        ucnt = np.diff(np.r_[ustart, len(pids)])
        top = int(upid[-1])
        table = np.full(top + 2, -1, dtype=np.int32)
        table[upid] = np.arange(len(upid), dtype=np.int32)
        idx = np.arange(s0, s1) if order is None else order[s0:s1]
        spid = st_key[idx] & _PID_MASK
        slot = table[np.minimum(spid, top + 1)]
        hit = np.flatnonzero(slot >= 0)
        slot = slot[hit]
        if np.all(ucnt == 1):
            out_s.append(idx[hit])
            out_g.append(groups[ustart[slot]])
        else:
            c = ucnt[slot]
            rep, j = _expand(ustart[slot], ustart[slot] + c)
            out_s.append(idx[hit][rep])
            out_g.append(groups[j])
    if not out_s:
        return empty
    s, g = np.concatenate(out_s), np.concatenate(out_g)
    if not (node_sorted and np.all(s[1:] >= s[:-1])):
        o = np.argsort(s, kind="stable")
        s, g = s[o], g[o]
    return s.astype(_I64), g


def align(iv_start, iv_end, iv_res, iv_group, st_start, st_dur, st_key, pair_key, pair_group,
          min_explained=MIN_EXPLAINED, max_contributors=MAX_CONTRIBUTORS) -> Alignment:
    """Match stalls to idle intervals.

    Intervals: ``iv_start``, ``iv_end``, ``iv_res`` (resolution), ``iv_group`` (owner group,
    -1 = none).  Stalls: ``st_start``, ``st_dur``, ``st_key`` (pid key).  Owners: pairs
    (``pair_key``, ``pair_group``) from :func:`owner_groups`.

    A stall is a candidate for interval i when its pid key is in i's owner group, it overlaps
    i (positive overlap) and it starts no later than ``start + res``.  The culprit is the
    candidate with the largest overlap, ties to the earliest start, then the lowest stall
    index; it stands only when the union of all candidates covers at least ``min_explained``
    of the interval.  Contributors: the other candidates (all of them when there is no
    culprit) by overlap, largest first, at most ``max_contributors``.
    """
    iv_start, iv_end, iv_res, iv_group = map(_i64, (iv_start, iv_end, iv_res, iv_group))
    st_start, st_dur, st_key = map(_i64, (st_start, st_dur, st_key))
    n = len(iv_start)
    res_out = Alignment(np.zeros(n), np.zeros(n, _I64), np.zeros(n, _I64),
                        np.full(n, -1, _I64), np.zeros(n, _I64), np.full(n, -1, _I64),
                        np.zeros(n + 1, _I64), np.empty(0, _I64), np.empty(0, _I64))
    ex_stall, ex_group = _owned_stalls(st_key, _i64(pair_key), _i64(pair_group))
    pos_dur = st_dur[ex_stall] > 0                    # an empty span overlaps nothing
    ex_stall, ex_group = ex_stall[pos_dur], ex_group[pos_dur]
    has_owner = iv_group >= 0
    if len(ex_stall) == 0 or not np.any(has_owner):
        return res_out

    # owned stalls sorted by start (ties: stall index), then partitioned, stably, into buckets
    # of one owner group and one duration class (durations within 4x), so that a range search
    # by start bounded below by the bucket's running max end wastes little
    t_ex = st_start[ex_stall]
    o = np.argsort(t_ex, kind="stable")
    ex_stall, ex_group, t_ex = ex_stall[o], ex_group[o], t_ex[o]
    trank = np.arange(len(ex_stall), dtype=_I64)      # order by (start, stall index)
    d_ex = st_dur[ex_stall]
    _m, e2 = np.frexp(np.maximum(d_ex, 1).astype(np.float64))
    cls = (e2 // 2).astype(_I64)
    ucls, cls = np.unique(cls, return_inverse=True)
    bucket = ex_group * len(ucls) + cls.ravel()
    ub, bucket = np.unique(bucket, return_inverse=True)
    bucket = bucket.ravel()
    bdt = np.int16 if len(ub) < (1 << 15) else (np.int32 if len(ub) < (1 << 31) else _I64)
    o = np.argsort(bucket.astype(bdt), kind="stable")
    ex_stall, t_ex, d_ex, trank = ex_stall[o], t_ex[o], d_ex[o], trank[o]
    end_ex = t_ex + d_ex
    b_start = np.searchsorted(bucket[o], np.arange(len(ub)))
    b_end = np.r_[b_start[1:], len(ex_stall)]
    b_group = ub // len(ucls)

    # intervals sorted by (group, start); qp = position in that order
    ivo = np.flatnonzero(has_owner)
    ivo = ivo[np.lexsort((iv_start[ivo], iv_group[ivo]))]
    q_group = iv_group[ivo]
    q_s = iv_start[ivo]
    q_hi = np.minimum(iv_start[ivo] + iv_res[ivo], iv_end[ivo] - 1)
    g_lo = np.searchsorted(q_group, b_group, side="left")
    g_hi = np.searchsorted(q_group, b_group, side="right")

    qs, los, his = [], [], []
    for bi in range(len(ub)):
        a, b = b_start[bi], b_end[bi]
        ga, gb = g_lo[bi], g_hi[bi]
        if ga == gb:
            continue
        cm = np.maximum.accumulate(end_ex[a:b])
        lo = a + np.searchsorted(cm, q_s[ga:gb], side="right")   # first whose running end > s
        hi = a + np.searchsorted(t_ex[a:b], q_hi[ga:gb], side="right")
        m = hi > lo
        if np.any(m):
            qs.append(np.arange(ga, gb, dtype=_I64)[m])
            los.append(lo[m])
            his.append(hi[m])
    if not qs:
        return res_out
    qsel, pos = _expand(np.concatenate(los), np.concatenate(his))
    qp = np.concatenate(qs)[qsel]
    keep = end_ex[pos] > q_s[qp]
    qp, pos = qp[keep], pos[keep]
    if len(qp) == 0:
        return res_out

    # pairs by (interval, start): the sweep below needs clipped starts in order
    tr = trank[pos]
    if _bits(len(ivo)) + _bits(len(trank)) <= 62:
        o = np.argsort((qp << _bits(len(trank))) | tr, kind="stable")
    else:
        o = np.lexsort((tr, qp))
    qp, pos, tr = qp[o], pos[o], tr[o]
    iv = ivo[qp]
    s, e = iv_start[iv], iv_end[iv]
    cs = np.maximum(t_ex[pos], s)
    ce = np.minimum(end_ex[pos], e)
    ov = ce - cs
    gs = _group_starts(qp)
    gcount = np.diff(np.r_[gs, len(qp)])
    gid = np.repeat(np.arange(len(gs)), gcount)
    g_iv = iv[gs]
    g_len = np.maximum(iv_end[g_iv] - iv_start[g_iv], 1)

    # union of [cs, ce) per interval: a running max of ends that restarts at each interval,
    # done as one cumulative max over ends shifted by per-interval offsets (chunked so the
    # offsets stay inside int64)
    union = np.zeros(len(gs), dtype=_I64)
    rel_s, rel_e = cs - s, ce - s
    span = g_len + 1
    limit = 1 << 61
    c0 = 0
    while c0 < len(gs):
        cum = np.cumsum(span[c0:])
        c1 = c0 + max(1, int(np.searchsorted(cum, limit, side="right")))
        off_g = np.r_[0, cum[: c1 - c0 - 1]]
        p0, p1 = gs[c0], (gs[c1] if c1 < len(gs) else len(qp))
        off = np.repeat(off_g, gcount[c0:c1])
        v = rel_e[p0:p1] + off
        run = np.maximum.accumulate(v)
        prev = np.r_[0, run[:-1]]
        first = gs[c0:c1] - p0
        prev[first] = off_g
        contrib = np.maximum(v - np.maximum(rel_s[p0:p1] + off, prev), 0)
        union[c0:c1] = np.add.reduceat(contrib, first)
        c0 = c1

    # best candidate: largest overlap; pairs are in (start, index) order within an interval,
    # so the first maximum is the earliest
    gmax = np.maximum.reduceat(ov, gs)
    is_max = np.flatnonzero(ov == gmax[gid])
    best_pair = is_max[np.r_[True, gid[is_max][1:] != gid[is_max][:-1]]]
    explained = np.minimum(union / g_len, 1.0)
    has_culprit = explained >= min_explained

    res_out.explained[g_iv] = explained
    res_out.union_ns[g_iv] = union
    res_out.n_candidates[g_iv] = gcount
    res_out.best[g_iv] = ex_stall[pos[best_pair]]
    res_out.best_overlap[g_iv] = ov[best_pair]
    res_out.culprit[g_iv[has_culprit]] = ex_stall[pos[best_pair[has_culprit]]]

    # contributors: rank candidates by (overlap desc, start, index); rank 0 is the best
    if max_contributors > 0:
        listed = gcount >= np.where(has_culprit, 2, 1)  # anything besides the culprit?
        sel = np.flatnonzero(np.repeat(listed, gcount))
        qsub, ovsub = qp[sel], ov[sel]
        ob = _bits(int(ovsub.max()) if len(ovsub) else 0) + 1
        if _bits(int(qsub.max()) if len(qsub) else 0) + ob <= 62:
            top = (1 << ob) - 1
            o = np.argsort((qsub << ob) | (top - ovsub), kind="stable")
        else:
            o = np.lexsort((tr[sel], -ovsub, qsub))
        sel = sel[o]
        gsel = gid[sel]
        first = _group_starts(gsel)
        rank = np.arange(len(sel)) - np.repeat(first, np.diff(np.r_[first, len(sel)]))
        skip = has_culprit[gsel].astype(_I64)       # a culprit is not its own contributor
        take = (rank >= skip) & (rank < skip + max_contributors)
        sel, gsel, rank = sel[take], gsel[take], rank[take]
        civ = g_iv[gsel]
        o = np.lexsort((rank, civ))
        sel, civ = sel[o], civ[o]
        res_out.contrib_stall = ex_stall[pos[sel]]
        res_out.contrib_overlap = ov[sel]
        res_out.contrib_ptr = np.r_[0, np.cumsum(np.bincount(civ, minlength=n))].astype(_I64)
    return res_out


# --------------------------------------------------------------------------- 4. across nodes

def _range_join(item_start, item_end, q_lo, q_hi):
    """Pairs (query, item) with item_start < q_hi and item_end > q_lo; items sorted by start."""
    if len(item_start) == 0 or len(q_lo) == 0:
        return np.empty(0, np.intp), np.empty(0, _I64)
    cm = np.maximum.accumulate(item_end)
    lo = np.searchsorted(cm, q_lo, side="right")
    hi = np.searchsorted(item_start, q_hi, side="left")
    q, j = _expand(lo, hi)
    keep = item_end[j] > q_lo[q]
    return q[keep], j[keep]


def remote_blame(iv_key, iv_job, iv_start, iv_end, iv_res, culprit, st_start, st_dur,
                 node_unc, same_node=True):
    """Carry local culprits to the other ranks of a job that idled at the same time.

    For each interval without a culprit whose job is known (``iv_job >= 0``), look at the
    intervals of the same job on other GPUs that have a local ``culprit`` (a stall index) and
    keep those where, within the clock uncertainty ``u`` between the two nodes (``node_unc``
    indexed by node id, summed; 0 on one node), the two idle intervals overlap and the culprit
    stall overlaps the target interval and starts no later than its start + resolution.  The
    one whose stall starts first wins (ties: lowest interval index).  Other GPUs of the same
    node count too unless ``same_node`` is false.

    Returns ``(source, uncertainty)``: per interval the index of the interval whose culprit it
    inherits (-1 if none) and ``u`` for that pair.
    """
    iv_key, iv_job, iv_start, iv_end, iv_res, culprit = map(
        _i64, (iv_key, iv_job, iv_start, iv_end, iv_res, culprit))
    st_start, st_dur, node_unc = _i64(st_start), _i64(st_dur), _i64(node_unc)
    n = len(iv_key)
    src = np.full(n, -1, dtype=_I64)
    unc = np.zeros(n, dtype=_I64)
    node = iv_key >> NODE_SHIFT
    has = culprit >= 0
    for job in np.unique(iv_job[iv_job >= 0]):
        inj = iv_job == job
        S = np.flatnonzero(inj & has)
        T = np.flatnonzero(inj & ~has)
        if len(S) == 0 or len(T) == 0:
            continue
        S = S[np.argsort(iv_start[S], kind="stable")]
        umax = 2 * int(max(node_unc[node[S]].max(), node_unc[node[T]].max()))
        qi, j = _range_join(iv_start[S], iv_end[S], iv_start[T] - umax, iv_end[T] + umax)
        t, s = T[qi], S[j]
        diff_node = node[s] != node[t]
        u = np.where(diff_node, node_unc[node[s]] + node_unc[node[t]], 0)
        ct = st_start[culprit[s]]
        cd = st_dur[culprit[s]]
        ok = ((iv_key[s] != iv_key[t]) & (diff_node | same_node)
              & (iv_start[s] < iv_end[t] + u) & (iv_end[s] > iv_start[t] - u)
              & (ct < iv_end[t] + u) & (ct + cd > iv_start[t] - u)
              & (ct <= iv_start[t] + iv_res[t] + u))
        t, s, u, ct = t[ok], s[ok], u[ok], ct[ok]
        if len(t) == 0:
            continue
        o = np.lexsort((s, ct, t))
        t, s, u = t[o], s[o], u[o]
        f = _group_starts(t)
        src[t[f]] = s[f]
        unc[t[f]] = u[f]
    return src, unc
