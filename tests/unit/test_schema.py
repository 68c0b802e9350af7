"""wire/schema.py: rows of tables as the tracer's older versions and hand-made tables give them."""

import numpy as np

from stallscope.wire.schema import TABLES, rows


def test_rows_of_a_table_without_the_optional_columns_fill_them():
    """An io table as a tracer before storms wrote it (no count, blocked_ns, more_files):
    each row is whole, the optional columns filled as the decoder fills them."""
    t = {"ts_ns": np.array([10, 20], np.uint64), "dur_ns": np.array([5, 7], np.uint64),
         "pid": np.array([1, 2], np.uint64), "tid": np.array([1, 2], np.uint64),
         "comm": np.array(["a", "b"], dtype=object), "op": np.array(["read", "pread"], dtype=object),
         "bytes": np.array([4096, 8], np.int64), "path": np.array(["/x", "/y"], dtype=object),
         "fs": np.array(["nfs", "ext4"], dtype=object), "dev": np.zeros(2, np.uint64),
         "ino": np.array([3, 4], np.uint64), "cgroup": np.zeros(2, np.uint64),
         "method": np.array(["tp", "tp"], dtype=object)}
    out = list(rows("io", t, node="n1"))
    assert [r["count"] for r in out] == [1, 1]
    assert [r["blocked_ns"] for r in out] == [5, 7]
    assert [r["more_files"] for r in out] == [0, 0]
    assert all(set(r) == {"type", "node", *TABLES["io"]} for r in out)
    assert out[1]["path"] == "/y" and out[1]["node"] == "n1" and out[1]["type"] == "io"
