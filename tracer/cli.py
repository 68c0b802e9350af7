"""`stallscope trace`: parse options into a config, run the agent, map errors to exit codes."""

from __future__ import annotations

import os
import signal
import sys

import click

from . import kernel, probes
from .agent import Agent, AgentConfig

TRACE_EPILOG = """\b
Examples:
  stallscope trace                          # IO/net stalls >= 10 ms, live table
  stallscope trace --min-latency-ms 1 --pid 4242
  stallscope trace --json --duration 30 > stalls.jsonl
  stallscope trace --output node7.ssrec     # record for `stallscope report`
  stallscope trace --collector tcp://rack3-collector:5557
  stallscope trace --families vfs,tcp --attach tracepoint
  stallscope trace --dump-bpf vfs           # print the final BPF program
\b
Exit codes: 0 ok, 1 runtime failure (one line on stderr), 2 usage error.
"""


def _cgroup_id(path: str) -> int:
    """cgroup v2 id (the directory's inode number) of a path, absolute or under /sys/fs/cgroup."""
    p = path if os.path.isdir(path) else os.path.join("/sys/fs/cgroup", path.lstrip("/"))
    try:
        return os.stat(p).st_ino
    except OSError as e:
        raise click.BadParameter(f"cgroup {p}: {e.strerror}", param_hint="--cgroup")


def _families(value: str) -> tuple:
    fams = tuple(f.strip() for f in value.split(",") if f.strip())
    bad = [f for f in fams if f not in probes.ALL_FAMILIES]
    if bad:
        raise click.BadParameter(f"unknown probe family {bad[0]!r} (choose from "
                                 f"{', '.join(probes.ALL_FAMILIES)})", param_hint="--families")
    return fams


def trace_options(f):
    opts = [
        click.option("--min-latency-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
                     help="Report ops at least this slow; faster ones only feed histograms."),
        click.option("--pid", type=click.IntRange(min=1), default=None, help="Trace only this process (tgid)."),
        click.option("--cgroup", default=None, help="Trace only this cgroup v2 (a path, or relative to /sys/fs/cgroup)."),
        click.option("--families", default=",".join(probes.ALL_FAMILIES), show_default=True,
                     help="Probe families to load."),
        click.option("--attach", type=click.Choice(probes.ATTACH_CHOICES), default="auto", show_default=True,
                     help="Force an attach method (auto picks the best the kernel offers)."),
        click.option("--node", default=None, help="Node name in events [default: hostname]."),
        click.option("--gpu/--no-gpu", "gpu", default=None, help="Require / skip NVML sampling [default: if present]."),
        click.option("--nvml-lib", default=None, type=click.Path(dir_okay=False),
                     help="libnvidia-ml.so.1 to load (e.g. the simulator) [env STALLSCOPE_NVML_LIB]."),
        click.option("--ringbuf-mb", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Ring buffer size per probe family (rounded to a power of 2)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_config(min_latency_ms, pid, cgroup, families, attach, node, gpu, nvml_lib, ringbuf_mb) -> AgentConfig:
    pages = 1
    while pages * 4096 < ringbuf_mb << 20:
        pages <<= 1
    pc = probes.ProbeConfig(min_latency_ns=int(min_latency_ms * 1e6), pid=pid or 0,
                            cgroup_id=_cgroup_id(cgroup) if cgroup else 0,
                            families=_families(families), attach=attach, ringbuf_pages=pages)
    cfg = AgentConfig(probe=pc, gpu={None: "auto", True: "on", False: "off"}[gpu], nvml_lib=nvml_lib)
    if node:
        cfg.node = node
    return cfg


def run_agent(cfg: AgentConfig, sinks: list, duration, quiet=False) -> Agent:
    """Start and run an agent; raises click.ClickException with one line on failure."""
    agent = Agent(cfg, sinks, log=(lambda m: None) if quiet else None)
    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True
    # Ctrl-C and SIGTERM only set a flag: the loop finishes its tick, drains the
    # rings and flushes a final batch, so nothing already captured is lost.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        agent.start()
    except (kernel.Unavailable, probes.ProbeError) as e:
        agent.close()
        raise click.ClickException(str(e)) from None
    if True:   # one status line even with --quiet: scripts wait for it
        click.echo(f"stallscope: tracing stalls >= {cfg.probe.min_latency_ns / 1e6:g} ms"
                   + (f" of pid {cfg.probe.pid}" if cfg.probe.pid else "")
                   + (f" for {duration:g} s" if duration else "; Ctrl-C to end"), err=True)
    try:
        agent.run(duration, stop=lambda: stop["flag"])
    finally:
        agent.close()
    return agent


@click.command("trace", epilog=TRACE_EPILOG)
@trace_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event per line.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also record batches to this file (read with `stallscope report`).")
@click.option("--collector", default=None, help="Stream batches to a collector (e.g. tcp://host:5557).")
@click.option("--quiet", "-q", is_flag=True, help="No live output (useful with --output/--collector).")
@click.option("--dump-bpf", type=click.Choice(probes.ALL_FAMILIES), default=None,
              help="Print the final BPF program of one family and exit.")
def trace(as_json, duration, output, collector, quiet, dump_bpf, **opts):
    """Trace IO, NFS, block, RDMA and TCP-retransmit stalls on this node (root).

    Each stall is printed as it completes: time, process, op, latency, bytes and
    the file (or the flow). Stalls below --min-latency-ms are counted in
    in-kernel histograms that travel with every batch.
    """
    cfg = build_config(**opts)
    if dump_bpf:
        click.echo(probes.dump(cfg.probe, dump_bpf))
        return
    from .sinks import FileSink, Printer, StreamSink
    sinks = []
    if not quiet:
        sinks.append(Printer(as_json=as_json, pid_filter=cfg.probe.pid))
    try:
        if output:
            sinks.append(FileSink(output))
        if collector:
            sinks.append(StreamSink(collector))
    except OSError as e:
        raise click.ClickException(f"cannot open {output}: {e.strerror}") from None
    except Exception as e:
        raise click.ClickException(str(e)) from None
    agent = run_agent(cfg, sinks, duration, quiet=quiet)
    lost = sum(v for k, v in agent.last_counters.items() if ".lost" in k or k.endswith("dropped_events"))
    if not quiet or lost:
        click.echo(f"stallscope: {agent.events_out} stalls reported, {lost} lost in the kernel, "
                   f"{agent.tick_errors} tick errors", err=True)
    sys.stdout.flush()
