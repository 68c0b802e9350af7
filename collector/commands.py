"""`stallscope collect` and `stallscope report`."""

from __future__ import annotations

import json
import signal
import sys

import click

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
def collect(bind, store, upstream, duration):
    """Receive batches from tracers, store them, optionally forward them upstream."""
    from .server import Collector
    try:
        col = Collector(bind, store, upstream)
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
        click.echo(f"stallscope collect: {col.accepted} batches ({col.events} events) accepted, "
                   f"{col.rejected} rejected", err=True)
        col.close()


@click.command("report")
@click.argument("source", required=False)
@click.option("--store", default=None, help="Store file or recording (same as SOURCE).")
@click.option("--json", "as_json", is_flag=True, help="One JSON verdict per line.")
def report(source, store, as_json):
    """Verdicts per GPU idle interval from a store or a recording."""
    src = source or store or DEFAULT_STORE
    try:
        batches = load_batches(src)
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


COMMANDS = [collect, report]
