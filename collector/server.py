"""The collector loop: receive frames, validate, store, forward upstream.

A malformed batch is counted, its reason stored, and skipped; it never stops
the loop. With ``upstream`` set (rack -> root), every accepted payload is also
pushed to the root collector unchanged.
"""

from __future__ import annotations

import sys
import time

from stallscope.wire import codec
from stallscope.wire.transport import Receiver, Sender

from .store import Store


class Collector:
    def __init__(self, bind: str, store_path: str, upstream: str | None = None, log=None,
                 on_batches=None):
        self.log = log or (lambda m: print(f"stallscope collect: {m}", file=sys.stderr, flush=True))
        self.store = Store(store_path)
        self.rx = Receiver(bind)
        self.endpoint = self.rx.endpoint
        self.up = Sender(upstream) if upstream else None
        self.accepted = 0
        self.events = 0
        self.rejected = 0
        self.on_batches = on_batches
        self._last_reject = ""

    def step(self, timeout_ms: int = 200) -> int:
        msgs = self.rx.recv_many(timeout_ms=timeout_ms)
        if not msgs:
            return 0
        good, bad = [], []
        for frames in msgs:
            try:
                b = codec.decode(frames)
                good.append((b, bytes(frames[0])))
            except codec.CodecError as e:
                bad.append(str(e))
        if good:
            self.store.add(good)
            self.accepted += len(good)
            self.events += sum(b.n_events() for b, _ in good)
            if self.up is not None:
                for b, p in good:
                    self.up.send_raw(p, b.n_events())  # validated; forwarded unchanged
            if self.on_batches:
                self.on_batches([b for b, _ in good])
        if bad:
            self.rejected += len(bad)
            self.store.reject(bad)
            if bad[-1] != self._last_reject:
                self._last_reject = bad[-1]
                self.log(f"rejected a batch ({self.rejected} so far): {bad[-1]}")
        return len(msgs)

    def run(self, duration: float | None = None, stop=lambda: False):
        end = None if duration is None else time.monotonic() + duration
        while not stop() and (end is None or time.monotonic() < end):
            self.step()

    def close(self):
        self.rx.close()
        if self.up:
            self.up.close()
        self.store.close()
