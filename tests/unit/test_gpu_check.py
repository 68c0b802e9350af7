"""The gpu tier's Part B judge (tests/gpu/gpu_check.py), on made-up verdicts: it runs only on
a GPU machine, so its pass rule is checked here."""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))
import gpu_check  # noqa: E402

SLOW = "/m/slow-shard.bin"
RUN = {"gt": [{"kind": "read", "path": "/m/shard-0.bin", "pid": 5, "start_ns": 1, "end_ns": 2},
              {"kind": "read", "path": SLOW, "pid": 5, "start_ns": 10, "end_ns": 20}, {"kind": "trainer", "pid": 4}],
       "verdicts": [{"idle_start_ns": 0, "idle_end_ns": 5, "verdict": "unexplained", "class": "process_start",
                     "explained_fraction": 0.0, "culprit": None},
                    {"idle_start_ns": 12, "idle_end_ns": 19, "verdict": "culprit", "class": "dataset_read",
                     "explained_fraction": 0.9, "culprit": {"path": SLOW, "pid": 5, "comm": "w", "op": "read"}},
                    {"idle_start_ns": 30, "idle_end_ns": 40, "verdict": "unexplained", "class": "process_exit",
                     "explained_fraction": 0.0, "culprit": None}],
       "workload_s": 1.0, "start_ns": 0, "tracer_log": ""}


def test_judge_wants_the_read_by_its_readers_pid_and_the_edges():
    r = gpu_check._judge("dataloader", RUN, edges_named=True)
    assert r["ok"] and r["reader_pid"] == 5 and r["trainer_pid"] == 4 and r["edges"] == ["process_start", "process_exit"]
    for change in (lambda v: v[1]["culprit"].update(pid=4),            # blamed on the trainer
                   lambda v: v[1]["culprit"].update(path="/m/shard-0.bin"),
                   lambda v: v[1].update(explained_fraction=0.5),
                   lambda v: v[2].update({"class": None})):              # the exit not named
        run = copy.deepcopy(RUN)
        change(run["verdicts"])
        assert not gpu_check._judge("dataloader", run, edges_named=True)["ok"]
    assert gpu_check._judge("read", {"error": "tracer failed"}) == {"scenario": "read", "ok": False,
                                                                   "error": "tracer failed"}


def test_cpu_judge_wants_every_wait_classed_cpu_bound_naming_the_worker():
    s = 1_000_000_000
    gt = [{"kind": "item", "pid": 7}, {"kind": "trainer", "pid": 4}] + \
        [{"kind": "wait", "start_ns": k * 2 * s, "end_ns": k * 2 * s + int(1.2 * s)} for k in range(5)]
    vs = [{"idle_start_ns": k * 2 * s + 50, "idle_end_ns": k * 2 * s + int(1.2 * s), "verdict": "unexplained",
           "class": "cpu_bound", "process": {"pid": 7, "share": 0.9}, "explained_fraction": 0.0,
           "culprit": None} for k in range(5)]
    run = {"gt": gt, "verdicts": vs, "workload_s": 1.0, "start_ns": 0, "tracer_log": ""}
    r = gpu_check._judge_cpu("cpu_worker", run)
    assert r["ok"] and len(r["got"]) == 4, r              # the first wait (start-up) not judged
    for change in (lambda v: v[2]["process"].update(pid=4),     # the trainer named
                   lambda v: v[3].update({"class": None}),
                   lambda v: v.pop(4)):                          # a wait with no interval
        bad = copy.deepcopy(run)
        change(bad["verdicts"])
        assert not gpu_check._judge_cpu("cpu_worker", bad)["ok"]


def test_workloads_are_python():
    for src in (gpu_check.READ_WORKLOAD, gpu_check.DATALOADER_WORKLOAD, gpu_check.CPU_WORKER_WORKLOAD):
        compile(src, "workload", "exec")
