"""The Parquet lake (wire/lake.py) and the collector's lake writer (collector/lake.py): batches
come back exactly, files appear whole or not at all, a crash neither loses nor duplicates, dates
split at midnight, hostile node names stay inside the lake, a failing lake is counted and
retried, and another engine (DuckDB) answers the README's query."""

from __future__ import annotations

import datetime
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("fsspec")

from bench.bench_fuzz import realistic_meta, realistic_tables  # noqa: E402
from stallscope.analysis.analyze import analyze  # noqa: E402
from stallscope.collector import lake as clake  # noqa: E402
from stallscope.collector.store import Store  # noqa: E402
from stallscope.wire import codec, lake  # noqa: E402
from stallscope.wire.schema import OPTIONAL, Batch  # noqa: E402
from tests.unit.test_blame import random_world, world_batches  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = 1_000_000_000
MIDNIGHT = int(datetime.datetime(2025, 6, 2, tzinfo=datetime.timezone.utc).timestamp()) * S


def delivered(batches, boot="0b5e7c1d-aaaa-4bbb-8ccc-000000000001", first=5000):
    """The batches as a collector stores them: a delivery identity and a send time each."""
    out = []
    for i, b in enumerate(batches):
        ts = [int(np.max(t["ts_ns"])) for t in b.tables.values() if "ts_ns" in t and len(t["ts_ns"])]
        clock = {**(b.meta.get("clock") or {}), "sent_ns": max(ts) if ts else 1_700_000_000 * S}
        meta = {**b.meta, "clock": clock, "delivery": {"boot_id": boot, "seq": first + i}}
        out.append(Batch(b.node, b.seq, b.tables, b.counters, b.hist, meta))
    return out


def verdict_json(batches):
    return [json.dumps(v.to_json(), sort_keys=True) for v in analyze(batches).verdicts]


def by_node(batches):
    out: dict = {}
    for b in batches:
        out.setdefault(b.node, []).append(b)
    return out


def read_all(url):
    r = lake.LakeReader(url)
    return [b for n in r.nodes() for b in r.batches(n)]


def visible_files(root):
    return sorted(p for p in glob.glob(f"{root}/**/*.parquet", recursive=True)
                  if not os.path.basename(p).startswith((".", "_")))


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("seed,where", [(0, "local"), (1, "memory"), (5, "local")])
def test_round_trip_gives_the_same_verdicts_and_ignores_duplicate_segments(seed, where, tmp_path):
    rng = random.Random(seed)
    world = random_world(rng)
    original = world_batches(world, rng)
    if seed % 2:
        original = delivered(original)
    url = str(tmp_path / "lake") if where == "local" else f"memory://lake-rt-{seed}"
    for node, bs in by_node(original).items():
        half = len(bs) // 2
        lake.write_batches(url, node, bs[:half])
        lake.write_batches(url, node, bs[half:])
        lake.write_batches(url, node, bs[::-1])     # the same batches again, grouped otherwise
    back = read_all(url)
    assert len(back) == len(original)
    want = verdict_json(original)
    assert len(want) > 20
    assert verdict_json(back) == want


