"""Text for people: one renderer for stall events, chains, verdict lines, the report table and
its repeated-culprit groups."""

from __future__ import annotations

import datetime
import time

from .analyze import VERDICTS, Result
from .crossnode import signal_name
from .http_episodes import SLOW, THROTTLING, TIMEOUT, endpoint_summary, full_reason, http_class, statuses_of
from .verdict import LIFECYCLE, UNEXPLAINED_CLASSES, Chain, Verdict, group_verdicts


def _clock(ns: int) -> str:
    t = time.localtime(ns // 1_000_000_000)
    return time.strftime("%H:%M:%S", t) + f".{ns // 1_000_000 % 1000:03d}"


def _http_label(op: str, path: str) -> str:
    """What a request is for, from its method and path: ``checkpoint upload``, ``LLM API
    call``, ``upload``, ``download``, ``API call``."""
    p = (path or "").lower()
    ckpt = "ckpt" in p or "checkpoint" in p
    if op in ("PUT", "POST") and ckpt:
        return "checkpoint upload"
    if op == "GET" and ckpt:
        return "checkpoint download"
    if any(w in p for w in ("/completions", "/embeddings", "/responses", "/messages", "/generate")):
        return "LLM API call"
    return {"PUT": "upload", "GET": "download"}.get(op, "API call")


_HTTP_OUTCOME = {THROTTLING: "throttled", TIMEOUT: "timed out", SLOW: "slow"}


def _http_answers(klass: str, answers: dict, reasons: dict) -> str:
    """``503 Slow Down x3`` (the most frequent error answer), ``no answer x2``, or the status."""
    errs = {c: n for c, n in answers.items() if c >= 400 or c == 0}
    if klass == SLOW or not errs:
        final = max(answers) if answers else 0
        return f"{final} {reasons.get(final, full_reason(final, ''))}".strip()
    code = 0 if klass == TIMEOUT and 0 in errs else max(errs, key=lambda c: (errs[c], c))
    if code == 0:
        return f"no answer x{errs[code]}"
    return f"{code} {reasons.get(code) or full_reason(code, '')} x{errs[code]}".replace("  ", " ")


def describe_http(op: str, host: str, path: str, klass: str, answers: dict, reasons: dict,
                  blocked_ns: int, pid: int, comm: str) -> str:
    """``checkpoint upload PUT s3.local/ckpt/step-900 throttled, 503 SlowDown x3, 4.1 s (pid
    812 trainer)``."""
    outcome = _HTTP_OUTCOME.get(klass, "failed")
    return (f"{_http_label(op, path)} {op} {host}{path} {outcome}, "
            f"{_http_answers(klass, answers, reasons)}, {_dur(blocked_ns)} (pid {pid} {comm})")


def _http_event(e: dict) -> str:
    sts = statuses_of(e)
    answers = {}
    for c in sts:
        answers[c] = answers.get(c, 0) + 1
    code = next((c for c in sts if c >= 400), sts[-1] if sts else 0)
    return describe_http(e.get("op", ""), e.get("host", ""), e.get("path", ""), http_class(e), answers,
                         {code: full_reason(code, e.get("reason", ""))},
                         int(e.get("blocked_ns") or e.get("dur_ns", 0)), e.get("pid", 0), e.get("comm", ""))


def describe(e: dict) -> str:
    """One line for an event: what, where, who, how long (``read /data/x (nfs) pid 7 python
    812.3ms``)."""
    kind = e.get("type", "")
    op = e.get("op", "") or kind
    if kind == "http":
        return _http_event(e)
    if kind == "exit":
        return f"exited ({signal_name(int(e.get('exit_status', -1)))}) pid {e.get('pid', 0)} {e.get('comm', '')}".rstrip()
    if kind in ("io", "nfs"):
        n = int(e.get("count", 1) or 1)
        nf = 1 + int(e.get("more_files", 0) or 0) if kind == "io" else 1
        path = e.get("path") or "?"
        if nf > 1:
            what = f"{n} {op}s of {nf} files such as {path}"
        else:
            what = f"{n} {op}s of {path}" if n > 1 else f"{op} {path}"
        fs = e.get("server") or e.get("fs")
        if fs:
            what += f" ({fs})"
    elif kind == "net":
        what = (f"{op} {e.get('saddr')}:{e.get('sport')}->{e.get('daddr')}:{e.get('dport')}"
                f" x{e.get('retransmits', 0)}")
    elif kind == "block":
        what = f"{op} {e.get('device') or '?'} sector {e.get('sector', 0)}"
    elif kind == "rdma":
        what = f"{op} {e.get('device') or '?'} qp {e.get('qp', 0)}"
    elif kind == "sched" and op == "runq":
        what = f"runnable while {e.get('other_comm') or '?'} pid {e.get('other_pid', 0)} ran:"
    elif kind == "sched":
        what = f"blocked in kernel ({e.get('reason') or '?'}):"
    else:
        what = op
    return (f"{what} pid {e.get('pid', 0)} {e.get('comm', '')} "
            f"{e.get('dur_ns', 0) / 1e6:.1f}ms").rstrip()


def _dur(ns: int) -> str:
    """``0.9 s`` from 100 ms on, ``12.3ms`` below."""
    return f"{ns / 1e6:.1f}ms" if ns < 100_000_000 else f"{ns / 1e9:.1f} s"


def describe_chain(ch: Chain) -> str:
    """What a chain waited on, for people: ``120 reads of /data/shard-17.bin (fuse) 0.9 s``,
    ``write+fsync /ckpt/step-1200.pt (nfs) 1.2 s``, ``blocked in kernel
    (fuse_simple_request) 0.8 s``, ``CPU contention: runnable 0.7 s while python pid 9 ran``."""
    blocked = _dur(ch.blocked_ns)
    if ch.kind == "sched":
        if "runq" in ch.ops:
            return (f"CPU contention: runnable {blocked} while {ch.other_comm or '?'} "
                    f"pid {ch.other_pid} ran")
        return f"blocked in kernel ({ch.targets[0].name if ch.targets else '?'}) {blocked}"
    t = ch.targets[0]
    where = f" ({t.server or t.fs})" if (t.server or t.fs) and ch.kind in ("io", "nfs") else ""
    more = f" (+{len(ch.targets) - 1} more)" if len(ch.targets) > 1 else ""
    files = max(ch.op_files.values(), default=0) if ch.kind == "io" else 0
    if files > len(ch.targets):         # storms over many small files: one of them is named
        ops = f"{next(iter(ch.ops))}s" if len(ch.ops) == 1 else f"ops ({'+'.join(ch.ops)})"
        return f"{ch.count} {ops} of {files} files such as {t.name}{where} {blocked}"
    if len(ch.ops) == 1 and ch.count > 1:
        op = next(iter(ch.ops))
        return f"{ch.count} {op}s of {t.name}{more}{where} {blocked}"
    if ch.kind == "net":
        what = f"{'+'.join(ch.ops)} {t.name}"
    else:
        what = f"{'+'.join(ch.ops)} {t.name}{more}{where}"
    return f"{what} {blocked}"


def _culprit_text(v: Verdict) -> str:
    """The culprit of a verdict: a single stall as :func:`describe`, a chain as
    :func:`describe_chain` plus its process; says when the backstop was needed."""
    ch = v.chain
    if ch is not None and ch.kind == "http":
        t = ch.targets[0] if ch.targets else None
        host = t.server if t else "?"
        path = t.name[len(host):] if t and t.name.startswith(host) else (t.name if t else "")
        op = max(ch.ops, key=lambda o: ch.ops[o])       # the chain's main method (PUT of a multipart)
        what = describe_http(op, host, path, ch.klass, ch.answers, ch.reasons,
                             ch.blocked_ns, ch.pid, ch.comm)
    elif ch is None or (ch.links == 1 and ch.count == 1 and ch.kind != "sched"):
        what = describe(v.culprit or {})
    else:
        what = f"{describe_chain(ch)}, pid {ch.pid} {ch.comm}".rstrip()
    if v.basis == "backstop" and (ch is None or ch.kind != "sched"):
        what += " [with the scheduler backstop]"
    return what


def _ms(ns: int) -> str:
    """A clock uncertainty: ``0.25 ms``, ``3 ms``, ``120 ms``, ``1.5 s``."""
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.1f} s"
    return f"{ns / 1e6:.2g} ms" if ns < 10_000_000 else f"{ns / 1e6:.0f} ms"


