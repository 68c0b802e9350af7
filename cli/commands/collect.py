"""`stallscope collect`: receive, store, forward, and print live verdicts."""

from __future__ import annotations

import json
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
  stallscope collect --keys-dir /etc/stallscope/keys --lake /shared/stallscope-lake   # + a Parquet lake
  stallscope collect --keys-dir /etc/stallscope/keys --lake s3://fleet/lake --lake-flush-s 300 \\
      --lake-option endpoint_url=http://minio:9000 --lake-option anon=false   # needs: pip install s3fs
"""


def parse_lake_options(values) -> dict:
    """``KEY=VALUE`` pairs -> fsspec storage options: a dotted key nests
    (``client_kwargs.region_name=eu-west-1``); true, false, null and numbers are JSON, the
    rest text."""
    out: dict = {}
    for item in values or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--lake-option")
        try:
            value = json.loads(raw)
            if isinstance(value, (dict, list)):
                value = raw
        except ValueError:
            value = raw
        *parents, last = key.strip().split(".")
        d = out
        for k in parents:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise click.BadParameter(f"{key!r} nests under a plain value", param_hint="--lake-option")
        d[last] = value
    return out


@click.command("collect", epilog=COLLECT_EPILOG)
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="ZeroMQ endpoint to receive on.")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="SQLite store file.")
@click.option("--upstream", default=None, help="Forward every stored batch to a root collector, acknowledged "
              "(resumes where the root last acknowledged after a restart).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Live verdicts as JSON lines.")
@click.option("--no-verdicts", is_flag=True, help="Only store (and forward); no live analysis.")
@click.option("--lake", metavar="URL", default=None,
              help="Also write what is stored, and the live verdicts, to a Parquet lake partitioned by "
                   "date and node: a path, file://, s3://, gs://, az://... (any fsspec URL; object stores "
                   "need their fsspec package, e.g. s3fs). Needs stallscope[fleet]. The store is the "
                   "spool: a lake that fails is retried and loses nothing the store kept.")
@click.option("--lake-flush-s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Write a segment per node at least this often (sooner when a node has 32 MiB pending). "
                   "Longer: fewer, larger files.")
@click.option("--lake-option", "lake_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for --lake (repeatable; dotted keys nest), e.g. "
                   "endpoint_url=http://minio:9000, anon=true.")
@export_options
@security_options("server")
def collect(bind, store, upstream, duration, as_json, no_verdicts, lake, lake_flush_s, lake_options,
            metrics_port, metrics_addr, otlp_endpoint, sopts):
    """Receive batches from tracers, store them (acknowledging each once it is committed),
    optionally forward them upstream, and print a verdict for every GPU idle interval
    within seconds of its end.

    With --keys-dir the stream is encrypted and only tracers whose public keys are in the
    allow-list get in (see `stallscope keys --help`); without keys, plaintext is accepted
    on loopback only, unless --insecure.

    With --lake, everything stored (and every live verdict) is also written as Parquet to
    URL/<dataset>/date=YYYY-MM-DD/node=NODE/*.parquet, which `stallscope report --lake`,
    DuckDB, Spark or ClickHouse read as they are."""
    from stallscope.collector.server import Collector
    storage_options = parse_lake_options(lake_options)
    if lake_options and not lake:
        raise click.UsageError("--lake-option needs --lake")
    if lake:
        _check_lake(lake, storage_options)
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
    writer = None
    if lake:
        try:
            writer = _open_lake(col, lake, lake_flush_s, storage_options)
        except click.ClickException:
            col.close()
            exports.close()
            sec.close()
            raise
        if live is not None:
            live.observers.append(writer)
    signal.signal(signal.SIGHUP, lambda *_: sec.reload())
    if exports.metrics is not None:
        exports.metrics.rejected = lambda: col.rejected
        if writer is not None:
            exports.metrics.lake = writer.counters
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    click.echo(f"stallscope collect: listening on {col.endpoint}"
               + (" (CURVE, allow-list)" if bind_secure else " (plaintext)")
               + f", storing to {store}" + (f", forwarding to {upstream}" if upstream else "")
               + (f", lake {lake} (flushed every {lake_flush_s:g} s)" if lake else ""), err=True)
    if writer is not None:
        writer.start()
    try:
        col.run(duration, stop=lambda: stop["flag"])
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.flush()
        if writer is not None:
            writer.close()
            click.echo(f"stallscope collect: {writer.summary()}", err=True)
        auth = sec.counters()
        click.echo(f"stallscope collect: {col.summary()}"
                   + (f"; {auth['auth.rejected_peers']} peers refused ({auth['auth.rejected_handshakes']} handshakes)"
                      if bind_secure else ""), err=True)
        col.close()
        sec.close()
        exports.close()


def _check_lake(url: str, storage_options: dict) -> None:
    """Fail before binding when no installed filesystem serves the URL (one line naming the
    package to install) or the options do not fit it."""
    from stallscope.wire.lake import LakeError, open_fs
    try:
        open_fs(url, storage_options or None)
    except LakeError as e:
        raise click.ClickException(f"--lake: {e}") from None
    except TypeError as e:          # an option the filesystem does not take
        raise click.ClickException(f"--lake-option: {e}") from None


def _open_lake(col, url: str, flush_s: float, storage_options: dict):
    """The collector's lake writer on its store (a one-line ClickException if it cannot be)."""
    import sqlite3

    from stallscope.collector.lake import LakeWriter
    from stallscope.wire.lake import LakeError
    try:
        return LakeWriter(col.store.path, url, flush_s=flush_s, storage_options=storage_options or None,
                          log=lambda m: click.echo(f"stallscope collect: {m}", err=True))
    except (LakeError, sqlite3.Error) as e:
        raise click.ClickException(f"--lake: {e}") from None
