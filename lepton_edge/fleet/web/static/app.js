// lepton-edge fleet dashboard. Why this shape (Frigate's): the page loads the fleet once from the
// JSON API, then one Server-Sent Events stream carries MQTT-shaped messages {topic, payload} that
// update the rows, cards, alerts and charts in place. No framework, no CDN: uPlot is vendored.
"use strict";
const $ = (s) => document.querySelector(s);
const S = {devices: new Map(), sort: "severity", order: "desc", summary: null, alerts: new Map(), events: [],
           view: null, range: "1h", charts: [], hist: null, dirty: false, eventsDirty: false,
           pruneAlertsAt: 1000, seen: new Set()};
const SEV = ["ok", "warning", "alert", "offline"];
// The device page lists as many events as it loads. Why a cap on the live ones too: a device sending its own
// events at the 20 a second the monitor lets through grew that list by 1.2 MiB of HTML every 30 s, for as long
// as the page stayed open.
const DEVICE_EVENTS = 100;
// Resolved alerts the page keeps (the newest; every open one is kept). Why: each alert the stream sent stayed in
// S.alerts for as long as the page was open, and every alert message sorted them all again: a wall dashboard
// open for a month of flapping alerts held tens of thousands.
const RESOLVED_ALERTS = 500;
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, d = 1) => (v === null || v === undefined) ? "-" : Number(v).toFixed(d);
const key = (d) => `${d.fleet}/${d.device}`;
// An event as the stream and the API both give it. Why the page keeps the keys it has shown (S.seen): an event
// stored after the server's poll and before the page's reload comes in the reload and then again in the stream.
const evKey = (e) => JSON.stringify([e.fleet, e.device, e.boot_id, e.ts, e.kind, e.message]);
const p95 = (d) => d.latency && d.latency.inference ? d.latency.inference.p95 : null;
const age = (t) => { if (!t) return "-"; const s = Date.now() / 1000 - t; return s < 60 ? `${s.toFixed(0)}s` : s < 3600 ? `${(s / 60).toFixed(0)}m` : `${(s / 3600).toFixed(1)}h`; };

async function api(path, opts) {
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({error: `HTTP ${r.status}`}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// ---- token: from #token=... once (then kept in this tab's session), or typed in the header field
(function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("lepton-token", decodeURIComponent(m[1])); location.hash = "#/"; }
  $("#token").value = sessionStorage.getItem("lepton-token") || "";
  $("#token").addEventListener("change", (e) => sessionStorage.setItem("lepton-token", e.target.value.trim()));
})();

// ---- fleet view --------------------------------------------------------------------------------
const SORTS = {
  severity: (d) => d.severity * 1000 + d.active_alerts, device: (d) => key(d), bundle: (d) => d.bundle_name || "",
  fps: (d) => d.fps ?? -1, p95: (d) => p95(d) ?? -1, temperature: (d) => d.temperature_c ?? -1e9,
  cpu: (d) => d.cpu_percent ?? -1, seq_gaps: (d) => d.seq_gaps, alerts: (d) => d.active_alerts, last_seen: (d) => d.last_seen || 0,
};

function rowClass(d) { return d.online === false ? "offline" : SEV[Math.min(d.severity, 2)]; }

function renderTable() {
  S.dirty = false;
  const text = $("#filter").value.toLowerCase(), st = $("#state").value;
  let rows = [...S.devices.values()].filter((d) => (!text || `${key(d)} ${d.bundle_name || ""}`.toLowerCase().includes(text)) &&
    (!st || (st === "online" ? d.online : st === "offline" ? !d.online : st === "ok" ? d.severity === 0 :
             st === "warning" ? d.severity === 1 : d.severity >= 2)));
  const f = SORTS[S.sort], sign = S.order === "desc" ? -1 : 1;
  rows.sort((a, b) => { const x = f(a), y = f(b); return (x < y ? -1 : x > y ? 1 : key(a) < key(b) ? -1 : 1) * sign; });
  const html = rows.map((d) => `<tr class="${rowClass(d)}" data-device="${esc(key(d))}">` +
    `<td class="st">${d.online === false ? "offline" : d.online ? SEV[Math.min(d.severity, 2)] : "?"}</td>` +
    `<td><a href="#/d/${esc(key(d))}">${esc(key(d))}</a></td><td>${esc(d.bundle_name || "-")}</td>` +
    `<td class="n">${fmt(d.fps)}</td><td class="n">${fmt(p95(d), 2)}</td><td class="n">${fmt(d.temperature_c)}</td>` +
    `<td class="n">${fmt(d.cpu_percent, 0)}</td><td class="n">${d.seq_gaps}</td><td class="n">${d.active_alerts}</td>` +
    `<td class="n">${age(d.last_seen)}</td></tr>`).join("");
  $("#devices tbody").innerHTML = html;
  $("#count").textContent = `${rows.length} of ${S.devices.size} devices`;
  document.querySelectorAll("#devices th").forEach((th) => th.className =
    (th.dataset.sort === S.sort ? S.order : "") + (th.classList.contains("n") ? " n" : ""));
}