def test_batches_come_back_as_decode_gives_them(tmp_path):
    """Every table type, strings with odd characters, ints past 2**53, histograms, a tracer
    restart in the same boot (batch seqs repeat, delivery seqs do not), a heartbeat."""
    counters = {"vfs.lost_ringbuf": 3, "vfs.emitted": (1 << 62) + 1, "tick_errors": 0, "ratio": 0.25}
    hist = {"vfs": {"read": [0, 3, 9, 27, (1 << 60) + 7], "fsync": [1]}}
    batches = []
    for run in range(2):
        for seq in range(3):
            meta = realistic_meta(seq)
            meta["clock"] = {**meta["clock"], "sent_ns": meta["clock"]["sent_ns"] + (run * 10 + seq) * S}
            meta["delivery"] = {"boot_id": "boot-1", "seq": 100 * (run + 1) + seq}
            batches.append(Batch("gpu-node-07", seq, realistic_tables(5 + seq, seq + 10 * run), counters,
                                 hist, meta))
    batches.append(Batch("gpu-node-07", 3, {}, counters, {}, {"final": True, "clock": {"sent_ns": 1_700_000_100 * S},
                                                              "delivery": {"boot_id": "boot-1", "seq": 999}}))
    url = str(tmp_path / "lake")
    lake.write_batches(url, "gpu-node-07", batches)
    back = lake.LakeReader(url).batches("gpu-node-07")
    want = sorted(batches, key=lambda b: (b.seq, b.meta["clock"]["sent_ns"]))
    assert [b.meta["delivery"]["seq"] for b in back] == [b.meta["delivery"]["seq"] for b in want]
    for got, orig in zip(back, want):
        ref = codec.decode(codec.encode(orig))
        assert (got.node, got.seq) == (ref.node, ref.seq)
        assert list(got.tables) == list(ref.tables)
        for kind, t in ref.tables.items():
            assert list(got.tables[kind]) == list(t)
            for c, a in t.items():
                g = got.tables[kind][c]
                assert g.dtype == a.dtype, (kind, c)
                assert list(g) == list(a), (kind, c)
        assert got.meta == ref.meta and got.counters == ref.counters and got.hist == ref.hist
    assert back[-1].tables == {} and back[-1].meta["final"] is True


def _joined(batches):
    """What :meth:`LakeReader.columns` promises from ``batches``: each table joined in order,
    the meta runs, the clocks, the counters' highest values."""
    from stallscope.wire.schema import TABLES, concat_tables
    tables = {k: concat_tables(k, [b.tables[k] for b in batches if k in b.tables])
              for k in TABLES if any(k in b.tables for b in batches)}
    runs: list = []
    for b in batches:
        m = {k: v for k, v in b.meta.items() if k != "clock"}
        if runs and runs[-1][1] == m:
            runs[-1][0] += 1
        else:
            runs.append([1, m])
    top: dict = {}
    for b in batches:
        for k, v in b.counters.items():
            top[k] = max(top.get(k, int(v)), int(v))
    return tables, [tuple(r) for r in runs], [b.meta.get("clock") for b in batches], top


def clock_facts_of(clocks):
    """What the analysis takes of the batches' clocks: sent_ns each, the largest uncertainty,
    whether one was unsynchronized."""
    cs = [c or {} for c in clocks]
    return ([int(c.get("sent_ns") or 0) for c in cs],
            max([int(c["uncertainty_ns"]) for c in cs if c.get("uncertainty_ns")] or [0]),
            any(c.get("ntp_synced") is False for c in cs))


def clock_facts(nc):
    if nc.clocks is not None:
        return clock_facts_of(nc.clocks)
    return [int(x) for x in nc.sent_ns], nc.unc_ns, nc.unsynced


@pytest.mark.parametrize("span,ratio", [(None, None), ((2, 5), None), (None, 2.5)])
def test_columns_are_the_batches_joined(span, ratio, tmp_path):
    """columns() gives exactly what batches() holds, joined: copies from a rewrite dropped,
    a restart's repeated batch seqs in batch order, a time window cut by batch wall time,
    a float counter (parsed the slow, exact way)."""
    counters = {"vfs.lost_ringbuf": 3, "vfs.emitted": (1 << 62) + 1, "tick_errors": 0,
                **({"ratio": ratio} if ratio is not None else {})}
    batches = []
    for run in range(2):
        for seq in range(4):
            meta = realistic_meta(seq)
            meta["clock"] = {**meta["clock"], "sent_ns": MIDNIGHT + (run * 4 + seq) * S}
            meta["delivery"] = {"boot_id": "boot-1", "seq": 100 * (run + 1) + seq}
            c = dict(counters, **{"vfs.emitted": counters["vfs.emitted"] + run * 10 + seq})
            batches.append(Batch("gpu-node-07", seq, realistic_tables(5 + seq, seq + 10 * run), c, {}, meta))
    url = str(tmp_path / "lake")
    lake.write_batches(url, "gpu-node-07", batches[:5])
    lake.write_batches(url, "gpu-node-07", batches[3:])      # two batches twice
    since, until = (None, None) if span is None else (MIDNIGHT + span[0] * S, MIDNIGHT + span[1] * S)
    r = lake.LakeReader(url)
    back = r.batches("gpu-node-07", since, until)
    assert len(back) == (8 if span is None else 3)
    got = r.columns("gpu-node-07", since, until)
    tables, runs, clocks, top = _joined(back)
    assert got.batches == len(back)
    assert list(got.tables) == list(tables)
    for kind, t in tables.items():
        for c, a in t.items():
            assert got.tables[kind][c].dtype == a.dtype, (kind, c)
            assert list(got.tables[kind][c]) == list(a), (kind, c)
    assert [tuple(x) for x in got.meta_runs] == runs
    assert clock_facts(got) == clock_facts_of(clocks) and got.counters == top
    assert lake.LakeReader(url).columns("no-such-node").batches == 0


