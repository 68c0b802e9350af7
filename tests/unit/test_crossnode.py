"""Causes across the nodes of a job (analysis/crossnode.py): a peer's TCP flow to this node
retransmitting, a peer rank's death, a peer's local stall (the same rule as the single-process
analysis, compared on random worlds), their priority, the clock uncertainty, the cases that
must not match, and the job-level cost of a local culprit. Also the facts the tracer ships for
them: exit rows (tracer/families/sched.py ExitReporter) and the node's addresses."""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest

from stallscope.analysis import crossnode as cn
from stallscope.analysis.analyze import DEFAULTS, analyze
from stallscope.analysis.text import format_text, verdict_line
from stallscope.analysis.verdict import JobCost, Verdict, build_chain
from stallscope.tracer import procinfo
from stallscope.tracer.agent import node_addrs
from stallscope.tracer.families.sched import ExitReporter
from stallscope.wire.codec import decode, encode
from stallscope.wire.schema import Batch
from tests.unit.test_blame import random_world, world_batches

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
S = 1_000 * MS
P = 100 * MS


def iv(gpu=0, start=0, end=1 * S, rank=-1, job="job7", culprit=None, res=P, lost=None):
    """An interval starting ``start`` ns after T0; ``culprit`` (start, dur) makes it explained
    by a local read."""
    c = links = chain = None
    if culprit is not None:
        c = {"type": "io", "ts_ns": T0 + culprit[0], "dur_ns": culprit[1], "pid": 100, "tid": 100,
             "comm": "python", "op": "read", "path": "/data/slow", "fs": "nfs4", "bytes": 1,
             "count": 1, "blocked_ns": culprit[1], "node": "?"}
        links = ((T0 + culprit[0], T0 + culprit[0] + culprit[1]),)
        chain = build_chain([c], min(culprit[0] + culprit[1], end) - max(culprit[0], start))
    return cn.Interval(gpu, T0 + start, T0 + end, res, lost if lost is not None else end - start, rank, job,
                       culprit=c, links=links or (), chain=chain, basis="specific" if c else None)


def loss(start, dur, daddr="10.0.0.1", job="job7", rank=3, saddr="10.0.0.2"):
    return cn.NetLoss(T0 + start, dur, saddr, 40312, daddr, 29500, retransmits=6, pid=4242, comm="python",
                      job=job, rank=rank)


def ex(at, status=signal.SIGKILL, rank=1, job="job7", gpu=0):
    return cn.Exit(4343, T0 + at, status, rank, job, "python", gpu)


def node(name, *ivs, addrs=(), unc=0, losses=(), exits=(), members=()):
    return cn.NodeFacts(name, tuple(addrs), unc, list(ivs), list(losses), list(exits), list(members))


def verdict_for(nd: cn.NodeFacts, i: int) -> Verdict:
    x = nd.intervals[i]
    local = x.culprit is not None
    return Verdict(node=nd.name, gpu=x.gpu, gpu_uuid="", idle_start_ns=x.start_ns, idle_end_ns=x.end_ns,
                   resolution_ns=x.res_ns, open=False, open_start=False, synth_samples=0,
                   verdict="culprit" if local else "unexplained", culprit=x.culprit, culprit_node=nd.name if local
                   else None, explained_fraction=1.0 if local else 0.0, job=x.job, rank=x.rank, chain=x.chain,
                   klass=x.chain.klass if local else None, basis=x.basis, lost_ns=x.lost_ns)


# --------------------------------------------------------------------------- peer_net

def net_table(ts, sport, dport):
    """A one-row net table: pid 300's flow 10.0.0.2:sport -> 10.0.0.1:dport, 4 retransmits."""
    one = (lambda v, dt: np.array([v], dtype=dt))
    return {"ts_ns": one(ts, np.uint64), "dur_ns": one(S, np.uint64), "pid": one(300, np.uint64),
            "tid": one(0, np.uint64), "comm": one("python", object), "op": one("retransmit", object),
            "saddr": one("10.0.0.2", object), "sport": one(sport, np.uint64), "daddr": one("10.0.0.1", object),
            "dport": one(dport, np.uint64), "state": one("ESTABLISHED", object),
            "retransmits": one(4, np.uint64), "sock_ino": one(7, np.uint64)}


