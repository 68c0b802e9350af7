"""Acknowledged delivery over real ZeroMQ sockets in one process: the collector acknowledges
only what it has committed, stores a resent batch once, the sender resends what was not
acknowledged in time, keeps a bounded window, and a rack collector forwards the same way."""

import sqlite3
import time

import numpy as np
import pytest
import zmq

from stallscope.collector.server import Collector
from stallscope.collector.store import Store, load_batches
from stallscope.wire import codec
from stallscope.wire.schema import Batch
from stallscope.wire.transport import (
    ACK_DUPLICATE,
    ACK_STORED,
    AckedSender,
    Receiver,
    StreamSink,
    batch_message,
    make_socket,
    unpack_acks,
)
from tests.netutil import free_port


def io_batch(node, seq, n, boot="boot-a"):
    t = {"ts_ns": np.arange(n, dtype=np.uint64) + np.uint64(10**18 + seq * 10**6),
         "dur_ns": np.full(n, 20_000_000, np.uint64), "pid": np.full(n, 100 + seq, np.uint64),
         "tid": np.full(n, 100 + seq, np.uint64), "comm": np.array([node] * n, dtype=object),
         "op": np.array(["read"] * n, dtype=object), "bytes": np.full(n, 4096, np.int64),
         "path": np.array([f"/data/{node}/{seq}"] * n, dtype=object), "fs": np.array(["nfs"] * n, dtype=object),
         "dev": np.zeros(n, np.uint64), "ino": np.arange(n, dtype=np.uint64), "cgroup": np.zeros(n, np.uint64),
         "method": np.array(["tracepoint"] * n, dtype=object)}
    meta = {"delivery": {"boot_id": boot, "seq": seq}} if boot is not None else {}
    return Batch(node, seq, {"io": t}, counters={"vfs.lost_ringbuf": 0}, meta=meta)


def payload(node, seq, n, boot="boot-a"):
    return codec.encode(io_batch(node, seq, n, boot))[0]


class ListSource:
    """An in-memory source for AckedSender: what a spool does, minus the disk."""

    def __init__(self, records):
        self.records = list(records)
        self.pos = 0
        self.acked = -1

    def read_next(self, max_n, max_bytes):
        out, total = [], 0
        for seq, p in self.records[self.pos:self.pos + max_n]:
            if out and total + len(p) > max_bytes:
                break
            out.append((seq, p))
            total += len(p)
        self.pos += len(out)
        return out

    def ack_through(self, seq):
        self.acked = seq

    def sync(self, force=False):
        pass


