"""HTTP requests -> retry episodes -> verdict classes, text and per-endpoint report (no BPF)."""

import numpy as np

from stallscope.analysis.analyze import analyze
from stallscope.analysis.http_episodes import endpoint_summary, episodes, full_reason, http_class
from stallscope.analysis.text import describe, format_text, verdict_line
from stallscope.wire.schema import TABLES, Batch

S = 1_000_000_000
T0 = 1_700_000_000 * S


def http_table(rows):
    """rows: (ts_s, dur_s, pid, tid, op, host, path, status, reason)"""
    cols = {c: [] for c in TABLES["http"]}
    for ts, dur, pid, tid, op, host, path, status, reason in rows:
        vals = {"ts_ns": T0 + int(ts * S), "dur_ns": int(dur * S), "pid": pid, "tid": tid, "comm": f"p{pid}",
                "op": op, "host": host, "path": path, "status": status, "reason": reason,
                "statuses": str(status), "count": 1, "blocked_ns": int(dur * S), "backoff_ns": 0,
                "tls": 0, "conn": 3, "cgroup": 1}
        for c in cols:
            cols[c].append(vals[c])
    return {c: np.array(v, dtype=object if TABLES["http"][c] == "s" else
                        (np.int64 if TABLES["http"][c] == "i" else np.uint64)) for c, v in cols.items()}


def test_retries_join_into_one_episode_per_thread_and_target():
    t = http_table([
        (0.0, 0.01, 10, 10, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),
        (1.0, 0.01, 10, 10, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),
        (1.5, 0.01, 20, 20, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),   # another process
        (3.0, 1.1, 10, 10, "PUT", "s3.local", "/ckpt/step-900", 200, "OK"),
        (5.0, 0.5, 10, 10, "PUT", "s3.local", "/ckpt/step-900", 200, "OK"),          # after a success: new
        (6.0, 0.01, 10, 11, "GET", "api.local", "/v1/models", 404, "Not Found"),
    ])
    ep = episodes(t)
    assert len(ep["ts_ns"]) == 4
    first = 0
    assert ep["pid"][first] == 10 and ep["statuses"][first] == "503,503,200"
    assert ep["count"][first] == 3
    assert ep["dur_ns"][first] == 4_100_000_000 == ep["blocked_ns"][first]
    assert ep["backoff_ns"][first] == 990_000_000 + 1_990_000_000
    assert ep["status"][first] == 200 and ep["reason"][first] == "Slow Down"   # what throttled it
    assert list(ep["statuses"][1:]) == ["503", "200", "404"]


def test_gap_longer_than_a_backoff_starts_a_new_episode():
    t = http_table([(0, 0.01, 1, 1, "GET", "h", "/a", 429, "x"), (120, 0.01, 1, 1, "GET", "h", "/a", 200, "OK")])
    assert len(episodes(t)["ts_ns"]) == 2


def test_classes():
    assert http_class({"statuses": "503,503,200"}) == "api_throttling"
    assert http_class({"statuses": "429"}) == "api_throttling"
    assert http_class({"statuses": "500,500"}) == "api_error"
    assert http_class({"statuses": "0"}) == "api_timeout"
    assert http_class({"statuses": "0,0,200"}) == "api_timeout"     # timed out twice, then answered
    assert http_class({"statuses": "0,500,200"}) == "api_error"      # the last failure decides
    assert http_class({"statuses": "500,0"}) == "api_timeout"
    assert http_class({"statuses": "200"}) == "api_slow"
    assert full_reason(429, "Too Many Reques") == "Too Many Requests"
    assert full_reason(503, "Slow Down") == "Slow Down"


def _batches(http_rows):
    gpu_ts = [T0 + i * S // 10 for i in range(0, 80)]
    util = [100 if (i < 10 or i >= 55) else 0 for i in range(80)]   # idle 1.0 s .. 5.5 s
    tables = {"gpu": {"ts_ns": np.array(gpu_ts, dtype=np.uint64), "gpu": np.zeros(80, dtype=np.uint64),
                      "util": np.array(util, dtype=np.uint64), "synth": np.zeros(80, dtype=np.uint64)},
              "gpu_proc": {"ts_ns": np.array(gpu_ts, dtype=np.uint64), "gpu": np.zeros(80, dtype=np.uint64),
                           "pid": np.full(80, 812, dtype=np.uint64)},
              "proc": {"pid": np.array([812, 900], dtype=np.uint64), "ppid": np.array([1, 1], dtype=np.uint64),
                       "comm": np.array(["trainer", "other"], dtype=object),
                       "start_ns": np.zeros(2, dtype=np.uint64), "job": np.array(["", ""], dtype=object),
                       "rank": np.array([-1, -1], dtype=np.int64), "pod_uid": np.array(["", ""], dtype=object),
                       "container_id": np.array(["", ""], dtype=object)},
              "http": http_table(http_rows)}
    tables["http"]["comm"] = np.array(["trainer" if p == 812 else "other" for p in tables["http"]["pid"]],
                                      dtype=object)
    return [Batch("n1", 0, tables, {}, {}, {"gpu": {"sample_period_ns": {"0": S // 10}}})]


ROWS = [(1.0, 0.4, 812, 812, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),
        (2.0, 0.4, 812, 812, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),
        (3.5, 0.4, 812, 812, "PUT", "s3.local", "/ckpt/step-900", 503, "Slow Down"),
        (4.6, 0.9, 812, 812, "PUT", "s3.local", "/ckpt/step-900", 200, "OK"),
        (1.2, 0.1, 900, 900, "PUT", "s3.local", "/other", 503, "Slow Down"),     # not on the GPU
        (2.2, 3.0, 900, 900, "PUT", "s3.local", "/other", 200, "OK")]


def test_throttled_upload_is_the_culprit_and_the_bystander_is_not():
    res = analyze(_batches(ROWS))
    [v] = res.verdicts
    assert v.verdict == "culprit" and v.klass == "api_throttling" and v.chain.pid == 812
    assert v.chain.answers == {503: 3, 200: 1} and v.chain.count == 4
    assert v.chain.targets[0].server == "s3.local"
    line = verdict_line(v)
    assert ("checkpoint upload PUT s3.local/ckpt/step-900 throttled, 503 Slow Down x3, 4.5 s "
            "(pid 812 trainer)") in line, line
    j = v.to_json()
    assert j["class"] == "api_throttling" and j["chain"]["answers"] == {"503": 3, "200": 1}
    ends = {e["host"]: e for e in endpoint_summary(res)}
    e = ends["s3.local"]
    assert e["requests"] == 6 and e["episodes"] == 2 and e["throttled_answers"] == 4
    assert e["throttled_ns"] == 4_500_000_000 + 4_000_000_000
    assert e["blamed_pids"] == [812] and e["intervals"] == 1 and e["gpu_idle_ns"] == v.explained_ns > 0
    text = format_text(res)
    assert "API endpoints" in text and "s3.local: 6 requests in 2 calls, throttled 8.5 s" in text, text


def test_timeout_and_describe():
    e = {"type": "http", "op": "POST", "host": "api.local", "path": "/v1/chat/completions", "status": 0,
         "statuses": "0,0", "reason": "", "dur_ns": 2 * S, "blocked_ns": 2 * S, "pid": 5, "comm": "agent"}
    assert describe(e) == "LLM API call POST api.local/v1/chat/completions timed out, no answer x2, 2.0 s (pid 5 agent)"