def test_peer_flow_to_this_node_retransmitting():
    """node-a's rank 3 sends to node-b (10.0.0.1) and retransmits from 50 ms before node-b's
    idle for 1.2 s: node-b's unexplained interval is blamed on that flow, with both nodes'
    clock uncertainty."""
    a = node("node-a", iv(rank=3, start=5 * S, end=6 * S), addrs=["10.0.0.2"], unc=1 * MS,
             losses=[loss(-50 * MS, 1_200 * MS)])
    b = node("node-b", iv(rank=8), addrs=["10.0.0.1", "fd00::1"], unc=2 * MS)
    (k, c), = cn.remote_causes([b, a]).items()
    assert k == ("node-b", 0)
    assert (c.cause, c.source_node, c.source_rank, c.clock_uncertainty_ns) == ("peer_net", "node-a", 3, 3 * MS)
    assert c.covered_ns == 1 * S and c.culprit["overlap_ns"] == 1 * S
    assert (c.culprit["type"], c.culprit["daddr"], c.culprit["node"]) == ("net", "10.0.0.1", "node-a")
    v = cn.apply(verdict_for(b, 0), c)
    assert (v.verdict, v.remote, v.culprit_node, v.cause, v.culprit_rank) == ("remote", True, "node-a",
                                                                              "peer_net", 3)
    assert v.explained_fraction == 1.0 and v.klass == "network"
    assert ("remote: rank 3 on node-a: TCP 10.0.0.2:40312 -> 10.0.0.1:29500 retransmitting 1.2 s (±3 ms clock)"
            in verdict_line(v))
    d = v.to_json()
    assert d["cause"] == "peer_net" and d["culprit_rank"] == 3 and "job_cost" not in d


def test_peer_flow_matches_ipv4_mapped_and_ipv6_addresses():
    b = node("node-b", iv(rank=8), addrs=["10.0.0.1", "fd00::1"])
    for daddr in ("::ffff:10.0.0.1", "fd00:0::1"):
        a = node("node-a", addrs=["10.0.0.2"], losses=[loss(0, 500 * MS, daddr=daddr)])
        assert cn.remote_causes([a, b])[("node-b", 0)].cause == "peer_net", daddr


def test_peer_flow_no_false_match():
    """A flow to another node, from another job, from no job, to an address two nodes claim,
    starting after the idle began (beyond one period and the clock uncertainty), or ending
    before it: none explains node-b's interval."""
    b = node("node-b", iv(rank=8), addrs=["10.0.0.1"], unc=1 * MS)
    c = node("node-c", iv(rank=9), addrs=["10.0.0.9"], unc=1 * MS)
    cases = {
        "to node-c": loss(0, S, daddr="10.0.0.9"),
        "another job": loss(0, S, job="job8"),
        "no job": loss(0, S, job=""),
        "too late": loss(P + 3 * MS, S),
        "over before": loss(-2 * S, S - 3 * MS),
    }
    for why, lo in cases.items():
        a = node("node-a", addrs=["10.0.0.2"], unc=1 * MS, losses=[lo])
        got = cn.remote_causes([a, b, c])
        assert ("node-b", 0) not in got, why
    # the flow to node-c does explain node-c's interval
    a = node("node-a", addrs=["10.0.0.2"], unc=1 * MS, losses=[cases["to node-c"]])
    assert cn.remote_causes([a, b, c])[("node-c", 0)].cause == "peer_net"
    # ambiguous: 10.0.0.1 on two nodes
    c2 = node("node-c", iv(rank=9), addrs=["10.0.0.1"])
    a = node("node-a", addrs=["10.0.0.2"], losses=[loss(0, S)])
    assert cn.remote_causes([a, b, c2]) == {}
    # a node's own flow is never a remote cause for it
    b_own = node("node-b", iv(rank=8), addrs=["10.0.0.1"], losses=[loss(0, S, saddr="10.0.0.1")])
    assert cn.remote_causes([b_own]) == {}


