"""Delivery under faults, end to end: the real tracer on this host, the real `stallscope
collect`, FUSE-stalled reads of known (prime) counts, and every event counted in the
collector's SQLite store against what the workload did and what the tracer printed.

- the collector down for 60 s while the tracer keeps producing: nothing lost;
- the collector SIGKILLed three times mid-ingest: the store is consistent after each kill,
  every batch acknowledged before a kill is in it, nothing is stored twice;
- the tracer SIGKILLed with batches unacknowledged: they are replayed at its next start,
  before new ones, and every event arrives exactly once;
- the spool full: drops are counted in the batches and at exit, the tracer keeps running,
  and what comes after is delivered.

The tracer follows one cgroup (``--cgroup``) holding only the workloads, so what else runs on
the host cannot change the counts or the batch sizes. Each test prints one
``DELIVERY-FIGURES {json}`` line with what it measured (``pytest -s``).
"""

import json
import os
import select
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from stallscope.collector.store import Store, load_batches
from stallscope.sim.slowfs import SlowFS
from stallscope.wire.transport import StreamSink
from tests.bpf.tracerun import ROOT, Trace, stallscope_argv
from tests.fixtures.workload import start_io
from tests.netutil import free_port
from tests.unit.test_delivery import io_batch

pytestmark = pytest.mark.bpf



@pytest.fixture
def cg(tmp_path):
    """A fresh cgroup v2 directory (mounting cgroup2 when the host has none)."""
    mounts = [line.split() for line in open("/proc/mounts")]
    root = next((m[1] for m in mounts if m[2] == "cgroup2"), None)
    mounted = None
    if root is None:
        mounted = root = str(tmp_path / "cg2")
        os.mkdir(root)
        assert os.system(f"mount -t cgroup2 none {root}") == 0
    path = os.path.join(root, f"stallscope-delivery-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)
        if mounted:
            os.system(f"umount {mounted}")


def trace_args(cg):
    return ("--min-latency-ms", "50", "--cgroup", cg)


def start_in(cg, path, count, **kw):
    """A paused workload of ``count`` 4 KiB reads, moved into the cgroup before it starts."""
    w = start_io("read", path, count=count, size=4096, **kw)
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(w.pid))
    return w


def run_in(cg, path, count, timeout_s=60, **kw):
    return start_in(cg, path, count, **kw).go(timeout_s=timeout_s)


class CollectorProc:
    """`stallscope collect --no-verdicts` on a port and store, restartable and killable."""

    def __init__(self, port, db):
        self.ep = f"tcp://127.0.0.1:{port}"
        self.db = str(db)
        self.proc = None
        self.ends = []          # the end line of each clean stop

    def start(self, timeout_s=30):
        self.proc = subprocess.Popen(
            stallscope_argv("collect", "--bind", self.ep, "--store", self.db, "--no-verdicts"),
            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE)
        buf = b""
        deadline = time.monotonic() + timeout_s
        while b"listening on" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"collector did not start: {buf.decode(errors='replace')}")
            if select.select([self.proc.stderr], [], [], left)[0]:
                buf += os.read(self.proc.stderr.fileno(), 4096)
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        self.ends.append(err.decode(errors="replace").strip().splitlines()[-1])
        self.proc = None

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


def io_rows(batches, pids=None):
    """Sorted (ts, pid, path) of every io row, optionally of some pids only."""
    rows = []
    for b in batches:
        t = b.tables.get("io")
        if t is None:
            continue
        for ts, pid, path in zip(t["ts_ns"], t["pid"], t["path"]):
            if pids is None or int(pid) in pids:
                rows.append((int(ts), int(pid), str(path)))
    return sorted(rows)


def printed_rows(events, pids=None):
    return sorted((e["ts_ns"], e["pid"], e["path"]) for e in events
                  if e["type"] == "io" and (pids is None or e["pid"] in pids))


def stored(db):
    return load_batches(str(db)) if os.path.exists(db) else []


