"""NVML sampler: GPU identity, utilization samples with their own timestamps, compute processes.

The blame needs to know *when* each GPU was idle, to within one driver sample period, and
*who* owned it.  NVML keeps a ring of utilization samples per GPU (each the percent of one
sample period, 1/6 s to 1 s depending on the product, during which a kernel ran), stamped
by the driver in wall-clock microseconds.  ``nvmlDeviceGetSamples`` pages through that ring
by the last timestamp seen, so polling every second or so loses nothing and each sample is
returned once.  This module reads it through the official bindings (``pynvml``, package
nvidia-ml-py), so the code that runs against the simulated library (sim/nvmlsim) runs
unchanged on a GPU node.

Driver behaviours handled here:

* no samples at all (``NVML_ERROR_NOT_SUPPORTED``, e.g. some virtualized GPUs): fall back to
  ``nvmlDeviceGetUtilizationRates``, stamped with ``time.time_ns()`` when read;
* an empty ring (``NVML_ERROR_NOT_FOUND``) for longer than a period: some drivers stop
  recording while a GPU idles, so on a GPU that has compute processes this means idle, not
  "no data"; util=0 samples are synthesized at the observed period and flagged ``synth=1``.
  (An H200 on driver 580 keeps recording 0% samples every 200 ms and answers NOT_FOUND only
  when asked again before its next sample: tests/gpu/README.md);
* an NVML error on one GPU during a poll is counted (``meta()["errors"]``) and that GPU is
  skipped for the poll; only start-up failures raise (``NvmlUnavailable``, one line).

Timestamps come out as wall-clock ns, the tracer's event clock.  Not thread-safe: poll from
one thread.
"""
from __future__ import annotations

import collections
import ctypes
import os
import statistics
import time

import numpy as np

