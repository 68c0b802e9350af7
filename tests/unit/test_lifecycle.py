"""Unexplained intervals at the edges of the GPU's processes (analysis/verdict.py lifecycle):
the start-up before a process's first GPU work, its exit, and its workers re-forked in the
middle (a DataLoader without persistent_workers). Seen on a real H200 (tests/gpu, Part B): a
traced torch run gives one such interval at each end, which read as bare "unexplained"."""

from __future__ import annotations

import json

import numpy as np

from stallscope.analysis.analyze import LiveAnalyzer, analyze
from stallscope.analysis.text import format_text, verdict_line
from stallscope.analysis.verdict import lifecycle
from stallscope.wire.schema import Batch
from tests.unit.test_blame import MS, T0, P, samples, table

S = 1000 * MS
TRAINER, WORKER, OTHER = 579, 600, 4000


def _world(exit_status=0, worker_start=5.1 * S, trainer_start=0.3 * S, exit_at=8.6 * S):
    """GPU 0, sampled every 100 ms for 10 s: idle 0-2 s (the trainer starts at 0.3 s), busy
    2-5 s, idle 5-5.5 s (a worker starts at 5.1 s), busy 5.5-8 s, idle 8-10 s (the trainer
    exits at 8.6 s). Nothing slow traced."""
    utils = [0] * 20 + [95] * 30 + [0] * 5 + [95] * 25 + [0] * 20
    listed = [{"ts_ns": T0 + k * P, "gpu": 0, "pid": TRAINER} for k in range(5, 87)]
    proc = [{"pid": TRAINER, "ppid": 1, "comm": "python3", "start_ns": T0 + int(trainer_start),
             "exit_ns": T0 + int(exit_at) if exit_at else 0, "exit_status": exit_status},
            {"pid": WORKER, "ppid": TRAINER, "comm": "pt_data_worker", "start_ns": T0 + int(worker_start),
             "exit_status": -1},
            {"pid": OTHER, "ppid": 1, "comm": "rsync", "start_ns": T0 + 5 * S, "exit_status": -1}]
    tables = {"gpu": table("gpu", samples(0, utils)), "gpu_proc": table("gpu_proc", listed),
              "proc": table("proc", proc)}
    meta = {"gpu": {"sample_period_ns": {"0": P}}}
    return [Batch("vm", 0, tables, {}, {}, meta)]


def test_start_up_workers_and_exit_are_named():
    vs = analyze(_world()).verdicts
    assert [v.verdict for v in vs] == ["unexplained"] * 3
    assert [v.klass for v in vs] == ["process_start", "workers_start", "process_exit"]
    start, workers, end = vs
    assert start.process == {"pid": TRAINER, "comm": "python3", "at_ns": T0 + 300 * MS}
    assert workers.process["pids"] == [WORKER] and workers.process["count"] == 1   # not rsync: not the GPU's
    assert end.process == {"pid": TRAINER, "comm": "python3", "at_ns": T0 + 8600 * MS, "exit_status": 0}
    assert "start-up: python3 pid 579 started 0.3 s into it" in verdict_line(start)
    assert "worker start-up: pt_data_worker pid 600, a child" in verdict_line(workers)
    line = verdict_line(end)
    assert "exit: python3 pid 579 exited 0.6 s into it (code 0)" in line, line
    assert json.loads(json.dumps(end.to_json()))["process"]["exit_status"] == 0
    assert json.loads(json.dumps(end.to_json()))["class"] == "process_exit"
    text = format_text(analyze(_world()))
    assert "3 unexplained (3 at a GPU process's start-up, exit or workers' start-up)" in text, text


def test_a_crash_names_its_signal_and_no_edge_means_no_class():
    vs = analyze(_world(exit_status=9)).verdicts
    assert "(SIGKILL)" in verdict_line(vs[-1])
    # the trainer ran before the recording and never exited, no worker started: plain unexplained
    vs = analyze(_world(trainer_start=-60 * S, worker_start=3.0 * S, exit_at=0)).verdicts
    assert [v.klass for v in vs] == [None, None, None]
    assert all(v.process is None and "process" not in v.to_json() for v in vs)


def test_live_verdicts_carry_the_same_classes():
    live = LiveAnalyzer()
    got = []
    for b in _world():
        got += live.add([b])
    got += live.flush()
    assert [v.klass for v in got] == ["process_start", "workers_start", "process_exit"]


def test_lifecycle_rule_edges():
    proc = table("proc", [{"pid": 7, "comm": "p", "start_ns": 1000, "exit_ns": 5000, "exit_status": 0}])
    # exit after the interval: only when it is still open; a start in it then
    assert lifecycle(proc, [7], [7], 100, 4000, 10, open_end=False)[0] == "process_start"
    assert lifecycle(proc, [7], [7], 2000, 4000, 10, open_end=True)[0] == "process_exit"
    assert lifecycle(proc, [7], [7], 2000, 4000, 10, open_end=False) is None
    # started within a period before the interval: still its start-up
    assert lifecycle(proc, [7], [7], 1005, 1500, 10, open_end=False)[0] == "process_start"
    assert lifecycle(proc, [7], [7], 1100, 1500, 10, open_end=False) is None
    assert lifecycle({}, [7], [7], 0, 1, 1, False) is None
    assert lifecycle(proc, np.array([], dtype=np.int64), [], 0, 10_000, 10, True) is None
