"""The fleet report (analysis/fleet.py) on a real Dask cluster equals analyze() on the same
batches (issue 10: "results are identical to the single-process analyzer"), and
`report --lake` prints what `report STORE` prints.

The batches go through a Parquet lake in tmp_path (wire/lake.py) and are read back by the
workers; the client only lists the nodes.  One local cluster is shared by the module's
scheduler tests; one test lets fleet_report start (and stop) its own.
"""

from __future__ import annotations

import collections
import json
import pickle
import random

import pytest
from click.testing import CliRunner

from stallscope.analysis import analyze as an
from stallscope.analysis import fleet
from stallscope.analysis.analyze import DEFAULTS, analyze
from stallscope.commands.report import report
from stallscope.wire.lake import LakeReader, write_batches
from stallscope.wire.recording import RecordingWriter
from tests.netutil import free_port
from tests.unit.test_analysis_chains import S0, idle_for
from tests.unit.test_blame import IDLE, MS, T0, io, random_world, split_batch, trainer_batch, world_batches

P = 100 * MS


def hand_world() -> list:
    """Six nodes, two jobs, each node's data in two batches:

    * job train: node-a rank 0 reads a slow shard (local culprit); node-b rank 8 idles at the
      next collective (remote, from node-a) and once more later with nothing to blame
      (unexplained, in a job);
    * job eval: node-c rank 0 writes a checkpoint, write then fsync (local culprit, a chain);
      node-e rank 1 waits (remote, carrying the chain); node-f's processes name no job but
      the Slurm job mapping puts its GPU in eval (remote too);
    * node-d runs no job and idles with nothing traced (unexplained), and counts lost events;
    * node-a also had a throttled HTTP request while busy (the endpoints summary counts it).
    """
    throttled = {"ts_ns": T0 + 2 * P, "dur_ns": 50 * MS, "pid": 100, "tid": 100, "comm": "python",
                 "op": "PUT", "host": "s3.example", "path": "/ckpt/k", "status": 503,
                 "reason": "Slow Down", "statuses": "503", "count": 1}     # while busy: no blame
    a = trainer_batch("node-a", IDLE, [io(S0 - 5 * MS, 1_000 * MS, 101, path="/data/slow")],
                      job="train", rank=0, unc=3 * MS, http=[throttled])
    b = trainer_batch("node-b", [100] * 11 + [0] * 10 + [100] * 9 + [0] * 5 + [100] * 5,
                      job="train", rank=8, unc=2 * MS)
    w = io(S0 + 30 * MS, 590 * MS, 100, path="/ckpt/step-1200.pt", op="write")
    f = io(S0 + 625 * MS, 600 * MS, 100, path="/ckpt/step-1200.pt", op="fsync")
    c = trainer_batch("node-c", idle_for(1_200), [w, f], job="eval", rank=0)
    e = trainer_batch("node-e", idle_for(1_200), [], job="eval", rank=1)
    fm = trainer_batch("node-f", idle_for(1_200), [])
    fm.meta["gpu"]["gpus"][0]["jobs"] = ["eval"]
    fm.meta["clock"]["sent_ns"] = S0 - 2_000 * MS
    d = trainer_batch("node-d", IDLE, [], counters={"ring_lost": 7, "events": 99})
    out = []
    for x in (a, b, c, e, fm, d):
        out += split_batch(x, [S0 + 500 * MS])
    return out


def write_lake(path, batches) -> str:
    by_node = collections.defaultdict(list)
    for b in batches:
        by_node[b.node].append(b)
    for node, bs in by_node.items():
        write_batches(str(path), node, bs)
    return str(path)


def as_json(res) -> tuple:
    return [v.to_json() for v in res.verdicts], json.dumps(res.summary)


def kinds(res) -> dict:
    out = collections.defaultdict(list)
    for v in res.verdicts:
        out[v.node].append(v.verdict)
    return dict(out)


HAND_KINDS = {"node-a": ["culprit"], "node-b": ["remote", "unexplained"], "node-c": ["culprit"],
              "node-d": ["unexplained"], "node-e": ["remote"], "node-f": ["remote"]}


