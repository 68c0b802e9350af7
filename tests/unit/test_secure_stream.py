"""The commands with keys, end to end over real ZeroMQ: `stallscope collect --keys-dir`
stores what an allowed tracer streams, refuses and counts a forged stream from an unknown
key (nothing of it stored), and plaintext off loopback is refused with one line."""

import os
import socket
import sqlite3
import subprocess
import sys

from click.testing import CliRunner

from stallscope.commands.collect import collect
from stallscope.commands.trace import trace
from stallscope.wire import transport
from stallscope.wire.auth import Security, allow_key, create_keypair
from stallscope.wire.schema import Batch
from tests.unit.test_metrics import _wait_for_line, stream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(keys: str, secret_name: str, endpoint: str) -> Security:
    sec = Security.from_options("client", keys_dir=keys, secret_key=os.path.join(keys, f"{secret_name}.key_secret"),
                                peer_key="collector.key")
    assert sec.encrypts("connect")
    return sec


def test_collect_with_keys_stores_the_allowed_tracer_and_refuses_a_forged_stream(tmp_path):
    keys = str(tmp_path / "keys")
    os.makedirs(keys)
    create_keypair(keys, "collector")
    create_keypair(keys, "tracer")
    create_keypair(keys, "stranger")          # a key pair the collector was never told about
    allow_key(os.path.join(keys, "tracer.key"), os.path.join(keys, "allowed"), name="node-a")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    store = str(tmp_path / "s.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stallscope", "collect", "--no-verdicts", "--bind", endpoint, "--store", store,
         "--keys-dir", keys, "--duration", "30"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        head = _wait_for_line(proc, b"listening on", 20)
        assert b"(CURVE, allow-list)" in head, head
        genuine = [b for b in stream() if b.node == "a"]
        good = _client(keys, "tracer", endpoint)
        sink = transport.StreamSink(endpoint, str(tmp_path / "spool-good"), secure=good.for_connect(endpoint))
        for b in genuine:
            sink(b)
        assert sink.flush(20), sink.summary()
        sink.close()
        good.close()

        # a forged batch claiming to be node "a": its key is not in the allow-list
        bad = _client(keys, "stranger", endpoint)
        forged = Batch("a", 10_000, genuine[0].tables, genuine[0].counters, genuine[0].hist, genuine[0].meta)
        fsink = transport.StreamSink(endpoint, str(tmp_path / "spool-bad"), secure=bad.for_connect(endpoint),
                                     close_timeout_s=0.5)
        fsink(forged)
        assert not fsink.flush(3), "a stream from an unknown key was acknowledged"
        fsink.close()
        bad.close()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    db = sqlite3.connect(store)
    rows = db.execute("SELECT node, seq FROM batches ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["a"] * len(genuine), rows
    assert sum(n for (n,) in db.execute("SELECT n_events FROM batches")) == sum(b.n_events() for b in genuine)
    tail = err.decode().strip().splitlines()[-1]
    assert "1 peers refused" in tail, err.decode()
    assert err.decode().count("refused") >= 1


def test_plaintext_off_loopback_is_refused_with_one_line(tmp_path):
    r = CliRunner().invoke(collect, ["--bind", f"tcp://0.0.0.0:{free_port()}", "--store", str(tmp_path / "s.db"),
                                     "--duration", "1"])
    assert r.exit_code == 1, r.output
    assert "refusing plaintext on tcp://0.0.0.0" in r.output and "--insecure" in r.output
    assert not os.path.exists(tmp_path / "s.db")
    r = CliRunner().invoke(trace, ["--collector", "tcp://192.0.2.1:5557", "--spool-dir", str(tmp_path / "sp"),
                                   "--duration", "1", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "refusing plaintext on tcp://192.0.2.1:5557" in r.output, r.output


def test_insecure_allows_plaintext_off_loopback(tmp_path):
    port = free_port()
    r = CliRunner().invoke(collect, ["--bind", f"tcp://0.0.0.0:{port}", "--store", str(tmp_path / "s.db"),
                                     "--duration", "0.5", "--insecure", "--no-verdicts"])
    assert r.exit_code == 0, r.output
    assert "(plaintext)" in r.output