def remote_text(v: Verdict) -> str:
    """A remote verdict with its cause (analysis/crossnode.py), naming the peer's rank and
    node and the clock uncertainty between the two nodes: ``remote: rank 3 on node-b: TCP
    10.0.0.2:40312 -> 10.0.0.1:29500 retransmitting 1.2 s (±3 ms clock)``, ``remote: rank 1
    on node-c exited (SIGKILL) 0.4 s before (±3 ms clock)``, ``remote: rank 0 on node-a:
    <its culprit> (±5 ms clock)``."""
    c = v.culprit or {}
    who = (f"rank {v.culprit_rank}" if v.culprit_rank >= 0
           else f"pid {c.get('pid', 0)} {c.get('comm', '')}".rstrip())
    where = f"{who} on {v.culprit_node or '?'}"
    clock = f" (±{_ms(v.clock_uncertainty_ns)} clock)" if v.culprit_node != v.node else ""
    if v.cause == "peer_net":
        return (f"remote: {where}: TCP {c.get('saddr')}:{c.get('sport')} -> {c.get('daddr')}:{c.get('dport')} "
                f"retransmitting {_dur(int(c.get('dur_ns', 0)))}{clock}")
    if v.cause == "peer_exit":
        d = v.idle_start_ns - int(c.get("ts_ns", 0))
        when = f"{_dur(d)} before" if d >= 0 else f"{_dur(-d)} after the idle began"
        return f"remote: {where} exited ({signal_name(int(c.get('exit_status', -1)))}) {when}{clock}"
    return f"remote: {where}: {_culprit_text(v)}{clock}"


