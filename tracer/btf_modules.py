"""Struct offsets and function parameters from kernel *module* BTF.

The NFS and RDMA probes walk structs that live in modules on most distribution
kernels (``struct rpc_task`` in sunrpc, ``struct nfs_client`` in nfs,
``struct ib_device`` in ib_core). Each loaded module with BTF has a file under
``/sys/kernel/btf/<module>`` holding *split* BTF: its type ids continue after
vmlinux's and its string offsets continue after vmlinux's string section, so it
can only be read together with ``/sys/kernel/btf/vmlinux``. Modules are split
against vmlinux only, never against each other, so each module is read as its
own vmlinux + module pair.

Same idea as :mod:`tracer.btf` (whose parser this reuses): the probes get ``-D``
flags with offsets from the running kernel, never from headers that may belong
to another kernel. A module's BTF exists only while it is loaded: the callers
say so in their error ("no NFS mount yet").
"""

from __future__ import annotations

import os
import struct

from . import btf

BTF_DIR = "/sys/kernel/btf"
_FUNC, _FUNC_PROTO = 12, 13


class SplitBtf(btf.Btf):
    """vmlinux BTF plus one module's split BTF, with member and parameter lookup."""

    def __init__(self, base: btf.Btf, path: str):
        # no super().__init__: the base is parsed once and shared
        self.path = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise btf.BtfError(f"cannot read module BTF at {path}: {e.strerror}") from e
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
        if magic != btf._MAGIC:
            raise btf.BtfError(f"{path}: not BTF (magic {magic:#x})")
        self._strs = base._strs + data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types = list(base.types)
        self.by_name = dict(base.by_name)
        self.funcs: dict = {}          # function name -> FUNC_PROTO type id
        self.protos: dict = {}         # FUNC_PROTO id -> [parameter names]
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12
            fixed, per = btf._TRAILER.get(kind, (0, 0))
            members = None
            tid = len(self.types)
            if kind in (btf._STRUCT, btf._UNION):
                kflag = info >> 31
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = unpack("<III", data, pos + 12 * i)
                    members.append((m_name, m_type, m_off & 0xFFFFFF if kflag else m_off))
            elif kind == _FUNC_PROTO:
                self.protos[tid] = [unpack("<I", data, pos + 8 * i)[0] for i in range(vlen)]
            elif kind == _FUNC and name_off:
                self.funcs[self._str(name_off)] = size_or_type
            self.types.append((kind, name_off, size_or_type, members))
            if kind in (btf._STRUCT, btf._UNION) and name_off:
                self.by_name.setdefault(self._str(name_off), tid)
            pos += fixed + per * vlen

    def param_index(self, func: str, param: str) -> int:
        """0-based position of parameter ``param`` of module function ``func``."""
        proto = self.funcs.get(func)
        if proto is None:
            raise btf.BtfError(f"{os.path.basename(self.path)} BTF has no function {func}")
        # a prototype identical to one in vmlinux (the type of an ops member, say) is
        # not repeated in the module: the function then refers to vmlinux's
        params = self.protos.get(proto)
        if params is None:
            params = _vmlinux_protos().get(proto)
        if params is None:
            raise btf.BtfError(f"{os.path.basename(self.path)} BTF: no prototype for {func}")
        names = [self._str(n) if n else "" for n in params]
        if param not in names:
            raise btf.BtfError(f"{func}() has no parameter {param} (has {', '.join(names)})")
        return names.index(param)


_base = None
_modules: dict = {}
_base_protos = None


def _vmlinux_protos() -> dict:
    """{FUNC_PROTO type id: [parameter name offsets]} of vmlinux BTF (read once, on demand:
    btf.Btf keeps only structs)."""
    global _base_protos
    if _base_protos is None:
        with open(os.path.join(BTF_DIR, "vmlinux"), "rb") as f:
            data = f.read()
        _m, _v, _f, hdr_len, type_off, type_len, _so, _sl = struct.unpack_from("<HBBIIIII", data, 0)
        protos, tid = {}, 1
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.unpack_from
        while pos < end:
            info = unpack("<I", data, pos + 4)[0]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += 12
            if kind == _FUNC_PROTO:
                protos[tid] = [unpack("<I", data, pos + 8 * i)[0] for i in range(vlen)]
            fixed, per = btf._TRAILER.get(kind, (0, 0))
            pos += fixed + per * vlen
            tid += 1
        _base_protos = protos
    return _base_protos


def base() -> btf.Btf:
    global _base
    if _base is None:
        _base = btf.Btf(os.path.join(BTF_DIR, "vmlinux"))
    return _base


def module(name: str) -> SplitBtf:
    """The vmlinux + ``name`` BTF pair (cached); BtfError if the module is not loaded."""
    if name not in _modules:
        path = os.path.join(BTF_DIR, name)
        if not os.path.exists(path):
            raise btf.BtfError(f"module {name} is not loaded (no {path})")
        _modules[name] = SplitBtf(base(), path)
    return _modules[name]


def offset(struct_name: str, path: str, modules: tuple = ()) -> int:
    """Offset of ``struct_name.path`` from vmlinux BTF, else from the first of
    ``modules`` that knows the struct (a module built into the kernel is in vmlinux)."""
    b = base()
    if b.has(struct_name):
        return b.offset(struct_name, path)
    missing = []
    for m in modules:
        try:
            mb = module(m)
        except btf.BtfError as e:
            missing.append(str(e))
            continue
        if mb.has(struct_name):
            return mb.offset(struct_name, path)
    why = f" ({'; '.join(missing)})" if missing else ""
    raise btf.BtfError(f"no BTF for struct {struct_name} in vmlinux or {', '.join(modules) or 'any module'}{why}")


def member_kind(struct_name: str, path: str, modules: tuple = ()) -> str:
    """"array", "pointer", "struct", "int", ... : the BTF kind of a member's type."""
    for b in [base()] + [module(m) for m in modules if os.path.exists(os.path.join(BTF_DIR, m))]:
        tid = b.by_name.get(struct_name)
        if tid is None:
            continue
        for part in path.split("."):
            r = b._find(tid, part)
            if r is None:
                raise btf.BtfError(f"kernel BTF: struct {struct_name} has no member {path}")
            tid = r[1]
        return _KIND_NAMES.get(b.types[tid][0], "other")
    raise btf.BtfError(f"no BTF for struct {struct_name} in vmlinux or {', '.join(modules)}")


_KIND_NAMES = {1: "int", 2: "pointer", 3: "array", 4: "struct", 5: "union", 6: "enum"}


def offset_cflags(fields: dict) -> list:
    """``-DMACRO=offset`` for ``{MACRO: (struct, member path, (modules...))}``."""
    return [f"-D{macro}={offset(s, p, mods)}" for macro, (s, p, mods) in fields.items()]


def param_index(func: str, param: str, modules: tuple) -> int:
    """Position of a parameter of a function that lives in vmlinux or one of ``modules``."""
    errors = []
    for m in modules:
        try:
            return module(m).param_index(func, param)
        except btf.BtfError as e:
            errors.append(str(e))
    raise btf.BtfError("; ".join(errors) or f"no BTF for {func}")