def test_columns_fast_path_equals_batches(tmp_path):
    """Unique batch seqs and no copies (the common case: rows placed by seq, no bid read),
    segments written out of order: the same as batches(), joined."""
    batches = []
    for seq in range(6):
        meta = realistic_meta(seq)
        meta["clock"] = {**meta["clock"], "sent_ns": MIDNIGHT + seq * S, "ntp_synced": seq != 2,
                         "uncertainty_ns": 1000 * (7 - seq)}
        meta["delivery"] = {"boot_id": "boot-1", "seq": 100 + seq}
        batches.append(Batch("n1", seq, realistic_tables(3 + seq, seq), {"c": seq}, {}, meta))
    url = str(tmp_path / "lake")
    lake.write_batches(url, "n1", batches[3:])
    lake.write_batches(url, "n1", batches[:3])
    r = lake.LakeReader(url)
    back = r.batches("n1")
    got = r.columns("n1")
    tables, runs, clocks, top = _joined(back)
    assert [b.seq for b in back] == list(range(6)) and got.batches == 6
    for kind, t in tables.items():
        for c, a in t.items():
            assert list(got.tables[kind][c]) == list(a), (kind, c)
    assert [tuple(x) for x in got.meta_runs] == runs and got.counters == top == {"c": 5}
    assert got.clocks is None and clock_facts(got) == clock_facts_of(clocks)     # the flat columns
    assert clock_facts(got)[1:] == (7000, True)


def test_a_file_from_an_older_schema_reads_with_the_new_columns_filled(tmp_path):
    root = str(tmp_path / "lake")
    b = Batch("n1", 0, realistic_tables(4, 1), {}, {}, realistic_meta(1))
    lake.write_batches(root, "n1", [b])
    for kind, opt in OPTIONAL.items():          # as an older stallscope wrote them
        for path in glob.glob(f"{root}/{kind}/*/*/*.parquet"):
            t = pq.read_table(path)
            pq.write_table(t.drop_columns([c for c in opt if c in t.column_names]), path)
    (got,) = lake.LakeReader(root).batches("n1")
    ref = codec.decode(codec.encode(b))
    for kind, opt in OPTIONAL.items():
        for c in opt:
            want = opt[c](ref.tables[kind])
            assert got.tables[kind][c].dtype == want.dtype and list(got.tables[kind][c]) == list(want)
    pq.write_table(pq.read_table(path).drop_columns(["pid"]), path)
    with pytest.raises(lake.LakeError, match="no column 'pid'"):
        lake.LakeReader(root).batches("n1")


def test_module_imports_without_pyarrow_or_fsspec():
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['fsspec'] = None\n"
            "from stallscope.wire import lake\n"
            "try:\n    lake.LakeReader('/tmp/x')\nexcept lake.LakeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "stallscope[fleet]" in out.stdout


# --------------------------------------------------------------------------- atomicity

