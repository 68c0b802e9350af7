/* stallscope HTML report: draws the timeline from the JSON block into the inline SVG.
   No library and no network: zoom (wheel), pan (drag), time axis, hover tooltips, click to
   select an interval (its verdict, its culprit stall and the link between them). */
(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (e) { body.setAttribute("data-error", String(e.message)); });

  var data = JSON.parse(document.getElementById("stallscope-data").textContent);
  var svg = document.getElementById("tl");
  var NS = svg.namespaceURI;
  var tip = document.getElementById("tip");
  var detail = document.getElementById("detail");
  var LABEL_W = 230, AXIS_H = 30, GPU_H = 56, TH_H = 24, GAP = 10, RIGHT = 10;
  var colours = data.colours;

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, cls, s) {
    var t = el("text", { x: x, y: y, "class": cls }, parent);
    t.textContent = s;
    return t;
  }
  function clip(s, n) { return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }

  // ------------------------------------------------------------------ layout
  var rows = [];   // {kind, index, y, h}
  var y = AXIS_H;
  data.gpus.forEach(function (g, i) { rows.push({ kind: "gpu", i: i, y: y, h: GPU_H }); y += GPU_H; });
  if (data.threads.length) { y += GAP; }
  data.threads.forEach(function (t, i) { rows.push({ kind: "thread", i: i, y: y, h: TH_H }); y += TH_H; });
  var height = Math.max(y + 8, AXIS_H + 60);
  svg.setAttribute("height", height);
  var gpuRow = {}, threadRow = {};
  rows.forEach(function (r) { (r.kind === "gpu" ? gpuRow : threadRow)[r.i] = r; });

  var defs = el("defs", {}, svg);
  var clipRect = el("rect", { x: LABEL_W, y: 0, width: 10, height: height }, el("clipPath", { id: "plotclip" }, defs));
  var marker = el("marker", { id: "arrow", viewBox: "0 0 8 8", refX: 7, refY: 4, markerWidth: 7,
                              markerHeight: 7, orient: "auto-start-reverse" }, defs);
  el("path", { d: "M0,0 L8,4 L0,8 z", fill: "#333" }, marker);

  var gBg = el("g", {}, svg);
  var gAxis = el("g", { "class": "axis" }, svg);
  var gPlot = el("g", { "clip-path": "url(#plotclip)" }, svg);
  var gLabels = el("g", {}, svg);

  rows.forEach(function (r, k) {
    el("rect", { x: 0, y: r.y, width: "100%", height: r.h, "class": "rowbg" + (k % 2 ? " alt" : "") }, gBg);
    if (r.kind === "gpu") {
      var g = data.gpus[r.i];
      text(gLabels, 6, r.y + 20, "label", clip(g.label, 34));
      text(gLabels, 6, r.y + 34, "sublabel", clip(g.uuid || "", 40));
      text(gLabels, 6, r.y + 46, "sublabel", "util % (0-100), sample " + g.period_ms + " ms");
    } else {
      text(gLabels, 6, r.y + 16, "label", clip(data.threads[r.i].label, 40)).appendChild(
        el("title", {})).textContent = data.threads[r.i].label;
    }
  });

  // idle intervals, utilization lines, stalls, links
  var gIdle = el("g", {}, gPlot), gUtil = el("g", {}, gPlot), gStall = el("g", {}, gPlot), gLink = el("g", {}, gPlot);
  var idleEls = data.intervals.map(function (iv, i) {
    var r = gpuRow[iv.g];
    return el("rect", { y: r.y + 4, height: r.h - 8, fill: colours[iv.cls] || colours.unexplained,
                        "class": "idle" + (iv.remote ? " remote" : ""), "data-i": i }, gIdle);
  });
  var utilEls = data.gpus.map(function () { return el("path", { "class": "util" }, gUtil); });
  var stallEls = data.stalls.map(function (s, i) {
    var r = threadRow[s.th];
    return el("rect", { y: r.y + 5, height: r.h - 10, fill: colours[s.cls] || colours.blocked,
                        "class": "stall", "data-i": i }, gStall);
  });
  var links = [];
  data.intervals.forEach(function (iv, vi) {
    iv.stalls.forEach(function (si) {
      links.push({ vi: vi, si: si, e: el("line", { "class": "link", "marker-end": "url(#arrow)" }, gLink) });
    });
  });
  var emptyMsg = null;
  if (!data.intervals.length) {
    emptyMsg = text(svg, LABEL_W + 12, AXIS_H + 22, "empty", "no idle intervals in this report");
    emptyMsg.setAttribute("id", "empty");
  }

  // ------------------------------------------------------------------ view
  var full = { x0: -data.span_ms * 0.01, x1: data.span_ms * 1.01 };
  var view = { x0: full.x0, x1: full.x1 };
  var W = 0, plotW = 1;
  function xOf(t) { return LABEL_W + (t - view.x0) / (view.x1 - view.x0) * plotW; }
  function tOf(x) { return view.x0 + (x - LABEL_W) / plotW * (view.x1 - view.x0); }

  function lowerBound(a, v) { var lo = 0, hi = a.length; while (lo < hi) { var m = (lo + hi) >> 1; if (a[m] < v) lo = m + 1; else hi = m; } return lo; }

  function utilPath(g, r) {
    var t = g.t, u = g.u, n = t.length;
    if (!n) return "";
    var top = r.y + 4, bot = r.y + r.h - 4;
    function yv(v) { return (bot - v / 100 * (bot - top)).toFixed(1); }
    var a = Math.max(lowerBound(t, view.x0) - 1, 0), b = Math.min(lowerBound(t, view.x1) + 1, n);
    var endT = g.end === null ? t[n - 1] : g.end;
    var d = [];
    if (b - a > 2 * plotW) {          // dense: the mean of each pixel column's samples
      var col = -1, sum = 0, cnt = 0;
      for (var i = a; i <= b; i++) {
        var c = i < b ? Math.floor(xOf(t[i])) : -2;
        if (c !== col) {
          if (cnt) d.push((d.length ? "L" : "M") + col + "," + yv(sum / cnt));
          col = c; sum = 0; cnt = 0;
        }
        if (i < b) { sum += u[i]; cnt++; }
      }
      return d.join("");
    }
    d.push("M" + xOf(t[a]).toFixed(1) + "," + yv(u[a]));
    for (var j = a + 1; j < b; j++) { d.push("H" + xOf(t[j]).toFixed(1) + "V" + yv(u[j])); }
    d.push("H" + xOf(b < n ? t[b] : endT).toFixed(1));
    return d.join("");
  }

  function niceStep(span, n) {
    var raw = span / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= raw) return steps[i] * p; }
    return 10 * p;
  }
  function clockLabel(ms, step) {
    var abs = data.t0_ms + ms, d = new Date(Math.floor(abs));
    var s = ("0" + d.getUTCHours()).slice(-2) + ":" + ("0" + d.getUTCMinutes()).slice(-2) + ":" +
            ("0" + d.getUTCSeconds()).slice(-2);
    if (step < 1000) s += "." + ("00" + d.getUTCMilliseconds()).slice(-3);
    if (step < 1) s += ("00" + Math.floor((abs % 1) * 1000)).slice(-3);
    return s;
  }

  function drawAxis() {
    while (gAxis.firstChild) gAxis.removeChild(gAxis.firstChild);
    var step = niceStep(view.x1 - view.x0, Math.max(2, plotW / 110));
    for (var t = Math.ceil(view.x0 / step) * step; t <= view.x1; t += step) {
      var x = xOf(t);
      el("line", { x1: x, x2: x, y1: AXIS_H - 6, y2: height }, gAxis);
      text(gAxis, x + 2, AXIS_H - 10, "", clockLabel(t, step));
    }
    text(gAxis, 6, 14, "", "UTC").setAttribute("class", "label");
  }

  function render() {
    W = svg.clientWidth || svg.parentNode.clientWidth || 1200;
    plotW = Math.max(W - LABEL_W - RIGHT, 10);
    clipRect.setAttribute("width", plotW);
    drawAxis();
    data.intervals.forEach(function (iv, i) {
      var x0 = xOf(iv.s), x1 = xOf(iv.e);
      idleEls[i].setAttribute("x", x0.toFixed(1));
      idleEls[i].setAttribute("width", Math.max(x1 - x0, 2).toFixed(1));
    });
    data.gpus.forEach(function (g, i) { utilEls[i].setAttribute("d", utilPath(g, gpuRow[i])); });
    data.stalls.forEach(function (s, i) {
      var x0 = xOf(s.s), x1 = xOf(s.e);
      stallEls[i].setAttribute("x", x0.toFixed(1));
      stallEls[i].setAttribute("width", Math.max(x1 - x0, 2).toFixed(1));
    });
    links.forEach(function (l) {
      var iv = data.intervals[l.vi], s = data.stalls[l.si];
      var lo = Math.max(iv.s, s.s), hi = Math.min(iv.e, s.e);
      var t = hi > lo ? (lo + hi) / 2 : (s.s + s.e) / 2;
      var ti = hi > lo ? t : (iv.s + iv.e) / 2;
      var rs = threadRow[s.th], ri = gpuRow[iv.g];
      // a link is drawn once its interval is wide enough to tell apart (or it is selected)
      l.e.style.display = (xOf(iv.e) - xOf(iv.s) >= 4 || l.vi === selected) ? "" : "none";
      l.e.setAttribute("x1", xOf(t).toFixed(1)); l.e.setAttribute("y1", rs.y + 5);
      l.e.setAttribute("x2", xOf(ti).toFixed(1)); l.e.setAttribute("y2", ri.y + ri.h - 4);
    });
  }

  // ------------------------------------------------------------------ interaction
  var selected = -1;
  function select(vi, zoom) {
    idleEls.forEach(function (e) { e.classList.remove("sel"); });
    stallEls.forEach(function (e) { e.classList.remove("sel"); });
    links.forEach(function (l) { l.e.classList.remove("sel"); });
    var rowsEls = document.querySelectorAll("tr.vrow");
    for (var k = 0; k < rowsEls.length; k++) rowsEls[k].classList.remove("sel");
    selected = vi;
    if (vi < 0) { render(); return; }
    var iv = data.intervals[vi];
    idleEls[vi].classList.add("sel");
    iv.stalls.forEach(function (si) { stallEls[si].classList.add("sel"); });
    links.forEach(function (l) { if (l.vi === vi) l.e.classList.add("sel"); });
    var row = document.querySelector('tr.vrow[data-i="' + vi + '"]');
    if (row) row.classList.add("sel");
    detail.textContent = iv.detail;
    if (zoom) {
      var lo = iv.s, hi = iv.e;
      iv.stalls.forEach(function (si) { lo = Math.min(lo, data.stalls[si].s); hi = Math.max(hi, data.stalls[si].e); });
      var pad = (hi - lo) * 0.5 + 1;
      view.x0 = lo - pad; view.x1 = hi + pad;
    }
    render();
  }

  function tipFor(target) {
    var i = Number(target.getAttribute("data-i"));
    if (target.classList.contains("idle")) {
      var iv = data.intervals[i];
      return iv.name + "  " + iv.node + " gpu" + iv.gpu + "  " + iv.start + " UTC, " + iv.dur_ms + " ms\n" + iv.text;
    }
    if (target.classList.contains("stall")) {
      var s = data.stalls[i];
      return s.text + "\nculprit of " + s.iv.length + " interval(s)";
    }
    return null;
  }
  svg.addEventListener("mousemove", function (ev) {
    var t = ev.target && ev.target.getAttribute ? tipFor(ev.target) : null;
    if (!t || drag) { tip.hidden = true; return; }
    var box = svg.parentNode.getBoundingClientRect();
    tip.textContent = t;
    tip.hidden = false;
    var x = ev.clientX - box.left + 14, yv = ev.clientY - box.top + 14;
    if (x + tip.offsetWidth > box.width) x = Math.max(ev.clientX - box.left - tip.offsetWidth - 10, 0);
    tip.style.left = x + "px"; tip.style.top = yv + "px";
  });
  svg.addEventListener("mouseleave", function () { tip.hidden = true; });

  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var box = svg.getBoundingClientRect();
    var x = Math.min(Math.max(ev.clientX - box.left, LABEL_W), LABEL_W + plotW);
    var at = tOf(x), f = Math.exp(ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
    var span = Math.min(Math.max((view.x1 - view.x0) * f, 0.001), (full.x1 - full.x0) * 4);
    var k = (x - LABEL_W) / plotW;
    view.x0 = at - k * span; view.x1 = view.x0 + span;
    render();
  }, { passive: false });

  var drag = null;
  svg.addEventListener("pointerdown", function (ev) {
    drag = { x: ev.clientX, x0: view.x0, x1: view.x1, moved: false, target: ev.target };
    try { svg.setPointerCapture(ev.pointerId); } catch (e) { /* a synthetic pointer */ }
  });
  svg.addEventListener("pointermove", function (ev) {
    if (!drag) return;
    var dx = ev.clientX - drag.x;
    if (Math.abs(dx) > 3) { drag.moved = true; svg.classList.add("dragging"); }
    if (!drag.moved) return;
    var dt = dx / plotW * (drag.x1 - drag.x0);
    view.x0 = drag.x0 - dt; view.x1 = drag.x1 - dt;
    render();
  });
  svg.addEventListener("pointerup", function () {
    if (drag && !drag.moved && drag.target.classList) {
      var t = drag.target, i = Number(t.getAttribute("data-i"));
      if (t.classList.contains("idle")) select(i, false);
      else if (t.classList.contains("stall") && data.stalls[i].iv.length) select(data.stalls[i].iv[0], false);
    }
    drag = null;
    svg.classList.remove("dragging");
  });
  function reset() { view.x0 = full.x0; view.x1 = full.x1; render(); }
  svg.addEventListener("dblclick", reset);
  document.getElementById("reset").addEventListener("click", reset);
  var trs = document.querySelectorAll("tr.vrow");
  for (var k = 0; k < trs.length; k++) {
    trs[k].addEventListener("click", function () {
      select(Number(this.getAttribute("data-i")), true);
      svg.scrollIntoView({ block: "nearest" });
    });
  }
  window.addEventListener("resize", render);

  render();
  var bb = svg.getBoundingClientRect();   // the plot area in page pixels, for checks of a screenshot
  body.setAttribute("data-plot", [Math.round(bb.left + LABEL_W), Math.round(bb.top + AXIS_H),
                                  Math.round(plotW), Math.round(height - AXIS_H)].join(","));
  body.setAttribute("data-rendered", idleEls.length + " intervals, " + stallEls.length + " stalls, " + links.length + " links");
})();