def wait_for(cond, timeout_s, step_s=0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def assert_unique_identities(db):
    con = sqlite3.connect(str(db))
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT node || '/' || boot_id || '/' || dseq) "
                                  "FROM batches").fetchone()
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM batches WHERE dseq IS NULL").fetchone()[0] == 0
    finally:
        con.close()
    assert n == distinct, f"{n - distinct} batches stored twice"
    return n


def kill_trace(t):
    """SIGKILL a Trace and collect what it printed before dying."""
    t.proc.kill()
    out, err = t.proc.communicate(timeout=30)
    t.rc = t.proc.returncode
    t.stderr = (t._stderr_head + err).decode(errors="replace")
    t.events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def figures(name, **kw):
    print("DELIVERY-FIGURES " + json.dumps({"test": name, **kw}), flush=True)


def delivery_line(stderr):
    return next((ln for ln in stderr.splitlines() if "delivery to" in ln), "")


# ------------------------------------------------------------------------------------------
def test_collector_down_60s_loses_nothing(tmp_path, cg):
    col = CollectorProc(free_port(), tmp_path / "store.db").start()
    try:
        with SlowFS(delay_ms=120) as fs:
            for name in ("slow-a.bin", "slow-b.bin", "slow-c.bin"):
                fs.make_file(name, 1 << 20)
            with Trace(*trace_args(cg), "--collector", col.ep, "--spool-dir", str(tmp_path / "spool")) as t:
                a = run_in(cg, fs.path("slow-a.bin"), 7)
                assert wait_for(lambda: len(io_rows(stored(col.db), {a.pid})) == 7, 20)
                col.stop()
                down = time.monotonic()
                # 31 stalls spread over the outage (120 ms each, 1.6 s apart)
                b = run_in(cg, fs.path("slow-b.bin"), 31, gap_ms=1600, timeout_s=90)
                time.sleep(max(0.0, 60 - (time.monotonic() - down)))
                outage_s = time.monotonic() - down
                col.start()
                back = time.monotonic()
                c = run_in(cg, fs.path("slow-c.bin"), 11)
                pids = {a.pid, b.pid, c.pid}
                assert wait_for(lambda: len(io_rows(stored(col.db), pids)) == 49, 60)
                caught_up_s = time.monotonic() - back
            t.stop()
        col.stop()
    finally:
        col.close()
    assert t.rc == 0, t.stderr
    batches = stored(col.db)
    n = assert_unique_identities(col.db)
    assert len(io_rows(batches, {a.pid})) == 7 and len(io_rows(batches, {b.pid})) == 31
    assert len(io_rows(batches, {c.pid})) == 11
    assert io_rows(batches) == printed_rows(t.events)      # 0 events lost, none twice
    assert "0 left unacknowledged" in t.stderr and "0 batches (0 events) dropped" in t.stderr, t.stderr
    figures("collector_down_60s", outage_s=round(outage_s, 1), workload_events=49,
            stored_events=len(io_rows(batches)), printed_events=len(printed_rows(t.events)),
            batches_stored=n, caught_up_s=round(caught_up_s, 1), tracer=delivery_line(t.stderr),
            collector=col.ends[-1])


# ------------------------------------------------------------------------------------------
def synthetic_batch(seq, n):
    return io_batch("synthetic-node", seq, n, boot=None)     # the sink adds the delivery identity


