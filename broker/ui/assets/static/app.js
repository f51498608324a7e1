// fleetmq dashboard: draws telemetry plots as SVG and applies live updates
// from the server's event stream. No dependencies, no build step.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const W = 640, H = 180, PAD = { l: 58, r: 10, t: 10, b: 24 };

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// visible escapes what a device sent that would not show as itself, as
// the server does (visibleText in pages.go): control characters but
// newlines and tabs, and bidirectional controls, which make text read
// otherwise than it is.
function visible(s) {
  return s.replace(/[\p{Cc}\p{Bidi_Control}]/gu, (c) => {
    if (c === "\n" || c === "\t") return c;
    const n = c.codePointAt(0);
    return n < 0x80 ? "\\x" + n.toString(16).padStart(2, "0") : "\\u" + n.toString(16).padStart(4, "0");
  });
}

// exact formats a sample's value for its tooltip.
function exact(v) {
  return String(Number(v.toPrecision(10)));
}

// axisFormat returns a formatter for the labels of an axis from lo to hi:
// a unit prefix from the magnitude, and enough decimals that neighbouring
// labels differ.
function axisFormat(lo, hi) {
  const m = Math.max(Math.abs(lo), Math.abs(hi));
  let div = 1, suffix = "";
  if (m >= 1e9) { div = 1e9; suffix = "G"; }
  else if (m >= 1e6) { div = 1e6; suffix = "M"; }
  else if (m >= 1e4) { div = 1e3; suffix = "k"; }
  const step = (hi - lo) / 3 / div;
  const decimals = Math.min(6, Math.max(0, Math.ceil(-Math.log10(step)) + 1));
  return (v) => (v / div).toFixed(decimals) + suffix;
}

function fmtTime(ms, withDate) {
  const d = new Date(ms);
  const t = d.toISOString();
  return withDate ? t.slice(0, 10) + " " + t.slice(11, 19) : t.slice(11, 19);
}

