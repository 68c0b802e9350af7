"""An embedded collector: a tracer sink that stores each batch exactly as a
collector would, for `stallscope watch` and `stallscope demo` (no network hop)."""

from __future__ import annotations

import sys

from stallscope.wire import codec

from .store import Store


class EmbeddedCollector:
    """Store each batch (when a store path is given) and hand it to ``on_batches``
    (live analysis, wired by the CLI). A failing store costs the stored copy, counted
    as dropped, never the live verdicts."""

    name = "embeddedcollector"   # the counters' prefix on the wire; stable across renames

    def __init__(self, store_path: str | None, on_batches=None):
        self.store = Store(store_path) if store_path else None
        self.on_batches = on_batches
        self.dropped_batches = 0
        self.dropped_events = 0

    def __call__(self, batch):
        if self.store is not None:
            try:
                self.store.add([(batch, codec.encode(batch)[0])])
            except Exception as e:
                self.dropped_batches += 1
                self.dropped_events += batch.n_events()
                if self.dropped_batches == 1:
                    print(f"stallscope: storing batches failed ({e}); counting drops", file=sys.stderr)
        if self.on_batches is not None:
            self.on_batches([batch])

    def close(self):
        if self.store is not None:
            self.store.close()
