"""ZeroMQ transport with acknowledged delivery: the only module that imports zmq.

A tracer (DEALER) sends each batch as ``[b"SSB1", seq (u64 big endian), payload]``; the
collector (ROUTER) commits the batch to its store and only then answers
``[b"SSA1", (seq u64, status u8)...]`` for the batches of that commit: *stored*,
*duplicate* (already stored: acknowledged too, it is durable) or *rejected* (not a valid
batch: the reason is in the collector's store; the tracer gives it up). ``seq`` names the
batch on this hop only; the store recognises a batch resent or forwarded by its identity in
the payload (node, boot id, sequence; see :func:`delivery_key`).

:class:`AckedSender` keeps at most ``window`` batches (and ``window_bytes``) unacknowledged in
flight, resends them from the oldest when no acknowledgement came for ``ack_timeout_s``
(doubling up to ``max_ack_timeout_s`` while the collector stays silent), and never blocks:
:meth:`AckedSender.pump` does non-blocking socket operations only. It reads batches from a
*source* (the tracer's :class:`~stallscope.wire.spool.Spool`, or a rack collector's store)
that keeps them until they are acknowledged.

Security: every socket is made by :func:`make_socket`, which calls the optional ``secure``
callable with the new socket before any option, bind or connect, so CURVE keys can be set
there; :class:`Receiver`, :class:`AckedSender` and :class:`StreamSink` take ``secure=``.
"""

from __future__ import annotations

import collections
import struct
import sys
import threading
import time
from typing import Callable, Optional, Protocol

import zmq

from . import codec
from .schema import Batch
from .spool import Spool

BATCH_TAG = b"SSB1"
ACK_TAG = b"SSA1"
ACK_STORED, ACK_DUPLICATE, ACK_REJECTED = 0, 1, 2
_ACK = struct.Struct(">QB")
_SEQ = struct.Struct(">Q")
MAX_BOOT_ID = 64

Secure = Optional[Callable[[zmq.Socket], None]]


class TransportError(RuntimeError):
    """The socket could not be set up (bad endpoint, address in use). Fatal at
    start-up: report it and exit; runtime send failures are counted instead."""


class ProtocolError(ValueError):
    """A message is not a stallscope batch or acknowledgement message; the caller counts
    it as rejected and goes on."""


def make_socket(kind: int, secure: Secure = None) -> zmq.Socket:
    """A new socket of ``kind`` from the process's context; ``secure(sock)`` runs first."""
    sock = zmq.Context.instance().socket(kind)
    if secure is not None:
        try:
            secure(sock)
        except Exception:
            sock.close(0)
            raise
    return sock


