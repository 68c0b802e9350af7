"""The lake: batches and verdicts as Parquet files any engine can read (DuckDB, Spark,
ClickHouse, pandas), at a local path, a shared filesystem or an object store (fsspec URL).

Layout (Hive partitioning, dates in UTC)::

    <url>/<dataset>/date=YYYY-MM-DD/node=<node>/<segment>.parquet

Datasets: one per event table of :data:`~stallscope.wire.schema.TABLES` (its columns, plus
``bid`` and ``seq``: the identity and sequence of the batch a row came from), ``batch`` (one
row per batch: identity, times, counters as JSON, and meta (less its clock), clock and
histograms as msgpack: together they rebuild the batch exactly) and ``verdicts`` (one row per
verdict, flat columns for SQL plus the full verdict JSON). A batch's rows all go to the date
of its wall time (``meta.clock.sent_ns``; without it, its newest row), so a batch never
splits. The node is percent-encoded as Hive does (DuckDB, Spark and pyarrow decode it back).

A batch is identified by (node, boot id, delivery seq) from ``meta.delivery``, as the
collector's store does; a batch without one by (node, seq, ``meta.clock.sent_ns``). Segments
of one write share a name, derived from the identities they hold, so rewriting the same batches
after a crash replaces the files instead of adding copies; :class:`LakeReader` drops any
duplicate that got in anyway. The ``batch`` file of a segment is written last: it is the
commit mark, and table rows whose batch has no ``batch`` row are ignored by the reader.

Every file appears whole or not at all: on a local or shared filesystem it is written as
``.tmp-*`` beside its final name, fsynced and renamed; on an object store (s3, gcs, azure,
memory) it is one PUT. Readers (this one, DuckDB's ``*.parquet`` globs, Spark, pyarrow)
skip names starting with ``.`` or ``_``.

pyarrow and fsspec (``pip install 'stallscope[fleet]'``) are imported inside the functions:
this module imports without them (tracer nodes do not have them).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote

import msgpack
import numpy as np

from .schema import ABI_VERSION, OPTIONAL, SCHEMA_VERSION, TABLES, Batch, complete, table_len

#: the lake's own format version (file layout and extra columns); every file carries it
LAKE_VERSION = 1
BATCH = "batch"
VERDICTS = "verdicts"
DATASETS = (*TABLES, BATCH, VERDICTS)
#: Hive's name for a null partition value: the node "" is written under it
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
#: protocols where a file is published by a single PUT (no rename needed, none offered)
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "memory", "r2"}
_MAX_DIR = 200              # bytes of an encoded node name kept in a directory name
_META_PREFIX = "stallscope."
_MAX_DAY_S = 253402300799   # 9999-12-31T23:59:59Z: dates are clamped to what a path can name


class LakeError(RuntimeError):
    """The lake cannot be used as given: a URL no installed filesystem serves (the message
    names the package to install), a file of a newer lake format. Fatal at start-up; write
    failures at run time raise the filesystem's own errors (OSError and the like)."""


# --------------------------------------------------------------------------- paths