def test_clock_uncertainty_widens_the_match():
    """A loss starting 30 ms after idle start + one period matches only when the two nodes'
    clocks may be that far apart, and the verdict says how far."""
    late = loss(P + 30 * MS, S)
    for unc, matches in ((10 * MS, False), (20 * MS, True)):
        a = node("node-a", addrs=["10.0.0.2"], unc=unc, losses=[late])
        b = node("node-b", iv(rank=8), addrs=["10.0.0.1"], unc=unc)
        got = cn.remote_causes([a, b])
        assert (("node-b", 0) in got) == matches, unc
        if matches:
            assert got[("node-b", 0)].clock_uncertainty_ns == 2 * unc
    a = node("node-a", addrs=["10.0.0.2"], unc=10 * MS, losses=[late])
    b = node("node-b", iv(rank=8), addrs=["10.0.0.1"], unc=10 * MS)
    got = cn.remote_causes([a, b], {"clock_skew_ns": 5 * MS, "min_explained": 0.5})   # analysis params pass
    assert got[("node-b", 0)].clock_uncertainty_ns == 30 * MS


# --------------------------------------------------------------------------- peer_exit

def test_peer_rank_killed_before_the_idle():
    c = node("node-c", exits=[ex(-400 * MS)], unc=1 * MS)
    b = node("node-b", iv(rank=8, start=0, end=2 * S), unc=2 * MS)
    (k, cause), = cn.remote_causes([b, c]).items()
    assert k == ("node-b", 0)
    assert (cause.cause, cause.source_node, cause.source_rank, cause.clock_uncertainty_ns) == \
        ("peer_exit", "node-c", 1, 3 * MS)
    assert cause.covered_ns == 2 * S and cause.culprit["signal"] == signal.SIGKILL
    v = cn.apply(verdict_for(b, 0), cause)
    assert v.verdict == "remote" and v.chain is None and v.explained_fraction == 1.0
    assert v.klass == "rank_exit" and v.to_json()["class"] == "rank_exit"
    assert "remote: rank 1 on node-c exited (SIGKILL) 0.4 s before (±3 ms clock)" in verdict_line(v)
    # an exit code, and a death a little after the idle began (within one period)
    c = node("node-c", exits=[ex(50 * MS, status=3 << 8)])
    v = cn.apply(verdict_for(b, 0), cn.remote_causes([b, c])[("node-b", 0)])
    assert "exited (code 3) 50.0ms after the idle began" in verdict_line(v)
    assert v.culprit["overlap_ns"] == 2 * S - 50 * MS
    assert abs(v.explained_fraction - (2 * S - 50 * MS) / (2 * S)) < 1e-9


def test_peer_exit_no_false_match():
    """Exit 0 at the job's end, an unknown status, a death 10 min before the idle (unless the
    window is widened), another job's rank, a death after the idle began (beyond one period),
    and a GPU whose own rank died too (the whole job went down): no peer_exit."""
    b = node("node-b", iv(rank=8, start=0, end=2 * S))
    for why, x in {"exit 0": ex(-400 * MS, status=0), "unknown": ex(-400 * MS, status=-1),
                   "long before": ex(-600 * S), "other job": ex(-400 * MS, job="job8"),
                   "after": ex(P + 10 * MS)}.items():
        assert cn.remote_causes([b, node("node-c", exits=[x])]) == {}, why
    assert cn.remote_causes([b, node("node-c", exits=[ex(-600 * S)])], {"exit_window_ns": 700 * S})
    own = node("node-b", iv(rank=8, start=0, end=2 * S), exits=[ex(-10 * MS, rank=8, gpu=0)])
    assert cn.remote_causes([own, node("node-c", exits=[ex(-400 * MS)])]) == {}
    # the dead rank's own GPU on its node is not "waiting for a peer"; another GPU there is
    c = node("node-c", iv(gpu=0, rank=1), iv(gpu=1, rank=2), exits=[ex(-400 * MS, rank=1, gpu=0)])
    assert list(cn.remote_causes([c])) == [("node-c", 1)]
    assert cn.remote_causes([c], {"remote_same_node": False}) == {}


def test_first_death_of_a_cascade_wins():
    b = node("node-b", iv(rank=8, start=0, end=2 * S))
    c = node("node-c", exits=[ex(-300 * MS, status=signal.SIGABRT, rank=2)])
    d = node("node-d", exits=[ex(-900 * MS, rank=5)])
    cause = cn.remote_causes([b, c, d])[("node-b", 0)]
    assert (cause.source_node, cause.source_rank) == ("node-d", 5)


# --------------------------------------------------------------------------- priorities

