"""GPU idle while its processes computed on the CPU (analysis/verdict.py cpu_bound, from the
tracer's "cpu" table: tracer/cpu.py): nothing blocked, so no stall explains it, but the GPU's
process, or its DataLoader workers, used a core's worth of CPU through the interval."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from stallscope.analysis.analyze import LiveAnalyzer, analyze
from stallscope.analysis.text import format_text, verdict_line
from stallscope.analysis.verdict import cpu_bound
from stallscope.export.chrome_trace import interval_name
from stallscope.export.prometheus import verdict_labels
from stallscope.tracer.cpu import CpuSampler, read_cpu_ns
from stallscope.wire.schema import Batch
from tests.unit.test_blame import MS, T0, P, samples, table

S = 1000 * MS
TRAINER, WORKER, WORKER2, OTHER = 579, 600, 601, 4000


def _cpu_rows(pid, shares, period=500 * MS, comm=""):
    """Running CPU totals of ``pid`` sampled every ``period`` from T0, using ``shares[k]`` of
    a core in the k-th period."""
    total, rows = 0, []
    for k, sh in enumerate([0.0] + list(shares)):
        total += int(sh * period)
        rows.append({"ts_ns": T0 + k * period, "pid": pid, "comm": comm, "cpu_ns": total})
    return rows


def _world(trainer=None, workers=None, other=None):
    """GPU 0 sampled every 100 ms for 10 s: busy 0-3 s, idle 3-5 s, busy 5-10 s; the trainer
    (started long before) and two workers on it. CPU shares per 500 ms: 20 periods each."""
    utils = [95] * 30 + [0] * 20 + [95] * 50
    listed = [{"ts_ns": T0 + k * P, "gpu": 0, "pid": TRAINER} for k in range(100)]
    proc = [{"pid": TRAINER, "ppid": 1, "comm": "python3", "start_ns": T0 - 600 * S, "exit_status": -1},
            {"pid": WORKER, "ppid": TRAINER, "comm": "pt_data_worker", "start_ns": T0 - 500 * S,
             "exit_status": -1},
            {"pid": WORKER2, "ppid": TRAINER, "comm": "pt_data_worker", "start_ns": T0 - 500 * S,
             "exit_status": -1},
            {"pid": OTHER, "ppid": 1, "comm": "ffmpeg", "start_ns": T0 - 500 * S, "exit_status": -1}]
    busy = [0.3] * 6 + [0.0] * 4 + [0.3] * 10           # waits for the GPU (asleep) in the idle
    rows = _cpu_rows(TRAINER, trainer or busy)
    for pid, sh in ((WORKER, workers), (WORKER2, workers), (OTHER, other)):
        rows += _cpu_rows(pid, sh or [0.1] * 20)
    tables = {"gpu": table("gpu", samples(0, utils)), "gpu_proc": table("gpu_proc", listed),
              "proc": table("proc", proc), "cpu": table("cpu", rows)}
    return [Batch("n1", 0, tables, {}, {}, {"gpu": {"sample_period_ns": {"0": P}}})]


def test_trainer_computing_on_the_cpu_is_named():
    # 3-5 s: the trainer runs Python-side work on the CPU (95%); its workers idle
    vs = analyze(_world(trainer=[0.3] * 6 + [0.95] * 4 + [0.3] * 10)).verdicts
    assert [v.verdict for v in vs] == ["unexplained"]
    v = vs[0]
    assert v.klass == "cpu_bound"
    assert v.process["pid"] == TRAINER and v.process["comm"] == "python3"
    assert abs(v.process["share"] - 0.95) < 0.06 and v.process["count"] == 1
    assert abs(v.process["cpu_ns"] - 0.95 * v.duration_ns) < 0.1 * v.duration_ns
    line = verdict_line(v)
    assert "on CPU: python3 pid 579 used" in line and "of a core" in line, line
    j = json.loads(json.dumps(v.to_json()))
    assert j["class"] == "cpu_bound" and j["process"]["busy"][0]["pid"] == TRAINER
    assert "cpu_bound" in verdict_labels(v)
    assert interval_name(v) == "unexplained (cpu_bound)"                # the Perfetto slice
    text = format_text(analyze(_world(trainer=[0.3] * 6 + [0.95] * 4 + [0.3] * 10)))
    assert "1 while a GPU process or its workers computed on the CPU" in text, text


def test_busy_workers_are_named_and_another_process_is_not():
    # the trainer sleeps waiting for batches; both workers decode flat out; ffmpeg (not the
    # GPU's) too
    vs = analyze(_world(workers=[1.0] * 20, other=[1.0] * 20)).verdicts
    v = vs[0]
    assert v.klass == "cpu_bound"
    assert {b["pid"] for b in v.process["busy"]} == {WORKER, WORKER2}
    assert v.process["comm"] == "pt_data_worker" and v.process["count"] == 2
    assert "pt_data_worker pid 60" in verdict_line(v)


def test_no_cpu_table_or_a_sleeping_gpu_process_leaves_it_plain():
    vs = analyze(_world()).verdicts                        # everyone mostly asleep
    assert [v.klass for v in vs] == [None] and vs[0].process is None
    b = _world(trainer=[0.3] * 6 + [0.95] * 4 + [0.3] * 10)[0]
    del b.tables["cpu"]
    assert [v.klass for v in analyze([b]).verdicts] == [None]
    # 40% of a core: below the bar
    assert analyze(_world(trainer=[0.3] * 6 + [0.4] * 4 + [0.3] * 10)).verdicts[0].klass is None


def test_live_verdicts_carry_it():
    live = LiveAnalyzer()
    got = live.add(_world(trainer=[0.3] * 6 + [0.95] * 4 + [0.3] * 10))
    got += live.flush()
    assert [v.klass for v in got] == ["cpu_bound"]


def test_the_name_is_the_one_sampled():
    """A worker forked just before it renamed itself has its parent's name in the proc table;
    the CPU samples carry the name it had while it computed."""
    cpu = table("cpu", _cpu_rows(7, [1.0] * 4, comm="pt_data_worker"))
    got = cpu_bound(cpu, [7], T0 + 500 * MS, T0 + 1500 * MS, comm_of=lambda p: "trainer")[1]
    assert got["comm"] == "pt_data_worker" and got["busy"][0]["comm"] == "pt_data_worker"
    cpu = table("cpu", _cpu_rows(7, [1.0] * 4))                 # an older tracer: no name sampled
    assert cpu_bound(cpu, [7], T0 + 500 * MS, T0 + 1500 * MS, comm_of=lambda p: "trainer")[1]["comm"] == "trainer"


def test_cpu_bound_rule_edges():
    cpu = table("cpu", _cpu_rows(7, [1.0] * 4))             # samples 0-2 s, a full core
    assert cpu_bound(cpu, [7], T0 + 500 * MS, T0 + 1500 * MS)[1]["share"] == 1.0
    assert cpu_bound(cpu, [8], T0 + 500 * MS, T0 + 1500 * MS) is None           # not a member
    # samples inside cover only a quarter of the interval: no judgement
    assert cpu_bound(cpu, [7], T0 + 1500 * MS, T0 + 3500 * MS) is None
    # half of it covered: judged on that half; a third too
    assert cpu_bound(cpu, [7], T0 + 1000 * MS, T0 + 3000 * MS)[0] == "cpu_bound"
    assert cpu_bound(cpu, [7], T0 + 1400 * MS, T0 + 2900 * MS)[0] == "cpu_bound"
    # busy around a short sleep: samples outside the interval are not mixed in
    cpu = table("cpu", _cpu_rows(7, [1.0] * 4 + [0.0] * 2 + [1.0] * 4))
    assert cpu_bound(cpu, [7], T0 + 2000 * MS, T0 + 3000 * MS) is None
    assert cpu_bound(cpu, [7], T0 + 1900 * MS, T0 + 3100 * MS) is None


def test_sampler_reads_a_busy_child_and_finds_it_from_its_parent():
    """Real /proc: a GPU process (asleep) whose worker spins; the worker is found through the
    kernel's children lists, and its CPU time grows by about the wall time, the parent's not."""
    code = ("import os,sys,time\n"
            "pid=os.fork()\n"
            "if pid==0:\n"
            "    t=time.time()\n"
            "    while time.time()-t<3: pass\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "time.sleep(4)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        s = CpuSampler(children_s=0)
        first = s.poll([parent.pid])["cpu"]
        time.sleep(0.6)
        second = s.poll([parent.pid])["cpu"]
    finally:
        parent.kill()
        parent.wait()
    a = dict(zip(first["pid"].tolist(), first["cpu_ns"].tolist()))
    b = dict(zip(second["pid"].tolist(), second["cpu_ns"].tolist()))
    assert set(a) == set(b) == {parent.pid, child}, (a, b)
    assert all(c.startswith("python") for c in second["comm"].tolist()), second["comm"]     # their names
    assert b[child] - a[child] >= 250 * MS, (a, b)       # ~600 ms of spinning (less under load)
    assert b[parent.pid] - a[parent.pid] <= 50 * MS, (a, b)
    assert np.all(second["ts_ns"] > first["ts_ns"][0])
    assert read_cpu_ns(2 ** 22 + 1) is None             # no such process


def test_sampler_without_children_lists_takes_the_owner_set(tmp_path):
    """A kernel without CONFIG_PROC_CHILDREN: the sched family's owners stand in for the
    descendants. A fake /proc: process 100 (a GPU's) and 101 (its worker)."""
    for pid, ticks in ((100, (30, 12)), (101, (250, 50))):
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (py thon) S 1 {pid} {pid} 0 -1 4194304 10 0 0 0 {ticks[0]} {ticks[1]} 0 0 20 0 1 0 5 0 0\n")
    s = CpuSampler(proc=str(tmp_path))
    got = s.poll([100], all_owners=lambda: {100, 101, 999})["cpu"]
    assert s.have_children is False
    tick = read_cpu_ns(100, str(tmp_path)) // 42
    assert dict(zip(got["pid"].tolist(), got["cpu_ns"].tolist())) == {100: 42 * tick, 101: 300 * tick}
    assert s.poll([100])["cpu"]["pid"].tolist() == [100]         # no owner set: the roots only
