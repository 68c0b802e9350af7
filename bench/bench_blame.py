"""Blame benchmarks: `python -m bench.bench_blame [--quick]` (or `python -m bench blame`).

One JSON line per figure, on one core (BLAS/OpenMP threads pinned to 1 before numpy loads;
the blame code itself is single-threaded numpy).  Each figure carries a same-run baseline,
``np.sort`` of as many int64 stall start times, and the ratio to it, because the machines
these run on are shared and their speed drifts.

Figures:
  align     stallscope.analysis.blame.align: owned-stall join, candidate sweep (stalls back
            to back extend the set), union of overlaps, chains (per pid and kind), culprit and
            contributors, for (stalls, intervals) from 1M/100k to 10M/1M; stalls in tracer
            emission order (per node, by end time) and, once, shuffled (worst case)
  backstop  align at the largest size plus 10% scheduler rows (blocked, runq) and three
            stall kinds: the intervals the specific stalls leave unexplained are aligned again
  idle      find_idle on NVML samples producing the same number of intervals (busy samples
            at 80%: partial samples everywhere)
  owners    owner_groups from NVML process lists polled every second over the whole span
  remote    remote_blame across the nodes of one job
  analyze   analyze() end to end from tracer batches (verdict dicts included), small sizes
  live_add  one LiveAnalyzer.add() at steady state with a full 10-minute window (8 nodes);
            live_add_whole_window: the same blaming the whole window (the reference)

The synthetic cluster: 16 nodes x 8 GPUs, one training process per GPU with 4 dataloader
workers, 2 unrelated processes per node; idle intervals of 0.2-3 s between 1-10 s of work;
30% of stalls line up with an idle interval, the rest fall anywhere with log-normal
durations (1 ms to 2 min), 25% of those by processes that own no GPU or pid 0.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stallscope.analysis import blame  # noqa: E402

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
S = 1_000_000_000
PERIOD = 100 * MS
NODES, GPUS, WORKERS = 16, 8, 4


def _pids(node_gpu):
    """Trainer pid of each GPU and its workers' pids (same on every node)."""
    trainer = 1000 + 10 * (node_gpu % GPUS)
    return trainer, trainer[:, None] + 1 + np.arange(WORKERS)


