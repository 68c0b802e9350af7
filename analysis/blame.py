"""GPU idle intervals, their owners, and which traced stall starved them: on numpy arrays.

This is the join DESIGN.md calls "Blame: the core semantics", kept free of sockets, BCC, NVML
and storage so it can be tested against a plain-Python reference and benchmarked alone
(``analysis/analyze.py`` turns tracer batches into these arrays and the results into typed
verdicts).

Conventions shared by every function here:

* times are wall-clock ns as ``int64``;
* a GPU is named by a *GPU key* ``node_id << 32 | gpu_index`` and a process by a *pid key*
  ``node_id << 32 | pid`` (:func:`gpu_key`, :func:`pid_key`), so one array covers all nodes;
* a stall is ``[start, start + dur)`` and belongs to the thread group ``pid`` (0 = unknown,
  never owned).

The steps, each one function:

1. :func:`find_idle`: NVML samples -> idle intervals.  A sample carries ``(100 - util)%`` of
   its window as idle time; a run of mostly idle samples (and missing ones) is an interval
   whose edges lie inside the straddling samples, proportionally, and whose *lost* time is
   the idle its samples carry.  The sample period travels with it (``res``).
2. :func:`owner_groups`: the processes NVML listed on the GPU around the interval, plus all
   their descendants (dataloader workers are children of the training process).  Intervals
   with the same owner set share an *owner group*, so a stall is matched against a group
   once, not against every interval.
3. :func:`align`: for each interval, the candidate stalls (owned, overlapping it, the set
   beginning within one resolution of its start and extended by stalls back to back with
   it), the share of the lost time their union covers, the chains (one process's stalls of
   one kind), the culprit chain and the contributors; scheduler rows only as a backstop.
4. :func:`remote_blame`: a rank that stalls makes every rank of the job idle at the next
   collective; an unexplained interval inherits the earliest-starting local culprit of an
   overlapping interval of the same job on another GPU, with the clock uncertainty stated.

Everything is vectorized (sorts, ``searchsorted`` range joins, ``reduceat``); Python loops
run only over nodes, GPUs, distinct owner sets, (owner group x duration class) buckets,
alignment passes and jobs, never over stalls or intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NODE_SHIFT = 32
_PID_MASK = (1 << NODE_SHIFT) - 1
_I64 = np.int64

#: a sample below this utilization (percent) is fully idle
IDLE_THRESHOLD = 5
#: a sample below this is mostly idle: it joins an idle run (its busy share inside it)
PARTIAL_THRESHOLD = 50
#: an idle interval must last at least this many sample periods ...
MIN_PERIODS = 1.5
#: ... and at least this long
MIN_IDLE_NS = 200_000_000
#: consecutive samples of a GPU further apart than this are a hole in the data (tracer down),
#: not a stretch of idleness: the sampler fills idle stretches of owned GPUs itself
MAX_GAP_NS = 30_000_000_000
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
    start: np.ndarray       # where the idle run begins (inside its straddling sample)
    end: np.ndarray         # where it ends (last sample's ts if open)
    res: np.ndarray         # sample period of the GPU: how precise start and end are
    open: np.ndarray        # bool: the samples stop (end of data or a hole) while idle, so
                            # the true end is later; end = last idle sample
    open_start: np.ndarray  # bool: the samples start (or resume) idle; start = first idle
                            # sample - period
    n_idle: np.ndarray      # samples in the run
    n_synth: np.ndarray     # of which synthesized (driver buffer empty while processes ran)
    lost: np.ndarray = None  # idle time the samples carry inside [start, end): the GPU time lost
    periods: dict = field(default_factory=dict)  # GPU key -> period used

    def __len__(self):
        return len(self.start)


def sample_period(ts) -> int:
    """Median positive spacing of sorted timestamps (0 when fewer than two)."""
    d = np.diff(_i64(ts))
    d = d[d > 0]
    return int(np.median(d)) if len(d) else 0


def find_idle(key, ts, util, synth=None, period=None, threshold=IDLE_THRESHOLD,
              partial_threshold=PARTIAL_THRESHOLD, min_periods=MIN_PERIODS, min_ns=MIN_IDLE_NS,
              max_gap_ns=MAX_GAP_NS) -> Idle:
    """Idle intervals from utilization samples of any number of GPUs.

    ``key``/``ts``/``util``/``synth`` are one row per sample, any order (duplicates of a
    (key, ts) are dropped, the last kept).  ``period`` maps GPU key -> sample period ``p`` in
    ns; a GPU missing from it or at 0 gets the median spacing of its own samples.

    A sample stamped ``ts`` covers ``(ts - d, ts]`` and carries ``d * (100 - util) // 100`` ns
    of idle time: ``d`` is the spacing to the previous sample, or ``p`` when that spacing is
    over ``1.5 p`` (samples missing: the driver records nothing while the GPU idles), and then
    the time before the sample's window is a *gap*, idle.  Samples more than
    ``max(max_gap_ns, 3 p)`` apart bound a hole in the data instead; the first sample after
    one covers ``p``.  In time order,
    the *elements* of a stretch without holes are its gaps and samples; a gap or a sample
    below ``partial_threshold`` is *low*, below ``threshold`` (or a gap) *full*.  A run is a
    maximal sequence of low elements:

    * start: a partial (low, not full) first element holds the start, its idle at its end;
      otherwise the sample before the run adds its idle (at its end), half of it when that
      sample also ends the previous run (whose last element is full); none: ``open_start``;
    * end: a partial last element holds the end, its idle at its start; otherwise the sample
      after adds its idle (at its start), the other half when shared; none: ``open``, end =
      the last sample;
    * a run of one partial sample holds only one edge: its idle lies toward the neighbour
      with more idle (the next one on ties), which adds its own as above;
    * ``lost`` = the idle of the run's elements plus those edge shares.

    A run becomes an interval when ``end - start >= max(min_periods * p, min_ns)``.
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

    # whole GPUs in passes of about _IDLE_CHUNK samples: temporaries stay small, in cache
    parts, lo = [], 0
    for b in ends:
        if b - lo >= _IDLE_CHUNK or b == len(key):
            parts.append(_idle_runs(key[lo:b], ts[lo:b], util[lo:b], synth[lo:b], per[lo:b],
                                    threshold, partial_threshold, min_periods, min_ns, max_gap_ns))
            lo = b
    if not parts:
        e = np.empty(0, dtype=_I64)
        return Idle(e, e, e, e, e.astype(bool), e.astype(bool), e, e, e, periods)
    cols = [np.concatenate(c) for c in zip(*parts)]
    return Idle(*cols, periods)  # type: ignore[call-arg, arg-type]  # the array fields, in order