function scheduleTable() { if (!S.dirty) { S.dirty = true; setTimeout(() => { if (S.view === "fleet") renderTable(); else S.dirty = false; }, 300); } }

function renderSummary(s) {
  S.summary = s;
  $("#c-devices").textContent = s.devices; $("#c-online").textContent = s.online; $("#c-offline").textContent = s.offline;
  $("#c-fps").textContent = fmt(s.total_fps); $("#c-p95").textContent = s.worst_p95_ms == null ? "-" : `${fmt(s.worst_p95_ms, 1)} ms`;
  $("#c-alerts").textContent = s.active_alerts;
}

function alertLi(a) {
  const when = new Date(a.started * 1000).toLocaleTimeString();
  return `<li class="${esc(a.severity)}" data-rule="${esc(a.rule)}"><a href="#/d/${esc(a.fleet)}/${esc(a.device)}">${esc(a.fleet)}/${esc(a.device)}</a> ` +
    `${esc(a.rule)}: ${esc(a.message)} <span class="dim">${when}${a.resolved ? " (resolved)" : ""}</span></li>`;
}
function eventLi(e) {
  return `<li class="${esc(e.level)}"><span class="dim">${new Date(e.ts * 1000).toLocaleTimeString()}</span> ` +
    `${esc(e.fleet)}/${esc(e.device)} <b>${esc(e.kind)}</b> ${esc(e.message)}</li>`;
}
function renderAlerts() {
  const act = [...S.alerts.values()].filter((a) => !a.resolved).sort((a, b) => b.started - a.started);
  $("#alerts").innerHTML = act.slice(0, 200).map(alertLi).join("") || `<li class="dim">none</li>`;
  if (S.view === "device") {
    const [f, d] = S.current;
    $("#d-alerts").innerHTML = [...S.alerts.values()].filter((a) => a.fleet === f && a.device === d)
      .sort((a, b) => b.started - a.started).slice(0, 50).map(alertLi).join("") || `<li class="dim">none</li>`;
  }
}
function renderEvents() { $("#events").innerHTML = S.events.slice(0, 100).map(eventLi).join(""); }
// Live events redraw the list at most every 300 ms, as the table does. Why: each event rebuilt all 100 items, and
// ten devices sending events within their flood limit kept the page's main thread in long tasks 22% of the time.
function scheduleEvents() { if (!S.eventsDirty) { S.eventsDirty = true; setTimeout(() => { S.eventsDirty = false; renderEvents(); }, 300); } }

// ---- device view -------------------------------------------------------------------------------
function chartOpts(el, title, series) {
  return {width: Math.max(360, el.clientWidth - 8), height: 220, title: "", cursor: {drag: {x: true}},
    scales: {x: {time: true}}, axes: [{stroke: "#8a94a0", grid: {stroke: "#2a313a"}}, {stroke: "#8a94a0", grid: {stroke: "#2a313a"}}],
    series: [{}, ...series.map(([label, stroke, dash]) => ({label, stroke, width: 1.5, dash, spanGaps: true}))]};
}
const CH = [
  ["#ch-lat", [["p50", "#7fb3ff"], ["p95", "#d49b1f"], ["p99", "#d9463e"], ["budget", "#8a94a0", [6, 4]]],
   (p, b) => [p.inference_p50_ms, p.inference_p95_ms, p.inference_p99_ms, b]],
  ["#ch-fps", [["fps", "#2e9d5b"]], (p) => [p.fps]],
  ["#ch-temp", [["°C", "#d9463e"]], (p) => [p.temperature_c]],
];

