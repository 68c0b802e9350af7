"""Prometheus metrics for `collect`, `watch` and `demo`: batches and verdicts in, a scrape
endpoint out.

:class:`StallscopeMetrics` is one custom collector on its own registry (never the global
default, so several can live in one process). It is fed by the live analysis
(``observe_batches``, ``observe_verdicts``) and read by prometheus_client's HTTP server
thread at scrape time; a lock keeps the two apart.

Labels follow NVIDIA's dcgm-exporter so PromQL can join on them: ``Hostname`` (the node),
``gpu`` (index, as a string), ``UUID``, ``pod``, ``namespace``, ``container``, and
``hpc_job`` for the training job (dcgm-exporter's name for a job; a label called ``job``
would clash with the scrape job Prometheus attaches). A pid, tid, comm or path is never a
label: their number has no bound.

What a batch carries is cumulative since its tracer started (counters, the kernel's
histograms), so the latest batch of a node is exposed as it is and a tracer restart reads
as a counter reset, which ``rate()`` handles. Verdicts and received batches are counted
here, each verdict once (the live analysis reports every interval once).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from stallscope.analysis.verdict import UNEXPLAINED_CLASSES
from stallscope.wire.schema import HIST_SLOTS, STALL_TABLES, table_len
from stallscope.wire.sink import is_loss_counter

#: labels of the GPU idle metrics, in order; the dcgm-exporter names first
VERDICT_LABELS = ("Hostname", "gpu", "UUID", "hpc_job", "pod", "namespace", "container",
                  "verdict", "class", "fs", "op")
#: the kernel's histogram slot k counts ops with (dur_ns >> 10) + 1 in [2^k, 2^(k+1)),
#: i.e. dur_ns in [(2^k - 1) * 1024, (2^(k+1) - 1) * 1024); the last slot is open (+Inf)
SLOT_LOW_S = [((1 << k) - 1) * 1024 / 1e9 for k in range(HIST_SLOTS)]
SLOT_HIGH_S = [((1 << (k + 1)) - 1) * 1024 / 1e9 for k in range(HIST_SLOTS - 1)]
_SLOT_MID_S = [(lo + hi) / 2 for lo, hi in zip(SLOT_LOW_S, SLOT_HIGH_S)] + [SLOT_LOW_S[-1]]

#: every metric name (without the _total/_bucket suffixes) this exporter exposes
METRICS = {
    "stallscope_gpu_idle_seconds": "GPU idle time judged, seconds (interval length), by verdict "
                                   "(culprit|remote|unexplained), culprit class, filesystem and op.",
    "stallscope_gpu_idle_explained_seconds": "Part of the GPU idle time the culprit explains, "
                                             "seconds (explained fraction x idle time lost).",
    "stallscope_gpu_idle_intervals": "GPU idle intervals judged (one verdict each).",
    "stallscope_op_latency_seconds": "Latency of ops below the tracing threshold (the kernel's "
                                     "log2 histograms), by probe family and op. Buckets end at "
                                     "(2^(k+1)-1)*1.024 us; _sum is estimated from bucket "
                                     "midpoints (a log2 histogram keeps no sum).",
    "stallscope_batches_received": "Batches received from tracers.",
    "stallscope_events_received": "Stall events received from tracers, by stall type.",
    "stallscope_batches_rejected": "Batches rejected as malformed (undecodable; node unknown).",
    "stallscope_events_lost": "Events lost before analysis, as the tracer counts them "
                              "(reason: ring buffer full, in-flight slot collision, storm tail, "
                              "a sink's dropped events).",
    "stallscope_batches_lost": "Batches a tracer's sink could not deliver (reason: the sink).",
    "stallscope_tracer_tick_errors": "Agent loop ticks that failed (logged once, then counted).",
    "stallscope_lake_errors": "Lake writes that failed (the collector retries; its store keeps the data).",
    "stallscope_lake_pending_batches": "Batches stored by the collector and not yet in the lake.",
    "stallscope_exporter_errors": "Batches or verdicts this exporter failed to account for.",
}


def _s(x) -> str:
    return "" if x is None else str(x)


def verdict_labels(v) -> tuple:
    """The label values (:data:`VERDICT_LABELS`) of one verdict. Pod identity is read where
    the verdict has it (``pod``, ``namespace``, ``container`` attributes), else empty."""
    if v.verdict == "unexplained":      # its class when its GPU processes account for it (process_start, cpu_bound...)
        klass, fs, op = v.klass if v.klass in UNEXPLAINED_CLASSES else "unexplained", "", ""
    else:
        c = v.culprit or {}
        t = v.chain.targets[0] if v.chain is not None and v.chain.targets else None
        klass = v.klass or "unknown"
        fs = (t.fs if t is not None else "") or c.get("fs", "") or ""
        op = c.get("op", "") or (next(iter(v.chain.ops), "") if v.chain is not None else "")
    return (_s(v.node), _s(v.gpu), _s(v.gpu_uuid), _s(v.job), _s(getattr(v, "pod", "")),
            _s(getattr(v, "namespace", "")), _s(getattr(v, "container", "")), _s(v.verdict),
            klass, _s(fs), _s(op))


class StallscopeMetrics:
    """The exporter's state and its Prometheus collector. ``rejected``: a callable giving
    the number of malformed batches so far (the collector's count), read at scrape time;
    ``lake``: a callable giving the lake writer's counters (``lake.errors``,
    ``lake.pending_batches``), None when the collector writes no lake."""

    def __init__(self, registry: CollectorRegistry | None = None, rejected=None, log=None, lake=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rejected = rejected
        self.lake = lake
        self.log = log or (lambda m: print(f"stallscope: {m}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._idle: dict = {}          # verdict labels -> [seconds, explained seconds, count]
        self._batches: dict = {}       # node -> batches
        self._events: dict = {}        # (node, type) -> events
        self._counters: dict = {}      # node -> the latest batch's counters (cumulative)
        self._hist: dict = {}          # node -> the latest batch's hist (cumulative)
        self._errors: dict = {"batches": 0, "verdicts": 0}
        self._server: Any = None
        self.registry.register(self)

    # ------------------------------------------------------------------ feeding

    def observe_batches(self, batches) -> None:
        for b in batches:
            try:
                node = _s(b.node)
                ev = {k: table_len(t) for k, t in b.tables.items() if k in STALL_TABLES}
                counters = {k: int(v) for k, v in (b.counters or {}).items()}
                hist = {str(f): {str(op): [int(x) for x in c] for op, c in ops.items()}
                        for f, ops in (b.hist or {}).items()}
            except Exception as e:
                self._error("batches", e)
                continue
            with self._lock:
                self._batches[node] = self._batches.get(node, 0) + 1
                for kind, n in ev.items():
                    self._events[(node, kind)] = self._events.get((node, kind), 0) + n
                if counters:
                    self._counters[node] = counters
                if hist:
                    self._hist[node] = hist

    def observe_verdicts(self, verdicts) -> None:
        for v in verdicts:
            try:
                key = verdict_labels(v)
                idle = v.duration_ns / 1e9
                explained = v.explained_ns / 1e9
            except Exception as e:
                self._error("verdicts", e)
                continue
            with self._lock:
                acc = self._idle.setdefault(key, [0.0, 0.0, 0])
                acc[0] += idle
                acc[1] += explained
                acc[2] += 1

    def _error(self, stage: str, e: Exception) -> None:
        with self._lock:
            self._errors[stage] += 1
            first = self._errors[stage] == 1
        if first:
            self.log(f"metrics: could not account for {stage} ({type(e).__name__}: {e}); counting")

    # ------------------------------------------------------------------ scrape

    def collect(self):
        with self._lock:
            idle = {k: list(v) for k, v in self._idle.items()}
            batches = dict(self._batches)
            events = dict(self._events)
            counters = {n: dict(c) for n, c in self._counters.items()}
            hist = {n: {f: dict(ops) for f, ops in h.items()} for n, h in self._hist.items()}
            errors = dict(self._errors)
        rejected = 0
        if self.rejected is not None:
            try:
                rejected = int(self.rejected())
            except Exception:
                errors["batches"] += 1
        for i, name in enumerate(("stallscope_gpu_idle_seconds", "stallscope_gpu_idle_explained_seconds",
                                  "stallscope_gpu_idle_intervals")):
            yield _counter(name, VERDICT_LABELS, ((key, vals[i]) for key, vals in sorted(idle.items())))

        h = HistogramMetricFamily("stallscope_op_latency_seconds", METRICS["stallscope_op_latency_seconds"],
                                  labels=["Hostname", "family", "op"])
        for node in sorted(hist):
            for fam_name in sorted(hist[node]):
                for op, counts in sorted(hist[node][fam_name].items()):
                    h.add_metric([node, fam_name, op], latency_buckets(counts), latency_sum_estimate(counts))
        yield h

        yield _counter("stallscope_batches_received", ["Hostname"],
                       (([node], n) for node, n in sorted(batches.items())))
        yield _counter("stallscope_events_received", ["Hostname", "type"], sorted(events.items()))
        yield _counter("stallscope_batches_rejected", [], [((), rejected)])
        lost, blost = [], []
        for node, c in sorted(counters.items()):
            for k, v in sorted(c.items()):
                if is_loss_counter(k):
                    lost.append(((node, k), v))
                elif k.endswith(".dropped_batches"):
                    blost.append(((node, k.rsplit(".", 1)[0]), v))
        yield _counter("stallscope_events_lost", ["Hostname", "reason"], lost)
        yield _counter("stallscope_batches_lost", ["Hostname", "reason"], blost)
        yield _counter("stallscope_tracer_tick_errors", ["Hostname"],
                       (([node], c["tick_errors"]) for node, c in sorted(counters.items()) if "tick_errors" in c))
        if self.lake is not None:
            try:
                lc = dict(self.lake())
            except Exception:
                errors["lake"] = errors.get("lake", 0) + 1
            else:
                yield _counter("stallscope_lake_errors", [], [((), int(lc.get("lake.errors", 0)))])
                g = GaugeMetricFamily("stallscope_lake_pending_batches",
                                      METRICS["stallscope_lake_pending_batches"])
                g.add_metric([], int(lc.get("lake.pending_batches", 0)))
                yield g
        yield _counter("stallscope_exporter_errors", ["stage"], (([k], n) for k, n in sorted(errors.items())))

    # ------------------------------------------------------------------ serving

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on ``addr:port`` from a daemon thread (port 0: any free port);
        returns the port. Raises OSError when it cannot listen."""
        from prometheus_client import start_http_server
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _counter(name: str, labels, rows) -> CounterMetricFamily:
    """A counter family from (label values, value) rows; HELP from :data:`METRICS`."""
    fam = CounterMetricFamily(name, METRICS[name], labels=list(labels))
    for key, val in rows:
        fam.add_metric(list(key), val)
    return fam


def latency_buckets(counts) -> list:
    """(le, cumulative count) for each finite bucket and +Inf, of one op's log2 slot counts."""
    out, acc = [], 0
    for k, c in enumerate(counts):
        acc += int(c)
        if k < len(SLOT_HIGH_S):
            out.append((repr(SLOT_HIGH_S[k]), acc))
    out.append(("+Inf", acc))
    return out


def latency_sum_estimate(counts) -> float:
    """Summed latency, seconds, estimated from the bucket midpoints (the open last slot
    counts at its lower edge)."""
    return float(sum(int(c) * _SLOT_MID_S[min(k, HIST_SLOTS - 1)] for k, c in enumerate(counts)))
