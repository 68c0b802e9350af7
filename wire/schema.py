"""The one event schema: what the kernel emits and what travels to the collector.

Two layers:

* The kernel record, ``struct ss_event`` in ``bpf/stallscope.h``. Its numpy dtype
  (:data:`RECORD_DTYPE`) is derived here by parsing that header, so there is no
  second hand-written copy to drift.
* Event tables: what the tracer ships and the collector stores. A table is a
  ``dict[column -> numpy array]`` for one event ``type``; string columns are
  numpy object arrays. Timestamps are wall-clock ns (``ts_ns`` = start).

The collector imports this module; this module never imports the collector.
"""

from __future__ import annotations

import os
import re

import numpy as np

from stallscope.bpf import BPF_DIR

SCHEMA_VERSION = 2
HEADER = os.path.join(BPF_DIR, "stallscope.h")

_CTYPES = {
    "__u8": "u1", "__u16": "<u2", "__u32": "<u4", "__u64": "<u8",
    "__s8": "i1", "__s16": "<i2", "__s32": "<i4", "__s64": "<i8",
    "char": "S1",
}


def _parse_header(path: str = HEADER):
    """Return (defines, enums, struct fields) parsed from the contract header."""
    with open(path) as f:
        text = f.read()
    text_nc = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    defines = {}
    for name, val in re.findall(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text_nc):
        defines[name] = int(val, 0)
    enums = {}
    for body in re.findall(r"enum\s+\w+\s*\{(.*?)\}", text_nc, flags=re.S):
        for name, val in re.findall(r"(\w+)\s*=\s*(\d+)", body):
            enums[name] = int(val)
    m = re.search(r"struct\s+ss_event\s*\{(.*?)\};", text_nc, flags=re.S)
    if not m:
        raise RuntimeError(f"{path}: struct ss_event not found")
    fields: list[tuple] = []
    for line in m.group(1).split(";"):
        line = line.strip()
        if not line:
            continue
        fm = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\w+)\])?", line)
        if not fm:
            raise RuntimeError(f"{path}: cannot parse struct field {line!r}")
        ctype, name, dim = fm.groups()
        n = 1 if dim is None else (int(dim) if dim.isdigit() else defines[dim])
        base = _CTYPES[ctype]
        if ctype == "char":
            fields.append((name, f"S{n}"))
        elif n == 1:
            fields.append((name, base))
        else:
            fields.append((name, base, (n,)))
    return defines, enums, fields


DEFINES, ENUMS, _FIELDS = _parse_header()
RECORD_DTYPE = np.dtype(_FIELDS)
ABI_VERSION = DEFINES["SS_ABI_VERSION"]
PATH_LEN = DEFINES["SS_PATH_LEN"]
HIST_SLOTS = DEFINES["SS_HIST_SLOTS"]
NOPS = DEFINES["SS_NOPS"]

# enum ss_type -> JSON "type"
T_VFS = ENUMS["SS_T_VFS"]
T_TCP = ENUMS["SS_T_TCP_RETRANS"]
T_BLOCK = ENUMS["SS_T_BLOCK"]
T_NFS = ENUMS["SS_T_NFS"]
T_NFS_RPC = ENUMS["SS_T_NFS_RPC"]
T_RDMA = ENUMS["SS_T_RDMA"]
T_PROC = ENUMS["SS_T_PROC"]
T_SCHED = ENUMS["SS_T_SCHED"]
T_HTTP = ENUMS["SS_T_HTTP"]

#: enum ss_op value -> op name shown to users ("read", "fsync", "retransmit", ...)
OP_NAMES = {v: k[len("SS_OP_"):].lower() for k, v in ENUMS.items() if k.startswith("SS_OP_")}
OP_NAMES.update({ENUMS["SS_OP_RETRANS"]: "retransmit", ENUMS["SS_OP_RETRANS_SYNACK"]: "retransmit_synack",
                 ENUMS["SS_OP_RETRANS_CLOSE"]: "retransmit_close"})
OP_CODES = {v: k for k, v in OP_NAMES.items()}

