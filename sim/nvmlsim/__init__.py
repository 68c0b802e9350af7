"""Workload side of the simulated NVML library (nvmlsim.c, built by the Makefile here).

A demo or test workload tells the simulator what "its GPU" is doing; the simulated
``libnvidia-ml.so.1``, loaded by any process through pynvml, turns that into NVML
utilization samples and process lists.  The channel is one small state file, mmap'ed by
every side and guarded by ``flock``, so it works across processes::

    from stallscope.sim import nvmlsim
    path = nvmlsim.create_state("/tmp/sim.state", n_gpus=2, period_ms=100)
    gpu = nvmlsim.SimGpu(0, path)
    gpu.register()                 # this pid now holds a compute context on GPU 0
    with gpu.busy():               # a kernel is running on GPU 0 for the whole block
        train_step()
    gpu.mark(start_ns, end_ns)     # or record a finished span (wall-clock ns)

The reader finds the state through ``STALLSCOPE_NVMLSIM_STATE`` (default
``/run/stallscope/nvmlsim.state``).  No pynvml import here: this is the GPU's side.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import subprocess
import time
import uuid as _uuid

STATE_ENV = "STALLSCOPE_NVMLSIM_STATE"
PERIOD_ENV = "STALLSCOPE_NVMLSIM_PERIOD_MS"
DEFAULT_STATE = "/run/stallscope/nvmlsim.state"
DEFAULT_PERIOD_MS = 100
HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, "build", "libnvidia-ml.so.1")

# Layout of the state file; mirrors struct nvmlsim_* in nvmlsim.c (check_abi compares).
VERSION = 1
MAX_GPUS, MAX_PROCS, MAX_OPEN, MAX_SPANS, MAX_SAMPLES = 16, 64, 16, 4096, 128
GPU_LOST = 1 << 0        # every query on the GPU fails with NVML_ERROR_GPU_IS_LOST
GPU_NO_SAMPLES = 1 << 1  # nvmlDeviceGetSamples fails with NVML_ERROR_NOT_SUPPORTED

_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class _Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_char * 8), ("version", _u32), ("n_gpus", _u32),
                ("period_us", _u64), ("created_ns", _u64), ("history", _u32),
                ("idle_quiet_ms", _u32), ("driver_version", ctypes.c_char * 80),
                ("reserved", ctypes.c_uint8 * 136)]


class _Span(ctypes.Structure):
    _fields_ = [("start_ns", _u64), ("end_ns", _u64)]


class _Open(ctypes.Structure):
    _fields_ = [("start_ns", _u64), ("pid", _u32), ("pad", _u32)]


class _Proc(ctypes.Structure):
    _fields_ = [("pid", _u32), ("pad", _u32), ("used_bytes", _u64)]


class _Sample(ctypes.Structure):
    _fields_ = [("ts_us", _u64), ("util", _u32), ("pad", _u32)]


class _Gpu(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 96), ("uuid", ctypes.c_char * 96),
                ("flags", _u32), ("last_util", _u32), ("span_count", _u64),
                ("next_end_us", _u64), ("last_busy_ns", _u64), ("sample_count", _u64),
                ("open", _Open * MAX_OPEN), ("procs", _Proc * MAX_PROCS),
                ("spans", _Span * MAX_SPANS), ("samples", _Sample * MAX_SAMPLES)]


def _abi() -> list[int]:
    return [VERSION, ctypes.sizeof(_Header), ctypes.sizeof(_Gpu), _Gpu.flags.offset,
            _Gpu.span_count.offset, _Gpu.open.offset, _Gpu.procs.offset,
            _Gpu.spans.offset, _Gpu.samples.offset,
            MAX_GPUS, MAX_PROCS, MAX_OPEN, MAX_SPANS, MAX_SAMPLES]


def build() -> str:
    """Build the simulated library with make (a no-op when up to date); return its path."""
    subprocess.run(["make", "-s", "-C", HERE], check=True, stdout=subprocess.DEVNULL)
    return LIBRARY


def check_abi(lib_path: str = LIBRARY) -> None:
    """Raise RuntimeError if the built library's state layout differs from this module's."""
    lib = ctypes.CDLL(lib_path)
    want = _abi()
    got = list((ctypes.c_uint64 * len(want)).in_dll(lib, "nvmlsim_abi"))
    if got != want:
        raise RuntimeError(f"nvmlsim layout mismatch: library {got}, python {want}")


def _path(path: str | None) -> str:
    return path or os.environ.get(STATE_ENV) or DEFAULT_STATE


def create_state(path: str | None = None, n_gpus: int = 1, period_ms: float | None = None,
                 *, names: list[str] | None = None, uuids: list[str] | None = None,
                 history: int = 100, idle_quiet_ms: int = 0,
                 driver_version: str = "nvmlsim-1") -> str:
    """Create (or atomically replace) a state file describing ``n_gpus`` idle GPUs.

    ``period_ms``: sample period (default ``$STALLSCOPE_NVMLSIM_PERIOD_MS`` or 100).
    ``history``: samples the driver buffer keeps (NVML keeps 100).
    ``idle_quiet_ms``: 0 records idle periods as 0% samples; otherwise, after that long
    without any busy span, the GPU records no samples at all (``nvmlDeviceGetSamples``
    returns NVML_ERROR_NOT_FOUND), which is what drivers do on an idle GPU.
    Processes that already mapped an older file keep it; new ``nvmlInit`` calls see this one.
    """
    path = _path(path)
    if period_ms is None:
        period_ms = float(os.environ.get(PERIOD_ENV) or DEFAULT_PERIOD_MS)
    if not 0 <= n_gpus <= MAX_GPUS:
        raise ValueError(f"n_gpus must be 0..{MAX_GPUS}")
    if not 1 <= history <= MAX_SAMPLES:
        raise ValueError(f"history must be 1..{MAX_SAMPLES}")
    period_us = int(round(period_ms * 1000))
    if period_us <= 0:
        raise ValueError("period_ms must be positive")
    hdr = _Header(magic=b"NVMLSIM", version=VERSION, n_gpus=n_gpus, period_us=period_us,
                  created_ns=time.time_ns(), history=history, idle_quiet_ms=idle_quiet_ms,
                  driver_version=driver_version.encode()[:79])
    gpus = (_Gpu * n_gpus)()
    for i, g in enumerate(gpus):
        g.name = (names[i] if names else f"nvmlsim GPU {i}").encode()[:95]
        g.uuid = (uuids[i] if uuids else f"GPU-{_uuid.uuid4()}").encode()[:95]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(bytes(hdr) + bytes(gpus))
    os.replace(tmp, path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class SimGpu:
    """One simulated GPU in a state file: register compute pids, mark busy spans, inject faults."""

    def __init__(self, index: int, path: str | None = None):
        self.path = _path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(self._fd, 0)
            hdr = _Header.from_buffer_copy(self._mm)
            if hdr.magic != b"NVMLSIM" or hdr.version != VERSION:
                raise ValueError(f"{self.path} is not an nvmlsim v{VERSION} state file")
            if not 0 <= index < hdr.n_gpus:
                raise ValueError(f"GPU {index} not in {self.path} ({hdr.n_gpus} GPUs)")
            self.index = index
            self._g = _Gpu.from_buffer(self._mm, ctypes.sizeof(_Header) + index * ctypes.sizeof(_Gpu))
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield self._g
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def register(self, pid: int | None = None, used_bytes: int = 0) -> None:
        """List ``pid`` (default: this process) as a compute process on this GPU until it
        exits or is unregistered."""
        pid = os.getpid() if pid is None else pid
        with self._locked() as g:
            slots = [p for p in g.procs if p.pid == pid] or \
                    [p for p in g.procs if p.pid == 0 or not _alive(p.pid)]
            if not slots:
                raise RuntimeError(f"GPU {self.index}: more than {MAX_PROCS} compute processes")
            slots[0].pid, slots[0].used_bytes = pid, used_bytes

    def unregister(self, pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else pid
        with self._locked() as g:
            for p in g.procs:
                if p.pid == pid:
                    p.pid, p.used_bytes = 0, 0

    def mark(self, start_ns: int, end_ns: int) -> None:
        """Record that a kernel ran from ``start_ns`` to ``end_ns`` (wall-clock ns).

        Mark spans as they finish: a period the driver already turned into a sample is
        not recomputed (use ``busy()`` for work that is still running).
        """
        if end_ns <= start_ns:
            raise ValueError("end_ns must be after start_ns")
        with self._locked() as g:
            self._append(g, start_ns, end_ns)

    @staticmethod
    def _append(g: _Gpu, start_ns: int, end_ns: int) -> None:
        n = g.span_count
        if n:
            last = g.spans[(n - 1) % MAX_SPANS]
            if last.start_ns <= start_ns <= last.end_ns:  # coalesce back-to-back kernels
                last.end_ns = max(last.end_ns, end_ns)
                return
        s = g.spans[n % MAX_SPANS]
        s.start_ns, s.end_ns = start_ns, end_ns
        g.span_count = n + 1

    @contextlib.contextmanager
    def busy(self):
        """The GPU is busy for the duration of the block; visible to the driver while it runs."""
        with self._locked() as g:
            free = [o for o in g.open if o.start_ns == 0 or not _alive(o.pid)]
            if not free:
                raise RuntimeError(f"GPU {self.index}: more than {MAX_OPEN} concurrent busy spans")
            slot, start = free[0], time.time_ns()
            slot.start_ns, slot.pid = start, os.getpid()
        try:
            yield self
        finally:
            with self._locked() as g:
                slot.start_ns, slot.pid = 0, 0
                self._append(g, start, time.time_ns())

    def set_faults(self, lost: bool = False, no_samples: bool = False) -> None:
        """Make the GPU fall off the bus (``lost``) or drop sample support (``no_samples``)."""
        with self._locked() as g:
            g.flags = (GPU_LOST if lost else 0) | (GPU_NO_SAMPLES if no_samples else 0)

    def close(self) -> None:
        self.__dict__.pop("_g", None)
        mm = self.__dict__.pop("_mm", None)
        if mm is not None:
            mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SimGpu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
