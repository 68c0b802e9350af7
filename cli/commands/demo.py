"""`stallscope demo`: the tracer, an embedded collector and a starving workload.

On a node with an NVIDIA GPU this is `stallscope watch`. Without one, it stands
up the NVML simulator (sim/nvmlsim), mounts a FUSE filesystem whose reads
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

import click

from stallscope.agentrun import run_agent
from stallscope.analysis import analyze
from stallscope.analysis.text import format_text
from stallscope.collector.embedded import EmbeddedCollector
from stallscope.collector.store import load_batches
from stallscope.commands.watch import watch_sinks
from stallscope.options import DEFAULT_STORE, TraceOptions
from stallscope.printers import LiveExports, LiveVerdicts, VerdictPrinter, export_options
from stallscope.sim import Unavailable
from stallscope.tracer import kernel
from stallscope.tracer.agent import Agent


def run_demo(cfg, printer, store_path, steps=12, delay_ms=800, log=print, observers=()) -> int:
    from stallscope.sim import nvmlsim
    from stallscope.sim.slowfs import SlowFS
    from stallscope.sim.trainer import make_shards

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
        sink = EmbeddedCollector(store_path, LiveVerdicts(printer, observers=observers))
        agent = Agent(cfg, [sink], log=lambda m: log(f"stallscope: {m}"))
        try:
            agent.start()
        except Exception:
            sink.close()
            raise
        trainer = subprocess.Popen(
            [sys.executable, "-m", "stallscope.sim.trainer", "--state", state, "--gpu", "0",
             "--data", fs.mountpoint, "--steps", str(steps), "--slow-every", "4",
             "--ckpt", os.path.join(fs.mountpoint, "slow-ckpt.pt"), "--ckpt-every", "6",
             "--log", gt_log])
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


DEMO_EPILOG = """\b
Examples:
  sudo stallscope demo                   # ~30 s: live verdicts, then the report table
  sudo stallscope demo --json            # verdicts as JSON lines
  sudo stallscope demo --steps 24 --delay-ms 1500
  sudo stallscope demo --metrics-port 9478   # scrape http://localhost:9478/metrics meanwhile
"""


@click.command("demo", epilog=DEMO_EPILOG)
@click.option("--store", default=None, help="Store file [default: a new temp file].")
@click.option("--json", "as_json", is_flag=True, help="Verdicts as JSON lines.")
@click.option("--steps", type=click.IntRange(min=4), default=12, show_default=True)
@click.option("--delay-ms", type=click.IntRange(min=100), default=800, show_default=True,
              help="How long the demo's slow files stall.")
@export_options
def demo(store, as_json, steps, delay_ms, metrics_port, metrics_addr, otlp_endpoint):
    """Run the tracer with an embedded collector; without a GPU, run a starving
    training-like workload on a simulated GPU and print the verdicts it earns.

    Needs root (BPF, FUSE). On a node whose NVML works this is `stallscope watch`.
    """
    from stallscope.tracer.nvml import GpuSampler, NvmlUnavailable
    try:
        GpuSampler.open().close()
        real_gpu = True
    except NvmlUnavailable as e:
        real_gpu = False
        click.echo(f"stallscope demo: {e}; running the simulated-GPU demo", err=True)
    if real_gpu:
        click.echo("stallscope demo: NVML works here: running `stallscope watch` (Ctrl-C to end)", err=True)
        exports = LiveExports(metrics_port, metrics_addr, otlp_endpoint)
        try:
            sinks, printer = watch_sinks(as_json, False, store or DEFAULT_STORE, exports.observers)
            run_agent(TraceOptions().agent_config(), sinks, None)
        finally:
            exports.close()
        return
    store = store or os.path.join(tempfile.mkdtemp(prefix="stallscope-demo-"), "store.db")
    printer = VerdictPrinter(as_json=as_json)
    cfg = TraceOptions(min_latency_ms=50.0, families="vfs,tcp,block,sched").agent_config()
    exports = LiveExports(metrics_port, metrics_addr, otlp_endpoint)
    try:
        rc = run_demo(cfg, printer, store, steps=steps, delay_ms=delay_ms,
                      log=lambda m: click.echo(m, err=True), observers=exports.observers)
    except (kernel.Unavailable, Unavailable) as e:
        raise click.ClickException(str(e)) from None
    finally:
        exports.close()
    if not as_json:
        click.echo("")
        click.echo(format_text(analyze.analyze(load_batches(store))))
    if rc:
        raise click.ClickException(f"demo workload failed (exit {rc})")
