"""Every stall table renders as a `stallscope trace` row."""

import numpy as np

from stallscope.analysis.text import event_line
from stallscope.wire.schema import STALL_TABLES, TABLES, rows


def _table(kind, **over):
    t = {}
    for c, k in TABLES[kind].items():
        if k == "s":
            t[c] = np.array([over.get(c, "x")], dtype=object)
        else:
            t[c] = np.array([over.get(c, 1)], dtype=np.int64 if k == "i" else np.uint64)
    t["ts_ns"][:] = 1_700_000_000_000_000_000
    return t


def test_every_stall_table_renders():
    for kind in STALL_TABLES:
        (e,) = rows(kind, _table(kind))
        line = event_line(e)
        assert line.split()[1] == "x" and "1" in line, (kind, line)


def test_sched_rows_say_where_or_who():
    (e,) = rows("sched", _table("sched", op="runq", other_comm="ffmpeg", other_pid=4242, count=3))
    assert "runnable while ffmpeg pid 4242 ran" in event_line(e)
    (e,) = rows("sched", _table("sched", op="blocked", reason="fuse_simple_request"))
    assert "blocked in fuse_simple_request" in event_line(e)


def test_storm_rows_name_their_count():
    (e,) = rows("io", _table("io", path="/data/shard-7.bin", count=120, blocked_ns=840_000_000))
    assert "/data/shard-7.bin (120 ops, 840.0 ms blocked)" in event_line(e)