def pump_until(cond, *steppers, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in steppers:
            s()
        if cond():
            return True
    return False


def stored_keys(db):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT node, boot_id, dseq FROM batches ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.fixture
def ep():
    return f"tcp://127.0.0.1:{free_port()}"


def test_ack_comes_only_after_the_commit(tmp_path, ep):
    db = str(tmp_path / "s.db")
    col = Collector(ep, db, log=lambda m: None)
    seen_at_ack = []
    real_ack = col.rx.ack

    def checking_ack(peer, acks):          # what another connection sees when the ack leaves
        con = sqlite3.connect(db)
        have = {r[0] for r in con.execute("SELECT dseq FROM batches")}
        con.close()
        seen_at_ack.extend((seq, seq in have) for seq, _ in acks)
        real_ack(peer, acks)
    col.rx.ack = checking_ack
    src = ListSource([(s, payload("n1", s, 7)) for s in range(5)])
    tx = AckedSender(ep, src)
    assert pump_until(lambda: tx.acked == 5, lambda: col.step(20), lambda: tx.pump(20))
    assert src.acked == 4 and not tx.inflight
    assert sorted(seen_at_ack) == [(s, True) for s in range(5)]
    tx.close()
    col.close()


def test_failed_commit_is_not_acknowledged_and_the_resend_lands_once(tmp_path, ep):
    db = str(tmp_path / "s.db")
    logs = []
    col = Collector(ep, db, log=logs.append)
    real_add = col.store.add
    fail = {"n": 2}

    def flaky_add(items, rejects=()):
        if fail["n"]:
            fail["n"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_add(items, rejects)
    col.store.add = flaky_add
    src = ListSource([(s, payload("n1", s, 3)) for s in range(3)])
    tx = AckedSender(ep, src, ack_timeout_s=0.3)
    assert pump_until(lambda: tx.acked == 3, lambda: col.step(20), lambda: tx.pump(20))
    assert col.store_errors >= 1 and any("store commit failed" in m for m in logs)
    # each failed commit held at least one batch, and each of those was resent: at least 2
    # (3 when one step took all three; on a loaded machine the steps may take one each)
    assert tx.resent >= 2 and tx.timeouts >= 1
    # each stored exactly once; in any order: when the steps take one batch each, batch 2's
    # commit is the first to succeed and the resent 0 and 1 land after it (one CI run)
    assert sorted(k[2] for k in stored_keys(db)) == [0, 1, 2]
    tx.close()
    col.close()


def test_resent_batches_are_stored_once_and_acknowledged_as_duplicates(tmp_path, ep):
    db = str(tmp_path / "s.db")
    col = Collector(ep, db, log=lambda m: None)
    dealer = make_socket(zmq.DEALER)
    dealer.connect(ep)
    p = payload("n1", 41, 5)
    for hop_seq in (1, 2, 3):                 # the same batch three times (resends)
        dealer.send_multipart(batch_message(hop_seq, p))
    other_boot = payload("n1", 41, 5, boot="boot-b")     # same seq after a reboot: a new batch
    dealer.send_multipart(batch_message(4, other_boot))
    acks = []
    assert pump_until(lambda: len(acks) == 4, lambda: col.step(20),
                      lambda: acks.extend(unpack_acks(dealer.recv_multipart()))
                      if dealer.poll(20) else None)
    assert sorted(acks) == [(1, ACK_STORED), (2, ACK_DUPLICATE), (3, ACK_DUPLICATE), (4, ACK_STORED)]
    assert col.accepted == 2 and col.duplicates == 2 and col.events == 10
    assert stored_keys(db) == [("n1", "boot-a", 41), ("n1", "boot-b", 41)]
    dealer.close(0)
    col.close()


def test_no_ack_in_time_resends_from_the_oldest(tmp_path, ep):
    db = str(tmp_path / "s.db")
    rx = Receiver(ep)                          # a collector that loses what it received
    src = ListSource([(s, payload("n1", s, 2)) for s in range(4)])
    tx = AckedSender(ep, src, ack_timeout_s=0.3)
    got = []
    assert pump_until(lambda: len(got) >= 4, lambda: tx.pump(20), lambda: got.extend(rx.recv_many(timeout_ms=20)))
    assert tx.sent == 4 and tx.resent == 0
    rx.close()                                 # ... and goes away
    col = Collector(ep, db, log=lambda m: None)
    assert pump_until(lambda: tx.acked == 4, lambda: tx.pump(20), lambda: col.step(20))
    assert tx.resent >= 4 and tx.timeouts >= 1
    assert [k[2] for k in stored_keys(db)] == [0, 1, 2, 3]
    tx.close()
    col.close()


def test_window_bounds_what_is_in_flight(ep):
    rx = Receiver(ep)                          # receives, never answers
    src = ListSource([(s, b"x" * 10) for s in range(50)])
    tx = AckedSender(ep, src, window=8, ack_timeout_s=60)
    got = []
    pump_until(lambda: len(got) >= 8, lambda: tx.pump(20), lambda: got.extend(rx.recv_many(timeout_ms=20)),
               timeout_s=5)
    for _ in range(20):
        tx.pump(10)
        got.extend(rx.recv_many(timeout_ms=10))
    assert len(got) == 8 and len(tx.inflight) == 8 and src.pos == 8
    # acknowledging the first three opens the window by three
    peer = bytes(got[0][0])
    rx.ack(peer, [(0, ACK_STORED), (1, ACK_STORED), (2, ACK_STORED)])
    assert pump_until(lambda: src.acked == 2, lambda: tx.pump(20), timeout_s=5)
    tx.pump(20)
    assert src.pos == 11 and len(tx.inflight) == 8
    tx.close()
    rx.close()


def test_byte_window_bounds_what_is_in_flight(ep):
    rx = Receiver(ep)
    src = ListSource([(s, b"x" * 1000) for s in range(50)])
    tx = AckedSender(ep, src, window=64, window_bytes=5000, ack_timeout_s=60)
    for _ in range(20):
        tx.pump(10)
    assert len(tx.inflight) == 5 and tx.inflight_bytes == 5000
    tx.close()
    rx.close()


def test_rejected_batches_are_given_up_and_counted(tmp_path, ep):
    db = str(tmp_path / "s.db")
    col = Collector(ep, db, log=lambda m: None)
    bad_delivery = codec.encode(Batch("n", 0, meta={"delivery": {"boot_id": "b", "seq": -1}}))[0]
    src = ListSource([(0, b"\x92\x01\x02"), (1, payload("n1", 1, 3)), (2, bad_delivery)])
    logs = []
    tx = AckedSender(ep, src, log=logs.append)
    assert pump_until(lambda: tx.acked + tx.rejected == 3, lambda: col.step(20), lambda: tx.pump(20))
    assert tx.rejected == 2 and tx.acked == 1 and src.acked == 2
    assert col.rejected == 2 and any("rejected batch 0" in m for m in logs)
    reasons = [r[0] for r in sqlite3.connect(db).execute("SELECT reason FROM rejects")]
    assert "top level" in reasons[0] and "delivery.seq" in reasons[1]
    tx.close()
    col.close()


def test_foreign_messages_are_rejected_not_fatal(tmp_path, ep):
    db = str(tmp_path / "s.db")
    col = Collector(ep, db, log=lambda m: None)
    d = make_socket(zmq.DEALER)
    d.connect(ep)
    d.send(b"hello")                                   # one frame, no sequence
    d.send_multipart([b"SSB1", b"\x00", b"x"])         # bad sequence frame
    assert pump_until(lambda: col.rejected == 2, lambda: col.step(20))
    assert "not a stallscope batch message" in col._last_reject
    d.close(0)
    col.close()


def test_secure_hook_runs_on_each_socket_before_bind_or_connect(tmp_path, ep):
    calls = []

    def secure(sock):
        calls.append((sock.type, sock.getsockopt(zmq.LAST_ENDPOINT)))
    col = Collector(ep, str(tmp_path / "s.db"), upstream=f"tcp://127.0.0.1:{free_port()}", log=lambda m: None,
                    secure=secure, upstream_secure=secure)
    sink = StreamSink(ep, str(tmp_path / "spool"), secure=secure, log=lambda m: None, close_timeout_s=0)
    assert sorted(calls) == sorted([(zmq.ROUTER, b""), (zmq.DEALER, b""), (zmq.DEALER, b"")])
    sink.close()
    col.close()

    def refuse(sock):
        raise ValueError("no key")
    with pytest.raises(ValueError, match="no key"):
        StreamSink(ep, str(tmp_path / "spool2"), secure=refuse, log=lambda m: None)


def test_stream_sink_end_to_end_through_a_collector_restart(tmp_path, ep):
    db = str(tmp_path / "s.db")
    logs = []
    sink = StreamSink(ep, str(tmp_path / "spool"), log=logs.append, ack_timeout_s=0.5, close_timeout_s=5)
    col = Collector(ep, db, log=lambda m: None)
    sent_events = 0
    for i in range(7):
        b = io_batch("n1", i, 11 + i, boot=None)
        sink(b)
        sent_events += b.n_events()
    assert pump_until(lambda: col.accepted == 7 and sink.spool.pending_records() == 0, lambda: col.step(20))
    col.close()                                          # collector down
    for i in range(7, 30):
        b = io_batch("n1", i, 3, boot=None)
        sink(b)
        sent_events += b.n_events()
    time.sleep(1.3)
    assert sink.spool.pending_records() == 23 and sink.sender.unreachable
    col = Collector(ep, db, log=lambda m: None)          # back on the same store
    assert pump_until(lambda: sink.spool.pending_records() == 0, lambda: col.step(20), timeout_s=30)
    sink.close()
    col.close()
    batches = load_batches(db)
    assert sorted(b.seq for b in batches) == list(range(30))
    assert sum(b.n_events() for b in batches) == sent_events
    assert len({(b.meta["delivery"]["boot_id"], b.meta["delivery"]["seq"]) for b in batches}) == 30
    c = sink.counters()
    assert c["acked"] == 30 and c["dropped_batches"] == 0 and c["unacked_batches"] == 0
    assert "30 acknowledged" in sink.summary()


def test_stream_sink_spool_full_drops_are_counted_and_ride_along(tmp_path, ep):
    logs = []
    sink = StreamSink(ep, str(tmp_path / "spool"), spool_max_bytes=3000, log=logs.append, close_timeout_s=0)
    for i in range(20):
        sink(io_batch("n1", i, 5, boot=None))            # ~400 bytes each, no collector
    assert sink.dropped_batches > 0 and sink.dropped_events == 5 * sink.dropped_batches
    assert sink.spool.pending_records() + sink.dropped_batches == 20
    assert sum("spool full" in m for m in logs) == 1     # logged once per episode
    sink.close()


def test_rack_forwards_upstream_acknowledged_and_resumes_after_restart(tmp_path):
    root_ep, rack_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    root_db, rack_db = str(tmp_path / "root.db"), str(tmp_path / "rack.db")
    root = Collector(root_ep, root_db, log=lambda m: None)
    rack = Collector(rack_ep, rack_db, upstream=root_ep, log=lambda m: None)
    sink = StreamSink(rack_ep, str(tmp_path / "spool"), log=lambda m: None, ack_timeout_s=0.5)
    for i in range(5):
        sink(io_batch("n1", i, 4, boot=None))
    assert pump_until(lambda: root.accepted == 5 and not rack.forward.pending(), rack.step, lambda: root.step(10))
    rack.close()
    # the rack goes down; batches it stored but did not forward go when it is back
    for i in range(5, 9):
        sink(io_batch("n1", i, 4, boot=None))
    rack2 = Collector(rack_ep, rack_db, upstream=root_ep, log=lambda m: None)
    assert pump_until(lambda: root.accepted == 9 and not rack2.forward.pending(), rack2.step, lambda: root.step(10))
    assert root.duplicates == 0             # the rack resumed where the root had acknowledged
    # a cursor lost since the last save: the root recognises what it already has
    rack2.close()
    con = sqlite3.connect(rack_db)
    con.execute("UPDATE forwarded SET acked_id = 0")
    con.commit()
    con.close()
    rack3 = Collector(rack_ep, rack_db, upstream=root_ep, log=lambda m: None)
    assert pump_until(lambda: root.duplicates == 9 and not rack3.forward.pending(), rack3.step,
                      lambda: root.step(10))
    assert root.accepted == 9 and rack3.up.acked == 9 and "upstream" in rack3.summary()
    sink.close()
    rack3.close()
    root.close()
    keys = stored_keys(root_db)
    assert len(keys) == 9 and keys == stored_keys(rack_db)


def test_old_stores_are_migrated_in_place(tmp_path):
    db = str(tmp_path / "old.db")
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE batches (id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL,
                              received_ns INTEGER NOT NULL, n_events INTEGER NOT NULL, payload BLOB NOT NULL);
        CREATE INDEX batches_node ON batches(node, seq);
        CREATE TABLE rejects (id INTEGER PRIMARY KEY, received_ns INTEGER NOT NULL, reason TEXT NOT NULL);
    """)
    old = payload("n1", 0, 3, boot=None)
    for _ in range(2):      # an old tracer restarted: the same (node, seq) twice, both kept
        con.execute("INSERT INTO batches(node, seq, received_ns, n_events, payload) VALUES ('n1', 0, 1, 3, ?)",
                    (old,))
    con.commit()
    con.close()
    st = Store(db)
    assert st.add([(io_batch("n1", 0, 3), payload("n1", 0, 3))]) == [True]
    assert st.add([(io_batch("n1", 0, 3), payload("n1", 0, 3))]) == [False]
    assert st.stats()["batches"] == 3
    st.close()
    assert len(load_batches(db)) == 3