def test_priority_exit_then_net_then_io():
    """node-b's interval has all three candidates: a dead peer wins, then the flow into
    node-b, then node-a's local stall."""
    a = node("node-a", iv(rank=0, start=-10 * MS, end=S, culprit=(-20 * MS, 900 * MS)), addrs=["10.0.0.2"],
             losses=[loss(-5 * MS, 800 * MS)])
    b = node("node-b", iv(rank=8), addrs=["10.0.0.1"])
    c = node("node-c", exits=[ex(-400 * MS)])
    assert cn.remote_causes([a, b, c])[("node-b", 0)].cause == "peer_exit"
    assert cn.remote_causes([a, b])[("node-b", 0)].cause == "peer_net"
    a.losses = []
    got = cn.remote_causes([a, b])[("node-b", 0)]
    assert (got.cause, got.source_node, got.source_rank, got.source_index) == ("peer_io", "node-a", 0, 0)
    assert got.covered_ns == 880 * MS and got.get_chain().covered_ns == 880 * MS
    assert got.culprit["overlap_ns"] == 880 * MS
    v = cn.apply(verdict_for(b, 0), got)
    assert verdict_line(v).endswith("remote: rank 0 on node-a: read /data/slow (nfs4) pid 100 python 900.0ms (±0 ms clock)")
    # node-a's own interval keeps its local culprit; no cause for it
    assert ("node-a", 0) not in cn.remote_causes([a, b])


def test_peer_io_is_the_single_process_rule_on_random_worlds():
    """On the random worlds of test_blame: the remote verdicts analyze() gives are what
    crossnode gives from the node-level facts (same source, culprit, clock uncertainty,
    coverage), and the unexplained ones get no peer_io."""
    checked = 0
    for seed in range(8):
        rng = random.Random(seed)
        world = random_world(rng)
        p = dict(DEFAULTS, remote_same_node=rng.random() < 0.7, clock_skew_ns=rng.choice([0, 50 * MS]))
        vs = analyze(world_batches(world, rng), **p).verdicts
        facts = {}
        for v in vs:
            nd = facts.setdefault(v.node, cn.NodeFacts(v.node, unc_ns=world[v.node]["unc"]))
            nd.intervals.append(cn.Interval.from_verdict(v))
        got = cn.remote_causes(list(facts.values()), p)
        idx = {}
        for v in vs:
            idx.setdefault(v.node, []).append(v)
        for name, lst in idx.items():
            for i, v in enumerate(lst):
                c = got.get((name, i))
                if v.verdict != "remote":
                    assert c is None, (seed, v)
                    continue
                checked += 1
                assert c is not None and c.cause == "peer_io", (seed, v)
                assert (c.source_node, c.clock_uncertainty_ns) == (v.culprit_node, v.clock_uncertainty_ns)
                assert c.culprit == v.culprit and c.basis == v.basis
                if v.chain.links == 1:        # a chain's gaps need its links (node stage)
                    w = cn.apply(Verdict(**{**v.__dict__, "verdict": "unexplained", "remote": False}), c)
                    assert w.explained_fraction == pytest.approx(v.explained_fraction)
                    assert w.chain.covered_ns == v.chain.covered_ns
    assert checked >= 10


# --------------------------------------------------------------------------- job cost

def members(*keys, job="job7"):
    return [cn.Member(g, job, r, T0 - 100 * S, T0 + 100 * S) for g, r in keys]


def test_job_cost_estimate_when_the_others_stay_busy():
    """Rank 0's 800 ms read holds up the job's 3 other GPUs; only node-b's went idle: 3 ranks
    x 0.8 s, an estimate. With every other GPU idle too it is measured."""
    a = node("node-a", iv(rank=0, start=0, end=S, culprit=(100 * MS, 800 * MS)), members=members((0, 0), (1, 1)))
    b = node("node-b", iv(rank=2, start=150 * MS, end=900 * MS), members=members((0, 2)))
    c = node("node-c", members=members((0, 3)) + members((1, 9), job="job8"))
    costs = cn.job_cost([a, b, c])
    assert list(costs) == [("node-a", 0)]
    cost = costs[("node-a", 0)]
    assert (cost.ranks, cost.idle_ranks, cost.estimate) == (3, 1, True)
    assert cost.gpu_seconds == pytest.approx(2.4)
    a2 = node("node-a", iv(rank=0, start=0, end=S, culprit=(100 * MS, 800 * MS)), iv(gpu=1, rank=1, end=S),
              members=members((0, 0), (1, 1)))
    c2 = node("node-c", iv(rank=3, start=500 * MS, end=2 * S), members=members((0, 3)))
    cost = cn.job_cost([a2, b, c2])[("node-a", 0)]
    assert (cost.ranks, cost.idle_ranks, cost.estimate) == (3, 3, False)
    v = cn.apply(verdict_for(a, 0), cost=JobCost(15, 12.3, True))
    assert v.to_json()["job_cost"] == {"ranks": 15, "gpu_seconds": 12.3, "estimate": True, "idle_ranks": 0}
    assert verdict_line(v).endswith("; held up 15 ranks ≈ 12.3 GPU-s (estimate)")


