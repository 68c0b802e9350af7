"""Kernel record decoding, BTF offsets, process facts."""

import os

import numpy as np
import pytest

from stallscope.tracer import btf, decode, procinfo
from stallscope.wire.schema import ENUMS, RECORD_DTYPE


def test_path_components_leaf_first():
    assert decode.path_str(b"shard0\0mnt\0data\0\0junk\0") == "/data/mnt/shard0"
    assert decode.path_str(b"\0") == "/"
    assert decode.path_str(b"c\0b\0a\0", truncated=True) == "…/a/b/c"


def test_split_vfs_records_bulk():
    r = np.zeros(3, RECORD_DTYPE)
    r["type"] = ENUMS["SS_T_VFS"]
    r["op"] = [ENUMS["SS_OP_READ"], ENUMS["SS_OP_FSYNC"], ENUMS["SS_OP_READ"]]
    r["ts_ns"] = [100, 200, 300]
    r["dur_ns"] = 50_000_000
    r["pid"], r["tid"], r["ret"] = 42, 43, 4096
    r["fs_magic"] = 0x65735546
    r["comm"] = b"trainer"
    r["path"] = [b"a.bin\0d\0\0", b"ckpt\0\0", b"a.bin\0d\0\0"]
    out = decode.split(r, mono_to_wall_ns=1_000, methods={ENUMS["SS_T_VFS"]: "tracepoint"})
    io = out["io"]
    assert list(io["path"]) == ["/d/a.bin", "/ckpt", "/d/a.bin"]
    assert list(io["op"]) == ["read", "fsync", "read"]
    assert list(io["ts_ns"]) == [1100, 1200, 1300]
    assert set(io["fs"]) == {"fuse"} and set(io["comm"]) == {"trainer"}
    assert set(io["method"]) == {"tracepoint"}


@pytest.mark.skipif(not os.path.exists(btf.BTF_PATH), reason="kernel without BTF")
def test_btf_offsets_of_running_kernel():
    b = btf.Btf()
    # stable across kernels: qstr.name follows the 8-byte hash_len, path.dentry follows mnt
    assert b.offset("qstr", "name") == 8
    assert b.offset("path", "dentry") == 8
    assert b.offset("file", "f_path.dentry") == b.offset("file", "f_path") + 8
    flags = btf.offset_cflags()
    assert len(flags) == len(btf.FIELDS)
    with pytest.raises(btf.BtfError, match="no member"):
        b.offset("file", "no_such_member")


def test_btf_missing_file():
    with pytest.raises(btf.BtfError, match="cannot read kernel BTF"):
        btf.Btf("/nonexistent/btf")


def _fake_proc(tmp_path, pid, ppid, comm, env):
    d = tmp_path / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")


def test_proc_lineage_and_job(tmp_path):
    (tmp_path / "stat").write_text("cpu 0\nbtime 1700000000\n")
    _fake_proc(tmp_path, 100, 1, "torchrun", {"TORCHELASTIC_RUN_ID": "job7"})
    _fake_proc(tmp_path, 200, 100, "python train.py", {"TORCHELASTIC_RUN_ID": "job7", "RANK": "3"})
    _fake_proc(tmp_path, 300, 200, "pt_data_worker", {"TORCHELASTIC_RUN_ID": "job7", "RANK": "3"})
    pc = procinfo.ProcCache(str(tmp_path))
    t = pc.table_for([300])
    rows = {int(p): (int(pp), c, j, int(r)) for p, pp, c, j, r in
            zip(t["pid"], t["ppid"], t["comm"], t["job"], t["rank"])}
    assert rows == {300: (200, "pt_data_worker", "job7", 3), 200: (100, "python train.py", "job7", 3),
                    100: (1, "torchrun", "job7", -1)}
    assert pc.table_for([300, 200]) == {}          # reported once
    assert procinfo.job_of({"SLURM_JOB_ID": "88", "SLURM_PROCID": "5"}) == ("88", 5)


def test_socket_owner_scan(tmp_path):
    _fake_proc(tmp_path, 77, 1, "srv", {})
    os.symlink("socket:[555]", tmp_path / "77" / "fd" / "3")
    os.symlink("/dev/null", tmp_path / "77" / "fd" / "0")
    so = procinfo.SocketOwners(str(tmp_path))
    assert so.owner(555) == 77 and so.owner(0) == 0
