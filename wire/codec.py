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

import msgpack
import numpy as np

from .schema import OPTIONAL, SCHEMA_VERSION, TABLES, Batch, complete

#: versions this build reads: schema 1 lacks only columns that OPTIONAL fills in
SUPPORTED_VERSIONS = (1, SCHEMA_VERSION)

MAX_FRAME_BYTES = 64 << 20   # a batch larger than this is refused on both sides
MAX_ROWS = 4 << 20           # rows per table
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
    size = np.dtype(_CODES[code]).itemsize
    if size >= 4 and n >= 16:
        uniq, inv = np.unique(a, return_inverse=True)
        icode = _min_uint(len(uniq) - 1)
        isize = np.dtype(_CODES[icode]).itemsize
        if n * isize + len(uniq) * size < n * size:
            return ["d" + icode, 0, inv.reshape(-1).astype(_CODES[icode]).tobytes(), code,
                    uniq.astype(_CODES[code]).tobytes()]
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
    if not isinstance(v, typ):
        raise CodecError(f"malformed batch: {where}.{key} is {type(v).__name__}, "
                         f"expected {getattr(typ, '__name__', typ)}")
    return v


def decode_obj(env) -> Batch:
    """Validate an unpacked envelope and turn it into a :class:`Batch`."""
    if not isinstance(env, dict):
        raise CodecError(f"malformed batch: top level is {type(env).__name__}, expected a map")
    v = env.get("v")
    if v not in SUPPORTED_VERSIONS:
        raise CodecError(f"unsupported schema version {v!r} (this build speaks {SCHEMA_VERSION}); "
                         "upgrade the older side")
    node = _req(env, "node", str, "batch")
    seq = _req(env, "seq", int, "batch")
    strings = _req(env, "strings", list, "batch")
    if not all(isinstance(s, str) for s in strings):
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
            if not (isinstance(c, list) and len(c) in (3, 5) and isinstance(c[0], str)
                    and isinstance(c[1], int) and isinstance(c[2], bytes)):
                raise CodecError(f"malformed batch: tables.{kind}.cols.{name} missing or not "
                                 "[code, base, bytes]")
            code, base, raw = c[:3]
            mode = ""
            if code[:1] in ("z", "s", "d"):
                mode, code = code[0], code[1:]
            if (mode == "d") != (len(c) == 5):
                raise CodecError(f"malformed batch: tables.{kind}.cols.{name} dictionary form wrong")
            dt_name = _CODES.get(code)
            if dt_name is None:
                raise CodecError(f"malformed batch: tables.{kind}.cols.{name} has unknown type {code!r}")
            dt = _DTYPES[dt_name]
            if len(raw) != n * dt.itemsize:
                raise CodecError(f"truncated batch: tables.{kind}.cols.{name} has {len(raw)} bytes, "
                                 f"expected {n * dt.itemsize}")
            a = np.frombuffer(raw, dtype=dt)
            if mode == "s":
                if n and int(a.max()) >= len(strings):
                    raise CodecError(f"malformed batch: tables.{kind}.cols.{name} indexes past "
                                     "the string table")
                out[name] = strarr[a.astype(np.intp)]
            elif mode == "d":
                vdt = _CODES.get(c[3]) if isinstance(c[3], str) else None
                if vdt is None or not isinstance(c[4], bytes) or len(c[4]) % _DTYPES[vdt].itemsize:
                    raise CodecError(f"malformed batch: tables.{kind}.cols.{name} bad dictionary")
                vals = np.frombuffer(c[4], dtype=_DTYPES[vdt])
                if n and int(a.max()) >= len(vals):
                    raise CodecError(f"malformed batch: tables.{kind}.cols.{name} indexes past "
                                     "its dictionary")
                v = vals[a.astype(np.intp)]
                out[name] = v.astype(np.int64) if k == "i" else v.astype(np.uint64)
            elif mode == "z":
                z = a.astype(np.uint64)
                d = (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
                out[name] = (np.cumsum(d) + base).astype(np.uint64)
            elif k == "i":
                out[name] = a.astype(np.int64)
            else:
                out[name] = a.astype(np.uint64)
        tables[kind] = complete(kind, out)
    meta = env.get("meta") or {}
    counters = env.get("counters") or {}
    hist = env.get("hist") or {}
    if not isinstance(meta, dict) or not isinstance(counters, dict) or not isinstance(hist, dict):
        raise CodecError("malformed batch: meta, counters and hist must be maps")
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
    if len(frames) != 1:
        raise CodecError(f"malformed batch: {len(frames)} frames, expected 1")
    return decode_obj(unpack(bytes(frames[0])))
