"""Sinks and callbacks that print to the terminal: stall events as they are traced,
verdicts as they are judged. The words themselves come from stallscope.analysis.text."""

from __future__ import annotations

import json
import sys

from stallscope.analysis.analyze import LiveAnalyzer
from stallscope.analysis.text import EVENT_HEADER, event_line, verdict_line
from stallscope.wire.schema import STALL_TABLES, Batch, rows


class EventPrinter:
    """A sink: live output in the style of BCC's tools, or one JSON object per line."""

    def __init__(self, as_json: bool = False, out=None, pid_filter: int = 0):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.pid_filter = pid_filter
        self.printed = 0
        if not as_json:
            print(EVENT_HEADER, file=self.out, flush=True)

    def __call__(self, batch: Batch):
        evs = []
        for kind in STALL_TABLES:
            t = batch.tables.get(kind)
            if t is None or not len(t["ts_ns"]):
                continue
            evs.extend(rows(kind, t, batch.node))
        evs.sort(key=lambda e: e["ts_ns"])
        for e in evs:
            if self.pid_filter and e["pid"] != self.pid_filter:
                continue
            self.printed += 1
            self.out.write(json.dumps(e, separators=(",", ":")) + "\n" if self.as_json else event_line(e) + "\n")
        if evs:
            self.out.flush()


class VerdictPrinter:
    """Prints a list of verdicts (:class:`Verdict`), as lines or JSON; counts them."""

    def __init__(self, as_json: bool = False, out=None):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.count = 0

    def __call__(self, verdicts: list):
        for v in verdicts:
            self.count += 1
            self.out.write(json.dumps(v.to_json(), separators=(",", ":")) + "\n" if self.as_json
                           else verdict_line(v) + "\n")
        if verdicts:
            self.out.flush()


class LiveVerdicts:
    """Batches in, verdicts out: a live analysis window feeding a printer. Given to a
    collector (``on_batches``) or an embedded collector; a batch marked final
    flushes the intervals still open."""

    def __init__(self, printer: VerdictPrinter, **params):
        self.live = LiveAnalyzer(**params)
        self.printer = printer

    def __call__(self, batches: list):
        self.printer(self.live.add(batches))
        if any(b.meta.get("final") for b in batches):
            self.flush()

    def flush(self):
        self.printer(self.live.flush())