COUNTER_NAMES = {
    DEFINES["SS_C_LOST_RINGBUF"]: "lost_ringbuf",
    DEFINES["SS_C_INFLIGHT_COLLISION"]: "lost_inflight_collision",
    DEFINES["SS_C_EMITTED"]: "emitted",
    DEFINES["SS_C_BELOW"]: "below_threshold",
    DEFINES["SS_C_NO_START"]: "exit_without_enter",
    DEFINES["SS_C_STORM_FULL"]: "lost_storm_tail",
    DEFINES["SS_C_RETRY_SAVED"]: "ringbuf_retry_saved",
}

# ---------------------------------------------------------------- event tables
# Column kinds: "u" unsigned int, "i" signed int, "s" string (interned on the wire).
COMMON = {"ts_ns": "u", "dur_ns": "u", "pid": "u", "tid": "u", "comm": "s"}
TABLES = {
    # VFS read/write/fsync...: path and filesystem of the file
    # (count > 1: an aggregate of back-to-back ops each below the threshold; blocked_ns is
    # their summed latency, ts_ns/dur_ns span the first start to the last end; a storm is one
    # thread's ops on one filesystem: more_files = the files its ops went to besides path, 0
    # for one file, so a storm's files are its distinct paths plus its rows' more_files)
    "io": {**COMMON, "op": "s", "bytes": "i", "path": "s", "fs": "s", "dev": "u", "ino": "u",
           "cgroup": "u", "method": "s", "count": "u", "blocked_ns": "u", "more_files": "u"},
    # NFS client ops and RPCs: same as io plus the server and RPC retransmits
    "nfs": {**COMMON, "op": "s", "bytes": "i", "path": "s", "fs": "s", "server": "s",
            "xid": "u", "rpc_retrans": "u", "method": "s"},
    # block requests by device
    "block": {**COMMON, "op": "s", "bytes": "i", "device": "s", "sector": "u"},
    # a TCP loss episode: retransmits of one flow close together (first..last + RTO)
    "net": {**COMMON, "op": "s", "saddr": "s", "sport": "u", "daddr": "s", "dport": "u",
            "state": "s", "retransmits": "u", "sock_ino": "u"},
    # RDMA/verbs waits and completions
    "rdma": {**COMMON, "op": "s", "device": "s", "qp": "u", "bytes": "i"},
    # an owner thread off-CPU: "blocked" (uninterruptible sleep; reason = the kernel
    # function it waited in) or "runq" (runnable but not running; other = who ran instead)
    "sched": {**COMMON, "op": "s", "reason": "s", "count": "u", "blocked_ns": "u",
              "other_pid": "u", "other_comm": "s"},
    # HTTP/1.x requests (http family): op = method; host = Host header (or SNI), path up to
    # '?', status and reason from the status line (0: no answer, a timeout); tls 1 when seen
    # in libssl; conn = fd or SSL *. The tracer ships one row per request (count 1);
    # analysis/http_episodes.py joins retries into episodes in the same columns: count =
    # attempts, statuses = their codes ("503,503,200"), blocked_ns = first head to final status,
    # backoff_ns = the gaps between attempts
    "http": {**COMMON, "op": "s", "host": "s", "path": "s", "status": "u", "reason": "s",
             "statuses": "s", "count": "u", "blocked_ns": "u", "backoff_ns": "u", "tls": "u",
             "conn": "u", "cgroup": "u"},
    # RDMA hardware counters (sampled from sysfs): deltas over the interval
    "rdma_counter": {"ts_ns": "u", "dur_ns": "u", "device": "s", "port": "u", "counter": "s",
                     "delta": "u"},
    # NVML utilization samples (ts_ns = NVML's own timestamp, on the wall clock)
    "gpu": {"ts_ns": "u", "gpu": "u", "util": "u", "synth": "u"},
    # compute processes seen on each GPU at ts_ns
    "gpu_proc": {"ts_ns": "u", "gpu": "u", "pid": "u"},
    # CPU time (user + system, all threads, ns) of a GPU's process or descendant at ts_ns, and
    # its name then: a running total (tracer/cpu.py), read while the GPU idles, differenced
    # across an idle interval by the analysis
    "cpu": {"ts_ns": "u", "pid": "u", "comm": "s", "cpu_ns": "u"},
    # at the same samples: a process whose main thread was asleep receiving on a TCP socket
    # (call: the syscall, read/recvfrom/poll...; peer: "ip:port"), tracer/cpu.py
    "wait": {"ts_ns": "u", "pid": "u", "call": "s", "peer": "s"},
    # process lineage and job identity for every pid that appears in the batch; pod_uid and
    # container_id from its cgroup (wire/cgroup.py), "" when it is in no pod or container;
    # exit_ns (wall, 0: not exited or not known) and exit_status (the wait(2) status: signal
    # in bits 0-6, 0x80 core dumped, exit code in bits 8-15; -1 unknown) in the row the
    # tracer sends when a process that matters exits (a GPU owner or descendant, or a
    # process with a job or rank); a pid's latest row carries the latest facts
    "proc": {"pid": "u", "ppid": "u", "comm": "s", "start_ns": "u", "job": "s", "rank": "i",
             "pod_uid": "s", "container_id": "s", "exit_ns": "u", "exit_status": "i"},
}
#: columns added after schema 1, with how to fill them where a table lacks them (a batch
#: from an older tracer, a table built by hand): the value is a function of the table
OPTIONAL = {
    "io": {"count": lambda t: np.ones(table_len(t), dtype=np.uint64),
           "blocked_ns": lambda t: np.asarray(t["dur_ns"], dtype=np.uint64),
           "more_files": lambda t: np.zeros(table_len(t), dtype=np.uint64)},
    "proc": {"pod_uid": lambda t: np.full(table_len(t), "", dtype=object),
             "container_id": lambda t: np.full(table_len(t), "", dtype=object),
             "exit_ns": lambda t: np.zeros(table_len(t), dtype=np.uint64),
             "exit_status": lambda t: np.full(table_len(t), -1, dtype=np.int64)},
}


