"""msgpack codec for event batches: ``encode(batch) -> frames``, ``decode(frames) -> batch``.

A batch is columnar: each table column is one msgpack ``bin`` holding a numpy array
in the smallest little-endian integer type that fits. Timestamp columns are
zigzag delta-encoded; string columns (paths, comms, ops) are interned once per
batch and sent as small integer indexes. This is what gets an IO event under
32 bytes on the wire without a compressor.

Envelope (a msgpack map)::

    {"v": SCHEMA_VERSION, "node": str, "seq": int, "meta": map, "counters": map,
     "hist": map, "strings": [str], "tables": {type: {"n": int, "cols": {name: [code, base, bin]}}}}

``code`` is a numpy dtype string ("u1", "u2", "u4", "u8", "i1", ...), prefixed
with "z" for zigzag deltas from ``base`` or "s" for an index into ``strings``.
An integer column with few distinct values (inode, device, cgroup) may instead
be dictionary-coded: ``["d" + index code, 0, index bin, value code, values bin]``.
"""

from __future__ import annotations

import collections
import itertools
import math

import msgpack
import numpy as np

from .schema import OPTIONAL, SCHEMA_VERSION, TABLES, Batch, Cat, complete

#: versions this build reads: schema 1 lacks only columns that OPTIONAL fills in
SUPPORTED_VERSIONS = (1, SCHEMA_VERSION)

MAX_FRAME_BYTES = 64 << 20   # a batch larger than this is refused on both sides
MAX_ROWS = 4 << 20           # rows per table
MAX_NODE_LEN = 255           # a host name is at most 253 characters
_I64_MIN, _I64_MAX, _U64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_DELTA_COLS = {"ts_ns", "start_ns"}
_DTYPES = {c: np.dtype(c) for c in ("u1", "<u2", "<u4", "<u8", "i1", "<i2", "<i4", "<i8")}
_CODES = {"u1": "u1", "u2": "<u2", "u4": "<u4", "u8": "<u8",
          "i1": "i1", "i2": "<i2", "i4": "<i4", "i8": "<i8"}


class CodecError(ValueError):
    """The frames are not a valid stallscope batch (malformed, truncated, too
    large or of another schema version). The message says which; the caller
    should count the batch as rejected and keep going."""


def _min_uint(maxval: int) -> str:
    if maxval < 1 << 8:
        return "u1"
    if maxval < 1 << 16:
        return "u2"
    if maxval < 1 << 32:
        return "u4"
    return "u8"


def _min_int(lo: int, hi: int) -> str:
    for bits, code in ((8, "i1"), (16, "i2"), (32, "i4")):
        if -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
            return code
    return "i8"


def unique_runs(k: np.ndarray):
    """(first, inverse) of an integer key column, as ``np.unique(return_index=True,
    return_inverse=True)`` gives them (first = index of a row holding each distinct value),
    but sorting only the heads of runs of equal values: a drained ring holds long runs
    (one thread's ops on one file), so this is a few linear passes instead of a sort."""
    n = len(k)
    if n == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    chg = np.empty(n, dtype=bool)
    chg[0] = True
    np.not_equal(k[1:], k[:-1], out=chg[1:])
    heads = np.flatnonzero(chg)
    if len(heads) == 1:
        return heads, np.zeros(n, np.intp)
    _u, first, hinv = np.unique(k[heads], return_index=True, return_inverse=True)
    run = np.cumsum(chg, dtype=np.intp)
    run -= 1
    return heads[first], hinv.reshape(-1)[run]


#: a column whose sample of this many values is more than half distinct is not worth a
#: dictionary (durations, byte counts): its full sort is skipped
_DICT_SAMPLE = 256