def cost_text(v: Verdict) -> str:
    """``held up 15 ranks ≈ 12.3 GPU-s (estimate)``: a local culprit's cost to its job."""
    c = v.job_cost
    if c is None:
        return ""
    return (f"held up {c.ranks} rank{'' if c.ranks == 1 else 's'} ≈ {c.gpu_seconds:.1f} GPU-s"
            + (" (estimate)" if c.estimate else ""))


def format_groups(groups: list, limit: int = 20) -> list:
    """Lines for repeated culprits: ``dataset_read /data/shard-#.bin on nfs-server-3: 250
    intervals, 41.0 GPU-minutes``."""
    lines = []
    for g in groups[:limit]:
        where = f" on {g['where']}" if g["where"] else ""
        mins = g["explained_ns"] / 60e9
        cost = f"{mins:.1f} GPU-minutes" if mins >= 1 else f"{g['explained_ns'] / 1e9:.1f} GPU-seconds"
        ranks = f", ranks {','.join(map(str, g['ranks'][:8]))}" if g["ranks"] else ""
        lines.append(f"  {g['class']} {g['pattern']}{where}: {g['intervals']} intervals on "
                     f"{g['gpus']} GPUs cost {cost}{ranks}")
        for b in g.get("breakdown", [])[:5]:
            rank = b["rank"] if b["rank"] is not None and b["rank"] >= 0 else "?"
            lines.append(f"      rank {rank} {b['file']} ({b['where'] or '?'}) "
                         f"{b['explained_ns'] / 1e9:.1f} s")
    return lines


def format_endpoints(endpoints: list, limit: int = 20) -> list:
    """Lines per API endpoint: ``s3.local:9000: 12 requests in 4 calls, throttled 6.2 s (9x
    429/503), errors 0.0 s, timeouts 0.0 s; GPU idle blamed 4.1 s in 2 intervals (pids 812)``."""
    lines = []
    for g in endpoints[:limit]:
        blamed = (f"; GPU idle blamed {g['gpu_idle_ns'] / 1e9:.1f} s in {g['intervals']} intervals "
                  f"(pids {','.join(map(str, g['blamed_pids']))})") if g["intervals"] else "; no GPU idle blamed"
        lines.append(f"  {g['host']}: {g['requests']} requests in {g['episodes']} calls, throttled "
                     f"{g['throttled_ns'] / 1e9:.1f} s ({g['throttled_answers']}x 429/503), errors "
                     f"{g['error_ns'] / 1e9:.1f} s, timeouts {g['timeout_ns'] / 1e9:.1f} s{blamed}")
    return lines


def _others(rows: list, count: int, each) -> str:
    """The second to fourth of ``rows`` as ``each`` writes them, then ``(+N more)``."""
    return "".join(each(r) for r in rows[1:4]) + (f" (+{count - 4} more)" if count > 4 else "")


