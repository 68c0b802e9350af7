"""Live verdicts: an embedded collector sink for the tracer, and the verdict line printer.

`stallscope watch` (and `stallscope demo`) run the tracer with this sink instead
of a separate collector: batches are committed to the local store exactly as a
collector would, and each finished GPU idle interval is judged and printed
within a couple of seconds of its end.
"""

from __future__ import annotations

import json
import sys

from tracer import codec

from .analyze import LiveAnalyzer, describe
from .store import Store


def verdict_line(v: dict) -> str:
    c = v.get("culprit")
    if c is not None:
        what = describe(c)
        if v.get("remote"):
            what = f"[remote: {v.get('culprit_node')}] {what}"
    elif v.get("contributors"):
        what = f"unexplained (partly: {describe(v['contributors'][0])})"
    elif not v.get("owners"):
        what = "unexplained (no process on the GPU)"
    else:
        what = "unexplained: nothing traced explains it"
    return (f"VERDICT {v['node']} gpu{v['gpu']} idle {v['duration_ns'] / 1e6:.0f}ms "
            f"explained {v['explained_fraction'] * 100:.0f}% (+-{v['resolution_ns'] / 1e6:.0f}ms): {what}")


class VerdictPrinter:
    def __init__(self, as_json: bool = False, out=None):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.count = 0

    def __call__(self, verdicts: list):
        for v in verdicts:
            self.count += 1
            if self.as_json:
                self.out.write(json.dumps(v, separators=(",", ":")) + "\n")
            else:
                self.out.write(verdict_line(v) + "\n")
        if verdicts:
            self.out.flush()


class EmbeddedCollector:
    """A tracer sink: store each batch (as a collector would) and print live verdicts."""

    def __init__(self, store_path: str | None, on_verdicts, **params):
        self.store = Store(store_path) if store_path else None
        self.live = LiveAnalyzer(**params)
        self.on_verdicts = on_verdicts
        self.dropped_batches = 0
        self.dropped_events = 0

    def __call__(self, batch):
        if self.store is not None:
            try:
                self.store.add([(batch, codec.encode(batch)[0])])
            except Exception as e:  # a full disk costs the stored copy, not the verdicts
                self.dropped_batches += 1
                self.dropped_events += batch.n_events()
                if self.dropped_batches == 1:
                    print(f"stallscope: storing batches failed ({e}); counting drops", file=sys.stderr)
        self.on_verdicts(self.live.add([batch]))
        if batch.meta.get("final"):
            self.on_verdicts(self.live.flush())

    def close(self):
        if self.store is not None:
            self.store.close()
