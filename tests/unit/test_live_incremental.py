"""The live analyzer blames only the unsettled intervals (``LiveAnalyzer(incremental=True)``,
the default) and reports exactly what blaming the whole window reports (``incremental=False``,
the previous implementation): the same verdicts, field for field, in the same calls.

Streams: seeded multi-node worlds built here (a job over three nodes with collective waits, a
rank's death, a TCP loss episode toward a peer, HTTP retries, NVML listing a worker now and
then, a hole in one GPU's samples, an unowned GPU idle throughout, long idles that cross the
settled horizon, a node whose batches lag) and the fleet generator's (bench/fleet.py), cut into
tracer-like batches and fed in time order with a window shorter than the stream.
"""

from __future__ import annotations

import collections
import signal

import numpy as np
import pytest

from bench import fleet
from stallscope.analysis.analyze import LiveAnalyzer
from stallscope.wire.schema import Batch, complete
from tests.unit.test_blame import table

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
S = 1_000_000_000
P = 100 * MS
NODES = ("na", "nb", "nc")
JOB = "j1"


def _table(kind, rows):
    return complete(kind, table(kind, rows))


def _world(seed: int, seconds: int = 120):
    """Rows per node, each with the time the tracer ships it (``_at``)."""
    rng = np.random.default_rng(seed)
    n = seconds * S // P
    rows = {nd: collections.defaultdict(list) for nd in NODES}
    trainer = {g: 100 + 10 * g for g in (0, 1)}
    worker = {g: 101 + 10 * g for g in (0, 1)}
    # job-wide waits: every rank idle together, one of them stalled (or dead, or its data late)
    sync = []
    t = 30
    while t < n - 80:
        sync.append((t, int(rng.integers(8, 40))))
        t += int(rng.integers(60, 160))
    util = {}
    for ni, nd in enumerate(NODES):
        for g in (0, 1):
            u = np.full(n, 90)
            k = int(rng.integers(0, 20))
            while k < n:       # the GPU's own idles: short ones and some that last 20-40 s
                ln = int(rng.integers(200, 400)) if rng.random() < 0.08 else int(rng.integers(3, 40))
                u[k:k + ln] = np.where(rng.random(min(ln, n - k)) < 0.1, 30, 0)
                k += ln + int(rng.integers(5, 120))
            for s, ln in sync:
                u[s:s + ln] = 0
            if nd == "nb":                         # busy around the wait on na's flow
                s, ln = sync[1]
                u[s - 20:s] = u[s + ln:s + ln + 20] = 90
            util[(nd, g)] = u
    util[("nc", 1)][:] = 0

    def quiet(t_, dur):
        """Overlaps the second wait, where nb waits on na's flow and nothing else."""
        s, ln = sync[1]
        return t_ < T0 + (s + ln) * P and t_ + dur > T0 + (s - 5) * P
                         # nobody's GPU: idle throughout, never listed
    exit_at = None
    for ni, nd in enumerate(NODES):
        for g in (0, 1):
            u = util[(nd, g)]
            ts = T0 + (np.arange(n) + 1) * P + int(rng.integers(0, 3 * MS))
            keep = np.ones(n, bool)
            if nd == "nb" and g == 0:
                keep[400:760] = False              # the tracer down 36 s: a hole
            for i in np.flatnonzero(keep):
                rows[nd]["gpu"].append({"ts_ns": int(ts[i]), "gpu": g, "util": int(u[i]), "_at": int(ts[i])})
            if (nd, g) == ("nc", 1):
                continue
            last = n
            if (nd, g) == ("nc", 0):               # rank 4 dies before the last-but-one wait
                s, _ln = sync[-2]
                exit_at = T0 + (s - 5) * P
                last = s - 5
            for i in range(0, last, 10):           # NVML lists the trainer, now and then a worker
                t_ = int(T0 + i * P)
                rows[nd]["gpu_proc"].append({"ts_ns": t_, "gpu": g, "pid": trainer[g], "_at": t_})
                if rng.random() < 0.1:
                    rows[nd]["gpu_proc"].append({"ts_ns": t_, "gpu": g, "pid": worker[g], "_at": t_})
            # local stalls at the starts of idles, and background ones that explain nothing
            starts = np.flatnonzero((u[1:] < 50) & (u[:-1] >= 50)) + 1
            for i in starts:
                if rng.random() < 0.5:
                    t_ = int(T0 + i * P - int(rng.integers(0, 60 * MS)))
                    dur = int(rng.integers(300 * MS, 5 * S))
                    if quiet(t_, dur):
                        continue
                    pid = int(rng.choice([trainer[g], worker[g], worker[g] + 1]))
                    rows[nd]["io"].append({"ts_ns": t_, "dur_ns": dur, "pid": pid, "tid": pid,
                                           "comm": "python", "op": "read", "path": f"/data/{i}",
                                           "fs": "nfs4", "_at": t_ + dur})
            for _ in range(seconds // 2):
                t_ = int(T0 + rng.integers(0, n) * P)
                dur = int(rng.integers(20 * MS, 800 * MS))
                pid = int(rng.choice([trainer[g], worker[g], 900]))
                if quiet(t_, dur):
                    continue
                rows[nd]["io"].append({"ts_ns": t_, "dur_ns": dur, "pid": pid, "tid": pid + 1,
                                       "comm": "python", "op": "write", "path": "/ckpt/x",
                                       "fs": "ext4", "_at": t_ + dur})
        lineage = [(trainer[0], 1), (worker[0], trainer[0]), (worker[0] + 1, worker[0]),
                   (trainer[1], 1), (worker[1], trainer[1]), (worker[1] + 1, worker[1])]
        for pid, ppid in lineage:
            rank = 2 * ni + (0 if pid < 110 else 1)
            rows[nd]["proc"].append({"pid": pid, "ppid": ppid, "comm": "python", "start_ns": T0,
                                     "job": JOB, "rank": rank, "_at": T0})
    # the death: rank 4 (nc GPU 0) killed; the others wait at the next collective
    assert exit_at is not None
    rows["nc"]["proc"].append({"pid": trainer[0], "ppid": 1, "comm": "python", "start_ns": T0, "job": JOB,
                               "rank": 4, "exit_ns": exit_at, "exit_status": int(signal.SIGKILL),
                               "_at": exit_at + 50 * MS})
    # a TCP loss episode from na's rank 0 toward nb during the second wait
    s, ln = sync[1]
    t_ = int(T0 + s * P - 30 * MS)
    rows["na"]["net"].append({"ts_ns": t_, "dur_ns": ln * P, "pid": trainer[0], "tid": trainer[0],
                              "comm": "python", "op": "retransmit", "saddr": "10.0.0.1", "sport": 40000,
                              "daddr": "10.0.0.2", "dport": 29500, "state": "ESTABLISHED",
                              "retransmits": 5, "_at": t_ + ln * P + S})
    # HTTP retries of na's GPU 1 worker: throttled twice, then answered; some past the window
    for s, ln in sync[2:] + [(int(k), 30) for k in rng.integers(50, n - 50, 4)]:
        t_ = int(T0 + s * P - 20 * MS)
        for k, st in enumerate((429, 429, 200)):
            dur = ln * P // 3 - 30 * MS
            rows["na"]["http"].append({"ts_ns": t_, "dur_ns": dur, "pid": worker[1], "tid": 7,
                                       "comm": "python", "op": "POST", "host": "api.example",
                                       "path": "/v1/x", "status": st, "reason": "", "statuses": str(st),
                                       "count": 1, "_at": t_ + dur})
            t_ += dur + 10 * MS * (k + 1)
    return rows


def _batches(rows, node, unc_ns, every=500 * MS, addr=""):
    """A node's rows cut into batches at ``every`` by when the tracer ships them (and the
    loss episodes open meanwhile announced, as the tracer does)."""
    at = {k: np.array([r["_at"] for r in v], dtype=np.int64) for k, v in rows.items()}
    hi = max(int(a.max()) for a in at.values() if len(a))
    out, seq = [], 0
    for cut in range(T0 + every, hi + every + 1, every):
        tables = {}
        for k, v in rows.items():
            m = (at[k] < cut) & (at[k] >= cut - every)
            if m.any():
                tables[k] = _table(k, [v[i] for i in np.flatnonzero(m)])
        meta = {"clock": {"uncertainty_ns": unc_ns, "sent_ns": cut},
                "node": {"addrs": [addr]},
                "gpu": {"sample_period_ns": {0: P, 1: P},
                        "gpus": [{"index": g, "uuid": f"GPU-{node}-{g}"} for g in (0, 1)]}}
        open_ = [r["ts_ns"] for r in rows.get("net", ()) if r["ts_ns"] < cut <= r["_at"]]
        if open_:                                  # a loss episode still open: announced
            meta["net"] = {"open_since_ns": min(open_)}
        out.append((cut, Batch(node, seq, tables, {}, {}, meta)))
        seq += 1
    return out


def _stream(seed, lag_ns=0):
    rows = _world(seed)
    uncs = {"na": 1 * MS, "nb": 2 * MS, "nc": MS // 2}
    out = []
    for i, nd in enumerate(NODES):
        for cut, b in _batches(rows[nd], nd, uncs[nd], addr=f"10.0.0.{i + 1}"):
            out.append((cut + (lag_ns if nd == "nb" else 0), i, b.seq, b))
    return [b for *_k, b in sorted(out, key=lambda x: x[:3])]


def _run(batches, incremental, per_add, **kw):
    live = LiveAnalyzer(min_gap_s=0, incremental=incremental, **kw)
    got = [live.add(batches[j:j + per_add]) for j in range(0, len(batches), per_add)]
    got.append(live.flush())
    got.append(live.flush())
    return got


def _same(batches, per_add, **kw):
    """Both ways call by call; returns every verdict reported."""
    full = _run(batches, False, per_add, **kw)
    inc = _run(batches, True, per_add, **kw)
    assert len(full) == len(inc)
    for k, (a, b) in enumerate(zip(full, inc)):
        assert a == b, f"call {k}: {[(v.node, v.gpu, v.idle_end_ns) for v in a]} != " \
                       f"{[(v.node, v.gpu, v.idle_end_ns) for v in b]}"
    flat = [v for out in full for v in out]
    ids = [(v.node, v.gpu, v.idle_end_ns) for v in flat]
    assert len(ids) == len(set(ids)), "an interval reported twice"
    assert full[-1] == []
    return flat


@pytest.mark.parametrize("seed,lag_s,per_add", [(1, 0, 3), (2, 3, 6), (3, 1, 2)])
def test_same_verdicts_as_the_whole_window_on_a_job_over_three_nodes(seed, lag_s, per_add):
    batches = _stream(seed, lag_s * S)
    got = _same(batches, per_add, window_ns=30 * S)
    kinds = collections.Counter(v.verdict for v in got)
    causes = collections.Counter(v.cause for v in got if v.cause)
    assert kinds["culprit"] and kinds["remote"] and kinds["unexplained"], kinds
    assert causes["peer_exit"] and causes["peer_net"] and causes["peer_io"], causes
    assert any(v.chain is not None and v.chain.kind == "http" for v in got)
    assert any(v.job_cost is not None for v in got)
    assert any(v.open for v in got)                                   # the hole, the flush
    assert any(v.idle_end_ns - v.idle_start_ns > 20 * S for v in got)  # across the horizon
    assert any(v.node == "nc" and v.gpu == 1 and not v.gpu_pids for v in got)


def test_same_verdicts_with_a_wait_long_enough_for_every_remote_culprit():
    """nb's batches 3 s late, the wait for remote culprits 5 s: unexplained intervals of the
    job wait for nb, then take their remote causes."""
    batches = _stream(4, 3 * S)
    got = _same(batches, 4, window_ns=40 * S, wait_ns=5 * S)
    assert any(v.verdict == "remote" for v in got)


def test_same_verdicts_with_clock_skew_and_other_parameters():
    batches = _stream(5)
    _same(batches, 5, window_ns=25 * S, clock_skew_ns=40 * MS, min_explained=0.3,
          exit_window_ns=20 * S, remote_same_node=False)


@pytest.mark.parametrize("seed", [2, 7])
def test_same_verdicts_on_the_fleet_generator(seed):
    spec = fleet.FleetSpec(nodes=4, gpus=2, hours=2 / 60, seed=seed, rate=12)
    per_node = [fleet.node_batches(spec, i) for i in range(spec.nodes)]
    batches = [b for *_k, b in sorted((b.meta["clock"]["sent_ns"], i, b.seq, b)
                                      for i, bs in enumerate(per_node) for b in bs)]
    got = _same(batches, 8, window_ns=40 * S)
    assert collections.Counter(v.verdict for v in got)["culprit"]


def test_only_unsettled_intervals_are_blamed(monkeypatch):
    """At steady state a run aligns the intervals near the newest data, not the window's."""
    from stallscope.analysis import analyze as an
    batches = _stream(1)
    seen = []
    real = an._node_part

    def spy(name, nd, base, p, phase, keep=None, **kw):
        seen.append((len(base.idle), None if keep is None else int(keep.sum())))
        return real(name, nd, base, p, phase, keep=keep, **kw)

    monkeypatch.setattr(an, "_node_part", spy)
    live = LiveAnalyzer(min_gap_s=0, window_ns=60 * S)
    for j in range(0, len(batches), 3):
        live.add(batches[j:j + 3])
    late = seen[len(seen) // 2:]
    assert sum(k for _n, k in late) < 0.5 * sum(n for n, _k in late)
