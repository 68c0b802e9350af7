"""The decode path under hostile input: a bounded fuzz run (hypothesis + structure-aware
mutations of realistic batches) and one regression test per bug the fuzzing found.

Contract (bench/bench_fuzz.py): decode returns a Batch with every schema column of the right
kind and length, within a bounded size, or raises CodecError with a reason; the recording
reader yields such batches and reports everything else through on_error. The long run is
``python -m bench fuzz`` (atheris, >= 1,000,000 inputs)."""

import math
import random

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import bench_fuzz as fz
from stallscope.wire import codec
from stallscope.wire.recording import read_recording
from stallscope.wire.schema import TABLES, Batch

CORPUS = fz.corpus()


def _env(i=0):
    return msgpack.unpackb(CORPUS[i], raw=False, strict_map_key=False)


def _reject(env, needle):
    with pytest.raises(codec.CodecError, match=needle):
        codec.decode([msgpack.packb(env, use_bin_type=True)])


def test_corpus_is_valid_and_covers_every_table_and_coding():
    kinds, codes = set(), set()
    for p in CORPUS:
        fz.check_batch(codec.decode([p]), len(p))
        env = msgpack.unpackb(p, raw=False, strict_map_key=False)
        for kind, t in env["tables"].items():
            kinds.add(kind)
            codes.update(c[0][0] if c[0][0] in "zsd" else "plain" for c in t["cols"].values())
    assert kinds == set(TABLES)
    assert codes == {"z", "s", "d", "plain"}
    assert any(msgpack.unpackb(p, raw=False, strict_map_key=False)["v"] == 1 for p in CORPUS)


def test_bounded_mutation_run_keeps_the_contract_and_reaches_deep_checks():
    res = fz.run_loop(6000, seed=7)          # raises on the first broken contract
    assert res["inputs"] == 6000 and res["accepted"] > 0
    # structure-aware mutations get past msgpack into the column checks
    for cat in ("column_code", "column_length", "index_range", "dictionary", "meta", "version",
                "msgpack", "envelope_field"):
        assert res["rejected"].get(cat, 0) > 0, (cat, res["rejected"])
    assert res["recordings"] > 0 and res["slowest_s"] < fz.HANG_S


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    fz.check_one(data, fz.Stats())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(CORPUS) - 1), st.integers(0, 2**32), st.integers(1, 4))
def test_structure_aware_mutations(i, seed, rounds):
    rng = random.Random(seed)
    data = CORPUS[i]
    for _ in range(rounds):
        data = fz.mutate_struct(data, rng)
    fz.check_one(data, fz.Stats())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.integers(0, len(CORPUS) - 1), min_size=1, max_size=4), seed=st.integers(0, 2**32))
def test_recording_reader_never_raises(picks, seed, tmp_path_factory):
    rng = random.Random(seed)
    blob = fz.mutate_bytes(fz.recording_bytes([CORPUS[i] for i in picks]), rng)
    fz.check_recording(blob, fz.Stats(), str(tmp_path_factory.mktemp("rec") / "r.ssrec"))


# ------------------------------------------------------------------ the bugs fuzzing found
def test_zigzag_base_out_of_int64_is_decoded_modulo_2_64_not_overflow():
    # was: OverflowError from numpy (cumsum + a base above 2**63)
    env = _env()
    col = env["tables"]["io"]["cols"]["ts_ns"]
    col[1] = (1 << 64) - 1
    b = codec.decode([msgpack.packb(env, use_bin_type=True)])
    assert b.tables["io"]["ts_ns"].dtype == np.uint64
    assert int(b.tables["io"]["ts_ns"][0]) == (1 << 64) - 1


def test_string_column_coded_as_numbers_is_rejected():
    # was: accepted, an io.comm of uint64 that crashed the text printer later
    env = _env()
    c = env["tables"]["io"]["cols"]["comm"]
    c[0] = c[0][1:]                                  # "su1" -> "u1"
    _reject(env, "string column but coded")
    env = _env()
    c = env["tables"]["io"]["cols"]["dur_ns"]
    c[0] = "s" + c[0].lstrip("z")
    _reject(env, "number column but coded")


def test_signed_string_index_is_rejected():
    # was: IndexError (negative index below -len) or a silently wrong string
    env = _env()
    c = env["tables"]["io"]["cols"]["comm"]
    n = env["tables"]["io"]["n"]
    c[0], c[2] = "si1", b"\xf0" * n
    _reject(env, "signed indexes")


def test_boolean_version_seq_and_row_count_are_rejected():
    # was: True == 1 passed as schema version 1, seq=True as a sequence number
    _reject({**_env(), "v": True}, "schema version")
    _reject({**_env(), "seq": False}, "seq is bool")
    _reject({**_env(), "seq": 1 << 63}, "seq=")
    env = _env()
    env["tables"]["io"]["n"] = True
    _reject(env, "n is bool")


@pytest.mark.parametrize("counters,needle", [({"x": math.nan}, "counter"), ({"x": math.inf}, "counter"),
                                             ({"x": "7"}, "counter"), ({"x": 1 << 63}, "counter"),
                                             ({1: 2}, "counter")])
def test_counters_must_be_int64_numbers(counters, needle):
    # was: accepted; analysis takes int() of every counter (ValueError on NaN, OverflowError on inf)
    _reject({**_env(), "counters": counters}, needle)


@pytest.mark.parametrize("meta", [{"clock": {"uncertainty_ns": "x"}}, {"clock": {"uncertainty_ns": math.inf}},
                                  {"clock": []}, {"gpu": {"sample_period_ns": {"a": 1}}},
                                  {"gpu": {"gpus": [{"index": "zero"}]}}, {"gpu": 5}, {"final": "yes"},
                                  {3: 1}])
def test_meta_fields_read_downstream_are_typed(meta):
    _reject({**_env(), "meta": meta}, "meta")


def test_hist_must_be_counts():
    _reject({**_env(), "hist": {"vfs": {"read": ["x"]}}}, "hist")
    _reject({**_env(), "hist": {"vfs": [1]}}, "hist")


def test_frames_of_the_wrong_type_are_a_codec_error():
    # was: TypeError from len() of a non-sequence
    with pytest.raises(codec.CodecError, match="frames"):
        codec.decode(12345)


def test_recording_with_an_unhashable_map_key_is_reported_not_raised(tmp_path):
    # was: TypeError out of msgpack's Unpacker through read_recording
    path = tmp_path / "r.ssrec"
    path.write_bytes(fz.recording_bytes([CORPUS[1], b"\x81\x91\x01\x01", CORPUS[2]]))
    errors = []
    got = list(read_recording(str(path), on_error=errors.append))
    assert len(got) == 1 and len(errors) == 1 and "unreadable data" in errors[0]


def test_decoded_size_is_bounded_by_the_input():
    n = codec.MAX_ROWS
    env = {"v": 2, "node": "n", "seq": 0, "strings": ["a"], "tables": {
        "gpu": {"n": n, "cols": {c: ["u1", 0, b"\0" * n] for c in TABLES["gpu"]}}}}
    payload = msgpack.packb(env, use_bin_type=True)
    b = codec.decode([payload])
    assert fz._nbytes(b) <= 8 * len(payload) + fz.SLACK
    env["tables"]["gpu"]["n"] = n + 1
    _reject(env, "out of range")


def test_encoding_is_unchanged_by_the_hardening():
    b = Batch("n", 3, fz.realistic_tables(20, 1), {"a": 1}, {}, fz.realistic_meta(1))
    p = codec.encode(b)[0]
    assert codec.encode(codec.decode([p]))[0] == p
