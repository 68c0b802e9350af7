"""The collector loop: receive batches, validate, commit, acknowledge, forward upstream.

Each step takes what the ROUTER socket has queued, decodes it, commits the good batches
(and the reasons of the bad ones) in one SQLite transaction, and only then acknowledges
every batch of that step to its sender: stored, duplicate (already stored: the sender
resent it after a lost acknowledgement) or rejected. A malformed batch is counted, its
reason stored, and skipped; it never stops the loop, and neither does a failing commit
(counted and logged; nothing is acknowledged, so the senders resend).

With ``upstream`` set (rack -> root), the stored batches are forwarded unchanged by the
same acknowledged sender the tracers use, reading from this store (``ForwardSource``);
the root recognises duplicates by the identity inside each payload.
"""

from __future__ import annotations

import sqlite3
import sys
import time

from stallscope.wire import codec
from stallscope.wire.transport import (
    ACK_DUPLICATE,
    ACK_REJECTED,
    ACK_STORED,
    AckedSender,
    ProtocolError,
    Receiver,
    Secure,
    delivery_key,
    parse_batch_message,
)

from .store import ForwardSource, Store


class Collector:
    """``secure``/``upstream_secure``: called with the receiving socket (before bind) and
    the upstream socket (before connect), for the transport's security layer."""

    def __init__(self, bind: str, store_path: str, upstream: str | None = None, log=None,
                 on_batches=None, secure: Secure = None, upstream_secure: Secure = None):
        self.log = log or (lambda m: print(f"stallscope collect: {m}", file=sys.stderr, flush=True))
        self.store = Store(store_path)
        try:
            self.rx = Receiver(bind, secure=secure)
        except BaseException:
            self.store.close()
            raise
        self.endpoint = self.rx.endpoint
        self.forward = ForwardSource(self.store, upstream) if upstream else None
        self.up = None
        if upstream:
            try:
                self.up = AckedSender(upstream, self.forward, secure=upstream_secure, log=self.log)
            except BaseException:
                self.rx.close()
                self.store.close()
                raise
        self.accepted = 0           # batches stored now
        self.events = 0             # ... and their events
        self.duplicates = 0         # batches already stored (resent), acknowledged again
        self.rejected = 0           # malformed, reason stored
        self.store_errors = 0       # commits that failed (nothing acknowledged)
        self.on_batches = on_batches
        self._last_reject = ""
        self._last_store_error = ""

    def step(self, timeout_ms: int = 200) -> int:
        if self.up is not None and self.up.inflight:
            timeout_ms = min(timeout_ms, 20)    # answers from upstream are waiting too
        msgs = self.rx.recv_many(timeout_ms=timeout_ms)
        if msgs:
            self._ingest(msgs)
        if self.up is not None:
            try:
                self.up.pump(0)
            except sqlite3.Error as e:
                self._store_failed(e)
        return len(msgs)

    def _ingest(self, msgs: list):
        good, where, bad = [], [], []
        acks: dict = {}
        for frames in msgs:
            try:
                peer, seq, payload = parse_batch_message(frames)
            except ProtocolError as e:
                bad.append(str(e))          # no sequence to answer: count and store the reason
                continue
            try:
                b = codec.decode([payload])
                delivery_key(b)
            except (codec.CodecError, ProtocolError) as e:
                bad.append(str(e))
                acks.setdefault(peer, []).append((seq, ACK_REJECTED))
                continue
            good.append((b, bytes(payload)))
            where.append((peer, seq))
        try:
            new = self.store.add(good, bad)
        except sqlite3.Error as e:      # disk full, I/O error: the senders will resend
            self._store_failed(e)
            return
        fresh = []
        for (b, _p), (peer, seq), is_new in zip(good, where, new):
            acks.setdefault(peer, []).append((seq, ACK_STORED if is_new else ACK_DUPLICATE))
            if is_new:
                fresh.append(b)
        for peer, a in acks.items():       # after the commit: the durability point
            self.rx.ack(peer, a)
        self.accepted += len(fresh)
        self.duplicates += len(good) - len(fresh)
        self.events += sum(b.n_events() for b in fresh)
        if bad:
            self.rejected += len(bad)
            if bad[-1] != self._last_reject:
                self._last_reject = bad[-1]
                self.log(f"rejected a batch ({self.rejected} so far): {bad[-1]}")
        if fresh and self.on_batches:
            self.on_batches(fresh)

    def _store_failed(self, e: Exception):
        self.store_errors += 1
        msg = f"{type(e).__name__}: {e}"
        if msg != self._last_store_error:
            self._last_store_error = msg
            self.log(f"store commit failed (counted; senders will resend): {msg}")

    def counters(self) -> dict:
        out = {"accepted": self.accepted, "events": self.events, "duplicates": self.duplicates,
               "rejected": self.rejected, "store_errors": self.store_errors,
               "acks_unsent": self.rx.acks_unsent}
        if self.up is not None and self.forward is not None:
            out.update({"upstream_sent": self.up.sent, "upstream_acked": self.up.acked,
                        "upstream_resent": self.up.resent, "upstream_rejected": self.up.rejected,
                        "upstream_pending": self.forward.pending()})
        return out

    def summary(self) -> str:
        c = self.counters()
        line = (f"{c['accepted']} batches ({c['events']} events) accepted, {c['duplicates']} duplicates, "
                f"{c['rejected']} rejected")
        if c["store_errors"]:
            line += f", {c['store_errors']} failed commits"
        if self.up is not None:
            line += (f"; upstream {self.up.endpoint}: {c['upstream_sent']} sent, {c['upstream_acked']} "
                     f"acknowledged, {c['upstream_resent']} resent, {c['upstream_pending']} pending")
        return line

    def run(self, duration: float | None = None, stop=lambda: False):
        end = None if duration is None else time.monotonic() + duration
        while not stop() and (end is None or time.monotonic() < end):
            self.step()

    def close(self):
        self.rx.close()
        if self.up is not None:
            self.up.close()
            try:
                self.forward.sync(force=True)
            except sqlite3.Error as e:
                self._store_failed(e)
        self.store.close()
