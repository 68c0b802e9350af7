"""Bulk drain of a BPF ring buffer by mmap, one numpy view per drain.

BCC's ring buffer API calls a Python function per record, which tops out far
below the rate a busy node can produce. Every stallscope record has the same
size (``struct ss_event``), so the committed span between the consumer and
producer positions is an array of fixed-size slots. The kernel maps the data
area twice back to back, so the span is contiguous even when it wraps, and one
``np.frombuffer`` decodes it. Records still being written (BUSY bit) end the
span; discarded records (DISCARD bit) are dropped.

Layout (kernel/bpf/ringbuf.c, include/uapi/linux/bpf.h): page 0 holds the
consumer position (read-write), page 1 the producer position (read-only), then
the data pages mapped twice. Each record has an 8-byte header: u32 length with
BUSY (1<<31) and DISCARD (1<<30) flags, u32 page offset; records are 8-byte
aligned.
"""

from __future__ import annotations

import mmap
import struct

import numpy as np

from stallscope.wire.schema import RECORD_DTYPE

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
SLOT = (HDR + RECORD_DTYPE.itemsize + 7) & ~7
SLOT_DTYPE = np.dtype([("len", "<u4"), ("pgoff", "<u4"), ("rec", RECORD_DTYPE)], align=False)
assert SLOT_DTYPE.itemsize == SLOT


class RingError(RuntimeError):
    pass


class RingReader:
    """Drains one BPF_MAP_TYPE_RINGBUF map given its fd and size in bytes."""

    def __init__(self, map_fd: int, size: int):
        self.page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % self.page:
            raise RingError(f"ring buffer size {size} is not a power-of-2 multiple of the page size")
        self.size = size
        self.mask = size - 1
        try:
            self._cons = mmap.mmap(map_fd, self.page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            # MAP_POPULATE: fault the (double) data mapping in once, not page by page
            # while draining
            self._prod = mmap.mmap(map_fd, self.page + 2 * size,
                                   mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   mmap.PROT_READ, offset=self.page)
        except OSError as e:
            raise RingError(f"cannot mmap ring buffer (fd {map_fd}): {e}") from e
        self._data = np.frombuffer(self._prod, dtype=np.uint8)[self.page:]
        self.records = 0
        self.odd_records = 0       # records of another size (skipped, counted)

    def _pos(self):
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return cons, prod

    def drain(self, max_records: int = 1 << 20) -> np.ndarray:
        """Copy out all committed records (up to max_records); returns RECORD_DTYPE array."""
        cons, prod = self._pos()
        out = []
        while cons < prod and max_records > 0:
            n = min((prod - cons) // SLOT, max_records)
            off = cons & self.mask
            if n == 0:
                break
            view = np.frombuffer(self._data, dtype=SLOT_DTYPE, count=n, offset=off)
            lens = view["len"]
            busy = np.flatnonzero(lens & BUSY)
            if len(busy):
                n = int(busy[0])
                if n == 0:
                    break
                view = view[:n]
                lens = lens[:n]
            sizes = lens & ~np.uint32(BUSY | DISCARD)
            bad = np.flatnonzero(sizes != RECORD_DTYPE.itemsize)
            if len(bad):
                # a record of another size: take the good prefix, then step over it
                n = int(bad[0])
                if n == 0:
                    ln = int(sizes[0])
                    cons += (HDR + ln + 7) & ~7
                    self.odd_records += 1
                    self._commit(cons)
                    continue
                view = view[:n]
                lens = lens[:n]
            # one contiguous byte copy out of the ring (a structured-dtype copy
            # goes field by field and is several times slower)
            block = np.frombuffer(
                np.frombuffer(self._data, dtype=np.uint8, count=n * SLOT, offset=off).copy(),
                dtype=SLOT_DTYPE)
            keep = (block["len"] & DISCARD) == 0
            recs = block["rec"] if keep.all() else block["rec"][keep]
            out.append(recs)
            cons += n * SLOT
            max_records -= n
            self._commit(cons)
            cons, prod = cons, struct.unpack_from("<Q", self._prod, 0)[0]
        if not out:
            return np.empty(0, dtype=RECORD_DTYPE)
        res = out[0] if len(out) == 1 else np.concatenate(out)
        self.records += len(res)
        return res

    def _commit(self, cons: int):
        struct.pack_into("<Q", self._cons, 0, cons)

    def close(self):
        for m in (self._cons, self._prod):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
