"""The collector's lake writer: what the store holds goes to a Parquet lake (``wire/lake.py``),
flushed every ``flush_s`` or sooner when one node's pending batches pass ``node_bytes``.

Fed from the store, as ``ForwardSource`` feeds an upstream: the store is the spool, so a lake
that is slow, full or unreachable loses nothing the store kept; it only falls behind. Failures
are counted (``lake.errors``), logged once per episode and retried with backoff (1 s doubling to
60 s) on a thread of its own, so ingest never waits for the lake.

The cursor lives in the store (tables ``lake_state`` and ``lake_nodes``, keyed by lake URL),
not in a file beside it: it names row ids of that store, so it must live and die with it (a
state file would outlive a deleted or replaced store and skip the new store's first rows), and
it is updated in the store's own WAL transactions. A flush first records its *intent* (the
last row id it will cover), then writes windows of ``window_bytes`` of payloads from the floor,
one segment per node and date, advancing ``lake_nodes.done_id`` per node and the floor per
window. After a crash the same windows are written again from the recorded floor and intent:
the same batches in the same groups, so the same segment names, and the files are replaced
rather than duplicated; the restart log says how many batches that took.

Verdicts (from the live analysis, ``observe_verdicts``) are not in the store: they are
buffered and written at each flush; the few seconds' worth buffered at a crash are lost
(``stallscope report --lake`` recomputes every verdict from the batches).
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time

from stallscope.wire import codec, lake
from stallscope.wire.schema import table_len

SCHEMA = """
CREATE TABLE IF NOT EXISTS lake_state (
    lake TEXT PRIMARY KEY,
    floor_id INTEGER NOT NULL,      -- every batch with id <= floor_id is in the lake
    intent_id INTEGER NOT NULL      -- the flush in progress covers ids up to this one
);
CREATE TABLE IF NOT EXISTS lake_nodes (
    lake TEXT NOT NULL,
    node TEXT NOT NULL,
    done_id INTEGER NOT NULL,       -- ... and this node's batches with id <= done_id
    PRIMARY KEY (lake, node)
);
"""
MAX_VERDICTS = 200_000          # buffered while the lake is down; the oldest go first (counted)
MAX_BACKOFF_S = 60.0


class LakeWriter:
    """``step()`` does one round (scan the store, flush when due); ``start()`` runs it on a
    thread every ``poll_s``; ``close()`` stops the thread and flushes what is left.
    Raises :class:`stallscope.wire.lake.LakeError` at construction for a URL no installed
    filesystem serves, ``sqlite3.Error`` for a store it cannot open."""

    def __init__(self, store_path: str, url: str, flush_s: float = 60.0, storage_options: dict | None = None,
                 log=None, poll_s: float = 1.0, window_bytes: int = 64 << 20, node_bytes: int = 32 << 20,
                 clock=time.monotonic):
        self.log = log or (lambda m: print(f"stallscope collect: {m}", file=sys.stderr, flush=True))
        self.url, self.storage_options = url, storage_options
        fs, root = lake.open_fs(url, storage_options)
        self.key = fs.unstrip_protocol(root)
        self.flush_s, self.poll_s = flush_s, poll_s
        self.window_bytes, self.node_bytes = window_bytes, node_bytes
        self.clock = clock
        self.db = sqlite3.connect(store_path, timeout=30, check_same_thread=False)
        try:
            with self.db:
                self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT floor_id, intent_id FROM lake_state WHERE lake = ?",
                                  (self.key,)).fetchone()
            self.new_lake = row is None
            if row is None:
                with self.db:
                    self.db.execute("INSERT INTO lake_state(lake, floor_id, intent_id) VALUES (?, 0, 0)",
                                    (self.key,))
                row = (0, 0)
            self.floor, self.intent = int(row[0]), int(row[1])
            self.done = {n: int(d) for n, d in self.db.execute(
                "SELECT node, done_id FROM lake_nodes WHERE lake = ?", (self.key,))}
            self.start_max = self.db.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0]
        except BaseException:
            self.db.close()
            raise
        # what is in the store and not yet in the lake, by node (bytes of payload), from a scan
        self._scanned = self.floor
        self._pending_bytes: dict = {}
        self.pending_batches = 0
        self._backlog = [0, 0]          # batches, rows written from before this start
        self._backlog_told = self.start_max <= self.floor
        self.batches_written = self.rows_written = self.files_written = 0
        self.verdicts_written = self.verdicts_dropped = 0
        self.undecodable = 0
        self.errors = 0
        self._failing_since = None      # monotonic time of the first failure of this episode
        self._episode_errors = 0
        self._backoff = 1.0
        self._next_try = 0.0
        self._last_flush = clock()
        self._verdicts: list = []
        self._vlock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None             # the stallscope-lake thread, once started

    # ------------------------------------------------------------ live verdicts
    def observe_batches(self, batches) -> None:
        """(An observer of LiveVerdicts: batches come from the store instead.)"""

    def observe_verdicts(self, verdicts) -> None:
        """Buffer verdicts (``Verdict`` objects or their JSON dicts) for the next flush."""
        if not verdicts:
            return
        rows = []
        for v in verdicts:
            d = v if isinstance(v, dict) else v.to_json()
            if not isinstance(v, dict) and "lost_ns" not in d:
                d = {**d, "lost_ns": int(v.lost_ns)}
            rows.append(d)
        with self._vlock:
            self._verdicts.extend(rows)
            over = len(self._verdicts) - MAX_VERDICTS
            if over > 0:
                del self._verdicts[:over]
                self.verdicts_dropped += over

    # ------------------------------------------------------------ the loop
    def start(self) -> LakeWriter:
        t = threading.Thread(target=self._run, name="stallscope-lake", daemon=True)
        t.start()
        self._thread = t
        return self

    def _run(self):
        while True:
            try:
                self.step()
            except Exception as e:      # a bug or a surprise: counted and logged, the loop goes on
                self._failed(e, self.clock())
            if self._stop.wait(self.poll_s):
                return

    def step(self) -> bool:
        """Scan the store and flush when due (interval, a node's bound, a backlog or an
        unfinished flush); returns True when a flush ran and succeeded."""
        now = self.clock()
        try:
            self._scan()            # incremental: keeps lake.pending_batches current, even in backoff
        except sqlite3.Error as e:
            if self._failing_since is None or now >= self._next_try:
                self._failed(e, now)
            return False
        if self._failing_since is not None and now < self._next_try:
            return False
        with self._vlock:
            n_verdicts = len(self._verdicts)
        due = (now - self._last_flush >= self.flush_s
               or self.intent > self.floor
               or not self._backlog_told
               or self._failing_since is not None
               or any(b >= self.node_bytes for b in self._pending_bytes.values())
               or n_verdicts >= MAX_VERDICTS // 4)
        if not due or (not self.pending_batches and not n_verdicts and self.intent <= self.floor):
            if due:
                self._last_flush = now
            return False
        return self.flush()

    def flush(self) -> bool:
        """Write everything pending now (batches, then verdicts); False when the lake failed
        (counted, logged once per episode, retried after the backoff)."""
        now = self.clock()
        try:
            self._flush_batches()
            self._flush_verdicts()
        except Exception as e:      # any backend's error (OSError, botocore, ...): never fatal
            self._failed(e, now)
            return False
        self._last_flush = now
        if self._failing_since is not None:
            self.log(f"lake: writing to {self.url} again after {self._episode_errors} failed attempts "
                     f"over {now - self._failing_since:.0f} s; nothing lost (the store kept it)")
            self._failing_since = None
            self._episode_errors = 0
        self._backoff = 1.0
        return True

    def _failed(self, e: Exception, now: float):
        self.errors += 1
        self._episode_errors += 1
        if self._failing_since is None:
            self._failing_since = now
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self.log(f"lake: writing to {self.url} failed (counted in lake.errors; retrying with "
                     f"backoff; ingest goes on, the store keeps every batch): {msg}")
        self._next_try = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    # ------------------------------------------------------------ batches
    def _scan(self):
        for _rid, node, size in self._rows("SELECT id, node, length(payload) FROM batches WHERE id > ? ORDER BY id",
                                           (self._scanned,)):
            self._scanned = _rid
            if _rid <= self.done.get(node, 0):
                continue
            self._pending_bytes[node] = self._pending_bytes.get(node, 0) + size
            self.pending_batches += 1

    def _rows(self, q: str, args: tuple):
        cur = self.db.execute(q, args)
        try:
            while True:
                chunk = cur.fetchmany(1024)
                if not chunk:
                    return
                yield from chunk
        finally:
            cur.close()

    def _flush_batches(self):
        replay = self.intent > self.floor      # a flush a crash or a failure cut short: same windows first
        self._cover()
        if replay:
            self._cover()                       # ... then what came after it
        self._rescan()
        if not self._backlog_told and self.floor >= self.start_max:
            self._backlog_told = True
            n, rows = self._backlog
            when = "already in the store (a new lake)" if self.new_lake else "from before the restart"
            self.log(f"lake: {n} batches ({rows} rows) {when} written to {self.url}")

    def _cover(self):
        """Write the rows up to the recorded intent, or record a new one (the newest row) and
        write up to it, window by window."""
        if self.intent <= self.floor:
            top = self.db.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0]
            if top <= self.floor:
                return
            with self.db:
                self.db.execute("UPDATE lake_state SET intent_id = ? WHERE lake = ?", (top, self.key))
            self.intent = top
        while self.floor < self.intent:
            groups: dict = {}
            size, end = 0, self.floor
            for rid, node, payload in self._rows(
                    "SELECT id, node, payload FROM batches WHERE id > ? AND id <= ? ORDER BY id",
                    (self.floor, self.intent)):
                end = rid
                size += len(payload)        # skipped rows count too: windows are the same on a rerun
                if rid > self.done.get(node, 0):
                    groups.setdefault(node, []).append((rid, payload))
                if size >= self.window_bytes:
                    break
            if end == self.floor:           # rows gone (the store was cut short): nothing to cover
                end = self.intent
            for node, items in groups.items():
                self._write_node(node, items)
            with self.db:
                self.db.execute("UPDATE lake_state SET floor_id = ? WHERE lake = ?", (end, self.key))
                self.db.execute("DELETE FROM lake_nodes WHERE lake = ? AND done_id <= ?", (self.key, end))
            self.floor = end
            self.done = {n: d for n, d in self.done.items() if d > end}

    def _write_node(self, node: str, items: list):
        batches, old, n_rows = [], [0, 0], 0
        for rid, payload in items:
            try:
                b = codec.decode([payload])
            except codec.CodecError as e:       # the store validated it once; count, do not stall
                self.undecodable += 1
                self.log(f"lake: store row {rid} of node {node!r} does not decode, skipped: {e}")
                continue
            rows = sum(table_len(t) for t in b.tables.values())
            batches.append(b)
            n_rows += rows
            if rid <= self.start_max:
                old[0] += 1
                old[1] += rows
        files = lake.write_batches(self.url, node, batches, self.storage_options) if batches else []
        last = items[-1][0]
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO lake_nodes(lake, node, done_id) VALUES (?, ?, ?)",
                            (self.key, node, last))
        self.done[node] = last
        self.batches_written += len(batches)
        self.rows_written += n_rows
        self.files_written += len(files)
        self._backlog[0] += old[0]
        self._backlog[1] += old[1]

    def _rescan(self):
        self._scanned = self.floor
        self._pending_bytes = {}
        self.pending_batches = 0
        self._scan()

    # ------------------------------------------------------------ verdicts
    def _flush_verdicts(self):
        with self._vlock:
            todo = list(self._verdicts)
        if not todo:
            return
        by_node: dict = {}
        for v in todo:
            by_node.setdefault(str(v.get("node", "")), []).append(v)
        written = set()
        try:
            for node, vs in by_node.items():
                files = lake.write_verdicts(self.url, node, vs, self.storage_options)
                self.verdicts_written += len(vs)
                self.files_written += len(files)
                written.update(id(v) for v in vs)
        finally:
            if written:
                with self._vlock:
                    self._verdicts = [v for v in self._verdicts if id(v) not in written]

    # ------------------------------------------------------------ reporting
    def counters(self) -> dict:
        with self._vlock:
            nv = len(self._verdicts)
        return {"lake.errors": self.errors, "lake.pending_batches": self.pending_batches,
                "lake.batches_written": self.batches_written, "lake.rows_written": self.rows_written,
                "lake.files_written": self.files_written, "lake.verdicts_written": self.verdicts_written,
                "lake.verdicts_pending": nv, "lake.verdicts_dropped": self.verdicts_dropped,
                "lake.undecodable": self.undecodable}

    def summary(self) -> str:
        c = self.counters()
        line = (f"lake {self.url}: {c['lake.batches_written']} batches ({c['lake.rows_written']} rows) and "
                f"{c['lake.verdicts_written']} verdicts written, {c['lake.pending_batches']} batches pending")
        if c["lake.errors"]:
            line += f", {c['lake.errors']} failed writes"
        if c["lake.verdicts_pending"] or c["lake.verdicts_dropped"]:
            line += f", {c['lake.verdicts_pending']} verdicts unwritten, {c['lake.verdicts_dropped']} dropped"
        return line

    def close(self, final_flush: bool = True):
        """Stop the thread and write what is pending (one attempt: what fails stays in the store
        for the next start; unwritten verdicts are counted in the summary)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():     # a backend hanging on a write: leave it to the next start
                self.log(f"lake: still writing to {self.url} after 60 s at exit; what is pending "
                         "goes at the next start (the store keeps it)")
                return
            self._thread = None
        if final_flush:
            try:
                self._scan()
            except sqlite3.Error:
                pass
            with self._vlock:
                n_verdicts = len(self._verdicts)
            if self.pending_batches or n_verdicts or self.intent > self.floor:
                self.flush()
        self.db.close()
