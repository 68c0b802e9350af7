"""Collector ingest: 8 concurrent senders over loopback into one collector process.

Each sender is the tracer's own delivery (``wire.transport.AckedSender``: a DEALER, a
credit window of batches, resends after the ack timeout) over pre-encoded batches of IO
events and GPU samples, until every one is acknowledged; the collector receives, validates/decodes, commits
them to its SQLite store (synchronous=FULL, deduplicating) and acknowledges each
commit, on one core. The baseline, in the same run, is a bare ZeroMQ ROUTER socket
receiving the same bytes and doing nothing with them.

    python -m bench.bench_ingest [--quick]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _payloads(n_batches: int, per_batch: int, node: str) -> list:
    import numpy as np

    from stallscope.wire import codec
    from stallscope.wire.schema import Batch
    rng = np.random.default_rng(zlib.crc32(node.encode()))   # the same data in every process
    out = []
    t0 = 1_790_000_000_000_000_000
    boot = f"bench-{node}"
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
        # 8 GPUs sampled every 100 ms, busy or idle in 1-3 s phases; one process each
        gts = np.repeat(t0 + i * 250_000_000 + np.array([0, 100_000_000], np.uint64), 8)
        gpu_ix = np.tile(np.arange(8, dtype=np.uint64), 2)
        util = np.where(((gts // 1_000_000_000) + gpu_ix) % 3 == 0, 0, 95).astype(np.uint64)
        gpu = {"ts_ns": gts, "gpu": gpu_ix, "util": util, "synth": np.zeros(16, np.uint64)}
        gproc = {"ts_ns": gts[:8], "gpu": gpu_ix[:8], "pid": (4000 + gpu_ix[:8]).astype(np.uint64)}
        meta = {"delivery": {"boot_id": boot, "seq": i}, "gpu": {"sample_period_ns": {str(g): 100_000_000 for g in range(8)}}}
        out.append(codec.encode(Batch(node, i, {"io": t, "gpu": gpu, "gpu_proc": gproc},
                                      counters={"vfs.lost_ringbuf": 0}, meta=meta))[0])
    return out


class _ListSource:
    """The batches of one sender, in memory, as the tracer's spool hands them out
    (``wire.transport.Source``): read in order, released when acknowledged."""

    def __init__(self, payloads):
        self.payloads = payloads
        self.next = 0
        self.acked_through = -1

    def read_next(self, max_n: int, max_bytes: int) -> list:
        out, size = [], 0
        while self.next < len(self.payloads) and len(out) < max_n and size < max_bytes:
            out.append((self.next, self.payloads[self.next]))
            size += len(self.payloads[self.next])
            self.next += 1
        return out

    def ack_through(self, seq: int) -> None:
        self.acked_through = max(self.acked_through, seq)

    def sync(self, force: bool = False) -> None:
        pass


def _blast_sender(endpoint, payloads, start_evt, q=None):
    """The raw baseline's sender: every batch as a tracer frames it, as fast as the socket
    takes them (the bare ROUTER acknowledges nothing)."""
    import zmq

    from stallscope.wire.transport import batch_message
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.SNDHWM, 100000)
    s.connect(endpoint)
    start_evt.wait()
    for seq, p in enumerate(payloads):
        s.send_multipart(batch_message(seq, p), copy=False)
    s.close(linger=-1)
    ctx.term()


def _sender(endpoint, payloads, start_evt, q=None):
    """One tracer's delivery: the real AckedSender (credit window, resend after the ack
    timeout) until every batch is acknowledged; reports its counters."""
    from stallscope.wire.transport import AckedSender
    src = _ListSource(payloads)
    tx = AckedSender(endpoint, src)
    start_evt.wait()
    deadline = time.monotonic() + 300
    while src.acked_through < len(payloads) - 1 and time.monotonic() < deadline:
        tx.pump(50)
    if q is not None:
        q.put({"acked": tx.acked, "resent": tx.resent, "duplicates": tx.duplicates,
               "complete": src.acked_through == len(payloads) - 1})
    tx.close()


def _collector_proc(endpoint, store, total_msgs, q, raw, live_on=True, whole_window=False, stop=None):
    os.sched_setaffinity(0, {0})
    from stallscope.wire.transport import Receiver
    if raw:
        rx = Receiver(endpoint)
        q.put("ready")
        got = 0
        nbytes = 0
        idle0 = time.monotonic()
        c0, t0 = time.process_time(), None
        while t0 is None or got < total_msgs:
            before = time.monotonic()
            msgs = rx.recv_many(max_msgs=512, timeout_ms=1 if t0 is None else 5000)
            if not msgs:
                if t0 is None and before - idle0 < 60:
                    continue
                break
            if t0 is None:
                t0 = before         # as the collector's clock: before the first receive
            got += len(msgs)
            nbytes += sum(len(m[-1]) for m in msgs)
        t0 = time.monotonic() if t0 is None else t0
        q.put({"msgs": got, "bytes": nbytes, "wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0})
        rx.close()
        return
    import functools

    from stallscope import printers
    from stallscope.collector.server import Collector
    from stallscope.printers import LiveVerdicts, VerdictPrinter
    if whole_window:        # the reference: every run blames the whole window (as before)
        printers.LiveAnalyzer = functools.partial(printers.LiveAnalyzer, incremental=False)
    verdicts = []
    live = LiveVerdicts(VerdictPrinter(as_json=True, out=_Sink(verdicts)))
    col = Collector(endpoint, store, log=lambda m: None, on_batches=live if live_on else None)
    prof = None
    if os.environ.get("STALLSCOPE_BENCH_PROFILE"):     # where the collector's CPU goes (pstats file)
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    q.put("ready")
    # the clocks start before the step that receives the first batch (its poll waits at
    # most 1 ms for it), so that step's decoding, commit and analysis are counted
    c0, t0 = None, None
    idle_since = time.monotonic()
    while col.accepted + col.rejected < total_msgs and time.monotonic() - idle_since < 60:
        before, cpu_before = time.monotonic(), time.process_time()
        n = col.step(timeout_ms=1 if t0 is None else 200)
        if n == 0:
            continue
        idle_since = time.monotonic()
        if t0 is None:
            t0, c0 = before, cpu_before
    live.flush()
    if t0 is None:                      # nothing came (the senders failed): an empty result
        t0, c0 = time.monotonic(), time.process_time()
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.environ["STALLSCOPE_BENCH_PROFILE"])
    q.put({"msgs": col.accepted, "events": col.events, "rejected": col.rejected,
           "verdict_lines": len(verdicts),
           "wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0})
    # then serve on, as a collector does, until the senders are done: an acknowledgement a
    # full pipe could not take (counted in acks_unsent) is answered when its batch is resent
    while stop is not None and not stop.wait(0):
        col.step(timeout_ms=50)
    col.close()


class _Sink:
    """A file-like printer target that keeps the lines (counted, not printed)."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, s):
        if s.strip():
            self.lines.append(s)

    def flush(self):
        pass