def test_job_cost_counts_idle_gpus_unlisted_and_not_other_jobs_or_idle_before():
    """An idle GPU of the job that NVML's lists did not show is held up too; a member whose
    span ended before the stall, another job's idle GPU and an idle that ended before the
    stall began are not."""
    a = node("node-a", iv(rank=0, start=0, end=S, culprit=(100 * MS, 800 * MS)),
             members=members((0, 0)) + [cn.Member(1, "job7", 1, T0 - 100 * S, T0 - 50 * S)])
    b = node("node-b", iv(rank=2, start=200 * MS, end=S), iv(gpu=1, job="job8", start=0, end=S),
             iv(gpu=2, rank=5, start=-5 * S, end=-4 * S))
    cost = cn.job_cost([a, b])[("node-a", 0)]
    assert (cost.ranks, cost.idle_ranks, cost.estimate) == (1, 1, False)
    assert cn.job_cost([node("node-a", iv(culprit=(0, S)), members=members((0, 0)))]) == {}   # alone
    assert cn.job_cost([node("node-a", iv(job="", culprit=(0, S))), b]) == {}                 # no job


# --------------------------------------------------------------------------- output and text

def test_json_and_text_unchanged_without_crossnode_fields():
    b = node("node-b", iv(rank=8))
    v = verdict_for(b, 0)
    d = v.to_json()
    assert not {"cause", "culprit_rank", "job_cost"} & set(d)
    assert cn.apply(v) == v
    # a local culprit never takes a remote cause; an unexplained one never takes a cost
    a = node("node-a", iv(culprit=(0, S)))
    assert cn.apply(verdict_for(a, 0), cn.RemoteCause("node-a", 0, "peer_io", "x", 1, {}, 1, 0)).verdict == "culprit"
    assert cn.apply(v, cost=JobCost(1, 1.0, False)).job_cost is None


def test_format_text_renders_remote_causes_and_costs():
    from stallscope.analysis.analyze import Result
    c = node("node-c", exits=[ex(-400 * MS)], unc=1 * MS)
    b = node("node-b", iv(rank=8, start=0, end=2 * S), unc=2 * MS)
    a = node("node-a", iv(rank=0, culprit=(0, S)))
    va = cn.apply(verdict_for(a, 0), cost=JobCost(1, 1.0, False))
    vb = cn.apply(verdict_for(b, 0), cn.remote_causes([b, c])[("node-b", 0)])
    text = format_text(Result([va, vb], {}))
    assert "remote: rank 1 on node-c exited (SIGKILL) 0.4 s before (±3 ms clock)" in text
    assert "; held up 1 rank ≈ 1.0 GPU-s" in text and "(estimate)" not in text


# --------------------------------------------------------------------------- facts from tables

