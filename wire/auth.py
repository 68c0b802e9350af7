"""Authenticated, encrypted transport: ZeroMQ CURVE keys, the collector's allow-list,
and the plaintext rule. The transport (transport.py) creates the sockets; this module
configures each one right after it is created, before it binds or connects.

- Keys are ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` secret,
  mode 0600), written and read with ``zmq.auth``: the same files czmq and other ZeroMQ
  programs use.
- A server socket (the collector's bind) is a CURVE server with its own keypair; a ZAP
  handler (one ``zmq.auth`` ThreadAuthenticator per zmq.Context, shared by every
  ``Security`` in it, each under its own ZAP domain) admits only clients whose public key
  is a ``*.key`` file in the allow-list directory. The directory is re-read whenever its
  contents change (checked at each handshake) and on ``reload()``.
- A client socket (a tracer, or a collector forwarding upstream) has its own keypair and
  the server's public key, so it talks only to that server: a man in the middle cannot
  complete the handshake.
- Refusals are counted, never silent: a client key the allow-list lacks is counted per
  peer (address and key) and logged once per peer; handshakes that fail before the
  allow-list is asked (a plaintext peer, a client holding the wrong server key) are seen
  through a socket monitor, counted and logged once per endpoint and kind. A client logs
  once why the server refused it.
- Plaintext is allowed only on loopback (tcp://127.*, localhost, [::1], ipc://,
  inproc://) unless ``insecure`` is set: ``check_endpoint``.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import itertools
import os
import queue
import shutil
import sys
import tempfile
import threading
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SERVER_KEY_NAME = "collector"       # --keys-dir DIR on the collector: DIR/collector.key_secret
CLIENT_KEY_NAME = "tracer"          # --keys-dir DIR on a tracer: DIR/tracer.key_secret, DIR/collector.key
ALLOWED_SUBDIR = "allowed"          # --keys-dir DIR on the collector: DIR/allowed/*.key
KEYS_HELP = "see `stallscope keys --help`"

Log = Callable[[str], None]


class SecurityError(RuntimeError):
    """Keys or endpoints cannot be used as configured (missing or malformed key file,
    plaintext refused off loopback, contradicting options). Fatal at start-up: report the
    message (one line, it names the file or option to fix) and exit."""


def _stderr_log(msg: str) -> None:
    print(f"stallscope: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- key files

def _valid_z85(key: bytes | None) -> bool:
    if key is None or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _read_cert(path: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a certificate file, validated; SecurityError otherwise."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, IndexError) as e:
        raise SecurityError(f"cannot read key file {path}: {e}") from e
    if not _valid_z85(public) or (secret is not None and not _valid_z85(secret)):
        raise SecurityError(f"key file {path} holds no valid Z85 CURVE key")
    return public, secret


def load_public_key(path: str) -> bytes:
    """The Z85 public key in a certificate file (public or secret)."""
    return _read_cert(path)[0]


def load_keypair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    public, secret = _read_cert(path)
    if secret is None:
        raise SecurityError(f"{path} holds no secret key (give the .key_secret file, not the public .key)")
    return public, secret


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or os.sep in name or "/" in name:
        raise SecurityError(f"bad key name {name!r}: a plain file name, like 'collector' or 'node7'")


def create_keypair(directory: str, name: str) -> tuple[str, str]:
    """Write a new CURVE keypair as ``directory/name.key`` (public, 0644) and
    ``directory/name.key_secret`` (0600); the directory is created (0700) if missing.
    Refuses to replace an existing key: a lost secret key cannot be recovered, and a
    replaced one locks out every peer that trusts the old public key."""
    _check_name(name)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    for p in (public_path, secret_path):
        if os.path.lexists(p):
            raise SecurityError(f"{p} exists: remove it first if you really mean to replace this key")
    # written into a private temporary folder (0700) beside the target, then moved:
    # the secret key is never readable by others, not even for a moment
    tmp = tempfile.mkdtemp(prefix=".keys-", dir=directory)
    try:
        tpub, tsec = zmq.auth.create_certificates(tmp, name)
        os.chmod(tsec, 0o600)
        os.chmod(tpub, 0o644)
        os.replace(tsec, secret_path)
        os.replace(tpub, public_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return public_path, secret_path


def allow_key(public_file: str, allow_dir: str, name: str | None = None) -> tuple[str, bool]:
    """Copy a public key into an allow-list directory as ``name.key`` (default: the
    file's own name). Returns (path, added): added is False when that exact key was
    already there. Refuses a secret key file, and a name that holds another key."""
    public, secret = _read_cert(public_file)
    if secret is not None:
        raise SecurityError(f"{public_file} holds a secret key: allow the public {PUBLIC_SUFFIX} file, "
                            "the secret key never leaves its host")
    base = os.path.basename(public_file)
    name = name or (base[:-len(PUBLIC_SUFFIX)] if base.endswith(PUBLIC_SUFFIX) else base)
    _check_name(name)
    os.makedirs(allow_dir, mode=0o755, exist_ok=True)
    dest = os.path.join(allow_dir, name + PUBLIC_SUFFIX)
    if os.path.exists(dest):
        if load_public_key(dest) == public:
            return dest, False
        raise SecurityError(f"{dest} already holds another key: give another --name, or remove it first")
    fd, tmp = tempfile.mkstemp(prefix=".allow-", dir=allow_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(public_file, "rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)            # whole file or none: the collector may be reading
    except BaseException:
        os.unlink(tmp)
        raise
    return dest, True


@dataclasses.dataclass
class KeyInfo:
    """One key name in a directory: its public key, and whether the secret is there."""
    name: str
    public_key: str | None          # Z85, or None when unreadable (error says why)
    public_file: str | None
    secret_file: str | None
    error: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def list_keys(directory: str) -> list[KeyInfo]:
    """Every key name in a directory (from NAME.key and NAME.key_secret), sorted; a file
    that cannot be read is listed with its error, never skipped."""
    if not os.path.isdir(directory):
        raise SecurityError(f"no such key directory: {directory}")
    names: dict[str, dict] = {}
    for suffix, field in ((PUBLIC_SUFFIX, "public_file"), (SECRET_SUFFIX, "secret_file")):
        for path in glob.glob(os.path.join(glob.escape(directory), "*" + suffix)):
            names.setdefault(os.path.basename(path)[:-len(suffix)], {})[field] = path
    out = []
    for name in sorted(names):
        files = names[name]
        info = KeyInfo(name, None, files.get("public_file"), files.get("secret_file"))
        try:
            keys = {load_public_key(p) for p in files.values()}
            if len(keys) > 1:
                info.error = "the public and secret files hold different keys"
            else:
                info.public_key = keys.pop().decode()
        except SecurityError as e:
            info.error = str(e)
        out.append(info)
    return out


# ---------------------------------------------------------------- plaintext rule

def is_loopback(endpoint: str) -> bool:
    """True for endpoints that never leave this host: ipc://, inproc://, and tcp:// on
    127.0.0.0/8, ::1, localhost or the loopback interface (no name is resolved)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    rest = rest.rpartition(";")[2]                  # "src;dst" connects: the destination counts
    if rest.startswith("["):
        host = rest[1:rest.find("]")] if "]" in rest else ""
    else:
        host = rest.rpartition(":")[0]
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str, security: Security | None, role: str = "bind",
                   hint: str = "--keys-dir") -> bool:
    """Whether ``endpoint`` will be encrypted for this role ('bind': a server socket,
    'connect': a client socket). Plaintext passes on loopback, or anywhere with
    ``insecure``; otherwise SecurityError, naming the option (``hint``) that would
    encrypt it."""
    if role not in ("bind", "connect"):
        raise ValueError(f"role must be 'bind' or 'connect', not {role!r}")
    if security is not None and security.encrypts(role):
        return True
    if (security is not None and security.insecure) or is_loopback(endpoint):
        return False
    raise SecurityError(f"refusing plaintext on {endpoint}: give {hint} ({KEYS_HELP}) or --insecure")


