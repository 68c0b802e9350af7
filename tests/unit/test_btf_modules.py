"""Split (module) BTF on top of the running kernel's vmlinux BTF (tracer/btf_modules.py).

A small module BTF is written here the way the kernel lays one out: its type ids continue
after vmlinux's and its string offsets after vmlinux's string section.
"""

import os
import struct

import pytest

from stallscope.tracer import btf, btf_modules

pytestmark = pytest.mark.skipif(not os.path.exists(btf.BTF_PATH), reason="kernel without BTF")


def _vmlinux_proto_with_params(base: btf.Btf):
    """(id, parameter names) of a vmlinux FUNC_PROTO with two or more named parameters."""
    for tid, names in btf_modules._vmlinux_protos().items():
        if len(names) >= 2 and all(names):
            return tid, [base._str(n) for n in names]
    raise AssertionError("vmlinux BTF has no prototype with named parameters")


def _module_btf(base: btf.Btf) -> bytes:
    first = len(base.types)               # first type id of the module
    base_strs = len(base._strs)
    strs = b"\0ss_mod_struct\0a\0b\0ss_mod_fn\0x\0path\0ss_mod_fn2\0"

    def s(name):
        return base_strs + strs.index(b"\0" + name.encode() + b"\0") + 1

    int_id = next(i for i, t in enumerate(base.types) if t and t[0] == 1)  # some INT of vmlinux
    types = b""
    # first: struct ss_mod_struct { void *a; <int> b; } (b at byte 8)
    types += struct.pack("<III", s("ss_mod_struct"), (4 << 24) | 2, 16)
    types += struct.pack("<III", s("a"), first + 1, 0) + struct.pack("<III", s("b"), int_id, 64)
    # first + 1: void *
    types += struct.pack("<III", 0, 2 << 24, 0)
    # first + 2: proto (int x, void *path)
    types += struct.pack("<III", 0, (13 << 24) | 2, int_id)
    types += struct.pack("<II", s("x"), int_id) + struct.pack("<II", s("path"), first + 1)
    # first + 3: func ss_mod_fn
    types += struct.pack("<III", s("ss_mod_fn"), 12 << 24, first + 2)
    # first + 4: func ss_mod_fn2, whose prototype is one of vmlinux's (not repeated in the module)
    types += struct.pack("<III", s("ss_mod_fn2"), 12 << 24, _vmlinux_proto_with_params(base)[0])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_module_struct_and_function_parameters(tmp_path):
    base = btf_modules.base()
    path = tmp_path / "ss_mod"
    path.write_bytes(_module_btf(base))
    mod = btf_modules.SplitBtf(base, str(path))
    assert mod.offset("ss_mod_struct", "b") == 8
    assert mod.param_index("ss_mod_fn", "path") == 1
    _tid, names = _vmlinux_proto_with_params(base)
    assert mod.param_index("ss_mod_fn2", names[1]) == 1
    # vmlinux structs resolve through the pair as well
    assert mod.offset("file", "f_inode") == base.offset("file", "f_inode")
    with pytest.raises(btf.BtfError, match="no parameter nope"):
        mod.param_index("ss_mod_fn", "nope")


def test_missing_module_says_so():
    with pytest.raises(btf.BtfError, match="module no_such_mod is not loaded"):
        btf_modules.module("no_such_mod")
    with pytest.raises(btf.BtfError, match="no BTF for struct rpc_task_nope"):
        btf_modules.offset("rpc_task_nope", "tk_owner", ("no_such_mod",))
