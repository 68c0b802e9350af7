"""Chains, storms, the scheduler backstop, culprit classes and the report's repeated-culprit
groups, on hand-built workloads."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from stallscope.analysis.analyze import analyze
from stallscope.analysis.text import format_text, verdict_line
from stallscope.analysis.verdict import group_verdicts, op_class, path_pattern
from stallscope.commands.report import report
from stallscope.wire.recording import RecordingWriter
from tests.unit.test_blame import MS, T0, P, io, proc, table, trainer_batch

S0 = T0 + 10 * P


def idle_for(ms):
    """Utilizations idle from S0 for ``ms`` (a multiple of the period), busy around."""
    return [100] * 10 + [0] * (ms // 100) + [100] * 10


def sched(ts, dur, pid, op="blocked", reason="fuse_simple_request", other_pid=0, other_comm=""):
    return {"ts_ns": ts, "dur_ns": dur, "pid": pid, "tid": pid, "comm": "python", "op": op,
            "reason": reason, "count": 1, "blocked_ns": dur, "other_pid": other_pid,
            "other_comm": other_comm}


def one(batch, **p):
    (v,) = analyze([batch], **p).verdicts
    return v


def test_write_then_fsync_is_one_chain():
    w = io(S0 + 30 * MS, 590 * MS, 100, path="/ckpt/step-1200.pt", op="write", fs="nfs")
    f = io(S0 + 625 * MS, 600 * MS, 100, path="/ckpt/step-1200.pt", op="fsync", fs="nfs")
    v = one(trainer_batch("a", idle_for(1_200), [w, f]))
    assert v.verdict == "culprit" and v.explained_fraction >= 0.9
    assert v.klass == "checkpoint_write" and v.basis == "specific"
    ch = v.chain
    assert (ch.ops, ch.count, ch.links, ch.files) == ({"write": 1, "fsync": 1}, 2, 2,
                                                      ["/ckpt/step-1200.pt"])
    assert ch.blocked_ns == 1_190 * MS and ch.covered_ns == 1_165 * MS
    assert "write+fsync /ckpt/step-1200.pt (nfs) 1.2 s, pid 100 python" in verdict_line(v)
    assert v.contributors == []                      # the fsync is in the chain, not beside it


def test_reads_back_to_back_across_workers_explain_the_interval():
    # three workers hand over to each other; only the first starts by start + resolution
    stalls = [io(S0 + 20 * MS, 500 * MS, 101, path="/data/shard-1.bin"),
              io(S0 + 480 * MS, 500 * MS, 102, path="/data/shard-2.bin"),
              io(S0 + 990 * MS, 500 * MS, 101, path="/data/shard-3.bin")]
    v = one(trainer_batch("a", idle_for(1_500), stalls))
    assert v.verdict == "culprit" and v.explained_fraction == pytest.approx(1_460 / 1_500)
    assert v.chain.pid == 101 and v.chain.links == 2 and v.chain.covered_ns == 1_000 * MS
    assert [c["pid"] for c in v.contributors] == [102]


def test_a_chain_starting_1_5_s_in_is_blamed_for_what_it_covers():
    stat = io(S0 - 50 * MS, 1_550 * MS, 100, path="/data", op="stat")      # the idle begins here
    reads = [io(S0 + 1_500 * MS + k * 500 * MS, 500 * MS, 101, path=f"/data/train-shard-{k}.bin")
             for k in range(4)]                                           # ... and continues here
    v = one(trainer_batch("a", idle_for(3_500), [stat] + reads))
    assert v.verdict == "culprit" and v.explained_fraction == 1.0
    assert v.chain.pid == 101 and v.chain.start_ns == S0 + 1_500 * MS
    assert v.chain.covered_ns == 2_000 * MS and v.chain.count == 4 and v.klass == "dataset_read"
    assert [(c["op"], c["overlap_ns"]) for c in v.contributors] == [("stat", 1_500 * MS)]


def test_a_stall_that_begins_while_the_owner_idles_for_another_reason_is_not_blamed():
    reads = [io(S0 + 1_500 * MS + k * 500 * MS, 500 * MS, 101) for k in range(4)]
    v = one(trainer_batch("a", idle_for(3_500), reads))
    assert v.verdict == "unexplained" and v.contributors == [] and v.explained_fraction == 0
    # a hole longer than one period between what explains the start and the reads
    stat = io(S0 - 50 * MS, 1_050 * MS, 100, path="/data", op="stat")
    v = one(trainer_batch("a", idle_for(3_500), [stat] + reads))
    assert v.verdict == "unexplained" and [c["op"] for c in v.contributors] == ["stat"]
    assert v.explained_fraction == pytest.approx(1_000 / 3_500)


def test_storm_aggregate_row_names_the_count():
    storm = io(S0 - 20 * MS, 1_000 * MS, 101, path="/data/train-shard-17.bin", fs="fuse",
               count=120, blocked_ns=900 * MS)
    v = one(trainer_batch("a", idle_for(900), [storm]))
    assert v.verdict == "culprit" and v.chain.count == 120 and v.chain.blocked_ns == 900 * MS
    assert v.to_json()["chain"]["count"] == 120
    assert "120 reads of /data/train-shard-17.bin (fuse) 0.9 s" in verdict_line(v)
    assert "120 reads of /data/train-shard-17.bin (fuse) 0.9 s" in format_text(analyze(
        [trainer_batch("a", idle_for(900), [storm])]))


def test_a_distractor_process_is_never_blamed_nor_bridges_a_chain():
    own = io(S0 - 10 * MS, 300 * MS, 101)                                  # owner, first 290 ms
    other = io(S0 + 280 * MS, 800 * MS, 300, path="/backup", op="write")  # rsync bridges ...
    late = io(S0 + 1_050 * MS, 950 * MS, 101)                              # ... to a later read
    dsched = sched(S0 - 50 * MS, 3_000 * MS, 300)                          # and is blocked too
    b = trainer_batch("a", idle_for(2_000), [own, other, late],
                      extra_procs=[proc(300, 1, "rsync")], sched=[dsched])
    v = one(b)
    assert v.verdict == "unexplained" and v.basis is None
    assert {c["pid"] for c in v.contributors} == {101}
    assert v.explained_fraction == pytest.approx(290 / 2_000)
    assert 300 not in [c["pid"] for c in v.to_json()["contributors"]] and v.culprit is None


def test_backstop_only_where_nothing_specific_explains():
    read = io(S0 - 10 * MS, 910 * MS, 101, path="/data/x", fs="fuse")
    blocked = sched(S0 - 20 * MS, 1_020 * MS, 101)
    v = one(trainer_batch("a", idle_for(1_000), [read], sched=[blocked]))
    assert v.basis == "specific" and v.chain.kind == "io"
    assert [c["type"] for c in v.contributors] == []      # the backstop was not consulted
    short = io(S0 - 10 * MS, 210 * MS, 101, path="/data/x", fs="fuse")
    v = one(trainer_batch("a", idle_for(1_000), [short], sched=[blocked]))
    assert v.verdict == "culprit" and v.basis == "backstop" and v.klass == "blocked"
    assert v.chain.kind == "sched" and v.explained_fraction == 1.0
    assert [c["type"] for c in v.contributors] == ["io"]
    assert "blocked in kernel (fuse_simple_request) 1.0 s, pid 101 python" in verdict_line(v)
    assert v.to_json()["basis"] == "backstop"


def test_runq_verdict_names_who_ran():
    runq = sched(S0 - 5 * MS, 1_005 * MS, 100, op="runq", reason="", other_pid=4242,
                 other_comm="ffmpeg")
    v = one(trainer_batch("a", idle_for(1_000), [], sched=[runq]))
    assert v.verdict == "culprit" and v.klass == "cpu" and v.basis == "backstop"
    assert (v.chain.other_pid, v.chain.other_comm) == (4242, "ffmpeg")
    assert "CPU contention: runnable 1.0 s while ffmpeg pid 4242 ran" in verdict_line(v)
    assert v.to_json()["chain"]["other_comm"] == "ffmpeg"


@pytest.mark.parametrize("kind,op,klass", [
    ("io", "page_fault", "dataset_read"), ("io", "copy_file_range", "dataset_read"),
    ("io", "pwrite", "checkpoint_write"), ("io", "fdatasync", "checkpoint_write"),
    ("io", "openat", "metadata"), ("io", "getdents", "metadata"),
    ("nfs", "nfs_getattr", "metadata"), ("nfs", "nfs_rpc", "network"),
    ("nfs", "nfs_commit", "checkpoint_write"), ("net", "retransmit", "network"),
    ("rdma", "rdma_get_cq_event", "network"), ("sched", "runq", "cpu"),
    ("sched", "blocked", "blocked")])
def test_op_classes(kind, op, klass):
    assert op_class(kind, op) == klass


def test_a_chain_takes_the_class_of_most_of_its_blocked_time():
    opn = io(S0 - 10 * MS, 100 * MS, 101, path="/data/s.bin", op="openat")
    rd = io(S0 + 92 * MS, 900 * MS, 101, path="/data/s.bin")
    v = one(trainer_batch("a", idle_for(1_000), [opn, rd]))
    assert v.klass == "dataset_read" and list(v.chain.ops) == ["openat", "read"]


def test_rdma_completion_waits_chain():
    waits = [{"ts_ns": S0 - 5 * MS + k * 250 * MS, "dur_ns": 248 * MS, "pid": 100, "tid": 100,
              "comm": "python", "op": "rdma_get_cq_event", "device": "mlx5_0", "qp": 7}
             for k in range(4)]
    v = one(trainer_batch("a", idle_for(1_000), [], rdma=waits))
    assert v.klass == "network" and v.chain.links == 4 and v.explained_fraction >= 0.9


def ckpt_node(node, rank, step, server="nfs-server-3"):
    w = {"ts_ns": S0 - 5 * MS, "dur_ns": 905 * MS, "pid": 100, "tid": 100, "comm": "python",
         "op": "nfs_write", "path": f"/ckpt/rank{rank}/step-{step}.pt", "fs": "nfs4",
         "server": server}
    b = trainer_batch(node, idle_for(900), [], job="j1", rank=rank, nfs=[w])
    return b


def test_report_groups_repeated_culprits_with_a_checkpoint_breakdown(tmp_path):
    bs = [ckpt_node(f"n{r}", r, 1200) for r in range(3)]
    reads = trainer_batch("n9", idle_for(1_000) + idle_for(1_000),
                          [io(S0 - 5 * MS, 1_005 * MS, 101, path="/data/train-shard-17.bin",
                              fs="fuse"),
                           io(S0 + 3_000 * MS - 5 * MS, 1_005 * MS, 101,
                              path="/data/train-shard-18.bin", fs="fuse")])
    res = analyze(bs + [reads])
    groups = group_verdicts(res.verdicts)
    assert [(g["class"], g["where"], g["pattern"], g["intervals"]) for g in groups] == [
        ("checkpoint_write", "nfs-server-3", "/ckpt/rank#/step-#.pt", 3),
        ("dataset_read", "fuse", "/data/train-shard-#.bin", 2)]
    assert groups[0]["explained_ns"] == 3 * 900 * MS and groups[0]["ranks"] == [0, 1, 2]
    assert groups[1]["explained_ns"] == 2 * 1_000 * MS
    assert [(b["rank"], b["file"], b["where"]) for b in groups[0]["breakdown"]] == [
        (0, "/ckpt/rank0/step-1200.pt", "nfs-server-3"), (1, "/ckpt/rank1/step-1200.pt", "nfs-server-3"),
        (2, "/ckpt/rank2/step-1200.pt", "nfs-server-3")]
    text = format_text(res)
    assert "Repeated culprits" in text
    assert "checkpoint_write /ckpt/rank#/step-#.pt on nfs-server-3: 3 intervals on 3 GPUs cost 2.7 GPU-seconds" in text

    rec = str(tmp_path / "r.ssrec")
    w = RecordingWriter(rec)
    for b in bs + [reads]:
        for k, t in list(b.tables.items()):
            b.tables[k] = {c: v for c, v in t.items()}
        w(b)
    w.close()
    r = CliRunner().invoke(report, ["--group", rec])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert [(g["class"], g["pattern"], g["explained_ns"]) for g in lines] == [
        (g["class"], g["pattern"], g["explained_ns"]) for g in groups]
    r = CliRunner().invoke(report, ["--json", rec])
    assert r.exit_code == 0, r.output
    vs = [json.loads(x) for x in r.output.splitlines()]
    assert len(vs) == 5 and {v["class"] for v in vs} == {"checkpoint_write", "dataset_read"}
    assert all(v["basis"] == "specific" and v["chain"]["files"] for v in vs)


def test_path_pattern():
    assert path_pattern("/data/train-shard-17.bin") == "/data/train-shard-#.bin"
    assert path_pattern("/ckpt/step-1200.pt") == "/ckpt/step-#.pt"


def test_remote_verdict_carries_the_chain_and_its_class():
    w = io(S0 + 30 * MS, 590 * MS, 100, path="/ckpt/s.pt", op="write")
    f = io(S0 + 625 * MS, 600 * MS, 100, path="/ckpt/s.pt", op="fsync")
    a = trainer_batch("node-a", idle_for(1_200), [w, f], job="j", rank=0)
    b = trainer_batch("node-b", idle_for(1_200), [], job="j", rank=1)
    va, vb = analyze([a, b]).verdicts
    assert vb.verdict == "remote" and vb.klass == "checkpoint_write" and vb.chain.links == 2
    assert vb.chain.covered_ns == 1_165 * MS and vb.basis == "specific"
    assert vb.explained_fraction == pytest.approx(1_165 / 1_200)


def test_a_schema_1_io_table_without_count_columns_still_works():
    b = trainer_batch("a", idle_for(1_000), [io(S0 - 5 * MS, 1_005 * MS, 101)])
    t = b.tables["io"]
    b.tables["io"] = {c: v for c, v in t.items() if c not in ("count", "blocked_ns")}
    v = one(b)
    assert v.chain.count == 1 and v.chain.blocked_ns == 1_005 * MS
    assert table("io", [])["count"].dtype.kind == "u"


class _Tables:
    """A node as ``_Stalls`` reads it: one complete table per kind."""

    def __init__(self, tables):
        self.tables = tables

    def stall_table(self, kind):
        return self.tables.get(kind, {})


def _random_rows(rng, kind, n):
    """n rows of ``kind``, one pid, by start: few distinct ops and targets, some counts and
    blocked times zero (so the duration stands in), as storms and chains have them."""
    import numpy as np

    from stallscope.analysis.analyze import _normalize
    ts = np.cumsum(rng.integers(1, 5 * MS, n)).astype(np.uint64) + np.uint64(T0)
    dur = rng.integers(MS, 40 * MS, n).astype(np.uint64)
    pick = (lambda xs: np.array(xs, dtype=object)[rng.integers(0, len(xs), n)])
    t = {"ts_ns": ts, "dur_ns": dur, "pid": np.full(n, 77, np.uint64), "tid": np.full(n, 78, np.uint64),
         "comm": np.full(n, "pt_data_worker", dtype=object)}
    if kind in ("io", "nfs"):
        t.update(op=pick(["read", "pread", "write", "fsync"] if kind == "io" else ["nfs_read", "nfs_write"]),
                 path=pick(["/data/a", "/data/b", "/ckpt/c", ""]), fs=pick(["nfs", "ext4"]))
        if kind == "nfs":
            t["server"] = pick(["10.0.0.1", "10.0.0.2"])
    elif kind == "net":
        t.update(op=pick(["retransmit"]), saddr=pick(["10.0.0.1"]), daddr=pick(["10.0.0.2", "10.0.0.3"]),
                 sport=rng.integers(40000, 40003, n).astype(np.uint64), dport=np.full(n, 29500, np.uint64))
    elif kind == "rdma":
        t.update(op=pick(["poll_cq", "req_notify_cq"]), device=pick(["rxe0", "mlx5_0"]),
                 qp=rng.integers(1, 4, n).astype(np.uint64))
    elif kind == "block":
        t.update(op=pick(["blk_read", "blk_write"]), device=pick(["nvme0n1", "sda"]))
    elif kind == "sched":
        t.update(op=pick(["runq", "blocked"]), reason=pick(["fuse_simple_request", "io_schedule"]),
                 other_pid=rng.integers(1, 3, n).astype(np.uint64), other_comm=pick(["stress", "kworker"]))
    if kind in ("io", "sched"):
        t["count"] = rng.integers(0, 4, n).astype(np.uint64)
        t["blocked_ns"] = np.where(rng.random(n) < 0.3, 0, dur // 2).astype(np.uint64)
    return _normalize(kind, t)


@pytest.mark.parametrize("kind", ["io", "nfs", "net", "rdma", "block", "sched"])
def test_chain_summed_per_distinct_row_equals_chain_of_every_row(kind):
    """``_Stalls.chain`` (numpy sums per distinct row) gives the chain ``build_chain`` makes
    from every row's event dict: ops in first-seen order, class, targets and their order."""
    import numpy as np

    from stallscope.analysis.analyze import _Stalls
    from stallscope.analysis.verdict import build_chain
    from stallscope.wire.schema import Cat
    rng = np.random.default_rng(23)
    for n, categorical in ((20, False), (300, False), (3_000, False), (3_000, True)):
        rows = _random_rows(rng, kind, n)
        if categorical:     # text as the decoder gives it: codes, each value under two of them
            for c, v in rows.items():
                if v.dtype == object:
                    cats, inv = np.unique(v, return_inverse=True)
                    twice = np.array(list(cats) * 2, dtype=object)
                    rows[c] = Cat.make(twice, inv.reshape(-1) + len(cats) * rng.integers(0, 2, n))
        st = _Stalls(["node-a"], {"node-a": _Tables({kind: rows})})
        idx = np.sort(rng.choice(n, size=max(16, n // 3), replace=False))
        if kind == "io":         # a chain's rows by start need not be by index
            idx = idx[rng.permutation(len(idx))]
        got = st.chain(idx, 123 * MS)
        want = build_chain([st.event(int(j)) for j in idx], 123 * MS)
        assert json.dumps(got.to_json()) == json.dumps(want.to_json())
        assert (got.klass, got.other_pid, got.other_comm) == (want.klass, want.other_pid, want.other_comm)