def test_collector_sigkilled_mid_ingest_three_times(tmp_path, cg):
    """A synthetic second node keeps the collector busy (100 batches/s of 997 events)
    while the real tracer traces a workload; the collector is SIGKILLed three times with
    batches in flight, and the store is checked after each kill before it restarts."""
    col = CollectorProc(free_port(), tmp_path / "store.db").start()
    synth = StreamSink(col.ep, str(tmp_path / "synth-spool"), ack_timeout_s=1.0, close_timeout_s=30,
                       log=lambda m: None)
    first_seq = synth.spool.next_seq
    produced = {"batches": 0}
    stop = threading.Event()

    def produce():
        while not stop.is_set() and produced["batches"] < 1000:
            synth(synthetic_batch(produced["batches"], 997))
            produced["batches"] += 1
            time.sleep(0.01)
    kills: list = []
    result: dict = {}
    try:
        with SlowFS(delay_ms=120) as fs:
            fs.make_file("slow.bin", 1 << 20)
            with Trace(*trace_args(cg), "--collector", col.ep, "--spool-dir", str(tmp_path / "spool")) as t:
                w = start_in(cg, fs.path("slow.bin"), 13, gap_ms=600)
                producer = threading.Thread(target=produce)
                producer.start()
                w_thread = threading.Thread(target=lambda: result.__setitem__("w", w.go(timeout_s=60)))
                w_thread.start()
                for _ in range(3):
                    time.sleep(1.2)
                    assert wait_for(lambda: len(synth.sender.inflight) > 0, 5, 0.005)
                    inflight = len(synth.sender.inflight)
                    col.kill()
                    acked = synth.spool.acked_through        # every ack it had sent before dying
                    st = Store(col.db)                       # recovers the WAL, as a restart would
                    try:
                        have = {r[0] for r in st.db.execute(
                            "SELECT dseq FROM batches WHERE node = 'synthetic-node'")}
                        ok = st.db.execute("PRAGMA integrity_check").fetchone()[0]
                    finally:
                        st.close()
                    missing = set(range(first_seq, acked + 1)) - have
                    kills.append({"inflight_at_kill": inflight, "acked_through": acked - first_seq + 1,
                                  "stored": len(have), "acked_missing": len(missing), "integrity": ok})
                    assert ok == "ok" and not missing, kills[-1]
                    col.start()
                w_thread.join(90)
                res = result["w"]
                stop.set()
                producer.join(30)
                assert synth.flush(60), synth.summary()
                # the tracer's own batches come back on its ack timeout, which doubles (to at
                # most 30 s) while the collector is down: wait past the longest
                assert wait_for(lambda: len(io_rows(stored(col.db), {res.pid})) == 13, 75)
            t.stop()
        col.stop()
    finally:
        stop.set()
        synth.close()
        col.close()
    assert t.rc == 0, t.stderr
    batches = stored(col.db)
    n = assert_unique_identities(col.db)
    synth_batches = [b for b in batches if b.node == "synthetic-node"]
    assert sorted(b.seq for b in synth_batches) == list(range(produced["batches"]))
    assert sum(b.n_events() for b in synth_batches) == 997 * produced["batches"]
    assert len(io_rows(batches, {res.pid})) == 13
    traced = [b for b in batches if b.node != "synthetic-node"]
    assert io_rows(traced) == printed_rows(t.events)
    c = synth.counters()
    figures("collector_sigkill_x3", kills=kills,
            synthetic_batches=produced["batches"], synthetic_events=997 * produced["batches"],
            synthetic_resent=c["resent"], synthetic_acked_as_duplicate=c["duplicates"],
            workload_events=13, stored_workload_events=len(io_rows(batches, {res.pid})), batches_stored=n,
            tracer=delivery_line(t.stderr), collector=col.ends[-1])


