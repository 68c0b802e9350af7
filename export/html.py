"""A report as one self-contained HTML file: a zoomable timeline (per node/GPU: utilization and
the idle intervals coloured by verdict; per owner thread: the culprit stalls; a link from each
culprit to the interval it explains) and the verdict table below it.

Offline by construction: the template, its CSS and its JS (``assets/``, hand-written, no
library) are inlined, and the data rides in a ``<script type="application/json">`` block with
``<``, ``>`` and ``&`` escaped as JSON ``\\u`` escapes, so no path can end the block.
"""

from __future__ import annotations

import html
import json
import os
import re
import time

from stallscope.analysis.text import describe, describe_chain, verdict_line
from stallscope.analysis.verdict import CLASSES

from .chrome_trace import Timeline, build_timeline, interval_name

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

#: fill colour per verdict class (and "unexplained"): opaque, so a screenshot shows them as is
COLOURS = {
    "dataset_read": "#1f77b4",
    "checkpoint_write": "#d62728",
    "metadata": "#9467bd",
    "network": "#ff7f0e",
    "cpu": "#2ca02c",
    "blocked": "#8c564b",
    "api_throttling": "#e377c2",
    "api_error": "#bcbd22",
    "api_timeout": "#17becf",
    "api_slow": "#7f7f7f",
    "rank_exit": "#000000",
    "unexplained": "#9e9e9e",
}
assert set(CLASSES) <= set(COLOURS), "every verdict class needs a colour"


def _asset(name: str) -> str:
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        return f.read()