def _big_batch(node, seq, n=60_000):
    rng = np.random.default_rng(seq)
    t = realistic_tables(1, seq)["io"]
    io = {c: np.repeat(v, n) for c, v in t.items()}
    io["ts_ns"] = (np.uint64(1_750_000_000 * S) + np.arange(n, dtype=np.uint64) * np.uint64(1000))
    io["dur_ns"] = rng.integers(1, 10 ** 9, n).astype(np.uint64)       # incompressible: big files
    io["ino"] = rng.integers(0, 1 << 60, n).astype(np.uint64)
    return Batch(node, seq, {"io": io}, {}, {}, {"clock": {"sent_ns": 1_750_000_000 * S + seq},
                                                 "delivery": {"boot_id": "b", "seq": seq}})


def test_a_reader_listing_while_a_writer_writes_never_sees_a_partial_file(tmp_path):
    root = str(tmp_path / "lake")
    batches = [_big_batch("n1", s) for s in range(12)]
    done = threading.Event()
    seen_tmp, reads, errors = [], [0], []

    def writer():
        try:
            for b in batches:
                lake.write_batches(root, "n1", [b])
        finally:
            done.set()

    def reader():
        while not done.is_set():
            for dirpath, _dirs, files in os.walk(root):
                seen_tmp.extend(f for f in files if f.startswith(".tmp-"))
            for p in visible_files(root):
                try:
                    pq.read_table(p)            # a half-written file would not parse
                    reads[0] += 1
                except FileNotFoundError:
                    pass
                except Exception as e:          # any parse error fails the test
                    errors.append(f"{p}: {e}")
            got = lake.LakeReader(root).batches("n1")
            assert all(len(b.tables["io"]["ts_ns"]) == 60_000 for b in got)

    w = threading.Thread(target=writer)
    w.start()
    reader()
    w.join()
    assert not errors, errors[:3]
    assert reads[0] > 0
    assert not any(".tmp-" in p for p in visible_files(root))
    assert not [f for _d, _s, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]   # all renamed
    assert len(lake.LakeReader(root).batches("n1")) == 12
    print(f"reader parsed {reads[0]} files while {len(set(seen_tmp))} temporary files came and went")


def _write_forever(root, i):
    while True:
        lake.write_batches(root, "n1", [_big_batch("n1", i, 120_000)])
        i += 1


def _tmp_files(root):
    return [f for _d, _s, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]


def test_a_killed_writer_leaves_no_visible_partial_file(tmp_path):
    """SIGKILL the writer the moment a temporary file shows up (in the middle of writing a
    segment), three times: whatever is visible parses, the reader reads it."""
    root = str(tmp_path / "lake")
    ctx = mp.get_context("spawn")
    cut_mid_write = 0
    for k in range(3):
        n_seg = len(visible_files(f"{root}/batch"))
        p = ctx.Process(target=_write_forever, args=(root, 100 * k))
        p.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(visible_files(f"{root}/batch")) == n_seg:
            time.sleep(0.01)            # one whole segment first, then kill inside a file of the next
        before = set(_tmp_files(root))
        while time.monotonic() < deadline and not set(_tmp_files(root)) - before:
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        cut_mid_write += bool(set(_tmp_files(root)) - before)
    vis = visible_files(root)
    for path in vis:
        pq.read_table(path)
    got = lake.LakeReader(root).batches("n1")
    assert len(got) >= 3 and all(len(b.tables["io"]["ts_ns"]) == 120_000 for b in got)
    assert not any(os.path.basename(p).startswith(".") for p in vis)
    assert cut_mid_write >= 1           # at least one kill landed inside a file's write
    print(f"{len(vis)} files whole after 3 kills, {cut_mid_write} of them mid-write "
          f"({len(_tmp_files(root))} hidden temporary files left behind)")


def test_a_failed_write_publishes_nothing_and_cleans_up(tmp_path, monkeypatch):
    root = str(tmp_path / "lake")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lake.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        lake.write_batches(root, "n1", [_big_batch("n1", 1, 100)])
    assert visible_files(root) == []
    assert [f for _d, _s, fs in os.walk(root) for f in fs] == []