@pytest.fixture(scope="module")
def scheduler():
    import distributed
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    yield cluster.scheduler_address
    cluster.close()


# --------------------------------------------------------------------------- the two stages

def test_the_hand_world_has_every_kind_of_verdict():
    res = analyze(hand_world())
    assert kinds(res) == HAND_KINDS
    by = {(v.node, v.verdict): v for v in res.verdicts}
    assert by[("node-b", "remote")].culprit_node == "node-a"
    assert by[("node-e", "remote")].chain.links == 2 and by[("node-e", "remote")].job == "eval"
    assert by[("node-f", "remote")].job == "eval" and by[("node-f", "remote")].rank == -1
    assert by[("node-d", "unexplained")].job == "" and res.summary["lost"] == {"ring_lost": 7}


def test_node_parts_pickle_without_their_tables_and_give_the_same_result():
    """The stages by hand, each part pickled as a worker sends it: analyze()'s result."""
    batches = hand_world()
    p = an._params({})
    parts = []
    for name, nd in sorted(an._collect(batches).items()):
        part = an.node_stage(name, nd, p)
        part.build()
        part.release()
        assert part._make is None and part._source is None
        assert all(s._st is None for s in part.sources.values())
        parts.append(pickle.loads(pickle.dumps(part)))
    by_job = collections.defaultdict(list)
    for part in parts:
        for job, facts in pickle.loads(pickle.dumps(part.job_facts())).items():
            by_job[job].append(facts)
    assert sorted(by_job) == ["eval", "train"]
    by_name = {x.name: x for x in parts}
    for job, facts in by_job.items():
        for node, found in pickle.loads(pickle.dumps(an.job_stage(job, facts[::-1], p))).items():
            by_name[node].take(found)
    assert as_json(an.assemble(parts[::-1], p)) == as_json(analyze(batches))