#: samples per pass of find_idle
_IDLE_CHUNK = 1 << 18


def _idle_runs(key, ts, util, synth, per, threshold, partial_threshold, min_periods, min_ns,
               max_gap_ns):
    """find_idle on whole GPUs' sorted samples, ``per`` the period of each: the Idle columns
    before ``periods``."""
    n = len(ts)
    u = np.clip(util, 0, 100).astype(np.int16)
    dt = np.zeros(n, dtype=_I64)
    np.subtract(ts[1:], ts[:-1], out=dt[1:])
    cont = np.r_[False, (key[1:] == key[:-1]) & (dt[1:] <= np.maximum(max_gap_ns, 3 * per[1:]))]
    # a spacing over 1.5 periods: samples missing (a gap, idle); under it, jitter: the sample
    # covers the whole spacing
    has_gap = cont & (2 * (dt - per) > per)
    gk = np.flatnonzero(has_gap)                       # gaps are few: kept sparse
    gval = dt[gk] - per[gk]
    d = dt                                             # (in place: fresh big arrays are slow)
    np.copyto(d, per, where=has_gap | ~cont)
    idle = np.multiply(d, 100 - u, dtype=_I64)
    np.floor_divide(idle, 100, out=idle)
    full = u < threshold
    low = u < max(partial_threshold, threshold)
    partial = low & ~full

    def gap_of(k):
        """The gap before samples ``k`` (0 where none)."""
        j = np.minimum(np.searchsorted(gk, k), max(len(gk) - 1, 0))
        return np.where(has_gap[k], gval[j] if len(gk) else 0, 0)

    # elements in time order: gap k (when there is one) then sample k, keys 2k and 2k + 1
    low_prev = np.r_[False, low[:-1]]
    gap_next = np.r_[has_gap[1:], False]
    cont_next = np.r_[cont[1:], False]
    low_next = np.r_[low[1:], False]
    starts = np.zeros(2 * n, dtype=bool)
    starts[0::2] = has_gap & ~low_prev
    starts[1::2] = low & ~has_gap & ~(cont & low_prev)
    ends = np.zeros(2 * n, dtype=bool)
    ends[0::2] = has_gap & ~low
    ends[1::2] = low & ~gap_next & ~(cont_next & low_next)
    ks, ke = np.flatnonzero(starts), np.flatnonzero(ends)
    k0, k1 = ks >> 1, ke >> 1
    s_is, e_is = (ks & 1).astype(bool), (ke & 1).astype(bool)     # a sample (else a gap)
    f_b = np.where(s_is, ts[k0], ts[k0] - d[k0])                  # first element's end ...
    g_k0, g_k1 = gap_of(k0), gap_of(k1)
    f_len = np.where(s_is, d[k0], g_k0)
    f_idle = np.where(s_is, idle[k0], g_k0)
    l_b = np.where(e_is, ts[k1], ts[k1] - d[k1])
    l_len = np.where(e_is, d[k1], g_k1)
    l_idle = np.where(e_is, idle[k1], g_k1)

    # the edge samples: a partial first element holds the start (its idle at its end), a
    # partial last one the end (its idle at its start); a run of one partial sample turns
    # its idle toward the neighbour with more idle (the next one on ties)
    has_before = ~s_is | cont[k0]
    kb = np.maximum(k0 - 1, 0)                                    # the sample before
    has_after = ~e_is | cont_next[k1]
    ka = np.minimum(np.where(e_is, k1 + 1, k1), max(n - 1, 0))    # the sample after
    x, y = idle[kb], idle[ka]
    single = (ks == ke) & s_is & partial[k0]
    at_end = np.where(has_after, y, 0) >= np.where(has_before, x, 0)
    f_part = s_is & partial[k0] & ~(single & ~at_end)
    l_part = e_is & partial[k1] & ~(single & at_end)

    # start edge: otherwise the sample before adds its idle, half of it when it also ends the
    # previous run (whose last element is full)
    shared_b = has_before & (has_gap[kb] | (cont[kb] & full[np.maximum(kb - 1, 0)]))
    pre = np.where(~f_part & has_before, np.where(shared_b, x - x // 2, x), 0)
    start = np.where(f_part, f_b - f_idle, f_b - f_len - pre)
    open_start = ~f_part & ~has_before

    # end edge, the same way round
    shared_a = has_after & (gap_next[ka] | (cont_next[ka] & full[np.minimum(ka + 1, max(n - 1, 0))]))
    post = np.where(~l_part & has_after, np.where(shared_a, y // 2, y), 0)
    end = np.where(l_part, l_b - l_len + l_idle, l_b + post)
    is_open = ~l_part & ~has_after

    # samples s0 .. s1 of the run, gaps g0 .. g1
    s0, s1 = ks >> 1, (ke - 1) >> 1
    g0, g1 = (ks + 1) >> 1, ke >> 1
    cidle = np.cumsum(idle, out=idle)                  # idle is not needed any more
    lost = cidle[s1] - np.where(s0 > 0, cidle[np.maximum(s0 - 1, 0)], 0) + pre + post
    if len(gk):
        cgap = np.r_[0, np.cumsum(gval)]
        lost += cgap[np.searchsorted(gk, g1, side="right")] - cgap[np.searchsorted(gk, g0)]
    if synth.any():
        csyn = np.r_[0, np.cumsum(synth, dtype=_I64)]
        n_synth = csyn[s1 + 1] - csyn[s0]
    else:
        n_synth = np.zeros(len(ks), dtype=_I64)
    res = per[k0]
    keep = (end - start) >= np.maximum(np.ceil(min_periods * res).astype(_I64), min_ns)
    return (key[k0][keep], start[keep], end[keep], res[keep], is_open[keep], open_start[keep],
            (s1 - s0 + 1)[keep], n_synth[keep], lost[keep])


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


def lineage(pid, ppid):
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
    interned = {}      # (node, members) -> group
    by_roots = {}      # (node, roots) -> group: descendants computed once per root set
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
            gid = by_roots.get((node, roots.tobytes()))
            if gid is not None:
                gids[j] = gid
                continue
            if node not in lineages:
                m = proc_node == node
                lineages[node] = lineage(proc_pid[m], proc_ppid[m])
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
            by_roots[(node, roots.tobytes())] = gid
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
    """Per interval (same order as the input): what explains it.

    A *chain* is one owner process's candidate stalls of one kind (``st_kind``) in the
    interval: blocked through stalls back to back (write then fsync, read after read)."""

    explained: np.ndarray        # |union of candidate stalls ∩ interval| / idle time lost
    union_ns: np.ndarray         # that union, ns
    n_candidates: np.ndarray     # candidate stalls
    best: np.ndarray             # the top chain's representative stall (largest overlap; -1: none)
    best_overlap: np.ndarray     # that stall's overlap
    culprit: np.ndarray          # = best when explained >= min_explained, else -1
    contrib_ptr: np.ndarray      # CSR over intervals: contributors of i are [ptr[i], ptr[i+1])
    contrib_stall: np.ndarray    # other chains, ranked: representative stall
    contrib_overlap: np.ndarray  # ... and the chain's coverage of the interval
    best_cover: np.ndarray = None    # the top chain's coverage of the interval (union), ns
    best_start: np.ndarray = None    # its first stall's start
    best_end: np.ndarray = None      # its last end
    chain_ptr: np.ndarray = None     # CSR over intervals: the top chain's stalls, by start
    chain_stall: np.ndarray = None
    chain_overlap: np.ndarray = None
    basis: np.ndarray = None         # 0: no culprit, 1: specific stalls, 2: backstop needed


def _dense(codes):
    """Small non-negative ints -> (dense ids 0..k-1 in value order, value of each id)."""
    present = np.flatnonzero(np.bincount(codes))
    lut = np.zeros(int(present[-1]) + 1 if len(present) else 1, dtype=_I64)
    lut[present] = np.arange(len(present))
    return lut[codes], present


def _small_int(a, n):
    """``a`` (values in [0, n)) in the narrowest dtype, so a stable argsort is a radix sort."""
    return a.astype(np.int16 if n < (1 << 15) else (np.int32 if n < (1 << 31) else _I64))


def _sort_key(major, minor, minor_max):
    """One int64 key ordering by (major, minor), or None if it would not fit."""
    b = _bits(minor_max)
    if _bits(int(major.max()) if len(major) else 0) + b > 62:
        return None
    return (major << b) | minor


def _order(major, minor, minor_max):
    """Stable order by (major, minor), minor >= 0."""
    k = _sort_key(major, minor, minor_max)
    return np.argsort(k, kind="stable") if k is not None else np.lexsort((minor, major))


def _prev_max(gs, gcount, vals, span):
    """For elements in groups (``gs`` starts, ``gcount`` sizes; ``0 <= vals <= span[g]``), the
    max of ``vals`` over the earlier elements of the same group (0 for a group's first).

    One cumulative max over values shifted by per-group offsets, in chunks that keep the
    offsets inside int64."""
    out = np.empty(len(vals), dtype=_I64)
    c0 = 0
    span = span + 1
    while c0 < len(gs):
        cum = np.cumsum(span[c0:])
        c1 = c0 + max(1, int(np.searchsorted(cum, 1 << 61, side="right")))
        off_g = np.r_[0, cum[: c1 - c0 - 1]]
        p0, p1 = gs[c0], (gs[c1] if c1 < len(gs) else len(vals))
        off = np.repeat(off_g, gcount[c0:c1])
        v = vals[p0:p1] + off
        prev = np.empty_like(v)
        prev[1:] = np.maximum.accumulate(v)[:-1]
        prev[gs[c0:c1] - p0] = off_g
        out[p0:p1] = prev - off
        c0 = c1
    return out


def _union(gs, gcount, rel_s, rel_e, span):
    """Per group, the length of the union of ``[rel_s, rel_e)`` (each group sorted by
    ``rel_s``; values within ``[0, span[g]]``)."""
    if len(gs) == 0:
        return np.zeros(0, dtype=_I64)
    multi = gcount > 1
    if multi.sum() * 2 < len(gs):               # mostly single spans: only the rest
        out = rel_e[gs] - rel_s[gs]
        m = np.flatnonzero(multi)
        if len(m):
            _i, j = _expand(gs[m], gs[m] + gcount[m])
            sub_gs = np.r_[0, np.cumsum(gcount[m])[:-1]]
            out[m] = _union(sub_gs, gcount[m], rel_s[j], rel_e[j], span[m])
        return out
    prev = _prev_max(gs, gcount, rel_e, span)
    gain = np.maximum(rel_e - np.maximum(rel_s, prev), 0)
    return np.add.reduceat(gain, gs)


def _take_csr(ptr_a, cols_a, ptr_b, cols_b, use_b):
    """CSR rows from ``a`` or, where ``use_b``, from ``b`` (same number of rows)."""
    n_a = len(cols_a[0])
    lo = np.where(use_b, ptr_b[:-1] + n_a, ptr_a[:-1])
    cnt = np.where(use_b, np.diff(ptr_b), np.diff(ptr_a))
    _i, j = _expand(lo, lo + cnt)
    ptr = np.r_[0, np.cumsum(cnt)].astype(_I64)
    return ptr, [np.concatenate([a, b])[j] for a, b in zip(cols_a, cols_b)]


def _owned_stalls(st_key, pair_key, pair_group):
    """[(stall indexes, groups)] per node: every stall whose pid key is an owner (once per
    group it belongs to), stall indexes ascending within a node.

    Per node, a dense pid -> slot table replaces a binary search per stall (10M random
    ``searchsorted`` calls cost seconds; a gather costs tens of ms).
    """
    if len(st_key) == 0 or len(pair_key) == 0:
        return []
    st_node = st_key >> NODE_SHIFT
    node_sorted = bool(np.all(st_node[1:] >= st_node[:-1]))
    order = None if node_sorted else np.argsort(
        _small_int(st_node, int(st_node.max()) + 1), kind="stable")   # radix for < 32k nodes
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
        idx = np.arange(s0, s1) if order is None else order[s0:s1]
        spid = st_key[idx] & _PID_MASK
        if top < 4 * (s1 - s0) + (1 << 16):
            table = np.full(top + 2, -1, dtype=np.int32)
            table[upid] = np.arange(len(upid), dtype=np.int32)
            slot = table[np.minimum(spid, top + 1)]
        else:  # few stalls, large pids: a table would cost more than it saves
            slot = np.minimum(np.searchsorted(upid, spid), len(upid) - 1)
            slot = np.where(upid[slot] == spid, slot, -1)
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
    return [(si.astype(_I64), gi) for si, gi in zip(out_s, out_g) if len(si)]


#: owned stalls handled per pass of the alignment: keeps every temporary a few MB, so it is
#: reused from the heap and stays in cache instead of being mapped fresh from the kernel
_CHUNK = 1 << 20
#: two stalls this close (or closer) are back to back even when the sample period is shorter
LINK_GAP_NS = 10_000_000
#: stall kinds (``st_kind``): at most this many
_KINDS = 8


def align(iv_start, iv_end, iv_res, iv_group, st_start, st_dur, st_key, pair_key, pair_group,
          min_explained=MIN_EXPLAINED, max_contributors=MAX_CONTRIBUTORS, iv_lost=None,
          st_kind=None, st_backstop=None, link_gap_ns=LINK_GAP_NS) -> Alignment:
    """Match stalls to idle intervals.

    Intervals: ``iv_start``, ``iv_end``, ``iv_res`` (resolution), ``iv_group`` (owner group,
    -1 = none), ``iv_lost`` (idle time lost; default the length).  Stalls: ``st_start``,
    ``st_dur``, ``st_key`` (pid key), ``st_kind`` (small int < 8, default 0),
    ``st_backstop`` (bool: a scheduler row).  Owners: pairs (``pair_key``, ``pair_group``)
    from :func:`owner_groups`.

    Candidates of interval i: its owners' stalls with a positive overlap, taken in order of
    start while each starts no later than ``max(start + res, reach + gap)``, where reach is
    the latest end (at least ``start``) of the candidates before it and ``gap =
    max(res, link_gap_ns)``: the candidate set begins within one resolution of the idle start
    and stalls back to back with it extend it; the first stall that starts after a hole ends
    the set (the owner was idle for another reason).  Explained = |union| / lost, at most 1.
    Chains: candidates grouped by (pid, kind); a chain's coverage is the union of its stalls
    in the interval.  The top chain has the largest coverage, ties to the earliest first start,
    then the lowest stall index; it is the culprit when explained >= ``min_explained``.
    Contributors: the other chains (all of them without a culprit) in that order, at most
    ``max_contributors``, as (representative stall, coverage); a chain's representative is
    its stall with the largest overlap (ties: earliest start, lowest index).

    Backstop: scheduler rows are left out first; intervals that this leaves below
    ``min_explained`` are aligned again with them, and keep that result (``basis`` 2 when it
    finds a culprit).

    Owner groups are independent, so they are aligned in passes of about ``_CHUNK`` owned
    stalls.  Fastest when stalls come node by node, each node's roughly in time order (as
    ``analyze`` concatenates tracer batches); any order is correct.
    """
    iv_start, iv_end, iv_res, iv_group = map(_i64, (iv_start, iv_end, iv_res, iv_group))
    st_start, st_dur, st_key = map(_i64, (st_start, st_dur, st_key))
    iv_lost = np.maximum(iv_end - iv_start, 0) if iv_lost is None else _i64(iv_lost)
    st_kind = np.zeros(len(st_start), _I64) if st_kind is None else _i64(st_kind)
    pair_key, pair_group = _i64(pair_key), _i64(pair_group)
    st_chain = (st_key & _PID_MASK) * _KINDS + st_kind         # chain of a stall in its group
    if len(st_chain) and int(st_chain.max()) < (1 << 31):
        st_chain = st_chain.astype(np.int32)                   # half the bytes to gather
    args = (iv_start, iv_end, iv_res, iv_lost, st_start, st_dur, st_chain, pair_key, pair_group,
            min_explained, max_contributors, int(link_gap_ns))
    back = None if st_backstop is None else np.asarray(st_backstop, dtype=bool)
    if back is None or not back.any():
        out = _align_all(iv_group, st_key, *args)
        out.basis = np.where(out.culprit >= 0, 1, 0)
        return out
    out = _align_all(iv_group, np.where(back, -1, st_key), *args)
    out.basis = np.where(out.culprit >= 0, 1, 0)
    again = (out.culprit < 0) & (iv_group >= 0)
    if not again.any():
        return out
    b = _align_all(np.where(again, iv_group, -1), st_key, *args)
    for f in ("explained", "union_ns", "n_candidates", "best", "best_overlap", "culprit",
              "best_cover", "best_start", "best_end"):
        getattr(out, f)[again] = getattr(b, f)[again]
    out.basis[again] = np.where(b.culprit[again] >= 0, 2, 0)
    out.contrib_ptr, (out.contrib_stall, out.contrib_overlap) = _take_csr(
        out.contrib_ptr, [out.contrib_stall, out.contrib_overlap],
        b.contrib_ptr, [b.contrib_stall, b.contrib_overlap], again)
    out.chain_ptr, (out.chain_stall, out.chain_overlap) = _take_csr(
        out.chain_ptr, [out.chain_stall, out.chain_overlap],
        b.chain_ptr, [b.chain_stall, b.chain_overlap], again)
    return out


def _align_all(iv_group, st_key, iv_start, iv_end, iv_res, iv_lost, st_start, st_dur, st_chain,
               pair_key, pair_group, min_explained, max_contributors, link_gap_ns):
    n = len(iv_start)
    z = lambda: np.zeros(n, _I64)
    neg = lambda: np.full(n, -1, _I64)
    out = Alignment(np.zeros(n), z(), z(), neg(), z(), neg(), np.zeros(n + 1, _I64),
                    np.empty(0, _I64), np.empty(0, _I64), z(), z(), z(), np.zeros(n + 1, _I64),
                    np.empty(0, _I64), np.empty(0, _I64))
    pieces = _owned_stalls(st_key, pair_key, pair_group)
    if not pieces or not np.any(iv_group >= 0):
        return out

    # groups -> passes of about _CHUNK owned stalls (a larger group gets a pass of its own)
    ngroups = int(max(int(iv_group.max()), max(int(g.max()) for _s, g in pieces))) + 1
    size = np.zeros(ngroups, dtype=_I64)
    for _s, g in pieces:
        size += np.bincount(g, minlength=ngroups)
    chunk_of = np.zeros(ngroups, dtype=_I64)
    total, c = 0, 0
    for gi in np.flatnonzero(size):
        if total and total + size[gi] > _CHUNK:
            c, total = c + 1, 0
        chunk_of[gi] = c
        total += size[gi]
    piece_chunks = [(int(chunk_of[g].min()), int(chunk_of[g].max())) for _s, g in pieces]
    has = np.flatnonzero(iv_group >= 0)
    has = has[np.argsort(chunk_of[iv_group[has]], kind="stable")]
    iv_chunk = chunk_of[iv_group[has]]
    bounds = np.searchsorted(iv_chunk, np.arange(c + 2))

    contrib, chains = [], []
    for ci in range(c + 1):
        ivs = has[bounds[ci]:bounds[ci + 1]]
        if len(ivs) == 0:
            continue
        ex, ex_group = [], []
        for (s, g), (lo, hi) in zip(pieces, piece_chunks):
            if lo <= ci <= hi:
                m = chunk_of[g] == ci if lo != hi else slice(None)
                ex.append(s[m])
                ex_group.append(g[m])
        if not ex:
            continue
        ex = np.concatenate(ex)
        part = _align_pass(ivs, iv_start, iv_end, iv_res, iv_lost, iv_group, ex,
                           np.concatenate(ex_group), st_start, st_dur, st_chain,
                           min_explained, max_contributors, link_gap_ns, out)
        if part is not None:
            contrib.append(part[0])
            chains.append(part[1])

    for parts, ptr_f, cols in ((contrib, "contrib_ptr", ("contrib_stall", "contrib_overlap")),
                               (chains, "chain_ptr", ("chain_stall", "chain_overlap"))):
        parts = [p for p in parts if p is not None]
        if not parts:
            continue
        civ, r, stall, ov = (np.concatenate(x) for x in zip(*parts))
        ptr = np.r_[0, np.cumsum(np.bincount(civ, minlength=n))].astype(_I64)
        dest = ptr[civ] + r
        setattr(out, ptr_f, ptr)
        for f, v in zip(cols, (stall, ov)):
            arr = np.empty(len(dest), dtype=_I64)
            arr[dest] = v
            setattr(out, f, arr)
    return out


def _align_pass(ivs, iv_start, iv_end, iv_res, iv_lost, iv_group, ex, ex_group, st_start, st_dur,
                st_chain, min_explained, max_contributors, link_gap_ns, out):
    """Align intervals ``ivs`` with owned stalls ``ex`` (stall indexes, with their groups),
    all of the same owner groups.  Fills ``out`` for those intervals; returns (contributors,
    top chain stalls) as (interval, rank, stall, overlap) arrays, or None."""
    t_ex, d_ex = st_start[ex], st_dur[ex]
    keep = d_ex > 0                                   # an empty span overlaps nothing
    if not keep.all():
        ex, ex_group, t_ex, d_ex = ex[keep], ex_group[keep], t_ex[keep], d_ex[keep]
    if len(ex) == 0:
        return None

    # buckets: one owner group x one duration class (durations within 4x of each other), so
    # that a range search by start, bounded below by the bucket's running max end, wastes
    # little.  Partition by bucket (radix), then sort each bucket by start (stable: ties stay
    # in stall-index order); in tracer order a bucket is already nearly sorted.
    _m, e2 = np.frexp(d_ex.astype(np.float64))
    cls, _ = _dense((e2 // 2).astype(_I64))
    ncls = int(cls.max()) + 1
    bucket, b_code = _dense(ex_group * ncls + cls)
    nb = len(b_code)
    b_group = b_code // ncls
    ob = np.argsort(_small_int(bucket, nb), kind="stable")
    b_start = np.r_[0, np.cumsum(np.bincount(bucket, minlength=nb))]
    end_ex = t_ex + d_ex

    # the intervals sorted by (group, start); qp = position in that order
    s0 = int(iv_start[ivs].min())
    ivo = ivs[_order(iv_group[ivs], iv_start[ivs] - s0, int(iv_start[ivs].max()) - s0)]
    q_group, q_s, q_e = iv_group[ivo], iv_start[ivo], iv_end[ivo]
    g_lo = np.searchsorted(q_group, b_group, side="left")
    g_hi = np.searchsorted(q_group, b_group, side="right")

    perm = np.empty(len(ex), dtype=_I64)   # bucket-major, start-sorted order of ex positions
    qs, los, his = [], [], []
    for bi in range(nb):
        a, b = b_start[bi], b_start[bi + 1]
        idx = ob[a:b]
        tt = t_ex[idx]
        if np.any(tt[1:] < tt[:-1]):
            so = np.argsort(tt, kind="stable")
            idx, tt = idx[so], tt[so]
        perm[a:b] = idx
        ga, gb = g_lo[bi], g_hi[bi]
        if ga == gb:
            continue
        cm = np.maximum.accumulate(end_ex[idx])
        lo = a + np.searchsorted(cm, q_s[ga:gb], side="right")   # first whose running end > s
        hi = a + np.searchsorted(tt, q_e[ga:gb], side="left")    # starts before the end
        m = hi > lo
        if np.any(m):
            qs.append(np.arange(ga, gb, dtype=_I64)[m])
            los.append(lo[m])
            his.append(hi[m])
    if not qs:
        return None
    qsel, pos = _expand(np.concatenate(los), np.concatenate(his))
    qp = np.concatenate(qs)[qsel]
    pe = perm[pos]                                   # pair -> position in ex
    s = q_s[qp]
    pt, pend = t_ex[pe], end_ex[pe]
    keep = pend > s
    qp, pe, s, pt, pend = qp[keep], pe[keep], s[keep], pt[keep], pend[keep]
    if len(qp) == 0:
        return None

    # pairs by (interval, start, stall index)
    back = pt - s                                    # negative when started before
    rel = back - back.min()
    o = _order(qp, rel, int(rel.max()))
    qp, pe, s, pt, pend = qp[o], pe[o], s[o], pt[o], pend[o]
    sidx = ex[pe]
    same = (qp[1:] == qp[:-1]) & (pt[1:] == pt[:-1])
    if np.any(same):                                 # equal starts from different buckets
        tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])
        sub = tied[np.lexsort((sidx[tied], pt[tied], qp[tied]))]
        for arr in (qp, pe, s, pt, pend, sidx):
            arr[tied] = arr[sub]

    # admission: in start order, while each starts by max(start + res, reach + gap)
    q_len = np.maximum(q_e - q_s, 1)
    q_res = iv_res[ivo]
    rcs, rce = np.maximum(pt - s, 0), np.minimum(pend, q_e[qp]) - s   # clipped, relative
    gs = _group_starts(qp)
    gcount = np.diff(np.r_[gs, len(qp)])
    reach = _prev_max(gs, gcount, rce, q_len[qp[gs]])  # 0 (= start) for the first
    res = q_res[qp]
    late = pt - s > np.maximum(res, reach + np.maximum(res, link_gap_ns))
    if np.any(late):
        nlate = np.cumsum(late)
        ok = nlate == np.repeat(nlate[gs] - late[gs], gcount)
        qp, pe, pt, pend, sidx, rcs, rce = (x[ok] for x in (qp, pe, pt, pend, sidx, rcs, rce))
        if len(qp) == 0:
            return None
        gs = _group_starts(qp)
        gcount = np.diff(np.r_[gs, len(qp)])
    ov = rce - rcs
    g_q = qp[gs]
    g_iv = ivo[g_q]
    union = _union(gs, gcount, rcs, rce, q_len[g_q])
    explained = np.minimum(union / np.maximum(iv_lost[g_iv], 1), 1.0)
    has_culprit = explained >= min_explained

    # chains: pairs by (interval, pid, kind), start order kept
    ckey = st_chain[ex][pe].astype(_I64)            # ex is in stall order: gathered once
    o2 = _order(qp, ckey, int(ckey.max()))
    cq, ck2 = qp[o2], ckey[o2]
    c_gs = np.flatnonzero(np.r_[True, (cq[1:] != cq[:-1]) | (ck2[1:] != ck2[:-1])])
    c_cnt = np.diff(np.r_[c_gs, len(o2)])
    c_q = cq[c_gs]
    rcs2, rce2 = rcs[o2], rce[o2]
    c_cover = _union(c_gs, c_cnt, rcs2, rce2, q_len[c_q])
    ov2 = rce2 - rcs2
    c_top = np.repeat(np.maximum.reduceat(ov2, c_gs), c_cnt)
    cand = np.where(ov2 == c_top, np.arange(len(o2)), len(o2))
    c_rep = o2[np.minimum.reduceat(cand, c_gs)]      # pair index of the representative
    c_first = o2[c_gs]                               # its first pair: (start, index) order

    # rank chains per interval: coverage desc, then first pair order
    co = np.argsort(c_first, kind="stable")
    top = int(c_cover.max())
    co = co[_order(c_q[co], top - c_cover[co], top)]
    c_gq = _group_starts(c_q[co])
    nch = np.diff(np.r_[c_gq, len(co)])
    best_c = co[c_gq]

    # per interval (the groups gs, in qp order, match c_gq)
    out.explained[g_iv] = explained
    out.union_ns[g_iv] = union
    out.n_candidates[g_iv] = gcount
    out.best[g_iv] = sidx[c_rep[best_c]]
    out.best_overlap[g_iv] = ov[c_rep[best_c]]
    out.best_cover[g_iv] = c_cover[best_c]
    out.best_start[g_iv] = pt[c_first[best_c]]
    out.culprit[g_iv[has_culprit]] = sidx[c_rep[best_c[has_culprit]]]

    # the top chain's stalls, and its last end
    ci, cj = _expand(c_gs[best_c], c_gs[best_c] + c_cnt[best_c])
    cpair = o2[cj]
    chain = (g_iv[ci], cj - c_gs[best_c][ci], sidx[cpair], ov[cpair])
    out.best_end[g_iv] = np.maximum.reduceat(pend[cpair], np.r_[0, np.cumsum(c_cnt[best_c])[:-1]])
    if max_contributors <= 0:
        return None, chain
    # contributors: ranks 1.. after a culprit, 0.. without one
    rank = np.arange(len(co)) - np.repeat(c_gq, nch)
    skip = np.repeat(has_culprit.astype(_I64), nch)
    take = (rank >= skip) & (rank < skip + max_contributors)
    pick = co[take]
    contrib = (g_iv[np.repeat(np.arange(len(nch)), nch)[take]], (rank - skip)[take],
               sidx[c_rep[pick]], c_cover[pick])
    return contrib, chain


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
    by_job = np.flatnonzero(iv_job >= 0)
    by_job = by_job[np.argsort(iv_job[by_job], kind="stable")]
    bounds = np.r_[_group_starts(iv_job[by_job]), len(by_job)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = by_job[a:b]
        S = members[has[members]]
        T = members[~has[members]]
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
