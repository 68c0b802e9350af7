"""Blame on the ways a training process really waits, each paired with a distractor.

Each test runs the accuracy benchmark's workload (sim/scenarios.py) with a short plan of one
cause: the real tracer with default settings records it, `stallscope report` judges it. The
culprit must be the trainer's (or its short-lived worker's) stall on the right file, and the
distractor, an unrelated process doing the same stall at the same time, must never be blamed:
its stalls must have been traced, so "not blamed" cannot pass by not seeing them.
"""

import os
import re
import shutil

import pytest

from bench.bench_accuracy import run
from stallscope.collector.store import load_batches
from stallscope.wire.schema import STALL_TABLES

pytestmark = pytest.mark.bpf


def plan_of(cause, n=2, dur_ms=(900, 1400), distractor=True):
    return [{"idx": i, "cause": cause, "dur_ms": dur_ms[i % len(dur_ms)], "busy_s": 0.6,
             "distractor": distractor and i % 2 == 0} for i in range(n)]


def traced_rows(rec, pid):
    rows = []
    for b in load_batches(rec):
        for kind in STALL_TABLES:
            t = b.tables.get(kind)
            if t is None or not len(t["pid"]):
                continue
            for i in range(len(t["pid"])):
                if int(t["pid"][i]) == pid:
                    rows.append({"kind": kind, "op": t["op"][i], "path": t["path"][i] if "path" in t else "",
                                 "ts_ns": int(t["ts_ns"][i]), "dur_ns": int(t["dur_ns"][i])})
    return rows


def check(res, cause):
    try:
        _check(res, cause)
    finally:
        shutil.rmtree(os.path.dirname(res["rec"]), ignore_errors=True)


def _check(res, cause):
    bad = [d for d in res["details"] if not d["ok"]]
    assert not bad, (cause, bad, res["verdicts"])
    assert res["false_blames"] == 0, res["verdicts"]
    others = [w for w in res["truth"] if w.get("other_path")]
    if others:
        assert all(w.get("other_done") for w in others), others
        mine = traced_rows(res["rec"], res["distractor_pid"])
        names = {os.path.basename(w["other_path"]) for w in others}
        # a file, or for small_files and cold_opens a folder: the file's or its folder's name
        seen = {n for r in mine if r["path"]
                for n in (os.path.basename(r["path"]), os.path.basename(os.path.dirname(r["path"])))}
        assert names <= seen, (names, mine)        # the distractor's stall was traced, not blamed


@pytest.mark.parametrize("cause", ["worker_read", "thread_read", "write_fsync", "upload", "storm", "small_files",
                                   "cold_opens", "pool_files", "mmap", "copy", "metadata"])
def test_culprit_is_the_trainers_stall_not_the_distractors(cause):
    check(run(0, 0, plan=plan_of(cause), log=lambda m: None, keep=True), cause)


def test_cpu_contention_names_the_hog():
    res = run(0, 0, plan=plan_of("cpu", distractor=False), log=lambda m: None, keep=True)
    for v in res["verdicts"]:
        c = v.get("culprit")
        if c and c.get("op") == "runq":
            assert c.get("other_pid") == res["hog_pid"], c
    check(res, "cpu")


def test_nothing_is_unexplained():
    res = run(0, 0, plan=plan_of("nothing", distractor=False), log=lambda m: None, keep=True)
    check(res, "nothing")


@pytest.mark.parametrize("cause", ["compute", "worker_compute"])
def test_cpu_work_is_classed_cpu_bound_naming_who_computed(cause):
    """Nothing blocked: the trainer computes on the CPU itself, or waits on a pipe while its
    persistent worker does. "unexplained", classed cpu_bound, naming that process (or, on a
    machine short of CPU, the trainer's wait for one)."""
    res = run(0, 0, plan=plan_of(cause, distractor=False), log=lambda m: None, keep=True)
    who = {w["pids"][-1] for w in res["truth"]}
    sampled = {int(p) for b in load_batches(res["rec"]) for p in (b.tables.get("cpu") or {}).get("pid", [])}
    assert who <= sampled, (who, sampled)          # the tracer sampled the process that computed
    classed = [d for d in res["details"] if (d["verdict"] or {}).get("class") == "cpu_bound"]
    assert classed, [(d["ok"], d["verdict"], d["culprit"]) for d in res["details"]]
    assert all(d["verdict"]["process"]["pid"] in who for d in classed), classed
    check(res, cause)


@pytest.mark.parametrize("cause,call", [("stream", "poll"), ("thread_stream", "poll in thread shard-fetch"),
                                        ("pipe_stream", "poll"), ("async_stream", "epoll_wait"),
                                        ("loop_stream", "epoll_wait in thread pt_data_worker")])
def test_streaming_from_a_slow_server_is_classed_net_wait(cause, call):
    """Nothing blocked in a probe's sense: a persistent worker fetches each sample over HTTP
    from a slow dataset server (another process, on loopback) while the trainer waits on its
    pipe, or the trainer's own thread pool fetches while it waits on the future, or the
    worker reads the sample from a curl it started (WebDataset's ``pipe:curl``), or fetches
    it in an asyncio loop, its own or one in a thread (fsspec's, two requests at once to the
    server's two addresses). "unexplained", classed net_wait, naming the process that waited
    on the socket (the worker, the trainer, curl) and the server's address (and the count of
    its other addresses waited on)."""
    res = run(0, 0, plan=plan_of(cause, distractor=False), log=lambda m: None, keep=True)
    who = {w["pids"][-1] for w in res["truth"]}
    waits = [(int(p), str(peer)) for b in load_batches(res["rec"]) if b.tables.get("wait")
             for p, peer in zip(b.tables["wait"]["pid"], b.tables["wait"]["peer"])]
    assert {p for p, _ in waits} == who, (who, waits)      # the sampler found the worker waiting
    classed = [d for d in res["details"] if (d["verdict"] or {}).get("class") == "net_wait"]
    assert len(classed) == len(res["truth"]), [(d["ok"], d["verdict"], d["culprit"]) for d in res["details"]]
    for d in classed:
        p = d["verdict"]["process"]
        assert p["pid"] in who and p["call"] == call, p
        if cause == "loop_stream":      # two connections, to the server's two addresses
            assert re.fullmatch(r"127\.0\.0\.[12]:\d+ \(\+1 more host\)", p["peer"]), p
        else:
            assert re.fullmatch(r"127\.0\.0\.1:\d+", p["peer"]), p
    check(res, cause)
