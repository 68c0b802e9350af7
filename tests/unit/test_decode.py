"""Kernel record decoding, BTF offsets, process facts."""

import os

import numpy as np
import pytest

from stallscope.tracer import btf, decode, procinfo
from stallscope.wire.schema import DEFINES, ENUMS, RECORD_DTYPE


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


def test_raw_paths_are_plain_strings():
    """SS_F_PATH_RAW (stat's or a failed open's argument, an io_uring wait's empty path) is a
    plain string; the same bytes without the flag are leaf-first components."""
    raw, trunc = DEFINES["SS_F_PATH_RAW"], DEFINES["SS_F_PATH_TRUNC"]
    r = np.zeros(5, RECORD_DTYPE)
    r["type"] = ENUMS["SS_T_VFS"]
    r["op"] = ENUMS["SS_OP_STAT"]
    r["path"] = [b"data/x.bin\0junk", b"data/x.bin\0junk", b"", b"/mnt/a/very/long", b"\0"]
    r["flags"] = [raw, 0, raw, raw | trunc, 0]
    got = list(decode.paths(r))
    assert got == ["data/x.bin", "/junk/data/x.bin", "", "/mnt/a/very/long…", "/"]
    assert decode.raw_path_str(b"rel/name\0\0tail") == "rel/name"


def test_vfs_aggregate_records_decode_to_count_and_blocked():
    from stallscope.tracer.families import vfs
    r = np.zeros(2, RECORD_DTYPE)
    r["type"] = ENUMS["SS_T_VFS"]
    r["op"] = [ENUMS["SS_OP_PREAD"], ENUMS["SS_OP_IO_URING_ENTER"]]
    r["flags"] = [DEFINES["SS_F_AGGREGATE"], DEFINES["SS_F_PATH_RAW"]]
    r["dur_ns"] = [30_000_000, 12_000_000]
    r["aux"], r["key"], r["ret"] = [4, 0], [28_000_000, 0], [16384, 1]
    r["path"] = [b"shard\0d\0\0", b""]
    io = decode.split(r, 0, {ENUMS["SS_T_VFS"]: "tracepoint"})["io"]
    assert list(io["count"]) == [4, 1] and list(io["blocked_ns"]) == [28_000_000, 12_000_000]
    assert list(io["op"]) == ["pread", "io_uring_enter"] and list(io["path"]) == ["/d/shard", ""]
    assert list(io["fs"]) == ["", ""]
    # struct ss_storm = struct ss_event + u64 deadline + u64 last_file (the sweep reads the
    # map with this)
    assert vfs.STORM_DTYPE.itemsize == RECORD_DTYPE.itemsize + 16


def _fake_syscall_tps(root, names, ret_offset=16):
    for n in names:
        for d in ("enter", "exit"):
            p = root / "events" / "syscalls" / f"sys_{d}_{n}"
            p.mkdir(parents=True)
            fmt = "\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n"
            if d == "exit":
                fmt += f"\tfield:long ret;\toffset:{ret_offset};\tsize:8;\tsigned:1;\n"
            (p / "format").write_text(f"name: sys_{d}_{n}\nformat:\n{fmt}")


def test_vfs_extra_ops_skip_what_the_kernel_lacks(tmp_path):
    """A kernel without a syscall's tracepoints (or with an unexpected exit layout) loses that
    op only; the attach detail names it."""
    from stallscope.tracer.families import vfs
    present = [s for s in vfs.EXTRA_SYSCALLS if s not in ("openat2", "io_pgetevents", "statx")]
    _fake_syscall_tps(tmp_path, present)
    _fake_syscall_tps(tmp_path, ["statx"], ret_offset=24)
    (tmp_path / "events" / "syscalls" / "sys_exit_openat2").mkdir()      # enter missing
    flags, have, note = vfs.extra_ops(str(tmp_path))
    assert have == present and flags == [f"-DSS_TP_{s}" for s in present]
    assert note == " (no tracepoint, not traced: openat2 statx io_pgetevents)"
    assert set(vfs.EXIT_FN) == set(vfs.BASE_SYSCALLS) | set(vfs.EXTRA_SYSCALLS)
    flags, have, note = vfs.extra_ops(str(tmp_path / "nothing"))
    assert flags == [] and have == [] and "sendfile64" in note


def test_block_devices_named_as_sysfs_names_them(tmp_path):
    """dev_t (MAJOR << 20 | MINOR, the block tracepoints' encoding) -> the disk or partition
    name from /sys/dev/block/M:m (nvme0n1, sda1); "M:m" where sysfs has no such device."""
    links = tmp_path / "dev" / "block"
    links.mkdir(parents=True)
    os.symlink("../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1", links / "259:0")
    os.symlink("../../devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1",
               links / "8:1")
    dev = np.array([(259 << 20) | 0, (8 << 20) | 1, (259 << 20) | 0, (7 << 20) | 3], dtype=np.uint64)
    assert list(decode.devices(dev, sysfs=str(tmp_path))) == ["nvme0n1", "sda1", "nvme0n1", "7:3"]
    assert decode.device_name((8 << 20) | 1, sysfs=str(tmp_path / "nowhere")) == "8:1"
