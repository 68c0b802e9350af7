"""The block family (bpf/block.bpf.c): block request latency by device, issue -> complete."""

from __future__ import annotations

import numpy as np

from stallscope.tracer.bpfload import ProbeError, base_cflags, load_bpf, tp_exists
from stallscope.tracer.decode import devices, ops
from stallscope.wire.schema import T_BLOCK

NAME = "block"
RECORD_TYPES = (T_BLOCK,)
#: issue and complete time a request; getrq names its submitter (bpf/block.bpf.c)
TRACEPOINTS = ("block/block_rq_issue", "block/block_rq_complete", "block/block_getrq")


def methods(cfg, tracefs):
    def tracepoint():
        missing = [tp for tp in TRACEPOINTS if not tp_exists(tracefs, tp)]
        if missing:
            raise ProbeError(f"tracepoint {missing[0]} not found")
        return load_bpf(NAME, base_cflags(cfg)), "tracepoints " + " ".join(TRACEPOINTS)
    return [("tracepoint", tracepoint)]


def decode(rtype, r, base, method) -> dict:
    return {"block": {**base, "op": ops(r["op"]), "bytes": r["aux"].astype(np.int64),
                      "device": devices(r["dev"]), "sector": r["key"].astype(np.uint64)}}