# --------------------------------------------------------------------------- collector writer

def _stream(nodes=3, per_node=8):
    """Batches as tracers deliver them: GPU samples, processes and stalls, identities."""
    rng = random.Random(11)
    world = random_world(rng)
    out = []
    for node, bs in by_node(world_batches(world, rng)).items():
        out += delivered(sorted(bs, key=lambda b: b.seq), boot=f"boot-{node}")
    extra = [delivered([Batch(f"n{k}", 100 + s, realistic_tables(3 + s, s), {"c": s}, {}, realistic_meta(s))],
                       boot=f"boot-x{k}", first=100 + s)[0]
             for k in range(nodes) for s in range(per_node)]
    return out + extra


def _fill(store_path, batches):
    st = Store(store_path)
    st.add([(b, codec.encode(b)[0]) for b in batches])
    st.close()


class Crash(BaseException):
    """The process dies here (after a segment was published, before the cursor commit)."""


def _at_rest_duplicates(root):
    """(rows, distinct identities) of the batch dataset files: what a SQL engine sees."""
    bids = []
    for p in visible_files(f"{root}/batch"):
        node = os.path.basename(os.path.dirname(p))
        bids += [(node, b) for b in pq.read_table(p, columns=["bid"]).column("bid").to_pylist()]
    return len(bids), len(set(bids))


def test_resume_after_a_crash_writes_the_rest_once(tmp_path, monkeypatch):
    db, root = str(tmp_path / "store.db"), str(tmp_path / "lake")
    stream = _stream()
    _fill(db, stream[:-6])
    w = clake.LakeWriter(db, root, window_bytes=4000, log=lambda m: None)
    real = lake.write_batches
    calls = [0]

    def crashing(*a, **kw):
        out = real(*a, **kw)
        calls[0] += 1
        if calls[0] == 4:
            raise Crash()
        return out

    monkeypatch.setattr(clake.lake, "write_batches", crashing)
    with pytest.raises(Crash):
        w.step()
    before = w.batches_written
    assert 0 < before < len(stream) - 6
    w.db.close()                                      # killed: no final flush
    monkeypatch.setattr(clake.lake, "write_batches", real)
    _fill(db, stream[-6:])                            # more arrived while it was down
    logs = []
    w2 = clake.LakeWriter(db, root, window_bytes=4000, log=logs.append)
    assert w2.step()
    rows = sum(len(next(iter(t.values()))) for b in stream[:-6] for t in b.tables.values() if t)
    written_rows = w2._backlog[1]
    assert any(f"lake: {len(stream) - before} batches ({written_rows} rows) from before the restart" in m
               for m in logs), logs
    assert 0 < written_rows <= rows
    w2.close()
    back = read_all(root)
    assert sorted((b.node, b.meta["delivery"]["seq"]) for b in back) == \
        sorted((b.node, b.meta["delivery"]["seq"]) for b in stream)
    n, distinct = _at_rest_duplicates(root)
    assert n == distinct == len(stream)               # the replay replaced, never added
    assert verdict_json(back) == verdict_json(stream)


def _lake_writer_forever(db, root):
    w = clake.LakeWriter(db, root, window_bytes=3000, log=lambda m: None)
    while True:
        w.flush()


def test_resume_after_sigkill_mid_flush(tmp_path):
    db, root = str(tmp_path / "store.db"), str(tmp_path / "lake")
    stream = _stream(nodes=4, per_node=20)
    _fill(db, stream)
    p = mp.get_context("spawn").Process(target=_lake_writer_forever, args=(db, root))
    p.start()
    deadline = time.monotonic() + 60
    while len(visible_files(f"{root}/batch")) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    logs = []
    w = clake.LakeWriter(db, root, window_bytes=3000, log=logs.append)
    w.step()
    w.close()
    back = read_all(root)
    assert sorted((b.node, b.meta["delivery"]["seq"]) for b in back) == \
        sorted((b.node, b.meta["delivery"]["seq"]) for b in stream)
    n, distinct = _at_rest_duplicates(root)
    assert n == distinct == len(stream)
    print(logs)


