"""Struct offsets and function parameters from kernel *module* BTF.

The NFS and RDMA probes walk structs that live in modules on most distribution
kernels (``struct rpc_task`` in sunrpc, ``struct nfs_client`` in nfs,
``struct ib_device`` in ib_core). Each loaded module with BTF has a file under
``/sys/kernel/btf/<module>`` holding *split* BTF: its type ids continue after
vmlinux's and its string offsets continue after vmlinux's string section, so it
can only be read together with ``/sys/kernel/btf/vmlinux``. Modules are split
against vmlinux only, never against each other, so each module is read as its
own vmlinux + module pair.

Same idea as :mod:`stallscope.tracer.btf` (whose parser this reuses): the probes get ``-D``
flags with offsets from the running kernel, never from headers that may belong
to another kernel. A module's BTF exists only while it is loaded: the callers
say so in their error ("no NFS mount yet").
"""

from __future__ import annotations

import os

from . import btf

BTF_DIR = "/sys/kernel/btf"


class SplitBtf(btf.Btf):
    """vmlinux BTF plus one module's split BTF, with member and parameter lookup."""

    def __init__(self, base: btf.Btf, path: str):
        super().__init__(path, base=base, funcs=True)     # the base is parsed once and shared
        self.path = path

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
    the shared vmlinux parse keeps only structs)."""
    global _base_protos
    if _base_protos is None:
        _base_protos = btf.Btf(os.path.join(BTF_DIR, "vmlinux"), funcs=True).protos
    return _base_protos


def base() -> btf.Btf:
    global _base
    if _base is None:
        _base = btf.load(os.path.join(BTF_DIR, "vmlinux"))
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
