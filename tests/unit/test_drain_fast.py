"""The bulk drain's pieces without BPF: exact interning of bytes columns (hash collisions
included), run-length unique, the ring reader over an emulated ring, and the overload
shedder's decisions."""

import mmap
import os

import numpy as np

from stallscope.tracer import decode, ring
from stallscope.wire.codec import unique_runs
from stallscope.wire.schema import RECORD_DTYPE


def test_unique_runs_matches_np_unique():
    rng = np.random.default_rng(0)
    for k in (np.repeat(rng.integers(0, 5, 50), rng.integers(1, 9, 50)), rng.integers(0, 3, 1000),
              np.array([7]), np.arange(100)[::-1].copy()):
        first, inv = unique_runs(k)
        u = np.unique(k)
        assert np.array_equal(k[first], u)
        assert np.array_equal(u[inv], k)


def test_unique_rows_exact_even_when_the_linear_hash_collides():
    # rows differing by 2**63 in two words: same linear hash with any odd multipliers
    w = np.zeros((6, 16), np.uint64)
    w[1, 0] = w[1, 1] = np.uint64(1 << 63)
    w[3, 5] = 1
    w[4] = w[1]
    first, inv = decode.unique_rows(w)
    assert len(first) == 3
    assert np.array_equal(w[first][inv], w)


def test_paths_distinct_values_and_flags():
    r = np.zeros(5, RECORD_DTYPE)
    r["path"] = [b"a\0d\0\0", b"a\0d\0\0", b"b\0\0", b"a\0d\0\0", b"a\0d\0\0"]
    r["flags"][3] = decode.PATH_TRUNC
    got = list(decode.paths(r))
    assert got == ["/d/a", "/d/a", "/b", "…/d/a", "/d/a"]


def _emulated_ring(size, records):
    """A memfd laid out as BPF maps a ring: consumer page, producer page, data twice."""
    page = mmap.PAGESIZE
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 2 * page + 2 * size)
    data = bytearray(size)
    off = 0
    for rec, length in records:
        hdr = np.array([length, 0], "<u4").tobytes()
        data[off:off + 8] = hdr
        data[off + 8:off + 8 + len(rec)] = rec
        off += (8 + (length & ~(ring.BUSY | ring.DISCARD)) + 7) & ~7
    os.pwrite(fd, bytes(data) * 2, 2 * page)
    os.pwrite(fd, np.array([off], "<u8").tobytes(), page)
    return fd


def test_ring_reader_skips_discarded_and_stops_at_busy():
    recs = np.zeros(4, RECORD_DTYPE)
    recs["pid"] = [1, 2, 3, 4]
    n = RECORD_DTYPE.itemsize
    fd = _emulated_ring(1 << 16, [(recs[0].tobytes(), n), (recs[1].tobytes(), n | ring.DISCARD),
                                  (recs[2].tobytes(), n), (recs[3].tobytes(), n | ring.BUSY)])
    try:
        r = ring.RingReader(fd, 1 << 16)
        got = r.drain()
        assert list(got["pid"]) == [1, 3]
        assert 0 < r.fill < 1
        r.close()
    finally:
        os.close(fd)



def test_ring_reader_takes_what_was_committed_when_it_began():
    """A producer that keeps committing while the reader copies does not keep it draining
    (chasing a steady producer a few records a turn spun a whole core): one drain returns
    the records committed when it began, the next the rest."""
    recs = np.zeros(6, RECORD_DTYPE)
    recs["pid"] = [1, 2, 3, 4, 5, 6]
    n = RECORD_DTYPE.itemsize
    fd = _emulated_ring(1 << 16, [(r.tobytes(), n) for r in recs])
    page = mmap.PAGESIZE
    try:
        os.pwrite(fd, np.array([3 * ring.SLOT], "<u8").tobytes(), page)   # 3 committed so far
        r = ring.RingReader(fd, 1 << 16)
        commit = r._commit

        def producer_goes_on(cons):     # the next record commits as each span is consumed
            commit(cons)
            prod = int(np.frombuffer(os.pread(fd, 8, page), "<u8")[0])
            os.pwrite(fd, np.array([min(prod + ring.SLOT, 6 * ring.SLOT)], "<u8").tobytes(), page)
        r._commit = producer_goes_on
        assert [list(r.drain()["pid"]) for _ in range(5)] == [[1, 2, 3], [4], [5], [6], []]
        r.close()
    finally:
        os.close(fd)

def test_shedder_raises_keeps_the_longer_half_and_relaxes():
    now = [0.0]
    sets = []
    sh = ring.Shedder("vfs", sets.append, min_ns=0, hold_s=1.0, clock=lambda: now[0])
    recs = np.zeros(100, RECORD_DTYPE)
    recs["dur_ns"] = np.arange(100) * 1000 + 5000
    sh.update(0.9, recs)
    assert sh.threshold_ns == int(np.median(recs["dur_ns"])) and sets[-1] == sh.threshold_ns
    assert sh.meta()["min_ns"] == sh.threshold_ns and sh.raises == 1
    first = sh.threshold_ns
    sh.update(0.8, recs[recs["dur_ns"] >= first])
    assert sh.threshold_ns >= 2 * first and sh.raises == 2
    sh.update(0.3, recs[:0])               # between low and high: holds
    top = sh.threshold_ns
    for _ in range(40):                    # calm: halves every hold_s until off
        now[0] += 0.6
        sh.update(0.0, recs[:0])
    assert sh.threshold_ns == 0 and sets[-1] == 0 and sh.meta() is None
    assert top > first
