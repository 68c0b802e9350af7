"""wire.schema.GrowingTable: the analysis' per-node tables, appended in place."""

from __future__ import annotations

import numpy as np

from stallscope.wire import codec
from stallscope.wire.schema import TABLES, Batch, Cat, GrowingTable, concat_tables, take


def _io(n, seed, paths):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, len(paths), n)
    t = {c: rng.integers(1, 1 << 40, n).astype(np.int64 if v == "i" else np.uint64)
         for c, v in TABLES["io"].items() if v != "s"}
    for c, v in TABLES["io"].items():
        if v == "s":
            t[c] = np.array([f"{c}-{p}" for p in paths], dtype=object)[k]
    return t


def _decoded(t, seq=0):
    """The table as the collector gets it: through the codec (text columns arrive as Cat)."""
    return codec.decode(codec.encode(Batch("n", seq, {"io": t}))[0]).tables["io"]


def _same(a, b):
    assert set(a) == set(b)
    for c in a:
        assert np.array_equal(np.asarray(a[c]), np.asarray(b[c])), c


def test_appended_decoded_parts_read_back_as_their_concatenation_with_one_string_table():
    parts = [_decoded(_io(n, s, paths), s) for s, (n, paths) in
             enumerate([(500, ["a", "b"]), (1, ["c"]), (2000, ["b", "d", "e"])])]
    g = GrowingTable("io")
    for p in parts:
        g.append(p)
    v = g.view()
    _same(v, concat_tables("io", parts))
    assert isinstance(v["path"], Cat) and isinstance(v["comm"], Cat)
    assert v["path"].cats is v["comm"].cats                       # one table-wide string table
    assert np.array_equal(v["path"].cats[v["path"].codes], np.asarray(v["path"]))
    assert len(v["path"].cats) == len(set(v["path"].cats.tolist()))
    assert g.view() is v                                          # cached until a change


def test_a_plain_text_part_makes_that_column_plain_and_numbers_are_promoted_as_concatenate_does():
    a = _decoded(_io(10, 1, ["x"]))
    b = _io(5, 2, ["y"])                                          # hand-made: plain object arrays
    b["bytes"] = b["bytes"].astype(np.int32)
    g = GrowingTable("io")
    g.append(a)
    g.append(b)
    v = g.view()
    _same(v, concat_tables("io", [a, b]))
    assert getattr(v["path"], "codes", None) is None
    assert v["bytes"].dtype == np.concatenate([a["bytes"], b["bytes"]]).dtype


def test_views_taken_earlier_are_not_changed_by_appends_or_a_replace():
    g = GrowingTable("io")
    g.append(_decoded(_io(100, 1, ["a", "b"])))
    before = g.view()
    snap = {c: np.array(v, copy=True) for c, v in before.items()}
    g.append(_decoded(_io(3000, 2, ["c"]), 1))
    keep = np.asarray(g.view()["ts_ns"]) % 2 == 0
    g.replace({c: take(v, keep) for c, v in g.view().items()})
    _same(before, snap)
    assert len(g) == int(keep.sum())


def test_a_replace_keeps_only_the_strings_still_used():
    g = GrowingTable("io")
    g.append(_decoded(_io(1000, 1, [f"old{i}" for i in range(50)])))
    g.append(_decoded(_io(10, 2, ["new"]), 1))
    v = g.view()
    keep = np.asarray(v["path"]) == "path-new"
    expect = {c: np.asarray(x)[keep] for c, x in v.items()}
    g.replace({c: take(x, keep) for c, x in v.items()})
    w = g.view()
    _same(w, expect)
    assert sorted(w["path"].cats.tolist()) == sorted({"path-new", *expect["comm"].tolist(), *expect["op"].tolist(),
                                                      *expect["fs"].tolist(), *expect["method"].tolist()})
    g.replace({})
    assert len(g) == 0