def test_failing_lake_is_counted_retried_and_never_loses(tmp_path):
    db = str(tmp_path / "store.db")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the lake's directory should be")
    root = str(blocker / "lake")
    stream = _stream(nodes=2, per_node=3)
    half = len(stream) // 2
    _fill(db, stream[:half])
    now = [1000.0]
    logs = []
    w = clake.LakeWriter(db, root, flush_s=60, log=logs.append, clock=lambda: now[0])
    assert not w.step()                                  # the backlog flush fails
    assert w.counters()["lake.errors"] == 1 and w.counters()["lake.pending_batches"] == half
    now[0] += 0.5
    assert not w.step() and w.errors == 1                # backing off: no attempt
    _fill(db, stream[half:])                             # ingest goes on
    for _ in range(3):
        now[0] += 70
        assert not w.step()
    assert w.errors == 4 and w.counters()["lake.pending_batches"] == len(stream)
    assert len([m for m in logs if "failed" in m]) == 1    # once per episode
    blocker.unlink()
    now[0] += 70
    assert w.step()
    assert any("again after 4 failed attempts" in m for m in logs)
    assert w.counters()["lake.pending_batches"] == 0
    w.close()
    assert len(read_all(root)) == len(stream)


def test_flush_interval_and_node_bound(tmp_path):
    db, root = str(tmp_path / "store.db"), str(tmp_path / "lake")
    stream = _stream(nodes=1, per_node=4)
    _fill(db, stream[:2])
    now = [0.0]
    w = clake.LakeWriter(db, root, flush_s=60, node_bytes=1 << 30, log=lambda m: None, clock=lambda: now[0])
    assert w.step()                                      # what was there at start goes at once
    _fill(db, stream[2:4])
    now[0] += 30
    assert not w.step() and w.pending_batches == 2       # not yet due
    now[0] += 31
    assert w.step() and w.pending_batches == 0
    w.node_bytes = 1
    _fill(db, stream[4:5])
    now[0] += 1
    assert w.step()                                      # one node past its bound: no waiting
    w.close()
    assert len(read_all(root)) == 5


# --------------------------------------------------------------------------- partitions

def _io_batch(node, seq, sent_ns, ts_ns):
    t = realistic_tables(2, seq)["io"]
    t["ts_ns"] = np.array([ts_ns, ts_ns + 1], dtype=np.uint64)
    return Batch(node, seq, {"io": t}, {}, {}, {"clock": {"sent_ns": sent_ns},
                                               "delivery": {"boot_id": "b", "seq": seq}})


