"""How the agent turns what it drained into a batch (tracer/agent.py build_batch), against
a fixture /proc: stall tables concatenated, lineage of every stalled process and its
ancestors, sink losses and retransmit counters, clock and schema meta."""

import time

import numpy as np

from stallscope.tracer.agent import Agent, AgentConfig
from stallscope.wire.recording import RecordingWriter
from stallscope.wire.schema import ABI_VERSION, SCHEMA_VERSION


def proc_tree(root, procs):
    (root / "stat").write_text("cpu 0 0 0 0\nbtime 1700000000\n")
    for pid, ppid, comm in procs:
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
                                f"{100 + pid} 0 0\n")
        (d / "environ").write_bytes(b"SLURM_JOB_ID=77\0RANK=3\0" if comm == "trainer" else b"")


def io(pid, ts, path):
    return {"ts_ns": np.array([ts], np.uint64), "dur_ns": np.array([50_000_000], np.uint64),
            "pid": np.array([pid], np.uint64), "tid": np.array([pid], np.uint64),
            "comm": np.array(["w"], object), "op": np.array(["read"], object),
            "bytes": np.array([4096], np.int64), "path": np.array([path], object),
            "fs": np.array(["fuse"], object), "dev": np.array([0], np.uint64),
            "ino": np.array([0], np.uint64), "cgroup": np.array([0], np.uint64),
            "method": np.array(["tracepoint"], object)}


def test_build_batch_concatenates_and_ships_lineage_and_losses(tmp_path):
    proc_tree(tmp_path, [(1, 0, "init"), (4000, 1, "trainer"), (4001, 4000, "pt_data_worker")])
    sink = RecordingWriter("/dev/full")            # every write fails: counted, not raised
    agent = Agent(AgentConfig(proc_root=str(tmp_path), node="n1"), [sink], log=lambda m: None)
    now = time.time_ns()          # the fixture's processes started at boot: stalls come after
    agent.pending = [{"io": io(4001, now - 2_000_000_000, "/data/shard-1.bin")},
                     {"io": io(4001, now - 1_000_000_000, "/data/shard-2.bin")}]
    b = agent.build_batch()
    agent.flush()                                     # through the failing sink
    assert b.node == "n1" and b.seq == 0
    assert list(b.tables["io"]["path"]) == ["/data/shard-1.bin", "/data/shard-2.bin"]
    assert list(b.tables["io"]["count"]) == [1, 1]      # optional columns filled in
    proc = b.tables["proc"]
    rows = {int(p): (int(pp), c) for p, pp, c in zip(proc["pid"], proc["ppid"], proc["comm"])}
    assert rows[4001] == (4000, "pt_data_worker") and rows[4000] == (1, "trainer")
    job = {int(p): (j, int(r)) for p, j, r in zip(proc["pid"], proc["job"], proc["rank"])}
    assert job[4000] == ("77", 3)
    assert b.meta["abi"] == ABI_VERSION and b.meta["schema"] == SCHEMA_VERSION
    assert "wall_minus_mono_ns" in b.meta["clock"] and b.meta["final"] is False
    b2 = agent.build_batch(final=True)
    assert b2.seq == 2 and b2.counters["filesink.dropped_batches"] == 1
    assert b2.counters["tcp.retransmits"] == 0 and b2.meta["final"] is True
    assert "proc" not in b2.tables                    # lineage is shipped once


def test_a_gpu_idle_again_after_a_short_busy_phase_is_newly_idle(tmp_path):
    """The CPU sampler's quick first samples start when a GPU goes idle: after a busy
    sample (this poll's or the last one's), even when its last idle spell ended less than a
    second ago (a training step between two waits); not while it stays idle."""
    proc_tree(tmp_path, [(1, 0, "init")])
    agent = Agent(AgentConfig(proc_root=str(tmp_path), node="n1"), [], log=lambda m: None)
    polls = []

    class Gpu:
        def poll(self):
            return polls.pop(0)
    agent.gpu = Gpu()
    agent.started_ns = time.time_ns()     # set by start(), which loads probes
    t = [agent.started_ns]

    def poll(*utils):
        rows = []
        for u in utils:
            t[0] += 100_000_000
            rows.append((t[0], u))
        polls.append({"gpu": {"ts_ns": np.array([r[0] for r in rows], np.uint64), "gpu": np.zeros(len(rows), np.int64),
                              "util": np.array([r[1] for r in rows], np.int64)},
                      "gpu_proc": {"gpu": np.zeros(0, np.int64), "pid": np.zeros(0, np.int64)}})
        agent._newly_idle = False
        agent._sample_gpu()
        return agent._newly_idle
    assert poll(95, 0)                    # goes idle within a poll
    assert not poll(0, 0)                 # stays idle
    assert not poll(95, 95)               # computes for 0.2 s
    assert poll(0, 0)                     # idle again, 0.2 s after the last idle poll
    assert poll(95, 95) is False and poll(95, 0)