LIB_ENV = "STALLSCOPE_NVML_LIB"
SONAME = "libnvidia-ml.so.1"
_PERIOD_WINDOW = 64          # timestamp deltas kept per GPU for the median period
_WALL_US_MIN = 10 ** 15      # NVML stamps before 2001 cannot be wall clock (see _to_wall_ns)
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                 6: "usVal"}  # nvmlValueType_t -> nvmlValue_t member


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this node (no library, no driver, no GPU, no permission).

    ``str()`` is one line meant for the user; the agent runs without GPU data.
    """


def _load_pynvml(lib_path: str | None):
    """Import pynvml, making its ``dlopen("libnvidia-ml.so.1")`` resolve to ``lib_path``.

    Loading the file first, RTLD_GLOBAL, registers its SONAME with the dynamic loader, which
    then hands that same object to pynvml's later load by name.
    """
    handle = None
    if lib_path:
        try:
            handle = ctypes.CDLL(lib_path, mode=os.RTLD_GLOBAL)._handle
        except OSError as e:
            raise NvmlUnavailable(f"NVML not available: cannot load {lib_path}: {e}") from e
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable("NVML not available: the pynvml module (pip package "
                              "nvidia-ml-py) is not installed") from e
    if handle is not None and pynvml.nvmlLib is not None and pynvml.nvmlLib._handle != handle:
        raise NvmlUnavailable(f"NVML not available: this process already loaded another "
                              f"{SONAME}, so {lib_path} cannot be used")
    return pynvml


def _why(nv, e) -> str:
    """One line for an NVML start-up error."""
    code = getattr(e, "value", None)
    if code == nv.NVML_ERROR_LIBRARY_NOT_FOUND:
        return f"NVML not available: {SONAME} not found (no NVIDIA driver?)"
    if code == nv.NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVML not available: the NVIDIA driver is not loaded"
    if code == nv.NVML_ERROR_NO_PERMISSION:
        return "NVML not available: no permission to talk to the NVIDIA driver"
    return f"NVML not available: {e} (NVML error {code})"


def _to_wall_ns(ts_us: int) -> int:
    """NVML sample stamp (CPU time in us; wall clock on the drivers we know) -> wall ns.

    A stamp too small to be wall clock is taken as time since boot and shifted by the
    current boot-to-wall offset, rather than emitted 50 years in the past.
    """
    if ts_us >= _WALL_US_MIN:
        return ts_us * 1000
    return ts_us * 1000 + time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class _Gpu:
    """Per-GPU sampling state."""

    def __init__(self, handle, index: int, uuid: str, name: str):
        self.handle, self.index, self.uuid, self.name = handle, index, uuid, name
        self.source = "samples"      # or "rates" once the driver said samples are unsupported
        self.got_samples = False
        self.last_ts_us = 0          # paging cursor, in the driver's own units
        self.last_ns = 0             # newest emitted sample (real or synthesized), wall ns
        self.deltas = collections.deque(maxlen=_PERIOD_WINDOW)
        self.procs_fn = None         # the running-processes call this driver has
        self.procs_ok = True

    def period_ns(self) -> int:
        return int(statistics.median(self.deltas)) if self.deltas else 0     # np.median: 80 us a call


class GpuSampler:
    """Polls every GPU NVML lists.  ``open()`` it, call ``poll()`` on a timer (well inside the
    driver's ring: ~70-100 samples, 14 s at 200 ms on an H200), read ``meta()`` for the batch
    envelope."""

    def __init__(self, nv, gpus: list[_Gpu], driver: str, errors: int):
        self._nv = nv
        self._gpus = gpus
        self._driver = driver
        self._errors = errors
        self._opened_ns = time.time_ns()
        self._closed = False
        self.gpus = [{"index": g.index, "uuid": g.uuid, "name": g.name} for g in gpus]

    @classmethod
    def open(cls, lib_path: str | None = None) -> "GpuSampler":
        """Initialize NVML and list the GPUs.

        ``lib_path`` (or ``$STALLSCOPE_NVML_LIB``) names a libnvidia-ml to use instead of the
        system one, e.g. the simulator's build/libnvidia-ml.so.1.  Raises NvmlUnavailable.
        """
        nv = _load_pynvml(lib_path or os.environ.get(LIB_ENV) or None)
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise NvmlUnavailable(_why(nv, e)) from e
        try:
            driver = nv.nvmlSystemGetDriverVersion()
            count = nv.nvmlDeviceGetCount()
            gpus, errors = [], 0
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    gpus.append(_Gpu(h, nv.nvmlDeviceGetIndex(h), nv.nvmlDeviceGetUUID(h),
                                     nv.nvmlDeviceGetName(h)))
                except nv.NVMLError:
                    errors += 1  # e.g. NO_PERMISSION or GPU_IS_LOST: sample the others
            if not gpus:
                raise NvmlUnavailable(f"NVML not available: no usable GPU "
                                      f"({count} listed, {errors} failed)")
        except nv.NVMLError as e:
            nv.nvmlShutdown()
            raise NvmlUnavailable(_why(nv, e)) from e
        except NvmlUnavailable:
            nv.nvmlShutdown()
            raise
        return cls(nv, gpus, driver, errors)

    # -- one poll --------------------------------------------------------------

    def poll(self) -> dict:
        """New utilization samples and the current compute processes of every GPU.

        Returns ``{"gpu": {ts_ns, gpu, util, synth}, "gpu_proc": {ts_ns, gpu, pid}}`` as numpy
        arrays.  A GPU's samples are in time order and are never returned twice.
        """
        nv = self._nv
        s_ts, s_gpu, s_util, s_synth = [], [], [], []
        p_ts, p_gpu, p_pid = [], [], []

        def emit(g, ts_ns, util, synth=0):
            s_ts.append(ts_ns)
            s_gpu.append(g.index)
            s_util.append(util)
            s_synth.append(synth)
            g.last_ns = max(g.last_ns, ts_ns)

        for g in self._gpus:
            try:
                now = time.time_ns()
                pids = self._pids(g)
                if pids is not None:
                    p_ts += [now] * len(pids)
                    p_gpu += [g.index] * len(pids)
                    p_pid += pids
                if g.source == "samples":
                    self._poll_samples(g, pids, now, emit)
                else:
                    self._poll_rates(g, emit)
            except nv.NVMLError:
                self._errors += 1

        return {
            "gpu": {"ts_ns": np.array(s_ts, dtype=np.uint64),
                    "gpu": np.array(s_gpu, dtype=np.uint32),
                    "util": np.array(s_util, dtype=np.uint32),
                    "synth": np.array(s_synth, dtype=np.uint8)},
            "gpu_proc": {"ts_ns": np.array(p_ts, dtype=np.uint64),
                         "gpu": np.array(p_gpu, dtype=np.uint32),
                         "pid": np.array(p_pid, dtype=np.uint32)},
        }

    def _pids(self, g: _Gpu) -> list[int] | None:
        """Compute pids on ``g``; None when this driver cannot say."""
        nv = self._nv
        if not g.procs_ok:
            return None
        if g.procs_fn is None:
            for fn in (nv.nvmlDeviceGetComputeRunningProcesses_v3,
                       nv.nvmlDeviceGetComputeRunningProcesses_v2):
                try:
                    procs = fn(g.handle)
                except nv.NVMLError_FunctionNotFound:
                    continue
                except nv.NVMLError_NotSupported:
                    break
                g.procs_fn = fn
                return [p.pid for p in procs]
            g.procs_ok = False  # not an error per poll: this driver never lists processes
            return None
        return [p.pid for p in g.procs_fn(g.handle)]

    def _poll_samples(self, g: _Gpu, pids, now: int, emit) -> None:
        nv = self._nv
        try:
            vtype, samples = nv.nvmlDeviceGetSamples(g.handle, nv.NVML_GPU_UTILIZATION_SAMPLES,
                                                     g.last_ts_us)
        except nv.NVMLError_NotFound:
            samples = []
        except (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound):
            if g.got_samples:
                raise
            g.source = "rates"
            self._poll_rates(g, emit)
            return
        field = _VALUE_FIELDS.get(vtype, "uiVal") if samples else "uiVal"
        fresh = sorted((s.timeStamp, getattr(s.sampleValue, field))
                       for s in samples if s.timeStamp > g.last_ts_us)
        if fresh:
            prev = g.last_ts_us if g.got_samples else None
            for ts_us, value in fresh:
                if prev is not None:
                    g.deltas.append((ts_us - prev) * 1000)
                prev = ts_us
                emit(g, _to_wall_ns(ts_us), min(max(int(round(value)), 0), 100))
            g.got_samples = True
            g.last_ts_us = fresh[-1][0]
        elif pids:
            self._synthesize_idle(g, now, emit)

    def _synthesize_idle(self, g: _Gpu, now: int, emit) -> None:
        """Empty ring while processes hold the GPU: idle.  Emit util=0 at the observed period,
        leaving the newest period to the driver in case its sample is merely late; before any
        period has been observed, emit one sample stamped with the poll time."""
        period = g.period_ns()
        start = max(g.last_ns, self._opened_ns)
        if not period:
            if now > start:
                emit(g, now, 0, 1)
            return
        t = start + period
        while t <= now - period:
            emit(g, t, 0, 1)
            t += period

    def _poll_rates(self, g: _Gpu, emit) -> None:
        u = self._nv.nvmlDeviceGetUtilizationRates(g.handle)
        now = time.time_ns()
        if g.last_ns:
            g.deltas.append(now - g.last_ns)  # effective resolution: the poll interval
        emit(g, now, min(int(u.gpu), 100))

    # -- envelope ----------------------------------------------------------------

    def meta(self) -> dict:
        """What a batch needs to be read: GPUs, per-GPU sample period (ns, 0 while unknown;
        in "rates" mode it is the poll interval), NVML errors so far, data source, driver."""
        return {
            "gpus": list(self.gpus),
            "sample_period_ns": {g.index: g.period_ns() for g in self._gpus},
            "errors": self._errors,
            "source": "rates" if any(g.source == "rates" for g in self._gpus) else "samples",
            "driver": self._driver,
        }

    def close(self) -> None:
        """Shut NVML down (once); the sampler cannot poll afterwards."""
        if not self._closed:
            self._closed = True
            try:
                self._nv.nvmlShutdown()
            except self._nv.NVMLError:
                pass

    def __enter__(self) -> "GpuSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
