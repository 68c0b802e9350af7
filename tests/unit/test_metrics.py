"""Prometheus metrics (export/prometheus.py): batches and verdicts through the live analysis
into the exporter, scraped over HTTP on an ephemeral port and parsed with prometheus_client's
own parser; the `collect` command end to end over real ZeroMQ; the Grafana dashboard's
queries against what a populated exporter exposes."""

from __future__ import annotations

import collections
import io as _io
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from stallscope.analysis.analyze import analyze
from stallscope.commands.collect import collect
from stallscope.export.prometheus import SLOT_HIGH_S, VERDICT_LABELS, StallscopeMetrics
from stallscope.printers import LiveVerdicts, VerdictPrinter
from stallscope.wire import transport
from stallscope.wire.schema import HIST_SLOTS, STALL_TABLES, Batch, table_len
from tests.netutil import free_port
from tests.unit.test_analysis_chains import sched
from tests.unit.test_blame import MS, T0, P, io, trainer_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "stallscope.json")


# --------------------------------------------------------------------------- the stream

def _timeline(segments):
    """Utilizations from (util, n_samples) runs, and the start time of each run."""
    utils, starts, i = [], [], 0
    for util, n in segments:
        starts.append(T0 + i * P)
        utils += [util] * n
        i += n
    return utils, starts


def node_a():
    """GPU 0 of node a (job train-7): a slow dataset read, a checkpoint write + fsync, an
    idle nothing explains, a CPU-contention stall; busy in between."""
    utils, s = _timeline([(100, 10), (0, 12), (100, 10), (0, 12), (100, 10), (0, 8), (100, 10),
                          (0, 10), (100, 10)])
    stalls = [io(s[1] + 20 * MS, 1_170 * MS, 101, path="/data/shard-17.bin", fs="nfs4"),
              io(s[3] + 30 * MS, 590 * MS, 100, path="/ckpt/step-1200.pt", op="write", fs="ext4"),
              io(s[3] + 625 * MS, 560 * MS, 100, path="/ckpt/step-1200.pt", op="fsync", fs="ext4")]
    runq = sched(s[7] - 5 * MS, 1_005 * MS, 100, op="runq", reason="", other_pid=4242,
                 other_comm="ffmpeg")
    return trainer_batch("a", utils, stalls, job="train-7", rank=0, sched=[runq])


def node_b():
    """GPU 0 of node b: an idle a metadata storm (openat) explains."""
    utils, s = _timeline([(100, 10), (0, 9), (100, 10)])
    return trainer_batch("b", utils, [io(s[1] + 10 * MS, 880 * MS, 101, path="/data/index",
                                         op="openat", fs="fuse")])


