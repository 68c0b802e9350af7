"""Sinks and callbacks that print to the terminal: stall events as they are traced,
verdicts as they are judged. The words themselves come from stallscope.analysis.text.
The live exports beside the terminal (Prometheus metrics, OTel logs) are opened here too."""

from __future__ import annotations

import json
import sys

import click

from stallscope.analysis.analyze import LiveAnalyzer
from stallscope.analysis.text import EVENT_HEADER, event_line, verdict_line
from stallscope.wire.schema import STALL_TABLES, Batch, rows


class EventPrinter:
    """A sink: live output in the style of BCC's tools, or one JSON object per line."""

    def __init__(self, as_json: bool = False, out=None, pid_filter: int = 0):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.pid_filter = pid_filter
        self.printed = 0
        if not as_json:
            print(EVENT_HEADER, file=self.out, flush=True)

    def __call__(self, batch: Batch):
        evs = []
        for kind in STALL_TABLES:
            t = batch.tables.get(kind)
            if t is None or not len(t["ts_ns"]):
                continue
            evs.extend(rows(kind, t, batch.node))
        evs.sort(key=lambda e: e["ts_ns"])
        for e in evs:
            if self.pid_filter and e["pid"] != self.pid_filter:
                continue
            self.printed += 1
            self.out.write(json.dumps(e, separators=(",", ":")) + "\n" if self.as_json else event_line(e) + "\n")
        if evs:
            self.out.flush()


class VerdictPrinter:
    """Prints a list of verdicts (:class:`Verdict`), as lines or JSON; counts them."""

    def __init__(self, as_json: bool = False, out=None):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.count = 0

    def __call__(self, verdicts: list):
        for v in verdicts:
            self.count += 1
            self.out.write(json.dumps(v.to_json(), separators=(",", ":")) + "\n" if self.as_json
                           else verdict_line(v) + "\n")
        if verdicts:
            self.out.flush()


class LiveVerdicts:
    """Batches in, verdicts out: a live analysis window feeding a printer. Given to a
    collector (``on_batches``) or an embedded collector; a batch marked final
    flushes the intervals still open. ``observers`` (the metrics and OTel exporters) see
    every batch (``observe_batches``) and every verdict (``observe_verdicts``)."""

    def __init__(self, printer: VerdictPrinter, observers=(), **params):
        self.live = LiveAnalyzer(**params)
        self.printer = printer
        self.observers = list(observers)

    def __call__(self, batches: list):
        for o in self.observers:
            o.observe_batches(batches)
        self._emit(self.live.add(batches))
        if any(b.meta.get("final") for b in batches):
            self.flush()

    def flush(self):
        self._emit(self.live.flush())

    def _emit(self, verdicts: list):
        self.printer(verdicts)
        for o in self.observers:
            o.observe_verdicts(verdicts)


def export_options(f):
    """``--metrics-port``, ``--metrics-addr``, ``--otlp-endpoint`` (collect, watch, demo)."""
    opts = [
        click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                     help="Serve Prometheus metrics (GPU idle seconds by culprit class, latency "
                          "histograms, losses) on this port [default: off; 0: any free port]."),
        click.option("--metrics-addr", default="0.0.0.0", show_default=True,
                     help="Address the metrics endpoint listens on (all interfaces by default)."),
        click.option("--otlp-endpoint", default=None, metavar="URL",
                     help="Export each verdict as an OpenTelemetry log record over OTLP/HTTP "
                          "(http://host:4318 gets /v1/logs added). Needs stallscope[otel]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


class LiveExports:
    """The exporters a command asked for: opened before tracing or receiving starts (a
    port in use or a missing extra is a one-line error), fed through :class:`LiveVerdicts`
    (``observers``), closed at the end (OTel logs flushed, the summary on stderr)."""

    def __init__(self, metrics_port=None, metrics_addr="0.0.0.0", otlp_endpoint=None):
        self.metrics = None
        self.otlp = None
        if metrics_port is not None:
            from stallscope.export.prometheus import StallscopeMetrics
            self.metrics = StallscopeMetrics()
            try:
                port = self.metrics.serve(metrics_port, metrics_addr)
            except OSError as e:
                raise click.ClickException(f"--metrics-port: cannot listen on {metrics_addr}:{metrics_port}: "
                                           f"{e.strerror or e}") from None
            click.echo(f"stallscope: Prometheus metrics on http://{metrics_addr}:{port}/metrics", err=True)
        if otlp_endpoint:
            from stallscope.export.otel import OtelUnavailable, OtlpVerdictLogs
            try:
                self.otlp = OtlpVerdictLogs(otlp_endpoint)
            except (OtelUnavailable, ValueError) as e:
                self.close()
                raise click.ClickException(str(e)) from None
            click.echo(f"stallscope: verdicts as OTLP logs to {self.otlp.endpoint}", err=True)

    @property
    def observers(self) -> list:
        return [o for o in (self.metrics, self.otlp) if o is not None]

    def observe_batches(self, batches: list):
        for o in self.observers:
            o.observe_batches(batches)

    def close(self):
        if self.otlp is not None:
            click.echo(f"stallscope: {self.otlp.close()}", err=True)
            self.otlp = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
