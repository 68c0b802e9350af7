"""Three nodes, two racks, one job: cross-node blame live on a rack collector and fleet-wide
from the Parquet lake on Dask.

node-a and node-b stream to rack collector 1, node-c to rack collector 2; both collectors write
one lake. Every node is a network namespace and a cgroup v2 of its own (tests/fixtures/
multinode.py) with its own tracer (``--node``, ``--cgroup``, its own NVML simulator state),
entered with ``nsenter --net`` and streaming over ``ipc://``. One job spans the three (ranks 0,
1, 2 on node-a, -b, -c), its ranks waiting for each other in a real TCP collective over the veth
links, their simulated GPUs idle while they wait.

Live verdicts do not cross rack collectors (cross-rack blame is the fleet report's job), so a
fault on node-a must give:

- collector 1: node-a its local culprit, node-b a ``remote`` verdict naming node-a, rank 0,
  and the fault;
- collector 2: node-c an ``unexplained`` verdict of the job (it never sees node-a), and nothing
  of node-a or node-b;
- ``report --lake`` over the shared lake, on a Dask LocalCluster of 2 worker processes that the
  test starts (``--scheduler``): node-b AND node-c ``remote`` verdicts naming node-a, rank 0,
  with the cause.

Cases: a dataset read of rank 0 stalled on a FUSE file (cause ``peer_io``); rank 0 killed by
SIGKILL as a step begins, the others then waiting at that step's collective (``peer_exit``, whose
rule wants the wait to begin after the death); every data packet of the rank-0 -> rank-1 flow
dropped on node-b's ingress for 0.8 s, so node-a retransmits (``peer_net``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from stallscope.sim import nvmlsim
from stallscope.sim.slowfs import SlowFS
from tests.bpf.tracerun import ROOT, run_cli, stallscope_argv
from tests.fixtures.multinode import ABORT_EXIT, Cluster

pytestmark = pytest.mark.bpf

NODES = ("node-a", "node-b", "node-c")
RACKS = {"rack1": ("node-a", "node-b"), "rack2": ("node-c",)}
RANKS = {"node-a": 0, "node-b": 1, "node-c": 2}
FAMILIES = "vfs,sched,tcp"
STALL_MS = 1200
BLACKOUT_S = 0.8
LAKE_FLUSH_S = 1
LIVE_WAIT_S = 40


@pytest.fixture(scope="module")
def simlib():
    return nvmlsim.build()


class Service:
    """A long-running ``stallscope`` command (collector or tracer): stdout and stderr go to
    files, ``wait_for`` watches stderr, ``stop`` signals and reaps it."""

    def __init__(self, name, argv, workdir, env):
        self.name = name
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.err_path = os.path.join(workdir, f"{name}.err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        self.rc = None

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def stdout_lines(self):
        with open(self.out_path, errors="replace") as f:
            return [ln for ln in f.read().splitlines() if ln.strip()]

    def wait_for(self, text, timeout_s):
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} (rc={self.proc.poll()}): "
                                     f"{self.stderr()[-2000:]}")
            time.sleep(0.2)

    def stop(self, sig=signal.SIGINT, timeout_s=60):
        if self.rc is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.rc = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.rc = self.proc.wait()
        return self.rc


class Racks:
    """Two rack collectors writing one lake, and a tracer per node inside its namespace."""

    def __init__(self, cluster, workdir, simlib, lake):
        self.cluster = cluster
        self.workdir = str(workdir)
        self.simlib = simlib
        self.lake = lake
        # ipc:// paths must stay short (sun_path is 108 bytes): not under pytest's tmp_path
        self.sockdir = tempfile.mkdtemp(prefix="ssmn-")
        self.collectors: dict = {}
        self.tracers: dict = {}
        self.stores: dict = {}

    def endpoint(self, rack):
        return f"ipc://{self.sockdir}/{rack}.sock"

    def __enter__(self):
        env = {**os.environ, "PYTHONPATH": ROOT}
        try:
            for rack in RACKS:
                self.stores[rack] = os.path.join(self.workdir, f"{rack}.db")
                self.collectors[rack] = Service(rack, stallscope_argv(
                    "collect", "--bind", self.endpoint(rack), "--store", self.stores[rack], "--json",
                    "--lake", self.lake, "--lake-flush-s", str(LAKE_FLUSH_S)), self.workdir, env)
            for c in self.collectors.values():
                c.wait_for("listening on", 60)
            for rack, names in RACKS.items():
                for name in names:
                    node = self.cluster.node(name)
                    argv = stallscope_argv(
                        "trace", "--quiet", "--collector", self.endpoint(rack), "--node", name,
                        "--cgroup", node.cgroup, "--spool-dir", os.path.join(self.workdir, f"spool-{name}"),
                        "--families", FAMILIES, "--gpu", "--nvml-lib", self.simlib,
                        "--min-latency-ms", "50")
                    self.tracers[name] = Service(name, node.exec_argv(argv, in_cgroup=False), self.workdir,
                                                 {**env, nvmlsim.STATE_ENV: node.nvml_state})
            for t in self.tracers.values():
                t.wait_for("stallscope: tracing", 180)
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc):
        self._kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        return False

    def _kill(self):
        for s in list(self.tracers.values()) + list(self.collectors.values()):
            with contextlib.suppress(Exception):
                s.stop(signal.SIGKILL, 10)

    def verdicts(self, rack):
        """The rack's live verdicts, the last one per (node, gpu, idle start): a collector
        flushes every interval still open when a tracer's final batch arrives, so an interval
        open until the end is reported again, longer, when the next tracer stops."""
        last = {}
        for ln in self.collectors[rack].stdout_lines():
            v = json.loads(ln)
            last[(v["node"], v["gpu"], v["idle_start_ns"])] = v
        return list(last.values())

    def wait_verdicts(self, want, timeout_s=LIVE_WAIT_S):
        """Poll the collectors' live verdicts until ``want(rack -> verdicts)`` is true."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = {rack: self.verdicts(rack) for rack in RACKS}
            if want(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    def stop(self):
        """Tracers first (their final batches reach the collectors), then the collectors."""
        rcs = {name: t.stop(signal.SIGINT) for name, t in self.tracers.items()}
        rcs.update({rack: c.stop(signal.SIGTERM) for rack, c in self.collectors.items()})
        for name, rc in rcs.items():
            svc = self.tracers.get(name) or self.collectors[name]
            assert rc == 0, (name, rc, svc.stderr()[-2000:])
            assert "tick failed" not in svc.stderr(), (name, svc.stderr()[-2000:])
        return rcs


def overlapping(verdicts, node, start, end):
    return [v for v in verdicts if v["node"] == node and v["idle_start_ns"] < end and v["idle_end_ns"] > start]


def store_pids(db):
    """node -> pids of every stall and GPU-process row the collector stored for it."""
    from stallscope.collector.store import Store
    st = Store(db)
    out: dict = {}
    try:
        for _, b in st.batches():
            pids = out.setdefault(b.node, set())
            for kind in ("io", "sched", "net", "gpu_proc"):
                t = b.tables.get(kind)
                if t is not None and len(t["pid"]):
                    pids.update(int(p) for p in t["pid"])
    finally:
        st.close()
    return out


def lake_report(lake):
    """``report --lake`` on a Dask LocalCluster of 2 worker processes started here; its
    verdicts. The workers must have run the report's tasks."""
    from distributed import Client, LocalCluster

    def executed(dask_worker):
        return dask_worker.state.executed_count

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        before = client.run(executed)
        r = run_cli("report", "--lake", lake, "--scheduler", lc.scheduler_address, "--json", timeout=300)
        after = client.run(executed)
    assert r.returncode == 0, r.stderr[-3000:]
    ran = {w: after[w] - before.get(w, 0) for w in after}
    assert len(ran) == 2 and sum(ran.values()) > 0, ran
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def check_confined(racks, job):
    """Each rack stored only its own nodes, and each node's rows name only its own rank."""
    stored = {rack: store_pids(db) for rack, db in racks.stores.items()}
    assert set(stored["rack1"]) == {"node-a", "node-b"}, sorted(stored["rack1"])
    assert set(stored["rack2"]) == {"node-c"}, sorted(stored["rack2"])
    for rack, per_node in stored.items():
        for name, pids in per_node.items():
            assert pids and pids <= {job.pids[RANKS[name]]}, (name, pids, job.pids)


def remote_of(v, job, cause, rank):
    """A remote verdict of ``rank``'s interval whose ``cause`` is node-a's rank 0."""
    assert v["verdict"] == "remote" and v["remote"] is True, v
    assert (v["job"], v["rank"]) == (job.job_id, rank), v
    assert (v.get("cause"), v.get("culprit_rank")) == (cause, 0), v
    assert v["culprit_node"] == "node-a" and v["culprit"]["node"] == "node-a", v
    assert v["culprit"]["pid"] == job.pids[0], (v["culprit"], job.pids)


def one(verdicts, node, start, end):
    vv = overlapping(verdicts, node, start, end)
    assert len(vv) == 1, (node, start, end, vv)
    return vv[0]


def same_culprit(a, b):
    keys = ("type", "node", "pid", "ts_ns", "dur_ns", "op")
    assert {k: a["culprit"].get(k) for k in keys} == {k: b["culprit"].get(k) for k in keys}, (a, b)


# ---------------------------------------------------------------------------- the cases

def test_peer_io_stall_on_node_a_blamed_on_node_b_live_and_on_b_and_c_from_the_lake(tmp_path, simlib):
    """Rank 0's dataset read waits 1.2 s on a stalled FUSE file at step 3; ranks 1 and 2 wait
    as long in the collective."""
    lake = f"file://{tmp_path}/lake"
    with SlowFS(delay_ms=STALL_MS, ops=("read",)) as fs:
        slow = fs.make_file("slow-shard-7.bin", 1 << 20)
        fast = fs.make_file("shard-0.bin", 1 << 20)
        with Cluster(NODES, tmp_path) as cl, Racks(cl, tmp_path, simlib, lake) as racks:
            job = cl.launch_job(RANKS, f"mn-io-{os.getpid()}", tmp_path, steps=6, compute_s=0.3,
                                data=fast, stall_path=slow, stall_step=3)
            job.ready().go()
            assert job.wait(60) == {0: 0, 1: 0, 2: 0}, [job.stderr(r) for r in range(3)]
            stall = job.step(0, 3)
            s, e = stall["read_start_ns"], stall["read_end_ns"]
            assert e - s >= STALL_MS * 1e6 * 0.95, stall
            for r in (1, 2):          # the others really waited for rank 0's read
                w = job.step(r, 3)
                assert w["wait_end_ns"] - w["wait_start_ns"] >= STALL_MS * 1e6 * 0.9, (r, w)

            def live_done(got):
                return (any(v["verdict"] == "remote" for v in overlapping(got["rack1"], "node-b", s, e))
                        and overlapping(got["rack1"], "node-a", s, e)
                        and overlapping(got["rack2"], "node-c", s, e))
            live = racks.wait_verdicts(live_done)
            racks.stop()
        check_confined(racks, job)

    # rack 1, live: node-a's own read, and node-b's wait blamed on it
    a = one(live["rack1"], "node-a", s, e)
    assert a["verdict"] == "culprit" and (a["job"], a["rank"]) == (job.job_id, 0), a
    assert (a["culprit"]["type"], a["culprit"]["op"], a["culprit"]["path"], a["culprit"]["pid"]) == \
        ("io", "read", slow, job.pids[0]), a
    # its cost to the job as rack 1 sees it: node-b's GPU held up (node-c is not in view)
    assert a["job_cost"] == {"ranks": 1, "idle_ranks": 1, "estimate": False,
                             "gpu_seconds": a["job_cost"]["gpu_seconds"]}, a
    b = one(live["rack1"], "node-b", s, e)
    remote_of(b, job, "peer_io", 1)
    same_culprit(b, a)
    assert (b["culprit"]["op"], b["culprit"]["path"]) == ("read", slow), b
    assert b["chain"]["files"] == [slow] and b["class"] == "dataset_read", b
    assert b["explained_fraction"] >= 0.8, b
    assert not [v for v in live["rack1"] if v["node"] == "node-c"]
    # rack 2, live: node-c waited as long, but its collector never saw node-a
    c = one(live["rack2"], "node-c", s, e)
    assert c["verdict"] == "unexplained" and c["culprit"] is None and c["culprit_node"] is None, c
    assert (c["job"], c["rank"]) == (job.job_id, 2), c
    assert c["idle_end_ns"] - c["idle_start_ns"] >= STALL_MS * 1e6 * 0.7, c
    assert {v["node"] for v in live["rack2"]} == {"node-c"}

    # the fleet report over the lake both racks wrote: node-b AND node-c blamed on node-a
    fleet = lake_report(lake)
    fa = one(fleet, "node-a", s, e)
    assert fa["verdict"] == "culprit", fa
    same_culprit(fa, a)
    cost = fa["job_cost"]          # fleet-wide: both other ranks held up, both seen idle
    assert (cost["ranks"], cost["idle_ranks"], cost["estimate"]) == (2, 2, False), fa
    assert abs(cost["gpu_seconds"] - 2 * (e - s) / 1e9) < 0.1, (cost, e - s)
    for name in ("node-b", "node-c"):
        v = one(fleet, name, s, e)
        remote_of(v, job, "peer_io", RANKS[name])
        same_culprit(v, a)
        assert v["chain"]["files"] == [slow] and v["explained_fraction"] >= 0.8, v


def test_peer_exit_rank_0_killed_while_the_others_compute(tmp_path, simlib):
    """Rank 0 dies by SIGKILL as step 3 begins; ranks 1 and 2 finish their compute and wait
    at the collective until their timeout (1.5 s), then exit with code 3. Their GPUs stay idle
    after that (the job is gone), so the interval is still open when the tracers stop: the
    collector reports it from the tracer's final batch, which flushes open intervals."""
    lake = f"file://{tmp_path}/lake"
    with Cluster(NODES, tmp_path) as cl, Racks(cl, tmp_path, simlib, lake) as racks:
        job = cl.launch_job(RANKS, f"mn-exit-{os.getpid()}", tmp_path, steps=5, compute_s=0.3,
                            die_step=3, collective_timeout_s=1.5)
        job.ready().go()
        assert job.wait(60) == {0: -signal.SIGKILL, 1: ABORT_EXIT, 2: ABORT_EXIT}, \
            [job.stderr(r) for r in range(3)]
        died = job.step(0, 3)["dying_ns"]
        waits = {r: job.step(r, 3) for r in (1, 2)}
        for r, w in waits.items():     # they began to wait after the death, and saw it
            assert died < w["wait_start_ns"] <= w["peer_lost_ns"] < w["wait_end_ns"], (r, w, died)
        ws = min(w["wait_start_ns"] for w in waits.values())
        we = max(w["wait_end_ns"] for w in waits.values())
        time.sleep(2)               # the exits reach the collectors
        racks.stop()
        live = {rack: racks.verdicts(rack) for rack in RACKS}
    check_confined(racks, job)

    b = one(live["rack1"], "node-b", ws, we)
    remote_of(b, job, "peer_exit", 1)
    assert (b["culprit"]["type"], b["culprit"]["exit_status"], b["culprit"]["signal"]) == \
        ("exit", signal.SIGKILL, signal.SIGKILL), b
    assert abs(b["culprit"]["ts_ns"] - died) < 50e6, (b["culprit"], died)
    assert b["explained_fraction"] >= 0.8, b
    c = one(live["rack2"], "node-c", ws, we)
    assert c["verdict"] == "unexplained" and c["culprit"] is None, c
    assert (c["job"], c["rank"]) == (job.job_id, 2), c
    assert {v["node"] for v in live["rack2"]} == {"node-c"}

    fleet = lake_report(lake)
    for name in ("node-b", "node-c"):
        v = one(fleet, name, ws, we)
        remote_of(v, job, "peer_exit", RANKS[name])
        same_culprit(v, b)
    # node-a's own GPU is idle because its rank died: no one to blame elsewhere
    for v in overlapping(fleet, "node-a", died, we):
        assert v["verdict"] != "remote", v


def test_peer_net_lossy_link_into_node_b(tmp_path, simlib):
    """At step 3 rank 0 answers rank 1 with 8 KiB while node-b's ingress drops every data
    packet of that flow for 0.8 s (nftables on node-b's eth0: lost on the wire); node-a
    retransmits until the link is back (RTO backoff: ~1.5 s), rank 1 waits as long. Rank 2
    got its answer first and rank 0's send fits in its socket buffer, so neither waits; every
    rank then computes 2.5 s more, so only node-b idles around the loss."""
    lake = f"file://{tmp_path}/lake"
    with Cluster(NODES, tmp_path) as cl, Racks(cl, tmp_path, simlib, lake) as racks:
        na, nb = cl.node("node-a"), cl.node("node-b")
        job = cl.launch_job(RANKS, f"mn-net-{os.getpid()}", tmp_path, steps=4, compute_s=0.3,
                            big_step=3, big_bytes=8192, pause_step=3, tail_s=2.5)
        job.ready().go()
        assert job.pause(0) == 3
        retrans0 = cl.snmp_retrans(na)
        cl.set_loss(nb, 100, na.addr, 29500, min_len=1000)
        job.resume(0)
        time.sleep(0.3 + BLACKOUT_S)
        cl.set_loss(nb, 0, na.addr, 29500, min_len=1000)
        assert job.wait(60) == {0: 0, 1: 0, 2: 0}, [job.stderr(r) for r in range(3)]
        retrans = cl.snmp_retrans(na) - retrans0
        assert retrans >= 2, retrans
        w = job.step(1, 3)
        ws, we = w["wait_start_ns"], w["wait_end_ns"]
        assert we - ws >= BLACKOUT_S * 1e9, w
        rank1_port = job.info[1]["flows"]["0"][1]

        def live_done(got):
            return any(v["verdict"] == "remote" for v in overlapping(got["rack1"], "node-b", ws, we))
        live = racks.wait_verdicts(live_done)
        racks.stop()
    check_confined(racks, job)

    b = one(live["rack1"], "node-b", ws, we)
    remote_of(b, job, "peer_net", 1)
    flow = (na.addr, 29500, nb.addr, rank1_port)
    cb = b["culprit"]
    assert (cb["type"], cb["saddr"], cb["sport"], cb["daddr"], cb["dport"]) == ("net", *flow), cb
    assert 1 <= cb["retransmits"] <= retrans, (cb, retrans)
    assert b["class"] == "network" and b["explained_fraction"] >= 0.6, b
    # rank 0 never waited: node-a has nothing to answer for locally
    assert not overlapping(live["rack1"], "node-a", ws, we), live["rack1"]
    assert not [v for v in live["rack2"] if v.get("culprit_node") in ("node-a", "node-b")]

    fleet = lake_report(lake)
    v = one(fleet, "node-b", ws, we)
    remote_of(v, job, "peer_net", 1)
    same_culprit(v, b)
    assert (v["culprit"]["saddr"], v["culprit"]["daddr"], v["culprit"]["dport"]) == (na.addr, nb.addr, rank1_port)
