"""Turn drained kernel records (RECORD_DTYPE arrays) into event tables, in bulk.

:func:`split` gives each record type to its family's ``decode`` (tracer/families/);
the column helpers here are what those share.

Strings (comm, path) are decoded once per distinct value per drain, not once
per record, so the cost per record is a few numpy operations.
"""

from __future__ import annotations

import os
import socket

import numpy as np

from stallscope.wire.codec import unique_runs
from stallscope.wire.schema import DEFINES, OP_NAMES, PATH_LEN, Cat, concat_tables

PATH_TRUNC = DEFINES["SS_F_PATH_TRUNC"]
PATH_RAW = DEFINES["SS_F_PATH_RAW"]

#: super_block.s_magic -> filesystem name (statfs(2) magic numbers)
FS_MAGIC = {
    0: "",   # not known (a path-only op such as stat, an io_uring wait)
    0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x6969: "nfs", 0x65735546: "fuse",
    0x01021994: "tmpfs", 0x794C7630: "overlay", 0x9FA0: "proc", 0x62656572: "sysfs",
    0x1373: "devtmpfs", 0x858458F6: "ramfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
    0x6E736673: "nsfs", 0x73717368: "squashfs", 0x2FC12FC1: "zfs", 0xFF534D42: "cifs",
    0xFE534D42: "smb2", 0x0BD00BD0: "lustre", 0x47504653: "gpfs", 0x5346414F: "afs",
    0x00C36400: "ceph", 0x19830326: "fhgfs", 0x0BEEFEE0: "beegfs", 0x24051905: "ubifs",
    0x4D44: "vfat", 0x2011BAB0: "exfat", 0x5346544E: "ntfs", 0xF2F52010: "f2fs",
    0xCAFE4A11: "bpf", 0x74726163: "tracefs", 0x64626720: "debugfs", 0x42494E4D: "binfmt_misc",
    0x01021997: "9p", 0x53464846: "wslfs", 0xABBA1974: "xenfs", 0x534F434B: "sockfs",
    0x50495045: "pipefs", 0x09041934: "anon_inode", 0xBAD1DEA: "futexfs",
}
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}


_K = np.uint64(0x9E3779B97F4A7C15)
#: odd multipliers of the row hash (one per 8-byte word of a bytes column)
_ROW_K = (np.arange(1, 65, dtype=np.uint64) * _K) | np.uint64(1)


