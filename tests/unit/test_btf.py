"""BTF lookups the probes' flags come from (tracer/btf.py): enumerators and which argument
of a raw tracepoint is the struct a probe reads, on a BTF blob laid out as the kernel lays
one out, and on the running kernel's."""

import os
import struct

import pytest

from stallscope.tracer import btf


def _blob(tmp_path) -> str:
    """A BTF file: struct request, struct request_queue, a 5.10-shaped block_rq_issue
    prototype (void *, struct request_queue *, struct request *), an enum and an enum64."""
    strs = b"\0request\0request_queue\0btf_trace_block_rq_issue\0req_flag_bits\0__REQ_FUA\0big\0BIG\0"

    def s(name):
        return strs.index(b"\0" + name.encode() + b"\0") + 1

    t = b""
    t += struct.pack("<III", s("request"), 4 << 24, 8)                 # 1 struct request {}
    t += struct.pack("<III", s("request_queue"), 4 << 24, 8)           # 2 struct request_queue {}
    t += struct.pack("<III", 0, 2 << 24, 1)                            # 3 struct request *
    t += struct.pack("<III", 0, 2 << 24, 2)                            # 4 struct request_queue *
    t += struct.pack("<III", 0, 2 << 24, 0)                            # 5 void *
    t += struct.pack("<III", 0, (13 << 24) | 3, 0)                     # 6 void (void *, q *, rq *)
    t += struct.pack("<II", 0, 5) + struct.pack("<II", 0, 4) + struct.pack("<II", 0, 3)
    t += struct.pack("<III", 0, 2 << 24, 6)                            # 7 pointer to 6
    t += struct.pack("<III", s("btf_trace_block_rq_issue"), 8 << 24, 7)  # 8 typedef
    t += struct.pack("<III", s("req_flag_bits"), (6 << 24) | 1, 4)    # 9 enum { __REQ_FUA = 17 }
    t += struct.pack("<Ii", s("__REQ_FUA"), 17)
    t += struct.pack("<III", s("big"), (19 << 24) | 1, 8)              # 10 enum64 { BIG = 1 << 40 }
    t += struct.pack("<III", s("BIG"), 0, 1 << 8)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(t), len(t), len(strs))
    path = tmp_path / "btf"
    path.write_bytes(hdr + t + strs)
    return str(path)


def test_enumerators_and_the_request_argument_of_an_older_prototype(tmp_path):
    b = btf.Btf(_blob(tmp_path))
    assert b.enum_value("__REQ_FUA") == 17
    assert b.enum_value("BIG") == 1 << 40
    assert b.tp_arg("block_rq_issue", "request") == 1          # ctx->args[1]: after the queue
    assert b.tp_arg("block_rq_issue", "request_queue") == 0
    with pytest.raises(btf.BtfError, match="no enumerator __REQ_NOPE"):
        b.enum_value("__REQ_NOPE")
    with pytest.raises(btf.BtfError, match="no prototype for tracepoint block_getrq"):
        b.tp_arg("block_getrq", "bio")
    with pytest.raises(btf.BtfError, match="no struct bio"):
        b.tp_arg("block_rq_issue", "bio")


@pytest.mark.skipif(not os.path.exists(btf.BTF_PATH), reason="kernel without BTF")
def test_the_running_kernels_block_tracepoints_and_request_flags():
    b = btf.load()
    assert b.tp_arg("sched_switch", "task_struct") == 1        # (bool preempt, prev, next)
    for tp in ("block_rq_issue", "block_rq_complete"):
        assert b.tp_arg(tp, "request") in (0, 1)
    ops = b.enum_value("__REQ_FAILFAST_DEV")                    # the first flag bit: after the op
    assert ops >= 8 and b.enum_value("__REQ_FUA") > ops and b.enum_value("__REQ_PREFLUSH") > ops
