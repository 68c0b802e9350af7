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
            with Trace("--min-latency-ms", "50", "--collector", f"tcp://127.0.0.1:{port}") as t:
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
    assert sum(1 for _, p, path in stored if p == res.pid and path.endswith("/slow.bin")) == 13
    # batches are numbered without gaps and carry the cumulative kernel counters
    seqs = [b.seq for b in batches]
    assert seqs == list(range(len(seqs)))
    last = batches[-1]
    assert last.meta["final"] is True
    for k in ("vfs.lost_ringbuf", "vfs.emitted", "vfs.lost_inflight_collision", "streamsink.dropped_batches"):
        assert k in last.counters, last.counters
    assert last.counters["vfs.lost_ringbuf"] == 0
    assert "accepted" in err


def test_dead_collector_counts_drops_and_keeps_running(tmp_path):
    """No collector listening: the tracer keeps tracing and still records locally."""
    port = free_port()
    rec = tmp_path / "rec.ssrec"
    with SlowFS(delay_ms=120) as fs:
        fs.make_file("slow.bin", 1 << 20)
        w = start_io("read", fs.path("slow.bin"), count=3, size=4096)
        with Trace("--min-latency-ms", "50", "--collector", f"tcp://127.0.0.1:{port}", "-o", str(rec)) as t:
            res = w.go()
        t.stop()
    assert t.rc == 0, t.stderr
    assert len([e for e in t.events if e["pid"] == res.pid]) == 3
    assert sum(b.n_events() for b in load_batches(str(rec))) >= 3


def test_malformed_batches_are_rejected_not_fatal(tmp_path):
    import zmq

    from stallscope.wire import codec
    from stallscope.wire.schema import Batch
    port = free_port()
    db = tmp_path / "store.db"
    col = subprocess.Popen(stallscope_argv("collect", "--bind", f"tcp://127.0.0.1:{port}", "--store", str(db)),
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.PUSH)
        s.connect(f"tcp://127.0.0.1:{port}")
        good = codec.encode(Batch("n1", 0))[0]
        for payload in (b"garbage", good[: len(good) // 2], good, b"\x93\x01\x02\x03", good):
            s.send(payload)
        s.close(linger=2000)
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