def row_words(col: np.ndarray) -> np.ndarray:
    """A bytes column (a numpy ``S<w>`` array, usually a strided field of the drained
    records) as an (n, ceil(w/8)) uint64 array: a view of the same memory where the width
    is a multiple of 8 and the field 8-byte aligned, else a padded copy."""
    n, width = len(col), col.dtype.itemsize
    if width % 8 == 0 and col.ndim == 1:
        try:
            w = col[:, None].view(np.uint8).view("<u8")
            if w.ctypes.data % 8 == 0:
                return w
        except ValueError:
            pass
    raw = np.zeros((n, (width + 7) // 8 * 8), np.uint8)
    raw[:, :width] = np.ascontiguousarray(col).view(np.uint8).reshape(n, width)
    return raw.view("<u8")


def key64(col: np.ndarray) -> np.ndarray:
    """A 64-bit key per value (a bytes column: its 8-byte words folded by a multiply-xor
    chain). Not collision-free: :func:`unique_rows` is the exact way to find distinct values."""
    if col.dtype.kind in "ui":
        return col.astype(np.uint64)
    words = row_words(col)
    with np.errstate(over="ignore"):
        h = np.zeros(len(col), dtype=np.uint64)
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * _K + np.uint64(j + 1)
    return h


def unique_rows(words: np.ndarray, extra: np.ndarray | None = None):
    """(first, inverse) of the distinct rows of an (n, w) uint64 array (plus an optional
    integer column that also tells rows apart), exactly: a linear hash picks candidates,
    then every row is compared with its representative word by word; should two different
    rows share a hash (it is linear, so a crafted file name could do it), the distinct rows
    are found by sorting the bytes themselves."""
    with np.errstate(over="ignore"):
        h = np.ascontiguousarray(words) @ _ROW_K[:words.shape[1]] if words.shape[1] else \
            np.zeros(len(words), np.uint64)
        if extra is not None:
            h = h ^ (extra.astype(np.uint64) * _K)
    first, inv = unique_runs(h)
    rep = first[inv]
    same = (words == words[rep]).all(axis=1) if words.shape[1] else np.ones(len(words), bool)
    if extra is not None:
        same &= extra == extra[rep]
    if same.all():
        return first, inv
    full = np.ascontiguousarray(words)
    if extra is not None:
        full = np.concatenate([full, extra.astype(np.uint64)[:, None]], axis=1)
    _u, first, inv = np.unique(full.view(f"V{full.shape[1] * 8}").reshape(-1),
                               return_index=True, return_inverse=True)
    return first, inv.reshape(-1)


def unique_map(col: np.ndarray, fn, key: np.ndarray | None = None) -> np.ndarray:
    """Apply fn to each distinct value of a column; return an object array.

    ``key`` (default: the value itself, bytes compared exactly) decides what counts as
    distinct; fn is called once per distinct key with the first value seen."""
    if len(col) == 0:
        return np.empty(0, dtype=object)
    if key is not None:
        first, inv = unique_runs(key)
    elif col.dtype.kind in "ui":
        first, inv = unique_runs(col)
    else:
        first, inv = unique_rows(row_words(col))
    mapped = np.empty(len(first), dtype=object)
    for i, j in enumerate(first.tolist()):
        mapped[i] = fn(col[j])
    return Cat.make(mapped, inv)


_LINE_BREAKS = frozenset("\x85\u2028\u2029")


def safe_text(b: bytes) -> str:
    """Bytes from the traced system (file names, comms) as one-line text, reversibly: UTF-8
    as it is, except that every byte of an invalid sequence, of a control character (C0,
    DEL) or of a Unicode line break (U+0085, U+2028, U+2029) becomes ``\\xNN`` and a
    backslash becomes ``\\\\``. So a name with a newline or Latin-1 bytes keeps one line in
    the text table and one JSON object per line, and tells apart from every other name."""
    s = b.decode("utf-8", "surrogateescape")
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:                       # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F or ch in _LINE_BREAKS:
            out.extend(f"\\x{c:02x}" for c in ch.encode())
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def comm_str(b: bytes) -> str:
    return safe_text(b.split(b"\0", 1)[0])


def path_str(raw: bytes, truncated: bool = False) -> str:
    """Leaf-first NUL-separated components -> '/a/b/leaf' ('…/b/leaf' if truncated). A
    component that ran past the end of the buffer (no NUL before it) was cut: it is left out,
    so what follows the marker is always whole names."""
    comps = []
    for c in raw.split(b"\0"):
        if not c:
            break
        comps.append(safe_text(c))
    if truncated and len(comps) > 1 and len(raw.rstrip(b"\0")) >= PATH_LEN:
        comps.pop()
    if truncated:
        return "…/" + "/".join(reversed(comps))
    return "/" + "/".join(reversed(comps))


def raw_path_str(raw: bytes, truncated: bool = False) -> str:
    """A plain NUL-terminated path (SS_F_PATH_RAW: the user's argument, as given)."""
    s = safe_text(raw.split(b"\0", 1)[0])
    return s + "…" if truncated else s


#: formatted paths by (raw bytes, flags), across drains: a busy node re-reads the same files
_PATH_CACHE: dict = {}
_PATH_CACHE_MAX = 1 << 16


def paths(recs: np.ndarray) -> np.ndarray:
    """Path column: leaf-first components, or plain strings where SS_F_PATH_RAW is set."""
    if len(recs) == 0:
        return np.empty(0, dtype=object)
    # a truncated walk or a raw string is another value than the same bytes without the flag
    fl = recs["flags"] & np.uint8(PATH_TRUNC | PATH_RAW)
    first, inv = unique_rows(row_words(recs["path"]), fl)
    vals = np.empty(len(first), dtype=object)
    cache = _PATH_CACHE
    if len(cache) > _PATH_CACHE_MAX:
        cache.clear()
    col = recs["path"]
    for i, j in enumerate(first.tolist()):
        f = int(fl[j])
        b = bytes(col[j])
        v = cache.get((b, f))
        if v is None:
            fn = raw_path_str if f & PATH_RAW else path_str
            v = cache[(b, f)] = fn(b, bool(f & PATH_TRUNC))
        vals[i] = v
    return Cat.make(vals, inv)


def addr_str(family: int, raw: bytes) -> str:
    try:
        if family == 10:
            return socket.inet_ntop(socket.AF_INET6, bytes(raw))
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    except (ValueError, OSError):
        return "?"


def servers(r: np.ndarray) -> np.ndarray:
    return np.array([addr_str(int(f) or 2, a) if (int(f) or any(a)) else ""
                     for f, a in zip(r["family"], r["daddr"])], dtype=object)


def ops(codes: np.ndarray) -> np.ndarray:
    return unique_map(codes, lambda c: OP_NAMES.get(int(c), f"op{int(c)}"))


def fs_names(magic: np.ndarray) -> np.ndarray:
    return unique_map(magic, lambda m: FS_MAGIC.get(int(m), f"0x{int(m):x}"))


def addrs(family: np.ndarray, raw: np.ndarray) -> np.ndarray:
    return np.array([addr_str(int(f), a) for f, a in zip(family, raw)], dtype=object)


def device_name(dev: int, sysfs: str = "/sys") -> str:
    """A kernel dev_t (``MAJOR << 20 | MINOR``, as the block tracepoints give it) -> the disk
    or partition name iostat shows (nvme0n1, sda1, loop0), from the /sys/dev/block link;
    "major:minor" when there is no such device (gone, or another namespace's sysfs)."""
    mm = f"{dev >> 20}:{dev & 0xFFFFF}"
    try:
        return os.path.basename(os.readlink(os.path.join(sysfs, "dev", "block", mm))) or mm
    except OSError:
        return mm


def devices(dev: np.ndarray, sysfs: str = "/sys") -> np.ndarray:
    """Device names of a dev_t column (one sysfs lookup per distinct device)."""
    return unique_map(dev, lambda d: device_name(int(d), sysfs))


def constant(value: str, n: int) -> np.ndarray:
    return Cat.make(np.array([value], dtype=object), np.zeros(n, dtype=np.intp))


def split(recs: np.ndarray, mono_to_wall_ns: int, methods: dict) -> dict:
    """Records of all types -> {table kind: columns}, each type decoded by its family.
    ``methods`` maps record type -> the attach method its family loaded with."""
    from .families import BY_RECORD_TYPE
    out = {}
    if len(recs) == 0:
        return out
    types = recs["type"]
    one = bool((types == types[0]).all())       # the common case: no copy of the records
    for t in (types[:1] if one else np.unique(types)):
        fam = BY_RECORD_TYPE.get(int(t))
        if fam is None:
            continue
        r = recs if one else recs[types == t]
        ts = r["ts_ns"] + np.uint64(mono_to_wall_ns & 0xFFFFFFFFFFFFFFFF)    # modulo 2**64
        base = {"ts_ns": ts, "dur_ns": r["dur_ns"].astype(np.uint64),
                "pid": r["pid"].astype(np.uint64), "tid": r["tid"].astype(np.uint64),
                "comm": unique_map(r["comm"], comm_str)}
        for kind, tab in fam.decode(int(t), r, base, constant(methods.get(int(t), ""), len(r))).items():
            out[kind] = concat_tables(kind, [out[kind], tab]) if kind in out else tab
    return out
