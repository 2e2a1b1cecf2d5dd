// The Spine console: a dependency-free single-page app that the dispatcher embeds in its binary
// and serves at /ui. It sits at the very end of the data flow: it only reads the dispatcher's
// HTTP API (/v1/...), listens to its server-sent event streams, and sends the same actions
// (drain, cancel, retry, submit) a client would, with the token the login form stored in an
// HttpOnly cookie. Every page is a hash route (#/fleet, #/jobs/ID, ...) so the server has one
// shell page to serve; docs/console.md describes the pages and why there is no framework.
"use strict";

// ---------------------------------------------------------------------------------------------
// DOM helpers. Every string from the API goes through textContent (never innerHTML), so a job
// argument or agent attribute can never become markup.

const SVG_NS = "http://www.w3.org/2000/svg";

/** Builds an element: attrs keys "class", "text", "on<event>" and plain attributes. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  appendAll(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendAll(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

const $ = (sel, root) => (root || document).querySelector(sel);

/** A table inside a horizontally scrolling wrapper, so wide tables work on a phone. */
function tableWrap(table) {
  return el("div", { class: "table-wrap" }, table);
}

// ---------------------------------------------------------------------------------------------
// Formatting. Times show in the browser's local time; the exact UTC string stays in `title`.

function timeEl(iso) {
  if (!iso) return el("span", { class: "muted", text: "–" });
  const date = new Date(iso);
  const text = isNaN(date) ? iso : date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  return el("time", { datetime: iso, title: iso, text });
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

function fmtNum(v, digits) {
  if (v === null || v === undefined) return "–";
  return digits === undefined ? String(v) : Number(v).toFixed(digits);
}

function fmtAgo(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return "just now";
  if (ms < 120000) return `${Math.round(ms / 1000)} s ago`;
  return `${Math.round(ms / 60000)} min ago`;
}

/** A state badge: colour for a quick glance, but always the state's name as text. */
function badge(state) {
  return el("span", { class: `badge state-${state}`, text: state });
}

const FINAL_STATES = new Set(["succeeded", "failed", "timed-out", "cancelled"]);
const RETRYABLE_STATES = new Set(["failed", "timed-out", "cancelled"]);

// ---------------------------------------------------------------------------------------------
// The API. One function for every call, so credentials, the CSRF header and the handling of
// 401 (go and sign in) and error bodies live in one place.

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.field = body && body.field;
  }
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return null;
}

