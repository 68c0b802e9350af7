"""`stallscope demo`: the tracer, an embedded collector and a starving workload.

On a node with an NVIDIA GPU this is `stallscope watch`. Without one, it stands
up the NVML simulator (tracer/nvmlsim), mounts a FUSE filesystem whose reads
and fsyncs stall (slowfs), and runs a training-like loop on the simulated GPU:
a dataloader worker child reads shards (every 4th stalls), every 6th step
checkpoints with an fsync that stalls, and an unrelated "backup" process reads
a stalled file meanwhile. Real probes, real NVML bindings, real verdicts:
the worker's slow reads and the checkpoint fsync are blamed; the backup never.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

from collector.demo import REPO_ROOT, Unavailable


def run_demo(cfg, printer, store_path, steps=12, delay_ms=800, log=print) -> int:
    from tracer import nvmlsim
    from tracer.agent import Agent

    from collector.demo.slowfs import SlowFS
    from collector.demo.trainer import make_shards
    from collector.live import EmbeddedCollector

    lib = nvmlsim.build()
    work = tempfile.mkdtemp(prefix="stallscope-demo-")
    state = nvmlsim.create_state(os.path.join(work, "nvmlsim.state"), n_gpus=1, period_ms=100,
                                 names=["Simulated H100 (stallscope nvmlsim)"])
    os.environ["STALLSCOPE_NVMLSIM_STATE"] = state
    cfg.nvml_lib = lib
    cfg.gpu = "on"
    gt_log = os.path.join(work, "ground-truth.jsonl")
    log(f"demo: simulated GPU (NVML simulator {lib}), state {state}")
    with SlowFS(delay_ms=delay_ms, slow_prefix="slow", ops=("read", "fsync")) as fs:
        make_shards(fs.backing, steps, slow_every=4)
        fs.make_file("slow-backup.tar", 1 << 20)
        log(f"demo: dataset and checkpoints on {fs.mountpoint} (slow-* files stall {delay_ms} ms "
            f"on read and fsync; FUSE daemon pid {fs.daemon_pid})")
        sink = EmbeddedCollector(store_path, printer)
        agent = Agent(cfg, [sink], log=lambda m: log(f"stallscope: {m}"))
        try:
            agent.start()
        except Exception:
            sink.close()
            raise
        env = {**os.environ, "PYTHONPATH": REPO_ROOT}
        trainer = subprocess.Popen(
            [sys.executable, "-m", "collector.demo.trainer", "--state", state, "--gpu", "0",
             "--data", fs.mountpoint, "--steps", str(steps), "--slow-every", "4",
             "--ckpt", os.path.join(fs.mountpoint, "slow-ckpt.pt"), "--ckpt-every", "6",
             "--log", gt_log], cwd=REPO_ROOT, env=env)
        log(f"demo: trainer pid {trainer.pid} on GPU 0: {steps} steps of 300 ms compute; "
            "shards 3, 7, 11 and both checkpoints stall")

        def distractor():
            time.sleep(1.5)      # an unrelated process's slow IO while the GPU idles
            with open(os.path.join(fs.mountpoint, "slow-backup.tar"), "rb", buffering=0) as f:
                f.read(65536)
        d = threading.Thread(target=distractor, daemon=True)
        d.start()
        t_end = {"t": None}

        def stop():
            if trainer.poll() is not None and t_end["t"] is None:
                t_end["t"] = time.monotonic()
            return t_end["t"] is not None and time.monotonic() - t_end["t"] > 1.5
        try:
            agent.run(None, stop=stop)
        finally:
            agent.close()
            if trainer.poll() is None:
                trainer.kill()
    log(f"demo: trainer exited {trainer.returncode}; ground truth in {gt_log}; store {store_path}")
    return trainer.returncode or 0