def cluster(n_stalls, n_intervals, seed=0, shuffled=False):
    """Arrays for align/remote: intervals, owner pairs, stalls (see the module docstring)."""
    rng = np.random.default_rng(seed)
    G = NODES * GPUS
    gpu = np.sort(rng.integers(0, G, n_intervals))          # global GPU number, grouped
    idle = rng.integers(200 * MS, 3 * S, n_intervals)
    busy = rng.integers(1 * S, 10 * S, n_intervals)
    cyc = np.cumsum(idle + busy)
    first = np.searchsorted(gpu, np.arange(G))
    base = np.where(first > 0, cyc[np.maximum(first - 1, 0)], 0)
    start = T0 + cyc - idle - base[gpu]
    end = start + idle
    node = gpu // GPUS
    iv = {"key": blame.gpu_key(node, gpu % GPUS), "start": start, "end": end,
          "res": np.full(n_intervals, PERIOD), "group": gpu.astype(np.int64)}
    span_end = int(end.max()) + 10 * S

    all_gpus = np.arange(G)
    trainer, workers = _pids(all_gpus)
    members = np.concatenate([trainer[:, None], workers], axis=1)        # G x (1 + W)
    pair_key = blame.pid_key(np.repeat(all_gpus // GPUS, 1 + WORKERS), members.ravel())
    pair_group = np.repeat(all_gpus, 1 + WORKERS).astype(np.int64)

    n_causal = int(n_stalls * 0.3)
    n_bg = n_stalls - n_causal
    i = rng.integers(0, n_intervals, n_causal)
    lead = rng.integers(0, 300 * MS, n_causal)
    c_start = start[i] - lead
    c_dur = lead + ((end[i] - start[i]) * rng.uniform(0.3, 1.3, n_causal)).astype(np.int64)
    c_pid = members[gpu[i], rng.integers(0, 1 + WORKERS, n_causal)]
    c_node = node[i]

    b_node = rng.integers(0, NODES, n_bg)
    b_start = rng.integers(T0, span_end, n_bg)
    b_dur = np.clip(np.exp(rng.normal(np.log(30 * MS), 1.8, n_bg)), MS, 120 * S).astype(np.int64)
    who = rng.random(n_bg)
    b_gpu = b_node * GPUS + rng.integers(0, GPUS, n_bg)
    b_pid = np.where(who < 0.75, members[b_gpu, rng.integers(0, 1 + WORKERS, n_bg)],
                     np.where(who < 0.95, 5000 + rng.integers(0, 2, n_bg), 0))

    st_node = np.concatenate([c_node, b_node])
    st_start = np.concatenate([c_start, b_start])
    st_dur = np.concatenate([c_dur, b_dur])
    st_pid = np.concatenate([c_pid, b_pid])
    if shuffled:
        o = rng.permutation(n_stalls)
    else:  # what the collector concatenates: node by node, each in completion order
        o = np.lexsort((st_start + st_dur, st_node))
    st = {"start": st_start[o], "dur": st_dur[o], "key": blame.pid_key(st_node[o], st_pid[o])}
    return iv, {"key": pair_key, "group": pair_group}, st


def samples(n_intervals, seed=0):
    """NVML samples for every GPU: busy runs of 1-6 samples, idle runs of 3-8 (>= 300 ms)."""
    rng = np.random.default_rng(seed)
    G = NODES * GPUS
    per = -(-n_intervals // G)
    busy = rng.integers(1, 7, (G, per))
    idle = rng.integers(3, 9, (G, per))
    runs = np.stack([busy, idle], axis=2).reshape(G, 2 * per)
    lens = runs.ravel()
    state = np.tile(np.array([1, 0]), G * per)
    util = np.repeat(np.where(state == 1, 80, 0), lens)
    gpu = np.repeat(np.repeat(np.arange(G), 2 * per), lens)
    idx = np.arange(len(util)) - np.repeat(np.searchsorted(gpu, np.arange(G)), np.bincount(gpu))
    ts = T0 + (idx + 1) * PERIOD
    return blame.gpu_key(gpu // GPUS, gpu % GPUS), ts, util


def _time(fn, repeat=1):
    """(best wall seconds, its CPU seconds, result)."""
    best = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[0]:
            best = (w, c, out)
    return best


def _baseline(n):
    rng = np.random.default_rng(1)
    a = T0 + rng.integers(0, 10 ** 14, n)
    w, _c, _ = _time(lambda: np.sort(a), 1)
    return w


def _emit(rec):
    rec.setdefault("machine", f"{platform.node()} {os.cpu_count()} cpus")
    print(json.dumps(rec), flush=True)


def bench_align(n_st, n_iv, shuffled=False, repeat=1):
    iv, ow, st = cluster(n_st, n_iv, shuffled=shuffled)
    base = _baseline(n_st)
    w, c, al = _time(lambda: blame.align(iv["start"], iv["end"], iv["res"], iv["group"],
                                         st["start"], st["dur"], st["key"], ow["key"],
                                         ow["group"]), repeat)
    _emit({"figure": "align", "stalls": n_st, "intervals": n_iv,
           "order": "shuffled" if shuffled else "emission",
           "seconds": round(w, 3), "cpu_seconds": round(c, 3),
           "stalls_per_s": round(n_st / w), "candidate_pairs": int(al.n_candidates.sum()),
           "explained": int((al.culprit >= 0).sum()),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})
    return iv, st, al


def bench_backstop(n_st, n_iv, repeat=1):
    iv, ow, st = cluster(n_st, n_iv)
    rng = np.random.default_rng(5)
    n_sc = n_st // 10
    pick = rng.integers(0, n_st, n_sc)                # scheduler rows over some of the stalls
    lead = rng.integers(0, 200 * MS, n_sc)
    start = np.concatenate([st["start"], st["start"][pick] - lead])
    dur = np.concatenate([st["dur"], st["dur"][pick] + 2 * lead])
    key = np.concatenate([st["key"], st["key"][pick]])
    kind = np.concatenate([rng.integers(0, 3, n_st), 5 + rng.integers(0, 2, n_sc)])
    back = kind >= 5
    o = np.lexsort((start + dur, key >> blame.NODE_SHIFT))      # emission order again
    start, dur, key, kind, back = start[o], dur[o], key[o], kind[o], back[o]
    base = _baseline(len(start))
    w, c, al = _time(lambda: blame.align(iv["start"], iv["end"], iv["res"], iv["group"], start,
                                         dur, key, ow["key"], ow["group"], st_kind=kind,
                                         st_backstop=back), repeat)
    _emit({"figure": "backstop", "stalls": len(start), "sched_rows": n_sc, "intervals": n_iv,
           "seconds": round(w, 3), "cpu_seconds": round(c, 3),
           "explained": int((al.culprit >= 0).sum()), "by_backstop": int((al.basis == 2).sum()),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})


def bench_remote(iv, st, al, repeat=1):
    job = np.zeros(len(iv["start"]), dtype=np.int64)   # one job across every node
    unc = np.full(NODES, 50_000, dtype=np.int64)
    base = _baseline(len(iv["start"]))
    w, c, (src, _u) = _time(lambda: blame.remote_blame(iv["key"], job, iv["start"], iv["end"],
                                                       iv["res"], al.culprit, st["start"],
                                                       st["dur"], unc), repeat)
    _emit({"figure": "remote", "intervals": len(iv["start"]),
           "with_local_culprit": int((al.culprit >= 0).sum()), "remote": int((src >= 0).sum()),
           "seconds": round(w, 3), "cpu_seconds": round(c, 3),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})


def bench_idle(n_iv, repeat=1):
    """find_idle on samples in random order (as a store query may return them; the sort real
    data needs is part of the figure), and once in (GPU, time) order for comparison."""
    key, ts, util = samples(n_iv)
    base = _baseline(len(ts))
    period = {int(k): PERIOD for k in np.unique(key)}
    perm = np.random.default_rng(5).permutation(len(ts))
    sk, sts, su = key[perm], ts[perm], util[perm]
    w, c, idle = _time(lambda: blame.find_idle(sk, sts, su, None, period), repeat)
    ws, _cs, idle_sorted = _time(lambda: blame.find_idle(key, ts, util, None, period), repeat)
    assert len(idle) == len(idle_sorted)
    _emit({"figure": "idle", "samples": len(ts), "intervals": len(idle), "input": "unsorted",
           "seconds": round(w, 3), "cpu_seconds": round(c, 3), "seconds_presorted_input": round(ws, 3),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})


def bench_owners(iv, repeat=1):
    G = NODES * GPUS
    lo, hi = int(iv["start"].min()) - 10 * S, int(iv["end"].max()) + 10 * S
    polls = np.arange(lo, hi, S)
    gp_gpu = np.tile(np.arange(G), len(polls))
    gp_ts = np.repeat(polls, G)
    trainer, workers = _pids(np.arange(G))
    gp_key = blame.gpu_key(gp_gpu // GPUS, gp_gpu % GPUS)
    gp_pid = trainer[gp_gpu]
    pn = np.repeat(np.arange(NODES), GPUS * (1 + WORKERS))
    pp = np.concatenate([np.concatenate([trainer[:GPUS], workers[:GPUS].ravel()])] * NODES)
    ppp = np.concatenate([np.concatenate([np.ones(GPUS, np.int64),
                                          np.repeat(trainer[:GPUS], WORKERS)])] * NODES)
    base = _baseline(len(gp_ts))
    w, c, own = _time(lambda: blame.owner_groups(iv["key"], iv["start"], iv["end"], gp_key,
                                                 gp_ts, gp_pid, pn, pp, ppp), repeat)
    _emit({"figure": "owners", "intervals": len(iv["start"]), "gpu_proc_rows": len(gp_ts),
           "groups": len(own.members), "seconds": round(w, 3), "cpu_seconds": round(c, 3),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})


def bench_analyze(n_st, n_iv):
    """analyze() from tracer batches: what `stallscope report` pays, dicts included."""
    from stallscope.analysis.analyze import analyze
    from stallscope.wire.schema import Batch

    _iv, _ow, st = cluster(n_st, n_iv)
    key, ts, util = samples(n_iv)
    batches = []
    snode = st["key"] >> blame.NODE_SHIFT
    spid = st["key"] & ((1 << blame.NODE_SHIFT) - 1)
    gnode = key >> blame.NODE_SHIFT
    trainer, workers = _pids(np.arange(GPUS))
    for nd in range(NODES):
        m = snode == nd
        k = int(m.sum())
        io = {"ts_ns": st["start"][m].astype(np.uint64), "dur_ns": st["dur"][m].astype(np.uint64),
              "pid": spid[m].astype(np.uint64), "tid": spid[m].astype(np.uint64),
              "comm": np.full(k, "python", dtype=object), "op": np.full(k, "read", dtype=object),
              "bytes": np.full(k, 1 << 20), "path": np.full(k, "/data/shard", dtype=object),
              "fs": np.full(k, "nfs4", dtype=object)}
        g = gnode == nd
        gts = ts[g]
        polls = np.arange(int(gts.min()), int(gts.max()) + S, S)
        gp = {"ts_ns": np.repeat(polls, GPUS), "gpu": np.tile(np.arange(GPUS), len(polls)),
              "pid": np.tile(trainer, len(polls))}
        procs = np.concatenate([trainer, workers.ravel()])
        parents = np.concatenate([np.ones(GPUS, np.int64), np.repeat(trainer, WORKERS)])
        proc = {"pid": procs, "ppid": parents, "comm": np.full(len(procs), "python", dtype=object),
                "start_ns": np.zeros(len(procs)), "job": np.full(len(procs), "j", dtype=object),
                "rank": np.zeros(len(procs), dtype=np.int64)}
        gpu = {"ts_ns": gts, "gpu": key[g] & 0xFF, "util": util[g], "synth": np.zeros(int(g.sum()))}
        batches.append(Batch(f"node{nd:02d}", 0, {"io": io, "gpu": gpu, "gpu_proc": gp,
                                                  "proc": proc}, {}, {},
                             {"gpu": {"sample_period_ns": {i: PERIOD for i in range(GPUS)}}}))
    base = _baseline(n_st)
    w, c, res = _time(lambda: analyze(batches))
    _emit({"figure": "analyze", "stalls": n_st, "samples": len(ts),
           "verdicts": len(res.verdicts), "seconds": round(w, 3), "cpu_seconds": round(c, 3),
           "baseline_sort_seconds": round(base, 3), "ratio_to_baseline": round(w / base, 2)})


def bench_live(nodes, seconds, stalls_per_s, incremental=True):
    """LiveAnalyzer.add() at steady state: a full window of ``seconds`` on ``nodes`` x 8
    GPUs (NVML period 1/6 s, process lists every second), one more second of batches in.
    ``incremental=False``: blaming the whole window each run (the reference, as before)."""
    from stallscope.analysis.analyze import LiveAnalyzer, _Node
    from stallscope.wire.schema import Batch

    rng = np.random.default_rng(3)
    per = S // 6
    trainer, workers = _pids(np.arange(GPUS))
    members = np.concatenate([trainer[:, None], workers], axis=1)
    procs = np.concatenate([trainer, workers.ravel()])
    parents = np.concatenate([np.ones(GPUS, np.int64), np.repeat(trainer, WORKERS)])
    proc = {"pid": procs, "ppid": parents, "comm": np.full(len(procs), "python", dtype=object),
            "start_ns": np.zeros(len(procs)), "job": np.full(len(procs), "j", dtype=object),
            "rank": np.zeros(len(procs), dtype=np.int64)}

    def second(nd, k):
        t0 = T0 + k * S
        ts = np.repeat(t0 + np.arange(1, 7) * per, GPUS)
        gpu = np.tile(np.arange(GPUS), 6)
        util = np.where(rng.random(len(ts)) < 0.2, 0, 90)
        n = rng.poisson(stalls_per_s)
        g = rng.integers(0, GPUS, n)
        io = {"ts_ns": t0 + rng.integers(0, S, n), "dur_ns": rng.integers(10 * MS, 500 * MS, n),
              "pid": members[g, rng.integers(0, 1 + WORKERS, n)], "tid": np.zeros(n),
              "comm": np.full(n, "python", dtype=object), "op": np.full(n, "read", dtype=object),
              "bytes": np.zeros(n), "path": np.full(n, "/data/shard", dtype=object),
              "fs": np.full(n, "nfs4", dtype=object)}
        tables = {"gpu": {"ts_ns": ts, "gpu": gpu, "util": util, "synth": np.zeros(len(ts))},
                  "gpu_proc": {"ts_ns": np.full(GPUS, t0), "gpu": np.arange(GPUS), "pid": trainer},
                  "io": io}
        if k == 0:
            tables["proc"] = proc
        return Batch(f"node{nd:02d}", k, tables, {}, {},
                     {"gpu": {"sample_period_ns": {i: per for i in range(GPUS)}}})

    live = LiveAnalyzer(window_ns=seconds * S, min_gap_s=0, incremental=incremental)
    for k in range(seconds):            # fill the window without analyzing every second
        for nd in range(nodes):
            b = second(nd, k)
            live.nodes.setdefault(b.node, _Node(b.node)).absorb(b)
    live.add([second(nd, seconds) for nd in range(nodes)])        # first run: concatenation
    new = [second(nd, seconds + 1) for nd in range(nodes)]
    w, c, out = _time(lambda: live.add(new))
    n_st = int(sum(len(n.table("io")["ts_ns"]) for n in live.nodes.values()))
    base = _baseline(n_st)
    _emit({"figure": "live_add" if incremental else "live_add_whole_window", "nodes": nodes, "gpus": nodes * GPUS, "window_s": seconds,
           "stalls_in_window": n_st, "verdicts_returned": len(out), "seconds": round(w, 3),
           "cpu_seconds": round(c, 3), "baseline_sort_seconds": round(base, 3),
           "ratio_to_baseline": round(w / base, 2)})


def main(quick: bool = False) -> None:
    sizes = ([(100_000, 10_000), (300_000, 30_000)] if quick else
             [(1_000_000, 100_000), (3_000_000, 300_000), (10_000_000, 1_000_000)])
    repeat = 3 if quick else 1
    for n_st, n_iv in sizes:
        iv, st, al = bench_align(n_st, n_iv, repeat=repeat)
        bench_remote(iv, st, al, repeat=repeat)
        bench_idle(n_iv, repeat=repeat)
        bench_owners(iv, repeat=repeat)
        del iv, st, al
    n_st, n_iv = sizes[-1]
    bench_align(n_st, n_iv, shuffled=True, repeat=repeat)
    bench_backstop(n_st, n_iv, repeat=repeat)
    a_st, a_iv = (20_000, 2_000) if quick else (200_000, 20_000)
    bench_analyze(a_st, a_iv)
    for incremental in (True, False):
        bench_live(*((2, 60, 50) if quick else (8, 600, 50)), incremental=incremental)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