def read_boot_id(proc_root: str = "/proc") -> str:
    """The kernel's boot id (changes at every boot); "" when unreadable."""
    try:
        with open(f"{proc_root}/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:MAX_BOOT_ID]
    except OSError:
        return ""


def delivery_key(batch: Batch):
    """(boot_id, seq) from ``meta["delivery"]``, or (None, None) for a batch without one
    (stored, never deduplicated). Raises ProtocolError when it is present but malformed."""
    d = batch.meta.get("delivery")
    if d is None:
        return None, None
    if not isinstance(d, dict):
        raise ProtocolError("malformed batch: meta.delivery is not a map")
    boot, seq = d.get("boot_id"), d.get("seq")
    if not isinstance(boot, str) or len(boot) > MAX_BOOT_ID:
        raise ProtocolError("malformed batch: meta.delivery.boot_id missing or too long")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 63:
        raise ProtocolError("malformed batch: meta.delivery.seq missing or out of range")
    return boot, seq


def batch_message(seq: int, payload) -> list:
    return [BATCH_TAG, _SEQ.pack(seq), payload]


def parse_batch_message(frames) -> tuple:
    """(peer identity, seq, payload) from a ROUTER's frames; raises ProtocolError."""
    if len(frames) != 4 or bytes(frames[1]) != BATCH_TAG or len(frames[2]) != _SEQ.size:
        raise ProtocolError(f"not a stallscope batch message ({len(frames) - 1} frames; "
                            "an old PUSH tracer or another program?)")
    return bytes(frames[0]), _SEQ.unpack(bytes(frames[2]))[0], frames[3]


def pack_acks(acks) -> list:
    return [ACK_TAG, b"".join(_ACK.pack(s, st) for s, st in acks)]


def unpack_acks(frames) -> list:
    if len(frames) != 2 or bytes(frames[0]) != ACK_TAG or len(frames[1]) % _ACK.size:
        raise ProtocolError("not a stallscope acknowledgement")
    return list(_ACK.iter_unpack(bytes(frames[1])))


# ---------------------------------------------------------------- collector side
class Receiver:
    """ROUTER socket bound at ``endpoint``: yields raw messages (identity first; parse
    and decode separately so a malformed batch is counted and skipped, never fatal) and
    sends acknowledgements back to a peer."""

    def __init__(self, endpoint: str, hwm: int = 10000, secure: Secure = None):
        self.sock = make_socket(zmq.ROUTER, secure)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES + 1024)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)        # drop peers gone without a FIN
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.sock.bind(endpoint)
                break
            except zmq.ZMQError as e:
                # a collector restarted at once: its old socket may hold the port a moment longer
                if e.errno == zmq.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.sock.close(0)
                raise TransportError(f"cannot bind collector endpoint {endpoint!r}: {e}") from e
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.acks_unsent = 0            # acknowledgements a full or gone peer could not take

    def recv(self, timeout_ms: int = 200):
        """Frames of one message, or None on timeout."""
        if not self.poller.poll(timeout_ms):
            return None
        return self.sock.recv_multipart(copy=True)

    def recv_many(self, max_msgs: int = 256, timeout_ms: int = 200) -> list:
        """Up to max_msgs messages: waits for the first, then takes what is queued."""
        first = self.recv(timeout_ms)
        if first is None:
            return []
        out = [first]
        while len(out) < max_msgs:
            try:
                out.append(self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=True))
            except zmq.Again:
                break
        return out

    def ack(self, identity: bytes, acks: list):
        """Acknowledge [(seq, status)] to one peer, without blocking; a peer that is gone
        or not reading loses them (counted) and will resend."""
        try:
            self.sock.send_multipart([identity] + pack_acks(acks), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.acks_unsent += len(acks)

    def close(self):
        self.sock.close(linger=500)     # let the last acknowledgements out (else: resends, duplicates)


# ---------------------------------------------------------------- sender side
class Source(Protocol):
    """Where an AckedSender takes batches from; it keeps them until acknowledged."""

    def read_next(self, max_n: int, max_bytes: int) -> list: ...          # [(seq, payload)]
    def ack_through(self, seq: int) -> None: ...
    def sync(self, force: bool = False) -> None: ...


class _Entry:
    __slots__ = ("payload", "sent_at", "acked", "sends")

    def __init__(self, payload):
        self.payload = payload
        self.sent_at: float | None = None    # None: to be sent (first time or again)
        self.acked = False
        self.sends = 0


class AckedSender:
    """DEALER connected to a collector: sends a source's batches within a credit window
    and releases them from the source as they are acknowledged.

    Not thread-safe: one thread calls :meth:`pump` (and :meth:`close`). ``secure`` is
    called with the socket before it connects (CURVE client keys).
    """

    def __init__(self, endpoint: str, source: Source, window: int = 64, window_bytes: int = 32 << 20,
                 ack_timeout_s: float = 3.0, max_ack_timeout_s: float = 30.0, secure: Secure = None,
                 log=None):
        self.endpoint = endpoint
        self.source = source
        self.window, self.window_bytes = int(window), int(window_bytes)
        self.base_timeout_s, self.max_timeout_s = ack_timeout_s, max_ack_timeout_s
        self.log = log or (lambda m: None)
        self.sock = make_socket(zmq.DEALER, secure)
        for opt, val in ((zmq.LINGER, 0),
                         (zmq.IMMEDIATE, 1),         # queue only on a live connection: no stale floods
                         (zmq.SNDHWM, 2 * self.window + 16), (zmq.RCVHWM, 10000),
                         (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 2000),
                         (zmq.HEARTBEAT_IVL, 2000), (zmq.HEARTBEAT_TIMEOUT, 6000),
                         (zmq.MAXMSGSIZE, 1 << 20)):
            self.sock.setsockopt(opt, val)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise TransportError(f"cannot connect to collector endpoint {endpoint!r}: {e}") from e
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.inflight: collections.OrderedDict = collections.OrderedDict()
        self.inflight_bytes = 0
        self.timeout_s = ack_timeout_s
        self._last_ack = time.monotonic()
        self.no_peer = False            # the last send found no connected collector
        self._no_peer_since: float | None = None
        # no collector connected for a second and nothing sent awaits an answer (read by other threads)
        self.unreachable = False
        # counters
        self.sent = 0                   # first sends
        self.resent = 0
        self.acked = 0                  # acknowledged as stored or already stored
        self.duplicates = 0             # ... of which already stored
        self.rejected = 0               # refused by the collector (given up)
        self.timeouts = 0
        self.bad_acks = 0

    # ------------------------------------------------------------ the loop's step
    def pump(self, timeout_ms: int = 0):
        """Take acknowledgements (waiting up to ``timeout_ms`` for one), release what they
        cover, resend after a timeout, send new batches within the window, sync the source."""
        self._recv_acks(timeout_ms)
        self._release()
        self._check_timeout()
        self._send()
        waiting = any(e.sent_at is not None for e in self.inflight.values() if not e.acked)
        self.unreachable = (self._no_peer_since is not None and not waiting
                            and time.monotonic() - self._no_peer_since >= 1.0)
        self.source.sync()

    def _recv_acks(self, timeout_ms: int):
        if not self.poller.poll(timeout_ms):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                acks = unpack_acks(frames)
            except ProtocolError:
                self.bad_acks += 1
                continue
            for seq, status in acks:
                e = self.inflight.get(seq)
                if e is None or e.acked:
                    continue                    # an answer to a resend already answered
                e.acked = True
                self._last_ack = time.monotonic()
                self.timeout_s = self.base_timeout_s
                if status == ACK_REJECTED:
                    self.rejected += 1
                    if self.rejected == 1:
                        self.log(f"the collector at {self.endpoint} rejected batch {seq} (reason in its "
                                 "store); giving it up, counting further rejections")
                else:
                    self.acked += 1
                    self.duplicates += status == ACK_DUPLICATE

    def _release(self):
        last = None
        while self.inflight:
            seq, e = next(iter(self.inflight.items()))
            if not e.acked:
                break
            self.inflight.popitem(last=False)
            self.inflight_bytes -= len(e.payload)
            last = seq
        if last is not None:
            self.source.ack_through(last)

    def _check_timeout(self):
        oldest = next((e for e in self.inflight.values() if not e.acked and e.sent_at is not None), None)
        if oldest is None:
            return
        now = time.monotonic()
        if now - max(oldest.sent_at, self._last_ack) < self.timeout_s:
            return
        for e in self.inflight.values():
            if not e.acked:
                e.sent_at = None                # go back to the oldest unacknowledged
        self.timeouts += 1
        self.timeout_s = min(self.timeout_s * 2, self.max_timeout_s)

    def _send(self):
        for seq, e in self.inflight.items():
            if not e.acked and e.sent_at is None and not self._send_one(seq, e):
                return
        while len(self.inflight) < self.window and self.inflight_bytes < self.window_bytes:
            recs = self.source.read_next(self.window - len(self.inflight),
                                         self.window_bytes - self.inflight_bytes)
            if not recs:
                return
            blocked = False
            for seq, payload in recs:
                e = _Entry(payload)
                self.inflight[seq] = e
                self.inflight_bytes += len(payload)
                if not blocked:
                    blocked = not self._send_one(seq, e)
            if blocked:
                return

    def _send_one(self, seq: int, e: _Entry) -> bool:
        try:
            self.sock.send_multipart(batch_message(seq, e.payload), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not self.no_peer:
                self.no_peer, self._no_peer_since = True, time.monotonic()
            return False
        self.no_peer, self._no_peer_since = False, None
        if e.sends:
            self.resent += 1
        else:
            self.sent += 1
        e.sends += 1
        e.sent_at = time.monotonic()
        return True

    def close(self):
        self.sock.close(0)


# ---------------------------------------------------------------- the tracer's sink
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class StreamSink:
    """A sink (see sink.py) that spools every batch and delivers it to a collector,
    acknowledged, from a thread of its own.

    The agent's thread only encodes and appends to the spool (local write, no network);
    the delivery thread owns the socket and runs :meth:`AckedSender.pump`. A batch the
    spool cannot take (full, disk error) is dropped and counted; the counts ride in the
    next batch that gets through (``streamsink.dropped_*``) and are logged once per episode.
    Batches left unacknowledged at exit stay in the spool and go first at the next start.
    """

    name = "streamsink"         # the counters' prefix on the wire; stable across renames

    def __init__(self, endpoint: str, spool_dir: str, spool_max_bytes: int = 1 << 30,
                 secure: Secure = None, log=None, window: int = 64, ack_timeout_s: float = 3.0,
                 close_timeout_s: float = 3.0, fsync_ms: int = 200, boot_id: str | None = None):
        self.log = log or (lambda m: print(f"stallscope: {m}", file=sys.stderr, flush=True))
        self.endpoint = endpoint
        self.close_timeout_s = close_timeout_s
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.spool = Spool(spool_dir, spool_max_bytes, fsync_ms=fsync_ms, log=self.log)
        try:
            self.sender = AckedSender(endpoint, self.spool, window=window, ack_timeout_s=ack_timeout_s,
                                      secure=secure, log=self.log)
        except BaseException:
            self.spool.close()
            raise
        if self.spool.replayed:
            self.log(f"spool {spool_dir}: {self.spool.replayed} unacknowledged batches "
                     f"({_human(self.spool.pending_bytes())}) from an earlier run go first")
        self.dropped_batches = 0
        self.dropped_events = 0
        self._dropping = False
        self.pump_errors = 0
        self._last_pump_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stallscope-delivery", daemon=True)
        self._thread.start()

    def __call__(self, batch: Batch):
        seq = self.spool.next_seq
        meta = {**batch.meta, "delivery": {"boot_id": self.boot_id, "seq": seq}}
        payload = codec.encode(Batch(batch.node, batch.seq, batch.tables, batch.counters, batch.hist, meta))[0]
        if self.spool.append(seq, payload):
            if self._dropping:
                self._dropping = False
                self.log(f"spool has room again; {self.dropped_batches} batches "
                         f"({self.dropped_events} events) dropped so far")
            return
        self.dropped_batches += 1
        self.dropped_events += batch.n_events()
        if not self._dropping:
            self._dropping = True
            self.log(f"{self.spool.last_error}: dropping batches (counted in streamsink.dropped_*) "
                     f"until the collector at {self.endpoint} acknowledges more")

    def _run(self):
        while not self._stop.is_set():
            try:
                self.sender.pump(timeout_ms=50)
            except Exception as e:      # a failing step is counted; the thread goes on
                self.pump_errors += 1
                msg = f"{type(e).__name__}: {e}"
                if msg != self._last_pump_error:
                    self._last_pump_error = msg
                    self.log(f"delivery step failed (counted, continuing): {msg}")
                self._stop.wait(0.2)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every spooled batch to be acknowledged; gives up early
        when no collector is connected. True when nothing is left unacknowledged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.spool.pending_records():
                return True
            if self.sender.unreachable:
                return False
            time.sleep(0.02)
        return not self.spool.pending_records()

    def counters(self) -> dict:
        s, sp = self.sender, self.spool
        return {"sent": s.sent, "acked": s.acked, "duplicates": s.duplicates, "resent": s.resent,
                "rejected": s.rejected, "timeouts": s.timeouts, "spooled_batches": sp.appended,
                "spooled_bytes": sp.appended_bytes, "replayed": sp.replayed,
                "unacked_batches": sp.pending_records(), "unacked_bytes": sp.pending_bytes(),
                "dropped_batches": self.dropped_batches, "dropped_events": self.dropped_events,
                "spool_corrupt_records": sp.corrupt_records, "pump_errors": self.pump_errors}

    def summary(self) -> str:
        c = self.counters()
        return (f"delivery to {self.endpoint}: {c['sent']} batches sent, {c['acked']} acknowledged "
                f"({c['duplicates']} already stored), {c['resent']} resent, {c['rejected']} rejected; "
                f"spooled {c['spooled_batches']} ({_human(c['spooled_bytes'])}), "
                f"{c['unacked_batches']} left unacknowledged in the spool ({_human(c['unacked_bytes'])}); "
                f"{c['dropped_batches']} batches ({c['dropped_events']} events) dropped")

    def close(self):
        """Give the collector ``close_timeout_s`` to acknowledge the rest, then stop; what is
        left stays in the spool for the next run (idempotent)."""
        if self._thread is None:
            return
        self.flush(self.close_timeout_s)
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sender.close()
        self.spool.close()
