"""`stallscope collect`: receive, store, forward, and print live verdicts."""

from __future__ import annotations

import signal

import click

from stallscope.collector.store import StoreError
from stallscope.options import DEFAULT_BIND, DEFAULT_STORE
from stallscope.printers import LiveVerdicts, VerdictPrinter
from stallscope.wire.transport import TransportError

COLLECT_EPILOG = """\b
Examples:
  stallscope collect                                   # tcp://0.0.0.0:5557 -> /var/lib/stallscope/store.db
  stallscope collect --bind tcp://0.0.0.0:5557 --store rack3.db --upstream tcp://root:5557
  stallscope collect --json --store rack3.db | jq 'select(.verdict == "culprit")'
"""


@click.command("collect", epilog=COLLECT_EPILOG)
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="ZeroMQ endpoint to receive on.")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="SQLite store file.")
@click.option("--upstream", default=None, help="Forward every accepted batch to a root collector.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Live verdicts as JSON lines.")
@click.option("--no-verdicts", is_flag=True, help="Only store (and forward); no live analysis.")
def collect(bind, store, upstream, duration, as_json, no_verdicts):
    """Receive batches from tracers, store them, optionally forward them upstream,
    and print a verdict for every GPU idle interval within seconds of its end."""
    from stallscope.collector.server import Collector
    live = None if no_verdicts else LiveVerdicts(VerdictPrinter(as_json=as_json))
    try:
        col = Collector(bind, store, upstream, on_batches=live)
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
        if live is not None:
            live.flush()
        click.echo(f"stallscope collect: {col.accepted} batches ({col.events} events) accepted, "
                   f"{col.rejected} rejected", err=True)
        col.close()
