"""HTTP requests -> retry episodes, their failure class, and the per-endpoint summary.

The tracer ships one ``http`` row per request (wire/schema.py). A client that is throttled
retries: the same thread sends the same method to the same host and path again after a
backoff. Those attempts are one wait for the caller (its call into boto3 or the OpenAI SDK
blocks through all of them), so :func:`episodes` joins them into one row in the same
columns: ``ts_ns`` = the first head written, ``dur_ns`` = ``blocked_ns`` = up to the final
status, ``count`` = attempts, ``statuses`` = their codes in order ("503,503,200"),
``backoff_ns`` = the gaps between attempts, ``status``/``reason`` = the final answer (the
reason of the first error when the episode ended well: what throttled it).

An attempt joins the previous one when it follows an error answer (status >= 400, or none:
a timeout) within ``max_gap_ns`` (backoffs of retry libraries stay well below a minute).
"""

from __future__ import annotations

import collections

import numpy as np

#: failure classes of an episode (analysis/verdict.py CLASSES)
THROTTLING, ERROR, TIMEOUT, SLOW = "api_throttling", "api_error", "api_timeout", "api_slow"
THROTTLE_STATUSES = (429, 503)
MAX_GAP_NS = 60_000_000_000

#: standard reason phrases, for a reason the kernel cut at 15 bytes
REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


def full_reason(status: int, reason: str) -> str:
    """The reason phrase, completed when the kernel's 15 bytes are a prefix of the standard one."""
    std = REASONS.get(int(status), "")
    if reason and len(reason) >= 15 and std.startswith(reason):
        return std
    return reason or std


def statuses_of(e: dict) -> list:
    return [int(x) for x in str(e.get("statuses") or e.get("status", 0)).split(",") if x.strip().isdigit()]


def http_class(e: dict) -> str:
    """Failure class of one request or episode (an event dict): throttling when any attempt
    was answered 429 or 503; otherwise the kind of its last failed attempt: timeout when it
    got no answer (the client gave up, or the server closed), error when answered >= 400;
    a slow call when no attempt failed. (Two timeouts and then a success is a timeout
    episode: the GPU waited on the timeouts.)"""
    sts = statuses_of(e)
    if any(s in THROTTLE_STATUSES for s in sts):
        return THROTTLING
    failed = [s for s in sts if s >= 400 or s == 0]
    if not failed:
        return SLOW
    return TIMEOUT if failed[-1] == 0 else ERROR


def episodes(t: dict, max_gap_ns: int = MAX_GAP_NS) -> dict:
    """Join retries in an ``http`` table (all its columns, one length) into episodes."""
    n = len(t["ts_ns"])
    if n < 2:
        return t
    ts = np.asarray(t["ts_ns"], dtype=np.int64)
    end = ts + np.asarray(t["dur_ns"], dtype=np.int64)
    pid = np.asarray(t["pid"], dtype=np.int64)
    tid = np.asarray(t["tid"], dtype=np.int64)
    status = np.asarray(t["status"], dtype=np.int64)
    op, host, path = (np.asarray(t[c], dtype=object) for c in ("op", "host", "path"))
    # one key per (pid, tid, op, host, path), then by time
    _u, key = np.unique(np.array([f"{a}\0{b}\0{c}" for a, b, c in zip(op, host, path)], dtype=object),
                        return_inverse=True)
    o = np.lexsort((ts, key, tid, pid))
    same = np.zeros(n, dtype=bool)
    same[1:] = (pid[o][1:] == pid[o][:-1]) & (tid[o][1:] == tid[o][:-1]) & (key[o][1:] == key[o][:-1])
    prev_err = np.zeros(n, dtype=bool)
    prev_err[1:] = (status[o][:-1] >= 400) | (status[o][:-1] == 0)
    gap = np.zeros(n, dtype=np.int64)
    gap[1:] = ts[o][1:] - end[o][:-1]
    join = same & prev_err & (gap <= max_gap_ns)
    if not join.any():
        return t
    first = np.flatnonzero(~join)                  # positions (in o) where episodes begin
    last = np.r_[first[1:], n] - 1
    rows = o[first]
    out = {c: np.asarray(v)[rows] for c, v in t.items()}
    out["ts_ns"] = ts[rows].astype(np.uint64)
    ep_end = np.maximum.reduceat(end[o], first)
    out["dur_ns"] = (ep_end - ts[rows]).astype(np.uint64)
    out["blocked_ns"] = out["dur_ns"].copy()
    out["count"] = np.add.reduceat(np.asarray(t["count"], dtype=np.uint64)[o], first)
    out["backoff_ns"] = np.add.reduceat(np.where(join, np.maximum(gap, 0), 0), first).astype(np.uint64)
    out["status"] = status[o[last]].astype(np.uint64)
    out["tid"] = np.asarray(t["tid"])[rows]
    sts = np.empty(len(first), dtype=object)
    reason = np.empty(len(first), dtype=object)
    reasons = np.asarray(t["reason"], dtype=object)
    allst = np.asarray(t["statuses"], dtype=object)
    for g, (a, b) in enumerate(zip(first, last + 1)):
        idx = o[a:b]
        sts[g] = ",".join(str(x) for x in allst[idx])
        errs = [i for i in idx if status[i] >= 400]
        reason[g] = reasons[errs[0]] if errs and status[idx[-1]] < 400 else reasons[idx[-1]]
    out["statuses"] = sts
    out["reason"] = reason
    order = np.argsort(out["ts_ns"], kind="stable")
    return {c: v[order] for c, v in out.items()}