/** Calls the API; `body` is JSON unless it is a Blob (raw upload). Throws ApiError. */
async function api(method, url, body) {
  const headers = {};
  if (method !== "GET") {
    // The cookie is absent when the dispatcher has no tokens; then no header is expected.
    const csrf = cookie("spine_csrf");
    if (csrf) headers["X-Spine-CSRF"] = csrf;
  }
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers["Content-Type"] = body.type || "application/octet-stream";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const res = await fetch(url, { method, credentials: "same-origin", headers, body: payload });
  const type = res.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await res.json().catch(() => null) : null;
  if (res.status === 401) {
    // Signed out or the cookie expired: the login page is the only useful next step.
    me = null;
    // Keep a login page's own query (e.g. ?error=unknown-token) when already there.
    if (!location.hash.startsWith("#/login")) location.hash = "#/login";
    throw new ApiError(401, data);
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

// ---------------------------------------------------------------------------------------------
// The alert region and status lines.

function showAlert(message) {
  const box = $("#alert");
  box.textContent = message;
  box.classList.toggle("visible", Boolean(message));
}

/** Reports a failed call: 401 already navigated; everything else names the server's reason. */
function report(err) {
  if (err instanceof ApiError && err.status === 401) return;
  showAlert(err.message || String(err));
}

// ---------------------------------------------------------------------------------------------
// Page lifecycle. A page registers what must stop when the user leaves it (event streams,
// timers); the router runs those before drawing the next page, so no stream outlives its page.

let cleanups = [];
let pageToken = 0;

function onLeave(fn) {
  cleanups.push(fn);
}

function leavePage() {
  for (const fn of cleanups) {
    try {
      fn();
    } catch (e) {
      console.error(e);
    }
  }
  cleanups = [];
  pageToken += 1;
}

/** True while the page that started an async call is still shown (ignore late answers). */
function stillOn(token) {
  return token === pageToken;
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  onLeave(() => clearInterval(id));
}

/**
 * Runs `load` now and every `ms` (never two at once), saying in `status` when it last worked;
 * a failure says so there and in the alert region.
 */
function refreshEvery(ms, status, load) {
  let busy = false;
  const run = async () => {
    if (busy) return;
    busy = true;
    try {
      if ((await load()) === false) return;
      status.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      status.className = "status live";
    } catch (err) {
      status.textContent = "Refresh failed";
      status.className = "status error";
      report(err);
    } finally {
      busy = false;
    }
  };
  run();
  every(ms, run);
}

/**
 * An EventSource that reconnects with backoff (1 s doubling to 30 s) and says so in a status
 * line. EventSource retries by itself only on network errors; an HTTP error closes it for good,
 * so we own the retry loop. `onFail` may explain a stream that never opened (e.g. a bad filter).
 */
function liveStream(url, handlers, status, onFail) {
  let es = null;
  let delay = 1000;
  let timer = null;
  let stopped = false;
  const setStatus = (text, cls) => {
    if (!status) return;
    status.textContent = text;
    status.className = `status ${cls}`;
  };
  const connect = () => {
    let opened = false;
    es = new EventSource(url, { withCredentials: true });
    es.onopen = () => {
      opened = true;
      delay = 1000;
      setStatus("Live", "live");
    };
    for (const [name, fn] of Object.entries(handlers)) {
      es.addEventListener(name, (ev) => {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch (e) {
          console.error(`bad ${name} event`, e);
          return;
        }
        fn(data);
      });
    }
    es.onerror = async () => {
      es.close();
      if (stopped) return;
      const hopeless = !opened && (await (onFail || probeAccess)());
      // The page may have been left while we asked why: then nothing is to be reopened.
      if (stopped) return;
      if (hopeless) {
        setStatus("Not connected", "error");
        return;
      }
      const secs = Math.round(delay / 1000);
      setStatus(`Disconnected — reconnecting in ${secs} s`, "error");
      timer = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  };
  connect();
  const stop = () => {
    stopped = true;
    clearTimeout(timer);
    if (es) es.close();
  };
  onLeave(stop);
  return stop;
}

/** Why a stream would not open, in the common case: signed out (api() then goes to login). */
async function probeAccess() {
  try {
    await api("GET", "/v1/whoami");
    return false;
  } catch (err) {
    return err.status === 401 || err.status === 403;
  }
}

// ---------------------------------------------------------------------------------------------
// Sparkline: in flight against slots over time, as two polylines in a 160×40 box. Hand-written
// because it is 40 lines; a chart library would be bigger than the whole console.

function sparkline(samples, label) {
  const width = 160;
  const height = 40;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "spark" });
  const last = samples[samples.length - 1];
  const text = last ? `${label}: ${last.in_flight} in flight of ${last.slots} slots` : `${label}: no samples yet`;
  root.setAttribute("aria-label", text);
  const title = svg("title");
  title.textContent = text;
  root.append(title);
  if (samples.length === 0) return root;
  const t0 = samples[0].at_ms;
  const span = Math.max(last.at_ms - t0, 1);
  const top = Math.max(1, ...samples.map((s) => Math.max(s.slots, s.in_flight)));
  const x = (t) => (samples.length === 1 ? width : ((t - t0) / span) * width).toFixed(1);
  const y = (v) => (height - 2 - (v / top) * (height - 4)).toFixed(1);
  const points = (key) => samples.map((s) => `${x(s.at_ms)},${y(s[key])}`).join(" ");
  root.append(svg("polyline", { points: points("slots"), class: "spark-slots" }));
  const area = `0,${height} ${points("in_flight")} ${x(last.at_ms)},${height}`;
  root.append(svg("polygon", { points: area, class: "spark-area" }));
  root.append(svg("polyline", { points: points("in_flight"), class: "spark-inflight" }));
  return root;
}

/** Keeps the last ten minutes of samples, oldest first. */
function pushSample(list, sample) {
  list.push(sample);
  const horizon = sample.at_ms - 10 * 60 * 1000;
  while (list.length > 0 && list[0].at_ms < horizon) list.shift();
}

// ---------------------------------------------------------------------------------------------
// Fleet page: every agent, live from /v1/fleet/events. Agents are kept in a Map; rows are built
// lazily and cached per agent, and only rows of changed agents are rebuilt. Renders are
// coalesced with requestAnimationFrame so a burst of events costs one layout.

const FLEET_PAGE = 500;
const FLEET_COLUMNS = [
  { key: "jid", label: "Agent", value: (a) => a.jid },
  { key: "state", label: "State", value: (a) => a.state },
  { key: "slots", label: "Slots", value: (a) => a.slots },
  { key: "in_flight", label: "In flight", value: (a) => a.in_flight },
  { key: "load", label: "Load", value: (a) => a.load },
  { key: "loadavg", label: "Load avg", value: (a) => a.loadavg },
  { key: "mem", label: "Memory", value: (a) => a.mem_used },
  { key: "last_heard", label: "Last heard", value: (a) => -a.heard_at },
];

/** Drain and undrain are an operator's (docs/dispatcher.md): others would only meet a 403. */
function isOperator() {
  return Boolean(me && (me.tokens === false || (me.all_jobs && (me.capabilities || []).includes("*"))));
}

function fleetRow(agent) {
  const draining = agent.state === "draining";
  const action = !isOperator()
    ? "–"
    : draining
    ? el("button", { type: "button", class: "undrain", text: "Undrain" })
    : el("button", { type: "button", class: "drain", text: "Drain" });
  const mem = agent.mem_used === null || agent.mem_used === undefined
    ? "–"
    : `${fmtBytes(agent.mem_used)} / ${fmtBytes(agent.mem_total)}`;
  const attrs = Object.entries(agent.attrs || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  return el("tr", { "data-agent": agent.jid },
    el("td", { class: "jid", text: agent.jid }),
    el("td", { class: "state" }, badge(agent.state)),
    el("td", { class: "slots num", text: agent.slots }),
    el("td", { class: "in-flight num", text: agent.in_flight }),
    el("td", { class: "load num", text: fmtNum(agent.load, 2) }),
    el("td", { class: "loadavg num", text: fmtNum(agent.loadavg, 2) }),
    el("td", { class: "mem", text: mem }),
    el("td", { class: "last-heard", text: fmtAgo(Date.now() - agent.heard_at) }),
    // Actions before the long lists, so Drain is on screen without scrolling sideways.
    el("td", { class: "actions" }, action),
    el("td", { class: "caps", text: (agent.capabilities || []).join(", ") }),
    el("td", { class: "attrs", text: attrs || "–" }));
}

function compareBy(column, dir) {
  return (a, b) => {
    const va = column.value(a);
    const vb = column.value(b);
    // Missing values sort last whichever way the column is sorted.
    if (va === null || va === undefined) return vb === null || vb === undefined ? 0 : 1;
    if (vb === null || vb === undefined) return -1;
    // Plain comparison, not localeCompare: sorting 10,000 agents must stay in milliseconds.
    const c = va < vb ? -1 : va > vb ? 1 : 0;
    if (c) return c * dir;
    return a.jid < b.jid ? -1 : a.jid > b.jid ? 1 : 0;
  };
}

function pageFleet(params) {
  const token = pageToken;
  const fleet = {
    agents: new Map(),
    rows: new Map(),
    sort: { key: "jid", dir: 1 },
    limit: FLEET_PAGE,
    history: new Map(),
    caps: [],
    frame: 0,
    drawn: false,
  };
  const capSelect = el("select", { id: "fleet-capability" }, el("option", { value: "", text: "All capabilities" }));
  const filter = el("input", { id: "fleet-filter", type: "text", placeholder: "gpu, mem>=16", value: params.get("filter") || "", spellcheck: "false" });
  const filterError = el("p", { id: "fleet-filter-error", class: "field-error" });
  const status = el("p", { id: "fleet-status", class: "status", role: "status", text: "Connecting…" });
  const count = el("p", { id: "fleet-count", class: "count" });
  const tbody = el("tbody");
  const headRow = el("tr");
  const more = el("button", { type: "button", id: "fleet-more", hidden: true, text: "Show more" });
  const shown = el("span", { id: "fleet-shown", class: "muted" });
  const charts = el("div", { id: "fleet-charts", class: "charts" });
  const form = el("form", { id: "fleet-form", class: "filters" },
    el("div", { class: "field" }, el("label", { for: "fleet-capability", text: "Capability" }), capSelect),
    el("div", { class: "field grow" }, el("label", { for: "fleet-filter", text: "Attribute filter" }), filter, filterError),
    el("button", { type: "submit", text: "Apply" }));

  const scheduleRender = () => {
    if (!fleet.frame) fleet.frame = requestAnimationFrame(render);
  };
  onLeave(() => cancelAnimationFrame(fleet.frame));

  function render() {
    fleet.frame = 0;
    if (!stillOn(token)) return;
    const column = FLEET_COLUMNS.find((c) => c.key === fleet.sort.key);
    const sorted = Array.from(fleet.agents.values()).sort(compareBy(column, fleet.sort.dir));
    // A changed agent's row is rebuilt; if it held the keyboard focus (a Drain button), the
    // focus moves to the same place in the new row rather than back to the page's top.
    const focused = document.activeElement;
    const focusedRow = focused && tbody.contains(focused) ? focused.closest("tr").dataset.agent : null;
    const wanted = sorted.slice(0, fleet.limit).map((agent) => {
      let row = fleet.rows.get(agent.jid);
      if (!row) {
        row = fleetRow(agent);
        fleet.rows.set(agent.jid, row);
      }
      return row;
    });
    // Moving a row blurs it, so rows are only re-inserted when the order or a row changed.
    const current = tbody.rows;
    if (wanted.length !== current.length || wanted.some((row, i) => row !== current[i])) {
      tbody.replaceChildren(...wanted);
    }
    if (focusedRow && document.activeElement !== focused) {
      const again = fleet.rows.get(focusedRow);
      const target = again && again.isConnected ? $("button", again) : null;
      if (target) target.focus();
    }
    const n = fleet.agents.size;
    count.textContent = `${n} ${n === 1 ? "agent" : "agents"}`;
    count.dataset.count = String(n);
    more.hidden = n <= fleet.limit;
    shown.textContent = more.hidden ? "" : `${Math.min(n, fleet.limit)} of ${n} shown`;
    renderHeader();
    renderCharts();
    // A named mark, so a benchmark can read when the first view of the fleet was drawn.
    if (!fleet.drawn && n > 0) {
      fleet.drawn = true;
      performance.mark("spine-fleet-first-render");
    }
  }

  // The header is built once and only its sort marks change, so an update never steals the
  // keyboard focus from a sort button.
  headRow.append(...FLEET_COLUMNS.map((c) => el("th", { scope: "col" },
    el("button", { type: "button", class: "sort", "data-sort": c.key, text: c.label }))),
  ...["Actions", "Capabilities", "Attributes"].map((t) => el("th", { scope: "col", text: t })));

  function renderHeader() {
    for (const c of FLEET_COLUMNS) {
      const button = $(`button.sort[data-sort="${c.key}"]`, headRow);
      const active = c.key === fleet.sort.key;
      button.parentElement.setAttribute("aria-sort", active ? (fleet.sort.dir > 0 ? "ascending" : "descending") : "none");
      button.textContent = c.label + (active ? (fleet.sort.dir > 0 ? " ▲" : " ▼") : "");
    }
  }

  function renderCharts() {
    charts.replaceChildren(...fleet.caps.map((cap) => {
      const samples = fleet.history.get(cap.name) || [];
      return el("figure", { class: "chart", "data-capability": cap.name },
        sparkline(samples, cap.name),
        el("figcaption", {},
          el("strong", { text: cap.name }),
          ` ${cap.in_flight} / ${cap.slots} slots · ${cap.agents} ${cap.agents === 1 ? "agent" : "agents"} · ${cap.queued} queued`));
    }));
  }

  function updateCaps(event) {
    fleet.caps = event.capabilities || [];
    const at = Date.parse(event.at) || Date.now();
    for (const cap of fleet.caps) {
      if (!fleet.history.has(cap.name)) fleet.history.set(cap.name, []);
      pushSample(fleet.history.get(cap.name), { at_ms: at, in_flight: cap.in_flight, slots: cap.slots, queued: cap.queued });
    }
    // Keep the user's choice; add options for capabilities that appeared.
    const wanted = params.get("capability") || "";
    const names = fleet.caps.map((c) => c.name);
    if (wanted && !names.includes(wanted)) names.push(wanted);
    const have = Array.from(capSelect.options).map((o) => o.value).slice(1);
    if (names.join("\n") !== have.join("\n")) {
      capSelect.replaceChildren(el("option", { value: "", text: "All capabilities" }),
        ...names.map((n) => el("option", { value: n, text: n })));
    }
    capSelect.value = wanted;
  }

  // `last_heard_ms` is as of the event; turned into a local time so the cell can keep ageing
  // between events (an agent that is not in an update did not change, but did age).
  function upsert(agents) {
    const now = Date.now();
    for (const agent of agents) {
      agent.heard_at = now - (agent.last_heard_ms || 0);
      fleet.agents.set(agent.jid, agent);
      fleet.rows.delete(agent.jid);
    }
  }

  every(1000, () => {
    const now = Date.now();
    for (const row of tbody.rows) {
      const agent = fleet.agents.get(row.dataset.agent);
      if (agent) $("td.last-heard", row).textContent = fmtAgo(now - agent.heard_at);
    }
  });

  const handlers = {
    snapshot(data) {
      fleet.agents.clear();
      fleet.rows.clear();
      upsert(data.agents || []);
      updateCaps(data);
      scheduleRender();
    },
    update(data) {
      upsert(data.agents || []);
      for (const jid of data.gone || []) {
        fleet.agents.delete(jid);
        fleet.rows.delete(jid);
      }
      updateCaps(data);
      scheduleRender();
    },
  };

  const streamParams = { capability: params.get("capability"), filter: params.get("filter") };
  // A stream that never opened: ask the JSON twin why (a bad filter answers 400 with a
  // message before any stream starts); stop retrying when the request itself is wrong.
  const explain = async () => {
    try {
      await api("GET", `/v1/fleet${query(streamParams)}`);
      return false;
    } catch (err) {
      if (err.status === 400) {
        filterError.textContent = err.message;
        filter.setAttribute("aria-invalid", "true");
        filter.setAttribute("aria-describedby", "fleet-filter-error");
        return true;
      }
      return err.status === 401 || err.status === 403;
    }
  };
  liveStream(`/v1/fleet/events${query(streamParams)}`, handlers, status, explain);

  // Seed the charts with the server's last ten minutes so they are not empty at first.
  api("GET", "/v1/capabilities").then((data) => {
    if (!stillOn(token)) return;
    for (const cap of data.capabilities || []) {
      const list = (cap.samples || []).slice();
      for (const s of fleet.history.get(cap.name) || []) if (!list.length || s.at_ms > list[list.length - 1].at_ms) list.push(s);
      fleet.history.set(cap.name, list);
    }
    if (!fleet.caps.length) fleet.caps = (data.capabilities || []).map((c) => ({ name: c.name, agents: c.agents, slots: c.slots, in_flight: c.in_flight, queued: c.queued }));
    renderCharts();
  }).catch(report);

  // Applying the filters changes the route's query, which reconnects the stream with them.
  const apply = () => {
    const next = `#/fleet${query({ capability: capSelect.value, filter: filter.value.trim() })}`;
    if (next !== location.hash && !(next === "#/fleet" && location.hash === "")) location.hash = next;
  };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    apply();
  });
  capSelect.addEventListener("change", apply);
  filter.addEventListener("change", apply);
  headRow.addEventListener("click", (ev) => {
    const button = ev.target.closest("button.sort");
    if (!button) return;
    const key = button.dataset.sort;
    fleet.sort = { key, dir: fleet.sort.key === key ? -fleet.sort.dir : 1 };
    render();
  });
  more.addEventListener("click", () => {
    fleet.limit += FLEET_PAGE;
    render();
  });
  tbody.addEventListener("click", (ev) => {
    const button = ev.target.closest("button.drain, button.undrain");
    if (button) drainAgent(button, fleet, scheduleRender);
  });

  renderHeader();
  return [
    el("div", { class: "page-head" }, el("h1", { text: "Fleet" }), status),
    form,
    el("section", { "aria-labelledby": "charts-title" }, el("h2", { id: "charts-title", text: "In flight against slots, per capability" }), charts),
    el("section", { "aria-labelledby": "agents-title" },
      el("div", { class: "section-head" }, el("h2", { id: "agents-title", text: "Agents" }), count),
      tableWrap(el("table", { id: "fleet-table", class: "data" }, el("thead", {}, headRow), tbody)),
      el("div", { class: "pager" }, more, shown)),
  ];
}

