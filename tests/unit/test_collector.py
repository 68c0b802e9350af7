"""The collector over real ZeroMQ sockets: many tracers at once, restarts, bad input."""

import multiprocessing as mp
import sqlite3
import time

import zmq

from stallscope.collector.server import Collector
from stallscope.collector.store import Store, load_batches
from stallscope.wire import codec
from stallscope.wire.transport import StreamSink, batch_message, make_socket
from tests.netutil import free_port as _port
from tests.unit.test_delivery import io_batch


def _batch(node, seq, n):
    return io_batch(node, seq, n, boot=None)


def _tracer(endpoint, node, n_batches, spool_dir):
    s = StreamSink(endpoint, spool_dir, close_timeout_s=60)
    for seq in range(n_batches):
        s(_batch(node, seq, 7 + seq))
    assert s.flush(60), s.summary()
    s.close()


def test_eight_tracers_at_once_then_restart(tmp_path):
    db = str(tmp_path / "store.db")
    ep = f"tcp://127.0.0.1:{_port()}"
    col = Collector(ep, db, log=lambda m: None)
    ctx = mp.get_context("spawn")      # fresh interpreters: no ZeroMQ context crosses a fork
    procs = [ctx.Process(target=_tracer, args=(ep, f"node{i}", 13, str(tmp_path / f"spool{i}"))) for i in range(8)]
    for p in procs:
        p.start()
    expected = 8 * 13
    deadline = time.monotonic() + 60
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        col.step(timeout_ms=100)        # the tracers exit once all they sent is acknowledged
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
    s = StreamSink(ep, str(tmp_path / "spool9"))
    s(_batch("node9", 0, 3))
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
    s = make_socket(zmq.DEALER)
    s.connect(ep)
    s.send_multipart(batch_message(0, b"\x92\x01\x02"))
    s.send_multipart(batch_message(1, codec.encode(_batch("n", 0, 2))[0]))
    got = 0
    for _ in range(50):
        got += col.step(timeout_ms=100)
        if got >= 2:
            break
    s.close(0)
    col.close()
    con = sqlite3.connect(db)
    (reason,) = con.execute("SELECT reason FROM rejects").fetchone()
    assert "top level" in reason
    assert con.execute("SELECT count(*) FROM batches").fetchone()[0] == 1


def test_dead_collector_sink_never_blocks_and_spools(tmp_path):
    """No collector: every batch waits in the spool (nothing dropped while it has room),
    and the agent's call returns at once."""
    s = StreamSink(f"tcp://127.0.0.1:{_port()}", str(tmp_path / "spool"), close_timeout_s=1)
    t0 = time.monotonic()
    for i in range(40):
        s(_batch("n", i, 10))
    assert time.monotonic() - t0 < 2.0
    time.sleep(1.3)             # unreachable: no collector for a second
    assert s.dropped_batches == 0 and s.spool.pending_records() == 40
    assert s.sender.sent == 0 and s.sender.unreachable
    s.close()
    assert "40 left unacknowledged" in s.summary()