def split(b: Batch, n: int) -> list:
    """``b`` as ``n`` batches in time order, as a tracer would have sent it: rows by ts_ns,
    the lineage (proc) in each, cumulative counters growing."""
    ts = np.concatenate([np.asarray(t["ts_ns"], dtype=np.int64) for k, t in b.tables.items()
                         if "ts_ns" in t and table_len(t)])
    edges = np.linspace(ts.min(), ts.max() + 1, n + 1).astype(np.int64)
    out = []
    for i in range(n):
        tables = {}
        for k, t in b.tables.items():
            if "ts_ns" not in t:
                tables[k] = t
                continue
            m = (np.asarray(t["ts_ns"], dtype=np.int64) >= edges[i]) & \
                (np.asarray(t["ts_ns"], dtype=np.int64) < edges[i + 1])
            tables[k] = {c: np.asarray(v)[m] for c, v in t.items()}
        counters = {"vfs.lost_ringbuf": 3 * i, "vfs.lost_inflight_collision": i,
                    "vfs.emitted": 100 * i, "streamsink.dropped_batches": i // 2,
                    "streamsink.dropped_events": 5 * (i // 2), "tick_errors": i // 3}
        out.append(Batch(b.node, i, tables, counters, {}, b.meta))
    return out


def stream():
    """Both nodes' batches, interleaved as a collector receives them."""
    a, b = split(node_a(), 6), split(node_b(), 4)
    return [x for pair in zip(a, b) for x in pair] + a[len(b):]


def run_live(batches, observers):
    """Batches through LiveVerdicts (no rate limit) with ``observers``; returns the verdict
    JSON objects it printed."""
    out = _io.StringIO()
    live = LiveVerdicts(VerdictPrinter(as_json=True, out=out), observers=observers, min_gap_s=0)
    for b in batches:
        live([b])
    live.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def scrape(port: int) -> dict:
    """{family name: [(sample name, labels, value)]} from /metrics over HTTP."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def served(**kw):
    m = StallscopeMetrics(**kw)
    return m, m.serve(0, "127.0.0.1")


def expected_label_values(v: dict) -> tuple:
    """The labels a verdict JSON object should get, written from the JSON fields."""
    c = v["culprit"] or {}
    unexplained = v["verdict"] == "unexplained"
    return (v["node"], str(v["gpu"]), v["gpu_uuid"], v["job"], "", "", "", v["verdict"],
            "unexplained" if unexplained else v["class"],
            "" if unexplained else c.get("fs", ""), "" if unexplained else c.get("op", ""))


# --------------------------------------------------------------------------- tests

def test_idle_seconds_per_class_are_the_verdicts_durations():
    batches = stream()
    m, port = served(rejected=lambda: 2)
    try:
        printed = run_live(batches, [m])
        fams = scrape(port)
    finally:
        m.close()
    # each interval counted once: as many as the batch analysis of the same data finds
    whole = analyze(batches).verdicts
    assert len(printed) == len(whole) == 5
    assert {v["class"] for v in printed} == {"dataset_read", "checkpoint_write", "cpu", "metadata", None}

    lost_ns = {(w.node, w.idle_end_ns): w.lost_ns for w in whole}
    want = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for v in printed:
        acc = want[expected_label_values(v)]
        acc[0] += v["duration_ns"] / 1e9
        acc[1] += round(v["explained_fraction"] * lost_ns[(v["node"], v["idle_end_ns"])]) / 1e9
        acc[2] += 1
    for i, fam in enumerate(("stallscope_gpu_idle_seconds", "stallscope_gpu_idle_explained_seconds",
                             "stallscope_gpu_idle_intervals")):
        got = {tuple(lab[k] for k in VERDICT_LABELS): val for _n, lab, val in fams[fam]}
        assert set(got) == set(want), fam
        for key, vals in want.items():
            assert got[key] == pytest.approx(vals[i], abs=1e-9), (fam, key)
    idle = {tuple(lab[k] for k in VERDICT_LABELS): val for _n, lab, val in fams["stallscope_gpu_idle_seconds"]}
    read = ("a", "0", "GPU-a-0", "train-7", "", "", "", "culprit", "dataset_read", "nfs4", "read")
    assert idle[read] == pytest.approx(1.2)
    assert ("a", "0", "GPU-a-0", "train-7", "", "", "", "culprit", "checkpoint_write", "ext4", "write") in idle
    assert ("b", "0", "GPU-b-0", "", "", "", "", "culprit", "metadata", "fuse", "openat") in idle
    assert ("a", "0", "GPU-a-0", "train-7", "", "", "", "unexplained", "unexplained", "", "") in idle

    # received, lost (the latest cumulative counters of each node), rejected
    by_node = collections.Counter(b.node for b in batches)
    assert {lab["Hostname"]: val for _n, lab, val in fams["stallscope_batches_received"]} == by_node
    events = collections.Counter()
    for b in batches:
        for k in STALL_TABLES:
            if k in b.tables:
                events[(b.node, k)] += table_len(b.tables[k])
    assert {(lab["Hostname"], lab["type"]): val for _n, lab, val in fams["stallscope_events_received"]} == events
    assert sum(events.values()) == 5
    last = {b.node: b.counters for b in batches}
    lost = {(lab["Hostname"], lab["reason"]): val for _n, lab, val in fams["stallscope_events_lost"]}
    assert lost == {(n, k): c[k] for n, c in last.items()
                    for k in ("vfs.lost_ringbuf", "vfs.lost_inflight_collision", "streamsink.dropped_events")}
    assert lost[("a", "vfs.lost_ringbuf")] == 15 and lost[("b", "vfs.lost_ringbuf")] == 9
    assert {(lab["Hostname"], lab["reason"]): val for _n, lab, val in fams["stallscope_batches_lost"]} == \
        {("a", "streamsink"): 2, ("b", "streamsink"): 1}
    assert {lab["Hostname"]: val for _n, lab, val in fams["stallscope_tracer_tick_errors"]} == {"a": 1, "b": 1}
    assert fams["stallscope_batches_rejected"] == [("stallscope_batches_rejected_total", {}, 2.0)]
    assert all(val == 0 for _n, _l, val in fams["stallscope_exporter_errors"])


def test_no_label_has_unbounded_values():
    m, port = served()
    try:
        b = node_a()
        b.hist = {"vfs": {"read": [1] * HIST_SLOTS}}
        run_live([b], [m])
        fams = scrape(port)
    finally:
        m.close()
    names = {k for samples in fams.values() for _n, lab, _v in samples for k in lab}
    assert names, fams
    assert not names & {"pid", "tid", "comm", "path", "file", "job"}, names
    assert names <= set(VERDICT_LABELS) | {"family", "le", "type", "reason", "stage"}
    values = [v for samples in fams.values() for _n, lab, _v in samples for v in lab.values()]
    assert not [v for v in values if "/" in v or v in ("100", "101", "4242", "python", "ffmpeg")]


def test_pod_identity_becomes_the_dcgm_exporter_labels():
    (v,) = [v for v in analyze([node_b()]).verdicts]
    v.namespace, v.pod, v.container = "ml", "trainer-7f9c-0", "pytorch"   # as attribution fills them
    m, port = served()
    try:
        m.observe_verdicts([v])
        fams = scrape(port)
    finally:
        m.close()
    ((_n, lab, val),) = fams["stallscope_gpu_idle_seconds"]
    assert (lab["namespace"], lab["pod"], lab["container"], lab["Hostname"], lab["UUID"]) == \
        ("ml", "trainer-7f9c-0", "pytorch", "b", "GPU-b-0")
    assert val == pytest.approx(v.duration_ns / 1e9)


def kernel_slot(dur_ns: int) -> int:
    """bpf/common.bpf.h ss_hist_add: slot = log2((dur_ns >> 10) + 1), clamped."""
    return min(((dur_ns >> 10) + 1).bit_length() - 1, HIST_SLOTS - 1)


def test_latency_histogram_buckets_are_the_kernel_slots():
    rng = random.Random(7)
    # log-uniform 0.5 us .. 20 s, plus every bucket edge and the ns on either side of it
    durs = [int(10 ** rng.uniform(2.7, 10.3)) for _ in range(3000)]
    for k in range(HIST_SLOTS - 1):
        edge = ((1 << (k + 1)) - 1) * 1024
        durs += [edge - 1, edge, edge + 1]
    first, second = durs[:1000], durs

    def hist(ds):
        counts = [0] * HIST_SLOTS
        for d in ds:
            counts[kernel_slot(d)] += 1
        return {"vfs": {"read": counts}, "sched": {"runq": counts[::-1]}}
    b1 = Batch("a", 0, {}, {}, hist(first), {})
    b2 = Batch("a", 8, {}, {}, hist(second), {})       # cumulative: supersedes b1
    m, port = served()
    try:
        m.observe_batches([b1, b2])
        fams = scrape(port)
    finally:
        m.close()
    samples = [(n, lab, v) for n, lab, v in fams["stallscope_op_latency_seconds"]
               if lab["family"] == "vfs" and lab["op"] == "read" and lab["Hostname"] == "a"]
    buckets = [(lab["le"], v) for n, lab, v in samples if n.endswith("_bucket")]
    assert len(buckets) == HIST_SLOTS and buckets[-1] == ("+Inf", len(second))
    for k, (le, v) in enumerate(buckets[:-1]):
        le_ns = round(float(le) * 1e9)
        assert le_ns == ((1 << (k + 1)) - 1) * 1024 and float(le) == SLOT_HIGH_S[k]
        assert v == sum(d < le_ns for d in second), le         # the bucket holds d < le
    count = next(v for n, _l, v in samples if n.endswith("_count"))
    est = next(v for n, _l, v in samples if n.endswith("_sum"))
    assert count == len(second)
    true_sum = sum(second) / 1e9
    assert abs(est - true_sum) < 0.1 * true_sum, (est, true_sum)
    runq = [v for n, lab, v in fams["stallscope_op_latency_seconds"]
            if lab["family"] == "sched" and n.endswith("_count")]
    assert runq == [len(second)]


# --------------------------------------------------------------------------- the dashboard

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                 "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set:
    """The metric names an expression selects: identifiers that are not functions,
    aggregation clauses, keywords, label matchers, ranges or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)             # strings
    e = re.sub(r"\{[^}]*\}", "{}", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "[]", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                        # $__rate_interval, ${node}
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard_queries(d: dict) -> list:
    exprs = []
    for p in d["panels"]:
        exprs += [t["expr"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))
    return exprs


def test_promql_metric_names_extractor():
    assert promql_metric_names('topk(5, sum by (Hostname, class) (increase(a_total{x="y(z)"}[$__range])))') == {"a_total"}
    assert promql_metric_names("1 - sum(rate(b[5m])) / sum by (le) (c_bucket{le=~\"$x\"})") == {"b", "c_bucket"}


def test_dashboard_queries_only_use_metrics_the_exporter_exposes():
    with open(DASHBOARD) as f:
        d = json.load(f)
    # importable: the datasource is a variable every panel and query uses
    assert any(v["type"] == "datasource" and v["name"] == "DS_PROMETHEUS" for v in d["templating"]["list"])
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    assert any(p["type"] == "heatmap" for p in d["panels"])

    m, port = served(rejected=lambda: 1)
    try:
        b = node_a()
        b.hist = {"vfs": {"read": [1] * HIST_SLOTS}}
        b.counters = {"vfs.lost_ringbuf": 1, "streamsink.dropped_batches": 1, "tick_errors": 0}
        run_live([b], [m])
        fams = scrape(port)
    finally:
        m.close()
    exposed = {n for samples in fams.values() for n, _l, _v in samples}
    used = set()
    for e in dashboard_queries(d):
        names = promql_metric_names(e)
        assert names, e
        assert names <= exposed, (e, names - exposed)
        used |= names
    for want in ("stallscope_gpu_idle_seconds_total", "stallscope_op_latency_seconds_bucket",
                 "stallscope_events_lost_total", "stallscope_gpu_idle_explained_seconds_total"):
        assert want in used


# --------------------------------------------------------------------------- the CLI

def test_collect_serves_metrics_of_what_it_received(tmp_path):
    """`stallscope collect --metrics-port` over real ZeroMQ: the scrape counts the batches
    it accepted, the malformed one it rejected, and the verdicts it printed."""
    bind, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stallscope", "collect", "--json", "--bind", f"tcp://127.0.0.1:{bind}",
         "--store", str(tmp_path / "s.db"), "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1",
         "--duration", "20"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        head = _wait_for_line(proc, b"listening on", 20)
        batches = stream()
        sink = transport.StreamSink(f"tcp://127.0.0.1:{bind}", str(tmp_path / "spool"))
        for b in batches:
            sink(b)
        _send_malformed(f"tcp://127.0.0.1:{bind}")
        expected = {(v.node, v.idle_end_ns) for v in analyze(batches).verdicts if not v.open}
        deadline = time.monotonic() + 15
        beats = 0
        while True:
            fams = scrape(mport)
            n = sum(v for _n, _l, v in fams["stallscope_gpu_idle_intervals"])
            rec = sum(v for _n, _l, v in fams["stallscope_batches_received"])
            if (n >= len(expected) and rec == len(batches) + beats
                    and fams["stallscope_batches_rejected"][0][2] == 1) or time.monotonic() > deadline:
                break
            # heartbeats, as an idle tracer sends them: the live analysis runs when batches come
            sink(Batch("b", 100 + beats, {}, batches[-1].counters, {}, batches[1].meta))
            beats += 1
            time.sleep(0.3)
        assert sink.flush(15), sink.summary()
        sink.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert rec == len(batches) + beats and fams["stallscope_batches_rejected"][0][2] == 1, fams
    printed = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
    # what was scraped before the end is exactly what had been printed by then
    seen = {(lab["Hostname"], lab["class"]): v for _n, lab, v in fams["stallscope_gpu_idle_seconds"]}
    assert n == len(expected) == 5
    by = collections.defaultdict(float)
    for v in printed:
        if (v["node"], v["idle_end_ns"]) in expected:
            by[(v["node"], v["class"] or "unexplained")] += v["duration_ns"] / 1e9
    assert seen == pytest.approx(dict(by))
    assert f"Prometheus metrics on http://127.0.0.1:{mport}/metrics".encode() in head


def _send_malformed(endpoint: str):
    """One frame that is not a batch, in the transport's framing (wire/transport.py)."""
    import zmq
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    sock.send_multipart([transport.BATCH_TAG, (1).to_bytes(8, "big"), b"\x92\x01\x02"])
    sock.poll(5000)                 # the collector answers (rejected) once it has stored the reason
    sock.close()


def _wait_for_line(proc, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {needle!r} (rc={proc.poll()}): {buf.decode(errors='replace')}")
        r, _, _ = select.select([proc.stderr], [], [], left)
        if r:
            buf += os.read(proc.stderr.fileno(), 65536)
    return buf


def test_metrics_port_in_use_is_a_one_line_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        r = CliRunner().invoke(collect, ["--bind", f"tcp://127.0.0.1:{free_port()}", "--store",
                                         str(tmp_path / "s.db"), "--metrics-addr", "127.0.0.1",
                                         "--metrics-port", str(s.getsockname()[1]), "--duration", "1"])
    finally:
        s.close()
    assert r.exit_code == 1
    assert re.fullmatch(r"Error: --metrics-port: cannot listen on 127\.0\.0\.1:\d+: .+\n", r.output), r.output


def test_lake_counters_are_exposed_only_with_a_lake():
    """A collector writing a lake exposes its failed writes and pending batches, read from the
    writer at scrape time; without a lake neither metric exists (no zero that would read as
    "lake healthy")."""
    state = {"lake.errors": 0, "lake.pending_batches": 5}
    m, port = served(lake=lambda: dict(state))
    try:
        got = scrape(port)
        assert got["stallscope_lake_errors"] == [("stallscope_lake_errors_total", {}, 0.0)]
        assert got["stallscope_lake_pending_batches"] == [("stallscope_lake_pending_batches", {}, 5.0)]
        state.update({"lake.errors": 3, "lake.pending_batches": 0})
        got = scrape(port)
        assert got["stallscope_lake_errors"][0][2] == 3.0
        assert got["stallscope_lake_pending_batches"][0][2] == 0.0
    finally:
        m.close()
    m, port = served()
    try:
        got = scrape(port)
        assert "stallscope_lake_errors" not in got and "stallscope_lake_pending_batches" not in got
    finally:
        m.close()