def _clock(ns: int) -> str:
    """UTC wall-clock time of day with ms: ``14:03:07.250``."""
    return time.strftime("%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns // 10**6 % 1000:03d}"


def script_json(obj) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` (which JSON only holds
    inside strings) become ``\\u003c`` ..., so ``</script>`` or ``<!--`` in a path cannot end
    or alter the block; U+2028/2029 are escaped too (old JS parsers)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _detail(v) -> str:
    lines = [verdict_line(v)]
    if v.chain is not None:
        lines.append(f"chain ({v.chain.klass}, {v.chain.links} rows, pid {v.chain.pid} "
                     f"{v.chain.comm}): {describe_chain(v.chain)}")
    for c in v.contributors:
        lines.append(f"contributor: {describe(c)} (overlap {c.get('overlap_ns', 0) / 1e6:.1f}ms)")
    lines.append(f"idle {_clock(v.idle_start_ns)} .. {_clock(v.idle_end_ns)} UTC, lost "
                 f"{v.lost_ns / 1e6:.1f}ms, edges +-{v.resolution_ns / 1e6:.0f}ms"
                 + (", still open" if v.open else ""))
    if v.owners:
        lines.append("owners: " + ", ".join(map(str, v.owners[:20]))
                     + (" ..." if len(v.owners) > 20 else ""))
    if v.job:
        lines.append(f"job {v.job} rank {v.rank}")
    return "\n".join(lines)


def page_data(tl: Timeline, summary: dict) -> dict:
    """The JSON the page's script draws: times in ms from ``t0_ns`` (floats, us precision)."""
    starts = [v.idle_start_ns for v in tl.verdicts] + [s.start_ns for s in tl.stalls]
    ends = [v.idle_end_ns for v in tl.verdicts] + [s.end_ns for s in tl.stalls]
    windows = [g.windows() for g in tl.gpus]
    for g, w in zip(tl.gpus, windows):
        if w:
            starts.append(w[0][0])
            ends.append(int(g.ts_ns[-1]))
    t0 = min(starts) if starts else 0
    t1 = max(ends) if ends else t0 + 1
    ms = (lambda ns: round((ns - t0) / 1e6, 3))
    gpus = []
    for g, w in zip(tl.gpus, windows):
        gpus.append({"label": f"{g.node} gpu{g.gpu}", "uuid": g.uuid, "node": g.node,
                     "gpu": g.gpu, "period_ms": g.period_ns / 1e6,
                     "t": [ms(s) for s, _u, _m in w], "u": [u for _s, u, _m in w],
                     "end": ms(int(g.ts_ns[-1])) if len(g.ts_ns) else None})
    threads = [{"label": f"{t.node}: {t.proc_comm} pid {t.pid} / {t.comm} tid {t.tid}",
                "node": t.node, "pid": t.pid, "tid": t.tid} for t in tl.threads]
    stall_of = {}
    for si, vi in tl.links:
        stall_of.setdefault(vi, []).append(si)
    intervals = []
    for vi, v in enumerate(tl.verdicts):
        name = interval_name(v)
        intervals.append({
            "g": tl.gpu_of[vi], "s": ms(v.idle_start_ns), "e": ms(v.idle_end_ns),
            "name": name, "cls": v.klass if v.klass and v.verdict != "unexplained" else "unexplained",
            "remote": bool(v.remote), "verdict": v.verdict, "explained": v.explained_fraction,
            "node": v.node, "gpu": v.gpu, "start": _clock(v.idle_start_ns),
            "dur_ms": round(v.duration_ns / 1e6, 3), "text": verdict_line(v),
            "detail": _detail(v), "stalls": stall_of.get(vi, [])})
    stalls = [{"th": s.thread, "s": ms(s.start_ns), "e": ms(s.end_ns), "cls": s.klass,
               "text": describe(s.event), "iv": list(s.explains)} for s in tl.stalls]
    return {"t0_ms": t0 / 1e6, "span_ms": max(ms(t1), 0.001), "colours": COLOURS,
            "gpus": gpus, "threads": threads, "intervals": intervals, "stalls": stalls,
            "summary": {"intervals": summary.get("intervals", len(tl.verdicts)),
                        "verdicts": summary.get("verdicts", {}),
                        "nodes": summary.get("nodes", tl.nodes)}}


def _table(tl: Timeline) -> str:
    if not tl.verdicts:
        return '<p class="none">no idle intervals in this report</p>'
    rows = []
    for vi, v in enumerate(tl.verdicts):
        cls = v.klass if v.klass and v.verdict != "unexplained" else "unexplained"
        what = describe(v.culprit) if v.culprit else (
            f"partly: {describe(v.contributors[0])}" if v.contributors else "-")
        rows.append(
            f'<tr class="vrow" data-i="{vi}"><td>{vi + 1}</td><td>{html.escape(v.node)}</td>'
            f"<td>{v.gpu}</td><td>{_clock(v.idle_start_ns)}</td>"
            f'<td class="num">{v.duration_ns / 1e6:.1f}{"+" if v.open else ""}</td>'
            f"<td>{html.escape(v.verdict)}</td>"
            f'<td><span class="sw" style="background:{COLOURS[cls]}"></span>'
            f"{html.escape(interval_name(v))}</td>"
            f'<td class="num">{v.explained_fraction * 100:.0f}%</td>'
            f"<td>{html.escape(what)}</td></tr>")
    return ('<table id="verdicts"><thead><tr><th>#</th><th>node</th><th>GPU</th>'
            "<th>idle start (UTC)</th><th>dur (ms)</th><th>verdict</th><th>class</th>"
            "<th>explained</th><th>culprit</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def render(res, source: str = "") -> str:
    """The HTML report of an analysis result (``analyze()``'s, with ``res.nodes``)."""
    tl = build_timeline(res, all_stalls=False)
    s = res.summary
    counts = s.get("verdicts", {})
    legend = "".join(f'<span class="key"><span class="sw" style="background:{c}"></span>'
                     f"{html.escape(k)}</span>" for k, c in COLOURS.items())
    when = ""
    if tl.verdicts:
        day = time.strftime("%Y-%m-%d", time.gmtime(tl.verdicts[0].idle_start_ns // 10**9))
        when = f" from {day} (times UTC)"
    head = (f"{s.get('intervals', len(tl.verdicts))} idle intervals on {s.get('gpus', len(tl.gpus))} "
            f"GPUs, {len(s.get('nodes', tl.nodes))} nodes{when}: "
            + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("culprit", "remote", "unexplained"))
            + f"; {len(tl.stalls)} culprit stalls on {len(tl.threads)} threads")
    parts = {
        "TITLE": html.escape(f"stallscope report {os.path.basename(source)}".strip()),
        "SOURCE": html.escape(source or "-"),
        "SUMMARY": html.escape(head),
        "LEGEND": legend,
        "TABLE": _table(tl),
        "CSS": _asset("report.css"),
        "JS": _asset("report.js"),
        "DATA": script_json(page_data(tl, s)),
    }
    # one pass over the template: text put in (paths ...) is never scanned for placeholders
    return re.sub(r"/\*@(\w+)@\*/|@(\w+)@", lambda m: parts[m.group(1) or m.group(2)],
                  _asset("report.html"))


def export(res, path: str, source: str = "") -> dict:
    """Write the HTML report of ``res`` to ``path``; returns counts for the caller."""
    text = render(res, source)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return {"bytes": len(text.encode("utf-8")), "intervals": len(res.verdicts)}
