"""Turn drained kernel records (RECORD_DTYPE arrays) into event tables, in bulk.

:func:`split` gives each record type to its family's ``decode`` (tracer/families/);
the column helpers here are what those share.

Strings (comm, path) are decoded once per distinct value per drain, not once
per record, so the cost per record is a few numpy operations.
"""

from __future__ import annotations

import socket

import numpy as np

from stallscope.wire.schema import DEFINES, OP_NAMES, Cat, concat_tables

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


def key64(col: np.ndarray) -> np.ndarray:
    """A 64-bit key per value (bytes columns are folded 8 bytes at a time), so
    distinct values are found by sorting integers instead of long strings."""
    if col.dtype.kind in "ui":
        return col.astype(np.uint64)
    width = col.dtype.itemsize
    pad = (-width) % 8
    raw = np.frombuffer(np.ascontiguousarray(col).tobytes() + b"\0" * pad * 0, dtype=np.uint8)
    if pad:
        raw = np.concatenate([raw.reshape(len(col), width), np.zeros((len(col), pad), np.uint8)], axis=1)
    words = raw.reshape(len(col), -1).view(np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(len(col), dtype=np.uint64)
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * _K + np.uint64(j + 1)
    return h


def unique_map(col: np.ndarray, fn, key: np.ndarray | None = None) -> np.ndarray:
    """Apply fn to each distinct value of a column; return an object array.

    ``key`` (default: a 64-bit fold of the value) decides what counts as
    distinct; fn is called once per distinct key with the first value seen."""
    if len(col) == 0:
        return np.empty(0, dtype=object)
    k = key64(col) if key is None else key
    _u, first, inv = np.unique(k, return_index=True, return_inverse=True)
    mapped = np.empty(len(first), dtype=object)
    for i, j in enumerate(first):
        mapped[i] = fn(col[j])
    return Cat.make(mapped, inv.reshape(-1))


def comm_str(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def path_str(raw: bytes, truncated: bool = False) -> str:
    """Leaf-first NUL-separated components -> '/a/b/leaf' ('.../b/leaf' if truncated)."""
    comps = []
    for c in raw.split(b"\0"):
        if not c:
            break
        comps.append(c.decode("utf-8", "replace"))
    if truncated:
        return "…/" + "/".join(reversed(comps))
    return "/" + "/".join(reversed(comps))


def raw_path_str(raw: bytes, truncated: bool = False) -> str:
    """A plain NUL-terminated path (SS_F_PATH_RAW: the user's argument, as given)."""
    s = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return s + "…" if truncated else s


def paths(recs: np.ndarray) -> np.ndarray:
    """Path column: leaf-first components, or plain strings where SS_F_PATH_RAW is set."""
    if len(recs) == 0:
        return np.empty(0, dtype=object)
    trunc = (recs["flags"] & PATH_TRUNC) != 0
    raw = (recs["flags"] & PATH_RAW) != 0
    # a truncated walk or a raw string is another value than the same bytes without the flag
    key = key64(recs["path"]) ^ trunc.astype(np.uint64) ^ (raw.astype(np.uint64) << np.uint64(1))
    _u, first, inv = np.unique(key, return_index=True, return_inverse=True)
    vals = np.empty(len(first), dtype=object)
    for i, j in enumerate(first):
        fn = raw_path_str if raw[j] else path_str
        vals[i] = fn(bytes(recs["path"][j]), bool(trunc[j]))
    return Cat.make(vals, inv.reshape(-1))


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


def devices(dev: np.ndarray) -> np.ndarray:
    return unique_map(dev, lambda d: f"{int(d) >> 20}:{int(d) & 0xFFFFF}")


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
    for t in np.unique(types):
        fam = BY_RECORD_TYPE.get(int(t))
        if fam is None:
            continue
        r = recs[types == t]
        ts = (r["ts_ns"].astype(np.int64) + mono_to_wall_ns).astype(np.uint64)
        base = {"ts_ns": ts, "dur_ns": r["dur_ns"].astype(np.uint64),
                "pid": r["pid"].astype(np.uint64), "tid": r["tid"].astype(np.uint64),
                "comm": unique_map(r["comm"], comm_str)}
        for kind, tab in fam.decode(int(t), r, base, constant(methods.get(int(t), ""), len(r))).items():
            out[kind] = concat_tables(kind, [out[kind], tab]) if kind in out else tab
    return out
