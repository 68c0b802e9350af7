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
    (e,) = rows("io", _table("io", path="/data/shard-7.bin", count=120, more_files=0, blocked_ns=840_000_000))
    assert "/data/shard-7.bin (120 ops, 840.0 ms blocked)" in event_line(e)


def test_storm_rows_over_many_files_say_so():
    (e,) = rows("io", _table("io", path="/data/imgs/n01/a.jpg", count=40, more_files=39, blocked_ns=280_000_000))
    assert "/data/imgs/n01/a.jpg (40 ops on 40 files, 280.0 ms blocked)" in event_line(e)


def test_a_chain_of_storms_over_many_small_files_names_the_count_and_one_of_them():
    from stallscope.analysis.text import describe_chain
    from stallscope.analysis.verdict import build_chain
    rows_ = [{"type": "io", "pid": 7, "comm": "pt_data_worker", "op": "read", "fs": "nfs", "server": "",
              "path": "/data/imgs/0.jpg", "count": 8, "more_files": 7 if k == 0 else 7 + (k % 2),
              "blocked_ns": 60_000_000, "ts_ns": k * 100_000_000, "dur_ns": 90_000_000} for k in range(3)]
    ch = build_chain(rows_, covered_ns=270_000_000)
    assert ch.op_files == {"read": 23}
    assert describe_chain(ch) == "24 reads of 23 files such as /data/imgs/0.jpg (nfs) 0.2 s"
    one = build_chain([{**r, "path": "/data/shard.bin", "more_files": 0} for r in rows_]
                      + [{**rows_[0], "path": "/data/shard.bin", "more_files": 0, "count": 1, "ts_ns": 400_000_000}],
                      covered_ns=270_000_000)
    assert one.op_files == {"read": 1}          # storms and a lone read of one file
    assert describe_chain(one) == "25 reads of /data/shard.bin (nfs) 0.2 s"
