"""The fleet generator behind `python -m bench fleet` (bench/fleet.py): deterministic, shaped like
what tracers ship, decodable by the wire codec, and analysed into the verdicts the benchmark
claims it produces (culprit, remote, unexplained) for the causes it planned."""

from __future__ import annotations

import collections
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import fleet
from stallscope.analysis.analyze import analyze
from stallscope.wire import codec
from stallscope.wire.schema import TABLES

#: a tiny fleet: 4 nodes x 2 GPUs x 5 minutes, stall and incident rates x12 so that five
#: minutes hold enough incidents of every kind
TINY = fleet.FleetSpec(nodes=4, gpus=2, hours=5 / 60, seed=2, rate=12)


@pytest.fixture(scope="module")
def tiny():
    data = [fleet.node_data(TINY, i) for i in range(TINY.nodes)]
    batches = [b for i, d in enumerate(data) for b in fleet.node_batches(TINY, i)]
    return data, batches, analyze(batches)


def _same_batch(a, b):
    assert (a.node, a.seq) == (b.node, b.seq)
    assert a.meta == b.meta and a.counters == b.counters and a.hist == b.hist
    assert sorted(a.tables) == sorted(b.tables)
    for kind, t in a.tables.items():
        assert sorted(t) == sorted(TABLES[kind]), kind
        for c, col in t.items():
            other = b.tables[kind][c]
            assert col.dtype == other.dtype, (kind, c)
            assert np.array_equal(col, other), (kind, c)


def test_same_seed_same_batches_other_seed_other_batches():
    spec = fleet.FleetSpec(nodes=3, gpus=2, hours=2 / 60, seed=5, rate=10)
    one, two = fleet.node_batches(spec, 2), fleet.node_batches(spec, 2)
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        _same_batch(a, b)
    other = fleet.node_batches(fleet.FleetSpec(nodes=3, gpus=2, hours=2 / 60, seed=6, rate=10), 2)
    ts = (lambda bs: np.concatenate([b.tables["gpu"]["ts_ns"] for b in bs if "gpu" in b.tables]))
    assert not np.array_equal(ts(one)[:100], ts(other)[:100])
    # a node does not depend on how many nodes were generated before it, or in which process
    again = fleet.node_batches(spec, 2)
    _same_batch(one[-1], again[-1])


def test_batches_round_trip_through_the_wire_codec(tiny):
    _data, batches, _res = tiny
    kinds = collections.Counter()
    for b in batches:
        got = codec.decode(codec.encode(b))
        _same_batch(b, got)
        kinds.update(list(b.tables))
    # every table the bench claims to ship, shipped
    assert {"gpu", "gpu_proc", "proc", "io", "sched", "net", "nfs"} <= set(kinds)


def test_shaped_like_the_tracer(tiny):
    data, batches, _res = tiny
    span_s = TINY.hours * 3600
    for i, d in enumerate(data):
        mine = [b for b in batches if b.node == d.name]
        # a batch every 250 ms, consecutive seqs; one lake segment per 10 minutes of batches
        assert abs(len(mine) - span_s * 1000 / TINY.batch_ms) <= 1
        assert [b.seq for b in mine] == list(range(mine[0].seq, mine[0].seq + len(mine)))
        sent = np.array([b.meta["clock"]["sent_ns"] for b in mine])
        assert set(np.diff(sent)) == {TINY.batch_ms * fleet.MS}
        assert len(list(fleet.node_segments(TINY, i))) == 1
        # NVML at 6 Hz per GPU, the period reported in meta as the tracer reports it
        g = {c: np.concatenate([b.tables["gpu"][c] for b in mine if "gpu" in b.tables]) for c in ("ts_ns", "gpu", "synth")}
        periods = mine[0].meta["gpu"]["sample_period_ns"]
        assert sorted(periods) == list(range(TINY.gpus))
        for x in range(TINY.gpus):
            ts = np.sort(g["ts_ns"][g["gpu"] == x])
            assert abs(periods[x] - 1e9 / 6) < 1e6
            if not g["synth"].any():
                assert abs(len(ts) - 6 * span_s) <= 8
        # every process on a GPU, and every dataloader worker that stalled, has a lineage row
        # with its job and rank (the workers' rank is their trainer's); lineage rows come first
        procs = {}
        for b in mine:
            p = b.tables.get("proc")
            if p is not None:
                for pid, job, rank, ex in zip(p["pid"], p["job"], p["rank"], p["exit_ns"]):
                    if not ex:
                        procs.setdefault(int(pid), (job, int(rank)))
        gp = np.concatenate([b.tables["gpu_proc"]["pid"] for b in mine if "gpu_proc" in b.tables])
        assert all(procs[int(p)][0] and procs[int(p)][1] >= 0 for p in np.unique(gp))
        io = [b.tables["io"] for b in mine if "io" in b.tables]
        workers = {int(p) for t in io for p, c in zip(t["pid"], t["comm"]) if c == "pt_data_worker"}
        assert workers and all(procs[p][0] and procs[p][1] >= 0 for p in workers)
        assert mine[0].meta["node"]["addrs"] == [fleet.node_ip(i)]