function drawCharts(points, budget) {
  S.charts.forEach((c) => c.destroy()); S.charts = [];
  S.hist = {points, budget};
  for (const [sel, series, pick] of CH) {
    const el = $(sel); el.innerHTML = "";
    const cols = [points.map((p) => p.ts)];
    series.forEach((_, i) => cols.push(points.map((p) => pick(p, budget)[i] ?? null)));
    S.charts.push(new uPlot(chartOpts(el, sel, series), cols, el));
  }
}
function appendPoint(d) {  // a live window on the device page: add it to the charts (load once, then append)
  if (!S.hist || !d.last_seen) return;
  const last = S.hist.points[S.hist.points.length - 1];
  if (last && d.last_seen <= last.ts) return;
  const lat = (d.latency || {}).inference || {};
  const p = {ts: d.last_seen, fps: d.fps, inference_p50_ms: lat.p50, inference_p95_ms: lat.p95, inference_p99_ms: lat.p99, temperature_c: d.temperature_c};
  S.hist.points.push(p);
  S.charts.forEach((c, i) => {
    const cols = c.data.map((a) => Array.from(a));
    cols[0].push(p.ts); CH[i][2](p, S.hist.budget).forEach((v, j) => cols[j + 1].push(v ?? null));
    c.setData(cols);
  });
}

function renderFacts(d) {
  const f = (k, v) => `<span>${k} <b>${esc(v)}</b></span>`;
  const lat = p95(d);
  $("#d-facts").innerHTML = [
    f("state", d.online === false ? "offline" : d.online ? SEV[Math.min(d.severity, 2)] : "unknown"), f("last seen", age(d.last_seen)),
    f("bundle", `${d.bundle_name || "-"} ${d.precision || ""} ${d.backend || ""}`), f("sha256", (d.bundle_sha256 || "-").slice(0, 12)),
    f("software", d.software || "-"), f("boot", d.boot_id || "-"), f("fps", fmt(d.fps)), f("p95", lat == null ? "-" : `${fmt(lat, 2)} ms`),
    f("budget", d.latency_budget_ms == null ? "-" : `${d.latency_budget_ms} ms`), f("temp", fmt(d.temperature_c)), f("cpu", fmt(d.cpu_percent, 0)),
    f("windows", d.windows), f("seq gaps", d.seq_gaps), f("dropped", d.dropped), f("deploys", d.deploys), f("rollbacks", d.rollbacks),
    f("throttled", d.throttled || "no")].join("");
  $("#d-title").className = rowClass(d);
}

async function loadHistory() {
  const [f, d] = S.current;
  document.querySelectorAll("#ranges button").forEach((b) => b.classList.toggle("on", b.dataset.range === S.range));
  const dev = S.devices.get(`${f}/${d}`) || {};
  const h = await api(`/api/devices/${f}/${d}/history?range=${S.range}`);
  drawCharts(h.points, dev.latency_budget_ms ?? null);
}

async function showDevice(f, d) {
  S.view = "device"; S.current = [f, d];
  $("#fleet-view").hidden = true; $("#device-view").hidden = false;
  $("#d-title").textContent = `${f}/${d}`; $("#reply").textContent = "";
  try {
    const dev = await api(`/api/devices/${f}/${d}`);
    S.devices.set(key(dev), dev); renderFacts(dev);
    const [ev] = await Promise.all([api(`/api/events?fleet=${f}&device=${d}&limit=${DEVICE_EVENTS}`), loadHistory()]);
    showDeviceEvents(ev.events);
    renderAlerts();
  } catch (e) { $("#d-facts").textContent = String(e.message || e); }
}

function showDeviceEvents(events) {
  events.forEach((e) => S.seen.add(evKey(e)));
  $("#d-events").innerHTML = events.map(eventLi).join("") || `<li class="dim">none</li>`;
}

async function command(verb, body) {
  const [f, d] = S.current;
  $("#reply").textContent = `${verb}: waiting for ${f}/${d}...`;
  try {
    const r = await api(`/api/devices/${f}/${d}/cmd/${verb}`, {method: "POST", headers: {"Content-Type": "application/json",
      Authorization: `Bearer ${$("#token").value.trim()}`}, body: JSON.stringify(body)});
    $("#reply").textContent = `${verb} reply: ${JSON.stringify(r.reply, null, 1)}`;
    $("#reply").dataset.ok = r.reply && r.reply.ok ? "true" : "false";
  } catch (e) { $("#reply").textContent = `${verb} failed: ${e.message}`; $("#reply").dataset.ok = "false"; }
}
$("#cmd-ping").onclick = () => command("ping", {});
$("#cmd-set").onclick = () => command("set", {window_s: Number($("#set-window").value)});
$("#cmd-deploy").onclick = () => { const b = {url: $("#deploy-url").value.trim()}; const s = $("#deploy-sha").value.trim(); if (s) b.sha256 = s; command("deploy", b); };
document.querySelectorAll("#ranges button").forEach((b) => b.onclick = () => { S.range = b.dataset.range; loadHistory(); });