def lifecycle_text(v: Verdict) -> str:
    """An unexplained interval at the GPU's processes' edges (``verdict.lifecycle``):
    ``start-up: python3 pid 579 started 0.3 s into it, no GPU work before``."""
    p = v.process or {}
    at = _dur(max(0, int(p.get("at_ns", 0)) - v.idle_start_ns))
    who = f"{p.get('comm', '?')} pid {p.get('pid', '?')}"
    if v.klass == "cpu_bound":
        others = _others(p.get("busy") or [p], int(p.get("count", 1)),
                         lambda b: f", {b.get('comm', '?')} pid {b.get('pid', '?')} {float(b.get('share', 0)):.0%}")
        return (f"on CPU: {who} used {_dur(int(p.get('cpu_ns', 0)))} of CPU in it "
                f"({float(p.get('share', 0)):.0%} of a core){others}"
                ": the GPU waited on CPU work, nothing traced was blocked")
    if v.klass == "net_wait":
        others = _others(p.get("waiting") or [p], int(p.get("count", 1)),
                         lambda w: f", {w.get('comm', '?')} pid {w.get('pid', '?')} from {w.get('peer', '?')}")
        return (f"on the network: {who} was waiting to receive from {p.get('peer', '?')} ({p.get('call', '?')}) "
                f"in {float(p.get('share', 0)):.0%} of its samples{others}"
                ": the GPU waited on a TCP peer (a streamed dataset, an object store, a rendezvous "
                "store); nothing traced was blocked")
    if v.klass == "process_exit":
        return f"exit: {who} exited {at} into it ({signal_name(int(p.get('exit_status', -1)))})"
    if v.klass == "process_start":
        return f"start-up: {who} started {at} into it, no GPU work before"
    n = int(p.get("count", 1))
    first = f"{who}, a child of the GPU's process," if n == 1 else \
        f"{n} children of the GPU's process, the first {who},"
    return f"worker start-up: {first} started {at} into it (workers re-forked, e.g. a DataLoader " \
           "without persistent_workers)"


def _edges_note(vs) -> str:
    """`` (2 at a GPU process's start-up, exit or workers' start-up)`` after the unexplained count."""
    n = sum(1 for v in vs if v.verdict == "unexplained" and v.klass in LIFECYCLE)
    c = sum(1 for v in vs if v.verdict == "unexplained" and v.klass == "cpu_bound")
    w = sum(1 for v in vs if v.verdict == "unexplained" and v.klass == "net_wait")
    parts = ([f"{n} at a GPU process's start-up, exit or workers' start-up"] if n else []) + \
        ([f"{c} while a GPU process or its workers computed on the CPU"] if c else []) + \
        ([f"{w} while a GPU process or its workers waited on a TCP peer"] if w else [])
    return f" ({'; '.join(parts)})" if parts else ""