def test_layout_mixes_job_sizes_and_covers_every_node():
    spec = fleet.FleetSpec()                     # the benchmark's 1,024 nodes (layout only)
    jobs = fleet.layout(spec)
    per_node = collections.Counter(i for j in jobs for i in j.nodes)
    assert sorted(per_node) == list(range(spec.nodes))
    sizes = collections.Counter(len(j.nodes) for j in jobs)
    assert sizes[128] >= 1 and sum(sizes[n] for n in (8, 16, 32)) >= 10 and sizes[1] >= 10
    # nodes that change jobs mid-hour run two jobs one after the other, never at once
    for i, k in per_node.items():
        if k > 1:
            a, b = sorted((j for j in jobs if i in j.nodes), key=lambda j: j.start_ns)
            assert a.end_ns < b.start_ns
    assert fleet.layout(spec) == fleet.layout(fleet.FleetSpec())


def test_a_tiny_fleet_gives_every_verdict_for_the_planned_causes(tiny):
    data, _batches, res = tiny
    kinds = collections.Counter(v.verdict for v in res.verdicts)
    assert kinds["culprit"] >= 10 and kinds["remote"] >= 3 and kinds["unexplained"] >= 5, kinds
    truth = [t for d in data for t in d.truth]

    def planned(node, gpu, pid, kind, s, e):
        return any(t["node"] == node and (gpu is None or t["gpu"] == gpu) and t["pid"] == pid
                   and kind in t["kinds"] and t["start_ns"] < e and t["end_ns"] > s for t in truth)

    # a culprit is a stall the generator planned as the cause of that GPU's idleness ...
    culprits = [v for v in res.verdicts if v.verdict == "culprit"]
    hits = sum(planned(v.node, v.gpu, v.culprit["pid"], v.culprit["type"], v.idle_start_ns, v.idle_end_ns)
               for v in culprits)
    assert hits >= 0.9 * len(culprits), f"{hits} of {len(culprits)} culprits were planned"
    # ... a remote verdict names a planned culprit (of another GPU of the same job) ...
    for v in res.verdicts:
        if v.verdict == "remote":
            assert planned(v.culprit_node, None, v.culprit["pid"], v.culprit["type"],
                           v.idle_start_ns - fleet.S, v.idle_end_ns)
    # ... and most planned causes of a second or more were found
    found = 0
    long_ones = [t for t in truth if t["end_ns"] - t["start_ns"] >= fleet.S]
    for t in long_ones:
        found += any(v.node == t["node"] and v.gpu == t["gpu"] and v.verdict == "culprit"
                     and v.culprit["pid"] == t["pid"] and v.idle_start_ns < t["end_ns"]
                     and v.idle_end_ns > t["start_ns"] for v in res.verdicts)
    assert long_ones and found >= 0.75 * len(long_ones), f"{found} of {len(long_ones)} found"


def test_the_lake_holds_what_was_generated(tmp_path):
    pytest.importorskip("pyarrow")
    from stallscope.wire.lake import LakeReader

    spec = fleet.FleetSpec(nodes=2, gpus=2, hours=2 / 60, seed=1, rate=5)
    tot = fleet.write_lake(spec, str(tmp_path), procs=1)
    reader = LakeReader(str(tmp_path))
    assert reader.nodes() == sorted(fleet.node_name(i) for i in range(2))
    got = [b for n in reader.nodes() for b in reader.batches(n)]
    assert len(got) == tot["batches"]
    assert sum(len(b.tables["gpu"]["ts_ns"]) for b in got if "gpu" in b.tables) == tot["samples"]
    assert tot["events"] == tot["samples"] + tot["stall_rows"] > 0


def test_worker_memory_is_measured_from_the_process_itself():
    """The bench's peak RSS per worker: sampled from /proc and the kernel's VmHWM, here for a
    child that touches 160 MiB, frees it and idles (the sampled peak and VmHWM keep it)."""
    code = ("import sys, time; b = bytearray(160 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "print('up', flush=True); time.sleep(0.6); del b; print('freed', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        sampler = fleet.RssSampler([child.pid], every_s=0.05)
        sampler.start()
        assert child.stdout.readline().strip() == "freed"
        time.sleep(0.3)
        rss, hwm = fleet._rss_kib(child.pid)
        sampler.stop()
    finally:
        child.kill()
        child.wait(10)
    assert sampler.samples >= 3
    assert sampler.peak[child.pid] >= 150 << 10 and hwm >= 160 << 10
    assert rss < 100 << 10                          # freed: the current RSS fell, the peak stays
