"""The tracer's on-disk spool: every batch is written here before it is sent, and stays
until the collector has acknowledged it (committed it to its store).

Layout of a spool directory::

    lock                         flock(2)ed by the tracer that owns the spool (its pid inside)
    state.json                   {"acked_through": seq, "next_seq": seq}: replaced by rename
    seg-00000000000000001234.spool   append-only segments, named by their first sequence

A segment is a run of records ``<u32 length><u32 crc32><u64 seq><payload>`` (little endian);
the CRC covers length, seq and payload, so a torn or damaged record is detected. Records are
appended in sequence order; a segment rolls once it would pass ``segment_bytes``, and a
segment whose records are all acknowledged is deleted.

Durability: a segment is fsynced when it rolls and, while it is the active one, at most
``fsync_ms`` after a write (by :meth:`Spool.sync`, which the delivery thread calls). A power
cut therefore loses at most the batches appended in the last ``fsync_ms`` that the collector
had not yet acknowledged; a crash of the tracer alone loses nothing that was appended (the
page cache keeps it). The acknowledgement cursor is written at most every ``state_ms``: a cut
that loses its last update only makes the tracer resend batches the collector already has,
and the collector recognises those as duplicates.

On open, every segment is read back and checked: a record that fails its CRC or runs past the
end of its file (a write torn by a crash) is reported through ``log``, counted in
``corrupt_records``/``discarded_bytes``, and the segment is cut there; it is never fatal.

The spool is bounded: :meth:`Spool.append` refuses a record that would take the segments past
``max_bytes`` (or that the disk refuses), and the caller counts the batch as dropped.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import os
import struct
import threading
import time
import zlib
from array import array

REC = struct.Struct("<IIQ")          # payload length, crc32, seq
_CRC_HEAD = struct.Struct("<IQ")     # what the CRC covers besides the payload
MAX_RECORD = 256 << 20               # a length past this is damage, not a batch
SEG_PREFIX, SEG_SUFFIX = "seg-", ".spool"
STATE, LOCK = "state.json", "lock"


class SpoolError(RuntimeError):
    """The spool directory cannot be created, opened or locked (another tracer owns it).
    Fatal at start-up: report it and exit."""


def _crc(seq: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(len(payload), seq)))


def default_spool_dir() -> str:
    """/var/lib/stallscope/spool for root, else under $XDG_STATE_HOME (~/.local/state)."""
    if os.geteuid() == 0:
        return "/var/lib/stallscope/spool"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stallscope", "spool")


def boot_time_ms() -> int:
    """Milliseconds since boot (CLOCK_BOOTTIME): a sequence floor that grows faster than a
    tracer can number batches, so a restart never reuses a number within one boot even when
    the spool's state is gone."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


class _Segment:
    __slots__ = ("path", "seqs", "offs", "size")

    def __init__(self, path: str):
        self.path = path
        self.seqs = array("q")       # sequence of each record, ascending
        self.offs = array("q")       # its offset in the file
        self.size = 0

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else -1


