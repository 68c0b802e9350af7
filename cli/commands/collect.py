"""`stallscope collect`: receive, store, forward, and print live verdicts."""

from __future__ import annotations

import signal

import click

from stallscope.collector.store import StoreError
from stallscope.options import DEFAULT_BIND, DEFAULT_STORE, security_options
from stallscope.printers import LiveExports, LiveVerdicts, VerdictPrinter, export_options
from stallscope.wire.auth import SecurityError
from stallscope.wire.transport import TransportError

COLLECT_EPILOG = """\b
Examples:
  stallscope collect --keys-dir /etc/stallscope/keys  # tcp://0.0.0.0:5557 -> /var/lib/stallscope/store.db, CURVE
  stallscope collect --bind tcp://127.0.0.1:5557      # plaintext: loopback only unless --insecure
  stallscope collect --keys-dir /etc/stallscope/keys --store rack3.db \\
      --upstream tcp://root:5557 --upstream-key root.key
  stallscope collect --json --store rack3.db | jq 'select(.verdict == "culprit")'
  stallscope collect --metrics-port 9478 --otlp-endpoint http://otel-collector:4318
"""


@click.command("collect", epilog=COLLECT_EPILOG)
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="ZeroMQ endpoint to receive on.")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="SQLite store file.")
@click.option("--upstream", default=None, help="Forward every stored batch to a root collector, acknowledged "
              "(resumes where the root last acknowledged after a restart).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Live verdicts as JSON lines.")
@click.option("--no-verdicts", is_flag=True, help="Only store (and forward); no live analysis.")
@export_options
@security_options("server")
def collect(bind, store, upstream, duration, as_json, no_verdicts, metrics_port, metrics_addr, otlp_endpoint,
            sopts):
    """Receive batches from tracers, store them (acknowledging each once it is committed),
    optionally forward them upstream, and print a verdict for every GPU idle interval
    within seconds of its end.

    With --keys-dir the stream is encrypted and only tracers whose public keys are in the
    allow-list get in (see `stallscope keys --help`); without keys, plaintext is accepted
    on loopback only, unless --insecure."""
    from stallscope.collector.server import Collector
    sec = sopts.security(log=lambda m: click.echo(f"stallscope collect: {m}", err=True))
    try:
        bind_secure = sec.for_bind(bind)
        up_secure = sec.for_connect(upstream, hint="--upstream-key") if upstream else None
    except SecurityError as e:
        sec.close()
        raise click.ClickException(str(e)) from None
    exports = LiveExports(metrics_port, metrics_addr, otlp_endpoint)
    live = None if no_verdicts else LiveVerdicts(VerdictPrinter(as_json=as_json), observers=exports.observers)
    try:
        col = Collector(bind, store, upstream, on_batches=live or (exports.observe_batches if exports.observers else None),
                        secure=bind_secure, upstream_secure=up_secure)
    except (TransportError, StoreError) as e:
        exports.close()
        sec.close()
        raise click.ClickException(str(e)) from None
    signal.signal(signal.SIGHUP, lambda *_: sec.reload())
    if exports.metrics is not None:
        exports.metrics.rejected = lambda: col.rejected
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    click.echo(f"stallscope collect: listening on {col.endpoint}"
               + (" (CURVE, allow-list)" if bind_secure else " (plaintext)")
               + f", storing to {store}" + (f", forwarding to {upstream}" if upstream else ""), err=True)
    try:
        col.run(duration, stop=lambda: stop["flag"])
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.flush()
        auth = sec.counters()
        click.echo(f"stallscope collect: {col.summary()}"
                   + (f"; {auth['auth.rejected_peers']} peers refused ({auth['auth.rejected_handshakes']} handshakes)"
                      if bind_secure else ""), err=True)
        col.close()
        sec.close()
        exports.close()