def test_a_node_read_as_columns_is_the_node_read_as_batches(tmp_path):
    """What the workers read (LakeReader.columns) gives the node state analyze() builds from
    the batches: holders that change, clocks that step back, a batch without a clock, GPU
    meta runs, counters."""
    base = trainer_batch("node-x", IDLE * 2, [io(S0 - 5 * MS, 1_000 * MS, 101)], job="train",
                         rank=0, unc=MS, counters={"ring_lost": 3})
    batches = split_batch(base, [T0 + k * 5 * P for k in range(1, 12)])
    sent = [10, 20, 15, 30, 25, 40, 40, 35, 50, 60, 55, 70]
    jobs = ["a", "a", "a", "b", "b", "a", "a", "a", "", "b", "b", "b"]
    for b, t, j in zip(batches, sent, jobs):
        b.meta = json.loads(json.dumps(b.meta))       # each batch its own meta
        b.meta["gpu"]["gpus"][0]["jobs"] = [j] if j else []
        b.meta["clock"] = {"sent_ns": T0 + t * P, "uncertainty_ns": t * 1000,
                           **({"ntp_synced": False} if t == 55 else {})}
        b.counters = {"ring_lost": t // 10, "events": t}
    del batches[7].meta["clock"]
    url = write_lake(tmp_path / "lake", batches)
    by_batches = an._collect(LakeReader(url).batches("node-x"))["node-x"]
    by_columns = an._Node("node-x")
    by_columns.absorb_columns(LakeReader(url).columns("node-x"))
    for attr in ("batches", "periods", "uuids", "unc_ns", "counters", "gpu_unavailable", "unsynced"):
        assert getattr(by_columns, attr) == getattr(by_batches, attr), attr
    assert by_columns.holders.hist == by_batches.holders.hist
    assert len(by_batches.holders.hist[0][0]) > 4                    # the history did change
    for kind in ("gpu", "gpu_proc", "proc", "io"):
        a, b = by_columns.table(kind), by_batches.table(kind)
        assert a.keys() == b.keys() and all(list(a[c]) == list(b[c]) for c in a), kind


# --------------------------------------------------------------------------- on Dask

def test_fleet_report_on_its_own_local_cluster_equals_analyze(tmp_path, monkeypatch):
    batches = hand_world()
    url = write_lake(tmp_path / "lake", batches)

    def client_must_not_read(*_a, **_k):
        raise AssertionError("the client read a node's batches")

    monkeypatch.setattr(LakeReader, "batches", client_must_not_read)   # this process only
    seen = []
    got = fleet.fleet_report(url, workers=2, progress=lambda *a: seen.append(a))
    want = analyze(batches)
    assert kinds(got) == HAND_KINDS
    assert as_json(got) == as_json(want)
    assert got.nodes == {}
    assert seen[0] == ("nodes", 0, 6) and ("nodes", 6, 6) in seen and ("jobs", 2, 2) in seen
    assert seen[-1] == ("verdicts", 6, 6)


@pytest.mark.parametrize("seed", range(4))
def test_fleet_report_on_a_scheduler_equals_analyze_on_random_worlds(tmp_path, scheduler, seed):
    rng = random.Random(100 + seed)
    batches = world_batches(random_world(rng), rng)
    p = dict(min_explained=rng.choice([0.5, 0.3]), remote_same_node=seed % 2 == 0,
             clock_skew_ns=rng.choice([0, 50 * MS]), max_contributors=rng.choice([10, 2]))
    url = write_lake(tmp_path / "lake", batches)
    got = fleet.fleet_report(url, scheduler=scheduler, **p)
    want = analyze(batches, **p)
    assert got.summary["params"] == dict(DEFAULTS, **p)
    assert len(want.verdicts) > 20 and as_json(got) == as_json(want)


def test_an_empty_lake_gives_an_empty_report_without_a_cluster(tmp_path):
    (tmp_path / "lake").mkdir()
    assert as_json(fleet.fleet_report(str(tmp_path / "lake"))) == as_json(analyze([]))


# --------------------------------------------------------------------------- the CLI

def test_report_lake_prints_what_report_store_prints(tmp_path, scheduler):
    batches = hand_world()
    url = write_lake(tmp_path / "lake", batches)
    rec = str(tmp_path / "all.ssrec")
    w = RecordingWriter(rec)
    for b in batches:
        w(b)
    w.close()
    lake = ["--lake", url, "--scheduler", scheduler]
    for args in ([], ["--json"], ["--group"], ["--endpoints"]):
        a = CliRunner().invoke(report, [*args, rec])
        b = CliRunner().invoke(report, [*args, *lake])
        assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
        assert b.stdout == a.stdout and a.stdout.strip(), args
    for src, out in ((rec, "store.json"), (None, "lake.json")):
        r = CliRunner().invoke(report, [*([src] if src else lake), "--trace", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lake.json").read_text()) == json.loads((tmp_path / "store.json").read_text())


@pytest.mark.parametrize("args,says", [
    (["--lake", "/nonexistent/stallscope-lake"], "no lake at /nonexistent/stallscope-lake"),
    (["--lake", "nosuchfs://bucket/lake"], "nosuchfs"),
    (["--lake", "{lake}", "--scheduler", "tcp://127.0.0.1:{port}"], "cannot reach the Dask scheduler"),
])
def test_a_bad_lake_or_scheduler_is_one_line_and_exit_2(tmp_path, monkeypatch, args, says):
    monkeypatch.setattr(fleet, "CONNECT_TIMEOUT_S", 1)
    url = write_lake(tmp_path / "lake", hand_world()[:2])
    args = [a.format(lake=url, port=free_port()) for a in args]
    r = CliRunner().invoke(report, args)
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_lake_options_go_with_the_lake():
    r = CliRunner().invoke(report, ["--scheduler", "tcp://x:8786", "some.db"])
    assert r.exit_code == 2 and "go with --lake" in r.output
    r = CliRunner().invoke(report, ["--lake", "/tmp/x", "some.db"])
    assert r.exit_code == 2 and "not both" in r.output
