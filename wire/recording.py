"""The recording format: a msgpack stream of encoded batches behind a one-object header.

``stallscope trace --output FILE`` writes one (:class:`RecordingWriter`, a sink);
``stallscope report FILE`` reads it (:func:`read_recording`); :func:`sniff` tells a
recording from a collector's SQLite store.
"""

from __future__ import annotations

import errno
import os
import sys

import msgpack

from . import codec
from .schema import Batch

RECORDING_MAGIC = {"stallscope_recording": 1}


def sniff(path: str) -> str:
    """'store' (SQLite), 'recording', or 'unknown' from a file's first bytes;
    raises OSError (FileNotFoundError, ...) when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"SQLite format 3"):
        return "store"
    if head.startswith(msgpack.packb(RECORDING_MAGIC)):
        return "recording"
    return "unknown"


class RecordingWriter:
    """Appends encoded batches to a recording; a failed write (full disk) is counted
    as dropped batches/events and reported once, never raised."""

    name = "filesink"           # the counters' prefix on the wire; stable across renames

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "ab")
        if self.f.tell() == 0:
            self.f.write(msgpack.packb(RECORDING_MAGIC))
        self.written = 0
        self.dropped_batches = 0
        self.dropped_events = 0
        self.last_error = ""
        self._last_errno: int | None = None

    def __call__(self, batch: Batch):
        try:
            self.f.write(codec.encode(batch)[0])
            self.f.flush()
            self.written += 1
        except OSError as e:
            self.dropped_batches += 1
            self.dropped_events += batch.n_events()
            if e.errno != self._last_errno:
                self._last_errno = e.errno
                self.last_error = f"recording to {self.path} failed: {e.strerror}" + \
                    (" (disk full)" if e.errno == errno.ENOSPC else "") + "; counting dropped batches"
                print(f"stallscope: {self.last_error}", file=sys.stderr, flush=True)

    def close(self):
        try:
            self.f.close()
        except OSError:
            pass


def read_recording(path: str, on_error=None):
    """Yield the batches of a recording file; a damaged tail or batch is reported
    through on_error(message) and skipped, the rest is still read."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False,
                                    max_buffer_size=codec.MAX_FRAME_BYTES)
        first = True
        while True:
            try:
                obj = next(unpacker)
            except StopIteration:
                size = os.fstat(f.fileno()).st_size
                if on_error and unpacker.tell() < size:
                    on_error(f"{path}: truncated at the end ({size - unpacker.tell()} bytes of an "
                             "unfinished batch skipped)")
                return
            except (ValueError, TypeError, msgpack.UnpackException) as e:
                # TypeError: a map keyed by a list or map (unhashable), from a damaged file
                if on_error:
                    on_error(f"{path}: unreadable data at byte {unpacker.tell()}: {e}")
                return
            if first:
                first = False
                if obj == RECORDING_MAGIC:
                    continue
                if on_error:
                    on_error(f"{path}: not a stallscope recording (no header)")
                return
            try:
                yield codec.decode_obj(obj)
            except codec.CodecError as e:
                if on_error:
                    on_error(f"{path}: skipped a batch: {e}")