def format_text(result: Result) -> str:
    """A table of verdicts (NODE GPU IDLE-START DUR(ms) VERDICT EXPLAINED CULPRIT), the
    repeated culprits, and a summary: counts, edge precision per GPU, lost events."""
    vs = result.verdicts
    s = result.summary
    lines = []
    if vs:
        day = time.strftime("%Y-%m-%d %Z", time.localtime(vs[0].idle_start_ns // 10 ** 9))
        lines.append(f"GPU idle intervals (times local, {day}):")
    nw = max([4] + [len(v.node) for v in vs])
    lines.append(f"{'NODE':<{nw}} {'GPU':>3} {'IDLE-START':<12} {'DUR(ms)':>9} "
                 f"{'VERDICT':<11} {'EXPLAINED':>9}  CULPRIT")
    for v in vs:
        dur = f"{v.duration_ns / 1e6:.1f}" + ("+" if v.open else "")
        if v.culprit is not None and v.cause:
            what = remote_text(v)
        elif v.culprit is not None:
            what = _culprit_text(v)
            if v.remote:
                what = f"[{v.culprit_node}, clock +-{v.clock_uncertainty_ns / 1e6:.3f}ms] " + what
            if v.job_cost is not None:
                what += f"; {cost_text(v)}"
        elif v.process and v.klass in UNEXPLAINED_CLASSES:
            what = f"({lifecycle_text(v)})"
        elif v.contributors:
            what = f"(partly: {describe(v.contributors[0])})"
        elif not v.owners:
            what = "(no process on the GPU)"
        else:
            what = "-"
        lines.append(f"{v.node:<{nw}} {v.gpu:>3} {_clock(v.idle_start_ns):<12} "
                     f"{dur:>9} {v.verdict:<11} {v.explained_fraction * 100:>8.0f}%  {what}")
    groups = group_verdicts(vs)
    if groups:
        lines.append("")
        lines.append("Repeated culprits (idle GPU time explained, summed):")
        lines.extend(format_groups(groups))
    endpoints = endpoint_summary(result)
    if endpoints:
        lines.append("")
        lines.append("API endpoints (time in throttled/failed calls, every traced process; GPU idle blamed on them):")
        lines.extend(format_endpoints(endpoints))
    counts = s.get("verdicts", {})
    lines.append("")
    lines.append(f"{s.get('intervals', 0)} idle intervals on {s.get('gpus', 0)} GPUs, "
                 f"{len(s.get('nodes', []))} nodes: " +
                 ", ".join(f"{counts.get(k, 0)} {k}" for k in VERDICTS) + _edges_note(vs) +
                 f"; {sum(s.get('stalls', {}).values())} stalls traced")
    per = s.get("sample_period_ns", {})
    if per:
        edges = ", ".join(f"{n}/{g} {ns / 1e6:.0f}ms" for n in sorted(per)
                          for g, ns in sorted(per[n].items(), key=lambda kv: int(kv[0])))
        lines.append(f"interval edges are precise to one sample period: {edges}")
    for n, why in sorted(s.get("gpu_unavailable", {}).items()):
        lines.append(f"{n}: no GPU data: {why}")
    if len(s.get("nodes", [])) > 1 and s.get("clock_unsynced"):
        lines.append(f"note: clocks of {', '.join(s['clock_unsynced'])} are not NTP-synchronized; "
                     "cross-node (remote) verdicts assume their clocks agree")
    if s.get("lost_total"):
        detail = ", ".join(f"{k}={v}" for k, v in sorted(s["lost"].items()) if v)
        lines.append(f"WARNING: {s['lost_total']} events or batches lost ({detail}): "
                     "some stalls may be missing, so an unexplained verdict may have a cause")
    return "\n".join(lines)


def event_line(e: dict) -> str:
    """One stall as a row of `stallscope trace` (TIME COMM PID TID OP LAT(ms) BYTES FILE/FLOW)."""
    t = datetime.datetime.fromtimestamp(e["ts_ns"] / 1e9).strftime("%H:%M:%S.%f")[:12]
    if e["type"] == "net":
        what = f"{e['saddr']}:{e['sport']} -> {e['daddr']}:{e['dport']} ({e['state']})"
        nbytes = f"{e['retransmits']}rtx"
    elif e["type"] == "block":
        what, nbytes = e["device"], str(e["bytes"])
    elif e["type"] == "rdma":
        what, nbytes = f"{e['device']} qp {e['qp']}", str(e["bytes"])
    elif e["type"] == "http":
        what = f"{e['host']}{e['path']} {e['status'] or 'no answer'} {e['reason']}".rstrip()
        nbytes = "tls" if e.get("tls") else "-"
    elif e["type"] == "sched":
        # off-CPU time of an owner thread: where it blocked, or who held its CPU
        what = (f"runnable while {e['other_comm']} pid {e['other_pid']} ran" if e["op"] == "runq"
                else f"blocked in {e['reason'] or '?'}")
        nbytes = f"{e['count']}x"
    else:
        what, nbytes = e["path"], str(e["bytes"])
        if e.get("count", 1) > 1:          # a storm: many ops below the threshold
            nf = 1 + int(e.get("more_files", 0) or 0)
            files = f" on {nf} files" if nf > 1 else ""
            what = f"{what} ({e['count']} ops{files}, {e['blocked_ns'] / 1e6:.1f} ms blocked)"
        if e["type"] == "nfs" and e.get("server"):
            what = f"{e['server']}:{what}"
    return (f"{t:<12} {e['comm'][:16]:<16} {e['pid']:>7} {e['tid']:>7} {e['op'][:12]:<12} "
            f"{e['dur_ns'] / 1e6:>9.2f} {nbytes:>9} {what}")


EVENT_HEADER = (f"{'TIME':<12} {'COMM':<16} {'PID':>7} {'TID':>7} {'OP':<12} {'LAT(ms)':>9} "
                f"{'BYTES':>9} FILE/FLOW")


def verdict_line(v: Verdict) -> str:
    """One live verdict: ``VERDICT node gpuN idle 800ms explained 96% (+-100ms): <culprit>``."""
    if v.culprit is not None and v.cause:
        what = remote_text(v)
    elif v.culprit is not None:
        what = _culprit_text(v)
        if v.remote:
            what = f"[remote: {v.culprit_node}] {what}"
        if v.job_cost is not None:
            what += f"; {cost_text(v)}"
    elif v.process and v.klass in UNEXPLAINED_CLASSES:
        what = f"unexplained: {lifecycle_text(v)}"
    elif v.contributors:
        what = f"unexplained (partly: {describe(v.contributors[0])})"
    elif not v.owners:
        what = "unexplained (no process on the GPU)"
    else:
        what = "unexplained: nothing traced explains it"
    return (f"VERDICT {v.node} gpu{v.gpu} idle {v.duration_ns / 1e6:.0f}ms "
            f"explained {v.explained_fraction * 100:.0f}% (+-{v.resolution_ns / 1e6:.0f}ms): {what}")