/** Drains or undrains an agent, and redraws its row with the state the answer gives. */
async function drainAgent(button, fleet, scheduleRender) {
  const jid = button.closest("tr").dataset.agent;
  const action = button.classList.contains("drain") ? "drain" : "undrain";
  // Not `disabled`: a disabled button drops the keyboard focus, which the new row then could
  // not take back. A busy mark ignores a second click instead.
  if (button.getAttribute("aria-busy") === "true") return;
  button.setAttribute("aria-busy", "true");
  try {
    const agent = await api("POST", `/v1/agents/${encodeURIComponent(jid)}/${action}`, {});
    showAlert("");
    // The answer is the agent as GET /v1/agents shows it (attributes shared by its
    // capabilities, not the fleet's shape): take only its new state; the stream brings the rest.
    const known = fleet.agents.get(jid);
    if (agent && agent.state && known) {
      fleet.agents.set(jid, { ...known, state: agent.state });
      fleet.rows.delete(jid);
      scheduleRender();
    }
  } catch (err) {
    report(err);
  } finally {
    button.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------------------------
// Capabilities page: the server's per-capability statistics, refreshed every 2 s.

function capRow(cap) {
  const lat = (k) => (cap.latency_ms ? fmtNum(cap.latency_ms[k], 1) : "–");
  return el("tr", { "data-capability": cap.name },
    el("td", { class: "name", text: cap.name }),
    el("td", { class: "agents num", text: cap.agents }),
    el("td", { class: "slots num", text: cap.slots }),
    el("td", { class: "in-flight num", text: cap.in_flight }),
    el("td", { class: "queued num", text: cap.queued }),
    el("td", { class: "per-minute num", text: cap.per_minute }),
    el("td", { class: "succeeded num", text: cap.succeeded }),
    el("td", { class: "failed num", text: cap.failed }),
    el("td", { class: "retried num", text: cap.retried }),
    el("td", { class: "p50 num", text: lat("p50") }),
    el("td", { class: "p95 num", text: lat("p95") }),
    el("td", { class: "p99 num", text: lat("p99") }),
    el("td", { class: "chart" }, sparkline(cap.samples || [], cap.name)));
}

function pageCapabilities() {
  const token = pageToken;
  const heads = ["Capability", "Agents", "Slots", "In flight", "Queued", "Per minute", "Succeeded",
    "Failed", "Retried", "p50 ms", "p95 ms", "p99 ms", "In flight / slots"];
  const tbody = el("tbody");
  const note = el("p", { class: "muted", id: "capabilities-window" });
  // No role="status" here: a screen reader would announce the refresh every 2 s.
  const status = el("p", { class: "status", text: "Loading…" });
  refreshEvery(2000, status, async () => {
    const data = await api("GET", "/v1/capabilities");
    if (!stillOn(token)) return false;
    const caps = data.capabilities || [];
    tbody.replaceChildren(...caps.map(capRow));
    if (!caps.length) tbody.append(el("tr", {}, el("td", { colspan: heads.length, class: "empty", text: "No capabilities you may run." })));
    const win = caps.length ? caps[0].window_s : 300;
    note.textContent = `Counts, throughput and latency (acceptance to end of succeeded jobs) over the last ${Math.round(win / 60)} min; refreshed every 2 s.`;
    return true;
  });
  return [
    el("div", { class: "page-head" }, el("h1", { text: "Capabilities" }), status),
    note,
    tableWrap(el("table", { id: "capabilities-table", class: "data" },
      el("thead", {}, el("tr", {}, heads.map((h) => el("th", { scope: "col", text: h })))), tbody)),
  ];
}

// ---------------------------------------------------------------------------------------------
// Jobs list: filters live in the route's query (so Back and links work); cursor paging keeps
// a stack of `before` cursors; the job event stream updates the visible rows' states.

const JOB_STATES = ["accepted", "queued", "dispatched", "running", "succeeded", "failed", "timed-out", "cancelled"];
const JOB_FILTERS = ["state", "capability", "submitter", "agent", "since", "until"];

function jobRow(job) {
  return el("tr", { "data-job": job.id },
    el("td", { class: "id" }, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.id })),
    el("td", { class: "state" }, jobState(job.state, job.percent)),
    el("td", { class: "capability", text: job.capability }),
    el("td", { class: "agent", text: job.agent || "–" }),
    el("td", { class: "submitter", text: job.submitter }),
    el("td", { class: "accepted" }, timeEl(job.accepted_at)),
    el("td", { class: "attempts num", text: job.attempts }));
}

