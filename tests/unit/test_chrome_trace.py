"""`report --trace`: the Chrome trace (Trace Event Format, JSON Object Format) of a report.

Two nodes of one job: node-a's write+fsync chain starves its GPU (a local culprit) and, as a
remote culprit, node-b's; a scheduler row partly overlapping the write forces a second lane;
a hole in node-a's samples reads as a missing stretch; a process that is not an owner must not
appear.  The file is parsed with exact decimals, so timestamps are checked to the ns.
"""

from __future__ import annotations

import json
from decimal import Decimal

from click.testing import CliRunner

from stallscope.analysis.analyze import analyze
from stallscope.commands.report import report
from stallscope.export import chrome_trace as ct
from stallscope.wire.recording import RecordingWriter
from tests.unit.test_analysis_chains import S0, idle_for, sched
from tests.unit.test_blame import MS, P, io, proc, trainer_batch


def _batches():
    w = io(S0 + 30 * MS, 590 * MS, 100, path="/ckpt/s.pt", op="write")
    f = io(S0 + 625 * MS, 600 * MS, 100, path="/ckpt/s.pt", op="fsync")
    runq = sched(S0 + 500 * MS, 300 * MS, 100, op="runq", other_pid=7, other_comm="ffmpeg")
    stranger = io(S0 + 40 * MS, 900 * MS, 999, path="/other/x", op="read")
    utils = idle_for(1_200)
    a = trainer_batch("node-a", utils, [w, f, stranger], job="j", rank=0,
                      extra_procs=[proc(999, 1, "backup")], sched=[runq])
    keep = [i for i in range(len(utils)) if i != 3]    # one sample missing: a 200 ms spacing
    a.tables["gpu"] = {c: v[keep] for c, v in a.tables["gpu"].items()}
    b = trainer_batch("node-b", idle_for(1_200), [io(S0 - 900 * MS, 20 * MS, 100, tid=105)],
                      job="j", rank=1)
    return [a, b]


def _load(path):
    with open(path) as fp:
        return json.load(fp, parse_float=Decimal)


def _ns(us) -> int:
    """A trace timestamp (exact decimal microseconds) as int ns."""
    v = Decimal(us) * 1000
    assert v == v.to_integral_value(), us
    return int(v)


