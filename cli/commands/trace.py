"""`stallscope trace`: the tracer on this node, printing, recording or streaming."""

from __future__ import annotations

import sys

import click

from stallscope.agentrun import run_agent
from stallscope.options import TraceOptions, trace_options
from stallscope.printers import EventPrinter
from stallscope.tracer import probes
from stallscope.tracer.families import ALL_FAMILIES
from stallscope.wire.sink import is_loss_counter

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


@click.command("trace", epilog=TRACE_EPILOG)
@trace_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event per line.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also record batches to this file (read with `stallscope report`).")
@click.option("--collector", default=None, help="Stream batches to a collector (e.g. tcp://host:5557).")
@click.option("--quiet", "-q", is_flag=True, help="No live output (useful with --output/--collector).")
@click.option("--dump-bpf", type=click.Choice(ALL_FAMILIES), default=None,
              help="Print the final BPF program of one family and exit.")
def trace(topts: TraceOptions, as_json, duration, output, collector, quiet, dump_bpf):
    """Trace IO, NFS, block, RDMA and TCP-retransmit stalls on this node (root).

    Each stall is printed as it completes: time, process, op, latency, bytes and
    the file (or the flow). Stalls below --min-latency-ms are counted in
    in-kernel histograms that travel with every batch.
    """
    cfg = topts.agent_config()
    if dump_bpf:
        click.echo(probes.dump(cfg.probe, dump_bpf))
        return
    from stallscope.wire.recording import RecordingWriter
    from stallscope.wire.transport import StreamSink
    sinks = []
    if not quiet:
        sinks.append(EventPrinter(as_json=as_json, pid_filter=cfg.probe.pid))
    try:
        if output:
            sinks.append(RecordingWriter(output))
        if collector:
            sinks.append(StreamSink(collector))
    except OSError as e:
        raise click.ClickException(f"cannot open {output}: {e.strerror}") from None
    except Exception as e:
        raise click.ClickException(str(e)) from None
    agent = run_agent(cfg, sinks, duration, quiet=quiet)
    lost = sum(v for k, v in agent.last_counters.items() if is_loss_counter(k))
    if not quiet or lost:
        click.echo(f"stallscope: {agent.events_out} stalls reported, {lost} lost in the kernel, "
                   f"{agent.tick_errors} tick errors", err=True)
    sys.stdout.flush()
