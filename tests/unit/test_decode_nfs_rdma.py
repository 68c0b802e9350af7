"""Decoding NFS file-op, NFS RPC and RDMA records (tracer/decode.py) into the nfs and rdma tables."""

import socket

import numpy as np

from stallscope.tracer import decode
from stallscope.tracer.families import nfs as nfs_family
from stallscope.wire.schema import ENUMS, RECORD_DTYPE, TABLES


def _nfs_records():
    r = np.zeros(3, RECORD_DTYPE)
    r["type"] = [ENUMS["SS_T_NFS"], ENUMS["SS_T_NFS_RPC"], ENUMS["SS_T_NFS_RPC"]]
    r["op"] = [ENUMS["SS_OP_NFS_READ"], ENUMS["SS_OP_NFS_RPC"], ENUMS["SS_OP_NFS_RPC"]]
    r["ts_ns"] = [100, 110, 120]
    r["dur_ns"] = [300_000_000, 290_000_000, 1_500_000_000]
    r["pid"] = 7
    r["tid"] = [7, 0, 0]
    r["ret"] = [4096, 4220, -5]
    r["fs_magic"] = 0x6969
    r["family"] = [2, 2, 10]
    r["daddr"][0, :4] = r["daddr"][1, :4] = list(socket.inet_aton("10.0.0.9"))
    r["daddr"][2] = list(socket.inet_pton(socket.AF_INET6, "fd00::9"))
    r["key"] = [0, 0x1234ABCD, 0x99]
    r["aux"] = [0, 0, 2]
    r["state"] = [0, 3, 4]
    r["comm"] = [b"loader", b"", b""]
    r["path"] = [b"shard-1\0data\0mnt\0\0", b"READ\0nfs\0\0", b"GETATTR\0nfs\0\0"]
    return r


def test_file_ops_and_rpcs_share_the_nfs_table():
    t = decode.split(_nfs_records(), mono_to_wall_ns=1_000,
                     methods={ENUMS["SS_T_NFS"]: "kprobe", ENUMS["SS_T_NFS_RPC"]: "kprobe"})["nfs"]
    assert set(t) == set(TABLES["nfs"])
    assert list(t["path"]) == ["/mnt/data/shard-1", "nfsv3 READ", "nfsv4 GETATTR"]
    assert list(t["op"]) == ["nfs_read", "nfs_rpc", "nfs_rpc"]
    assert list(t["server"]) == ["10.0.0.9", "10.0.0.9", "fd00::9"]
    assert list(t["xid"]) == [0, 0x1234ABCD, 0x99]
    assert list(t["rpc_retrans"]) == [0, 0, 2]
    assert list(t["bytes"]) == [4096, 4220, -5]
    assert set(t["fs"]) == {"nfs"} and list(t["ts_ns"]) == [1100, 1110, 1120]


def test_rpc_name_without_program_is_the_procedure():
    assert nfs_family.rpc_name(b"NULL\0\0", 0) == "NULL"
    assert nfs_family.rpc_name(b"CB_SEQUENCE\0nfs4_cb\0", 1) == "nfs4_cbv1 CB_SEQUENCE"


def test_rdma_waits_carry_the_device():
    r = np.zeros(2, RECORD_DTYPE)
    r["type"] = ENUMS["SS_T_RDMA"]
    r["op"] = ENUMS["SS_OP_RDMA_GET_CQ_EVENT"]
    r["dur_ns"] = 120_000_000
    r["ret"] = [1, 3]
    r["path"] = [b"mlx5_0\0", b"rxe0\0"]
    t = decode.split(r, mono_to_wall_ns=0, methods={ENUMS["SS_T_RDMA"]: "kprobe"})["rdma"]
    assert list(t["device"]) == ["mlx5_0", "rxe0"]
    assert list(t["op"]) == ["rdma_get_cq_event"] * 2 and list(t["bytes"]) == [1, 3]
