"""Embedded store: SQLite in WAL mode, one row per received batch.

Why SQLite: it ships with Python, survives crashes and restarts (a batch is
"accepted" once its transaction commits, and only then acknowledged to its sender),
takes ~100k small inserts/s in one transaction, and a person can open the file with
the sqlite3 shell. Batches are kept as the validated msgpack payload (already compact
and columnar); analysis decodes them into numpy tables on read.

Exactly once: a batch that carries a delivery identity (``meta.delivery``: boot id and
sequence, see ``wire/transport.py``) is inserted with ``INSERT OR IGNORE`` under a
UNIQUE index on (node, boot_id, dseq), so a batch resent after a lost acknowledgement is
recognised and not stored twice. ``synchronous=FULL``: a commit is on disk before it is
acknowledged, power cut included. Stores written before these columns existed are
migrated in place on open (their old rows keep NULL identities and are never merged).
"""

from __future__ import annotations

import os
import sqlite3
import time

from stallscope.wire import codec
from stallscope.wire.recording import read_recording, sniff
from stallscope.wire.transport import delivery_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    n_events INTEGER NOT NULL,
    payload BLOB NOT NULL,
    boot_id TEXT,
    dseq INTEGER
);
CREATE INDEX IF NOT EXISTS batches_node ON batches(node, seq);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY,
    received_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forwarded (
    upstream TEXT PRIMARY KEY,
    acked_id INTEGER NOT NULL
);
"""
# after the migration: old stores get the columns first
DELIVERY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS batches_delivery ON batches(node, boot_id, dseq)"
_INSERT = ("INSERT OR IGNORE INTO batches(node, seq, received_ns, n_events, payload, boot_id, dseq) "
           "VALUES (?,?,?,?,?,?,?)")


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        self.readonly = False
        try:
            os.makedirs(d, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open store {path}: {e}") from e

    def _migrate(self):
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(batches)")}
        try:
            with self.db:
                for col, typ in (("boot_id", "TEXT"), ("dseq", "INTEGER")):
                    if col not in cols:
                        self.db.execute(f"ALTER TABLE batches ADD COLUMN {col} {typ}")
                self.db.execute(DELIVERY_INDEX)
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e):
                raise
            self.readonly = True        # reading an old store we may not write: fine

    def add(self, items: list, rejects: list = ()) -> list:
        """Commit [(batch, payload bytes)] (and reject reasons) in one transaction;
        returns, per item, True if stored now, False if it was already stored."""
        now = time.time_ns()
        out = []
        with self.db:
            cur = self.db.cursor()
            for b, p in items:
                boot, dseq = delivery_key(b)
                cur.execute(_INSERT, (b.node, b.seq, now, b.n_events(), p, boot, dseq))
                out.append(cur.rowcount == 1)
            if rejects:
                cur.executemany("INSERT INTO rejects(received_ns, reason) VALUES (?,?)",
                                [(now, r[:500]) for r in rejects])
        return out

    def reject(self, reasons: list):
        self.add([], reasons)

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


class ForwardSource:
    """The store as the source of a rack collector's upstream sender
    (``transport.AckedSender``): batches in arrival order, sequence = row id; the
    acknowledged cursor is kept per upstream in the ``forwarded`` table, so a restarted
    rack collector resumes where the root last acknowledged. A new upstream starts with
    the batches stored from then on."""

    def __init__(self, store: Store, upstream: str, state_ms: int = 500):
        self.store, self.upstream = store, upstream
        db = store.db
        row = db.execute("SELECT acked_id FROM forwarded WHERE upstream = ?", (upstream,)).fetchone()
        if row is None:
            start = db.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0]
            with db:
                db.execute("INSERT INTO forwarded(upstream, acked_id) VALUES (?, ?)", (upstream, start))
            row = (start,)
        self.acked_id = self.read_id = int(row[0])
        self._saved = self.acked_id
        self.state_s = state_ms / 1000
        self._last_save = time.monotonic()

    def read_next(self, max_n: int, max_bytes: int) -> list:
        out, total = [], 0
        for rid, payload in self.store.db.execute(
                "SELECT id, payload FROM batches WHERE id > ? ORDER BY id LIMIT ?", (self.read_id, max_n)):
            if out and total + len(payload) > max_bytes:
                break
            out.append((rid, payload))
            total += len(payload)
            self.read_id = rid
        return out

    def ack_through(self, seq: int):
        self.acked_id = max(self.acked_id, seq)

    def pending(self) -> int:
        return self.store.db.execute("SELECT count(*) FROM batches WHERE id > ?", (self.acked_id,)).fetchone()[0]

    def sync(self, force: bool = False):
        now = time.monotonic()
        if self.acked_id != self._saved and (force or now - self._last_save >= self.state_s):
            with self.store.db:
                self.store.db.execute("UPDATE forwarded SET acked_id = ? WHERE upstream = ?",
                                      (self.acked_id, self.upstream))
            self._saved, self._last_save = self.acked_id, now


def load_batches(source: str, warn=None, progress=None) -> list:
    """Batches from a store (.db) or a recording file, whichever ``source`` is;
    damaged parts of a recording are skipped and reported through ``warn``.
    ``progress(decoded, total)`` follows each batch (total None for a recording)."""
    tick = progress or (lambda _n, _total: None)
    if sniff(source) == "store":
        st = Store(source)
        try:
            total = st.db.execute("SELECT count(*) FROM batches").fetchone()[0]
            out = []
            for _i, b in st.batches():
                out.append(b)
                tick(len(out), total)
            return out
        finally:
            st.close()
    errors = []
    out = []
    for b in read_recording(source, on_error=errors.append):
        out.append(b)
        tick(len(out), None)
    if errors and not out:
        raise StoreError(errors[0])
    for e in errors:
        if warn:
            warn(e)
    return out
