"""The TCP family (bpf/tcp.bpf.c): retransmits by flow, from tracepoints.

Records are raw retransmits (``_retrans``); the agent's EpisodeBuilder
(tracer/net.py) turns them into loss episodes, the ``net`` table.
"""

from __future__ import annotations

import numpy as np

from stallscope.tracer.bpfload import ProbeError, base_cflags, load_bpf, tp_exists, tp_has_field
from stallscope.tracer.decode import addrs, ops
from stallscope.wire.schema import T_TCP

NAME = "tcp"
RECORD_TYPES = (T_TCP,)
TRACEPOINTS = ("tcp/tcp_retransmit_skb", "tcp/tcp_retransmit_synack", "sock/inet_sock_set_state")


def methods(cfg, tracefs):
    def tracepoint():
        missing = [tp for tp in TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        # fields that came later: `err` (6.10), `family` (5.11; else read from the socket)
        extra = [flag for tp, field, flag in (("tcp/tcp_retransmit_skb", "err", "-DSS_TCP_HAS_ERR"),
                                              ("tcp/tcp_retransmit_skb", "family", "-DSS_TCP_SKB_FAMILY"),
                                              ("tcp/tcp_retransmit_synack", "family", "-DSS_TCP_SYNACK_FAMILY"))
                 if tp_has_field(tracefs, tp, field)]
        # the owner of an accepted socket (connect()s are noted from inet_sock_set_state)
        extra += [flag for tp, flag in (("syscalls/sys_exit_accept4", "-DSS_TCP_ACCEPT4"),
                                        ("syscalls/sys_exit_accept", "-DSS_TCP_ACCEPT"))
                  if tp_exists(tracefs, tp)]
        return load_bpf(NAME, base_cflags(cfg) + extra), "tracepoints " + " ".join(TRACEPOINTS)
    return [("tracepoint", tracepoint)]


def decode(rtype, r, base, method) -> dict:
    return {"_retrans": {
        "ts_ns": base["ts_ns"], "sk": r["key"].astype(np.uint64), "sock_ino": r["ino"].astype(np.uint64),
        "op": ops(r["op"]), "state": r["state"].astype(np.uint64),
        "family": r["family"].astype(np.uint64), "sport": r["sport"].astype(np.uint64),
        "dport": r["dport"].astype(np.uint64),
        "saddr": addrs(r["family"], r["saddr"]), "daddr": addrs(r["family"], r["daddr"]),
        "rto_jiffies": r["aux"].astype(np.uint64),
        "segs": r["segs"].astype(np.uint64), "err": r["ret"].astype(np.int64),
        "total": r["dev"].astype(np.uint64),
        "ca_state": (r["tid"] & 0xFF).astype(np.uint64), "pending": (r["tid"] >> 8).astype(np.uint64),
        "srtt_us": r["fs_magic"].astype(np.uint64), "packets_out": r["cgroup_id"].astype(np.uint64),
        # the process that connected or accepted the socket (0: not noted), and its comm
        "owner_pid": base["pid"], "owner_comm": base["comm"],
    }}
