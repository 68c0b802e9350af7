"""A real PyTorch DataLoader (workers re-forked every epoch, prefetching) over shards of
which some stall: every wait of the training loop for a stalled shard must be blamed on the
short-lived worker's read of that shard."""

import json
import os
import subprocess
import sys

import pytest

from stallscope.sim import nvmlsim
from stallscope.sim.slowfs import SlowFS
from stallscope.tracer.families import DEFAULT_FAMILIES
from tests.bpf.tracerun import ROOT, Trace, run_cli

pytestmark = pytest.mark.bpf
SLOW = (3, 7)
DELAY_MS = 1000


def _torch_or_fail():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        if os.environ.get("STALLSCOPE_REQUIRE_BPF") == "1":
            pytest.fail(f"torch is needed for the DataLoader scenario (.ci/setup.sh installs it): {e}")
        pytest.skip(f"torch not installed: {e}")


def _run(tmp_path, n_files, slow, families, *train_args):
    """torch_train over ``n_files`` shards (those in ``slow`` stall DELAY_MS), traced with
    ``families`` on a simulated GPU; returns (ground truth, verdicts)."""
    _torch_or_fail()
    lib = nvmlsim.build()
    state = nvmlsim.create_state(str(tmp_path / "sim.state"), n_gpus=1, period_ms=100)
    env = {"STALLSCOPE_NVMLSIM_STATE": state}
    rec = str(tmp_path / "rec.ssrec")
    log = tmp_path / "gt.jsonl"
    with SlowFS(delay_ms=0, slow_prefix="\0none", ops=("read",)) as fs:
        for i in range(n_files):
            name = f"shard-{i:02d}.bin"
            fs.make_file(name, 64 << 10)
            if i in slow:
                fs.set_delay(DELAY_MS, path=name)
        with Trace("--quiet", "--output", rec, "--nvml-lib", lib, families=families, gpu=True, env=env) as t:
            p = subprocess.run([sys.executable, "-m", "tests.fixtures.torch_train", "--state", state,
                                "--data", fs.mountpoint, "--log", str(log), "--compute-ms", "150",
                                "--n", str(n_files), *train_args], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT, **env}, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, p.stderr[-3000:]
    assert t.rc == 0, t.stderr[-3000:]
    r = run_cli("report", "--json", rec)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in open(log)], [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def _verdict_of(wait, vs):
    """The verdict overlapping a wait of the loop most."""
    over = [v for v in vs if v["idle_start_ns"] < wait["end_ns"] and v["idle_end_ns"] > wait["start_ns"]]
    assert over, (wait, vs)
    return max(over, key=lambda v: min(v["idle_end_ns"], wait["end_ns"]) - max(v["idle_start_ns"], wait["start_ns"]))


def test_real_dataloader_waits_are_blamed_on_the_workers_reads(tmp_path):
    gt, vs = _run(tmp_path, 10, SLOW, "vfs")
    trainer = next(e["pid"] for e in gt if e["kind"] == "start")
    reads = {(e["idx"], e["pid"]): e for e in gt if e["kind"] == "read"}
    worker_pids = {e["pid"] for e in gt if e["kind"] == "read"}
    assert trainer not in worker_pids and len(worker_pids) >= 4       # re-forked each epoch
    waits = [e for e in gt if e["kind"] == "wait" and e["end_ns"] - e["start_ns"] >= 300_000_000]
    assert len(waits) >= 2, [e for e in gt if e["kind"] == "wait"]
    for w in waits:
        v = _verdict_of(w, vs)
        c = v["culprit"]
        assert c is not None, (w, v)
        assert c["pid"] in worker_pids, (w, v)                   # a worker, not the trainer
        assert os.path.basename(c["path"]) in {f"shard-{i:02d}.bin" for i in SLOW}, (w, v)
        read = next(e for (i, pid), e in reads.items() if pid == c["pid"] and e["path"].endswith(
            os.path.basename(c["path"])))
        assert read["end_ns"] - read["start_ns"] >= DELAY_MS * 1e6 * 0.9


def test_real_dataloader_starved_by_its_cpu_bound_worker_is_classed_cpu_bound(tmp_path):
    """Nothing stalls: one persistent worker spends 1.5 s of CPU decoding each item while the
    loop computes 150 ms, so the GPU waits about 1.35 s per batch with the trainer asleep on
    the worker's queue. Default families: each wait is "unexplained", classed cpu_bound,
    naming the worker (the process that computed), never the trainer."""
    gt, vs = _run(tmp_path, 6, (), ",".join(DEFAULT_FAMILIES), "--epochs", "1", "--workers", "1", "--persistent",
                  "--decode-ms", "1500")
    trainer = next(e["pid"] for e in gt if e["kind"] == "start")
    worker = {e["pid"] for e in gt if e["kind"] == "read"}
    assert len(worker) == 1 and trainer not in worker, worker     # one persistent worker
    waits = [e for e in gt if e["kind"] == "wait"][1:]               # the first includes its start-up
    assert len(waits) == 5 and all(w["end_ns"] - w["start_ns"] >= 1e9 for w in waits), waits
    got = []
    for w in waits:
        v = _verdict_of(w, vs)
        got.append((v["verdict"], v.get("class"), (v.get("process") or {}).get("pid"), (v.get("process") or {}).get("share")))
    print(got)
    assert all(g[:3] == ("unexplained", "cpu_bound", next(iter(worker))) for g in got), got


def test_real_dataloader_streaming_from_a_slow_server_is_classed_net_wait(tmp_path):
    """Nothing stalls in a probe's sense: one persistent worker fetches each item over HTTP
    from a dataset server (another process, on loopback) that answers after 1.5 s, as a
    streaming dataset reads an object store. Default families: each wait of the loop is
    "unexplained", classed net_wait, naming the worker and the server's address."""
    from stallscope.sim.scenarios import DatasetServer

    server = DatasetServer()
    try:
        url = f"http://127.0.0.1:{server.port}/sample?ms=1500"
        gt, vs = _run(tmp_path, 6, (), ",".join(DEFAULT_FAMILIES), "--epochs", "1", "--workers", "1",
                      "--persistent", "--url", url)
    finally:
        server.close()
    worker = {e["pid"] for e in gt if e["kind"] == "read"}
    assert len(worker) == 1, worker
    waits = [e for e in gt if e["kind"] == "wait"][1:]               # the first includes its start-up
    assert len(waits) == 5 and all(w["end_ns"] - w["start_ns"] >= 1e9 for w in waits), waits
    got = []
    for w in waits:
        v = _verdict_of(w, vs)
        p = v.get("process") or {}
        got.append((v["verdict"], v.get("class"), p.get("pid"), p.get("peer"), p.get("share")))
    print(got)
    assert all(g[:4] == ("unexplained", "net_wait", next(iter(worker)), f"127.0.0.1:{server.port}")
               for g in got), got