def open_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, root path inside it) for a lake URL or a bare path."""
    try:
        import fsspec
    except ImportError:
        raise LakeError("the lake needs pyarrow and fsspec: pip install 'stallscope[fleet]'") from None
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise LakeError("the lake needs pyarrow: pip install 'stallscope[fleet]'") from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:        # fsspec names the package: "Install s3fs to access S3"
        raise LakeError(f"lake {url}: {e}") from None
    except (ValueError, TypeError) as e:
        raise LakeError(f"lake {url}: {e}") from None
    return fs, root.rstrip("/") or "/"


def _protocol(fs) -> str:
    p = fs.protocol
    return p if isinstance(p, str) else p[0]


def _is_local(fs) -> bool:
    return _protocol(fs) in ("file", "local")


def node_dir(node: str) -> str:
    """The partition value for a node: percent-encoded (every byte but letters, digits and
    ``_.-``), "" as Hive's null; a name longer than a directory name allows is cut and ends
    with ``~`` and a hash of the whole name (the name itself is in each file's metadata)."""
    if node == "":
        return HIVE_NULL
    q = quote(node, safe="").replace("~", "%7E")
    if q == HIVE_NULL:
        q = "%5F" + q[1:]
    if len(q) > _MAX_DIR:
        cut = q[:150]
        pct = cut.rfind("%", len(cut) - 2)
        if pct >= 0:
            cut = cut[:pct]
        q = f"{cut}~{hashlib.sha256(node.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return q


def node_from_dir(value: str) -> str | None:
    """The node a partition value names, or None for a cut name (read it from a file)."""
    if value == HIVE_NULL:
        return ""
    if "~" in value:
        return None
    return unquote(value)


def day_of(ns: int) -> str:
    """UTC date (YYYY-MM-DD) of a wall-clock time in ns."""
    s = min(max(int(ns) // 1_000_000_000, 0), _MAX_DAY_S)
    return datetime.datetime.fromtimestamp(s, tz=datetime.timezone.utc).strftime("%Y-%m-%d")


def _day_range(since_ns, until_ns):
    lo = day_of(since_ns) if since_ns is not None else None
    hi = day_of(until_ns) if until_ns is not None else None
    return lo, hi


# --------------------------------------------------------------------------- batch identity

def batch_identity(b: Batch) -> tuple:
    """(bid, boot_id, dseq, sent_ns, wall_ns) of a batch: ``bid`` names it within its node."""
    meta = b.meta or {}
    d = meta.get("delivery")
    boot, dseq = "", None
    if isinstance(d, dict) and isinstance(d.get("seq"), int) and not isinstance(d.get("seq"), bool):
        boot, dseq = str(d.get("boot_id") or ""), int(d["seq"])
    clock = meta.get("clock")
    sent = clock.get("sent_ns") if isinstance(clock, dict) else None
    sent = int(sent) if isinstance(sent, (int, float)) and not isinstance(sent, bool) and sent > 0 else None
    bid = f"{boot}:{dseq}" if dseq is not None else f"~{int(b.seq)}:{sent or 0}"
    wall = sent
    if wall is None:
        wall = 0
        for t in (b.tables or {}).values():
            ts = t.get("ts_ns") if isinstance(t, dict) else None
            if ts is not None and len(ts):
                wall = max(wall, int(np.max(np.asarray(ts, dtype=np.uint64))))
    return bid, boot, dseq, sent, wall


def _segment_name(prefix: str, first, last, ids) -> str:
    h = hashlib.blake2b("\n".join(ids).encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{prefix}-{first}-{last}-{h}"


def _boot_tag(boot: str) -> str:
    tag = "".join(c for c in boot if c.isascii() and c.isalnum())[:8]
    return tag or "nb"


# --------------------------------------------------------------------------- writing

def _msgpack_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialize {type(o).__name__} in batch meta")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    raise TypeError(f"cannot serialize {type(o).__name__}")


def _file_meta(dataset: str, node: str) -> dict:
    return {f"{_META_PREFIX}lake_version": str(LAKE_VERSION),
            f"{_META_PREFIX}schema_version": str(SCHEMA_VERSION),
            f"{_META_PREFIX}abi_version": str(ABI_VERSION),
            f"{_META_PREFIX}dataset": dataset, f"{_META_PREFIX}node": node}


def _put(fs, path: str, table) -> None:
    """Publish one Parquet file atomically (see the module docstring)."""
    import pyarrow.parquet as pq
    d, name = path.rsplit("/", 1)
    if _is_local(fs):
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/.tmp-{name}-{uuid.uuid4().hex[:12]}"
        try:
            pq.write_table(table, tmp, compression="zstd")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:                                    # the rename itself survives a power cut
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return
    import pyarrow as pa
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    if _protocol(fs) in OBJECT_STORES:
        fs.pipe_file(path, data)                # one PUT: the object appears whole or not at all
        return
    fs.makedirs(d, exist_ok=True)               # another filesystem (sftp, hdfs...): write, then rename
    tmp = f"{d}/.tmp-{name}-{uuid.uuid4().hex[:12]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _arrow_col(kind: str, values):
    import pyarrow as pa
    if kind == "s":
        return pa.array(np.asarray(values, dtype=object), type=pa.string())
    return pa.array(np.asarray(values).astype(np.int64 if kind == "i" else np.uint64))


def _table_for(kind: str, group: list):
    """One dataset's rows for a group of (bid, batch): the schema's columns plus bid, seq."""
    import pyarrow as pa
    spec = TABLES[kind]
    parts, bids, seqs, lens = [], [], [], []
    for bid, b in group:
        t = (b.tables or {}).get(kind)
        if not t:
            continue
        n = table_len(t)
        if not n:
            continue
        t = complete(kind, t)
        for c in spec:
            if c not in t:
                raise ValueError(f"node {b.node!r} batch {b.seq}: table {kind!r} has no column {c!r}")
            if len(t[c]) != n:
                raise ValueError(f"node {b.node!r} batch {b.seq}: table {kind!r} column {c!r} has "
                                 f"{len(t[c])} rows, expected {n}")
        parts.append(t)
        bids.append(bid)
        seqs.append(int(b.seq))
        lens.append(n)
    if not parts:
        return None
    cols = {"bid": pa.array(np.repeat(np.array(bids, dtype=object), lens), type=pa.string()),
            "seq": pa.array(np.repeat(np.array(seqs, dtype=np.int64), lens))}
    for c, k in spec.items():
        cols[c] = _arrow_col(k, np.concatenate([np.asarray(p[c]) for p in parts]))
    return pa.table(cols)


def _batch_table(group: list, ident: dict):
    import pyarrow as pa
    rows = {k: [] for k in ("bid", "seq", "boot_id", "dseq", "sent_ns", "wall_ns", "final",
                            "n_events", "rows", "tables", "counters", "meta", "clock", "hist",
                            "clock_sent_ns", "clock_unc_ns", "clock_ntp_synced")}
    pack = functools.partial(msgpack.packb, use_bin_type=True, default=_msgpack_default)
    for bid, b in group:
        _bid, boot, dseq, sent, wall = ident[bid]
        kinds = [k for k in TABLES if table_len((b.tables or {}).get(k) or {})]
        meta = dict(b.meta or {})
        rows["bid"].append(bid)
        rows["seq"].append(int(b.seq))
        rows["boot_id"].append(boot)
        rows["dseq"].append(dseq)
        rows["sent_ns"].append(sent)
        rows["wall_ns"].append(wall)
        rows["final"].append(bool(meta.get("final", False)))
        rows["n_events"].append(int(b.n_events()))
        rows["rows"].append(sum(table_len(b.tables[k]) for k in kinds))
        rows["tables"].append(",".join(kinds))
        # JSON keeps int and float apart and ints of any size: the counters come back exact
        rows["counters"].append(json.dumps(b.counters or {}, default=_json_default))
        # the clock changes every batch, the rest of meta and the histograms seldom: apart, they
        # are dictionary-coded in the file and unpacked once per distinct value on reading
        clock = meta.get("clock")
        rows["clock"].append(pack(meta.pop("clock")) if "clock" in meta else None)
        # what readers take of every clock, flat (the fleet report reads these, not the clock):
        # sent_ns (0 when none), uncertainty_ns (null when none or 0), ntp_synced (null unless
        # a boolean)
        c = clock if isinstance(clock, dict) else {}
        rows["clock_sent_ns"].append(_int_or(c.get("sent_ns"), 0))
        rows["clock_unc_ns"].append(_int_or(c.get("uncertainty_ns"), 0) or None)
        ntp = c.get("ntp_synced")
        rows["clock_ntp_synced"].append(ntp if isinstance(ntp, bool) else None)
        rows["meta"].append(pack(meta))
        rows["hist"].append(pack(b.hist or {}))
    types = {"bid": pa.string(), "seq": pa.int64(), "boot_id": pa.string(), "dseq": pa.int64(),
             "sent_ns": pa.int64(), "wall_ns": pa.int64(), "final": pa.bool_(), "n_events": pa.int64(),
             "rows": pa.int64(), "tables": pa.string(), "counters": pa.string(), "meta": pa.binary(),
             "clock": pa.binary(), "hist": pa.binary(), "clock_sent_ns": pa.int64(),
             "clock_unc_ns": pa.int64(), "clock_ntp_synced": pa.bool_()}
    return pa.table({k: pa.array(v, type=types[k]) for k, v in rows.items()})


def _int_or(v, default: int) -> int:
    """``int(v)`` for a number that fits int64 (not a boolean), else ``default``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            i = int(v)
        except (OverflowError, ValueError):
            return default
        if -(1 << 63) <= i < (1 << 63):
            return i
    return default


def _tops_of(counters) -> dict:
    """The highest value of each numeric counter over ``counters`` (dicts), as ints."""
    top: dict = {}
    for c in counters:
        for k, v in (c or {}).items():
            if isinstance(v, (int, float)):
                v = int(v)
                if v > top.get(k, v - 1):
                    top[k] = v
    return top


def _publish(fs, root: str, dataset: str, day: str, node: str, name: str, table, extra=None) -> str:
    table = table.replace_schema_metadata({**_file_meta(dataset, node), **(extra or {})})
    path = f"{root}/{dataset}/date={day}/node={node_dir(node)}/{name}.parquet"
    _put(fs, path, table)
    return fs.unstrip_protocol(path)


def write_batches(url: str, node: str, batches: list, storage_options: dict | None = None) -> list:
    """Write one node's batches: one segment per (dataset, date), each file atomic, the
    ``batch`` file last. Returns the URLs written. A batch whose identity is already in this
    call is skipped; one of another node is a ValueError. Write failures raise the
    filesystem's error (nothing is half-visible: rerun the same call)."""
    fs, root = open_fs(url, storage_options)
    ident: dict = {}
    by_day: dict = {}
    for b in batches:
        if b.node != node:
            raise ValueError(f"batch of node {b.node!r} given to write_batches for node {node!r}")
        i = batch_identity(b)
        if i[0] in ident:
            continue
        ident[i[0]] = i
        by_day.setdefault(day_of(i[4]), []).append((i[0], b))
    out = []
    for day in sorted(by_day):
        group = by_day[day]
        first, last = ident[group[0][0]], ident[group[-1][0]]
        name = _segment_name(_boot_tag(first[1]),
                             first[2] if first[2] is not None else int(group[0][1].seq),
                             last[2] if last[2] is not None else int(group[-1][1].seq),
                             [bid for bid, _b in group])
        for kind in TABLES:
            t = _table_for(kind, group)
            if t is not None:
                out.append(_publish(fs, root, kind, day, node, name, t))
        # the segment's counter tops, so a reader of the whole segment need not parse them all
        tops = json.dumps(_tops_of(b.counters for _bid, b in group), default=_json_default)
        out.append(_publish(fs, root, BATCH, day, node, name, _batch_table(group, ident),
                            {f"{_META_PREFIX}counter_tops": tops}))
    return out


# --------------------------------------------------------------------------- verdicts

def culprit_target(v: dict) -> str:
    """What a verdict's culprit waited on: the culprit chain's main target (file, flow, host
    and path, device, kernel function) or, without a chain, its culprit stall's."""
    chain = v.get("chain")
    if isinstance(chain, dict) and chain.get("targets"):
        t = chain["targets"][0]
        if isinstance(t, dict) and t.get("name"):
            return str(t["name"])
    c = v.get("culprit")
    if not isinstance(c, dict):
        return ""
    kind = c.get("type")
    if kind in ("io", "nfs"):
        return str(c.get("path") or "")
    if kind == "net":
        return f"{c.get('saddr')}:{c.get('sport')}->{c.get('daddr')}:{c.get('dport')}"
    if kind == "http":
        return f"{c.get('host') or ''}{c.get('path') or ''}"
    if kind in ("block", "rdma"):
        return str(c.get("device") or "")
    if kind == "sched":
        if c.get("op") == "runq":
            return f"{c.get('other_comm') or '?'} pid {c.get('other_pid', 0)}"
        return str(c.get("reason") or "")
    return str(c.get("op") or "")


_VERDICT_COLS = ("gpu", "gpu_uuid", "idle_start_ns", "idle_end_ns", "duration_ns", "lost_ns",
                 "explained_ns", "verdict", "class", "remote", "culprit_type", "culprit_op",
                 "culprit_path", "culprit_pid", "culprit_comm", "culprit_node",
                 "explained_fraction", "job", "rank", "json")


def _int_or_none(v):
    if isinstance(v, bool) or v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _verdict_row(node: str, v: dict) -> dict:
    culprit = v.get("culprit")
    c: dict = culprit if isinstance(culprit, dict) else {}
    lost = _int_or_none(v.get("lost_ns"))
    frac = float(v.get("explained_fraction") or 0.0)
    start, end = int(v["idle_start_ns"]), int(v["idle_end_ns"])
    return {
        "gpu": _int_or_none(v.get("gpu")), "gpu_uuid": str(v.get("gpu_uuid") or ""),
        "idle_start_ns": start, "idle_end_ns": end, "duration_ns": end - start, "lost_ns": lost,
        "explained_ns": None if lost is None else int(round(frac * lost)),
        "verdict": str(v.get("verdict") or ""), "class": v.get("class"), "remote": bool(v.get("remote")),
        "culprit_type": c.get("type"), "culprit_op": c.get("op"),
        "culprit_path": culprit_target(v) if c else None, "culprit_pid": _int_or_none(c.get("pid")),
        "culprit_comm": c.get("comm"),
        "culprit_node": (v.get("culprit_node") or c.get("node") or node) if c else None,
        "explained_fraction": frac, "job": str(v.get("job") or ""), "rank": _int_or_none(v.get("rank")),
        "json": json.dumps(v, default=_json_default, separators=(",", ":"), sort_keys=True),
    }


def write_verdicts(url: str, node: str, verdicts: list, storage_options: dict | None = None) -> list:
    """Write one node's verdicts (dicts as ``Verdict.to_json()`` gives them, ``lost_ns`` added
    where known) to the ``verdicts`` dataset, one atomic segment per date of ``idle_start_ns``.
    Returns the URLs written."""
    import pyarrow as pa
    fs, root = open_fs(url, storage_options)
    by_day: dict = {}
    for v in verdicts:
        if v.get("node", node) != node:
            raise ValueError(f"verdict of node {v.get('node')!r} given to write_verdicts for node {node!r}")
        row = _verdict_row(node, v)
        by_day.setdefault(day_of(row["idle_start_ns"]), []).append(row)
    types = {"gpu": pa.int64(), "gpu_uuid": pa.string(), "idle_start_ns": pa.int64(),
             "idle_end_ns": pa.int64(), "duration_ns": pa.int64(), "lost_ns": pa.int64(),
             "explained_ns": pa.int64(), "verdict": pa.string(), "class": pa.string(),
             "remote": pa.bool_(), "culprit_type": pa.string(), "culprit_op": pa.string(),
             "culprit_path": pa.string(), "culprit_pid": pa.int64(), "culprit_comm": pa.string(),
             "culprit_node": pa.string(), "explained_fraction": pa.float64(), "job": pa.string(),
             "rank": pa.int64(), "json": pa.string()}
    out = []
    for day in sorted(by_day):
        rows = by_day[day]
        starts = [r["idle_start_ns"] for r in rows]
        name = _segment_name("v", min(starts), max(starts), [r["json"] for r in rows])
        table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in _VERDICT_COLS})
        out.append(_publish(fs, root, VERDICTS, day, node, name, table))
    return out


# --------------------------------------------------------------------------- reading

def _check_version(meta: dict | None, path: str) -> None:
    v = (meta or {}).get(f"{_META_PREFIX}lake_version".encode())
    if v is not None and int(v) > LAKE_VERSION:
        raise LakeError(f"{path}: lake format {int(v)}, this build reads up to {LAKE_VERSION}; "
                        "upgrade stallscope")


def _visible(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector paused for the block: building many small acyclic objects
    (a node's batches, its verdicts) is then not slowed by collections that rescan them all."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class NodeColumns:
    """One node's batches as columns (:meth:`LakeReader.columns`): ``batches`` how many;
    ``tables`` kind -> table, the batches' rows joined in batch order; ``meta_runs`` [(n,
    meta)], the batches' meta less the clock, n batches in a row sharing one value; ``clocks``
    each batch's ``meta.clock`` (None where it had none); ``counters`` the highest value each
    numeric counter reached in any batch (counters are cumulative)."""

    node: str
    batches: int
    tables: dict
    meta_runs: list
    clocks: list | None             # None: the files carry the flat clock columns below
    counters: dict
    sent_ns: np.ndarray | None = None   # each batch's clock sent_ns (0: none), with clocks None
    unc_ns: int = 0                     # the largest clock uncertainty_ns
    unsynced: bool = False              # a clock said ntp_synced false


class LakeReader:
    """Reads a lake back: which nodes it holds, a node's batches rebuilt exactly (the
    analysis gives the same verdicts as on the batches written), the verdicts."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = open_fs(url, storage_options)
        self._local = _is_local(self.fs)

    # listing -------------------------------------------------------------
    def _ls(self, path: str) -> list:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _days(self, dataset: str, since_ns=None, until_ns=None) -> list:
        lo, hi = _day_range(since_ns, until_ns)
        out = []
        for name in self._ls(f"{self.root}/{dataset}"):
            if not name.startswith("date="):
                continue
            day = name[5:]
            if (lo is None or day >= lo) and (hi is None or day <= hi):
                out.append(day)
        return sorted(out)

    def _files(self, dataset: str, day: str, ndir: str) -> list:
        d = f"{self.root}/{dataset}/date={day}/node={ndir}"
        return [f"{d}/{n}" for n in sorted(self._ls(d)) if _visible(n)]

    def _read(self, path: str, columns=None, drop=()):
        """The file's table: ``columns`` (all when None) less ``drop`` (not decoded at all)."""
        import pyarrow.parquet as pq

        def read(pf):
            cols = columns
            if drop:
                cols = [c for c in (columns or pf.schema_arrow.names) if c not in drop]
            return pf.read(columns=cols, use_threads=False)    # Dask workers are the parallelism
        if self._local:                 # pyarrow's own file access: no Python file object in between
            t = read(pq.ParquetFile(path))
        else:
            with self.fs.open(path, "rb") as f:
                t = read(pq.ParquetFile(f))
        _check_version(t.schema.metadata, path)
        return t

    def _node_of(self, dataset: str, day: str, value: str) -> str | None:
        node = node_from_dir(value)
        if node is not None:
            return node
        import pyarrow.parquet as pq
        for path in self._files(dataset, day, value):
            with self.fs.open(path, "rb") as f:
                meta = pq.read_schema(f).metadata or {}
            name = meta.get(f"{_META_PREFIX}node".encode())
            if name is not None:
                return name.decode("utf-8", "surrogatepass")
        return None

    def nodes(self, since_ns: int | None = None, until_ns: int | None = None) -> list:
        """Nodes with batches on the dates from ``since_ns`` to ``until_ns`` (UTC dates of
        wall-clock ns; None: no bound), from the partition names."""
        found = set()
        for day in self._days(BATCH, since_ns, until_ns):
            for name in self._ls(f"{self.root}/{BATCH}/date={day}"):
                if name.startswith("node="):
                    node = self._node_of(BATCH, day, name[5:])
                    if node is not None:
                        found.add(node)
        return sorted(found)

    # batches -------------------------------------------------------------
    def batches(self, node: str, since_ns: int | None = None, until_ns: int | None = None) -> list:
        """The node's batches whose wall time is in [since_ns, until_ns), each once, in seq
        order (ties: wall time), with the tables :func:`stallscope.wire.codec.decode` would
        give (only the non-empty ones; u -> uint64, i -> int64, s -> object arrays of str;
        columns newer than the file filled as decode fills them). Batches whose histograms, or
        meta values other than the clock, are equal may share those objects: treat them as
        read-only."""
        with gc_paused():       # many small acyclic objects: the cyclic GC's passes over them
            return self._batches(node, since_ns, until_ns)     # were half a node-hour's read

    def _batches(self, node: str, since_ns, until_ns) -> list:
        ndir = node_dir(node)
        days = self._days(BATCH, since_ns, until_ns)
        owner: dict = {}            # bid -> (day, segment file name)
        info: dict = {}             # bid -> (seq, wall_ns, counters, meta, clock, hist)
        bcols = ("bid", "seq", "wall_ns", "counters", "meta", "clock", "hist")
        for day in days:
            for path in self._files(BATCH, day, ndir):
                t = self._read(path, list(bcols))
                seg = (day, path.rsplit("/", 1)[1])
                for bid, seq, wall, *rest in zip(*(t.column(c).to_pylist() for c in bcols)):
                    if bid in owner:
                        continue            # a copy from another segment (a rewrite): first one wins
                    if since_ns is not None and wall < since_ns:
                        continue
                    if until_ns is not None and wall >= until_ns:
                        continue
                    owner[bid] = seg
                    info[bid] = (seq, wall, *rest)
        segs = set(owner.values())
        rows: dict = {bid: {} for bid in owner}
        for kind, spec in TABLES.items():
            for day in days:
                for path in self._files(kind, day, ndir):
                    seg = (day, path.rsplit("/", 1)[1])
                    if seg not in segs:
                        continue
                    t = self._read(path)
                    bid_col = t.column("bid").to_numpy(zero_copy_only=False)
                    if not len(bid_col):
                        continue
                    have = set(t.column_names)
                    lacking = [c for c in spec if c not in have and c not in OPTIONAL.get(kind, {})]
                    if lacking:
                        raise LakeError(f"{path}: no column {lacking[0]!r} (not a stallscope lake file?)")
                    # a column added to the schema after the file was written: filled in below,
                    # as decode fills an older tracer's batch (schema.OPTIONAL)
                    cols = {c: _numpy(t.column(c), k) for c, k in spec.items() if c in have}
                    cut = np.flatnonzero(bid_col[1:] != bid_col[:-1]) + 1
                    bounds = [0, *cut.tolist(), len(bid_col)]
                    for a, b in zip(bounds[:-1], bounds[1:]):
                        bid = bid_col[a]
                        if owner.get(bid) != seg:
                            continue
                        rows[bid].setdefault(kind, []).append({c: v[a:b] for c, v in cols.items()})
        out = []
        unpacked: dict = {}         # msgpack bytes -> value: meta and histograms repeat
        for bid, (seq, wall, counters, meta_b, clock_b, hist_b) in info.items():
            meta = unpacked.get(meta_b)
            if meta is None:
                meta = unpacked[meta_b] = _unpack(meta_b)
            hist = unpacked.get(hist_b)
            if hist is None:
                hist = unpacked[hist_b] = _unpack(hist_b)
            meta = dict(meta)
            if clock_b is not None:
                meta["clock"] = _unpack(clock_b)
            tables = {}
            for kind in TABLES:
                parts = rows[bid].get(kind)
                if parts:
                    tables[kind] = complete(kind, parts[0] if len(parts) == 1 else {
                        c: np.concatenate([p[c] for p in parts]) for c in parts[0]})
            out.append((seq, wall, bid, Batch(node, seq, tables, json.loads(counters), hist, meta)))
        out.sort(key=lambda x: x[:3])
        return [x[3] for x in out]

    # a node's columns --------------------------------------------------------
    def columns(self, node: str, since_ns: int | None = None, until_ns: int | None = None) -> NodeColumns:
        """What :meth:`batches` holds, without building a batch: each table already joined in
        batch order (the rows :meth:`batches` would give, concatenated), the batches' meta in
        runs of identical values, their clocks and the highest value of each counter. The fleet
        report reads a node this way: a node-hour is 14,400 batches of 250 ms, and building them
        costs more than analysing their rows."""
        with gc_paused():
            return self._columns(node, since_ns, until_ns)

    def _columns(self, node: str, since_ns, until_ns) -> NodeColumns:
        import pyarrow as pa
        import pyarrow.compute as pc
        ndir = node_dir(node)
        days = self._days(BATCH, since_ns, until_ns)
        bcols = ["bid", "seq", "wall_ns", "counters", "meta", "clock"]
        flat_cols = ["clock_sent_ns", "clock_unc_ns", "clock_ntp_synced"]
        parts, segs, file_tops = [], [], []
        for day in days:
            for path in self._files(BATCH, day, ndir):
                t = self._read(path, drop=("hist", "tables", "boot_id", "dseq", "final", "n_events", "rows"))
                parts.append(t)
                segs.append((day, path.rsplit("/", 1)[1]))
                tops = (t.schema.metadata or {}).get(f"{_META_PREFIX}counter_tops".encode())
                file_tops.append(None if tops is None else json.loads(tops))
        if not parts:
            return NodeColumns(node, 0, {}, [], [], {})
        flat = all(all(c in t.column_names for c in flat_cols) for t in parts)
        parts = [t.select(bcols + (flat_cols if flat else [])).replace_schema_metadata(None) for t in parts]
        seg_of = np.repeat(np.arange(len(parts)), [t.num_rows for t in parts])
        bt = pa.concat_tables(parts)
        seq = bt.column("seq").to_numpy()
        wall = bt.column("wall_ns").to_numpy()
        nb = len(seq)
        in_span = np.ones(nb, dtype=bool)
        if since_ns is not None:
            in_span &= wall >= since_ns
        if until_ns is not None:
            in_span &= wall < until_ns
        # the common case: no copy of a batch, every batch in the span, batch seqs unique (no
        # tracer restart in it): batch order is seq order, a row's batch position its seq's
        # rank, and no bid is made a Python string
        by_seq = (bool(in_span.all()) and len(np.unique(seq)) == nb
                  and pc.count_distinct(bt.column("bid")).as_py() == nb)
        pos: dict = {}
        owner: dict = {}
        if by_seq:
            order = np.argsort(seq, kind="stable")
            whole = True
        else:
            bid = np.asarray(bt.column("bid").to_pylist(), dtype=object)
            # the first copy of each batch wins (file order), inside [since, until): as batches()
            _u, first = np.unique(bid, return_index=True)
            keep = np.zeros(nb, dtype=bool)
            keep[first] = True
            keep &= in_span
            rows = np.flatnonzero(keep)
            order = rows[np.lexsort((bid[rows], wall[rows], seq[rows]))]       # seq, wall, bid
            whole = len(rows) == nb             # no copy, nothing outside the span: every row counts
        seq_sorted = seq[order] if by_seq else np.empty(0, np.int64)
        if not by_seq:
            pos = {b: i for i, b in enumerate(bid[order])}                  # bid -> batch position
            owner = {b: segs[int(seg_of[r])] for b, r in zip(bid[order], order)}
        tables = {}
        for kind, spec in TABLES.items():
            chunks, where = [], []
            for day in days:
                for path in self._files(kind, day, ndir):
                    seg = (day, path.rsplit("/", 1)[1])
                    if seg not in segs:
                        continue
                    if by_seq:
                        t = self._read(path, drop=("bid",))
                    else:
                        t = self._read(path)
                    if not t.num_rows:
                        continue
                    have = set(t.column_names)
                    lacking = [c for c in spec if c not in have and c not in OPTIONAL.get(kind, {})]
                    if lacking:
                        raise LakeError(f"{path}: no column {lacking[0]!r} (not a stallscope lake file?)")
                    if by_seq:
                        fseq = t.column("seq").to_numpy()
                        at = np.searchsorted(seq_sorted, fseq)
                        at[(at >= len(seq_sorted)) | (seq_sorted[np.minimum(at, len(seq_sorted) - 1)] != fseq)] = -1
                    else:
                        enc = t.column("bid").combine_chunks().dictionary_encode()
                        names = enc.dictionary.to_pylist()
                        at = np.array([pos.get(b, -1) if whole or owner.get(b) == seg else -1 for b in names],
                                      dtype=np.int64)[enc.indices.to_numpy()]
                    sel = np.flatnonzero(at >= 0)
                    if not len(sel):
                        continue
                    cols = {c: _numpy(t.column(c), k) for c, k in spec.items() if c in have}
                    if len(sel) < t.num_rows:
                        cols = {c: v[sel] for c, v in cols.items()}
                    chunks.append(cols)
                    where.append(at[sel])
            if not chunks:
                continue
            at = np.concatenate(where)
            o = np.argsort(at, kind="stable")           # batch order; a batch's rows keep theirs
            if len(chunks) == 1:
                joined = chunks[0]
            else:
                joined = {c: np.concatenate([ch[c] for ch in chunks]) for c in chunks[0]}
            if len(o) > 1 and np.any(o[1:] < o[:-1]):
                joined = {c: v[o] for c, v in joined.items()}
            tables[kind] = complete(kind, joined)
        # meta: runs of identical values (a tracer's meta changes seldom), clocks, counters;
        # per-batch values stay in Arrow until they must become Python objects
        ordered = bt if np.array_equal(order, np.arange(nb)) else bt.take(pa.array(order))
        enc = ordered.column("meta").combine_chunks().dictionary_encode()
        idx = enc.indices.to_numpy(zero_copy_only=False)
        cut = np.flatnonzero(idx[1:] != idx[:-1]) + 1
        bounds = [0, *cut.tolist(), len(idx)]
        values = enc.dictionary.to_pylist()
        unpacked: dict = {}
        runs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                v = int(idx[a])
                if v not in unpacked:
                    unpacked[v] = _unpack(values[v])
                runs.append((b - a, unpacked[v]))
        if whole and all(x is not None for x in file_tops):
            counters = _tops_of(file_tops)      # every batch of every segment counts
        else:
            counters = _counter_tops(ordered.column("counters").combine_chunks())
        if flat:
            unc = pc.max(ordered.column("clock_unc_ns")).as_py()
            ntp = ordered.column("clock_ntp_synced").combine_chunks()
            return NodeColumns(node, len(order), tables, runs, None, counters,
                               sent_ns=ordered.column("clock_sent_ns").to_numpy(),
                               unc_ns=int(unc or 0),
                               unsynced=bool(pc.any(pc.invert(ntp.filter(ntp.is_valid()))).as_py() or False))
        clock_col = ordered.column("clock").combine_chunks()
        clocks: list = [None] * len(order)     # one msgpack stream: unpacked in one C loop
        valid = np.flatnonzero(clock_col.is_valid().to_numpy(zero_copy_only=False))
        if len(valid):
            un = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
            un.feed(_joined(clock_col.filter(clock_col.is_valid()), b""))
            for i, c in zip(valid.tolist(), un):
                clocks[i] = c
        return NodeColumns(node, len(order), tables, runs, clocks, counters)

    # verdicts ------------------------------------------------------------
    def verdicts(self, node: str | None = None, since_ns: int | None = None,
                 until_ns: int | None = None) -> list:
        """Verdict dicts (as written) with ``idle_start_ns`` in [since_ns, until_ns), of one
        node or all, sorted by node, gpu, idle_start_ns; an identical verdict once."""
        out, seen = [], set()
        for day in self._days(VERDICTS, since_ns, until_ns):
            if node is not None:
                dirs = [node_dir(node)]
            else:
                dirs = [n[5:] for n in self._ls(f"{self.root}/{VERDICTS}/date={day}") if n.startswith("node=")]
            for nd in dirs:
                for path in self._files(VERDICTS, day, nd):
                    for s, j in zip(*(self._read(path, ["idle_start_ns", "json"]).column(c).to_pylist()
                                      for c in ("idle_start_ns", "json"))):
                        if j in seen or (since_ns is not None and s < since_ns) or \
                                (until_ns is not None and s >= until_ns):
                            continue
                        seen.add(j)
                        out.append(json.loads(j))
        out.sort(key=lambda v: (str(v.get("node", "")), v.get("gpu", 0), v.get("idle_start_ns", 0)))
        return out


def _joined(arr, sep: bytes) -> bytes:
    """The values of a string or binary Arrow array (no nulls), each followed by ``sep``, as
    one bytes object: the array's own data buffer when ``sep`` is empty."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if sep:
        arr = pc.binary_join_element_wise(arr, pa.scalar(sep, arr.type), pa.scalar(b"", arr.type))
    arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
    if not len(arr):
        return b""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32 if arr.type in (pa.string(), pa.binary())
                            else np.int64)[arr.offset:arr.offset + len(arr) + 1]
    return arr.buffers()[2].to_pybytes()[int(offsets[0]):int(offsets[-1])]


def _counter_tops(col) -> dict:
    """The highest value each numeric counter has in the JSON objects of the string array
    ``col`` (absent, null, or not a number in an object: that object does not count for
    it). pyarrow's JSON reader takes the lot at once; Python's parser where pyarrow cannot
    type a column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    top: dict = {}
    if not len(col):
        return top
    col = col.filter(col.is_valid())
    try:
        t = pj.read_json(pa.BufferReader(_joined(col, b"\n")),
                         read_options=pj.ReadOptions(block_size=1 << 26, use_threads=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        t = None
    if t is not None and all(pa.types.is_integer(f.type) or pa.types.is_boolean(f.type)
                             or pa.types.is_null(f.type) for f in t.schema):
        for name in t.column_names:
            col = t.column(name)
            if col.null_count < len(col):
                top[name] = int(pc.max(col).as_py())
        return top
    return _tops_of(json.loads("[" + ",".join(col.to_pylist()) + "]"))   # floats or odd values: exact, slower


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _numpy(col, kind: str) -> np.ndarray:
    if kind == "s":
        a = col.to_numpy(zero_copy_only=False)
        return a if a.dtype == object else a.astype(object)
    return np.asarray(col.to_numpy(), dtype=np.int64 if kind == "i" else np.uint64)
