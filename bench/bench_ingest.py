"""Collector ingest: 8 concurrent senders over loopback into one collector process.

Each sender pushes pre-encoded batches of IO events (the tracer's own codec and
transport); the collector receives, validates/decodes and commits them to its
SQLite store on one core. The baseline, in the same run, is a bare ZeroMQ PULL
socket receiving the same bytes and doing nothing with them.

    python -m bench.bench_ingest [--quick]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _payloads(n_batches: int, per_batch: int, node: str) -> list:
    import numpy as np

    from stallscope.wire import codec
    from stallscope.wire.schema import Batch
    rng = np.random.default_rng(hash(node) & 0xFFFF)
    out = []
    t0 = 1_790_000_000_000_000_000
    for i in range(n_batches):
        n = per_batch
        ts = np.sort(rng.integers(0, 250_000_000, n)).astype(np.uint64) + np.uint64(t0 + i * 250_000_000)
        shard = rng.integers(0, 200, n)
        t = {"ts_ns": ts, "dur_ns": rng.integers(10_000_000, 500_000_000, n).astype(np.uint64),
             "pid": (4000 + shard % 8).astype(np.uint64), "tid": (4100 + shard % 32).astype(np.uint64),
             "comm": np.array(["pt_data_worker"] * n, dtype=object),
             "op": np.array(["read", "pread"], dtype=object)[shard % 2],
             "bytes": np.full(n, 1 << 20, np.int64),
             "path": np.array([f"/mnt/data/train/shard-{k:05d}.tar" for k in range(200)], dtype=object)[shard],
             "fs": np.array(["nfs"] * n, dtype=object), "dev": np.full(n, 52, np.uint64),
             "ino": (shard + 10_000_000_000).astype(np.uint64), "cgroup": np.full(n, 9, np.uint64),
             "method": np.array(["fentry"] * n, dtype=object)}
        out.append(codec.encode(Batch(node, i, {"io": t}, counters={"vfs.lost_ringbuf": 0}))[0])
    return out


def _sender(endpoint, payloads, start_evt):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100000)
    s.connect(endpoint)
    start_evt.wait()
    for p in payloads:
        s.send(p, copy=False)
    s.close(linger=-1)
    ctx.term()


def _collector_proc(endpoint, store, total_msgs, q, raw):
    os.sched_setaffinity(0, {0})
    from stallscope.wire.transport import Receiver
    if raw:
        rx = Receiver(endpoint)
        q.put("ready")
        got = 0
        nbytes = 0
        c0, t0 = time.process_time(), None
        while got < total_msgs:
            msgs = rx.recv_many(max_msgs=512, timeout_ms=5000)
            if not msgs:
                break
            if t0 is None:
                t0 = time.monotonic()
            got += len(msgs)
            nbytes += sum(len(m[0]) for m in msgs)
        q.put({"msgs": got, "bytes": nbytes, "wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0})
        rx.close()
        return
    from stallscope.collector.server import Collector
    col = Collector(endpoint, store, log=lambda m: None)
    q.put("ready")
    c0, t0 = time.process_time(), None
    while col.accepted + col.rejected < total_msgs:
        n = col.step(timeout_ms=5000)
        if n == 0:
            break
        if t0 is None:
            t0 = time.monotonic()
    q.put({"msgs": col.accepted, "events": col.events, "rejected": col.rejected,
           "wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0})
    col.close()


def run(n_senders=8, n_batches=40, per_batch=5000, raw=False, tmp=None) -> dict:
    ctx = mp.get_context("fork")
    payloads = [_payloads(n_batches, per_batch, f"node{i}") for i in range(n_senders)]
    store = os.path.join(tmp or tempfile.mkdtemp(), f"ingest-{'raw' if raw else 'store'}.db")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    endpoint = f"tcp://127.0.0.1:{port}"
    q = ctx.Queue()
    total = n_senders * n_batches
    col = ctx.Process(target=_collector_proc, args=(endpoint, store, total, q, raw))
    col.start()
    assert q.get(timeout=60) == "ready"
    start = ctx.Event()
    senders = [ctx.Process(target=_sender, args=(endpoint, payloads[i], start)) for i in range(n_senders)]
    for p in senders:
        p.start()
    time.sleep(0.5)
    start.set()
    res = q.get(timeout=600)
    for p in senders:
        p.join(60)
    col.join(60)
    res["events_sent"] = total * per_batch
    res["bytes_sent"] = sum(len(p) for ps in payloads for p in ps)
    return res


def main(quick=False):
    kw = {"n_batches": 8, "per_batch": 2000} if quick else {}
    raw = run(raw=True, **kw)
    full = run(raw=False, **kw)
    ev = full["events_sent"]
    out = {"bench": "collector_ingest", "senders": 8, "events": ev, "payload_mib": round(full["bytes_sent"] / 2**20, 1),
           "wire_bytes_per_event": round(full["bytes_sent"] / ev, 2),
           "collector_events_per_s_wall": round(full["events"] / full["wall_s"]),
           "collector_events_per_cpu_s": round(full["events"] / full["cpu_s"]),
           "collector_accepted_events": full["events"], "rejected": full["rejected"],
           "raw_zmq_events_per_s_wall": round(ev / raw["wall_s"]),
           "ratio_to_raw_zmq": round((full["events"] / full["wall_s"]) / (ev / raw["wall_s"]), 3),
           "goal_events_per_s": 1_000_000,
           "machine": f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
