"""`stallscope watch --metrics-port` end to end: real probes, the simulated GPU through real
NVML bindings, a trainer starved by FUSE-stalled shard reads; the scrape names the culprit
class with the GPU's dcgm-exporter labels and matches the verdicts watch printed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stallscope.sim import nvmlsim
from stallscope.sim.slowfs import SlowFS
from stallscope.sim.trainer import make_shards
from tests.bpf.tracerun import ROOT, stallscope_argv
from tests.netutil import free_port
from tests.unit.test_metrics import _wait_for_line, scrape

pytestmark = pytest.mark.bpf
UUID = "GPU-5ca1ab1e-0000-4000-8000-00000000e2e0"


def test_watch_metrics_name_the_slow_reads(tmp_path):
    lib = nvmlsim.build()
    state = nvmlsim.create_state(str(tmp_path / "sim.state"), n_gpus=1, period_ms=100, uuids=[UUID])
    env = {**os.environ, "PYTHONPATH": ROOT, "STALLSCOPE_NVMLSIM_STATE": state}
    port = free_port()
    with SlowFS(delay_ms=800, ops=("read",)) as fs:
        make_shards(fs.backing, 6, slow_every=3)
        watch = subprocess.Popen(
            stallscope_argv("watch", "--json", "--node", "e2e-node", "--families", "vfs", "--gpu",
                            "--nvml-lib", lib, "--min-latency-ms", "50", "--store", str(tmp_path / "s.db"),
                            "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            head = _wait_for_line(watch, b"stallscope: tracing", 60)
            assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics".encode() in head
            trainer = subprocess.Popen(
                [sys.executable, "-m", "stallscope.sim.trainer", "--state", state, "--gpu", "0",
                 "--data", fs.mountpoint, "--log", str(tmp_path / "gt.jsonl"), "--steps", "6",
                 "--slow-every", "3"], cwd=ROOT, env=env)
            assert trainer.wait(120) == 0
            deadline = time.monotonic() + 15
            while True:
                fams = scrape(port)
                reads = [(lab, v) for _n, lab, v in fams["stallscope_gpu_idle_intervals"]
                         if lab["class"] == "dataset_read"]
                if sum(v for _l, v in reads) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        finally:
            watch.send_signal(signal.SIGINT)
            out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err.decode()[-2000:]
    assert [lab for lab, _v in reads] == [{
        "Hostname": "e2e-node", "gpu": "0", "UUID": UUID, "hpc_job": "", "pod": "", "namespace": "",
        "container": "", "verdict": "culprit", "class": "dataset_read", "fs": "fuse", "op": "read"}], reads
    assert reads[0][1] == 2
    printed = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    slow = [v for v in printed if v["class"] == "dataset_read"]
    assert len(slow) == 2 and all("slow-" in v["culprit"]["path"] for v in slow), printed
    idle = next(v for _n, lab, v in fams["stallscope_gpu_idle_seconds"] if lab["class"] == "dataset_read")
    assert idle == pytest.approx(sum(v["duration_ns"] for v in slow) / 1e9, abs=1e-9)
    hist = [(lab, v) for n, lab, v in fams["stallscope_op_latency_seconds"]
            if n.endswith("_count") and lab["family"] == "vfs"]
    assert hist and all(lab["Hostname"] == "e2e-node" for lab, _v in hist)
    assert sum(v for _l, v in hist) > 0              # the fast shard reads, below 50 ms
    events = {lab["type"]: v for _n, lab, v in fams["stallscope_events_received"]}
    assert events.get("io", 0) >= 2
    assert sum(v for _n, _l, v in fams["stallscope_batches_received"]) >= 3   # GPU samples: one a second
