"""`stallscope trace`: the tracer on this node, printing, recording or streaming."""

from __future__ import annotations

import sys

import click

from stallscope.agentrun import run_agent
from stallscope.options import TraceOptions, security_options, trace_options
from stallscope.printers import EventPrinter
from stallscope.tracer import probes
from stallscope.tracer.families import ALL_FAMILIES
from stallscope.wire.auth import SecurityError
from stallscope.wire.sink import is_loss_counter

TRACE_EPILOG = """\b
Examples:
  stallscope trace                          # IO/net stalls >= 10 ms, live table
  stallscope trace --min-latency-ms 1 --pid 4242
  stallscope trace --json --duration 30 > stalls.jsonl
  stallscope trace --output node7.ssrec     # record for `stallscope report`
  stallscope trace --collector tcp://rack3-collector:5557 --keys-dir /etc/stallscope/keys
  stallscope trace --collector tcp://127.0.0.1:5557    # plaintext: loopback only unless --insecure
  stallscope trace --collector tcp://rack3:5557 --spool-dir /data/ss-spool --spool-max-mb 4096
  stallscope trace --families vfs,tcp --attach tracepoint
  stallscope trace --dump-bpf vfs           # the BPF program this kernel would load, with its cflags
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
@click.option("--collector", default=None, help="Stream batches to a collector (e.g. tcp://host:5557), "
              "acknowledged; unacknowledged batches wait in the spool, across restarts.")
@click.option("--spool-dir", default=None, type=click.Path(file_okay=False),
              help="Where batches wait for the collector's acknowledgement [default: "
              "/var/lib/stallscope/spool as root, else $XDG_STATE_HOME/stallscope/spool].")
@click.option("--spool-max-mb", type=click.FloatRange(min=0, min_open=True), default=1024, show_default=True,
              help="Spool bound; past it new batches are dropped and counted until the collector catches up.")
@click.option("--quiet", "-q", is_flag=True, help="No live output (useful with --output/--collector).")
@click.option("--dump-bpf", type=click.Choice(ALL_FAMILIES), default=None,
              help="Print the program one family would load here (method, headers, cflags, source) and exit; loads nothing.")
@security_options("client")
def trace(topts: TraceOptions, as_json, duration, output, collector, spool_dir, spool_max_mb, quiet, dump_bpf,
          sopts):
    """Trace IO, NFS, block, RDMA and TCP-retransmit stalls on this node (root).

    Each stall is printed as it completes: time, process, op, latency, bytes and
    the file (or the flow). Stalls below --min-latency-ms are counted in
    in-kernel histograms that travel with a batch every 2 s.
    """
    cfg = topts.agent_config()
    if dump_bpf:
        click.echo(probes.dump(cfg.probe, dump_bpf))
        return
    from stallscope.wire.recording import RecordingWriter
    from stallscope.wire.spool import default_spool_dir
    from stallscope.wire.transport import StreamSink
    sinks = []
    stream = sec = None
    if not quiet:
        sinks.append(EventPrinter(as_json=as_json, pid_filter=cfg.probe.pid))
    try:
        if output:
            sinks.append(RecordingWriter(output))
        if collector:
            sec = sopts.security(log=lambda m: click.echo(f"stallscope: {m}", err=True))
            try:
                secure = sec.for_connect(collector)
            except SecurityError as e:
                sec.close()
                raise click.ClickException(str(e)) from None
            stream = StreamSink(collector, spool_dir or default_spool_dir(), int(spool_max_mb * 2**20),
                                secure=secure, log=lambda m: click.echo(f"stallscope: {m}", err=True))
            sinks.append(stream)
    except click.ClickException:
        raise
    except OSError as e:
        raise click.ClickException(f"cannot open {output}: {e.strerror}") from None
    except Exception as e:
        raise click.ClickException(str(e)) from None
    try:
        agent = run_agent(cfg, sinks, duration, quiet=quiet)
    finally:
        if sec is not None:
            sec.close()
    counters = agent.last_counters
    lost = sum(v for k, v in counters.items() if is_loss_counter(k) and ".lost" in k)
    dropped = sum(v for k, v in counters.items() if is_loss_counter(k) and ".lost" not in k)
    if not quiet or lost or dropped:
        click.echo(f"stallscope: {agent.events_out} stalls reported, {lost} lost in the kernel, "
                   + (f"{dropped} dropped by sinks, " if dropped else "")
                   + f"{agent.tick_errors} tick errors", err=True)
    if stream is not None:
        click.echo(f"stallscope: {stream.summary()}", err=True)
    sys.stdout.flush()