def run(n_senders=8, n_batches=40, per_batch=5000, raw=False, tmp=None, payloads=None, live_on=True,
        whole_window=False) -> dict:
    ctx = mp.get_context("fork")
    payloads = payloads or [_payloads(n_batches, per_batch, f"node{i}") for i in range(n_senders)]
    store = os.path.join(tmp or tempfile.mkdtemp(), f"ingest-{'raw' if raw else 'store'}.db")
    endpoint = "tcp://127.0.0.1:0"
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    q = ctx.Queue()
    total = sum(len(p) for p in payloads)
    stop = ctx.Event()
    col = ctx.Process(target=_collector_proc, args=(endpoint, store, total, q, raw, live_on, whole_window, stop))
    col.start()
    assert q.get(timeout=60) == "ready"
    start = ctx.Event()
    sq = ctx.Queue()
    senders = [ctx.Process(target=_blast_sender if raw else _sender, args=(endpoint, payloads[i], start, sq))
               for i in range(len(payloads))]
    for p in senders:
        p.start()
    time.sleep(0.5)
    start.set()
    try:
        res = q.get(timeout=600)
        if not raw:
            got = [sq.get(timeout=360) for _ in senders]      # (a sender gives up after 300 s)
            res["resent"] = sum(g["resent"] for g in got)
            res["complete"] = all(g["complete"] for g in got) and res["msgs"] == total
    finally:
        stop.set()
    for p in senders:
        p.join(60)
    col.join(60)
    res["events_sent"] = total * per_batch
    res["bytes_sent"] = sum(len(p) for ps in payloads for p in ps)
    return res


def main(quick=False, reps=5):
    """Live verdicts on (the figure): ``reps`` runs; without live verdicts and the bare
    ROUTER (the baselines): 3 runs each, interleaved. 40 s of 8 nodes' data (3.2M events)
    per run, so a run lasts seconds at the rates measured."""
    import statistics
    kw = {"n_batches": 40, "per_batch": 2000} if quick else {"n_batches": 160, "per_batch": 2500}
    payloads = [_payloads(kw["n_batches"], kw["per_batch"], f"node{i}") for i in range(8)]
    raws, fulls, stores = [], [], []
    for i in range(3 if quick else reps):
        fulls.append(run(raw=False, payloads=payloads, **kw))
        if i < 3:
            raws.append(run(raw=True, payloads=payloads, **kw))
            stores.append(run(raw=False, payloads=payloads, live_on=False, **kw))
    ev = fulls[0]["events_sent"]
    rate = [f["events"] / f["wall_s"] for f in fulls]
    cpu_rate = [f["events"] / f["cpu_s"] for f in fulls]
    raw_rate = [ev / r["wall_s"] for r in raws]
    med = statistics.median(rate)
    out = {"bench": "collector_ingest", "senders": 8, "live_verdicts": True, "runs": len(fulls),
           "events_per_run": ev, "payload_mib": round(fulls[0]["bytes_sent"] / 2**20, 1),
           "wire_bytes_per_event": round(fulls[0]["bytes_sent"] / ev, 2),
           "run_wall_s": [round(f["wall_s"], 2) for f in fulls],
           "collector_events_per_s_wall_median": round(med),
           "collector_events_per_s_wall_min_max": [round(min(rate)), round(max(rate))],
           "collector_events_per_cpu_s_median": round(statistics.median(cpu_rate)),
           "accepted_events": [f["events"] for f in fulls], "rejected": [f["rejected"] for f in fulls],
           "verdict_lines": [f["verdict_lines"] for f in fulls],
           "resent_batches": [f["resent"] for f in fulls],
           "complete_runs": sum(f["complete"] for f in fulls + stores),
           "incomplete_runs": sum(not f["complete"] for f in fulls + stores),
           "baseline_raw_router_events_per_s_wall_median": round(statistics.median(raw_rate)),
           "ratio_to_raw_router": round(med / statistics.median(raw_rate), 3),
           "without_live_verdicts_events_per_s_wall_median": round(statistics.median(
               f["events"] / f["wall_s"] for f in stores)),
           "goal_events_per_s": 1_000_000,
           "machine": f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
