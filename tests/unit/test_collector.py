"""The collector over real ZeroMQ sockets: many tracers at once, restarts, bad input."""

import multiprocessing as mp
import sqlite3

import numpy as np

from stallscope.collector.server import Collector
from stallscope.collector.store import Store, load_batches
from stallscope.wire.schema import Batch
from stallscope.wire.transport import Sender
from tests.netutil import free_port as _port


def _batch(node, seq, n):
    t = {"ts_ns": np.arange(n, dtype=np.uint64) + np.uint64(10**18 + seq * 10**6),
         "dur_ns": np.full(n, 20_000_000, np.uint64), "pid": np.full(n, 100 + seq, np.uint64),
         "tid": np.full(n, 100 + seq, np.uint64), "comm": np.array([node] * n, dtype=object),
         "op": np.array(["read"] * n, dtype=object), "bytes": np.full(n, 4096, np.int64),
         "path": np.array([f"/data/{node}/{seq}"] * n, dtype=object), "fs": np.array(["nfs"] * n, dtype=object),
         "dev": np.zeros(n, np.uint64), "ino": np.arange(n, dtype=np.uint64), "cgroup": np.zeros(n, np.uint64),
         "method": np.array(["tracepoint"] * n, dtype=object)}
    return Batch(node, seq, {"io": t}, counters={"vfs.lost_ringbuf": seq})


def _tracer(endpoint, node, n_batches):
    s = Sender(endpoint)
    for seq in range(n_batches):
        assert s.send(_batch(node, seq, 7 + seq))
    s.close()


def test_eight_tracers_at_once_then_restart(tmp_path):
    db = str(tmp_path / "store.db")
    ep = f"tcp://127.0.0.1:{_port()}"
    col = Collector(ep, db, log=lambda m: None)
    ctx = mp.get_context("spawn")      # fresh interpreters: no ZeroMQ context crosses a fork
    procs = [ctx.Process(target=_tracer, args=(ep, f"node{i}", 13)) for i in range(8)]
    for p in procs:
        p.start()
    expected = 8 * 13
    for _ in range(300):
        col.step(timeout_ms=100)
        if col.accepted >= expected:
            break
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert col.accepted == expected and col.rejected == 0
    col.close()
    # a restarted collector on the same store still has every accepted batch
    batches = load_batches(db)
    assert len(batches) == expected
    by_node = {}
    for b in batches:
        by_node.setdefault(b.node, []).append(b.seq)
    assert sorted(by_node) == [f"node{i}" for i in range(8)]
    assert all(sorted(v) == list(range(13)) for v in by_node.values())
    assert sum(b.n_events() for b in batches) == 8 * sum(7 + s for s in range(13))
    col2 = Collector(ep, db, log=lambda m: None)
    s = Sender(ep)
    s.send(_batch("node9", 0, 3))
    for _ in range(50):
        if col2.step(timeout_ms=100):
            break
    s.close()
    col2.close()
    assert Store(db).stats()["batches"] == expected + 1


def test_rejects_are_stored_with_reasons(tmp_path):
    db = str(tmp_path / "s.db")
    ep = f"tcp://127.0.0.1:{_port()}"
    col = Collector(ep, db, log=lambda m: None)
    s = Sender(ep)
    s.send_raw(b"\x92\x01\x02")
    s.send(_batch("n", 0, 2))
    got = 0
    for _ in range(50):
        got += col.step(timeout_ms=100)
        if got >= 2:
            break
    s.close()
    col.close()
    con = sqlite3.connect(db)
    (reason,) = con.execute("SELECT reason FROM rejects").fetchone()
    assert "top level" in reason
    assert con.execute("SELECT count(*) FROM batches").fetchone()[0] == 1


def test_dead_collector_sender_never_blocks_and_counts():
    s = Sender(f"tcp://127.0.0.1:{_port()}", hwm=5)
    sent = [s.send(_batch("n", i, 10)) for i in range(40)]
    assert not all(sent)
    assert s.dropped_batches == sent.count(False) and s.dropped_events == 10 * s.dropped_batches
    s.sock.setsockopt(__import__("zmq").LINGER, 0)
    s.close()