def test_a_batch_goes_to_the_date_of_its_wall_time_and_never_splits(tmp_path):
    root = str(tmp_path / "lake")
    sent = [MIDNIGHT - 2 * S, MIDNIGHT - S, MIDNIGHT + S // 2, MIDNIGHT + S, MIDNIGHT + 2 * S]
    batches = [_io_batch("n1", i, s, s - S) for i, s in enumerate(sent)]   # rows a second older
    lake.write_batches(root, "n1", batches)
    assert sorted(os.listdir(f"{root}/io")) == ["date=2025-06-01", "date=2025-06-02"]
    after = pq.read_table(glob.glob(f"{root}/io/date=2025-06-02/node=n1/*.parquet")[0])
    assert sorted(set(after.column("seq").to_pylist())) == [2, 3, 4]
    assert min(after.column("ts_ns").to_pylist()) < MIDNIGHT                  # batch 2's rows stay with it
    r = lake.LakeReader(root)
    assert [b.seq for b in r.batches("n1", since_ns=MIDNIGHT)] == [2, 3, 4]
    assert [b.seq for b in r.batches("n1", until_ns=MIDNIGHT)] == [0, 1]
    assert r.nodes(since_ns=MIDNIGHT + 86400 * S) == [] and r.nodes(until_ns=MIDNIGHT - 1) == ["n1"]
    v = {"node": "n1", "gpu": 0, "idle_start_ns": MIDNIGHT - S, "idle_end_ns": MIDNIGHT + S,
         "verdict": "unexplained", "culprit": None}
    lake.write_verdicts(root, "n1", [v])
    assert os.listdir(f"{root}/verdicts") == ["date=2025-06-01"]
    assert r.verdicts(since_ns=MIDNIGHT - 2 * S) == [v] and r.verdicts(since_ns=MIDNIGHT) == []


HOSTILE = ["../../etc/passwd", "a/b c", "node=x/date=1999-01-01", "%2F..%2F", "", ".hidden", "_under",
           "__HIVE_DEFAULT_PARTITION__", "~tilde~", "line\nbreak\ttab", "ノード-1", "*?[glob]",
           "é" * 200, "x" * 255]


def test_hostile_node_names_stay_inside_the_lake_and_come_back(tmp_path):
    root = str(tmp_path / "lake")
    for i, node in enumerate(HOSTILE):
        lake.write_batches(root, node, [_io_batch(node, i, MIDNIGHT + i, MIDNIGHT + i)])
        lake.write_verdicts(root, node, [{"node": node, "gpu": 0, "idle_start_ns": MIDNIGHT,
                                          "idle_end_ns": MIDNIGHT + S, "verdict": "unexplained"}])
    real_root = os.path.realpath(root)
    for d, _dirs, files in os.walk(root):
        for f in files:
            assert os.path.realpath(os.path.join(d, f)).startswith(real_root + os.sep)
            assert len(f.encode()) < 256
        assert all(len(x.encode()) < 256 for x in _dirs)
    assert len(os.listdir(f"{root}/io/date=2025-06-02")) == len(HOSTILE)
    r = lake.LakeReader(root)
    assert r.nodes() == sorted(HOSTILE)
    for i, node in enumerate(HOSTILE):
        (b,) = r.batches(node)
        assert b.node == node and b.seq == i
    assert sorted(v["node"] for v in r.verdicts()) == sorted(HOSTILE)
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"SELECT DISTINCT node FROM read_parquet('{root}/io/**/*.parquet', hive_partitioning=true)"
                     ).fetchall()
    names = {n for (n,) in got}
    assert {"a/b c", "ノード-1", "../../etc/passwd", "line\nbreak\ttab"} <= names


# --------------------------------------------------------------------------- another engine

#: the README's query, word for word but for the path and the date
README_SQL = """
SELECT culprit_path                                  AS file,
       round(sum(idle_end_ns - idle_start_ns) / 1e9, 3) AS gpu_idle_s,
       count(*)                                      AS intervals,
       count(DISTINCT node)                          AS nodes
FROM read_parquet('{lake}/verdicts/**/*.parquet', hive_partitioning = true)
WHERE date = DATE '{day}'
  AND verdict IN ('culprit', 'remote')
  AND culprit_type IN ('io', 'nfs')
GROUP BY file
ORDER BY gpu_idle_s DESC
"""


