// Tally's usage dashboard: every number is shown as the query API answered it (no second
// computation here beyond display). The API key is kept in this tab's sessionStorage and sent as
// the X-API-Key header; it never goes into an address. Live updates come from
// /api/telemetry/stream, read with fetch (EventSource cannot send a header).
"use strict";

const KEY_SLOT = "tally.apiKey";
const PAGE_SIZE = 25;
const PALETTE = ["#2456c9", "#e07b00", "#1f9e6e", "#b3261e", "#7a4fd0", "#0f8fb3", "#c2459a", "#6b7c2f", "#8a6d3b", "#4a5568"];

const $ = (selector) => document.querySelector(selector);
const state = {
  key: null,
  controls: null,      // what the user chose (view, range, buckets, zone)
  cursors: [null],     // cursor of each events page shown, newest page first
  page: 0,
  lastTotals: null,    // the stream's last `totals`
  stream: null,        // AbortController of the live stream
  reloadTimer: null,
  loading: null,       // the load in progress
  again: false,        // load again when it ends
};

// ---- numbers, exactly as answered ---------------------------------------------------------

// Parses a JSON answer keeping every *Nanos field exact (BigInt from its source text).
function parseExact(text) {
  return JSON.parse(text, function (key, value, context) {
    if (key.endsWith("Nanos") && typeof value === "number" && context && context.source !== undefined) {
      return BigInt(context.source);
    }
    return value;
  });
}

const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

