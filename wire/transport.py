"""ZeroMQ transport: the only module that imports zmq.

Tracers PUSH encoded batches; collectors PULL them (PUSH/PULL rather than
PUB/SUB, which silently drops what is sent before a subscriber joins). A
tracer never blocks on a slow or dead collector: batches queue up to the
high-water mark, and past it each batch that cannot be queued is counted as
dropped (``dropped_batches``/``dropped_events``), and those counts ride in the
next batch that does get through.
"""

from __future__ import annotations

import zmq

from . import codec
from .schema import Batch


class TransportError(RuntimeError):
    """The socket could not be set up (bad endpoint, address in use). Fatal at
    start-up: report it and exit; runtime send failures are counted instead."""


class Sender:
    def __init__(self, endpoint: str, hwm: int = 1000, linger_ms: int = 2000):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.setsockopt(zmq.IMMEDIATE, 0)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise TransportError(f"cannot connect to collector endpoint {endpoint!r}: {e}") from e
        self.endpoint = endpoint
        self.sent_batches = 0
        self.dropped_batches = 0
        self.dropped_events = 0

    def send(self, batch: Batch) -> bool:
        """Queue one batch without blocking; False (and counted) if the queue is full."""
        frames = codec.encode(batch)
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped_batches += 1
            self.dropped_events += batch.n_events()
            return False
        self.sent_batches += 1
        return True

    def send_raw(self, payload: bytes, n_events: int = 0) -> bool:
        """Queue an already-encoded payload (a rack collector forwarding upstream)."""
        try:
            self.sock.send(payload, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped_batches += 1
            self.dropped_events += n_events
            return False
        self.sent_batches += 1
        return True

    def close(self):
        self.sock.close()


class Receiver:
    """PULL socket bound at ``endpoint``; yields raw frames (decode separately so a
    malformed batch is counted and skipped, never fatal)."""

    def __init__(self, endpoint: str, hwm: int = 10000):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES + 1024)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise TransportError(f"cannot bind collector endpoint {endpoint!r}: {e}") from e
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

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

    def close(self):
        self.sock.close(0)


class StreamSink:
    """A sink (see sink.py) that streams batches to a collector; losses are counted."""

    name = "streamsink"         # the counters' prefix on the wire; stable across renames

    def __init__(self, endpoint: str):
        self.sender = Sender(endpoint)

    def __call__(self, batch: Batch):
        self.sender.send(batch)

    @property
    def dropped_batches(self):
        return self.sender.dropped_batches

    @property
    def dropped_events(self):
        return self.sender.dropped_events

    def close(self):
        self.sender.close()