def test_duckdb_answers_gpu_idle_seconds_by_culprit_file(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    rng = random.Random(2)
    world = random_world(rng)
    batches = world_batches(world, rng)
    for b in batches:                 # stalls on a handful of files
        for kind in ("io", "nfs"):
            t = b.tables.get(kind)
            if t is not None:
                t["path"] = np.array([f"/data/train/shard-{(int(p) + i) % 5}.tar" for i, p in enumerate(t["pid"])],
                                     dtype=object)
    res = analyze(batches)
    root = str(tmp_path / "lake")
    vs = [v.to_json() for v in res.verdicts]
    for node in {v["node"] for v in vs}:
        lake.write_verdicts(root, node, [v for v in vs if v["node"] == node])
    day = lake.day_of(min(v["idle_start_ns"] for v in vs))
    got = duckdb.sql(README_SQL.format(lake=root, day=day)).fetchall()
    want: dict = {}
    for v in vs:
        c = v.get("culprit") or {}
        if lake.day_of(v["idle_start_ns"]) != day or v["verdict"] not in ("culprit", "remote") \
                or c.get("type") not in ("io", "nfs"):
            continue
        f = v["chain"]["targets"][0]["name"]
        w = want.setdefault(f, [0, 0, set()])
        w[0] += v["idle_end_ns"] - v["idle_start_ns"]
        w[1] += 1
        w[2].add(v["node"])
    assert len(got) == len(want) > 1
    for file, idle_s, n, nodes in got:
        assert idle_s == pytest.approx(round(want[file][0] / 1e9, 3))
        assert (n, nodes) == (want[file][1], len(want[file][2]))
    assert [g[1] for g in got] == sorted((g[1] for g in got), reverse=True)


# --------------------------------------------------------------------------- the command

def test_lake_options_parse():
    from stallscope.commands.collect import parse_lake_options
    assert parse_lake_options(["anon=true", "endpoint_url=http://minio:9000", "client_kwargs.region_name=eu",
                               "max_concurrency=4", "key=a=b"]) == {
        "anon": True, "endpoint_url": "http://minio:9000", "client_kwargs": {"region_name": "eu"},
        "max_concurrency": 4, "key": "a=b"}


def test_collect_refuses_a_lake_it_cannot_reach_in_one_line(tmp_path, keep_signals):
    from click.testing import CliRunner

    from stallscope.commands.collect import collect
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    r = CliRunner().invoke(collect, ["--bind", "tcp://127.0.0.1:0", "--store", str(tmp_path / "s.db"),
                                     "--lake", "s3://bucket/lake", "--duration", "1"])
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "s3fs" in r.stderr, r.stderr
    r = CliRunner().invoke(collect, ["--store", str(tmp_path / "s.db"), "--lake-option", "anon=true"])
    assert r.exit_code == 2 and "--lake-option needs --lake" in r.stderr


def _send(endpoint, spool, batches):
    from stallscope.wire.transport import StreamSink
    s = StreamSink(endpoint, spool, close_timeout_s=30)
    for b in batches:
        s(b)
    s.flush(30)
    s.close()


@pytest.fixture
def keep_signals():
    """`collect` installs SIGTERM/SIGHUP handlers: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("failing", [False, True])
def test_collect_writes_batches_and_live_verdicts_to_the_lake(tmp_path, failing, keep_signals):
    from click.testing import CliRunner

    from stallscope.commands.collect import collect
    from tests.netutil import free_port
    rng = random.Random(4)
    world = random_world(rng)
    batches = sorted(world_batches(world, rng), key=lambda b: (b.node, b.seq))
    ep = f"tcp://127.0.0.1:{free_port()}"
    if failing:
        (tmp_path / "blocker").write_text("not a directory")
        url = str(tmp_path / "blocker" / "lake")
    else:
        url = f"memory://lake-cli-{os.getpid()}"
    sender = threading.Thread(target=_send, args=(ep, str(tmp_path / "spool"), batches))
    sender.start()
    r = CliRunner().invoke(collect, ["--bind", ep, "--store", str(tmp_path / "s.db"), "--json",
                                     "--lake", url, "--lake-flush-s", "0.5", "--duration", "4"])
    sender.join(60)
    assert r.exit_code == 0, r.stderr
    assert f"{len(batches)} batches" in r.stderr
    printed = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert printed
    if failing:
        assert "lake: writing to" in r.stderr and "failed writes" in r.stderr
        assert len(Store(str(tmp_path / "s.db")).stats()["nodes"]) == len(by_node(batches))
        return
    back = read_all(url)
    assert len(back) == len(batches)
    assert verdict_json(back) == verdict_json(batches)
    lv = lake.LakeReader(url).verdicts()
    assert len(lv) == len(printed)
    assert all(isinstance(v["lost_ns"], int) for v in lv)
    assert sorted(json.dumps(v, sort_keys=True) for v in lv) == sorted(json.dumps(p, sort_keys=True) for p in printed)