// Dollars from nano-dollars, exact: every significant digit kept, at least cents.
function money(nanos) {
  if (nanos === null || nanos === undefined) return "–";
  let n = BigInt(nanos);
  const sign = n < 0n ? "-" : "";
  if (n < 0n) n = -n;
  const whole = n / 1000000000n;
  let fraction = (n % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  return `${sign}$${group(whole.toString())}.${fraction}`;
}

const count = (n) => (n === null || n === undefined ? "–" : group(String(n)));
const ms = (v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(v < 10 ? 1 : 0)} ms`);
const percent = (ratio) => `${(ratio * 100).toFixed(ratio > 0 && ratio < 0.001 ? 3 : 1)} %`;

function timeLabel(iso, bucket, zone) {
  const options = bucket === "day"
    ? { month: "short", day: "numeric", timeZone: zone }
    : { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZone: zone };
  return new Intl.DateTimeFormat(undefined, options).format(new Date(iso));
}

// ---- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const message = (body && body.error && body.error.message) || `the API answered ${status}`;
    super(message);
    this.status = status;
    this.hint = body && body.error && body.error.hint;
  }
}

async function api(path, params) {
  const query = params ? `?${new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""))}` : "";
  const response = await fetch(path + query, { headers: { "X-API-Key": state.key }, cache: "no-store" });
  const text = await response.text();
  let body = null;
  try { body = parseExact(text); } catch (_) { body = null; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// ---- sign-in --------------------------------------------------------------------------------

async function signIn(key) {
  state.key = key;
  try {
    await api("/api/telemetry/status");
  } catch (error) {
    state.key = null;
    sessionStorage.removeItem(KEY_SLOT);
    showSignIn(error.status === 401 ? "That key was refused: it is unknown or revoked. Check it and try again."
      : `The API could not be reached (${error.message}). Try again in a moment.`);
    return;
  }
  sessionStorage.setItem(KEY_SLOT, key);
  $("#signin").hidden = true;
  $("#main").hidden = false;
  $("#signout").hidden = false;
  readControls();
  await reload();
  startStream();
}

function showSignIn(message) {
  stopStream();
  $("#main").hidden = true;
  $("#signout").hidden = true;
  $("#signin").hidden = false;
  const error = $("#signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  setLive("off", "Not connected");
  $("#key").value = "";
  $("#key").focus();
}

function signOut() {
  state.key = null;
  sessionStorage.removeItem(KEY_SLOT);
  showSignIn(null);
}

// ---- controls -------------------------------------------------------------------------------

function fillZones() {
  const here = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
  const select = $("#tz");
  for (const zone of new Set(["UTC", here, ...zones])) {
    const option = document.createElement("option");
    option.value = option.textContent = zone;
    select.append(option);
  }
  select.value = here;
}

function readControls() {
  const view = document.querySelector("input[name=view]:checked").value;
  state.controls = {
    view,
    user: view === "user" ? $("#user").value.trim() : null,
    preset: $("#preset").value,
    from: $("#from").value,
    to: $("#to").value,
    bucket: $("#bucket").value,
    tz: $("#tz").value,
  };
}

// The range to ask for: a preset ends now (so live updates fall inside it).
function currentRange() {
  const c = state.controls;
  if (c.preset === "custom" && c.from && c.to) {
    return { from: new Date(c.from).toISOString(), to: new Date(c.to).toISOString() };
  }
  const hours = { "24h": 24, "7d": 24 * 7, "30d": 24 * 30 }[c.preset] || 24 * 7;
  const to = new Date();
  return { from: new Date(to.getTime() - hours * 3600 * 1000).toISOString(), to: to.toISOString() };
}

// ---- loading everything ---------------------------------------------------------------------

function analyticsPath(view) {
  const user = state.controls.user;
  return user ? `/analytics/user/${encodeURIComponent(user)}/${view}` : `/api/analytics/${view}`;
}

async function reload() {
  if (state.loading) { state.again = true; return state.loading; }
  state.loading = (async () => {
    const c = state.controls;
    if (c.view === "user" && !c.user) {
      showError("Give a userId for the user view.");
      return;
    }
    const range = currentRange();
    const series = { ...range, bucket: c.bucket, tz: c.tz };
    try {
      const [overview, byService, byModel, perf, budget] = await Promise.all([
        api(analyticsPath("overview"), range),
        api(analyticsPath("timeseries"), { ...series, groupBy: "service" }),
        api(analyticsPath("timeseries"), { ...series, groupBy: "model" }),
        api(analyticsPath("perf"), range),
        api("/api/costs/budget"),
      ]);
      showError(null);
      const stated = $("#range");
      stated.dataset.from = overview.from;  // the range the API answered for (whole hours)
      stated.dataset.to = overview.to;
      stated.textContent = `${c.user ? `User ${c.user}` : "Whole org"} · ${timeLabel(overview.from, "hour", c.tz)} → ${timeLabel(overview.to, "hour", c.tz)} (${c.tz}) · ${c.bucket} buckets`;
      showKpis(overview, budget);
      stackedBars($("#chart-requests"), byService, "requests", "requests", c);
      lines($("#chart-cost"), byModel, c);
      showModels(overview);
      showPerf(perf);
      await loadEvents();
    } catch (error) {
      if (error.status === 401) { showSignIn("The key was refused: it was revoked or is unknown. Sign in again."); return; }
      showError(`${error.message}${error.hint ? ` — ${error.hint}` : ""}`);
    }
  })();
  try { await state.loading; } finally { state.loading = null; }
  // Something changed while loading (a live update, new controls): load once more.
  if (state.again) { state.again = false; await reload(); }
}

function showError(message) {
  const element = $("#error");
  element.hidden = !message;
  element.textContent = message || "";
}

function setKpi(name, text, title) {
  const element = document.querySelector(`[data-kpi="${name}"]`);
  element.textContent = text;
  if (title) element.title = title; else element.removeAttribute("title");
}

// Money as a KPI: dollars and cents large, the exact rest of the digits small after them.
function setMoneyKpi(name, nanos) {
  const element = document.querySelector(`[data-kpi="${name}"]`);
  const text = money(nanos);
  const cents = text.indexOf(".") + 3;
  const rest = document.createElement("small");
  rest.textContent = text.slice(cents);
  element.replaceChildren(text.slice(0, cents), rest);
  element.title = `${text} (exact)`;
}

function showKpis(overview, budget) {
  setKpi("requests", count(overview.totalRequests));
  setKpi("services", count(overview.distinctServices));
  setKpi("p95", overview.latencyMs ? ms(overview.latencyMs.p95) : "–");
  setKpi("errorRate", percent(overview.errorRate), `${count(overview.errors)} errors`);
  setMoneyKpi("cost", overview.costNanos);
  if (budget.limitNanos === null || budget.limitNanos === undefined) {
    setKpi("budget", `${money(budget.spentNanos)} spent`, "no monthly budget set");
    setKpi("thresholds", "no budget set");
  } else {
    setKpi("budget", `${budget.percentUsed.toFixed(1)} % of ${money(budget.limitNanos)}`, `${money(budget.spentNanos)} spent`);
    setKpi("thresholds", budget.crossedThresholds.length
      ? `crossed: ${budget.crossedThresholds.map((t) => `${t} %`).join(", ")}`
      : `no threshold crossed (alerts at ${budget.thresholds.map((t) => `${t} %`).join(", ")})`);
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
}

function fillTable(table, rows, columns, empty) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const row = body.insertRow();
    const td = document.createElement("td");
    td.colSpan = table.tHead.rows[0].cells.length;
    td.textContent = empty;
    td.className = "small";
    row.append(td);
    return;
  }
  for (const item of rows) {
    const row = body.insertRow();
    for (const [get, className] of columns) cell(row, get(item), typeof className === "function" ? className(item) : className);
  }
}

function showModels(overview) {
  fillTable($("#models"), overview.topModels, [
    [(m) => m.name], [(m) => m.provider || ""], [(m) => count(m.requests), "num"], [(m) => money(m.costNanos), "num"],
  ], "No events in this range.");
}

function showPerf(perf) {
  fillTable($("#perf"), perf.services, [
    [(s) => s.service || "(none)"], [(s) => count(s.requests), "num"],
    [(s) => (s.latencyMs ? ms(s.latencyMs.p50) : "–"), "num"], [(s) => (s.latencyMs ? ms(s.latencyMs.p95) : "–"), "num"],
    [(s) => (s.latencyMs ? ms(s.latencyMs.p99) : "–"), "num"], [(s) => percent(s.errorRate), "num"],
  ], "No events in this range.");
}

// ---- events list ----------------------------------------------------------------------------

async function loadEvents() {
  const c = state.controls;
  const range = currentRange();
  const page = await api("/api/costs", {
    ...range,
    limit: PAGE_SIZE,
    cursor: state.cursors[state.page],
    userId: c.user,
    provider: $("#f-provider").value.trim(),
    model: $("#f-model").value.trim(),
    status: $("#f-status").value,
  });
  fillTable($("#events"), page.events, [
    [(e) => timeLabel(e.timestamp, "hour", c.tz)], [(e) => `${e.provider} / ${e.model}`], [(e) => e.service || ""],
    [(e) => e.userId || ""], [(e) => count(e.tokens.totalTokens), "num"], [(e) => money(e.costNanos), "num"],
    [(e) => ms(e.latency), "num"], [(e) => e.status, (e) => `status-${e.status}`],
  ], "No events match.");
  state.cursors[state.page + 1] = page.nextCursor || null;
  state.cursors.length = state.page + 2;
  $("#older").disabled = !page.hasMore;
  $("#newer").disabled = state.page === 0;
  $("#page").textContent = `page ${state.page + 1}`;
}

async function turnPage(step) {
  state.page = Math.max(0, state.page + step);
  try { await loadEvents(); } catch (error) { showError(error.message); }
}

// ---- charts (SVG, drawn here; each with a text alternative) ----------------------------------

const SVG = "http://www.w3.org/2000/svg";
function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.append(element);
  return element;
}

// Buckets (time order) and series (largest total first) of a grouped timeseries answer.
function seriesOf(answer, measure) {
  const times = [...new Set(answer.points.map((p) => p.time))].sort((a, b) => Date.parse(a) - Date.parse(b));
  const index = new Map(times.map((t, i) => [t, i]));
  const byKey = new Map();
  for (const point of answer.points) {
    const key = point.key || "(none)";
    if (!byKey.has(key)) byKey.set(key, { key, values: new Array(times.length).fill(null), total: 0 });
    const value = measure(point);
    const entry = byKey.get(key);
    entry.values[index.get(point.time)] = value;
    entry.total += Number(value);
  }
  return { times, series: [...byKey.values()].sort((a, b) => b.total - a.total) };
}

function frame(figure, times, series, summary) {
  figure.replaceChildren();
  figure.dataset.series = String(series.length);
  figure.dataset.points = String(times.length);
  if (!times.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No events in this range.";
    figure.append(empty);
    return null;
  }
  const width = 640, height = 260, left = 64, right = 12, top = 10, bottom = 34;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary });
  figure.append(svg);
  return { svg, width, height, left, right, top, bottom, plotWidth: width - left - right, plotHeight: height - top - bottom };
}

// A round axis top at or above `value`: 1, 2, 2.5 or 5 times a power of ten.
function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function axes(f, times, max, format, c) {
  for (let i = 0; i <= 5; i += 1) {
    const value = (max * i) / 5;
    const y = f.top + f.plotHeight - (f.plotHeight * i) / 5;
    svgElement("line", { x1: f.left, x2: f.width - f.right, y1: y, y2: y, class: "gridline" }, f.svg);
    svgElement("text", { x: f.left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, f.svg).textContent = format(value);
  }
  const every = Math.max(1, Math.ceil(times.length / 6));
  times.forEach((t, i) => {
    if (i % every) return;
    const x = f.left + (f.plotWidth * (i + 0.5)) / times.length;
    svgElement("text", { x, y: f.height - 12, "text-anchor": "middle", class: "axis" }, f.svg).textContent = timeLabel(t, c.bucket, c.tz);
  });
}

function legend(figure, series) {
  const list = document.createElement("ul");
  list.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.style.background = PALETTE[i % PALETTE.length];
    item.append(swatch, s.key);
    list.append(item);
  });
  figure.append(list);
}

// The chart's numbers as a table, for screen readers and anyone who wants the figures.
function dataTable(figure, times, series, format, c) {
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Show the numbers";
  const wrap = document.createElement("div");
  wrap.className = "scroll";
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const text of ["Bucket", ...series.map((s) => s.key)]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = text;
    head.append(th);
  }
  const body = table.createTBody();
  times.forEach((t, i) => {
    const row = body.insertRow();
    cell(row, timeLabel(t, c.bucket, c.tz));
    for (const s of series) cell(row, s.values[i] === null ? "–" : format(s.values[i]), "num");
  });
  wrap.append(table);
  details.append(summary, wrap);
  figure.append(details);
}

function stackedBars(figure, answer, measureName, unit, c) {
  const { times, series } = seriesOf(answer, (p) => p[measureName]);
  const totals = times.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const max = niceMax(Math.max(5, ...totals));
  const f = frame(figure, times, series,
    `Stacked bars: ${unit} per ${c.bucket} by service, ${series.length} services over ${times.length} buckets; most in one bucket ${count(Math.max(0, ...totals))}.`);
  if (!f) return;
  axes(f, times, max, (v) => count(Math.round(v)), c);
  const slot = f.plotWidth / times.length;
  const barWidth = Math.max(1, slot * 0.7);
  times.forEach((t, i) => {
    let base = f.top + f.plotHeight;
    series.forEach((s, k) => {
      const value = s.values[i] || 0;
      if (!value) return;
      const h = (f.plotHeight * value) / max;
      base -= h;
      const bar = svgElement("rect", { x: f.left + slot * i + (slot - barWidth) / 2, y: base, width: barWidth, height: h, fill: PALETTE[k % PALETTE.length], "data-series": s.key }, f.svg);
      svgElement("title", {}, bar).textContent = `${s.key}, ${timeLabel(t, c.bucket, c.tz)}: ${count(value)} ${unit}`;
    });
  });
  legend(figure, series);
  dataTable(figure, times, series, count, c);
}

function lines(figure, answer, c) {
  const { times, series } = seriesOf(answer, (p) => p.costNanos);
  const max = niceMax(Math.max(1, ...series.flatMap((s) => s.values.map((v) => Number(v || 0)))));
  const f = frame(figure, times, series,
    `Lines: cost per ${c.bucket} for ${series.length} models over ${times.length} buckets; highest ${series.length ? series[0].key : "none"} at ${money(series.length ? series[0].values.reduce((a, b) => (b !== null && (a === null || b > a) ? b : a), null) : 0)} in one bucket.`);
  if (!f) return;
  axes(f, times, max, (v) => money(BigInt(Math.round(v))).replace(/(\.\d\d)\d+$/, "$1"), c);
  const x = (i) => f.left + (f.plotWidth * (i + 0.5)) / times.length;
  const y = (v) => f.top + f.plotHeight - (f.plotHeight * Number(v || 0)) / max;
  series.forEach((s, k) => {
    const color = PALETTE[k % PALETTE.length];
    const path = s.values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    svgElement("path", { d: path, fill: "none", stroke: color, "stroke-width": 2, "data-series": s.key }, f.svg);
    s.values.forEach((v, i) => {
      const dot = svgElement("circle", { cx: x(i), cy: y(v), r: 2.5, fill: color }, f.svg);
      svgElement("title", {}, dot).textContent = `${s.key}, ${timeLabel(times[i], c.bucket, c.tz)}: ${money(v || 0)}`;
    });
  });
  legend(figure, series);
  dataTable(figure, times, series, money, c);
}

// ---- live ------------------------------------------------------------------------------------

function setLive(stateName, text) {
  const element = $("#live");
  element.dataset.state = stateName;
  element.textContent = text;
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

// Reads /api/telemetry/stream; reconnects with backoff when it ends (e.g. the API restarted).
async function startStream() {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  let delay = 1000;
  while (!controller.signal.aborted) {
    try {
      const response = await fetch("/api/telemetry/stream", { headers: { "X-API-Key": state.key, Accept: "text/event-stream" }, signal: controller.signal });
      if (response.status === 401) { showSignIn("The key was refused: it was revoked or is unknown. Sign in again."); return; }
      if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
      delay = 1000;
      await readEvents(response.body, onStreamEvent);
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (controller.signal.aborted) return;
    setLive("reconnecting", "Reconnecting…");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

function onStreamEvent(name, data) {
  const now = new Date().toLocaleTimeString();
  if (name === "unavailable") {
    setLive("unavailable", `Storage unavailable, waiting (${now})`);
    return;
  }
  if (name !== "totals") return;
  const totals = parseExact(data);
  const changed = state.lastTotals !== null && (state.lastTotals.totalEvents !== totals.totalEvents || state.lastTotals.costNanos !== totals.costNanos);
  state.lastTotals = totals;
  setLive("live", `Live · ${count(totals.totalEvents)} events, ${money(totals.costNanos)} in all · ${now}`);
  $("#live").dataset.totalEvents = String(totals.totalEvents);
  if (changed) {
    clearTimeout(state.reloadTimer);
    state.reloadTimer = setTimeout(() => { state.page = 0; state.cursors = [null]; reload(); }, 250);
  }
}

// ---- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  fillZones();
  $("#signin-form").addEventListener("submit", (event) => { event.preventDefault(); signIn($("#key").value.trim()); });
  $("#signout").addEventListener("click", signOut);
  $("#controls").addEventListener("submit", (event) => { event.preventDefault(); readControls(); state.page = 0; state.cursors = [null]; reload(); });
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); state.page = 0; state.cursors = [null]; loadEvents().catch((e) => showError(e.message)); });
  $("#preset").addEventListener("change", () => { $("#custom").hidden = $("#preset").value !== "custom"; });
  for (const radio of document.querySelectorAll("input[name=view]")) {
    radio.addEventListener("change", () => { $("#user").disabled = radio.value !== "user" || !radio.checked; if (!$("#user").disabled) $("#user").focus(); });
  }
  $("#older").addEventListener("click", () => turnPage(1));
  $("#newer").addEventListener("click", () => turnPage(-1));
  const saved = sessionStorage.getItem(KEY_SLOT);
  if (saved) signIn(saved); else showSignIn(null);
});