// ---- routing, live stream ----------------------------------------------------------------------
function route() {
  const m = location.hash.match(/^#\/d\/([^/]+)\/([^/]+)$/);
  if (m) return showDevice(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
  S.view = "fleet"; S.hist = null;
  $("#fleet-view").hidden = false; $("#device-view").hidden = true; renderTable();
}

function keepAlert(a) {
  // an alert is resolved once (raised again, it is a new id): an open copy of a resolved one was read before its
  // resolution (a reload's answer overtaken by the stream)
  const had = S.alerts.get(a.id);
  if (had && had.resolved && !a.resolved) return;
  S.alerts.set(a.id, a);
  if (S.alerts.size > S.pruneAlertsAt) pruneAlerts();  // (pruned in batches: a pass sorts every resolved alert)
}

function pruneAlerts() {  // the open ones and the newest RESOLVED_ALERTS resolved ones
  const resolved = [...S.alerts.values()].filter((x) => x.resolved).sort((x, y) => y.resolved - x.resolved);
  resolved.slice(RESOLVED_ALERTS).forEach((x) => S.alerts.delete(x.id));
  S.pruneAlertsAt = S.alerts.size + RESOLVED_ALERTS;
}

// The alerts a page loads: the newest 500, and every open one however old (an open alert behind 500 newer
// resolved ones was never listed). After a reconnect an alert the page shows open but the server no longer
// lists open was resolved while the stream was down: its resolution was in the messages the closed stream lost.
async function loadAlerts() {
  const shownOpen = [...S.alerts.values()].filter((a) => !a.resolved).map((a) => a.id);  // (not one the new stream
  const [recent, open] = await Promise.all([api("/api/alerts?limit=500"),             // brings meanwhile)
                                            api("/api/alerts?active=true&limit=1000")]);
  recent.alerts.forEach(keepAlert); open.alerts.forEach(keepAlert);
  if (open.alerts.length < 1000) {
    const still = new Set(open.alerts.map((a) => a.id));
    shownOpen.filter((id) => !still.has(id) && S.alerts.has(id) && !S.alerts.get(id).resolved)
      .forEach((id) => S.alerts.delete(id));
  }
  // and at once down to the newest resolved ones: an alert shown open that was resolved while the stream was
  // down, and is older than the newest 500 now, was just dropped, so resolved ones older still, kept from
  // before, would leave a gap in what the page lists (seen on a loaded machine, whose stream lagged)
  pruneAlerts();
}

function onMessage(m) {
  const t = m.topic;
  if (t === "lepton/monitor/synced") SYNC.up = true;
  if (t === "lepton/monitor/synced" || t === "lepton/monitor/resync") return requestResync();
  if (t === "lepton/monitor/error") $("#live").className = "live";  // (the store unread: on after the next reload)
  if (SYNC.busy) {  // held while a reload is on its way, applied after it (see requestResync)
    if (SYNC.held.length < HELD_MAX) SYNC.held.push(m); else SYNC.again = true;
    return;
  }
  apply(m);
}

function apply(m) {
  const t = m.topic;
  if (t === "lepton/summary") return renderSummary(m.payload);
  if (t.startsWith("lepton/alerts/")) { keepAlert(m.payload); renderAlerts(); return; }
  const parts = t.split("/");
  const k = `${parts[2]}/${parts[3]}`;
  if (t.endsWith("/state")) {
    if (m.payload === null) S.devices.delete(k); else S.devices.set(k, m.payload);
    if (S.view === "fleet") scheduleTable();
    else if (S.current && k === S.current.join("/") && m.payload) { renderFacts(m.payload); appendPoint(m.payload); }
  } else if (t.endsWith("/events")) {
    const ek = evKey(m.payload);
    if (S.seen.has(ek)) return;
    S.seen.add(ek);
    if (S.seen.size > 5000) S.seen = new Set([...S.events, m.payload].map(evKey));  // (bounded: the newest kept)
    S.events.unshift(m.payload); S.events.length = Math.min(S.events.length, 200); scheduleEvents();
    if (S.view === "device" && k === S.current.join("/")) {
      const ul = $("#d-events");
      ul.insertAdjacentHTML("afterbegin", eventLi(m.payload));
      while (ul.children.length > DEVICE_EVENTS) ul.lastElementChild.remove();
    }
  }
}

// After a reconnect the page reloads the fleet, its alerts and events: the server closes a stream that falls
// behind (a burst of thousands of updates) and what it had queued is gone, so the rows would stay stale until a
// manual reload, and an alert raised in that burst was never listed (only the rows were reloaded).
// The device page's facts, events and charts are read again too: they missed the same messages.
async function resync() {
  const cur = S.view === "device" ? S.current : null;
  const [devs, sum, ev, one] = await Promise.all([api("/api/devices"), api("/api/summary"), api("/api/events?limit=100"),
    cur ? Promise.all([api(`/api/devices/${cur[0]}/${cur[1]}`).catch(() => null),
                       api(`/api/events?fleet=${cur[0]}&device=${cur[1]}&limit=${DEVICE_EVENTS}`)]) : null,
    loadAlerts()]);
  S.devices.clear();
  devs.devices.forEach((d) => S.devices.set(key(d), d));
  renderSummary(sum); S.events = ev.events;
  S.seen = new Set(ev.events.map(evKey));
  renderAlerts(); scheduleEvents();
  if (S.view === "fleet") scheduleTable();
  if (one && S.view === "device" && S.current === cur) {
    const [dev, devEvents] = one;
    if (dev) renderFacts(dev);
    showDeviceEvents(devEvents.events);
    loadHistory().catch((err) => console.error(err));
  }
}

// The server says when: "synced" follows the first poll of the store that began after this stream opened (so
// what a reload reads then, and the stream from then on, miss nothing, the first connection's included: the page
// loaded before it), "resync" when a poll's diff may have missed changes. One reload at a time, and one more if
// asked meanwhile. Why not on open: a reload at open raced the server's first poll, whose changes it did not
// carry (a page that reconnected lost the ~100 alerts raised in between, seen on a loaded machine).
// The "live" mark is on once that reload is done with the stream up: then the page shows what the store holds and
// follows it (off while the stream is down or a reload pending: what it shows may lack changes).
// Stream messages that come while a reload is on its way are held and applied after it, in order. Why: the
// reload read the store before them, and applied on top it rolled them back for good (a device's Last Will:
// shown online; a forgotten device: back; events that came meanwhile: gone). Past HELD_MAX, another reload.
const SYNC = {busy: false, again: false, up: false, held: []};
const HELD_MAX = 5000;
function requestResync() {
  $("#live").className = "live";  // (not on: what the page shows may lack changes until the reload is done)
  if (SYNC.busy) { SYNC.again = true; return; }
  SYNC.busy = true;
  resync().then(() => true, (err) => { console.error(err); return false; }).then((done) => {
    SYNC.busy = false;
    const held = SYNC.held;
    SYNC.held = [];
    held.forEach((m) => { try { apply(m); } catch (err) { console.error(err); } });
    if (SYNC.again || (!done && SYNC.up)) { SYNC.again = false; setTimeout(requestResync, done ? 0 : 2000); }
    else if (SYNC.up) $("#live").className = "live on";
  });
}

function connect() {
  const es = new EventSource("/api/stream");
  es.onmessage = (e) => { try { onMessage(JSON.parse(e.data)); } catch (err) { console.error(err); } };
  es.onerror = () => {
    SYNC.up = false;
    $("#live").className = "live off";
    // a non-200 answer (a 503 while the store is down) ends an EventSource for good: start a new one later
    if (es.readyState === EventSource.CLOSED) setTimeout(connect, 30000);
  };
}

async function load() {
  const [devs, sum, ev] = await Promise.all([api("/api/devices"), api("/api/summary"), api("/api/events?limit=100"),
                                             loadAlerts()]);
  devs.devices.forEach((d) => S.devices.set(key(d), d));
  renderSummary(sum); S.events = ev.events;
  ev.events.forEach((e) => S.seen.add(evKey(e)));
  renderAlerts(); renderEvents();
  document.querySelectorAll("#devices th").forEach((th) => th.onclick = () => {
    const s = th.dataset.sort; S.order = S.sort === s && S.order === "desc" ? "asc" : S.sort === s ? "desc" :
      (["device", "bundle"].includes(s) ? "asc" : "desc"); S.sort = s; renderTable(); });
  $("#filter").oninput = renderTable; $("#state").onchange = renderTable;
  window.addEventListener("hashchange", route);
  route();
  requestAnimationFrame(() => { document.body.dataset.readyMs = Math.round(performance.now()); });  // the bench reads it
  document.body.dataset.ready = "1";
  connect();
  setInterval(() => { if (S.view === "fleet") scheduleTable(); }, 5000);  // ages move on without messages
}
load().catch((e) => { document.body.dataset.ready = "error"; $("#count").textContent = `cannot load the fleet: ${e.message}`; });
