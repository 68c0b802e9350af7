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
        self.fill = 0.0

    def _pos(self):
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return cons, prod

    def drain(self, max_records: int = 1 << 20) -> np.ndarray:
        """Copy out all committed records (up to max_records); returns RECORD_DTYPE array.

        ``fill`` is then how full the ring was when the drain began (0..1): what the
        overload control (:class:`Shedder`) watches."""
        cons, prod = self._pos()
        self.fill = min(1.0, (prod - cons) / self.size)
        out = []
        while cons < prod and max_records > 0:
            n = min((prod - cons) // SLOT, max_records)
            off = cons & self.mask
            if n == 0:
                break
            view = np.frombuffer(self._data, dtype=SLOT_DTYPE, count=n, offset=off)
            lens = view["len"]
            # fast path, one pass: every slot a committed record of our size
            clean = bool((lens == RECORD_DTYPE.itemsize).all())
            if not clean:
                busy = np.flatnonzero(lens & BUSY)
                if len(busy):
                    n = int(busy[0])
                    if n == 0:
                        break
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
            # one contiguous byte copy out of the ring (a structured-dtype copy
            # goes field by field and is several times slower)
            block = np.frombuffer(
                np.frombuffer(self._data, dtype=np.uint8, count=n * SLOT, offset=off).copy(),
                dtype=SLOT_DTYPE)
            if not clean:
                keep = (block["len"] & DISCARD) == 0
                if not keep.all():
                    block = block[keep]
            out.append(block)
            cons += n * SLOT
            max_records -= n
            self._commit(cons)
            # no re-read of the producer position: records committed meanwhile wait for the
            # next drain (chasing a steady producer here spun a whole core, a few records a turn)
        if not out:
            return np.empty(0, dtype=RECORD_DTYPE)
        # several spans (a record of another size stepped over): joined as bytes, since
        # numpy joins structured arrays field by field in Python
        slots = out[0] if len(out) == 1 else np.concatenate([b.view(np.uint8) for b in out]).view(SLOT_DTYPE)
        self.records += len(slots)
        return slots["rec"]

    def _commit(self, cons: int):
        struct.pack_into("<Q", self._cons, 0, cons)

    def close(self):
        for m in (self._cons, self._prod):
            try:
                m.close()
            except (BufferError, ValueError):
                pass


#: families whose programs read the raised threshold (bpf/common.bpf.h ss_below / ss_shed)
SHED_FAMILIES = ("vfs", "block", "nfs", "rdma")


class Shedder:
    """Graceful overload for one family: when its ring fills faster than it is drained,
    raise the threshold in the kernel (map ``shed``) so that only the longest stalls are
    emitted, instead of losing whichever records happen to meet a full ring.

    Each drain reports how full the ring was when the drain began. At or above ``high`` the
    threshold rises to the median duration of what was just drained (at least doubling):
    every raise halves the emitted rate and keeps the longer half, so a few drains reach a
    rate the consumer sustains. Ops above the compile-time threshold but below the raised one
    are counted by the kernel (``shed``) and still go into the latency histograms. After
    ``hold_s`` with the ring below ``low`` at every drain the threshold halves, and it is
    removed once it comes down to the configured one. The state rides in every batch:
    counters ``<family>.shed`` (ops shed, cumulative) and ``<family>.shed_raises``, and
    ``meta["shed"][family]`` while a raised threshold is in force."""

    def __init__(self, family: str, set_threshold, min_ns: int, log=None, high: float = 0.5,
                 low: float = 0.1, hold_s: float = 2.0, clock=None):
        import time
        self.family = family
        self._set = set_threshold
        self.min_ns = int(min_ns)
        self.log = log or (lambda m: None)
        self.high, self.low, self.hold_s = high, low, hold_s
        self._clock = clock or time.monotonic
        self._wall = time.time_ns
        self.threshold_ns = 0           # 0: no raised threshold
        self.raises = 0
        self.since_ns = 0               # wall time the current raised threshold began
        self.peak_ns = 0                # highest threshold since shedding began
        self._calm_since = None

    @classmethod
    def for_probe(cls, probe, min_ns: int, log=None, **kw):
        """A Shedder for a loaded family whose programs read the ``shed`` map, else None."""
        if probe.family not in SHED_FAMILIES:
            return None
        try:
            table = probe.bpf[b"shed"]
        except KeyError:
            return None

        def set_threshold(ns: int):
            table[table.Key(0)] = table.Leaf(int(ns))
        return cls(probe.family, set_threshold, min_ns, log, **kw)

    def update(self, fill: float, recs: np.ndarray):
        """After each drain: ``fill`` = how full the ring was (0..1), ``recs`` = what came."""
        now = self._clock()
        if fill >= self.high and len(recs):
            # half of what was just drained, by duration (the longer half stays)
            med = int(np.median(recs["dur_ns"]))
            new = max(med, 2 * self.threshold_ns, self.min_ns + 1, 1000)
            self._apply(new, f"ring {fill:.0%} full")
            self._calm_since = None
            return
        if self.threshold_ns == 0:
            return
        if fill >= self.low:
            self._calm_since = None
            return
        if self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= self.hold_s:
            new = self.threshold_ns // 2
            self._apply(0 if new <= self.min_ns else new, "load fell")
            self._calm_since = now

    def _apply(self, ns: int, why: str):
        if ns == self.threshold_ns:
            return
        self._set(ns)
        if ns > self.threshold_ns:
            self.raises += 1
        if self.threshold_ns == 0:
            self.since_ns = self._wall()
            self.peak_ns = 0
        self.peak_ns = max(self.peak_ns, ns)
        old, self.threshold_ns = self.threshold_ns, ns
        if ns:
            self.log(f"{self.family}: overload ({why}): shedding stalls shorter than "
                     f"{ns / 1e6:.3f} ms (was {old / 1e6:.3f} ms; counted as {self.family}.shed)")
        else:
            self.log(f"{self.family}: {why}: shedding off, threshold back to "
                     f"{self.min_ns / 1e6:.3f} ms")

    def meta(self) -> dict | None:
        """What the batch says about shedding now (None when not shedding)."""
        if not self.threshold_ns:
            return None
        return {"min_ns": self.threshold_ns, "since_ns": self.since_ns, "peak_ns": self.peak_ns,
                "configured_min_ns": self.min_ns}

    def counters(self, probe) -> dict:
        """Cumulative ``<family>.shed`` (from the kernel's per-CPU counter) and raises."""
        from stallscope.wire.schema import DEFINES

        from .probes import percpu_array_sums
        idx = DEFINES["SS_C_SHED"]
        shed = int(percpu_array_sums(probe.bpf[b"counters"], idx + 1)[idx])
        return {f"{self.family}.shed": shed, f"{self.family}.shed_raises": self.raises}
