"""`stallscope collect` and `stallscope report`."""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from tracer.cli import trace_options
from tracer.probes import ALL_FAMILIES
from tracer.transport import TransportError

from .store import StoreError, load_batches

DEFAULT_STORE = "/var/lib/stallscope/store.db"

COLLECT_EPILOG = """\b
Examples:
  stallscope collect                                   # tcp://0.0.0.0:5557 -> /var/lib/stallscope/store.db
  stallscope collect --bind tcp://0.0.0.0:5557 --store rack3.db --upstream tcp://root:5557
"""


@click.command("collect", epilog=COLLECT_EPILOG)
@click.option("--bind", default="tcp://0.0.0.0:5557", show_default=True, help="ZeroMQ endpoint to receive on.")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="SQLite store file.")
@click.option("--upstream", default=None, help="Forward every accepted batch to a root collector.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Live verdicts as JSON lines.")
@click.option("--no-verdicts", is_flag=True, help="Only store (and forward); no live analysis.")
def collect(bind, store, upstream, duration, as_json, no_verdicts):
    """Receive batches from tracers, store them, optionally forward them upstream,
    and print a verdict for every GPU idle interval within seconds of its end."""
    from .server import Collector
    on_batches = None
    printer = None
    if not no_verdicts:
        from .analyze import LiveAnalyzer
        from .live import VerdictPrinter
        live = LiveAnalyzer()
        printer = VerdictPrinter(as_json=as_json)

        def on_batches(batches):
            printer(live.add(batches))
    try:
        col = Collector(bind, store, upstream, on_batches=on_batches)
    except (TransportError, StoreError) as e:
        raise click.ClickException(str(e)) from None
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    click.echo(f"stallscope collect: listening on {col.endpoint}, storing to {store}"
               + (f", forwarding to {upstream}" if upstream else ""), err=True)
    try:
        col.run(duration, stop=lambda: stop["flag"])
    except KeyboardInterrupt:
        pass
    finally:
        if printer is not None:
            printer(live.flush())
        click.echo(f"stallscope collect: {col.accepted} batches ({col.events} events) accepted, "
                   f"{col.rejected} rejected", err=True)
        col.close()


REPORT_EPILOG = """\b
Examples:
  stallscope report                                  # the default store, as a table
  stallscope report node7.ssrec                      # a recording from `trace --output`
  stallscope report --store rack3.db --json | jq 'select(.verdict != "culprit")'
"""


@click.command("report", epilog=REPORT_EPILOG)
@click.argument("source", required=False)
@click.option("--store", default=None, help="Store file or recording (same as SOURCE).")
@click.option("--json", "as_json", is_flag=True, help="One JSON verdict per line.")
def report(source, store, as_json):
    """Verdicts per GPU idle interval from a store or a recording."""
    src = source or store or DEFAULT_STORE
    try:
        batches = load_batches(src, warn=lambda m: click.echo(f"stallscope report: warning: {m}", err=True))
    except FileNotFoundError:
        raise click.ClickException(f"no such store or recording: {src}") from None
    except (StoreError, OSError) as e:
        raise click.ClickException(str(e)) from None
    from . import analyze
    res = analyze.analyze(batches)
    if as_json:
        for v in res.verdicts:
            sys.stdout.write(json.dumps(v, separators=(",", ":")) + "\n")
    else:
        click.echo(analyze.format_text(res))


WATCH_EPILOG = """\b
Examples:
  sudo stallscope watch                          # live verdicts for this node's GPUs
  sudo stallscope watch --json --duration 600 > verdicts.jsonl
  sudo stallscope watch --store /var/lib/stallscope/store.db --min-latency-ms 5
"""


def _watch_sinks(as_json, events, store):
    from tracer.sinks import Printer

    from .live import EmbeddedCollector, VerdictPrinter
    printer = VerdictPrinter(as_json=as_json)
    sinks = []
    if events:
        sinks.append(Printer(as_json=as_json))
    try:
        sinks.append(EmbeddedCollector(store, printer))
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    return sinks, printer


@click.command("watch", epilog=WATCH_EPILOG)
@trace_options
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Where the embedded collector keeps batches.")
@click.option("--json", "as_json", is_flag=True, help="Verdicts as JSON lines.")
@click.option("--events", is_flag=True, help="Also print every stall as it is traced.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
def watch(store, as_json, events, duration, **opts):
    """Trace this node with an embedded collector and print a verdict for every GPU
    idle interval as it ends: which stall starved the GPU, or "unexplained"."""
    from tracer.cli import build_config, run_agent
    cfg = build_config(**opts)
    sinks, printer = _watch_sinks(as_json, events, store)
    run_agent(cfg, sinks, duration)
    click.echo(f"stallscope watch: {printer.count} verdicts; store {store} "
               f"(stallscope report {store})", err=True)


DEMO_EPILOG = """\b
Examples:
  sudo stallscope demo                   # ~30 s: live verdicts, then the report table
  sudo stallscope demo --json            # verdicts as JSON lines
  sudo stallscope demo --steps 24 --delay-ms 1500
"""


@click.command("demo", epilog=DEMO_EPILOG)
@click.option("--store", default=None, help="Store file [default: a new temp file].")
@click.option("--json", "as_json", is_flag=True, help="Verdicts as JSON lines.")
@click.option("--steps", type=click.IntRange(min=4), default=12, show_default=True)
@click.option("--delay-ms", type=click.IntRange(min=100), default=800, show_default=True,
              help="How long the demo's slow files stall.")
def demo(store, as_json, steps, delay_ms):
    """Run the tracer with an embedded collector; without a GPU, run a starving
    training-like workload on a simulated GPU and print the verdicts it earns.

    Needs root (BPF, FUSE). On a node whose NVML works this is `stallscope watch`.
    """
    import tempfile

    from tracer import kernel
    from tracer.cli import build_config
    from tracer.nvml import GpuSampler, NvmlUnavailable

    from . import analyze
    from .demo import Unavailable
    try:
        GpuSampler.open().close()
        real_gpu = True
    except NvmlUnavailable as e:
        real_gpu = False
        click.echo(f"stallscope demo: {e}; running the simulated-GPU demo", err=True)
    if real_gpu:
        click.echo("stallscope demo: NVML works here: running `stallscope watch` (Ctrl-C to end)", err=True)
        from tracer.cli import run_agent
        store = store or DEFAULT_STORE
        sinks, printer = _watch_sinks(as_json, False, store)
        run_agent(build_config(**_default_trace_opts()), sinks, None)
        return
    store = store or os.path.join(tempfile.mkdtemp(prefix="stallscope-demo-"), "store.db")
    from .demo.run import run_demo
    from .live import VerdictPrinter
    printer = VerdictPrinter(as_json=as_json)
    opts = _default_trace_opts()
    opts.update(min_latency_ms=50.0, families="vfs,tcp,block")
    cfg = build_config(**opts)
    try:
        rc = run_demo(cfg, printer, store, steps=steps, delay_ms=delay_ms,
                      log=lambda m: click.echo(m, err=True))
    except (kernel.Unavailable, Unavailable) as e:
        raise click.ClickException(str(e)) from None
    if not as_json:
        click.echo("")
        click.echo(analyze.format_text(analyze.analyze(load_batches(store))))
    if rc:
        raise click.ClickException(f"demo workload failed (exit {rc})")


def _default_trace_opts():
    return dict(min_latency_ms=10.0, pid=None, cgroup=None, families=",".join(ALL_FAMILIES),
                attach="auto", node=None, gpu=None, nvml_lib=None, ringbuf_mb=16)


COMMANDS = [collect, report, watch, demo]