def complete(kind: str, table: dict) -> dict:
    """The table with every optional column present (filled per OPTIONAL)."""
    opt = OPTIONAL.get(kind)
    if not opt or not table or all(c in table for c in opt):
        return table
    out = dict(table)
    for c, fill in opt.items():
        if c not in out:
            out[c] = fill(table)
    return out


#: tables whose rows are stalls (candidates for blame)
STALL_TABLES = ("io", "nfs", "block", "net", "rdma", "http", "sched")   # sched last: the backstop


class Cat(np.ndarray):
    """An object array of strings that also remembers them as ``codes`` into
    ``cats`` (its distinct values), as the decoder found them. The encoder
    interns ``cats`` instead of every element; any derived array (a slice, a
    mask) is a plain object array again."""

    codes = None
    cats = None

    @staticmethod
    def make(cats: np.ndarray, codes: np.ndarray) -> "Cat":
        arr = cats[codes].view(Cat)
        arr.cats, arr.codes = cats, codes
        return arr

    def __array_finalize__(self, obj):
        self.codes = self.cats = None


def take(col, sel) -> np.ndarray:
    """``col[sel]`` (a mask, indexes or a slice: then a view); a :class:`Cat` stays one, its
    codes taken alike."""
    codes = getattr(col, "codes", None)
    if codes is None:
        return col[sel]
    if isinstance(sel, slice):
        arr = col[sel]
        arr.cats, arr.codes = col.cats, codes[sel]
        return arr
    return Cat.make(col.cats, codes[sel])


class _Index(dict):
    """string -> code in ``strings``; a missing string is given the next code (appended), so
    ``map(index.__getitem__, values)`` interns in C, calling back only for new strings."""

    def __init__(self, strings: list):
        super().__init__()
        self.strings = strings

    def __missing__(self, v):
        j = self[v] = len(self.strings)
        self.strings.append(v)
        return j


def _intern(cats, codes, remap: np.ndarray, index: _Index) -> None:
    """Fill ``remap`` (-1: not yet) with the codes in ``index`` of the values of ``cats`` that
    ``codes`` uses: only those (a decoded column's cats are its whole batch's strings)."""
    if not len(codes):
        return
    used = np.flatnonzero(np.bincount(codes, minlength=len(cats)))
    new = used[remap[used] < 0]
    remap[new] = np.fromiter(map(index.__getitem__, cats[new].tolist()), dtype=np.intp, count=len(new))