function jobState(state, percent) {
  const showPercent = state === "running" && percent !== null && percent !== undefined;
  return [badge(state), showPercent ? el("span", { class: "percent", text: ` ${percent}%` }) : null];
}

/** datetime-local holds local time without a zone; the API wants RFC 3339 UTC. */
function localToUtc(value) {
  if (!value) return "";
  const d = new Date(value);
  return isNaN(d) ? "" : d.toISOString();
}

function utcToLocal(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function jobsFilterForm(params) {
  const input = (name, label, type) => el("div", { class: "field" },
    el("label", { for: `jobs-${name}`, text: label }),
    el("input", { id: `jobs-${name}`, name, type: type || "text",
      value: type === "datetime-local" ? utcToLocal(params.get(name)) : params.get(name) || "" }));
  const state = el("select", { id: "jobs-state", name: "state" }, el("option", { value: "", text: "Any state" }),
    JOB_STATES.map((s) => el("option", { value: s, text: s })));
  state.value = params.get("state") || "";
  const form = el("form", { id: "jobs-filter", class: "filters" },
    el("div", { class: "field" }, el("label", { for: "jobs-state", text: "State" }), state),
    input("capability", "Capability"), input("submitter", "Submitter"), input("agent", "Agent"),
    input("since", "Accepted after", "datetime-local"), input("until", "Accepted before", "datetime-local"),
    el("button", { type: "submit", text: "Filter" }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const values = {};
    for (const name of JOB_FILTERS) {
      const field = form.elements.namedItem(name);
      values[name] = field.type === "datetime-local" ? localToUtc(field.value) : field.value.trim();
    }
    location.hash = `#/jobs${query(values)}`;
  });
  return form;
}

function pageJobs(params) {
  const token = pageToken;
  const filters = {};
  for (const name of JOB_FILTERS) filters[name] = params.get(name);
  const cursors = [null]; // cursors[i] is the `before` of page i; the last is the current page.
  const rows = new Map();
  const tbody = el("tbody");
  const status = el("p", { class: "status", role: "status", text: "Loading…" });
  const prev = el("button", { type: "button", id: "jobs-prev", text: "Newer", disabled: true });
  const next = el("button", { type: "button", id: "jobs-next", text: "Older", disabled: true });
  const refresh = el("button", { type: "button", id: "jobs-refresh", text: "Refresh" });
  const pageNo = el("span", { class: "muted", id: "jobs-page" });
  let nextCursor = null;

  const load = async () => {
    const before = cursors[cursors.length - 1];
    try {
      const data = await api("GET", `/v1/jobs${query({ ...filters, before, limit: 50 })}`);
      if (!stillOn(token)) return;
      const jobs = data.jobs || [];
      rows.clear();
      const frag = document.createDocumentFragment();
      for (const job of jobs) {
        const row = jobRow(job);
        rows.set(job.id, row);
        frag.append(row);
      }
      if (!jobs.length) frag.append(el("tr", {}, el("td", { colspan: 7, class: "empty", text: "No jobs match." })));
      tbody.replaceChildren(frag);
      nextCursor = data.next || null;
      next.disabled = !nextCursor;
      prev.disabled = cursors.length <= 1;
      pageNo.textContent = `Page ${cursors.length}`;
      showAlert("");
    } catch (err) {
      report(err);
    }
  };
  next.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    load();
  });
  prev.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    load();
  });
  refresh.addEventListener("click", load);
  // New jobs appear on their own only on the first page; older pages stay put while read.
  every(5000, () => {
    if (cursors.length === 1) load();
  });
  const updateRow = (id, state, percent) => {
    const row = rows.get(id);
    if (!row) return;
    $("td.state", row).replaceChildren(...jobState(state, percent).filter(Boolean));
  };
  liveStream("/v1/jobs/events", {
    progress: (d) => updateRow(d.job, "running", d.percent),
    // The stream fell behind and skipped events: re-read the page rather than show stale rows.
    lagged: load,
    final: (job) => {
      const row = rows.get(job.id);
      if (!row) return;
      const fresh = jobRow(job);
      row.replaceWith(fresh);
      rows.set(job.id, fresh);
    },
  }, status);
  load();
  return [
    el("div", { class: "page-head" }, el("h1", { text: "Jobs" }), status),
    jobsFilterForm(params),
    tableWrap(el("table", { id: "jobs-table", class: "data" },
      el("thead", {}, el("tr", {}, ["Job", "State", "Capability", "Agent", "Submitter", "Accepted", "Attempts"]
        .map((h) => el("th", { scope: "col", text: h })))), tbody)),
    el("div", { class: "pager" }, prev, pageNo, next, refresh),
  ];
}

