"""`stallscope watch`: the tracer with an embedded collector and live verdicts."""

from __future__ import annotations

import click

from stallscope.agentrun import run_agent
from stallscope.collector.embedded import EmbeddedCollector
from stallscope.collector.store import StoreError
from stallscope.options import DEFAULT_STORE, TraceOptions, trace_options
from stallscope.printers import EventPrinter, LiveExports, LiveVerdicts, VerdictPrinter, export_options

WATCH_EPILOG = """\b
Examples:
  sudo stallscope watch                          # live verdicts for this node's GPUs
  sudo stallscope watch --json --duration 600 > verdicts.jsonl
  sudo stallscope watch --store /var/lib/stallscope/store.db --min-latency-ms 5
  sudo stallscope watch --metrics-port 9478      # + Prometheus metrics (deploy/grafana/stallscope.json)
"""


def watch_sinks(as_json: bool, events: bool, store: str | None, observers=()):
    """The sinks of `watch` (and the demo): optional event printer, embedded
    collector with live verdicts (and ``observers``: the live exports). Returns
    (sinks, verdict printer)."""
    printer = VerdictPrinter(as_json=as_json)
    sinks = []
    if events:
        sinks.append(EventPrinter(as_json=as_json))
    try:
        sinks.append(EmbeddedCollector(store, LiveVerdicts(printer, observers=observers)))
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
@export_options
def watch(topts: TraceOptions, store, as_json, events, duration, metrics_port, metrics_addr, otlp_endpoint):
    """Trace this node with an embedded collector and print a verdict for every GPU
    idle interval as it ends: which stall starved the GPU, or "unexplained"."""
    exports = LiveExports(metrics_port, metrics_addr, otlp_endpoint)
    try:
        sinks, printer = watch_sinks(as_json, events, store, exports.observers)
        run_agent(topts.agent_config(), sinks, duration)
    finally:
        exports.close()
    click.echo(f"stallscope watch: {printer.count} verdicts; store {store} "
               f"(stallscope report {store})", err=True)
