"""Verdicts as OpenTelemetry log records over OTLP/HTTP (the optional ``otel`` extra).

One record per verdict: the body is the live verdict line, the attributes are the verdict's
JSON fields flattened under ``stallscope.`` (``stallscope.culprit.path``,
``stallscope.chain.class``; a list of objects travels as one JSON string), the timestamp is
the end of the idle interval. The resource says ``service.name=stallscope`` and
``host.name=<node>``: a collector receiving many nodes keeps one logger per node, all
feeding one batching processor and one exporter. The SDK is imported when an exporter is
made, so the rest of stallscope runs without it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import urllib.parse

from stallscope.analysis.text import verdict_line

INSTALL_HINT = "pip install 'stallscope[otel]'"
#: where the OTLP exporters log their retries and failures (one line per batch otherwise)
_SDK_LOGGER = "opentelemetry.exporter.otlp"


class OtelUnavailable(RuntimeError):
    """The OpenTelemetry SDK or its OTLP/HTTP exporter is not installed."""


def logs_endpoint(url: str) -> str:
    """The OTLP/HTTP logs URL: ``/v1/logs`` added to a bare ``http(s)://host:port``, any other
    path kept as given. Raises ValueError for something that is not an http(s) URL."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"--otlp-endpoint {url!r}: expected http(s)://host:port[/path]")
    if u.path in ("", "/"):
        return urllib.parse.urlunsplit((u.scheme, u.netloc, "/v1/logs", u.query, ""))
    return url


def flatten(obj, prefix: str = "stallscope") -> dict:
    """OTel attributes of a JSON object: nested maps become dotted keys, lists of one
    primitive type stay lists, other lists become one JSON string, nulls are left out."""
    out: dict = {}

    def walk(key, val):
        if val is None:
            return
        if isinstance(val, dict):
            for k, v in val.items():
                walk(f"{key}.{k}", v)
        elif isinstance(val, (list, tuple)):
            kinds = {type(x) for x in val}
            if len(kinds) == 1 and kinds <= {str, bool, int, float}:
                out[key] = list(val)
            elif val:
                out[key] = json.dumps(val, separators=(",", ":"), default=str)
        elif isinstance(val, (str, bool, int, float)):
            out[key] = val
        else:
            out[key] = str(val)
    walk(prefix, obj)
    return out


class OtlpVerdictLogs:
    """Export verdicts (``observe_verdicts``) as OTel log records to ``endpoint``. Counts
    what it emitted, exported, and what failed; ``close()`` flushes and reports."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0, schedule_delay_ms: int = 1000,
                 service_name: str = "stallscope", log=None):
        try:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs import export as sdk_export
        except ImportError as e:
            raise OtelUnavailable(f"--otlp-endpoint needs the OpenTelemetry SDK ({e.name} is "
                                  f"missing): {INSTALL_HINT}") from None
        self.endpoint = logs_endpoint(endpoint)
        self.log = log or (lambda m: print(f"stallscope: {m}", file=sys.stderr, flush=True))
        self.service_name = service_name
        self.emitted = 0
        self.exported = 0
        self.failed = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._providers: dict = {}
        self._loggers: dict = {}
        owner = self
        inner = OTLPLogExporter(endpoint=self.endpoint, timeout=timeout_s)

        # LogRecordExporter since SDK 1.37; LogExporter before (kept, deprecated)
        base = getattr(sdk_export, "LogRecordExporter", None) or sdk_export.LogExporter

        class CountingExporter(base):  # type: ignore[misc,valid-type]
            """The OTLP exporter, counting the records each export delivered or lost."""

            def export(self, batch):
                ok = False
                try:
                    res = inner.export(batch)
                    ok = getattr(res, "name", "") == "SUCCESS"
                    return res
                finally:
                    with owner._lock:
                        if ok:
                            owner.exported += len(batch)
                        else:
                            owner.failed += len(batch)

            def shutdown(self):
                inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        self._sdk_log = _FirstMessage(lambda m: self.log(
            f"OTLP logs to {self.endpoint}: {m} (further failures are counted; summary at exit)"))
        sdk_logger = logging.getLogger(_SDK_LOGGER)
        sdk_logger.addHandler(self._sdk_log)
        sdk_logger.propagate = False
        self.processor = sdk_export.BatchLogRecordProcessor(CountingExporter(),
                                                            schedule_delay_millis=schedule_delay_ms)

    def _logger(self, node: str):
        lg = self._loggers.get(node)
        if lg is None:
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk.resources import Resource
            prov = LoggerProvider(resource=Resource.create({"service.name": self.service_name,
                                                            "host.name": node}),
                                  shutdown_on_exit=False)
            prov.add_log_record_processor(self.processor)
            self._providers[node] = prov
            lg = self._loggers[node] = prov.get_logger("stallscope")
        return lg

    def observe_batches(self, batches) -> None:
        """Batches carry nothing this exporter sends."""

    def observe_verdicts(self, verdicts) -> None:
        from opentelemetry._logs import LogRecord, SeverityNumber
        for v in verdicts:
            try:
                rec = LogRecord(timestamp=int(v.idle_end_ns), severity_number=SeverityNumber.INFO,
                                severity_text="INFO", body=verdict_line(v),
                                attributes=flatten(v.to_json()))
                self._logger(str(v.node)).emit(rec)
                self.emitted += 1
            except Exception:
                self.errors += 1

    def close(self, timeout_ms: int = 15000) -> str:
        """Flush what is queued, stop the exporter; returns a one-line summary."""
        try:
            self.processor.force_flush(timeout_ms)
        finally:
            self.processor.shutdown()
            sdk_logger = logging.getLogger(_SDK_LOGGER)
            sdk_logger.removeHandler(self._sdk_log)
            sdk_logger.propagate = not sdk_logger.handlers
        lost = self.emitted - self.exported - self.failed
        return (f"OTLP logs to {self.endpoint}: {self.exported} of {self.emitted + self.errors} "
                f"verdicts exported" + (f", {self.failed} failed" if self.failed else "")
                + (f", {lost} dropped from the queue" if lost > 0 else "")
                + (f", {self.errors} not encodable" if self.errors else ""))


class _FirstMessage(logging.Handler):
    """Passes the SDK exporter's first warning on (one line), drops the repeats."""

    def __init__(self, say):
        super().__init__(logging.WARNING)
        self.say = say
        self.seen = 0

    def emit(self, record):
        self.seen += 1
        if self.seen == 1:
            self.say(record.getMessage())