// ---------------------------------------------------------------------------------------------
// A job's page: everything about one job, live from /v1/jobs/{id}/events. Events only say that
// something happened; the page re-reads the job (and its tree) so it shows one consistent view.

function pageJob(id) {
  const token = pageToken;
  const base = `/v1/jobs/${encodeURIComponent(id)}`;
  const body = el("div", { id: "job-body" }, el("p", { class: "muted", text: "Loading…" }));
  const status = el("p", { class: "status", role: "status", text: "Connecting…" });
  const state = { job: null, partials: 0, loading: false, again: false, timer: null };

  const load = async () => {
    // One read at a time; an event during a read asks for one more read after it.
    if (state.loading) {
      state.again = true;
      return;
    }
    state.loading = true;
    try {
      const job = await api("GET", base);
      if (!stillOn(token)) return;
      state.job = job;
      body.replaceChildren(...renderJob(job, state));
      if (FINAL_STATES.has(job.state)) finish();
      if (job.mapreduce || (job.children && job.children.length)) loadTree(base, token);
    } catch (err) {
      // Say why in the page too, not only in the alert line above it.
      const why = err.status === 404 ? `There is no job ${id}.`
        : err.status === 403 ? "This job is not yours to see." : "The job could not be read.";
      if (err.status !== 401) body.replaceChildren(el("p", { text: why }));
      report(err);
    } finally {
      state.loading = false;
      if (state.again) {
        state.again = false;
        load();
      }
    }
  };
  // A job we may not see (or that does not exist) will not stream either: stop, do not retry.
  const explain = async () => {
    try {
      await api("GET", base);
      return false;
    } catch (err) {
      return [401, 403, 404].includes(err.status);
    }
  };
  // A finished job has nothing more to say: its stream is closed rather than reopened.
  const finish = () => {
    stopStream();
    status.textContent = "Finished";
    status.className = "status";
  };
  const stopStream = liveStream(`${base}/events`, {
    state: load,
    final: load,
    progress: (d) => {
      const percent = $("#job-percent");
      if (percent && d.percent !== undefined) percent.textContent = `${d.percent}%`;
    },
    partial: () => {
      state.partials += 1;
      const p = $("#job-partials");
      if (p) p.textContent = `${state.partials} partial result${state.partials === 1 ? "" : "s"} received`;
    },
  }, status, explain);
  // The tree of a running map/reduce job moves without events on the parent: poll it.
  every(1000, () => {
    const job = state.job;
    if (job && !FINAL_STATES.has(job.state) && (job.mapreduce || (job.children && job.children.length))) loadTree(base, token);
  });
  load();
  return [el("div", { class: "page-head" }, el("h1", { text: id }), status), body];
}