// draw renders points ([[unixMs, value], ...], oldest first) into svg:
// a line, and one circle per point.
function draw(svg, points) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("data-points", String(points.length));
  if (points.length === 0) return;
  let t0 = Infinity, t1 = -Infinity, v0 = Infinity, v1 = -Infinity;
  for (const [t, v] of points) {
    t0 = Math.min(t0, t); t1 = Math.max(t1, t);
    v0 = Math.min(v0, v); v1 = Math.max(v1, v);
  }
  if (t1 === t0) { t0 -= 30000; t1 += 30000; }
  if (v1 === v0) { const d = Math.abs(v0) * 0.05 || 1; v0 -= d; v1 += d; }
  const pad = (v1 - v0) * 0.08; v0 -= pad; v1 += pad;
  const x = (t) => PAD.l + (t - t0) / (t1 - t0) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - (v - v0) / (v1 - v0) * (H - PAD.t - PAD.b);
  const fmt = axisFormat(v0, v1);
  for (let i = 0; i <= 3; i++) {
    const v = v0 + (v1 - v0) * i / 3, yy = y(v);
    el("line", { class: "grid", x1: PAD.l, x2: W - PAD.r, y1: yy, y2: yy }, svg);
    el("text", { class: "axis", x: PAD.l - 6, y: yy + 4, "text-anchor": "end" }, svg).textContent = fmt(v);
  }
  el("text", { class: "axis", x: PAD.l, y: H - 6 }, svg).textContent = fmtTime(t0, true);
  el("text", { class: "axis", x: W - PAD.r, y: H - 6, "text-anchor": "end" }, svg).textContent = fmtTime(t1, false) + " UTC";
  const d = points.map(([t, v], i) => (i ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
  el("path", { class: "line", d: d }, svg);
  for (const [t, v] of points) {
    const c = el("circle", { class: "pt", cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.6 }, svg);
    el("title", {}, c).textContent = exact(v) + " at " + fmtTime(t, true) + " UTC";
  }
}

// Plots of the device page: one per field, kept in memory for updates.
const plots = new Map();

function setupCharts() {
  const box = document.getElementById("charts");
  if (!box) return;
  const max = Number(box.dataset.maxPoints) || 500;
  for (const s of JSON.parse(box.dataset.series || "[]")) {
    const svg = box.querySelector('svg.plot[data-field="' + CSS.escape(s.name) + '"]');
    if (!svg) continue;
    plots.set(s.name, { svg: svg, points: s.points });
    draw(svg, s.points);
  }
  box.dataset.max = String(max);
}

let fieldLabels = null;
function labels() {
  if (!fieldLabels) fieldLabels = JSON.parse(document.getElementById("charts").dataset.labels || "{}");
  return fieldLabels;
}

function addSample(ev) {
  const box = document.getElementById("charts");
  if (!box) return;
  const max = Number(box.dataset.max) || 500;
  const maxSeries = Number(box.dataset.maxSeries) || 12;
  for (const [name, v] of Object.entries(ev.values)) {
    let p = plots.get(name);
    if (!p) {
      // As the page does: a device with thousands of fields must not
      // bury the page in plots.
      if (plots.size >= maxSeries) continue;
      const none = document.getElementById("no-telemetry");
      if (none) none.remove();
      const fig = document.createElement("figure");
      fig.className = "chart";
      fig.dataset.field = name;
      // Captioned as the server captions the plots it draws.
      const label = Object.hasOwn(labels(), name) ? labels()[name] : visible(name);
      const cap = document.createElement("figcaption");
      cap.textContent = label;
      fig.appendChild(cap);
      const svg = el("svg", { class: "plot", "data-field": name, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label + " over time" }, fig);
      box.appendChild(fig);
      p = { svg: svg, points: [] };
      plots.set(name, p);
    }
    p.points.push([ev.t, v]);
    if (p.points.length > max) p.points.splice(0, p.points.length - max);
    draw(p.svg, p.points);
  }
  const n = document.getElementById("samples");
  if (n) n.textContent = String(Math.min(Number(n.textContent) + 1, max));
}

function showPresence(e, online) {
  e.textContent = online ? "online" : "offline";
  e.classList.toggle("online", online);
  e.classList.toggle("offline", !online);
}

function setPresence(ev) {
  for (const e of document.querySelectorAll("[data-presence]")) {
    if (e.dataset.presence === ev.id) showPresence(e, ev.online);
  }
}

// setOnline applies the set of identities online that every stream starts
// with: changes made while the page loaded, or while its stream was down,
// sent no event this page saw.
function setOnline(ids) {
  const online = new Set(ids);
  for (const e of document.querySelectorAll("[data-presence]")) {
    showPresence(e, online.has(e.dataset.presence));
  }
}

let summaryTimer = null;
function refreshSummary() {
  if (!document.getElementById("summary") || summaryTimer) return;
  // Many devices may change at once (a network outage): one fetch for all.
  summaryTimer = setTimeout(async () => {
    summaryTimer = null;
    try {
      const r = await fetch("/api/overview", { headers: { Accept: "application/json" } });
      if (!r.ok) return;
      const s = await r.json();
      for (const k of ["online", "offline", "expiring", "revoked"]) {
        const e = document.getElementById("count-" + k);
        if (e) e.textContent = String(s[k]);
      }
    } catch (e) { /* the stream's reconnect retries */ }
  }, 250);
}

function listen() {
  const url = document.body.dataset.events;
  if (!url || !window.EventSource) return;
  const live = document.getElementById("live");
  const es = new EventSource(url);
  es.addEventListener("open", () => {
    document.body.dataset.live = "open";
    if (live) live.classList.add("on");
    refreshSummary();
  });
  es.addEventListener("error", () => {
    document.body.dataset.live = "closed";
    if (live) live.classList.remove("on");
  });
  es.addEventListener("online", (m) => {
    setOnline(JSON.parse(m.data));
  });
  es.addEventListener("presence", (m) => {
    const ev = JSON.parse(m.data);
    setPresence(ev);
    refreshSummary();
  });
  es.addEventListener("telemetry", (m) => addSample(JSON.parse(m.data)));
}

document.addEventListener("DOMContentLoaded", () => {
  setupCharts();
  document.body.dataset.charts = "ready";
  listen();
});