def endpoint_summary(result) -> list:
    """Per API endpoint (host): requests, episodes, throttled/error/timeout seconds (the
    episodes' durations, every traced process), and the idle GPU time verdicts blame on it.
    ``result`` is an :class:`~stallscope.analysis.analyze.Result` from ``analyze()``.
    Most GPU idle time first."""
    agg = collections.OrderedDict()

    def entry(host):
        if host not in agg:
            agg[host] = {"host": host, "requests": 0, "episodes": 0, "throttled_ns": 0, "error_ns": 0,
                         "timeout_ns": 0, "throttled_answers": 0, "gpu_idle_ns": 0, "intervals": 0,
                         "pids": set(), "blamed_pids": set(), "paths": collections.Counter()}
        return agg[host]

    for node in (result.nodes or {}).values():
        t = node["tables"].get("http")
        if t is None or not len(t["ts_ns"]):
            continue
        ep = episodes(t)
        for i in range(len(ep["ts_ns"])):
            e = {c: ep[c][i] for c in ("statuses", "status", "dur_ns", "count", "pid", "op", "path")}
            g = entry(str(ep["host"][i]) or "?")
            g["requests"] += int(e["count"])
            g["episodes"] += 1
            g["pids"].add(int(e["pid"]))
            klass = http_class(e)
            sts = statuses_of(e)
            g["throttled_answers"] += sum(s in THROTTLE_STATUSES for s in sts)
            dur = int(e["dur_ns"])
            if klass == THROTTLING:
                g["throttled_ns"] += dur
            elif klass == ERROR:
                g["error_ns"] += dur
            elif klass == TIMEOUT:
                g["timeout_ns"] += dur
            if klass != SLOW:
                g["paths"][f"{e['op']} {e['path']}"] += 1
    for v in result.verdicts:
        ch = v.chain
        if ch is None or ch.kind != "http" or not ch.targets:
            continue
        g = entry(ch.targets[0].server or "?")
        g["gpu_idle_ns"] += v.explained_ns
        g["intervals"] += 1
        g["blamed_pids"].add(ch.pid)
    out = []
    for g in agg.values():
        g["pids"] = sorted(g["pids"])
        g["blamed_pids"] = sorted(g["blamed_pids"])
        g["paths"] = [p for p, _n in g["paths"].most_common(5)]
        out.append(g)
    out.sort(key=lambda g: (-g["gpu_idle_ns"], -g["throttled_ns"], g["host"]))
    return out