class Spool:
    """A bounded, crash-safe FIFO of encoded batches keyed by sequence number.

    Thread use: one thread appends (the agent, through the stream sink); another reads,
    acknowledges and syncs (the delivery thread). Every method takes the spool's lock.
    """

    def __init__(self, path: str, max_bytes: int = 1 << 30, segment_bytes: int | None = None,
                 fsync_ms: int = 200, state_ms: int = 500, log=None):
        self.path = path
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or max(4096, min(8 << 20, self.max_bytes // 8)))
        self.fsync_s = fsync_ms / 1000
        self.state_s = state_ms / 1000
        self.log = log or (lambda m: None)
        self._lock = threading.Lock()
        self.segs: list = []
        self.total_bytes = 0
        self.acked_through = -1
        self.next_seq = 0
        # counters
        self.appended = 0               # records appended by this process
        self.appended_bytes = 0
        self.refused_full = 0           # appends refused: max_bytes reached
        self.refused_error = 0          # appends refused: the disk said no (ENOSPC, EIO)
        self.corrupt_records = 0        # damaged records found (on open or read back)
        self.discarded_bytes = 0
        self.last_error = ""
        self._wfd: int | None = None    # active (last) segment, open for append
        self._rseg: _Segment | None = None
        self._ridx = 0
        self._rfd: int | None = None
        self._rpath = ""
        self._unsynced = False
        self._dir_dirty = False
        self._state_dirty = False
        self._last_fsync = self._last_state = time.monotonic()
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self._lockfd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"cannot open spool directory {path}: {e.strerror}") from e
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(self._lockfd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lockfd)
            raise SpoolError(f"spool directory {path} is in use by another tracer (pid {owner}); "
                             "give each tracer its own --spool-dir") from e
        os.ftruncate(self._lockfd, 0)
        os.pwrite(self._lockfd, f"{os.getpid()}\n".encode(), 0)
        try:
            state = self._read_state()
            self._recover()
        except OSError as e:
            self._close_fds()
            raise SpoolError(f"cannot read spool directory {path}: {e.strerror}") from e
        self.next_seq = max(int(state.get("next_seq", 0)), self.acked_through + 1,
                            (self.segs[-1].last_seq + 1) if self.segs else 0, boot_time_ms())
        self.replayed = self.pending_records()
        self._state_dirty = True

    # ------------------------------------------------------------ open / recover
    def _read_state(self) -> dict:
        p = os.path.join(self.path, STATE)
        try:
            with open(p) as f:
                st = json.load(f)
            self.acked_through = int(st["acked_through"])
            return st
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:
            # the cursor is lost: resend everything spooled (the collector drops duplicates)
            self.log(f"spool: {p} unreadable ({e}); resending every spooled batch")
            return {}

    def _recover(self):
        names = sorted(n for n in os.listdir(self.path) if n.startswith(SEG_PREFIX) and n.endswith(SEG_SUFFIX))
        prev = -1
        for name in names:
            seg = _Segment(os.path.join(self.path, name))
            with open(seg.path, "rb") as f:
                data = f.read()
            off, bad = 0, ""
            while off < len(data):
                if off + REC.size > len(data):
                    bad = "a record header cut short"
                    break
                length, crc, seq = REC.unpack_from(data, off)
                end = off + REC.size + length
                if length > MAX_RECORD or end > len(data):
                    bad = f"a record of {length} bytes running past the end"
                    break
                if _crc(seq, memoryview(data)[off + REC.size:end]) != crc:
                    bad = "a record failing its CRC"
                    break
                if seq <= prev:
                    bad = f"sequence {seq} after {prev}"
                    break
                seg.seqs.append(seq)
                seg.offs.append(off)
                prev = seq
                off = end
            if bad:
                self.corrupt_records += 1
                self.discarded_bytes += len(data) - off
                self.log(f"spool: {name} damaged at byte {off} ({bad}; a crash during a write?): "
                         f"{len(data) - off} bytes discarded, the batches before it kept")
                os.truncate(seg.path, off)
            seg.size = off
            if not seg.seqs or seg.last_seq <= self.acked_through:
                os.unlink(seg.path)         # empty, or acknowledged before a crash
                self._dir_dirty = True
                continue
            self.segs.append(seg)
            self.total_bytes += seg.size
        if self.segs:
            last = self.segs[-1]
            self._wfd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self._rseg = self.segs[0]
            self._ridx = bisect.bisect_right(self.segs[0].seqs, self.acked_through)

    # ------------------------------------------------------------ the writer's side
    def append(self, seq: int, payload: bytes) -> bool:
        """Append one record (``seq`` >= :attr:`next_seq`); False when the spool is full or
        the disk refused the write (``last_error`` says which). Never raises OSError."""
        rec_len = REC.size + len(payload)
        with self._lock:
            if seq < self.next_seq:
                raise ValueError(f"spool sequence {seq} below next_seq {self.next_seq}")
            self.next_seq = seq + 1
            if self.total_bytes + rec_len > self.max_bytes:
                self.refused_full += 1
                self.last_error = f"spool full ({self.max_bytes / 2**20:.3g} MiB)"
                return False
            try:
                seg, fd = self._segment_for(seq, rec_len)
                data = REC.pack(len(payload), _crc(seq, payload), seq) + payload
                try:
                    n = os.write(fd, data)
                    if n != len(data):
                        raise OSError(errno.ENOSPC, "short write")
                except OSError:
                    os.ftruncate(fd, seg.size)     # no half record left behind
                    raise
            except OSError as e:
                self.refused_error += 1
                self.last_error = f"spool write failed: {e.strerror}" + \
                    (" (disk full)" if e.errno == errno.ENOSPC else "")
                return False
            seg.seqs.append(seq)
            seg.offs.append(seg.size)
            seg.size += rec_len
            self.total_bytes += rec_len
            self.appended += 1
            self.appended_bytes += rec_len
            self._unsynced = True
            self._state_dirty = True
            if self._rseg is None:
                self._rseg, self._ridx = seg, len(seg.seqs) - 1
            return True

    def _segment_for(self, seq: int, rec_len: int) -> tuple:
        """(segment, its fd) to append ``rec_len`` bytes to, rolling to a new one if needed."""
        if self.segs and self._wfd is not None:
            seg = self.segs[-1]
            if seg.size == 0 or seg.size + rec_len <= self.segment_bytes:
                return seg, self._wfd
            os.fsync(self._wfd)                  # a closed segment is durable
            os.close(self._wfd)
            self._wfd = None
        seg = _Segment(os.path.join(self.path, f"{SEG_PREFIX}{seq:020d}{SEG_SUFFIX}"))
        fd = self._wfd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self.segs.append(seg)
        self._dir_dirty = True
        return seg, fd

    # ------------------------------------------------------------ the sender's side
    def read_next(self, max_n: int, max_bytes: int) -> list:
        """The next unread records as [(seq, payload)], in order: at most ``max_n``, and at
        most ``max_bytes`` of payload unless the first alone is larger. A record that fails
        its CRC here is reported, counted and skipped with the rest of its segment."""
        out: list = []
        total = 0
        while len(out) < max_n:
            with self._lock:
                seg = self._rseg
                if seg is None:
                    break
                if self._ridx >= len(seg.seqs):
                    i = self._seg_index(seg)
                    if i + 1 >= len(self.segs):
                        break                   # caught up with the writer
                    self._rseg, self._ridx = self.segs[i + 1], 0
                    continue
                seq, off = seg.seqs[self._ridx], seg.offs[self._ridx]
                end = seg.offs[self._ridx + 1] if self._ridx + 1 < len(seg.offs) else seg.size
            length = end - off - REC.size
            if out and total + length > max_bytes:
                break
            raw = self._pread(seg.path, end - off, off)
            ok = len(raw) == end - off
            if ok:
                n, crc, s = REC.unpack_from(raw, 0)
                ok = n == length and s == seq and _crc(seq, memoryview(raw)[REC.size:]) == crc
            with self._lock:
                if not ok:
                    skipped = len(seg.seqs) - self._ridx
                    self.corrupt_records += 1
                    self.discarded_bytes += seg.size - off
                    self._ridx = len(seg.seqs)
                    self.log(f"spool: {os.path.basename(seg.path)} damaged at byte {off} on read-back; "
                             f"{skipped} batches there skipped")
                    continue
                self._ridx += 1
            out.append((seq, raw[REC.size:]))
            total += length
        return out

    def _seg_index(self, seg) -> int:
        for i, s in enumerate(self.segs):
            if s is seg:
                return i
        return -1

    def _pread(self, path: str, n: int, off: int) -> bytes:
        fd = self._rfd
        if self._rpath != path or fd is None:
            if fd is not None:
                os.close(fd)
                self._rfd = None
            fd = self._rfd = os.open(path, os.O_RDONLY)
            self._rpath = path
        return os.pread(fd, n, off)

    def ack_through(self, seq: int):
        """Every record up to ``seq`` is acknowledged: advance the cursor (persisted by
        :meth:`sync`) and delete the segments it has passed entirely."""
        with self._lock:
            if seq <= self.acked_through:
                return
            self.acked_through = seq
            self._state_dirty = True
            while self.segs and self.segs[0].last_seq <= seq:
                seg = self.segs.pop(0)
                if not self.segs:               # the active one: the next append starts a new file
                    if self._wfd is not None:
                        os.close(self._wfd)
                        self._wfd = None
                    self._unsynced = False
                if self._rseg is seg:
                    self._rseg, self._ridx = (self.segs[0] if self.segs else None), 0
                if self._rpath == seg.path and self._rfd is not None:
                    os.close(self._rfd)
                    self._rfd, self._rpath = None, ""
                try:
                    os.unlink(seg.path)
                except OSError as e:
                    self.log(f"spool: cannot delete {seg.path}: {e.strerror}")
                self.total_bytes -= seg.size
                self._dir_dirty = True

    def sync(self, force: bool = False):
        """fsync the active segment (at most every ``fsync_ms``), the directory after a
        segment came or went, and the cursor state (at most every ``state_ms``)."""
        now = time.monotonic()
        fd = None
        with self._lock:
            if self._unsynced and self._wfd is not None and (force or now - self._last_fsync >= self.fsync_s):
                fd = os.dup(self._wfd)
                self._unsynced = False
                self._last_fsync = now
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            state = None
            if self._state_dirty and (force or now - self._last_state >= self.state_s):
                state = {"acked_through": self.acked_through, "next_seq": self.next_seq}
                self._state_dirty = False
                self._last_state = now
        if fd is not None:          # outside the lock: the writer keeps appending meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if state is not None:
            self._write_state(state)
            dir_dirty = True
        if dir_dirty:
            self._fsync_dir()

    def _write_state(self, state: dict):
        tmp = os.path.join(self.path, STATE + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, STATE))

    def _fsync_dir(self):
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ figures
    def pending_records(self) -> int:
        """Records not yet acknowledged."""
        with self._lock:
            return sum(len(s.seqs) - bisect.bisect_right(s.seqs, self.acked_through) for s in self.segs)

    def pending_bytes(self) -> int:
        with self._lock:
            total = 0
            for s in self.segs:
                i = bisect.bisect_right(s.seqs, self.acked_through)
                if i < len(s.seqs):
                    total += s.size - s.offs[i]
            return total

    def close(self):
        """Sync everything and release the directory (idempotent)."""
        if self._lockfd is None:
            return
        try:
            self.sync(force=True)
        except OSError as e:
            self.log(f"spool: final sync failed: {e.strerror}")
        self._close_fds()

    def _close_fds(self):
        for fd in (self._wfd, self._rfd, self._lockfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = self._lockfd = None
