"""Fuzz the decode path: ``wire/codec.py`` (frames from the network, batches from a store) and
``wire/recording.py`` (recording files).

The contract under test: for any input, decode returns a :class:`Batch` whose tables have
every schema column, of the schema's kind and one length, taking at most ``AMPLIFICATION``
times the input's size in memory, or it raises ``CodecError`` with a reason; the recording
reader yields such batches and reports the rest through ``on_error``. Any other exception,
an input that takes over 1 s, or a decoded batch larger than the bound is a bug.

Inputs start from a corpus of valid encodings of realistic batches (every table type,
dictionary-coded and zigzag columns, a schema-1 batch, an empty heartbeat) and are mutated
two ways: byte-level (libFuzzer's mutations through atheris, or flips/cuts/splices in the
plain loop) and structure-aware (the envelope is unpacked, 1-3 fields are changed, deleted,
swapped or set to boundary values, and it is packed again), so the deep checks (column
codes, lengths, indexes, dictionaries, deltas, meta) are reached, not only msgpack errors.

    python -m bench fuzz              # atheris, >= 1,000,000 inputs in 2 processes
    python -m bench fuzz --quick      # 60,000 inputs
    python -m bench.bench_fuzz --engine loop --runs 200000   # the plain loop, no atheris

One JSON line: inputs, inputs/s, accepted, rejections counted by category, crashes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

AMPLIFICATION = 16          # decoded bytes per input byte, at most (plus SLACK)
SLACK = 1 << 16
HANG_S = 1.0
T0 = 1_790_000_000_000_000_000


# ---------------------------------------------------------------------------- corpus
def _s(vals, n, rng):
    return np.array(rng.choice(vals, n), dtype=object)


def _u(lo, hi, n, rng):
    return rng.integers(lo, hi, n).astype(np.uint64)


def _ts(n, rng):
    return np.sort(rng.integers(0, 250_000_000, n)).astype(np.uint64) + np.uint64(T0)


def realistic_tables(n: int, seed: int) -> dict:
    """One of every table type, n rows each, with the values a tracer sends."""
    rng = np.random.default_rng(seed)
    common = lambda: {"ts_ns": _ts(n, rng), "dur_ns": _u(10_000_000, 900_000_000, n, rng),  # noqa: E731
                      "pid": _u(4000, 4008, n, rng), "tid": _u(4000, 4040, n, rng),
                      "comm": _s(["python", "pt_data_worker", "torchrun"], n, rng)}
    paths = [f"/mnt/data/train/shard-{i:05d}.tar" for i in range(20)] + ["…/deep/leaf", "/tmp/caf\\xe9"]
    return {
        "io": {**common(), "op": _s(["read", "pread", "fsync", "openat"], n, rng),
               "bytes": rng.integers(-5, 1 << 20, n).astype(np.int64), "path": _s(paths, n, rng),
               "fs": _s(["nfs", "fuse", "ext4"], n, rng), "dev": np.full(n, 45, np.uint64),
               "ino": (rng.integers(0, 5, n) + (1 << 33)).astype(np.uint64),
               "cgroup": np.full(n, 7781, np.uint64), "method": _s(["fentry", "tracepoint"], n, rng),
               "count": _u(1, 40, n, rng), "blocked_ns": _u(10_000_000, 900_000_000, n, rng)},
        "nfs": {**common(), "op": _s(["nfs_read", "nfs_getattr", "READ"], n, rng),
                "bytes": rng.integers(0, 1 << 20, n).astype(np.int64), "path": _s(paths, n, rng),
                "fs": _s(["nfs4"], n, rng), "server": _s(["10.0.0.5", "nfs-a"], n, rng),
                "xid": _u(0, 1 << 32, n, rng), "rpc_retrans": _u(0, 3, n, rng),
                "method": _s(["kprobe", "raw_tracepoint"], n, rng)},
        "block": {**common(), "op": _s(["read", "write"], n, rng),
                  "bytes": rng.integers(512, 1 << 20, n).astype(np.int64),
                  "device": _s(["nvme0n1", "sda"], n, rng), "sector": _u(0, 1 << 40, n, rng)},
        "net": {**common(), "op": _s(["retransmit", "retransmit_synack"], n, rng),
                "saddr": _s(["10.0.0.1", "fe80::1"], n, rng), "sport": _u(1024, 65535, n, rng),
                "daddr": _s(["10.0.0.2"], n, rng), "dport": np.full(n, 29500, np.uint64),
                "state": _s(["ESTABLISHED", "SYN_SENT"], n, rng), "retransmits": _u(1, 9, n, rng),
                "sock_ino": _u(100_000, 100_010, n, rng)},
        "rdma": {**common(), "op": _s(["poll_cq", "get_cq_event"], n, rng),
                 "device": _s(["mlx5_0"], n, rng), "qp": _u(0, 1 << 24, n, rng),
                 "bytes": rng.integers(0, 1 << 20, n).astype(np.int64)},
        "sched": {**common(), "op": _s(["blocked", "runq"], n, rng),
                  "reason": _s(["fuse_simple_request", "io_schedule", ""], n, rng),
                  "count": _u(1, 20, n, rng), "blocked_ns": _u(1_000_000, 900_000_000, n, rng),
                  "other_pid": _u(0, 9000, n, rng), "other_comm": _s(["ffmpeg", ""], n, rng)},
        "http": {**common(), "op": _s(["PUT", "GET", "POST"], n, rng),
                 "host": _s(["s3.local:9000", "api.example"], n, rng),
                 "path": _s(["/ckpt/step-900", "/v1/chat/completions"], n, rng),
                 "status": _s([0, 200, 429, 503], n, rng).astype(np.uint64),
                 "reason": _s(["SlowDown", "Too Many Requests", ""], n, rng),
                 "statuses": _s(["503,503,200", "429", ""], n, rng), "count": _u(1, 6, n, rng),
                 "blocked_ns": _u(10_000_000, 900_000_000, n, rng), "backoff_ns": _u(0, 400_000_000, n, rng),
                 "tls": _u(0, 2, n, rng), "conn": _u(3, 1 << 40, n, rng), "cgroup": np.full(n, 7781, np.uint64)},
        "rdma_counter": {"ts_ns": _ts(n, rng), "dur_ns": np.full(n, 1_000_000_000, np.uint64),
                         "device": _s(["mlx5_0"], n, rng), "port": _u(1, 3, n, rng),
                         "counter": _s(["port_rcv_errors", "local_ack_timeout_err"], n, rng),
                         "delta": _u(0, 50, n, rng)},
        "gpu": {"ts_ns": _ts(n, rng), "gpu": _u(0, 8, n, rng), "util": _u(0, 101, n, rng),
                "synth": _u(0, 2, n, rng)},
        "gpu_proc": {"ts_ns": _ts(n, rng), "gpu": _u(0, 8, n, rng), "pid": _u(4000, 4003, n, rng)},
        "cpu": {"ts_ns": _ts(n, rng), "pid": _u(4000, 4008, n, rng),
                "comm": _s(["python", "pt_data_worker"], n, rng), "cpu_ns": _u(0, 1 << 45, n, rng)},
        "wait": {"ts_ns": _ts(n, rng), "pid": _u(4000, 4008, n, rng), "call": _s(["poll", "recvfrom", "read"], n, rng),
                 "peer": _s(["10.0.0.5:443", "[2001:db8::7]:9000", "127.0.0.1:8080"], n, rng)},
        "proc": {"pid": _u(4000, 4008, n, rng), "ppid": _u(1, 4000, n, rng),
                 "comm": _s(["python", "torchrun"], n, rng), "start_ns": _ts(n, rng),
                 "job": _s(["", "slurm-77"], n, rng), "rank": rng.integers(-1, 8, n).astype(np.int64),
                 "pod_uid": _s(["", "8d1c3e1f-2b7a-4c4e-9a51-0c6f2f6b9a10"], n, rng),
                 "container_id": _s(["", "3f" * 32], n, rng)},
    }


def realistic_meta(seed: int) -> dict:
    return {"clock": {"wall_minus_mono_ns": 1_789_000_000_000_000_000 + seed, "sent_ns": T0,
                      "ntp_synced": True, "ntp_maxerror_ns": 16_000_000, "uncertainty_ns": 16_000_400,
                      "steps": seed % 2},
            "abi": 3, "schema": 2, "min_latency_ns": 10_000_000,
            "attach": {"vfs": "fentry", "sched": "tracepoints"}, "not_loaded": {"tcp": "no BTF"},
            "final": False,
            "gpu": {"gpus": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1"}],
                    "sample_period_ns": {0: 166_666_666}, "errors": 0, "source": "samples",
                    "driver": "580.159.04"}}


def corpus() -> list:
    """Valid payloads: every table type, small and larger, dictionary and zigzag columns, a
    schema-1 batch, an empty heartbeat."""
    from stallscope.wire import codec
    from stallscope.wire.schema import Batch
    out = []
    counters = {"vfs.lost_ringbuf": 3, "vfs.emitted": 1200, "tick_errors": 0, "zmq.dropped_batches": 1}
    hist = {"vfs": {"read": [0, 3, 9, 27, 1], "fsync": [1]}}
    for seed, n in enumerate((1, 3, 17, 40)):
        tables = realistic_tables(n, seed)
        out.append(codec.encode(Batch("gpu-node-07", seed, tables, counters, hist, realistic_meta(seed)))[0])
        for kind, t in tables.items():           # one table per batch: short inputs reach deep
            out.append(codec.encode(Batch("n", seed, {kind: t}))[0])
    out.append(codec.encode(Batch("gpu-node-07", 99, meta={"final": True}))[0])
    env = msgpack.unpackb(out[0], raw=False, strict_map_key=False)
    env["v"] = 1                                  # schema 1: io without count/blocked_ns
    for c in ("count", "blocked_ns"):
        env["tables"]["io"]["cols"].pop(c, None)
    out.append(msgpack.packb(env, use_bin_type=True))
    return out


def recording_bytes(payloads) -> bytes:
    from stallscope.wire.recording import RECORDING_MAGIC
    return msgpack.packb(RECORDING_MAGIC) + b"".join(payloads)


# ---------------------------------------------------------------------------- mutations
_CODES = ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "zu1", "zu2", "zu8", "zi8", "su1", "su2",
          "si1", "du1", "du2", "di1", "d", "s", "z", "", "u16", "f8"]
INTERESTING = [0, 1, -1, 2, 127, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1, -(1 << 63), 4 << 20, (4 << 20) + 1, True, False, None, 0.5, math.nan, math.inf,
               "", "x", "\n", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
               b"", b"\x00", b"\xff" * 8, [], {}, [1, 2, 3], {"a": 1}, *_CODES]


def _slots(obj, out, depth=0):
    """Every (container, key) in a decoded envelope, breadth limited."""
    if depth > 8 or len(out) > 4000:
        return
    if isinstance(obj, dict):
        for k in list(obj):
            out.append((obj, k))
            _slots(obj[k], out, depth + 1)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            out.append((obj, i))
            _slots(obj[i], out, depth + 1)


def _mutate_value(v, rng: random.Random):
    r = rng.random()
    if isinstance(v, bytes) and v and r < 0.7:
        b = bytearray(v)
        op = rng.randrange(5)
        if op == 0:                                   # same length, random content
            return bytes(rng.getrandbits(8) for _ in range(len(b)))
        if op == 1:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        if op == 2:
            return bytes(b[:rng.randrange(len(b))])
        if op == 3:
            return bytes(b) + bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 2, 4, 8))))
        return b"\xff" * len(b)
    if isinstance(v, str) and r < 0.6:
        return rng.choice(_CODES) if len(v) <= 3 else v[:rng.randrange(len(v) + 1)]
    if isinstance(v, int) and not isinstance(v, bool) and r < 0.6:
        return rng.choice([v + 1, v - 1, v * 2, v // 2, -v, v + (1 << 63), v ^ (1 << rng.randrange(64))])
    if isinstance(v, list) and v and r < 0.5:
        v = list(v)
        if rng.random() < 0.5:
            v.pop(rng.randrange(len(v)))
        else:
            v.append(rng.choice(v))
        return v
    return rng.choice(INTERESTING)


def mutate_struct(payload: bytes, rng: random.Random) -> bytes:
    """Unpack, change 1-3 fields (value, type, deletion, swap), pack again; the payload
    itself (byte-mutated) where it does not unpack into containers."""
    try:
        env = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return mutate_bytes(payload, rng)
    if not isinstance(env, (dict, list)):
        return mutate_bytes(payload, rng)
    for _ in range(rng.choice((1, 1, 2, 3))):
        slots = []
        _slots(env, slots)
        if not slots:
            break
        cont, key = rng.choice(slots)
        r = rng.random()
        if r < 0.1 and isinstance(cont, dict):
            del cont[key]
        elif r < 0.2 and len(slots) > 1:                  # swap with another slot's value
            c2, k2 = rng.choice(slots)
            try:
                cont[key], c2[k2] = c2[k2], cont[key]
            except (KeyError, IndexError):
                pass
        elif r < 0.25 and isinstance(cont, dict):         # an extra key
            cont[rng.choice(["v", "n", "cols", "zz", 7, "count"])] = rng.choice(INTERESTING)
        else:
            cont[key] = _mutate_value(cont[key], rng)
    try:
        return msgpack.packb(env, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return mutate_bytes(payload, rng)


def mutate_bytes(payload: bytes, rng: random.Random) -> bytes:
    b = bytearray(payload)
    for _ in range(rng.choice((1, 1, 2, 4))):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice((0, 0xFF, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, 0xC6))
        elif op == 2:
            del b[i:i + rng.randrange(1, 16)]
        elif op == 3:
            b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 9)))
        elif op == 4:
            b = b[:i]
        else:                                             # splice a copy of another span in
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j:j + rng.randrange(1, 64)]
    return bytes(b)


# ---------------------------------------------------------------------------- the contract
class ContractViolation(AssertionError):
    """decode broke its contract: a wrong batch, a hang or too much memory."""


_CATEGORIES = [
    ("unsupported schema version", "version"), ("oversized", "size"), ("trailing bytes", "msgpack"),
    ("malformed or truncated batch", "msgpack"), ("truncated batch", "column_length"),
    ("indexes past", "index_range"), ("dictionary", "dictionary"), ("signed indexes", "column_code"),
    ("unknown type", "column_code"), ("coded", "column_code"), ("not [code, base, bytes]", "column_shape"),
    ("base ", "delta_base"), ("top level", "envelope"), ("frame", "envelope"),
    ("counter", "meta"), ("hist", "meta"), ("meta", "meta"), ("node name", "envelope_field"),
    (".n=", "row_count"), ("seq=", "envelope_field"), ("strings", "strings"), ("tables.", "table_field"),
    ("batch has no", "envelope_field"), ("batch.", "envelope_field"),
    ("truncated at the end", "recording_tail"), ("unreadable data", "recording_unreadable"),
    ("not a stallscope recording", "recording_header"),
]


def category(msg: str) -> str:
    for needle, cat in _CATEGORIES:
        if needle in msg:
            return cat
    return "other"


def _nbytes(batch) -> int:
    total = 0
    for t in batch.tables.values():
        for col in t.values():
            total += col.nbytes
    return total


def check_batch(batch, size: int):
    """Raise ContractViolation unless batch is what decode promises."""
    from stallscope.wire.schema import TABLES, Batch
    if not isinstance(batch, Batch) or not isinstance(batch.node, str) or type(batch.seq) is not int:
        raise ContractViolation(f"not a proper Batch: {batch!r}")
    for d in (batch.counters, batch.hist, batch.meta):
        if not isinstance(d, dict):
            raise ContractViolation("counters/hist/meta not maps")
    for kind, t in batch.tables.items():
        if kind not in TABLES or set(t) != set(TABLES[kind]):
            raise ContractViolation(f"table {kind!r} has columns {sorted(t)}")
        lens = {len(c) for c in t.values()}
        if len(lens) > 1:
            raise ContractViolation(f"table {kind!r} has columns of lengths {lens}")
        for name, k in TABLES[kind].items():
            col = t[name]
            want = {"s": "O", "u": "u", "i": "i"}[k]
            if col.dtype.kind != want or (k != "s" and col.dtype.itemsize != 8):
                raise ContractViolation(f"{kind}.{name} has dtype {col.dtype}, kind {k}")
            if k == "s" and not all(isinstance(x, str) for x in col):
                raise ContractViolation(f"{kind}.{name} holds non-strings")
    if _nbytes(batch) > AMPLIFICATION * size + SLACK:
        raise ContractViolation(f"{size}-byte input decoded into {_nbytes(batch)} bytes")


class Stats:
    def __init__(self):
        self.inputs = 0
        self.accepted = 0
        self.rejected = collections.Counter()
        self.recordings = 0
        self.recording_batches = 0
        self.recording_errors = collections.Counter()
        self.slowest_s = 0.0

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "accepted": self.accepted, "rejected": dict(self.rejected),
                "recordings": self.recordings, "recording_batches": self.recording_batches,
                "recording_errors": dict(self.recording_errors), "slowest_s": round(self.slowest_s, 4)}

    def merge(self, d: dict):
        self.inputs += d["inputs"]
        self.accepted += d["accepted"]
        self.rejected.update(d["rejected"])
        self.recordings += d["recordings"]
        self.recording_batches += d["recording_batches"]
        self.recording_errors.update(d["recording_errors"])
        self.slowest_s = max(self.slowest_s, d["slowest_s"])


def check_one(data: bytes, stats: Stats, rec_path: str | None = None):
    """Decode one input under the contract (and, for one input in 8, read it as a recording
    at rec_path); raises anything that breaks it."""
    from stallscope.wire import codec
    stats.inputs += 1
    t = time.perf_counter()
    try:
        batch = codec.decode([data])
    except codec.CodecError as e:
        if not str(e):
            raise ContractViolation("CodecError without a reason") from e
        stats.rejected[category(str(e))] += 1
    else:
        check_batch(batch, len(data))
        stats.accepted += 1
    took = time.perf_counter() - t
    stats.slowest_s = max(stats.slowest_s, took)
    if took > HANG_S:
        raise ContractViolation(f"one input took {took:.2f} s")
    if rec_path is not None and zlib.crc32(data) & 7 == 0:
        check_recording(recording_bytes([data, data[:len(data) // 2]]), stats, rec_path)


def check_recording(blob: bytes, stats: Stats, path: str):
    from stallscope.wire.recording import read_recording
    with open(path, "wb") as f:
        f.write(blob)
    errors: list = []
    stats.recordings += 1
    for b in read_recording(path, on_error=errors.append):
        check_batch(b, len(blob))
        stats.recording_batches += 1
    for e in errors:
        if not isinstance(e, str) or not e:
            raise ContractViolation(f"recording error without a message: {e!r}")
        stats.recording_errors[category(e.split(": ", 1)[-1])] += 1


# ---------------------------------------------------------------------------- engines
def run_loop(runs: int, seed: int = 0, struct_share: float = 0.6) -> dict:
    """The plain loop: corpus entries mutated structurally or byte-wise (1-3 rounds)."""
    rng = random.Random(seed)
    seeds = corpus()
    stats = Stats()
    fd, rec = tempfile.mkstemp(prefix="stallscope-fuzz-", suffix=".ssrec", dir=_tmpdir())
    os.close(fd)
    t0 = time.perf_counter()
    try:
        for s in seeds:
            check_one(s, stats, rec)
        while stats.inputs < runs:
            data = rng.choice(seeds)
            for _ in range(rng.choice((1, 1, 2, 3))):
                data = mutate_struct(data, rng) if rng.random() < struct_share else mutate_bytes(data, rng)
            check_one(data, stats, rec)
    finally:
        os.unlink(rec)
    out = stats.to_json()
    out["wall_s"] = time.perf_counter() - t0
    return out


def _tmpdir():
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _atheris_child(args):
    """One libFuzzer process: coverage of the decode path, mutations from libFuzzer plus the
    structure-aware ones above. libFuzzer ends the process with exit(), past Python's atexit,
    so the stats are written every 5000 inputs and after the last."""
    import atheris
    with atheris.instrument_imports():
        from stallscope.wire import codec, recording  # noqa: F401
    stats = Stats()
    rec = os.path.join(_tmpdir() or os.path.dirname(args.stats), f"stallscope-fuzz-{os.getpid()}.ssrec")
    t0 = time.perf_counter()

    def dump():
        out = stats.to_json()
        out["wall_s"] = time.perf_counter() - t0
        with open(args.stats + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(args.stats + ".tmp", args.stats)

    def test_one(data: bytes):
        check_one(data, stats, rec)
        if stats.inputs % 5000 == 0 or stats.inputs >= args.runs:
            dump()
            if stats.inputs >= args.runs and os.path.exists(rec):
                os.unlink(rec)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            out = mutate_struct(data, rng)
            if len(out) <= max_size:
                return out
        return atheris.Mutate(data, max_size)

    atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}", f"-timeout={int(HANG_S)}",
                   "-rss_limit_mb=3072", "-max_len=65536", "-print_final_stats=1",
                   f"-artifact_prefix={args.artifacts}/", args.corpus_dir],
                  test_one, custom_mutator=mutator)
    atheris.Fuzz()


def run_atheris(runs: int, procs: int = 2) -> dict:
    """libFuzzer via atheris in ``procs`` subprocesses (runs split between them)."""
    work = tempfile.mkdtemp(prefix="stallscope-fuzz-")
    cdir = os.path.join(work, "corpus")
    os.mkdir(cdir)
    for i, p in enumerate(corpus()):
        with open(os.path.join(cdir, f"seed-{i:03d}"), "wb") as f:
            f.write(p)
    t0 = time.perf_counter()
    children = []
    for i in range(procs):
        art = os.path.join(work, f"artifacts-{i}")
        os.mkdir(art)
        own = os.path.join(work, f"corpus-{i}")      # each grows its own copy of the corpus
        os.mkdir(own)
        for name in os.listdir(cdir):
            os.link(os.path.join(cdir, name), os.path.join(own, name))
        st = os.path.join(work, f"stats-{i}.json")
        argv = [sys.executable, "-m", "bench.bench_fuzz", "--child", "--runs", str(runs // procs + (i < runs % procs)),
                "--seed", str(1000 + i), "--stats", st, "--artifacts", art, own]
        log = open(os.path.join(work, f"log-{i}.txt"), "wb")
        children.append((subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONPATH": ROOT}), st, art, log))
    stats, crashes, failures = Stats(), [], []
    executed = slowest = peak_rss = 0
    for proc, st, art, log in children:
        rc = proc.wait()
        log.close()
        found = glob.glob(os.path.join(art, "*"))
        crashes += found
        if os.path.exists(st):
            with open(st) as f:
                stats.merge(json.load(f))
        with open(log.name, "rb") as f:
            text = f.read().decode(errors="replace")
        # libFuzzer's own count and slowest input, beside ours
        for line in text.splitlines():
            if line.startswith("stat::number_of_executed_units:"):
                executed += int(line.split(":")[-1])
            elif line.startswith("stat::slowest_unit_time_sec:"):
                slowest = max(slowest, int(line.split(":")[-1]))
            elif line.startswith("stat::peak_rss_mb:"):
                peak_rss = max(peak_rss, int(line.split(":")[-1]))
        if rc != 0:
            failures.append(f"rc={rc}: " + text[-3000:])
    out = stats.to_json()
    out.update({"wall_s": time.perf_counter() - t0, "crashes": len(crashes), "crash_files": crashes,
                "failures": failures, "libfuzzer_executed": executed, "libfuzzer_slowest_s": slowest,
                "peak_rss_mb": peak_rss})
    if not crashes and not failures:
        shutil.rmtree(work, ignore_errors=True)
    else:
        out["workdir"] = work
    return out


def main(quick: bool = False, runs: int | None = None, engine: str = "atheris", procs: int = 2):
    runs = runs or (60_000 if quick else 1_000_000)
    if engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError as e:
            print(json.dumps({"bench": "fuzz_decode", "skipped": f"atheris: {e}"}), flush=True)
            return
        res = run_atheris(runs, procs)
    else:
        res = run_loop(runs)
        res.update({"crashes": 0, "failures": []})      # run_loop raises on the first one
    out = {"bench": "fuzz_decode", "engine": engine, "processes": procs if engine == "atheris" else 1,
           "inputs": res["inputs"], "inputs_per_s": round(res["inputs"] / res["wall_s"]),
           "wall_s": round(res["wall_s"], 1), "accepted": res["accepted"],
           "rejected_by_category": dict(sorted(res["rejected"].items(), key=lambda kv: -kv[1])),
           "recordings_read": res["recordings"], "recording_batches": res["recording_batches"],
           "recording_errors": res["recording_errors"], "slowest_input_s": res["slowest_s"],
           "crashes": res["crashes"] + len(res["failures"]),
           "machine": f"{os.uname().nodename} {os.uname().release} {os.cpu_count()} cpus"}
    if "libfuzzer_executed" in res:
        out["libfuzzer_executed"] = res["libfuzzer_executed"]
        out["peak_rss_mb_per_process"] = res["peak_rss_mb"]
    if res["failures"]:
        out["failures"] = res["failures"]
        out["workdir"] = res.get("workdir")
        out["crash_files"] = res.get("crash_files", [])
    print(json.dumps(out), flush=True)
    if out["crashes"]:
        sys.exit(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--engine", choices=("atheris", "loop"), default="atheris")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    ap.add_argument("corpus_dir", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _atheris_child(a)
    else:
        main(a.quick, a.runs, a.engine, a.procs)