def test_facts_from_tables():
    proc = {"pid": np.array([100, 101, 100, 300], dtype=np.uint64),
            "ppid": np.array([1, 100, 1, 1], dtype=np.uint64),
            "comm": np.array(["python", "worker", "python", "python"], dtype=object),
            "start_ns": np.array([T0, T0, T0, T0], dtype=np.uint64),
            "job": np.array(["job7", "job7", "job7", "job7"], dtype=object),
            "rank": np.array([3, 3, 3, 4], dtype=np.int64),
            "exit_ns": np.array([0, T0 + 5 * S, T0 + 9 * S, T0 + 9 * S], dtype=np.uint64),
            "exit_status": np.array([-1, 9, 9, 3 << 8], dtype=np.int64)}
    gpu_proc = {"ts_ns": np.array([T0 + S, T0 + 2 * S, T0 + S], dtype=np.uint64),
                "gpu": np.array([1, 1, 0], dtype=np.uint64), "pid": np.array([100, 100, 300], dtype=np.uint64)}
    # with NVML's lists: the ranks' own processes, not the worker that inherited RANK
    got = cn.exits_from_tables(proc, gpu_proc)
    assert [(x.pid, x.rank, x.gpu, x.exit_status) for x in got] == [(100, 3, 1, 9), (300, 4, 0, 3 << 8)]
    assert len(cn.exits_from_tables(proc)) == 3            # without: every process with a rank
    old = {k: v for k, v in proc.items() if not k.startswith("exit")}
    assert cn.exits_from_tables(old) == []                 # an older tracer's rows
    ms = cn.members_from_tables(gpu_proc, proc)
    assert [(m.gpu, m.job, m.rank, m.first_ns, m.last_ns) for m in ms] == \
        [(0, "job7", 4, T0 + S, T0 + S), (1, "job7", 3, T0 + S, T0 + 2 * S)]
    net = net_table(T0, 1, 2)
    (lo,) = cn.losses_from_tables(net, proc)
    assert (lo.job, lo.rank, lo.daddr, lo.retransmits) == ("job7", 4, "10.0.0.1", 4)
    assert lo.as_event("node-a")["sock_ino"] == 7
    assert cn.addrs_from_meta({"node": {"addrs": ["10.0.0.1", "::ffff:10.0.0.1", "fd00::01", 5, "x"]}}) == \
        ("10.0.0.1", "fd00::1")
    for bad in ({}, {"node": 1}, {"node": {"addrs": "10.0.0.1"}}, None):
        assert cn.addrs_from_meta(bad) == ()
    assert cn.signal_name(0x86) == "SIGABRT, core dumped" and cn.signal_name(-1) == "status unknown"


def test_duplicate_node_is_an_error():
    with pytest.raises(ValueError, match="node-a"):
        cn.remote_causes([node("node-a"), node("node-a")])


# --------------------------------------------------------------------------- what the tracer ships

def test_exit_rows_travel_and_old_batches_decode():
    """The proc table's exit columns survive the codec; a batch without them (an older
    tracer) decodes with exit_ns 0 and exit_status -1; meta.node.addrs passes through."""
    proc = {"pid": np.array([5], dtype=np.uint64), "ppid": np.array([1], dtype=np.uint64),
            "comm": np.array(["python"], dtype=object), "start_ns": np.array([T0], dtype=np.uint64),
            "job": np.array(["job7"], dtype=object), "rank": np.array([2], dtype=np.int64),
            "pod_uid": np.array([""], dtype=object), "container_id": np.array([""], dtype=object)}
    b = decode(encode(Batch("n", 1, {"proc": proc}, meta={"node": {"addrs": ["10.0.0.1"]}})))
    assert int(b.tables["proc"]["exit_ns"][0]) == 0 and int(b.tables["proc"]["exit_status"][0]) == -1
    assert cn.addrs_from_meta(b.meta) == ("10.0.0.1",)
    proc.update(exit_ns=np.array([T0 + S], dtype=np.uint64), exit_status=np.array([9], dtype=np.int64))
    b = decode(encode(Batch("n", 2, {"proc": proc})))
    assert int(b.tables["proc"]["exit_ns"][0]) == T0 + S and int(b.tables["proc"]["exit_status"][0]) == 9


def _fake_proc(root, pid, ppid, comm, env=None):
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in (env or {}).items()) + b"\0")