function renderJob(job, state) {
  const fields = el("dl", { class: "facts" },
    fact("State", el("span", { id: "job-state", class: `badge state-${job.state}`, text: job.state })),
    fact("Progress", el("span", {}, el("span", { id: "job-percent", text: job.percent === null || job.percent === undefined ? "–" : `${job.percent}%` }),
      " ", el("span", { id: "job-partials", class: "muted" }))),
    fact("Capability", el("span", { id: "job-capability", text: job.capability })),
    fact("Agent", job.agent || "–"),
    fact("Attempts", String(job.attempts)),
    fact("Submitter", job.submitter),
    fact("Priority", String(job.priority)),
    fact("Accepted", timeEl(job.accepted_at)),
    fact("Updated", timeEl(job.updated_at)),
    job.ended_at ? fact("Ended", timeEl(job.ended_at)) : null,
    job.not_before ? fact("Not before", timeEl(job.not_before)) : null,
    job.parent ? fact("Parent", el("a", { href: `#/jobs/${encodeURIComponent(job.parent)}`, text: job.parent })) : null);
  if (state.partials) $("#job-partials", fields).textContent = `${state.partials} partial results received`;
  const input = job.input
    ? `${fmtBytes(job.input.size)}${job.input.mime ? `, ${job.input.mime}` : ""}`
    : "No input";
  const tree = job.mapreduce || (job.children && job.children.length)
    ? el("section", { class: "wide" }, el("h2", { text: "Steps" }),
      el("div", { id: "tree", class: "tree" }, el("p", { class: "muted", text: "Loading…" })))
    : null;
  // Facts beside the timeline, then the tree across both, then output beside arguments/input.
  return [
    jobActions(job),
    el("div", { class: "job-grid" },
      el("section", {}, fields,
        job.error ? el("div", { id: "job-error", class: "error-box" },
          el("strong", { text: job.error.condition }), job.error.message ? `: ${job.error.message}` : "",
          job.error.field ? ` (field ${job.error.field})` : "") : null),
      el("section", {}, el("h2", { text: "Timeline" }), timeline(job.history || [])),
      tree,
      el("section", {}, el("h2", { text: "Output" }), jobOutput(job)),
      el("section", {},
        el("h2", { text: "Input" }), el("p", { id: "job-input", text: input }),
        el("h2", { text: "Arguments" }), el("pre", { id: "job-args", text: JSON.stringify(job.args || {}, null, 2) })))];
}

function fact(label, value) {
  return [el("dt", { text: label }), el("dd", {}, value)];
}

function jobOutput(job) {
  const result = job.result;
  const box = el("div", { id: "job-output" });
  if (!result) {
    box.append(el("p", { class: "muted", text: FINAL_STATES.has(job.state) ? "No output" : "Not finished yet" }));
    return box;
  }
  const url = `/v1/jobs/${encodeURIComponent(job.id)}/output`;
  // The dispatcher names the type `type` in a result (the contract said `mime`): read either.
  const mime = result.mime || result.type || "application/octet-stream";
  box.append(el("p", { text: `${fmtBytes(result.output_size)}, ${mime}` }));
  if (result.output_size === 0) return box;
  if (result.output_kept_by) {
    box.append(el("p", { class: "muted", text: `Kept by the agent ${result.output_kept_by} for the next step.` }));
    return box;
  }
  if (mime.startsWith("image/")) {
    box.append(el("img", { id: "output-image", src: url, alt: `Output of job ${job.id}` }));
  }
  box.append(el("a", { id: mime.startsWith("image/") ? "output-open" : "output-download", href: url, download: `${job.id}.out`,
    text: mime.startsWith("image/") ? "Download image" : "Download output" }));
  return box;
}

function timeline(history) {
  return el("ol", { id: "timeline", class: "timeline" }, history.map((h) => el("li", { "data-state": h.state },
    timeEl(h.at), " ", badge(h.state),
    h.attempt ? el("span", { class: "attempt", text: ` attempt ${h.attempt}` }) : null,
    h.agent ? el("span", { class: "agent", text: ` on ${h.agent}` }) : null,
    h.note ? el("span", { class: "note", text: ` — ${h.note}` }) : null)));
}

function jobActions(job) {
  const box = el("div", { class: "actions-bar" });
  if (!FINAL_STATES.has(job.state)) {
    box.append(el("button", { type: "button", id: "cancel", class: "danger", text: "Cancel job", onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await api("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`);
        showAlert("");
      } catch (err) {
        report(err);
        ev.target.disabled = false;
      }
    } }));
  }
  if (RETRYABLE_STATES.has(job.state)) {
    box.append(el("button", { type: "button", id: "retry", text: "Retry", onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        const answer = await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/retry`, {});
        showAlert("");
        location.hash = `#/jobs/${encodeURIComponent(answer.id)}`;
      } catch (err) {
        report(err);
        ev.target.disabled = false;
      }
    } }));
  }
  return box;
}

/** Redraws the map/reduce (or `all`) tree: one row per level, one box per step. */
async function loadTree(base, token) {
  try {
    const tree = await api("GET", `${base}/tree`);
    const box = $("#tree");
    if (!stillOn(token) || !box) return;
    box.replaceChildren(...(tree.levels || []).map((level) => el("div", { class: "level", "data-kind": level.kind },
      el("h3", { text: `${level.kind} (level ${level.level})` }),
      el("div", { class: "steps" }, level.steps.flatMap((step) => step.jobs.map((j) => treeStep(tree.id, step, j)))))));
  } catch (err) {
    if (err.status !== 404) report(err);
  }
}

/** A step's label: its fragment's name (a map step), else its id without the parent's. */
function stepLabel(parent, step, job) {
  if (step.name) return step.name;
  return job.id.startsWith(`${parent}.`) ? job.id.slice(parent.length + 1) : job.id;
}

function treeStep(parent, step, job) {
  const classes = ["step", `state-${job.state}`];
  if (job.speculative) classes.push("speculative");
  if (job.straggler) classes.push("straggler");
  // "Winner" only means something when copies raced for the step.
  const winner = step.jobs.length > 1 && step.winner === job.id;
  if (winner) classes.push("winner");
  const marks = [job.speculative ? "speculative copy" : null, job.straggler ? "straggler" : null,
    winner ? "winner" : null].filter(Boolean).join(", ");
  return el("div", { class: classes.join(" "), "data-job": job.id, "data-state": job.state },
    el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: stepLabel(parent, step, job) }),
    el("span", { class: "step-state", text: job.state + (job.percent !== null && job.percent !== undefined && job.state === "running" ? ` ${job.percent}%` : "") }),
    job.agent ? el("span", { class: "step-agent", text: job.agent }) : null,
    marks ? el("span", { class: "step-marks", text: marks }) : null);
}

// ---------------------------------------------------------------------------------------------
// Submit page: a JSON submission, or a raw upload when a file is chosen (the file is the input).

const SUBMIT_FIELDS = { capability: "submit-capability", args: "submit-args", priority: "submit-priority", input: "submit-file" };

