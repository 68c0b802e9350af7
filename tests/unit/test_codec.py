"""The batch codec: round trips, compactness, and clear errors on bad input."""

import msgpack
import numpy as np
import pytest

from stallscope.wire import codec, schema
from stallscope.wire.schema import Batch


def io_table(n, seed=0):
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(1_700_000_000_000_000_000, 1_700_000_001_000_000_000, n)).astype(np.uint64)
    return {
        "ts_ns": ts, "dur_ns": rng.integers(10_000_000, 900_000_000, n).astype(np.uint64),
        "pid": rng.choice([4242, 4243, 99999], n).astype(np.uint64),
        "tid": rng.choice([4242, 4250, 4251], n).astype(np.uint64),
        "comm": np.array(rng.choice(["python", "pt_data_worker", "torchrun"], n), dtype=object),
        "op": np.array(rng.choice(["read", "pread", "fsync"], n), dtype=object),
        "bytes": rng.integers(-5, 1 << 20, n).astype(np.int64),
        "path": np.array([f"/mnt/data/shard-{i % 37:05d}.tar" for i in range(n)], dtype=object),
        "fs": np.array(["nfs"] * n, dtype=object),
        "dev": np.full(n, 45, np.uint64),
        "ino": (np.arange(n) % 37 + (1 << 33)).astype(np.uint64),   # one inode per path, > 32 bits
        "cgroup": np.full(n, 7781, np.uint64), "method": np.array(["tracepoint"] * n, dtype=object),
    }


def net_table(n):
    return {"ts_ns": np.arange(n, dtype=np.uint64) * 1000 + 1_700_000_000_000_000_000,
            "dur_ns": np.full(n, 204_000_000, np.uint64), "pid": np.full(n, 7, np.uint64),
            "tid": np.zeros(n, np.uint64), "comm": np.array(["python"] * n, dtype=object),
            "op": np.array(["retransmit"] * n, dtype=object),
            "saddr": np.array(["10.0.0.1"] * n, dtype=object), "sport": np.full(n, 40000, np.uint64),
            "daddr": np.array(["fe80::1"] * n, dtype=object), "dport": np.full(n, 29500, np.uint64),
            "state": np.array(["ESTABLISHED"] * n, dtype=object), "retransmits": np.arange(n, dtype=np.uint64),
            "sock_ino": np.full(n, 123456, np.uint64)}


def test_round_trip_all_columns_and_envelope():
    b = Batch("node-a", 17, {"io": io_table(500), "net": net_table(3)},
              counters={"vfs.lost_ringbuf": 3}, hist={"vfs": {"read": [1, 2, 3]}},
              meta={"clock": {"wall_minus_mono_ns": 123}})
    d = codec.decode(codec.encode(b))
    assert (d.node, d.seq, d.counters, d.hist, d.meta) == ("node-a", 17, b.counters, b.hist, b.meta)
    for kind in ("io", "net"):
        for col, arr in b.tables[kind].items():
            assert list(d.tables[kind][col]) == list(arr), (kind, col)


def test_unsorted_timestamps_and_extremes_round_trip():
    t = io_table(50)
    t["ts_ns"] = t["ts_ns"][::-1].copy()
    t["ts_ns"][3] = 0
    t["ts_ns"][4] = np.uint64(2**63 - 1)
    t["bytes"][0] = -(2**63)
    d = codec.decode(codec.encode(Batch("n", 0, {"io": t})))
    assert list(d.tables["io"]["ts_ns"]) == list(t["ts_ns"])
    assert list(d.tables["io"]["bytes"]) == list(t["bytes"])


def test_io_events_are_compact_on_the_wire():
    n = 5000
    payload = codec.encode(Batch("n", 0, {"io": io_table(n)}))[0]
    assert len(payload) / n <= 32


def test_empty_batch_round_trips():
    d = codec.decode(codec.encode(Batch("n", 1)))
    assert d.tables == {} and d.n_events() == 0