# ---------------------------------------------------------------- ZAP (server side)

class _Authenticator(ThreadAuthenticator):
    """pyzmq's ThreadAuthenticator, keeping the address of the request in hand so the
    allow-list's callback (called from ``handle_zap_message``, in this thread, one
    request at a time) knows which peer it judges."""

    address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class _ZapEntry:
    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx                  # held: the id stays this context's while registered
        self.auth = _Authenticator(ctx)
        self.auth.start()
        self.domains: set[str] = set()


_ZAP_LOCK = threading.Lock()
_ZAPS: dict[int, _ZapEntry] = {}        # id(zmq.Context) -> its one ZAP handler


class _Gate:
    """The credentials provider of one domain in one context (zmq.auth's
    ``configure_curve_callback`` protocol): asks the Security, telling it who asked."""

    def __init__(self, security: Security, auth: _Authenticator):
        self.security, self.auth = security, auth

    def callback(self, domain: str, client_key: bytes) -> bool:
        return self.security.judge(self.auth.address, client_key)


def _zap_join(ctx: zmq.Context, domain: str, security: Security) -> None:
    """The context's ZAP handler (started on first use), now asking ``security`` about
    the CURVE clients of ``domain``."""
    with _ZAP_LOCK:
        entry = _ZAPS.get(id(ctx))
        if entry is None:
            entry = _ZAPS[id(ctx)] = _ZapEntry(ctx)
        entry.auth.configure_curve_callback(domain, _Gate(security, entry.auth))
        entry.domains.add(domain)


