"""tracer -> ZeroMQ -> collector over loopback with real probes and the real CLI."""

import sqlite3
import subprocess
import time

import pytest

from stallscope.collector.store import load_batches
from stallscope.sim.slowfs import SlowFS
from tests.bpf.tracerun import ROOT, Trace, stallscope_argv
from tests.fixtures.workload import start_io
from tests.netutil import free_port

pytestmark = pytest.mark.bpf


def test_every_event_arrives_with_lost_counts(tmp_path):
    port = free_port()
    db = tmp_path / "store.db"
    col = subprocess.Popen(stallscope_argv("collect", "--bind", f"tcp://127.0.0.1:{port}", "--store", str(db)),
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        with SlowFS(delay_ms=120) as fs:
            fs.make_file("slow.bin", 1 << 20)
            w = start_io("read", fs.path("slow.bin"), count=13, size=4096)
            with Trace("--min-latency-ms", "50", "--collector", f"tcp://127.0.0.1:{port}",
                       "--spool-dir", str(tmp_path / "spool")) as t:
                res = w.go()
            t.stop()
        assert t.rc == 0, t.stderr
        time.sleep(1.0)
    finally:
        col.terminate()
        _, err = col.communicate(timeout=30)
    assert col.returncode == 0, err
    batches = load_batches(str(db))
    assert batches, err
    # every event the tracer printed is in the store, nothing more, nothing less
    stored = sorted((int(ts), int(p), str(path)) for b in batches if "io" in b.tables
                    for ts, p, path in zip(b.tables["io"]["ts_ns"], b.tables["io"]["pid"], b.tables["io"]["path"]))
    printed = sorted((e["ts_ns"], e["pid"], e["path"]) for e in t.events if e["type"] == "io")
    assert stored == printed
    assert sum(1 for e in t.events if e["type"] == "io" and e["pid"] == res.pid and e["op"] != "close"
               and e["path"].endswith("/slow.bin")) == 13
    # batches are numbered without gaps and carry the cumulative kernel counters
    seqs = [b.seq for b in batches]
    assert seqs == list(range(len(seqs)))
    last = batches[-1]
    assert last.meta["final"] is True
    for k in ("vfs.lost_ringbuf", "vfs.emitted", "vfs.lost_inflight_collision", "streamsink.dropped_batches"):
        assert k in last.counters, last.counters
    assert last.counters["vfs.lost_ringbuf"] == 0
    assert "accepted" in err
    # every batch carries its delivery identity; all were acknowledged before the tracer exited
    assert len({(b.meta["delivery"]["boot_id"], b.meta["delivery"]["seq"]) for b in batches}) == len(batches)
    assert f"{len(batches)} acknowledged" in t.stderr and "0 left unacknowledged" in t.stderr, t.stderr


def test_dead_collector_spools_and_keeps_running(tmp_path):
    """No collector listening: the tracer keeps tracing, records locally, keeps every batch
    in its spool for later, and exits promptly saying so."""
    port = free_port()
    rec = tmp_path / "rec.ssrec"
    with SlowFS(delay_ms=120) as fs:
        fs.make_file("slow.bin", 1 << 20)
        w = start_io("read", fs.path("slow.bin"), count=3, size=4096)
        with Trace("--min-latency-ms", "50", "--collector", f"tcp://127.0.0.1:{port}", "-o", str(rec),
                   "--spool-dir", str(tmp_path / "spool")) as t:
            res = w.go()
        t0 = time.monotonic()
        t.stop()
    assert t.rc == 0, t.stderr
    assert time.monotonic() - t0 < 8        # gives up waiting for acknowledgements of a dead collector
    assert len([e for e in t.events if e["pid"] == res.pid]) == 3
    recorded = load_batches(str(rec))
    assert sum(b.n_events() for b in recorded) >= 3
    assert "0 acknowledged" in t.stderr and f"{len(recorded)} left unacknowledged" in t.stderr, t.stderr
    assert "0 batches (0 events) dropped" in t.stderr


def test_malformed_batches_are_rejected_not_fatal(tmp_path):
    import zmq

    from stallscope.wire import codec
    from stallscope.wire.schema import Batch
    from stallscope.wire.transport import ACK_REJECTED, ACK_STORED, batch_message, make_socket, unpack_acks
    port = free_port()
    db = tmp_path / "store.db"
    col = subprocess.Popen(stallscope_argv("collect", "--bind", f"tcp://127.0.0.1:{port}", "--store", str(db)),
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        s = make_socket(zmq.DEALER)
        s.connect(f"tcp://127.0.0.1:{port}")
        good = codec.encode(Batch("n1", 0))[0]
        for i, payload in enumerate((b"garbage", good[: len(good) // 2], good, b"\x93\x01\x02\x03", good)):
            s.send_multipart(batch_message(i, payload))
        acks = []
        while len(acks) < 5 and s.poll(15000):
            acks += unpack_acks(s.recv_multipart())
        s.close(0)
        deadline = time.time() + 15
        while time.time() < deadline:
            time.sleep(0.3)
            try:
                n = sqlite3.connect(db).execute("SELECT count(*) FROM batches").fetchone()[0]
            except sqlite3.Error:
                continue
            if n >= 2:
                break
    finally:
        col.terminate()
        _, err = col.communicate(timeout=30)
    assert col.returncode == 0
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM batches").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == 3
    assert "rejected" in err and "2 batches" in err
    # the garbage is answered "rejected" (the sender gives it up); both copies of the good
    # batch "stored": it has no delivery identity, so nothing could call it a resend
    assert sorted(acks) == [(0, ACK_REJECTED), (1, ACK_REJECTED), (2, ACK_STORED), (3, ACK_REJECTED),
                            (4, ACK_STORED)]