def test_trace_structure_flows_counters_and_clock(tmp_path):
    bs = _batches()
    res = analyze(bs)
    va, vb = res.verdicts
    assert (va.verdict, vb.verdict) == ("culprit", "remote")
    out = tmp_path / "t.json"
    counts = ct.export(res, str(out))
    doc = _load(out)
    assert doc["displayTimeUnit"] in ("ms", "ns") and isinstance(doc["traceEvents"], list)
    ev = doc["traceEvents"]
    assert counts["events"] == len(ev) and counts["flows"] == 2

    # every complete slice is placed; slices of one track never overlap
    xs = [e for e in ev if e["ph"] == "X"]
    for e in xs:
        assert {"ts", "dur", "pid", "tid", "name"} <= set(e), e
    by_track = {}
    for e in xs:
        by_track.setdefault((e["pid"], e["tid"]), []).append((_ns(e["ts"]), _ns(e["ts"]) + _ns(e["dur"])))
    for spans in by_track.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans

    # tracks: GPU processes named "node gpuN (UUID)" on synthetic pids, owner threads real
    names = {(e["pid"], e["name"]): e["args"]["name"] for e in ev if e["ph"] == "M"
             and e["name"] == "process_name"}
    gpu_pid = {v: p for (p, _n), v in names.items() if " gpu" in v}
    assert set(gpu_pid) == {"node-a gpu0 (GPU-node-a-0)", "node-b gpu0 (GPU-node-b-0)"}
    assert all(p >= ct.GPU_PID_BASE for p in gpu_pid.values())
    stalls = [e for e in xs if e["cat"] != "idle"]
    assert all(e["pid"] < ct.GPU_PID_BASE for e in stalls)
    assert not [e for e in stalls if e["args"]["pid"] == 999], "a non-owner's stall was drawn"
    a_stalls = {e["name"]: e for e in stalls if e["args"]["node"] == "node-a"}
    assert set(a_stalls) == {"write", "fsync", "runq"}
    assert a_stalls["write"]["pid"] == 100 and a_stalls["write"]["tid"] == 100   # node 0: real ids
    assert a_stalls["runq"]["tid"] >= ct.LANE_TID_BASE                           # overlap lane
    (b_stall,) = [e for e in stalls if e["args"]["node"] == "node-b"]
    assert (b_stall["pid"], b_stall["tid"]) == (100 + ct.PID_LIMIT, 105 + ct.PID_LIMIT)
    assert (b_stall["args"]["pid"], b_stall["args"]["tid"]) == (100, 105)
    assert a_stalls["write"]["args"]["path"] == "/ckpt/s.pt"
    assert a_stalls["write"]["args"]["bytes"] == 1 << 20
    assert a_stalls["write"]["args"]["latency_ms"] == Decimal("590.0")
    tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["ph"] == "M"
              and e["name"] == "thread_name"}
    assert tnames[(100, 100)] == "python (tid 100)"

    # wall-clock ns, exactly: slices and the stalls' own stamps
    for st in bs[0].tables["io"]["ts_ns"][:2]:
        assert int(st) in {_ns(e["ts"]) for e in stalls}
    idle = {e["pid"]: e for e in xs if e["cat"] == "idle"}
    for v in (va, vb):
        e = idle[gpu_pid[f"{v.node} gpu0 (GPU-{v.node}-0)"]]
        assert (_ns(e["ts"]), _ns(e["dur"])) == (v.idle_start_ns, v.duration_ns)
        assert e["args"]["verdict"] == v.verdict
    assert idle[gpu_pid["node-a gpu0 (GPU-node-a-0)"]]["name"] == "checkpoint_write"
    assert idle[gpu_pid["node-b gpu0 (GPU-node-b-0)"]]["name"] == "remote checkpoint_write"

    # counters: one per NVML sample, its value, from the start of the window it covers;
    # the hole adds one 0 at its start
    g = bs[0].tables["gpu"]
    cs = [e for e in ev if e["ph"] == "C" and e["pid"] == gpu_pid["node-a gpu0 (GPU-node-a-0)"]]
    samples = [e for e in cs if e.get("cat") != "missing"]
    assert [e["args"]["util"] for e in samples] == [int(u) for u in g["util"]]
    assert [_ns(e["ts"]) for e in samples] == [int(t) - P for t in g["ts_ns"]]
    (hole,) = [e for e in cs if e.get("cat") == "missing"]
    assert (_ns(hole["ts"]), hole["args"]["util"]) == (int(g["ts_ns"][2]), 0)

    # flows: one s and one f per id, same cat; s inside the culprit stall, f (bp "e") inside
    # the idle slice of the interval that stall explains
    flows = {}
    for e in ev:
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], []).append(e)
    assert len(flows) == 2
    explained = set()
    for pair in flows.values():
        (s,) = [e for e in pair if e["ph"] == "s"]
        (f,) = [e for e in pair if e["ph"] == "f"]
        assert s["cat"] == f["cat"] and f["bp"] == "e"

        def enclosing(e):
            t = _ns(e["ts"])
            hits = [x for x in xs if (x["pid"], x["tid"]) == (e["pid"], e["tid"])
                    and _ns(x["ts"]) < t < _ns(x["ts"]) + _ns(x["dur"])]
            assert len(hits) == 1, (e, hits)
            return hits[0]

        stall, iv = enclosing(s), enclosing(f)
        v = va if iv["pid"] == gpu_pid["node-a gpu0 (GPU-node-a-0)"] else vb
        assert iv["args"]["idle_start_ns"] == v.idle_start_ns
        assert (stall["args"]["ts_ns"], stall["args"]["pid"]) == (v.culprit["ts_ns"], v.culprit["pid"])
        explained.add(v.node)
    assert explained == {"node-a", "node-b"}


def test_base_ns_shifts_every_timestamp(tmp_path):
    res = analyze(_batches())
    base = res.verdicts[0].idle_start_ns - 123_456_789
    ct.export(res, str(tmp_path / "epoch.json"))
    ct.export(res, str(tmp_path / "rel.json"), base_ns=base)
    a, b = _load(tmp_path / "epoch.json"), _load(tmp_path / "rel.json")
    assert b["baseTimeNanoseconds"] == base and "baseTimeNanoseconds" not in a
    for x, y in zip(a["traceEvents"], b["traceEvents"]):
        if "ts" in x:
            assert _ns(x["ts"]) - base == _ns(y["ts"])


def test_us_text_is_exact():
    assert ct.us_text(1_700_000_000_123_456_789) == "1700000000123456.789"
    assert ct.us_text(5) == "0.005" and ct.us_text(-1_500) == "-1.500"


def test_lanes_keep_each_lane_free_of_overlaps():
    assert ct.lanes([0, 10, 20, 35], [30, 25, 40, 50]) == [0, 1, 2, 0]
    assert ct.lanes([0, 5], [5, 9]) == [0, 0]


def test_report_cli_writes_trace_and_html_and_keeps_stdout_data(tmp_path):
    rec = str(tmp_path / "r.ssrec")
    w = RecordingWriter(rec)
    for b in _batches():
        w(b)
    w.close()
    trace, page = tmp_path / "t.json", tmp_path / "r.html"
    r = CliRunner().invoke(report, ["--json", rec, "--trace", str(trace), "--html", str(page)])
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["verdict"] for x in r.stdout.splitlines()] == ["culprit", "remote"]
    assert "wrote trace" in r.stderr and "wrote HTML report" in r.stderr
    assert len([e for e in _load(trace)["traceEvents"] if e["ph"] == "f"]) == 2
    assert page.read_text().count('class="vrow"') == 2
    r = CliRunner().invoke(report, [rec, "--trace", str(tmp_path / "no" / "such" / "t.json")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: cannot write the trace")