def _zap_leave(ctx: zmq.Context, domain: str) -> None:
    """Forget a domain (its clients are refused from now on); the handler stops with
    the last one."""
    with _ZAP_LOCK:
        entry = _ZAPS.get(id(ctx))
        if entry is None or domain not in entry.domains:
            return
        entry.domains.discard(domain)
        entry.auth.credentials_providers.pop(domain, None)
        if not entry.domains:
            del _ZAPS[id(ctx)]
            entry.auth.stop()


# ---------------------------------------------------------------- handshake monitor

_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_MONITOR_STOPPED)

_PROTOCOL_REASONS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "peer does not speak CURVE (plaintext, or not configured with keys)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "handshake could not be decrypted (the peer holds the wrong "
                                           "server public key)",
}


def _failure_reason(role: str, event: int, value: int) -> str:
    """Why a handshake failed, in words that say what to fix."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the collector refused this node's key (ZAP status {value}): allow its public key there "
                "(`stallscope keys allow`)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_REASONS.get(value, f"ZMTP protocol error 0x{value:x}")
    if role == "connect":
        return "the server dropped the handshake (wrong server public key given to this node?)"
    return "handshake failed (no detail from libzmq)"


class _Watcher(threading.Thread):
    """Drains the monitor sockets of the sockets one Security configured; a monitor is
    closed when its socket is (libzmq's MONITOR_STOPPED), all of them on stop()."""

    def __init__(self, on_event: Callable[[str, int, int, str], None]):
        super().__init__(name="stallscope-auth-monitor", daemon=True)
        self.on_event = on_event
        self.incoming: queue.Queue = queue.Queue()     # (PAIR socket, role): handed over to this thread
        self.stopping = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        roles: dict[zmq.Socket, str] = {}
        try:
            while not self.stopping.is_set():
                while not self.incoming.empty():
                    mon, role = self.incoming.get_nowait()
                    roles[mon] = role
                    poller.register(mon, zmq.POLLIN)
                for mon, _ in poller.poll(100):
                    self._drain(mon, roles, poller)
        except zmq.ContextTerminated:
            pass
        finally:
            while not self.incoming.empty():
                roles[self.incoming.get_nowait()[0]] = ""
            for mon in roles:
                mon.close(0)

    def _drain(self, mon: zmq.Socket, roles: dict, poller: zmq.Poller) -> None:
        while True:
            try:
                ev = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                poller.unregister(mon)
                del roles[mon]
                mon.close(0)
                return
            endpoint = ev["endpoint"].decode("utf-8", "replace") if isinstance(ev["endpoint"], bytes) \
                else str(ev["endpoint"])
            try:
                self.on_event(roles[mon], int(ev["event"]), int(ev["value"]), endpoint)
            except Exception as e:       # a failing counter must not stop the watching
                _stderr_log(f"auth monitor: {e!r}")


# ---------------------------------------------------------------- the config object

_DOMAINS = itertools.count(1)


class Security:
    """What one process needs to secure its sockets: its own keypair (``secret_file``),
    the server's public key for client sockets (``server_public_file``), the allow-list
    for server sockets (``allow_dir``), or ``insecure`` (plaintext off loopback).

    With no keys everything is plaintext (``check_endpoint`` decides where that is
    allowed). Give the transport ``for_bind(endpoint)`` / ``for_connect(endpoint)``: each
    checks the endpoint and returns the callable to apply to each new socket (or None
    for plaintext). Counters: ``counters()``; stop with ``close()``.
    """

    def __init__(self, secret_file: str | None = None, server_public_file: str | None = None,
                 allow_dir: str | None = None, insecure: bool = False, log: Log | None = None):
        self.secret_file = secret_file
        self.server_public_file = server_public_file
        self.allow_dir = allow_dir
        self.insecure = insecure
        self.log = log or _stderr_log
        if insecure and (secret_file or server_public_file or allow_dir):
            raise SecurityError("--insecure contradicts the key options: give keys or --insecure, not both")
        if (server_public_file or allow_dir) and not secret_file:
            raise SecurityError("a server public key or an allow-list needs this side's own keypair too "
                                f"(--keys-dir or --secret-key; {KEYS_HELP})")
        self.public_key = self.secret_key = self.server_key = b""
        if secret_file:
            self.public_key, self.secret_key = load_keypair(secret_file)
            mode = os.stat(secret_file).st_mode & 0o777
            if mode & 0o077:
                self.log(f"warning: secret key {secret_file} is readable by others (mode {mode:04o}): "
                         f"chmod 600 {secret_file}")
        if server_public_file:
            self.server_key = load_public_key(server_public_file)
        if allow_dir and not os.path.isdir(allow_dir):
            raise SecurityError(f"no such allow-list directory: {allow_dir} (put the tracers' public keys "
                                "there with `stallscope keys allow`)")
        self.domain = f"stallscope.{os.getpid()}.{next(_DOMAINS)}"
        self._lock = threading.Lock()
        self._allowed: set[bytes] = set()
        self._allow_sig: object = None
        self._rejected: dict[tuple[str, str], int] = {}     # (address, Z85 key) -> refused handshakes
        self._failures: dict[tuple[str, str], int] = {}     # (endpoint, reason) -> failed handshakes
        self._handshakes = 0
        self._contexts: list[zmq.Context] = []
        self._watcher: _Watcher | None = None
        self._mon_ids = itertools.count(1)
        self._closed = False
        if allow_dir:
            self.reload()

    # ---- configuration

    @classmethod
    def from_options(cls, role: str, keys_dir: str | None = None, secret_key: str | None = None,
                     allow_dir: str | None = None, peer_key: str | None = None, insecure: bool = False,
                     log: Log | None = None) -> Security:
        """The CLI's options as a Security. role 'server' (collect): own key
        ``keys_dir/collector.key_secret``, allow-list ``keys_dir/allowed``, ``peer_key`` the
        upstream collector's public key. role 'client' (trace, watch): own key
        ``keys_dir/tracer.key_secret``, ``peer_key`` (default ``keys_dir/collector.key``) the
        collector's public key. Explicit files override the folder's defaults; a relative
        ``peer_key`` not found as given is looked up in ``keys_dir``."""
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        own = SERVER_KEY_NAME if role == "server" else CLIENT_KEY_NAME

        def in_dir(name: str, what: str, create: str) -> str:
            assert keys_dir is not None
            path = os.path.join(keys_dir, name)
            if not os.path.exists(path):
                raise SecurityError(f"no {name} in {keys_dir} ({what}): {create}")
            return path

        if keys_dir is not None and not os.path.isdir(keys_dir):
            raise SecurityError(f"no such key directory: {keys_dir}")
        if keys_dir and not secret_key:
            secret_key = in_dir(own + SECRET_SUFFIX, "this side's keypair",
                                f"`stallscope keys create {own} --dir {keys_dir}`")
        if peer_key and keys_dir and not os.path.isabs(peer_key) and not os.path.exists(peer_key):
            peer_key = os.path.join(keys_dir, peer_key)
        if role == "server":
            if keys_dir and not allow_dir:
                allow_dir = in_dir(ALLOWED_SUBDIR, "the allow-list of tracer keys",
                                   f"`stallscope keys allow TRACER.key --dir {keys_dir}/{ALLOWED_SUBDIR}`")
        else:
            if allow_dir:
                raise SecurityError("an allow-list is for the collector (`collect`), not for a tracer")
            if keys_dir and not peer_key:
                peer_key = in_dir(SERVER_KEY_NAME + PUBLIC_SUFFIX, "the collector's public key",
                                  "copy it there from the collector")
            if secret_key and not peer_key:
                raise SecurityError("--collector-key is needed with --secret-key: the tracer must know "
                                    "which collector it talks to")
        return cls(secret_file=secret_key, server_public_file=peer_key, allow_dir=allow_dir,
                   insecure=insecure, log=log)

    @property
    def enabled(self) -> bool:
        """Whether this process has keys (CURVE) at all."""
        return bool(self.secret_key)

    def encrypts(self, role: str) -> bool:
        """Whether sockets of this role ('bind' or 'connect') will be CURVE sockets."""
        return self.enabled and bool(self.allow_dir if role == "bind" else self.server_key)

    def for_bind(self, endpoint: str) -> Callable[[zmq.Socket], None] | None:
        """Check a server endpoint; the callable for each new server socket, or None
        (plaintext, allowed there)."""
        return self.apply_server if check_endpoint(endpoint, self, "bind") else None

    def for_connect(self, endpoint: str, hint: str = "--collector-key") -> Callable[[zmq.Socket], None] | None:
        """Check a client endpoint; the callable for each new client socket, or None
        (plaintext, allowed there)."""
        if self.enabled and not self.server_key:
            hint = f"{hint} (the server's public key)"
        elif not self.enabled:
            hint = "--keys-dir"
        return self.apply_client if check_endpoint(endpoint, self, "connect", hint) else None

    # ---- applying to sockets

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make a new, not yet bound socket a CURVE server admitting only the allow-list."""
        if not self.encrypts("bind"):
            raise SecurityError("no keypair and allow-list configured for a server socket")
        self._check_open()
        sock.curve_server = True
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.zap_domain = self.domain.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)        # no ZAP handler -> refuse, never admit all
        ctx = sock.context
        with self._lock:
            if not any(c is ctx for c in self._contexts):
                _zap_join(ctx, self.domain, self)
                self._contexts.append(ctx)
        self._monitor(sock, "bind")

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make a new, not yet connected socket a CURVE client of the configured server."""
        if not self.encrypts("connect"):
            raise SecurityError("no keypair and server public key configured for a client socket")
        self._check_open()
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_key
        self._monitor(sock, "connect")

    def _check_open(self) -> None:
        if self._closed:
            raise SecurityError("this Security was closed")

    def _monitor(self, sock: zmq.Socket, role: str) -> None:
        addr = f"inproc://stallscope.auth.monitor.{id(self):x}.{next(self._mon_ids)}"
        sock.monitor(addr, _MONITOR_EVENTS)
        mon = sock.context.socket(zmq.PAIR)
        mon.linger = 0
        mon.connect(addr)               # before the socket binds or connects: no event is missed
        with self._lock:
            if self._watcher is None:
                self._watcher = _Watcher(self._on_event)
                self._watcher.start()
            self._watcher.incoming.put((mon, role))

    # ---- allow-list (called from the ZAP thread)

    def _allow_signature(self) -> object:
        assert self.allow_dir is not None
        try:
            files = sorted(glob.glob(os.path.join(glob.escape(self.allow_dir), "*" + PUBLIC_SUFFIX)))
            return tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
        except OSError as e:
            return ("error", str(e))

    def reload(self) -> int:
        """Re-read the allow-list directory; the number of keys it allows. A file that
        cannot be read is reported and skipped; the others stay allowed."""
        if not self.allow_dir:
            return 0
        sig = self._allow_signature()
        keys: set[bytes] = set()
        for path in sorted(glob.glob(os.path.join(glob.escape(self.allow_dir), "*" + PUBLIC_SUFFIX))):
            try:
                keys.add(load_public_key(path))
            except SecurityError as e:
                self.log(f"allow-list: skipping {e}")
        with self._lock:
            changed = keys != self._allowed
            self._allowed, self._allow_sig = keys, sig
        if changed and self._contexts:
            self.log(f"allow-list {self.allow_dir}: {len(keys)} key(s)")
        if not keys:
            self.log(f"warning: allow-list {self.allow_dir} is empty: every tracer will be refused "
                     "(`stallscope keys allow`)")
        return len(keys)

    def judge(self, address: str, client_key: bytes) -> bool:
        """Whether a client's Z85 public key is allowed (asked by the ZAP handler, in its
        thread); a refusal is counted and logged once per peer (address, key)."""
        if self._allow_signature() != self._allow_sig:
            self.reload()
        with self._lock:
            if client_key in self._allowed:
                return True
            peer = (address, client_key.decode("ascii", "replace"))
            first = peer not in self._rejected
            self._rejected[peer] = self._rejected.get(peer, 0) + 1
        if first:
            self.log(f"refused a tracer from {peer[0]} with key {peer[1]}: not in the allow-list "
                     f"{self.allow_dir} (further refusals of this peer are only counted)")
        return False

    # ---- monitor events (called from the watcher thread)

    def _on_event(self, role: str, event: int, value: int, endpoint: str) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            with self._lock:
                self._handshakes += 1
            return
        if role == "bind" and event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return                       # the allow-list's refusal: counted per peer in judge()
        reason = _failure_reason(role, event, value)
        key = (endpoint, reason)
        with self._lock:
            first = key not in self._failures
            self._failures[key] = self._failures.get(key, 0) + 1
        if first:
            side = "a peer on" if role == "bind" else "connecting to"
            self.log(f"handshake failed ({side} {endpoint}): {reason} (further ones are only counted)")

    # ---- what happened

    @property
    def rejected_peers(self) -> int:
        """Distinct peers (address, public key) the allow-list refused."""
        with self._lock:
            return len(self._rejected)

    @property
    def rejected(self) -> dict[tuple[str, str], int]:
        """{(address, Z85 public key): refused handshakes} of the refused peers."""
        with self._lock:
            return dict(self._rejected)

    @property
    def handshake_failures(self) -> dict[tuple[str, str], int]:
        """{(endpoint, reason): failed handshakes} the allow-list never saw (plaintext
        peers, wrong server key) or, on a client, the server's refusals."""
        with self._lock:
            return dict(self._failures)

    def counters(self) -> dict[str, int]:
        """Cumulative counts under stable names, for a batch's or a collector's counters."""
        with self._lock:
            return {"auth.rejected_peers": len(self._rejected),
                    "auth.rejected_handshakes": sum(self._rejected.values()),
                    "auth.failed_handshakes": sum(self._failures.values()),
                    "auth.handshakes": self._handshakes}

    def close(self) -> None:
        """Stop the monitor thread and leave the ZAP handler (stopped with its last user).
        Call after the sockets are closed: a server socket still open then refuses every
        new client."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            contexts, self._contexts = self._contexts, []
            watcher = self._watcher
        for ctx in contexts:
            _zap_leave(ctx, self.domain)
        if watcher is not None:
            watcher.stopping.set()
            watcher.join(timeout=5)

    def __enter__(self) -> Security:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