def _dict_code(a: np.ndarray, code: str):
    """The dictionary form of an integer column when it is smaller than the plain one, else
    None. Finding the distinct values costs a few linear passes when values come in runs
    (inodes, devices, cgroups of a drain); a column that a sample shows to be mostly
    distinct is not sorted at all."""
    n = len(a)
    size = _DTYPES[_CODES[code]].itemsize
    if n > 2 * _DICT_SAMPLE:
        sample = a[:: n // _DICT_SAMPLE]
        if len(np.unique(sample)) > len(sample) // 2:
            return None
    first, inv = unique_runs(a)
    icode = _min_uint(len(first) - 1)
    isize = _DTYPES[_CODES[icode]].itemsize
    if n * isize + len(first) * size >= n * size:
        return None
    return ["d" + icode, 0, inv.astype(_CODES[icode]).tobytes(), code,
            a[first].astype(_CODES[code]).tobytes()]


def _enc_int(name: str, arr: np.ndarray, signed: bool):
    arr = np.asarray(arr)
    n = len(arr)
    if n == 0:
        return ["u1", 0, b""]
    if name in _DELTA_COLS:
        a = arr.astype(np.int64)
        base = int(a[0])
        d = np.diff(a, prepend=a[0])
        z = ((d << 1) ^ (d >> 63)).astype(np.uint64)        # zigzag
        code = _min_uint(int(z.max()))
        return ["z" + code, base, z.astype(_CODES[code]).tobytes()]
    if signed:
        a = arr.astype(np.int64)
        code = _min_int(int(a.min()), int(a.max()))
    else:
        a = arr.astype(np.uint64)
        code = _min_uint(int(a.max()))
    if _DTYPES[_CODES[code]].itemsize >= 4 and n >= 16:
        d = _dict_code(a, code)
        if d is not None:
            return d
    return [code, 0, a.astype(_CODES[code]).tobytes()]


def encode(batch: Batch) -> list:
    """Encode a batch into ZeroMQ frames (a list with one bytes object)."""
    # string -> index, assigning the next index on first sight; map() over the
    # dict's C-level __getitem__ keeps interning out of the Python loop
    strings = collections.defaultdict(itertools.count().__next__)
    tables = {}
    for kind, table in batch.tables.items():
        spec = TABLES[kind]
        table = complete(kind, table)
        n = len(next(iter(table.values()))) if table else 0
        if n == 0:
            continue
        cols = {}
        for name, k in spec.items():
            col = table[name]
            if len(col) != n:
                raise CodecError(f"table {kind!r}: column {name!r} has {len(col)} rows, expected {n}")
            if k == "s":
                codes = getattr(col, "codes", None)
                if codes is not None and len(codes) == n:    # schema.Cat: intern distinct values only
                    cat_idx = np.fromiter(map(strings.__getitem__, col.cats), dtype=np.int64,
                                          count=len(col.cats))
                    idx = cat_idx[codes] if n else np.empty(0, dtype=np.int64)
                else:
                    idx = np.fromiter(map(strings.__getitem__, col), dtype=np.int64, count=n)
                code = _min_uint(int(idx.max()))
                cols[name] = ["s" + code, 0, idx.astype(_CODES[code]).tobytes()]
            else:
                cols[name] = _enc_int(name, col, k == "i")
        tables[kind] = {"n": n, "cols": cols}
    env = {
        "v": SCHEMA_VERSION, "node": batch.node, "seq": int(batch.seq), "meta": batch.meta,
        "counters": batch.counters, "hist": batch.hist, "strings": list(strings), "tables": tables,
    }
    payload = msgpack.packb(env, use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(f"batch of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit; "
                         "send smaller batches")
    return [payload]


def _req(d, key, typ, where):
    if not isinstance(d, dict) or key not in d:
        raise CodecError(f"malformed batch: {where} has no {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise CodecError(f"malformed batch: {where}.{key} is {type(v).__name__}, "
                         f"expected {getattr(typ, '__name__', typ)}")
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """An int64 or a finite float (readers take int() of these)."""
    if isinstance(v, float):
        return math.isfinite(v) and abs(v) < 2.0 ** 63
    return _is_int(v) and _I64_MIN <= v <= _I64_MAX


def _check_meta(meta: dict, counters: dict, hist: dict):
    """The envelope's maps hold what their readers (analysis, collector) take them to hold:
    counters name -> int64, histograms family -> op -> [int], and the meta fields read
    downstream (clock, gpu) of the types the tracer writes. Other meta keys pass as they are."""
    for k, v in counters.items():
        if not isinstance(k, str) or not _is_num(v):
            raise CodecError(f"malformed batch: counter {k!r} is not name -> number (int64)")
    for fam, ops in hist.items():
        if not isinstance(fam, str) or not isinstance(ops, dict):
            raise CodecError("malformed batch: hist must map family -> {op: [counts]}")
        for op, counts in ops.items():
            if not (isinstance(op, str) and isinstance(counts, list) and len(counts) <= 256
                    and all(_is_int(c) for c in counts)):
                raise CodecError(f"malformed batch: hist.{fam}.{op} is not a list of counts")
    if any(not isinstance(k, str) for k in meta):
        raise CodecError("malformed batch: meta keys must be text")
    clock = meta.get("clock")
    if clock is not None:
        if not isinstance(clock, dict):
            raise CodecError("malformed batch: meta.clock is not a map")
        for k, v in clock.items():
            ok = isinstance(v, bool) or v is None if k == "ntp_synced" else v is None or _is_num(v)
            if not ok:
                raise CodecError(f"malformed batch: meta.clock.{k} is {type(v).__name__}")
    gpu = meta.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise CodecError("malformed batch: meta.gpu is not a map")
        periods = gpu.get("sample_period_ns")
        if periods is not None and not (isinstance(periods, dict) and all(
                _gpu_index(k) and (v is None or (_is_int(v) and 0 <= v <= _I64_MAX))
                for k, v in periods.items())):
            raise CodecError("malformed batch: meta.gpu.sample_period_ns is not gpu -> ns")
        gpus = gpu.get("gpus")
        if gpus is not None and not (isinstance(gpus, list) and all(
                isinstance(g, dict) and _gpu_index(g.get("index", 0)) for g in gpus)):
            raise CodecError("malformed batch: meta.gpu.gpus is not a list of GPUs")
    if not isinstance(meta.get("final", False), bool):
        raise CodecError("malformed batch: meta.final is not a boolean")


def _gpu_index(k) -> bool:
    if isinstance(k, str):
        return k.isdigit() and len(k) < 6 and k.isascii()
    return _is_int(k) and 0 <= k < 1 << 16


def _column(kind: str, name: str, k: str, c, n: int, strings: list, strarr) -> np.ndarray:
    """One decoded column of n rows; raises CodecError. A well-formed column's form is
    checked by one lookup (``_SPECS``); anything else goes through :func:`_column_form`,
    which names what is wrong."""
    spec = None
    if type(c) is list and len(c) in (3, 5) and type(c[0]) is str and type(c[1]) is int \
            and type(c[2]) is bytes:
        spec = _SPECS.get((c[0], k))
        if spec is not None and ((spec[0] == "d") != (len(c) == 5) or len(c[2]) != n * spec[1].itemsize):
            spec = None
    mode, dt = spec or _column_form(kind, name, k, c, n)
    a = np.frombuffer(c[2], dtype=dt)
    if mode == "":
        return a.astype(np.int64 if k == "i" else np.uint64)
    if mode == "s":
        if n and int(a.max()) >= len(strings):
            raise CodecError(f"malformed batch: tables.{kind}.cols.{name} indexes past the string table")
        return Cat.make(strarr, a)     # the batch's string table as cats (codes as sent: u1-u8)
    if mode == "d":
        vdt = _CODES.get(c[3]) if isinstance(c[3], str) else None
        if vdt is None or not isinstance(c[4], bytes) or len(c[4]) % _DTYPES[vdt].itemsize:
            raise CodecError(f"malformed batch: tables.{kind}.cols.{name} bad dictionary")
        vals = np.frombuffer(c[4], dtype=_DTYPES[vdt])
        if n and int(a.max()) >= len(vals):
            raise CodecError(f"malformed batch: tables.{kind}.cols.{name} indexes past its dictionary")
        # the (small) dictionary widened once, then gathered: one pass over the rows
        return vals.astype(np.int64 if k == "i" else np.uint64)[a]
    base = c[1]
    if not _I64_MIN <= base <= _U64_MAX:
        raise CodecError(f"malformed batch: tables.{kind}.cols.{name} base {base} out of range")
    # zigzag back to two's-complement deltas, summed modulo 2**64 (as the encoder's
    # int64 differences were taken): any input gives numbers, never an overflow.
    # In place in one new array (decode is a tenth of the collector's CPU).
    d = a.astype(np.uint64)
    neg = d & np.uint64(1)
    np.negative(neg, out=neg)               # 0 or 2**64-1
    d >>= np.uint64(1)
    d ^= neg
    d[:1] += np.uint64(base & _U64_MAX)     # (an array op: wraps silently, as the deltas do)
    np.cumsum(d, out=d)
    return d.view(np.int64) if k == "i" else d


def _specs() -> dict:
    """(wire code, schema kind) -> (mode, dtype) for every well-formed pairing of a
    column's code with its schema kind: what :func:`_column_form` accepts."""
    out = {}
    for code, dt_name in _CODES.items():
        for mode in ("", "z", "s", "d"):
            for k in ("s", "u", "i"):
                if (mode == "s") != (k == "s") or (mode in ("s", "d") and code[0] != "u"):
                    continue
                out[(mode + code, k)] = (mode, _DTYPES[dt_name])
    return out


_SPECS = _specs()


def _column_form(kind: str, name: str, k: str, c, n: int) -> tuple:
    """(mode, dtype) of a column whose form the fast check refused, or the CodecError that
    says what is wrong with it."""
    where = f"tables.{kind}.cols.{name}"
    if not (isinstance(c, list) and len(c) in (3, 5) and isinstance(c[0], str)
            and _is_int(c[1]) and isinstance(c[2], bytes)):
        raise CodecError(f"malformed batch: {where} missing or not [code, base, bytes]")
    code, raw = c[0], c[2]
    mode = ""
    if code[:1] in ("z", "s", "d"):
        mode, code = code[0], code[1:]
    if (mode == "d") != (len(c) == 5):
        raise CodecError(f"malformed batch: {where} dictionary form wrong")
    if (mode == "s") != (k == "s"):
        raise CodecError(f"malformed batch: {where} is a {'string' if k == 's' else 'number'} "
                         f"column but coded {c[0]!r}")
    dt_name = _CODES.get(code)
    if dt_name is None:
        raise CodecError(f"malformed batch: {where} has unknown type {code!r}")
    if mode in ("s", "d") and code[0] != "u":
        raise CodecError(f"malformed batch: {where} has signed indexes {code!r}")
    dt = _DTYPES[dt_name]
    if len(raw) != n * dt.itemsize:
        raise CodecError(f"truncated batch: {where} has {len(raw)} bytes, "
                         f"expected {n * dt.itemsize}")
    return mode, dt     # (bytes or list subclasses: well-formed after all)


def decode_obj(env) -> Batch:
    """Validate an unpacked envelope and turn it into a :class:`Batch`.

    Whatever the input, this returns a Batch whose tables have every column of their
    schema, of the schema's kind (strings, unsigned, signed) and of one length, or raises
    :class:`CodecError` with the reason; it allocates at most a small multiple of the
    envelope's own size (every row of every column is at least one byte of it)."""
    if not isinstance(env, dict):
        raise CodecError(f"malformed batch: top level is {type(env).__name__}, expected a map")
    v = env.get("v")
    if not _is_int(v) or v not in SUPPORTED_VERSIONS:
        raise CodecError(f"unsupported schema version {v!r} (this build speaks {SCHEMA_VERSION}); "
                         "upgrade the older side")
    node = _req(env, "node", str, "batch")
    if len(node) > MAX_NODE_LEN:
        raise CodecError(f"malformed batch: node name of {len(node)} characters")
    seq = _req(env, "seq", int, "batch")
    if not 0 <= seq <= _I64_MAX:
        raise CodecError(f"malformed batch: seq={seq} out of range")
    strings = _req(env, "strings", list, "batch")
    if strings and set(map(type, strings)) != {str}:     # msgpack gives text as str itself
        raise CodecError("malformed batch: strings must all be text")
    strarr = np.array(strings + [None], dtype=object)[:-1] if strings else np.empty(0, dtype=object)
    tables = {}
    for kind, t in _req(env, "tables", dict, "batch").items():
        if kind not in TABLES:
            continue    # a newer tracer's extra table type: ignore, keep the rest
        n = _req(t, "n", int, f"tables.{kind}")
        if not 0 <= n <= MAX_ROWS:
            raise CodecError(f"malformed batch: tables.{kind}.n={n} out of range")
        cols_in = _req(t, "cols", dict, f"tables.{kind}")
        out = {}
        optional = OPTIONAL.get(kind, {})
        for name, k in TABLES[kind].items():
            c = cols_in.get(name)
            if c is None and name in optional:
                continue        # an older tracer's batch: filled in below
            out[name] = _column(kind, name, k, c, n, strings, strarr)
        tables[kind] = complete(kind, out)
    meta = env.get("meta") or {}
    counters = env.get("counters") or {}
    hist = env.get("hist") or {}
    if not isinstance(meta, dict) or not isinstance(counters, dict) or not isinstance(hist, dict):
        raise CodecError("malformed batch: meta, counters and hist must be maps")
    _check_meta(meta, counters, hist)
    return Batch(node, seq, tables, counters, hist, meta)


def unpack(payload: bytes):
    """msgpack-unpack one payload with size limits; raises CodecError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"malformed batch: frame is {type(payload).__name__}, expected bytes")
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(f"oversized batch: {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except msgpack.ExtraData as e:
        raise CodecError("malformed batch: trailing bytes after the envelope") from e
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise CodecError(f"malformed or truncated batch: {e}") from e


def decode(frames) -> Batch:
    """Decode ZeroMQ frames produced by :func:`encode`; raises :class:`CodecError`."""
    if isinstance(frames, (bytes, bytearray, memoryview)):
        frames = [frames]
    if not isinstance(frames, (list, tuple)):
        raise CodecError(f"malformed batch: frames are {type(frames).__name__}, expected a list")
    if len(frames) != 1:
        raise CodecError(f"malformed batch: {len(frames)} frames, expected 1")
    return decode_obj(unpack(bytes(frames[0])))
