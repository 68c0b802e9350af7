"""Embedded store: SQLite in WAL mode, one row per received batch.

Why SQLite: it ships with Python, survives crashes and restarts (a batch is
"accepted" once its transaction commits), takes ~100k small inserts/s in one
transaction, and a person can open the file with the sqlite3 shell. Batches
are kept as the validated msgpack payload (already compact and columnar);
analysis decodes them into numpy tables on read.
"""

from __future__ import annotations

import os
import sqlite3
import time

from stallscope.wire import codec
from stallscope.wire.recording import read_recording, sniff

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    n_events INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_node ON batches(node, seq);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY,
    received_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(d, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open store {path}: {e}") from e

    def add(self, items: list):
        """Commit [(batch, payload bytes)] in one transaction."""
        now = time.time_ns()
        with self.db:
            self.db.executemany(
                "INSERT INTO batches(node, seq, received_ns, n_events, payload) VALUES (?,?,?,?,?)",
                [(b.node, b.seq, now, b.n_events(), p) for b, p in items])

    def reject(self, reasons: list):
        now = time.time_ns()
        with self.db:
            self.db.executemany("INSERT INTO rejects(received_ns, reason) VALUES (?,?)",
                                [(now, r[:500]) for r in reasons])

    def batches(self, node: str | None = None, since_id: int = 0):
        """Yield (id, Batch) in arrival order."""
        q = "SELECT id, payload FROM batches WHERE id > ?"
        args: list = [since_id]
        if node:
            q += " AND node = ?"
            args.append(node)
        q += " ORDER BY id"
        for rid, payload in self.db.execute(q, args):
            yield rid, codec.decode([payload])

    def stats(self) -> dict:
        n, ev = self.db.execute("SELECT count(*), coalesce(sum(n_events),0) FROM batches").fetchone()
        rej = self.db.execute("SELECT count(*) FROM rejects").fetchone()[0]
        nodes = [r[0] for r in self.db.execute("SELECT DISTINCT node FROM batches ORDER BY node")]
        return {"batches": n, "events": ev, "rejected": rej, "nodes": nodes}

    def close(self):
        self.db.close()


def load_batches(source: str, warn=None) -> list:
    """Batches from a store (.db) or a recording file, whichever ``source`` is;
    damaged parts of a recording are skipped and reported through ``warn``."""
    if sniff(source) == "store":
        st = Store(source)
        try:
            return [b for _i, b in st.batches()]
        finally:
            st.close()
    errors = []
    out = list(read_recording(source, on_error=errors.append))
    if errors and not out:
        raise StoreError(errors[0])
    for e in errors:
        if warn:
            warn(e)
    return out
