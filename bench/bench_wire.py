"""Bytes on the wire as a node produces them: `python -m bench wire [--quick]` (no root).

Real nodes emit few stalls: a batch (250 ms while events flow) holds a handful to a hundred,
from several processes and files, next to the counters, clock, histograms and GPU samples
every batch carries. So the figures are:

  bytes_per_event  batches of 4, 16 and 100 stalls (io rows of 3-8 pids, 2-40 files, mixed
                   ops, log-normal durations): the batch's encoded size minus the same batch
                   without the stalls, per stall; and with the envelope included
  per_hour         bytes per node per hour at 0, 1, 10 and 100 stalls/s, with 8 GPUs sampled
                   every 100 ms and the agent's batch period (250 ms while events flow, a
                   heartbeat each second otherwise)

Baselines in the same run: the same rows as JSON lines (what `stallscope trace --json`
writes), and the favourable case the old figure used (one pid re-reading one file, 5000 rows).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stallscope.wire import codec  # noqa: E402
from stallscope.wire.schema import Batch, rows  # noqa: E402

T0 = 1_790_000_000_000_000_000
OPS = ("read", "pread64", "write", "fsync", "openat", "stat", "page_fault")


def _meta(seq: int, hist_every: int = 2) -> tuple:
    """counters, hist, meta of the shape the agent sends (every default family loaded); the
    histograms in every ``hist_every``-th batch (the agent re-reads and sends them every 10 s)."""
    fams = ("vfs", "tcp", "block", "nfs", "rdma", "sched")
    counters = {f"{f}.{k}": 0 for f in fams for k in ("lost_ringbuf", "lost_inflight_collision", "emitted",
                                                       "below_threshold", "no_start", "lost_storm_tail",
                                                       "odd_records")}
    counters.update({"vfs.shed": 0, "vfs.shed_raises": 0, "tick_errors": 0, "clock.steps": 0,
                     "proc.cached": 412, "proc.forgotten": 9, "proc.pid_reuse_seen": 0, "tcp.retransmits": 0,
                     "tcp.retransmit_failed": 0, "tcp.retransmits_untraced": 0, "sink.dropped": 0})
    rng = np.random.default_rng(seq)
    hist = {"vfs": {op: rng.integers(0, 5000, 32).tolist() for op in ("read", "write", "pread64", "fsync")},
            "block": {"blk_read": rng.integers(0, 500, 32).tolist()}} if seq % hist_every == 0 else {}
    meta = {"clock": {"wall_minus_mono_ns": 1_789_000_000_000_000_000, "sent_ns": T0 + seq, "ntp_synced": True,
                      "ntp_maxerror_ns": 16_000_000, "uncertainty_ns": 16_000_400, "steps": 0, "last_step_ns": 0},
            "abi": 2, "schema": 2, "min_latency_ns": 10_000_000,
            "attach": {f: f"syscall tracepoints read write pread64 pwrite64 ({f})" for f in fams},
            "not_loaded": {}, "final": False,
            "gpu": {"sample_period_ns": {str(g): 100_000_000 for g in range(8)}},
            "delivery": {"boot_id": "0b3c1d9e-5d4e-4c1b-9d1e-3f7a2b6c8d90", "seq": seq}}
    return counters, hist, meta


def _gpu(seq: int, span_ns: int) -> dict:
    n = max(1, span_ns // 100_000_000)
    ts = np.repeat(T0 + seq * span_ns + np.arange(n, dtype=np.uint64) * 100_000_000, 8).astype(np.uint64)
    g = np.tile(np.arange(8, dtype=np.uint64), n)
    return {"gpu": {"ts_ns": ts, "gpu": g, "util": np.full(len(ts), 97, np.uint64), "synth": np.zeros(len(ts), np.uint64)},
            "gpu_proc": {"ts_ns": ts[:8], "gpu": g[:8], "pid": (7000 + g[:8]).astype(np.uint64)}}


def stalls(k: int, rng, favourable: bool = False) -> dict:
    n_pid = 1 if favourable else int(rng.integers(3, 9))
    n_file = 1 if favourable else int(rng.integers(2, 41))
    pid = (7000 + rng.integers(0, n_pid, k)).astype(np.uint64)
    f = rng.integers(0, n_file, k)
    files = np.array([f"/mnt/datasets/imagenet/train/shard-{i:05d}.tar" for i in range(n_file)], dtype=object)
    ops = np.array(OPS, dtype=object)[np.zeros(k, int) if favourable else rng.integers(0, len(OPS), k)]
    return {"ts_ns": np.sort(T0 + rng.integers(0, 250_000_000, k)).astype(np.uint64),
            "dur_ns": np.exp(rng.normal(np.log(30e6), 1.0, k)).astype(np.uint64),
            "pid": pid, "tid": pid + rng.integers(0, 6, k).astype(np.uint64),
            "comm": np.array(["pt_data_worker", "python"], dtype=object)[(pid % 2).astype(int)],
            "op": ops, "bytes": rng.integers(0, 1 << 20, k).astype(np.int64), "path": files[f],
            "fs": np.array(["nfs"] * k, dtype=object), "dev": np.full(k, 0x2d, np.uint64),
            "ino": (1_000_000 + f).astype(np.uint64), "cgroup": np.full(k, 8812, np.uint64),
            "method": np.array(["fentry"] * k, dtype=object), "count": np.ones(k, np.uint64),
            "blocked_ns": np.zeros(k, np.uint64)}


def _size(tables, seq, hist_every: int = 2) -> int:
    counters, hist, meta = _meta(seq, hist_every)
    return len(codec.encode(Batch("gpu-node-017", seq, tables, counters, hist, meta))[0])


def bytes_per_event(reps: int) -> dict:
    rng = np.random.default_rng(3)
    out = {}
    for k in (4, 16, 100):
        per, with_env, js = [], [], []
        for r in range(reps):
            st = stalls(k, rng)
            base = _gpu(r, 250_000_000)
            full = _size({**base, "io": st}, r, hist_every=8)     # a stall batch every 250 ms
            empty = _size(base, r, hist_every=8)
            per.append((full - empty) / k)
            with_env.append(full / k)
            js.append(sum(len(json.dumps(row)) + 1 for row in rows("io", st, node="gpu-node-017")) / k)
        out[f"{k}_stalls"] = {"bytes_per_stall_median": round(float(np.median(per)), 1),
                              "bytes_per_stall_min_max": [round(min(per), 1), round(max(per), 1)],
                              "bytes_per_stall_with_envelope_median": round(float(np.median(with_env)), 1),
                              "baseline_json_lines_bytes_per_stall": round(float(np.median(js)), 1)}
    fav = stalls(5000, rng, favourable=True)
    out["favourable_5000_rows_one_pid_one_file"] = round(
        (_size({"io": fav}, 1) - _size({}, 1)) / 5000, 1)
    return out


def per_hour() -> dict:
    """Bytes per node per hour, as the agent cuts batches: every 250 ms while stalls come (4
    a second), one a second otherwise (GPU samples alone wait for it), each with 8 GPUs'
    samples since the last batch; histograms every 10 s."""
    rng = np.random.default_rng(4)
    out = {}
    for rate in (0, 1, 10, 100):
        per_s = 4 if rate else 1
        span = 1_000_000_000 // per_s
        total = 0
        n = 80                                   # batches sampled, scaled to an hour
        for i in range(n):
            k = rng.poisson(rate / per_s) if rate else 0
            tables = _gpu(i, span)
            if k:
                tables["io"] = stalls(int(k), rng)
            total += _size(tables, i, hist_every=10 * per_s)
        out[f"{rate}_stalls_per_s"] = {"mib_per_hour": round(total / n * per_s * 3600 / 2**20, 1),
                                       "batches_per_s": per_s}
    return out


def main(quick: bool = False):
    res = {"bench": "wire_bytes", **bytes_per_event(5 if quick else 25), "per_hour_8_gpus": per_hour(),
           "machine": f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