def _env(**over):
    env = msgpack.unpackb(codec.encode(Batch("n", 0, {"io": io_table(10)}))[0], raw=False)
    env.update(over)
    return env


@pytest.mark.parametrize("payload,needle", [
    (b"\xc1", "malformed"),                                  # never-used msgpack byte
    (msgpack.packb([1, 2, 3]), "top level"),
    (msgpack.packb(_env(v=99)), "schema version 99"),
    (msgpack.packb(_env(v=None)), "schema version"),
    (msgpack.packb({k: v for k, v in _env().items() if k != "node"}), "no 'node'"),
    (msgpack.packb(_env(node=5)), "node is int"),
    (msgpack.packb(_env(strings=[1, 2])), "strings"),
])
def test_malformed_input_gets_a_clear_error(payload, needle):
    with pytest.raises(codec.CodecError, match=needle):
        codec.decode([payload])


def test_truncated_payload():
    payload = codec.encode(Batch("n", 0, {"io": io_table(100)}))[0]
    for cut in (1, len(payload) // 3, len(payload) - 1):
        with pytest.raises(codec.CodecError):
            codec.decode([payload[:cut]])


def test_column_length_mismatch_is_truncation():
    env = _env()
    col = env["tables"]["io"]["cols"]["dur_ns"]
    col[2] = col[2][:-1]
    with pytest.raises(codec.CodecError, match="truncated batch"):
        codec.decode([msgpack.packb(env)])


def test_string_index_out_of_range():
    env = _env()
    env["strings"] = env["strings"][:1]
    with pytest.raises(codec.CodecError, match="string table"):
        codec.decode([msgpack.packb(env)])


def test_oversized_is_refused_before_parsing():
    with pytest.raises(codec.CodecError, match="oversized"):
        codec.decode([b"\x00" * (codec.MAX_FRAME_BYTES + 1)])


def test_wrong_frame_count_and_type():
    with pytest.raises(codec.CodecError, match="frames"):
        codec.decode([b"a", b"b"])
    with pytest.raises(codec.CodecError):
        codec.decode([12345])


def test_unknown_table_from_newer_tracer_is_ignored():
    env = _env()
    env["tables"]["future_kind"] = {"n": 1, "cols": {}}
    d = codec.decode([msgpack.packb(env)])
    assert "future_kind" not in d.tables and len(d.tables["io"]["ts_ns"]) == 10


def test_record_dtype_is_derived_from_header():
    assert schema.RECORD_DTYPE.itemsize == 256
    assert schema.RECORD_DTYPE.names[0] == "ts_ns"
    assert schema.RECORD_DTYPE["path"].itemsize == schema.PATH_LEN
    assert schema.OP_NAMES[schema.ENUMS["SS_OP_FSYNC"]] == "fsync"


def test_recording_with_damaged_tail_keeps_the_rest(tmp_path):
    from stallscope.wire.recording import RecordingWriter as FileSink
    from stallscope.wire.recording import read_recording
    path = tmp_path / "rec.ssrec"
    sink = FileSink(str(path))
    for seq in range(3):
        sink(Batch("n", seq, {"io": io_table(20, seed=seq)}))
    sink.close()
    data = path.read_bytes()
    path.write_bytes(data[:-7])                 # a crash mid-write
    errors = []
    got = list(read_recording(str(path), on_error=errors.append))
    assert [b.seq for b in got] == [0, 1]
    assert len(errors) == 1 and "truncated at the end" in errors[0]


def test_recording_sink_counts_enospc():
    from stallscope.wire.recording import RecordingWriter as FileSink
    sink = FileSink("/dev/full")
    for seq in range(3):
        sink(Batch("n", seq, {"io": io_table(5)}))
    assert sink.dropped_batches == 3 and sink.dropped_events == 15 and "disk full" in sink.last_error