def test_exit_reporter_ships_exits_that_matter_only(tmp_path):
    """A rank's worker killed (inherits job and rank), an owner with no job (the kernel's
    flag) and a stranger: rows for the first two only, each after its lineage, ranks first
    when the bound is hit."""
    (tmp_path / "stat").write_text("cpu 0\nbtime 1700000000\n")
    _fake_proc(tmp_path, 100, 1, "torchrun", {"TORCHELASTIC_RUN_ID": "job7"})
    _fake_proc(tmp_path, 200, 100, "python", {"TORCHELASTIC_RUN_ID": "job7", "RANK": "3"})
    _fake_proc(tmp_path, 900, 1, "bash")
    t = time.time_ns() - 60 * S
    lineage = {"ts_ns": np.array([t + S, t + S, t + S, t + 2 * S, t + 2 * S, t + 2 * S], dtype=np.uint64),
               "op": np.array(["fork", "fork", "fork", "exit", "exit", "exit"], dtype=object),
               "pid": np.array([300, 400, 500, 300, 400, 500], dtype=np.uint64),
               "tid": np.array([300, 400, 500, 300, 400, 500], dtype=np.uint64),
               "ppid": np.array([200, 900, 900, 200, 900, 900], dtype=np.uint64),
               "comm": np.array(["pt_worker", "ls", "cuda_app", "pt_worker", "ls", "cuda_app"], dtype=object),
               "exit_status": np.array([-1, -1, -1, 9, 0, 11 | 0x80], dtype=np.int64),
               "owner": np.array([0, 0, 0, 0, 0, 1], dtype=np.uint64)}
    for cap, want in ((16, [300, 500]), (1, [300])):
        pc = procinfo.ProcCache(str(tmp_path))
        pc.kernel_lineage(t)
        rep = ExitReporter(pc, max_rows=cap)
        pc.ingest(lineage)
        rep.add(lineage)
        tab = rep.take()
        exits = [(int(p), int(s)) for p, x, s in zip(tab["pid"], tab["exit_ns"], tab["exit_status"]) if x]
        assert [p for p, _s in exits] == want, cap
        assert dict(exits)[300] == 9 and (cap == 1 or dict(exits)[500] == 11 | 0x80)
        pids = [int(p) for p in tab["pid"]]
        assert {100, 200} <= set(pids) and 400 not in pids
        last = {p: i for i, p in enumerate(pids)}
        assert int(tab["exit_ns"][last[300]]) == t + 2 * S           # the exit row is the pid's last
        row = last[300]
        assert (tab["job"][row], int(tab["rank"][row]), int(tab["ppid"][row])) == ("job7", 3, 200)
        assert (rep.reported, rep.dropped) == (len(want), 2 - len(want))
        assert rep.take() == {}


