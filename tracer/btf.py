"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever kernel headers it finds; when they do not match
the running kernel (Debian's 6.1 headers on a 6.18 kernel, a vendor kernel on a
GPU node) every struct dereference reads garbage. The probes therefore take the
offsets of the few fields they walk as ``-D`` flags computed here from BTF,
which always describes the running kernel. Only the type and string sections
are read; no dependency beyond the standard library.
"""

from __future__ import annotations

import struct

BTF_PATH = "/sys/kernel/btf/vmlinux"
_MAGIC = 0xEB9F
# kind -> bytes that follow the 12-byte btf_type, as (fixed, per vlen item)
_TRAILER = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
            8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
            15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12)}
_STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG = 4, 5, 8, 9, 10, 11, 18
_FUNC, _FUNC_PROTO = 12, 13
_PTR, _ENUM, _ENUM64 = 2, 6, 19


class BtfError(RuntimeError):
    """BTF is missing or does not describe a field the probes need."""


class Btf:
    """Index of struct/union types by name, with member lookup through anonymous members.

    ``base`` reads ``path`` as *split* BTF on top of it (a kernel module's, whose
    type ids and string offsets continue vmlinux's). ``funcs`` also records
    functions and their prototypes' parameter names (``funcs``, ``protos``).
    """

    def __init__(self, path: str = BTF_PATH, base: "Btf | None" = None, funcs: bool = False):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            hint = "" if base is not None else " (kernel built without CONFIG_DEBUG_INFO_BTF?)"
            raise BtfError(f"cannot read {'module' if base is not None else 'kernel'} BTF at {path}: "
                           f"{e.strerror}{hint}") from e
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
        if magic != _MAGIC:
            raise BtfError(f"{path}: not BTF (magic {magic:#x})")
        strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
        if base is None:
            self.types: list = [None]                                  # id 0 is void
            self._strs, self.by_name = strs, {}
        else:
            self._strs = base._strs + strs
            self.types, self.by_name = list(base.types), dict(base.by_name)
        self.funcs: dict = {}          # function name -> FUNC_PROTO type id
        self.protos: dict = {}         # FUNC_PROTO type id -> [parameter name offsets]
        # enumerators (name -> value) and raw tracepoints' prototypes (btf_trace_<tp> typedefs),
        # kept as raw bytes and read on demand: the agent keeps this object for its lifetime
        self._enums: list = [] if base is None else list(base._enums)
        self._tp_typedefs: dict = {} if base is None else dict(base._tp_typedefs)
        self._proto_raw: dict = {} if base is None else dict(base._proto_raw)
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12
            fixed, per = _TRAILER.get(kind, (0, 0))
            members = None
            tid = len(self.types)
            if kind in (_STRUCT, _UNION):
                kflag = info >> 31
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = unpack("<III", data, pos + 12 * i)
                    bit_off = m_off & 0xFFFFFF if kflag else m_off
                    members.append((m_name, m_type, bit_off))
            elif kind == _FUNC_PROTO:
                self._proto_raw[tid] = data[pos: pos + 8 * vlen]
                if funcs:
                    self.protos[tid] = [unpack("<I", data, pos + 8 * i)[0] for i in range(vlen)]
            elif kind in (_ENUM, _ENUM64) and vlen:
                self._enums.append((kind, data[pos: pos + per * vlen]))
            elif kind == _TYPEDEF and name_off and self._strs.startswith(b"btf_trace_", name_off):
                self._tp_typedefs[self._str(name_off)[len("btf_trace_"):]] = size_or_type
            elif funcs and kind == _FUNC and name_off:
                self.funcs[self._str(name_off)] = size_or_type
            self.types.append((kind, name_off, size_or_type, members))
            if kind in (_STRUCT, _UNION) and name_off:
                self.by_name.setdefault(self._str(name_off), tid)
            pos += fixed + per * vlen

    def _str(self, off: int) -> str:
        return self._strs[off: self._strs.index(b"\0", off)].decode()

    def _resolve(self, tid: int) -> int:
        while tid and self.types[tid][0] in (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG):
            tid = self.types[tid][2]
        return tid

    def _find(self, tid: int, member: str):
        kind, _n, _s, members = self.types[tid]
        for m_name, m_type, bit_off in members or ():
            if m_name and self._str(m_name) == member:
                return bit_off, self._resolve(m_type)
            if not m_name:      # anonymous struct/union: search inside
                inner = self._resolve(m_type)
                if self.types[inner][0] in (_STRUCT, _UNION):
                    r = self._find(inner, member)
                    if r:
                        return bit_off + r[0], r[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (e.g. ``"f_path.dentry"``) inside ``struct struct_name``."""
        tid = self.by_name.get(struct_name)
        if tid is None:
            raise BtfError(f"kernel BTF has no struct {struct_name}")
        total = 0
        for part in path.split("."):
            r = self._find(tid, part)
            if r is None:
                raise BtfError(f"kernel BTF: struct {struct_name} has no member {path}")
            total += r[0]
            tid = r[1]
        if total % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield")
        return total // 8

    def has(self, struct_name: str) -> bool:
        return struct_name in self.by_name

    def enum_value(self, name: str) -> int:
        """The value of enumerator ``name`` (``__REQ_FUA``), whichever enum holds it."""
        want = name.encode()
        for kind, raw in self._enums:
            step = 8 if kind == _ENUM else 12
            for i in range(0, len(raw), step):
                n = struct.unpack_from("<I", raw, i)[0]
                if self._strs.startswith(want + b"\0", n):
                    if kind == _ENUM:
                        return struct.unpack_from("<i", raw, i + 4)[0]
                    lo, hi = struct.unpack_from("<II", raw, i + 4)
                    return lo | hi << 32
        raise BtfError(f"kernel BTF has no enumerator {name}")

    def tp_arg(self, tp: str, struct_name: str) -> int:
        """Index in a raw tracepoint's ``ctx->args`` of its first ``struct struct_name *``
        argument: block_rq_issue passed (q, rq) before 5.11 and (rq) since. From the
        ``btf_trace_<tp>`` typedef the kernel declares for each tracepoint, whose prototype
        starts with the probe's own ``void *`` data."""
        tid = self._tp_typedefs.get(tp)
        ptr = self.types[tid] if tid else None
        raw = self._proto_raw.get(ptr[2]) if ptr and ptr[0] == _PTR else None
        if raw is None:
            raise BtfError(f"kernel BTF has no prototype for tracepoint {tp}")
        for i in range(1, len(raw) // 8):
            t = self.types[self._resolve(struct.unpack_from("<I", raw, 8 * i + 4)[0])]
            if t and t[0] == _PTR:
                target = self.types[self._resolve(t[2])]
                if target and target[0] == _STRUCT and self._str(target[1]) == struct_name:
                    return i - 1
        raise BtfError(f"tracepoint {tp} has no struct {struct_name} * argument")


#: The fields the probes walk, as -D macro -> (struct, member path).
FIELDS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_PATH_MNT": ("file", "f_path.mnt"),
    "OFF_FILE_PATH_DENTRY": ("file", "f_path.dentry"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_SB": ("inode", "i_sb"),
    "OFF_INODE_INO": ("inode", "i_ino"),
    "OFF_INODE_MODE": ("inode", "i_mode"),
    "OFF_SB_MAGIC": ("super_block", "s_magic"),
    "OFF_SB_DEV": ("super_block", "s_dev"),
    "OFF_DENTRY_NAME": ("dentry", "d_name.name"),
    "OFF_DENTRY_PARENT": ("dentry", "d_parent"),
    "OFF_MOUNT_MNT": ("mount", "mnt"),
    "OFF_MOUNT_PARENT": ("mount", "mnt_parent"),
    "OFF_MOUNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    "OFF_VFSMOUNT_ROOT": ("vfsmount", "mnt_root"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_SOCKET_SK": ("socket", "sk"),
    "OFF_SOCK_SOCKET": ("sock", "sk_socket"),
    "OFF_SK_FAMILY": ("sock_common", "skc_family"),     # sock starts with its sock_common
    "OFF_SOCKALLOC_SOCKET": ("socket_alloc", "socket"),
    "OFF_SOCKALLOC_INODE": ("socket_alloc", "vfs_inode"),
    "OFF_ICSK_RTO": ("inet_connection_sock", "icsk_rto"),
    "OFF_SKB_CB": ("sk_buff", "cb"),
    "OFF_TP_TOTAL_RETRANS": ("tcp_sock", "total_retrans"),
    "OFF_ICSK_CA_STATE": ("inet_connection_sock", "icsk_ca_state"),   # first bitfield of its byte
    "OFF_ICSK_PENDING": ("inet_connection_sock", "icsk_pending"),
    "OFF_TP_PACKETS_OUT": ("tcp_sock", "packets_out"),
    "OFF_TP_SRTT_US": ("tcp_sock", "srtt_us"),
    "OFF_TCB_GSO_SEGS": ("tcp_skb_cb", "tcp_gso_segs"),
}

#: The fields the sched family walks (bpf/sched.bpf.c). ``a|b``: the first member that
#: exists (task_struct.state became __state in 5.14). The pt_regs fields are x86-64's: the
#: syscall number of a task's kernel entry (-1 for an exception or interrupt), its first
#: argument.
SCHED_FIELDS = {
    "OFF_TASK_PID": ("task_struct", "pid"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_COMM": ("task_struct", "comm"),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "OFF_TASK_SIGNAL": ("task_struct", "signal"),
    "OFF_TASK_STATE": ("task_struct", "__state|state"),
    "OFF_TASK_FLAGS": ("task_struct", "flags"),
    "OFF_TASK_EXIT_CODE": ("task_struct", "exit_code"),
    "OFF_SIGNAL_LIVE": ("signal_struct", "live"),
}
SCHED_FIELDS_X86_64 = {"OFF_PT_REGS_ORIG_AX": ("pt_regs", "orig_ax"), "OFF_PT_REGS_DI": ("pt_regs", "di")}

_cache: dict = {}
_parsed: dict = {}


def load(path: str = BTF_PATH) -> Btf:
    """The BTF at ``path``, parsed once per process (shared by every probe family)."""
    if path not in _parsed:
        _parsed[path] = Btf(path)
    return _parsed[path]


def offset_cflags(path: str = BTF_PATH, fields: dict = FIELDS) -> list:
    """``-DOFF_...=N`` flags for every field in ``fields``, from the running kernel's BTF."""
    key = (path, tuple(sorted(fields)))
    if key not in _cache:
        btf = load(path)
        _cache[key] = [f"-D{macro}={_first_offset(btf, s, m)}" for macro, (s, m) in fields.items()]
    return list(_cache[key])


def _first_offset(btf: Btf, struct_name: str, members: str) -> int:
    """Offset of the first of ``a|b|...`` that the struct has."""
    alts = members.split("|")
    for m in alts[:-1]:
        try:
            return btf.offset(struct_name, m)
        except BtfError:
            continue
    return btf.offset(struct_name, alts[-1])
