"""Soak, the short version CI runs (the long one: ``python -m bench soak --minutes 30``).

Four real tracers (``stallscope trace --quiet --collector ... --spool-dir ...``, vfs,sched,tcp,
the NVML simulator with 8 GPUs) stream into one real ``stallscope collect`` for 90 s of steady
state after a 45 s warm-up, all following one cgroup that holds only the soak workload
(20 FUSE-stalled reads/s of 20-50 ms, sub-threshold page-cache reads, a 300 ms stall every 10 s
and a checkpoint every 30 s; ``bench/bench_soak.py``). Asserted:

- no process's open fds or threads grow, and no RSS slope exceeds the bound of
  ``bench_soak.rss_bound_kib_min`` (640 KiB/min over the 90 s window; a leak is called when
  both the least-squares and the Theil-Sen slope exceed it);
- the bound is not so loose that it cannot fail: the same measured series with a 1 MiB/min
  leak added to it is judged a leak, for every process;
- end to end, exactly: every batch a tracer spooled is stored once, none is left
  unacknowledged or dropped, and each of the workload's stalled syscalls is stored once per
  tracer.

The collector runs with ``--no-verdicts`` here: the live analysis keeps a 600 s window of every
node's data, so within 90 s its memory grows by design; the 30-minute bench judges it with
live verdicts on, after that window has filled. Prints one ``SOAK-FIGURES {json}`` line.
"""

import json

import pytest

from bench.bench_soak import judge, run_soak

pytestmark = pytest.mark.bpf

TRACERS = 4
WARMUP_S = 45.0
STEADY_S = 90.0
SAMPLE_S = 3.0


def with_leak(rows, kib_per_min):
    """A process's sample rows (t, VmRSS, RssAnon, fds, threads) as judge() takes them, with
    ``kib_per_min`` of RSS added per minute."""
    return [(t, {"VmRSS": rss + kib_per_min * t / 60, "RssAnon": anon + kib_per_min * t / 60,
                 "fds": fds, "threads": thr}) for t, rss, anon, fds, thr in rows]


def test_soak_short_nothing_grows_and_nothing_is_lost(tmp_path):
    r = run_soak(TRACERS, STEADY_S, WARMUP_S, SAMPLE_S, str(tmp_path), live_verdicts=False)
    figs = {k: v for k, v in r.items() if k not in ("series", "tracers_detail")}
    figs["tracers_rss"] = {n: {k: d.get(k) for k in ("rss_kib_median", "rss_slope_kib_min",
                                                     "rss_theil_sen_kib_min", "rss_floor_slope_kib_min", "rss_bound_kib_min",
                                                     "fds_min_max", "threads_min_max")}
                           for n, d in r["tracers_detail"].items()}
    print("SOAK-FIGURES " + json.dumps(figs), flush=True)
    assert r["ok"], r["problems"]
    # the workload ran at its stated rate (20 slow reads/s), and every stall arrived
    assert r["workload_ops_total"] >= 20 * (WARMUP_S + STEADY_S) * 0.8, r["workload_ops"]
    for name, d in r["tracers_detail"].items():
        assert d["workload_rows"] == r["workload_ops_total"], (name, d)
        assert d["delivery"]["spooled"] == d["stored_batches"] > 0, (name, d)
        assert d["delivery"]["unacked"] == d["delivery"]["dropped_batches"] == 0, (name, d)
    assert r["duplicates"] == 0
    for name, rows in r["series"].items():
        assert judge(with_leak(rows, 0), WARMUP_S)["ok"], name
        leaky = judge(with_leak(rows, 1024), WARMUP_S)
        assert not leaky["ok"] and "RSS grows" in leaky["why"], (name, leaky)