def test_node_addrs_from_proc_files(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
        "     |-- 10.0.0.0\n        /8 host LOCAL\n     |-- 10.0.0.1\n        /32 host LOCAL\n"
        "     |-- 10.0.0.255\n        /32 link BROADCAST\n"
        "Local:\n     |-- 10.0.0.1\n        /32 host LOCAL\n     |-- 192.0.2.7\n        /32 host LOCAL\n")
    (tmp_path / "net" / "if_inet6").write_text(
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "fd000000000000000000000000000002 04 40 00 82     eth0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert node_addrs(str(tmp_path)) == ["10.0.0.1", "192.0.2.7", "fd00::2"]
    assert node_addrs(str(tmp_path / "nowhere")) == []
    # a GPU process in a namespace of its own (a pod): its address too; one read per namespace
    for pid, addr in ((700, "10.244.1.5"), (701, "10.244.1.5"), (702, None)):
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        (tmp_path / str(pid) / "net").mkdir()
        if addr:
            (tmp_path / str(pid) / "net" / "fib_trie").write_text(f"Local:\n     |-- {addr}\n        /32 host LOCAL\n")
    (tmp_path / "700" / "ns" / "net").write_text("a")
    (tmp_path / "701" / "ns" / "net").write_text("b")
    assert node_addrs(str(tmp_path), [700, 701, 702, 99]) == ["10.0.0.1", "10.244.1.5", "192.0.2.7", "fd00::2"]


def test_job_stage_of_the_two_stage_analysis_gives_the_same_peer_io():
    """With the node stage's per-job facts (analysis/analyze.py JobFacts, converted by
    node_facts), crossnode's remote causes are the job stage's remote findings, field for
    field, on the random worlds of test_blame (which have no exits or losses: all peer_io)."""
    import copy

    from stallscope.analysis import analyze as an
    if not all(hasattr(an, x) for x in ("node_stage", "jobs_of", "job_stage", "_collect")):
        pytest.skip("the two-stage analysis is not in analysis/analyze.py")
    checked = 0
    for seed in range(6):
        rng = random.Random(100 + seed)
        world = random_world(rng)
        p = dict(DEFAULTS, remote_same_node=rng.random() < 0.7, clock_skew_ns=rng.choice([0, 50 * MS]))
        nodes = an._collect(world_batches(world, rng))
        parts = {name: an.node_stage(name, nodes[name], p) for name in sorted(nodes)}
        for part in parts.values():
            part.build()
        for job, facts in sorted(an.jobs_of(parts.values()).items()):
            theirs = {n: {i: f for i, f in d.items() if f.verdict == "remote"}
                      for n, d in an.job_stage(job, facts, p).items()}
            by_node = {f.node: f for f in facts}
            mine = {}
            for (node_name, k), c in cn.remote_causes([cn.node_facts(f, job, p) for f in facts], p).items():
                mine.setdefault(node_name, {})[int(by_node[node_name].idx[k])] = c
            assert {n: sorted(d) for n, d in mine.items() if d} == {n: sorted(d) for n, d in theirs.items() if d}
            for node_name, d in theirs.items():
                for i, finding in d.items():
                    v = parts[node_name].verdicts[i]
                    want = finding.apply(copy.deepcopy(v)).to_json()
                    got = mine[node_name][i].apply(copy.deepcopy(v)).to_json()
                    assert (got["cause"], got["culprit_rank"] >= -1) == ("peer_io", True)
                    assert got == want
                    checked += 1
    assert checked >= 10


def test_from_tables_to_findings():
    """node_extra from a sender's tables and meta, node_facts from JobFacts-shaped arrays:
    the loss explains the receiver's interval, the killed rank the next one, each finding
    turning the node's verdict into the remote one."""
    from types import SimpleNamespace
    proc = {"pid": np.array([300, 301], dtype=np.uint64), "ppid": np.array([1, 1], dtype=np.uint64),
            "comm": np.array(["python", "python"], dtype=object), "start_ns": np.array([T0, T0], dtype=np.uint64),
            "job": np.array(["job7", "job7"], dtype=object), "rank": np.array([4, 5], dtype=np.int64),
            "exit_ns": np.array([0, T0 + 9 * S], dtype=np.uint64),
            "exit_status": np.array([-1, signal.SIGKILL], dtype=np.int64)}
    gpu_proc = {"ts_ns": np.array([T0, T0], dtype=np.uint64), "gpu": np.array([0, 1], dtype=np.uint64),
                "pid": np.array([300, 301], dtype=np.uint64)}
    net = net_table(T0 + 1 * S, 40312, 29500)
    sender = cn.node_extra({"net": net, "proc": proc, "gpu_proc": gpu_proc},
                           cn.addrs_from_meta({"node": {"addrs": ["10.0.0.2"]}}))
    assert [x.pid for x in sender["exits"]] == [301] and len(sender["members"]) == 2
    arr = (lambda *v: np.array(v, dtype=np.int64))
    jf_a = SimpleNamespace(node="node-a", unc_ns=1 * MS, idx=arr(), gpu=arr(), start=arr(), end=arr(), res=arr(),
                           lost=arr(), rank=arr(), culprit=np.zeros(0, bool), sources={}, extra=sender)
    jf_b = SimpleNamespace(node="node-b", unc_ns=2 * MS, idx=arr(3, 7), gpu=arr(0, 0),
                           start=arr(T0 + 1 * S + 20 * MS, T0 + 9 * S + 300 * MS), end=arr(T0 + 2 * S, T0 + 10 * S),
                           res=arr(P, P), lost=arr(980 * MS, 700 * MS), rank=arr(8, 8), culprit=np.zeros(2, bool),
                           sources={}, extra=cn.node_extra({}, ["10.0.0.1"]))
    res = cn.analyze_job([cn.node_facts(jf_a, "job7"), cn.node_facts(jf_b, "job7")])
    assert {k: c.cause for k, c in res.causes.items()} == {("node-b", 0): "peer_net", ("node-b", 1): "peer_exit"}
    v = Verdict(node="node-b", gpu=0, gpu_uuid="", idle_start_ns=T0 + 9 * S + 300 * MS, idle_end_ns=T0 + 10 * S,
                resolution_ns=P, open=False, open_start=False, synth_samples=0, verdict="unexplained", lost_ns=700 * MS)
    w = res.causes[("node-b", 1)].apply(v)
    assert (w.verdict, w.culprit_node, w.culprit_rank, w.clock_uncertainty_ns) == ("remote", "node-a", 5, 3 * MS)
    assert "remote: rank 5 on node-a exited (SIGKILL) 0.3 s before (±3 ms clock)" in verdict_line(w)