function pageSubmit() {
  const token = pageToken;
  const errorFor = (id) => el("p", { id: `${id}-error`, class: "field-error" });
  const capability = el("select", { id: "submit-capability", name: "capability", required: true });
  const args = el("textarea", { id: "submit-args", name: "args", rows: 6, spellcheck: "false", text: "{}" });
  const file = el("input", { id: "submit-file", name: "file", type: "file" });
  const priority = el("input", { id: "submit-priority", name: "priority", type: "number", step: 1, value: 0 });
  const submit = el("button", { type: "submit", id: "submit", text: "Submit job" });
  const field = (input, label, hint) => el("div", { class: "field" },
    el("label", { for: input.id, text: label }), input, hint ? el("p", { class: "hint", text: hint }) : null, errorFor(input.id));
  const form = el("form", { id: "submit-form", class: "stack", novalidate: true },
    field(capability, "Capability"),
    field(args, "Arguments (JSON object)"),
    field(file, "Input file (optional)", "Sent as the job's input, with its type as Content-Type."),
    field(priority, "Priority", "Higher runs first."),
    submit);

  api("GET", "/v1/capabilities").then((data) => {
    if (!stillOn(token)) return;
    capability.replaceChildren(...(data.capabilities || []).map((c) => el("option", { value: c.name, text: c.name })));
  }).catch(report);

  const clearErrors = () => {
    for (const id of Object.values(SUBMIT_FIELDS)) {
      $(`#${id}-error`, form).textContent = "";
      const input = $(`#${id}`, form);
      input.removeAttribute("aria-invalid");
      input.removeAttribute("aria-describedby");
    }
  };
  const fieldError = (name, message) => {
    const id = SUBMIT_FIELDS[name];
    if (!id) return showAlert(message);
    $(`#${id}-error`, form).textContent = message;
    const input = $(`#${id}`, form);
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", `${id}-error`);
    input.focus();
  };

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    showAlert("");
    let parsed;
    try {
      parsed = JSON.parse(args.value || "{}");
    } catch (e) {
      return fieldError("args", `Arguments are not valid JSON: ${e.message}`);
    }
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
      return fieldError("args", "Arguments must be a JSON object, like {\"width\": 128}.");
    }
    const prio = Number(priority.value || 0);
    if (!Number.isInteger(prio)) return fieldError("priority", "Priority must be a whole number.");
    submit.disabled = true;
    try {
      const chosen = file.files && file.files[0];
      const answer = chosen
        ? await api("POST", `/v1/jobs${query({ capability: capability.value, args: JSON.stringify(parsed), priority: prio })}`, chosen)
        : await api("POST", "/v1/jobs", { capability: capability.value, args: parsed, priority: prio });
      location.hash = `#/jobs/${encodeURIComponent(answer.id)}`;
    } catch (err) {
      if (err.status === 401) return;
      if (err.field && SUBMIT_FIELDS[err.field.split(".")[0]]) fieldError(err.field.split(".")[0], err.message);
      else report(err);
    } finally {
      submit.disabled = false;
    }
  });
  return [el("h1", { text: "Submit a job" }), form];
}

// ---------------------------------------------------------------------------------------------
// Login page: a plain form POST, so the token goes straight into an HttpOnly cookie and never
// lives in JavaScript.

function pageLogin(params) {
  const errors = {
    "unknown-token": "That token is not known to this dispatcher. Check it and try again.",
    "bad-form": "The sign-in form arrived incomplete. Enter the token and sign in again.",
  };
  const error = params.get("error");
  const message = error ? errors[error] || `Sign-in failed (${error}).` : null;
  const input = el("input", { id: "token", name: "token", type: "password", autocomplete: "current-password", required: true,
    "aria-describedby": message ? "token-error" : null, "aria-invalid": message ? "true" : null });
  const local = me && me.tokens === false;
  return [
    el("h1", { text: "Sign in" }),
    local ? el("p", { class: "notice", text: "This dispatcher has no tokens: on loopback you are the local operator and need not sign in." }) : null,
    el("form", { method: "post", action: "/ui/login", class: "stack login" },
      el("div", { class: "field" },
        el("label", { for: "token", text: "API token" }), input,
        el("p", { id: "token-error", class: "field-error", text: message || "" }),
        el("p", { class: "hint", text: "The token a client would send as Authorization: Bearer. It is kept in an HttpOnly cookie." })),
      el("button", { type: "submit", id: "login", text: "Sign in" })),
  ];
}

// ---------------------------------------------------------------------------------------------
// Who is signed in, and the header that shows it.

let me = null;

async function loadWhoami() {
  try {
    me = await api("GET", "/v1/whoami");
  } catch (err) {
    me = null;
    if (err.status !== 401) report(err);
  }
  $("#whoami").textContent = me ? me.name : "";
  $("#logout-form").hidden = !(me && me.tokens);
}

// ---------------------------------------------------------------------------------------------
// Events page: the rules (where each came from, what it takes, its counters and dead letters),
// the schedules and the canaries with their quarantines, refreshed every 2 s from
// GET /v1/rules and GET /v1/canaries; and the event stream live (GET /v1/events/stream): the
// last 50 jobs' ends and rules' firings, newest first.

const FEED_MAX = 50;

function ruleRow(rule) {
  const on = rule.on || {};
  const pick = [on.type, on.source && `source ${on.source}`, on.subject && `subject ${on.subject}`]
    .filter(Boolean).join(", ");
  const c = rule.counts || {};
  const dead = el("a", { href: `#/jobs?submitter=${encodeURIComponent(`rule:${rule.name}`)}&state=failed`, text: c.dead_letters ?? 0 });
  return el("tr", { "data-rule": rule.name },
    el("td", { class: "name", text: rule.name }),
    el("td", { class: "origin", text: rule.origin === "api" ? "API" : "configuration" }),
    el("td", { class: "on", text: pick }),
    el("td", { class: "when", text: rule.when || "–" }),
    el("td", { class: "do", text: (rule.do && rule.do.capability) || "–" }),
    el("td", { class: "matched num", text: c.matched ?? 0 }),
    el("td", { class: "jobs num", text: c.jobs ?? 0 }),
    el("td", { class: "duplicates num", text: c.duplicates ?? 0 }),
    el("td", { class: "errors num", text: c.errors ?? 0 }),
    el("td", { class: "dead-letters num" }, dead));
}

function scheduleRow(s) {
  const c = s.counts || {};
  return el("tr", { "data-schedule": s.name },
    el("td", { class: "name", text: s.name }),
    el("td", { class: "cron", text: `${s.cron} (${s.timezone || "UTC"})` }),
    el("td", { class: "next" }, timeEl(s.next_tick)),
    el("td", { class: "last" }, timeEl(s.last_tick)),
    el("td", { class: "fired num", text: c.ticks ?? 0 }),
    el("td", { class: "missed num", text: c.missed ?? 0 }));
}