def _concat_col(parts):
    if len(parts) > 1 and all(getattr(p, "codes", None) is not None for p in parts):
        cats: list = []
        index = _Index(cats)
        codes = []
        for p in parts:
            remap = np.full(len(p.cats), -1, dtype=np.intp)
            _intern(p.cats, p.codes, remap, index)
            codes.append(remap[p.codes])
        arr = np.empty(len(cats), dtype=object)
        arr[:] = cats
        return Cat.make(arr, np.concatenate(codes))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([np.asarray(p) for p in parts])


def empty_table(kind: str) -> dict:
    cols = TABLES[kind]
    return {c: (np.empty(0, dtype=object) if k == "s" else
                np.empty(0, dtype=np.int64 if k == "i" else np.uint64)) for c, k in cols.items()}


def table_len(table: dict) -> int:
    for v in table.values():
        return len(v)
    return 0


def concat_tables(kind: str, tables: list) -> dict:
    tables = [t for t in tables if table_len(t)]
    if not tables:
        return empty_table(kind)
    tables = [complete(kind, t) for t in tables]
    return {c: _concat_col([t[c] for t in tables]) for c in TABLES[kind]}


class GrowingTable:
    """The rows of one kind as they arrive, in buffers that grow in place (by half again, so
    at most 1.5 times the rows are held): appending costs the rows appended, :meth:`view` is
    the rows so far as views (no copy).

    Appended tables wait in a list until the rows are read (``view``, ``replace``), then
    are copied in with one buffer check per column: a live analysis reads its tables once
    per run, after tens of batches.

    A text column whose every part came as a :class:`Cat` stays one: its codes index one
    string table shared by the table's text columns. An appended part's string table (a
    decoded batch's, shared by its text columns) is interned whole, once, in C; a
    :meth:`replace` (a trim) starts over from a table, interning only the values it still
    uses, so the string table stays as small as the rows. A view is never written into
    afterwards: replace() allocates anew."""

    def __init__(self, kind: str):
        self.kind = kind
        self.n = 0                  # rows in the buffers
        self._pending: list = []    # appended tables not yet in the buffers
        self._pending_n = 0
        self._bufs: dict = {}       # column -> ndarray, len >= n
        self._codes: dict = {}      # text column -> int32 codes buffer (absent: plain object column)
        self._strings: list = []    # code -> string
        self._index = _Index(self._strings)
        self._strarr: np.ndarray | None = None    # self._strings as an object array (rebuilt when it grew)
        self._view: dict | None = None

    def __len__(self) -> int:
        return self.n + self._pending_n

    def append(self, table: dict) -> None:
        """Add a table's rows; it must have every column of the kind (``complete`` fills optional ones)."""
        k = table_len(table)
        if k:
            self._pending.append(table)
            self._pending_n += k
            self._view = None

    def replace(self, table: dict) -> None:
        """Start over from ``table`` (every column of the kind, or empty)."""
        self.n = 0
        self._pending, self._pending_n = [], 0
        self._bufs, self._codes, self._strings = {}, {}, []
        self._index = _Index(self._strings)
        self._strarr = None
        self._view = None
        if table_len(table):
            self._copy_in([table], whole_string_tables=False)

    def view(self) -> dict:
        """Every row so far, one array per column (views of the buffers; text columns that
        kept their codes are :class:`Cat`). The same dict until the next change."""
        if self._pending:
            parts, self._pending, self._pending_n = self._pending, [], 0
            self._copy_in(parts, whole_string_tables=True)
        if self._view is None:
            out = {}
            if self._strarr is None or len(self._strarr) != len(self._strings):
                arr = np.empty(len(self._strings), dtype=object)
                arr[:] = self._strings
                self._strarr = arr
            for c in TABLES[self.kind]:
                a = self._bufs[c][:self.n]
                if c in self._codes:
                    a = a.view(Cat)
                    a.cats, a.codes = self._strarr, self._codes[c][:self.n]
                out[c] = a
            self._view = out
        return self._view

    def _copy_in(self, parts: list, whole_string_tables: bool) -> None:
        """Copy ``parts`` (tables with rows) in after the rows held; text parts' codes remapped
        into the table's string table (each part string table once: interned whole, or only
        the values its columns use)."""
        n0 = self.n
        lens = [table_len(t) for t in parts]
        need = n0 + sum(lens)
        remaps: dict = {}       # id(cats) -> code remap of one part's string table
        for c, kind in TABLES[self.kind].items():
            vals = [t[c] for t in parts]
            if kind == "s":
                self._room(self._bufs, c, np.dtype(object), need)
                cats_ok = all(getattr(v, "codes", None) is not None for v in vals)
                if cats_ok and (c in self._codes or n0 == 0):
                    self._room(self._codes, c, np.dtype(np.int32), need)
                else:
                    self._codes.pop(c, None)
            else:
                vals = [np.asarray(v) for v in vals]
                self._room(self._bufs, c, np.result_type(*vals), need)
            buf, cb, at = self._bufs[c], self._codes.get(c) if kind == "s" else None, n0
            for v, k in zip(vals, lens):
                buf[at:at + k] = v
                if cb is not None:
                    remap = remaps.get(id(v.cats))
                    if remap is None:   # text columns of one decoded batch share its string table
                        if whole_string_tables:
                            remap = np.fromiter(map(self._index.__getitem__, v.cats.tolist()),
                                                dtype=np.intp, count=len(v.cats))
                        else:
                            remap = np.full(len(v.cats), -1, dtype=np.intp)
                        remaps[id(v.cats)] = remap
                    if not whole_string_tables:
                        _intern(v.cats, v.codes, remap, self._index)
                    cb[at:at + k] = remap[v.codes]
                at += k
        self.n = need
        self._view = None

    def _room(self, bufs: dict, c: str, dtype, need: int) -> np.ndarray:
        """Column ``c``'s buffer in ``bufs`` (values or codes), with room for ``need`` rows of
        ``dtype`` (promoted as np.concatenate would: int64 and uint64 parts make float64)."""
        buf = bufs.get(c)
        if buf is None:
            bufs[c] = buf = np.empty(need, dtype=dtype)
        elif len(buf) < need or not np.can_cast(dtype, buf.dtype, "safe"):
            new = np.empty(max(need, len(buf) * 3 // 2) if len(buf) < need else len(buf),
                           dtype=np.result_type(buf.dtype, dtype))
            new[:self.n] = buf[:self.n]
            bufs[c] = buf = new
        return buf


def rows(kind: str, table: dict, node: str = ""):
    """Yield each row of a table as a JSON-ready dict (DESIGN.md field names); optional
    columns the table lacks (an older tracer's, a hand-made table) filled as ``complete`` does."""
    cols = list(TABLES[kind])
    table = complete(kind, table)
    arrays = [table[c] for c in cols]
    for vals in zip(*arrays):
        d = {"type": kind}
        for c, v in zip(cols, vals):
            d[c] = v.item() if hasattr(v, "item") else v
        if node:
            d["node"] = node
        yield d


class Batch:
    """One unit of transport: a node's events and samples over a short span.

    ``tables`` maps a type from :data:`TABLES` to its columns. ``counters`` are
    cumulative since the tracer started (lost events included), so a lost batch
    cannot hide a loss. ``meta`` carries the clock mapping, attach methods,
    GPU identities and sample periods.
    """

    __slots__ = ("node", "seq", "tables", "counters", "hist", "meta")

    def __init__(self, node, seq=0, tables=None, counters=None, hist=None, meta=None):
        self.node = node
        self.seq = seq
        self.tables = tables or {}
        self.counters = counters or {}
        self.hist = hist or {}
        self.meta = meta or {}

    def n_events(self) -> int:
        return sum(table_len(t) for k, t in self.tables.items() if k in STALL_TABLES)

    def __repr__(self):
        sizes = {k: table_len(t) for k, t in self.tables.items()}
        return f"Batch(node={self.node!r}, seq={self.seq}, tables={sizes})"
