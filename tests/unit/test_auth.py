"""CURVE transport security (wire/auth.py) over real ZeroMQ sockets on 127.0.0.1:
the allow-list admits and refuses, refusals are counted and logged once per peer, the
stream is encrypted on the wire, plaintext is refused off loopback, and `stallscope keys`."""

import contextlib
import json
import os
import select
import socket
import stat
import threading
import time

import click
import pytest
import zmq
from click.testing import CliRunner

from stallscope.commands.keys import keys as keys_cli
from stallscope.options import security_options
from stallscope.wire import auth

PAYLOAD = b"stallscope-plaintext-marker-" * 4


def offer(sock, payload=PAYLOAD):
    """Send as the tracer does (NOBLOCK), for a client the server will refuse: libzmq drops
    a refused connection's pipe and does not reconnect, so once the handshake failed before
    the send there is nowhere to queue, and a blocking send waits for ever (it hung a CI run
    for 25 minutes on a loaded machine)."""
    with contextlib.suppress(zmq.Again):
        sock.send(payload, zmq.NOBLOCK)


def wait_until(pred, timeout=10.0, what="condition"):
    """Poll pred until true; fail after timeout (no fixed sleeps in the tests)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def kd(tmp_path):
    """collector, tracer and stranger keypairs; the tracer is allowed, the stranger not."""
    d = tmp_path / "keys"
    auth.create_keypair(str(d), "collector")
    auth.create_keypair(str(tmp_path / "node"), "tracer")
    auth.create_keypair(str(tmp_path / "other"), "tracer")
    auth.allow_key(str(tmp_path / "node" / "tracer.key"), str(d / "allowed"), name="node7")
    return tmp_path


class TrackingContext(zmq.Context):
    """Remembers the sockets a test opens, to close them before term()."""
    tracked: list

    def track(self, sock):
        self.tracked.append(sock)


@pytest.fixture
def ctx():
    c = TrackingContext()
    c.tracked = []
    yield c
    for s in c.tracked:
        s.close(0)
    auth_left = [e for e in auth._ZAPS.values() if e.ctx is c]
    assert not auth_left, "a Security was not closed"
    c.term()


class Peers:
    """A secured server and the clients of one test, closed in the right order."""

    def __init__(self, ctx, kd, server_type=zmq.PULL):
        self.ctx, self.kd, self.logs, self.secs = ctx, kd, [], []
        self.server_sec = self.sec(auth.Security.from_options("server", keys_dir=str(kd / "keys"),
                                                              log=self.logs.append))
        self.server = self.socket(server_type)
        self.server_sec.for_bind("tcp://0.0.0.0:5557")(self.server)
        port = self.server.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def sec(self, s):
        self.secs.append(s)
        return s

    def socket(self, kind):
        s = self.ctx.socket(kind)
        s.linger = 0
        s.sndtimeo = 10_000     # a send with no pipe fails the test instead of hanging it
        self.ctx.track(s)
        return s

    def client(self, kind=zmq.PUSH, who="node", server_key=None, log=None):
        """A CURVE client with the keypair in kd/<who>; None for a plaintext one."""
        if who is None:
            c = self.socket(kind)
        else:
            sec = self.sec(auth.Security(secret_file=str(self.kd / who / "tracer.key_secret"),
                                         server_public_file=server_key or str(self.kd / "keys" / "collector.key"),
                                         log=log if log is not None else self.logs.append))
            c = self.socket(kind)
            sec.for_connect(self.endpoint)(c)
        c.connect(self.endpoint)
        return c

    def close(self):
        for s in self.secs:
            s.close()


@pytest.fixture
def peers(ctx, kd):
    made = []

    def make(server_type=zmq.PULL):
        made.append(Peers(ctx, kd, server_type))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_allowed_key_delivers_push_pull(peers):
    p = peers()
    c = p.client()
    c.send(PAYLOAD)
    assert p.server.poll(5000), "an allowed tracer's message did not arrive"
    assert p.server.recv() == PAYLOAD
    wait_until(lambda: p.server_sec.counters()["auth.handshakes"] == 1, what="handshake counted")
    assert p.server_sec.rejected_peers == 0
    assert not [m for m in p.logs if "refused" in m or "failed" in m]


def test_allowed_key_delivers_dealer_router_both_ways(peers):
    p = peers(zmq.ROUTER)
    c = p.client(zmq.DEALER)
    c.send_multipart([b"batch", PAYLOAD])
    assert p.server.poll(5000)
    ident, kind, body = p.server.recv_multipart()
    assert (kind, body) == (b"batch", PAYLOAD)
    p.server.send_multipart([ident, b"ack", b"7"])
    assert c.poll(5000), "the acknowledgement did not come back"
    assert c.recv_multipart() == [b"ack", b"7"]


def test_plaintext_client_refused_by_secure_server(peers):
    p = peers()
    c = p.client(who=None)
    offer(c)
    wait_until(lambda: p.server_sec.counters()["auth.failed_handshakes"] >= 1, what="plaintext refusal")
    assert p.server.poll(200) == 0
    (endpoint, reason), = p.server_sec.handshake_failures
    assert endpoint == p.endpoint and "does not speak CURVE" in reason
    assert p.server_sec.rejected_peers == 0          # the allow-list never saw it


class Tap:
    """A TCP relay on 127.0.0.1 that keeps every byte it forwards."""

    def __init__(self, target_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        peer = {a: b, b: a}
        while not self.stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.05)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    self.stop.set()
                    break
                with self.lock:
                    self.seen += data
                peer[s].sendall(data)
        a.close()
        b.close()

    def captured(self):
        with self.lock:
            return bytes(self.seen)

    def close(self):
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


def _through_tap(ctx, server, client, port):
    tap = Tap(port)
    try:
        client.connect(f"tcp://127.0.0.1:{tap.port}")
        client.send(PAYLOAD)
        assert server.poll(5000), "nothing arrived through the relay"
        assert server.recv() == PAYLOAD
        return tap.captured()
    finally:
        client.close(0)
        tap.close()


def test_stream_is_encrypted_on_the_wire(ctx, kd, peers):
    p = peers()
    sec = p.sec(auth.Security(secret_file=str(kd / "node" / "tracer.key_secret"),
                              server_public_file=str(kd / "keys" / "collector.key")))
    c = p.socket(zmq.PUSH)
    sec.apply_client(c)
    wire = _through_tap(ctx, p.server, c, int(p.endpoint.rsplit(":", 1)[1]))
    assert b"CURVE" in wire and PAYLOAD[:28] not in wire
    # control: the same relay does show a plaintext stream's payload
    plain = p.socket(zmq.PULL)
    port = plain.bind_to_random_port("tcp://127.0.0.1")
    assert PAYLOAD in _through_tap(ctx, plain, p.socket(zmq.PUSH), port)


@pytest.mark.parametrize("kind", [(zmq.PUSH, zmq.PULL), (zmq.DEALER, zmq.ROUTER)])
def test_unknown_key_refused_counted_and_logged_once_per_peer(peers, kind):
    client_type, server_type = kind
    p = peers(server_type)
    attempts = 3
    for i in range(attempts):                # a stranger retrying, as a restarted tracer would
        c = p.client(client_type, who="other")
        offer(c)
        wait_until(lambda: sum(p.server_sec.rejected.values()) >= i + 1, what=f"refusal {i + 1}")
    assert p.server.poll(300) == 0, "a refused tracer's message arrived"
    assert p.server_sec.rejected_peers == 1
    (address, key), = p.server_sec.rejected
    stranger = auth.load_public_key(str(p.kd / "other" / "tracer.key")).decode()
    assert (address, key) == ("127.0.0.1", stranger)
    assert p.server_sec.counters()["auth.rejected_handshakes"] >= attempts
    refusals = [m for m in p.logs if m.startswith("refused a tracer")]
    assert len(refusals) == 1 and stranger in refusals[0]
    # the allowed tracer still gets through the same server afterwards
    ok = p.client(client_type)
    ok.send(PAYLOAD)
    assert p.server.poll(5000)
    assert p.server.recv_multipart()[-1] == PAYLOAD


def test_client_learns_why_it_was_refused_once(peers):
    p = peers()
    logs = []
    offer(p.client(who="other", log=logs.append))
    wait_until(lambda: any("refused this node's key" in m for m in logs), what="client-side reason")
    assert p.secs[-1].counters()["auth.failed_handshakes"] >= 1
    assert len(logs) == 1


def test_wrong_server_key_never_delivers(peers, kd, tmp_path):
    p = peers()
    auth.create_keypair(str(tmp_path / "impostor"), "collector")
    logs = []
    c = p.client(who="node", server_key=str(tmp_path / "impostor" / "collector.key"), log=logs.append)
    offer(c)
    client_sec = p.secs[-1]
    # libzmq retries the connection; every try fails the same way, and is only counted
    wait_until(lambda: client_sec.counters()["auth.failed_handshakes"] >= 3, what="three failed tries")
    wait_until(lambda: p.server_sec.counters()["auth.failed_handshakes"] >= 3, what="server-side count")
    assert p.server.poll(200) == 0
    assert len(logs) == 1 and "wrong server public key" in logs[0]
    (_, reason), = p.server_sec.handshake_failures
    assert "could not be decrypted" in reason
    assert p.server_sec.rejected_peers == 0


def test_allow_list_changes_apply_without_restart(peers, kd):
    p = peers()
    c = p.client(who="other")
    offer(c)
    wait_until(lambda: p.server_sec.rejected_peers == 1, what="first refusal")
    auth.allow_key(str(kd / "other" / "tracer.key"), str(kd / "keys" / "allowed"), name="node8")
    c2 = p.client(who="other")
    c2.send(PAYLOAD)
    assert p.server.poll(5000), "a newly allowed key was still refused"
    assert p.server.recv() == PAYLOAD
    os.unlink(kd / "keys" / "allowed" / "node8.key")        # revoke
    assert p.server_sec.reload() == 1
    c3 = p.client(who="other")
    offer(c3)
    wait_until(lambda: sum(p.server_sec.rejected.values()) >= 2, what="refusal after revoking")
    assert p.server.poll(200) == 0


def test_zap_handler_is_per_context_and_stops_with_last_user(ctx, kd):
    secs = [auth.Security.from_options("server", keys_dir=str(kd / "keys"), log=lambda m: None)
            for _ in range(2)]
    socks = []
    for s in secs:
        sock = ctx.socket(zmq.PULL)
        ctx.track(sock)
        s.apply_server(sock)
        socks.append(sock)
    live = [e for e in auth._ZAPS.values() if e.ctx is ctx]
    assert len(live) == 1 and live[0].domains == {secs[0].domain, secs[1].domain}
    secs[0].close()
    assert live[0].auth.is_alive()
    secs[1].close()
    assert not live[0].auth.is_alive() and all(e.ctx is not ctx for e in auth._ZAPS.values())
    with pytest.raises(auth.SecurityError, match="closed"):
        secs[0].apply_server(ctx.socket(zmq.PULL))


def test_check_endpoint_plaintext_rule(kd):
    with pytest.raises(auth.SecurityError) as e:
        auth.check_endpoint("tcp://0.0.0.0:5557", None)
    assert str(e.value) == ("refusing plaintext on tcp://0.0.0.0:5557: give --keys-dir "
                            "(see `stallscope keys --help`) or --insecure")
    for ep in ("tcp://127.0.0.1:5557", "tcp://127.3.4.5:1", "tcp://localhost:5557", "tcp://[::1]:5557",
               "ipc:///run/stallscope.sock", "inproc://x", "tcp://10.0.0.1:9;127.0.0.1:5557"):
        assert auth.check_endpoint(ep, None) is False, ep
    for ep in ("tcp://10.1.2.3:5557", "tcp://*:5557", "tcp://collector:5557", "tcp://[::]:5557",
               "tcp://127.0.0.1:9;10.0.0.1:5557", "udp://127.0.0.1:1"):
        assert not auth.is_loopback(ep), ep
    assert auth.check_endpoint("tcp://0.0.0.0:5557", auth.Security(insecure=True)) is False
    server = auth.Security.from_options("server", keys_dir=str(kd / "keys"), log=lambda m: None)
    assert auth.check_endpoint("tcp://0.0.0.0:5557", server, "bind") is True
    with pytest.raises(auth.SecurityError, match="--upstream-key"):
        server.for_connect("tcp://root:5557", hint="--upstream-key")    # no upstream key given
    assert server.for_connect("tcp://127.0.0.1:5557") is None           # plaintext to loopback


def test_from_options_defaults_and_errors(kd, tmp_path):
    keys = str(kd / "keys")
    s = auth.Security.from_options("server", keys_dir=keys, log=lambda m: None)
    assert (s.secret_file, s.allow_dir) == (f"{keys}/collector.key_secret", f"{keys}/allowed")
    node = kd / "node"
    (node / "collector.key").write_bytes((kd / "keys" / "collector.key").read_bytes())
    c = auth.Security.from_options("client", keys_dir=str(node), log=lambda m: None)
    assert c.server_public_file == f"{node}/collector.key" and c.encrypts("connect")
    c2 = auth.Security.from_options("client", keys_dir=str(node), peer_key="collector.key", log=lambda m: None)
    assert c2.server_key == c.server_key
    cases = [
        (dict(role="client", keys_dir=keys), "no tracer.key_secret in"),
        (dict(role="server", keys_dir=str(node)), "no collector.key_secret in"),
        (dict(role="server", keys_dir=keys, insecure=True), "contradicts"),
        (dict(role="client", secret_key=f"{node}/tracer.key_secret"), "--collector-key is needed"),
        (dict(role="client", secret_key=f"{node}/tracer.key", peer_key=f"{node}/collector.key"),
         "holds no secret key"),
        (dict(role="server", secret_key=f"{keys}/collector.key_secret", allow_dir=str(tmp_path / "no")),
         "no such allow-list directory"),
        (dict(role="server", keys_dir=str(tmp_path / "nowhere")), "no such key directory"),
    ]
    for kw, msg in cases:
        with pytest.raises(auth.SecurityError, match=msg):
            auth.Security.from_options(**kw)
    os.chmod(f"{keys}/collector.key_secret", 0o644)
    logs = []
    auth.Security.from_options("server", keys_dir=keys, log=logs.append)
    assert any("readable by others" in m for m in logs)


def test_security_options_decorator(kd):
    got = {}

    @click.command()
    @security_options("server")
    def cmd(sopts):
        got["sec"] = sopts.security(log=lambda m: None)

    r = CliRunner().invoke(cmd, ["--keys-dir", str(kd / "keys")])
    assert r.exit_code == 0, r.output
    assert got["sec"].encrypts("bind")
    r = CliRunner().invoke(cmd, ["--keys-dir", str(kd / "keys"), "--insecure"])
    assert r.exit_code == 2 and "contradicts" in r.output
    r = CliRunner().invoke(cmd, ["--help"])
    assert "--allow-dir" in r.output and "--upstream-key" in r.output and "--collector-key" not in r.output

    @click.command()
    @security_options("client")
    def tcmd(sopts):
        got["client"] = sopts

    r = CliRunner().invoke(tcmd, ["--secret-key", "a.key_secret", "--collector-key", "c.key"])
    assert r.exit_code == 0, r.output
    assert (got["client"].secret_key, got["client"].peer_key, got["client"].insecure) == \
        ("a.key_secret", "c.key", False)


def test_keys_cli_create_allow_list(tmp_path):
    run = CliRunner().invoke
    d, allowed = str(tmp_path / "k"), str(tmp_path / "k" / "allowed")
    r = run(keys_cli, ["create", "collector", "--dir", d, "--json"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.output)
    assert stat.S_IMODE(os.stat(made["secret_file"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(made["public_file"]).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert zmq.auth.load_certificate(made["secret_file"])[0].decode() == made["public_key"]
    assert [n for n in os.listdir(d) if n.startswith(".")] == []          # no temporary left
    r = run(keys_cli, ["create", "collector", "--dir", d])
    assert r.exit_code == 1 and "exists" in r.output

    r = run(keys_cli, ["create", "tracer", "--dir", str(tmp_path / "n")])
    assert r.exit_code == 0 and "0600" in r.output
    tracer_pub = str(tmp_path / "n" / "tracer.key")
    r = run(keys_cli, ["allow", tracer_pub, "--dir", allowed, "--name", "node7"])
    assert r.exit_code == 0 and r.output.startswith("allowed:")
    r = run(keys_cli, ["allow", tracer_pub, "--dir", allowed, "--name", "node7"])
    assert r.exit_code == 0 and r.output.startswith("already allowed:")
    r = run(keys_cli, ["allow", made["public_file"], "--dir", allowed, "--name", "node7"])
    assert r.exit_code == 1 and "already holds another key" in r.output
    r = run(keys_cli, ["allow", str(tmp_path / "n" / "tracer.key_secret"), "--dir", allowed])
    assert r.exit_code == 1 and "secret key" in r.output

    r = run(keys_cli, ["list", "--dir", d, "--json"])
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [(x["name"], x["public_key"], bool(x["secret_file"])) for x in rows] == \
        [("collector", made["public_key"], True)]
    r = run(keys_cli, ["list", "--dir", allowed])
    tracer_key = auth.load_public_key(tracer_pub).decode()
    assert r.exit_code == 0 and r.output.split() == ["node7", tracer_key, "public"]
    (tmp_path / "k" / "allowed" / "broken.key").write_text("curve\n    nothing here\n")
    r = run(keys_cli, ["list", "--dir", allowed, "--json"])
    assert r.exit_code == 1
    assert [json.loads(line)["error"] is not None for line in r.output.splitlines()] == [True, False]
    r = run(keys_cli, ["--help"])
    assert "stallscope collect --bind tcp://0.0.0.0:5557 --keys-dir" in r.output
