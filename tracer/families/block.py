"""The block family (bpf/block.bpf.c): block request latency by device, issue -> complete."""

from __future__ import annotations

import numpy as np

from stallscope.tracer import btf
from stallscope.tracer.bpfload import ProbeError, base_cflags, load_bpf, tp_exists
from stallscope.tracer.decode import devices, ops
from stallscope.wire.schema import T_BLOCK

NAME = "block"
RECORD_TYPES = (T_BLOCK,)
#: issue and complete time a request; getrq names its submitter (bpf/block.bpf.c)
TRACEPOINTS = ("block/block_rq_issue", "block/block_rq_complete", "block/block_getrq")
#: the raw variant also sees requeues: a requeued request keeps its first issue time
RAW_TRACEPOINTS = (*TRACEPOINTS, "block/block_rq_requeue")


#: the request's fields the raw variant reads, and the dev_t of its disk (bpf/block.bpf.c)
RQ_FIELDS = {"OFF_RQ_SECTOR": ("request", "__sector"), "OFF_RQ_DATA_LEN": ("request", "__data_len"),
             "OFF_RQ_CMD_FLAGS": ("request", "cmd_flags"), "OFF_RQ_BIO": ("request", "bio"),
             "OFF_DISK_MAJOR": ("gendisk", "major"), "OFF_DISK_FIRST_MINOR": ("gendisk", "first_minor")}


def raw_cflags() -> list:
    """The raw variant's flags from the running kernel's BTF: field offsets, which argument
    is the request (or bio) in each tracepoint's prototype, and the op/flag bits. Raises
    BtfError where BTF lacks any of them."""
    b = btf.load()
    flags = btf.offset_cflags(fields=RQ_FIELDS)
    try:                    # the request's own disk until 5.19 (it was there since 2.6)...
        flags.append(f"-DOFF_RQ_DISK={b.offset('request', 'rq_disk')}")
    except btf.BtfError:    # ...since, its queue's
        flags += [f"-DOFF_RQ_Q={b.offset('request', 'q')}", f"-DOFF_Q_DISK={b.offset('request_queue', 'disk')}"]
    return flags + [
        f"-DSS_BLK_ISSUE_ARG={b.tp_arg('block_rq_issue', 'request')}",
        f"-DSS_BLK_COMPLETE_ARG={b.tp_arg('block_rq_complete', 'request')}",
        f"-DSS_BLK_GETRQ_ARG={b.tp_arg('block_getrq', 'bio')}",
        f"-DSS_BLK_REQUEUE_ARG={b.tp_arg('block_rq_requeue', 'request')}",
        # the op is the low bits of cmd_flags; its flags start where the op ends
        f"-DSS_REQ_OP_BITS={b.enum_value('__REQ_FAILFAST_DEV')}",
        f"-DSS_REQ_PREFLUSH={b.enum_value('__REQ_PREFLUSH')}", f"-DSS_REQ_FUA={b.enum_value('__REQ_FUA')}",
        "-DSS_BLK_RAW"]


def methods(cfg, tracefs):
    def tracepoint():
        missing = [tp for tp in TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        return load_bpf(NAME, base_cflags(cfg)), "tracepoints " + " ".join(TRACEPOINTS)

    def raw_tracepoint():
        missing = [tp for tp in RAW_TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        try:
            flags = raw_cflags()
        except btf.BtfError as e:
            raise ProbeError(str(e)) from e
        names = " ".join(tp.split("/")[1] for tp in RAW_TRACEPOINTS)
        return load_bpf(NAME, base_cflags(cfg) + flags), f"raw tracepoints {names} (keyed by request)"
    return [("raw_tracepoint", raw_tracepoint), ("tracepoint", tracepoint)]


def decode(rtype, r, base, method) -> dict:
    return {"block": {**base, "op": ops(r["op"]), "bytes": r["aux"].astype(np.int64),
                      "device": devices(r["dev"]), "sector": r["key"].astype(np.uint64)}}