# ------------------------------------------------------------------------------------------
def test_tracer_sigkilled_with_unacked_batches_replays_them_exactly_once(tmp_path, cg):
    col = CollectorProc(free_port(), tmp_path / "store.db")         # not started: down
    spool = tmp_path / "spool"
    try:
        with SlowFS(delay_ms=120) as fs:
            fs.make_file("slow-a.bin", 1 << 20)
            fs.make_file("slow-b.bin", 1 << 20)
            t1 = Trace(*trace_args(cg), "--collector", col.ep, "--spool-dir", str(spool)).__enter__()
            a = run_in(cg, fs.path("slow-a.bin"), 23)
            time.sleep(1.5)                 # into a batch (250 ms) and the spool
            kill_trace(t1)
            state = json.loads((spool / "state.json").read_text())
            segs = [p for p in os.listdir(spool) if p.startswith("seg-")]
            assert segs and state["acked_through"] < state["next_seq"] - 1
            assert len(printed_rows(t1.events, {a.pid})) == 23
            col.start()
            with Trace(*trace_args(cg), "--collector", col.ep, "--spool-dir", str(spool)) as t2:
                b = run_in(cg, fs.path("slow-b.bin"), 13)
                assert wait_for(lambda: len(io_rows(stored(col.db), {a.pid, b.pid})) == 36, 30)
            t2.stop()
        col.stop()
    finally:
        col.close()
    assert t1.rc == -signal.SIGKILL and t2.rc == 0, t2.stderr
    assert "from an earlier run go first" in t2.stderr, t2.stderr
    batches = stored(col.db)
    n = assert_unique_identities(col.db)
    assert len(io_rows(batches, {a.pid})) == 23 and len(io_rows(batches, {b.pid})) == 13
    assert io_rows(batches) == sorted(printed_rows(t1.events) + printed_rows(t2.events))
    # replayed in order, before the new run's batches
    con = sqlite3.connect(str(col.db))
    order = [r[0] for r in con.execute("SELECT dseq FROM batches ORDER BY id")]
    con.close()
    assert order == sorted(order)
    replayed = int(t2.stderr.split(" unacknowledged batches")[0].rsplit(": ", 1)[-1])
    figures("tracer_sigkill", replayed_batches=replayed, workload_events=36,
            stored_events=len(io_rows(batches, {a.pid, b.pid})), batches_stored=n,
            tracer=delivery_line(t2.stderr), collector=col.ends[-1])


# ------------------------------------------------------------------------------------------
def test_spool_full_drops_are_counted_and_the_rest_delivered(tmp_path, cg):
    """A 5 KiB spool (about five 1 KiB heartbeats) with the collector down: the spool fills,
    the batches holding the first workload's stalls are dropped and counted; the collector
    comes back and the second workload is delivered."""
    col = CollectorProc(free_port(), tmp_path / "store.db")
    try:
        with SlowFS(delay_ms=120) as fs:
            fs.make_file("slow-a.bin", 1 << 20)
            fs.make_file("slow-b.bin", 1 << 20)
            with Trace(*trace_args(cg), "--collector", col.ep, "--spool-dir", str(tmp_path / "spool"),
                       "--spool-max-mb", "0.005") as t:
                time.sleep(7)               # heartbeats fill the spool
                a = run_in(cg, fs.path("slow-a.bin"), 17)
                time.sleep(1.0)
                col.start()
                # the first batch built after the drops reaches the store with their counts: the
                # spool has room again
                assert wait_for(lambda: any(x.counters.get("streamsink.dropped_events", 0) >= 17
                                            for x in stored(col.db)), 30)
                b = run_in(cg, fs.path("slow-b.bin"), 11)
                delivered = wait_for(lambda: len(io_rows(stored(col.db), {b.pid})) == 11, 30)
            t.stop()
        col.stop()
    finally:
        col.close()
    assert t.rc == 0 and delivered, t.stderr
    batches = stored(col.db)
    assert_unique_identities(col.db)
    last = max(batches, key=lambda x: x.meta["delivery"]["seq"])
    dropped_b, dropped_e = last.counters["streamsink.dropped_batches"], last.counters["streamsink.dropped_events"]
    assert dropped_b > 0 and dropped_e >= 17
    assert f"{dropped_b} batches ({dropped_e} events) dropped" in t.stderr, t.stderr
    assert t.stderr.count("spool full") == 1, t.stderr              # logged once
    assert len(printed_rows(t.events, {a.pid})) == 17 and len(printed_rows(t.events, {b.pid})) == 11
    # every event is either stored or counted as dropped
    assert len(io_rows(batches)) + dropped_e == len(printed_rows(t.events))
    assert len(io_rows(batches, {b.pid})) == 11
    figures("spool_full", spool_max_bytes=int(0.005 * 2**20), printed_events=len(printed_rows(t.events)),
            stored_events=len(io_rows(batches)), dropped_batches=dropped_b, dropped_events=dropped_e,
            workload_a_stored=len(io_rows(batches, {a.pid})), workload_b_stored=11,
            tracer=delivery_line(t.stderr), collector=col.ends[-1])
