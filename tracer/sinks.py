"""Where batches go: the terminal, a recording file, a collector. Decided in one
place (the agent wires the sinks); the probes and samplers never see them.

Each sink counts what it could not deliver instead of raising, so a full disk
or a dead collector costs data, visibly, but never the tracer.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import sys

import msgpack
import numpy as np

from . import codec
from .schema import STALL_TABLES, Batch, rows

RECORDING_MAGIC = {"stallscope_recording": 1}


class Printer:
    """Live output in the style of BCC's tools, or one JSON object per line."""

    HEADER = f"{'TIME':<12} {'COMM':<16} {'PID':>7} {'TID':>7} {'OP':<12} {'LAT(ms)':>9} {'BYTES':>9} FILE/FLOW"

    def __init__(self, as_json: bool = False, out=None, pid_filter: int = 0):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.pid_filter = pid_filter
        self.printed = 0
        if not as_json:
            print(self.HEADER, file=self.out, flush=True)

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
            if self.as_json:
                self.out.write(json.dumps(e, separators=(",", ":")) + "\n")
            else:
                self.out.write(self.line(e) + "\n")
        if evs:
            self.out.flush()

    @staticmethod
    def line(e: dict) -> str:
        t = datetime.datetime.fromtimestamp(e["ts_ns"] / 1e9).strftime("%H:%M:%S.%f")[:12]
        if e["type"] == "net":
            what = f"{e['saddr']}:{e['sport']} -> {e['daddr']}:{e['dport']} ({e['state']})"
            nbytes = f"{e['retransmits']}rtx"
        elif e["type"] == "block":
            what, nbytes = e["device"], str(e["bytes"])
        elif e["type"] == "rdma":
            what, nbytes = f"{e['device']} qp {e['qp']}", str(e["bytes"])
        else:
            what, nbytes = e["path"], str(e["bytes"])
            if e["type"] == "nfs" and e.get("server"):
                what = f"{e['server']}:{what}"
        return (f"{t:<12} {e['comm'][:16]:<16} {e['pid']:>7} {e['tid']:>7} {e['op'][:12]:<12} "
                f"{e['dur_ns'] / 1e6:>9.2f} {nbytes:>9} {what}")


class FileSink:
    """Appends encoded batches to a recording (a msgpack stream; read_recording())."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "ab")
        if self.f.tell() == 0:
            self.f.write(msgpack.packb(RECORDING_MAGIC))
        self.written = 0
        self.dropped_batches = 0
        self.dropped_events = 0
        self.last_error = ""

    def __call__(self, batch: Batch):
        try:
            payload = codec.encode(batch)[0]
            self.f.write(payload)
            self.f.flush()
            self.written += 1
        except OSError as e:
            self.dropped_batches += 1
            self.dropped_events += batch.n_events()
            if e.errno != getattr(self, "_last_errno", None):
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
            except (ValueError, msgpack.UnpackException) as e:
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


class StreamSink:
    """Streams batches to a collector over ZeroMQ."""

    def __init__(self, endpoint: str):
        from .transport import Sender
        self.sender = Sender(endpoint)

    def __call__(self, batch: Batch):
        self.sender.send(batch)

    @property
    def dropped_batches(self):
        return self.sender.dropped_batches

    @property
    def dropped_events(self):
        return self.sender.dropped_events

    def close(self):
        self.sender.close()


def tables_nonempty(batch: Batch) -> bool:
    return any(len(np.asarray(next(iter(t.values())))) for t in batch.tables.values() if t)


def ensure_dir(path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