function canaryRow(c) {
  const last = c.last_ok === true ? "passed" : c.last_ok === false ? "failed" : "not yet";
  const health = c.quarantined ? "quarantined" : c.last_ok === false ? "failing" : "ok";
  const state = { quarantined: "failed", failing: "draining", ok: "succeeded" }[health];
  return el("tr", { "data-canary": `${c.capability} ${c.agent}` },
    el("td", { class: "capability", text: c.capability }),
    el("td", { class: "agent", text: c.agent }),
    el("td", { class: "health" }, el("span", { class: `badge state-${state}`, text: health })),
    el("td", { class: "last", text: last }),
    el("td", { class: "failures num", text: c.failures ?? 0 }),
    el("td", { class: "passed num", text: c.passed ?? 0 }),
    el("td", { class: "failed num", text: c.failed ?? 0 }),
    el("td", { class: "last-success" }, c.last_success_ms ? timeEl(new Date(c.last_success_ms).toISOString()) : timeEl(null)),
    el("td", { class: "last-error", text: c.last_error || "–" }));
}

/** One CloudEvent of the stream, as a line: its time, type, subject, and the job it names. */
function feedItem(ce) {
  const data = ce.data || {};
  const job = ce.type === "spine.rule.fired" ? data.job : data.id;
  return el("li", { "data-type": ce.type },
    timeEl(ce.time || new Date().toISOString()), " ",
    el("span", { class: "type", text: ce.type }), " ",
    el("span", { class: "subject", text: ce.subject || "" }), " ",
    job ? el("a", { href: `#/jobs/${encodeURIComponent(job)}`, text: job }) : null);
}

function dataTable(id, heads, tbody) {
  return tableWrap(el("table", { id, class: "data" },
    el("thead", {}, el("tr", {}, heads.map((h) => el("th", { scope: "col", text: h })))), tbody));
}

function pageEvents() {
  const token = pageToken;
  const ruleHeads = ["Rule", "Origin", "On", "When", "Job", "Matched", "Jobs", "Duplicates", "Errors", "Dead letters"];
  const schedHeads = ["Schedule", "Cron", "Next tick", "Last tick", "Fired", "Missed"];
  const canHeads = ["Capability", "Agent", "Health", "Last canary", "Failures in a row", "Passed", "Failed", "Last success", "Last error"];
  const rulesBody = el("tbody");
  const schedBody = el("tbody");
  const canBody = el("tbody");
  const status = el("p", { class: "status", text: "Loading…" });
  const feedStatus = el("p", { class: "status", text: "Connecting…" });
  const feed = el("ol", { id: "event-feed", class: "event-feed", reversed: true });
  const empty = (tbody, n, text) => tbody.replaceChildren(el("tr", {}, el("td", { colspan: n, class: "empty", text })));
  refreshEvery(2000, status, async () => {
    const [rules, canaries] = await Promise.all([
      api("GET", "/v1/rules").catch((err) => (err.status === 403 ? null : Promise.reject(err))),
      api("GET", "/v1/canaries").catch((err) => (err.status === 403 ? null : Promise.reject(err))),
    ]);
    if (!stillOn(token)) return false;
    if (!rules) {
      empty(rulesBody, ruleHeads.length, "Only an operator (a token with all_jobs) sees the rules.");
      empty(schedBody, schedHeads.length, "Only an operator sees the schedules.");
    } else {
      rulesBody.replaceChildren(...rules.rules.map(ruleRow));
      if (!rules.rules.length) empty(rulesBody, ruleHeads.length, "No rules: [[rule]] in the configuration, or PUT /v1/rules/{name}.");
      schedBody.replaceChildren(...rules.schedules.map(scheduleRow));
      if (!rules.schedules.length) empty(schedBody, schedHeads.length, "No schedules.");
    }
    if (!canaries) {
      empty(canBody, canHeads.length, "Only an operator sees the canaries.");
    } else {
      const list = canaries.canaries || [];
      canBody.replaceChildren(...list.map(canaryRow));
      if (!list.length) empty(canBody, canHeads.length, "No canaries: [[canary]] in the configuration.");
    }
    return true;
  });
  liveStream("/v1/events/stream", {
    message: (ce) => {
      feed.prepend(feedItem(ce));
      while (feed.children.length > FEED_MAX) feed.lastChild.remove();
    },
  }, feedStatus);
  return [
    el("div", { class: "page-head" }, el("h1", { text: "Events" }), status),
    el("h2", { text: "Rules" }),
    dataTable("rules-table", ruleHeads, rulesBody),
    el("h2", { text: "Schedules" }),
    dataTable("schedules-table", schedHeads, schedBody),
    el("h2", { text: "Canaries" }),
    dataTable("canaries-table", canHeads, canBody),
    el("div", { class: "page-head" }, el("h2", { text: "Live: jobs' ends and rules' firings" }), feedStatus),
    feed,
  ];
}

// ---------------------------------------------------------------------------------------------
// Router.

const PAGES = {
  fleet: (rest, params) => pageFleet(params),
  capabilities: () => pageCapabilities(),
  jobs: (rest, params) => (rest ? pageJob(rest) : pageJobs(params)),
  submit: () => pageSubmit(),
  events: () => pageEvents(),
  login: (rest, params) => pageLogin(params),
};

function parseHash() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(2) : "fleet";
  const [path, search] = hash.split("?");
  const [name, ...rest] = path.split("/");
  let id = rest.join("/");
  try {
    id = decodeURIComponent(id);
  } catch (e) {
    // A malformed escape: keep the raw text; the API will say the job does not exist.
  }
  return { name: name || "fleet", rest: id, params: new URLSearchParams(search || "") };
}

function route() {
  const { name, rest, params } = parseHash();
  const page = PAGES[name] || PAGES.fleet;
  leavePage();
  showAlert("");
  // Signed out (or never signed in) with tokens configured: everything but login needs it.
  if (!me && name !== "login") {
    location.hash = "#/login";
    return;
  }
  for (const link of document.querySelectorAll("nav a[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const main = $("#main");
  main.replaceChildren(...[page(rest, params)].flat(3).filter(Boolean));
  document.title = `${name.charAt(0).toUpperCase()}${name.slice(1)} · Spine console`;
}

async function start() {
  // The skip link must not change the hash: that would be read as a route.
  $("#skip").addEventListener("click", (ev) => {
    ev.preventDefault();
    $("#main").focus();
  });
  await loadWhoami();
  let lastHash = null;
  window.addEventListener("hashchange", async () => {
    if (location.hash === lastHash) return;
    lastHash = location.hash;
    // Leaving the login page after signing in elsewhere, or a 401: refresh who we are.
    if (!me && !location.hash.startsWith("#/login")) await loadWhoami();
    route();
  });
  lastHash = location.hash;
  route();
}

document.addEventListener("DOMContentLoaded", start);
