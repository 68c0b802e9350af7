"""Verdicts as OpenTelemetry logs (export/otel.py), received by a small OTLP/HTTP server in
the test that decodes what the real exporter posts with the OTLP protobufs."""

from __future__ import annotations

import gzip
import http.server
import json
import sys
import threading

import pytest
from click.testing import CliRunner
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from stallscope.analysis.text import verdict_line
from stallscope.commands.watch import watch
from stallscope.export.otel import INSTALL_HINT, OtlpVerdictLogs, flatten, logs_endpoint
from stallscope.printers import LiveVerdicts, VerdictPrinter
from tests.netutil import free_port
from tests.unit.test_metrics import stream


class Receiver:
    """POST /v1/logs on 127.0.0.1:<ephemeral>: each request decoded and kept."""

    def __init__(self, status: int = 200):
        self.requests: list = []
        self.paths: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                outer.paths.append(self.path)
                if self.path == "/v1/logs" and status == 200:
                    req = ExportLogsServiceRequest()
                    req.ParseFromString(body)
                    outer.requests.append(req)
                reply = ExportLogsServiceResponse().SerializeToString()
                self.send_response(status if self.path == "/v1/logs" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def records(self) -> list:
        """(resource attributes, log record) of every record received."""
        out = []
        for req in self.requests:
            for rl in req.resource_logs:
                res = {a.key: _value(a.value) for a in rl.resource.attributes}
                for sl in rl.scope_logs:
                    out += [(res, r) for r in sl.log_records]
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def run(batches, logs):
    live = LiveVerdicts(VerdictPrinter(out=open("/dev/null", "w")), observers=[logs], min_gap_s=0)
    got = []
    live.observers.append(type("Keep", (), {"observe_batches": lambda self, b: None,
                                            "observe_verdicts": lambda self, vs: got.extend(vs)})())
    for b in batches:
        live([b])
    live.flush()
    return got


def test_each_verdict_is_one_log_record_with_its_fields(receiver):
    logs = OtlpVerdictLogs(receiver.url, schedule_delay_ms=50)
    assert logs.endpoint == receiver.url + "/v1/logs"
    verdicts = run(stream(), logs)
    summary = logs.close()
    assert len(verdicts) == 5
    assert summary == f"OTLP logs to {receiver.url}/v1/logs: 5 of 5 verdicts exported"
    recs = receiver.records()
    assert len(recs) == len(verdicts) == logs.exported
    assert set(receiver.paths) == {"/v1/logs"}
    by_end = {(v.node, v.idle_end_ns): v for v in verdicts}
    for res, r in recs:
        attrs = {a.key: _value(a.value) for a in r.attributes}
        v = by_end[(attrs["stallscope.node"], attrs["stallscope.idle_end_ns"])]
        assert res["service.name"] == "stallscope" and res["host.name"] == v.node
        assert r.body.string_value == verdict_line(v)
        assert r.time_unix_nano == v.idle_end_ns
        assert r.severity_text == "INFO"
        assert attrs == flatten(v.to_json())
        assert r.dropped_attributes_count == 0
        assert attrs["stallscope.verdict"] == v.verdict and attrs["stallscope.gpu_uuid"] == v.gpu_uuid
        if v.verdict == "culprit":
            assert attrs["stallscope.class"] == v.klass
            assert attrs["stallscope.culprit.op"] == v.culprit["op"]
            if v.culprit["type"] == "io":
                assert attrs["stallscope.culprit.path"] == v.culprit["path"]
            assert attrs["stallscope.chain.pid"] == v.chain.pid
            assert json.loads(attrs["stallscope.chain.targets"])[0]["name"] == v.chain.targets[0].name
        else:
            assert "stallscope.class" not in attrs and "stallscope.culprit" not in str(attrs.keys())
    assert sorted(res["host.name"] for res, _r in recs) == ["a"] * 4 + ["b"]


def test_flatten():
    got = flatten({"a": 1, "b": {"c": "x", "d": None, "e": [1, 2]}, "f": [{"g": 1}], "h": [],
                   "i": [1, "x"], "j": True, "k": 0.5})
    assert got == {"stallscope.a": 1, "stallscope.b.c": "x", "stallscope.b.e": [1, 2],
                   "stallscope.f": '[{"g":1}]', "stallscope.i": '[1,"x"]', "stallscope.j": True,
                   "stallscope.k": 0.5}


@pytest.mark.parametrize("url,want", [
    ("http://otel:4318", "http://otel:4318/v1/logs"), ("http://otel:4318/", "http://otel:4318/v1/logs"),
    ("https://gw.example:443/custom/logs", "https://gw.example:443/custom/logs")])
def test_logs_endpoint(url, want):
    assert logs_endpoint(url) == want


def test_a_bad_endpoint_is_refused():
    with pytest.raises(ValueError, match="expected http"):
        logs_endpoint("otel:4318")


def test_an_endpoint_that_fails_is_counted_not_silent():
    r = Receiver(status=400)             # 400: the exporter gives up at once (no retry)
    try:
        said: list = []
        logs = OtlpVerdictLogs(r.url, schedule_delay_ms=50, timeout_s=2, log=said.append)
        run(stream(), logs)
        run(stream(), logs)
        summary = logs.close()
    finally:
        r.close()
    assert logs.exported == 0 and logs.failed == 10
    assert summary.endswith("0 of 10 verdicts exported, 10 failed"), summary
    assert len(said) == 1 and "400" in said[0] and said[0].startswith(f"OTLP logs to {r.url}/v1/logs: "), said


def test_without_the_extra_the_option_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http._log_exporter", None)
    r = CliRunner().invoke(watch, ["--otlp-endpoint", f"http://127.0.0.1:{free_port()}", "--no-gpu"])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --otlp-endpoint needs the OpenTelemetry SDK")
    assert lines[0].endswith(INSTALL_HINT)
