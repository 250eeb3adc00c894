// The thingport console: a page of the worker's REST API (docs/API.md), with the API key kept in this tab's
// sessionStorage and sent as x-api-key. No data is in the page itself; everything comes from /v1.
"use strict";

const PAGE = 50;
let key = sessionStorage.getItem("thingport-key");
let role = null;
// the view's timers and streams, stopped when the view changes
let cleanup = [];
// which view is current: a view that finishes loading after another was asked for draws nothing
let generation = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
}

// Thrown by a view's steps once another view was asked for: the stale view stops there.
class Stale extends Error {}

// Throws if the view numbered `mine` is no longer the current one.
function still(mine) {
  if (mine !== generation) throw new Stale();
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ "x-api-key": key }, options.headers || {});
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    signal: options.signal,
  });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    if (response.status === 401) logout();
    throw new ApiError(response.status, (body && body.error) || response.statusText);
  }
  return body;
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}

function time(ms) {
  return new Date(ms).toISOString().replace("T", " ").slice(0, 23);
}

function json(value) {
  return JSON.stringify(value);
}

// Marks the view as drawn, with the time since the page's navigation began (the browser test reads it).
function rendered() {
  document.body.dataset.rendered = performance.now().toFixed(1);
}

function every(ms, f) {
  const timer = setInterval(f, ms);
  cleanup.push(() => clearInterval(timer));
}

// Server-Sent Events read with fetch (EventSource cannot send x-api-key), reconnecting with Last-Event-ID.
function stream(path, onEvent) {
  const abort = new AbortController();
  cleanup.push(() => abort.abort());
  let lastId = null;
  (async () => {
    while (!abort.signal.aborted) {
      try {
        const headers = { "x-api-key": key };
        if (lastId) headers["last-event-id"] = lastId;
        const response = await fetch(path, { headers, signal: abort.signal });
        if (response.status >= 400 && response.status < 500) {
          // refused (the key, the thing): asking again would be refused again
          onEvent("refused", { status: response.status });
          return;
        }
        if (!response.ok) throw new Error("stream answered " + response.status);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let type = "message", data = "";
            for (const line of block.split("\n")) {
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "event") type = text;
              else if (field === "data") data += text;
              else if (field === "id") lastId = text;
            }
            if (data) onEvent(type, JSON.parse(data));
          }
        }
      } catch (_) {
        if (abort.signal.aborted) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  })();
}

function logout() {
  sessionStorage.removeItem("thingport-key");
  key = null;
  role = null;
  location.hash = "#/login";
  route();
}

function loginView(message) {
  document.getElementById("nav").hidden = true;
  const input = el("input", { id: "key", type: "password", placeholder: "API key", autocomplete: "off", required: true });
  const error = el("p", { id: "login-error", class: "error" }, message || "");
  const form = el("form", { id: "login", class: "login", onsubmit: async (e) => {
    e.preventDefault();
    key = input.value.trim();
    try {
      const who = await api("/v1/key");
      sessionStorage.setItem("thingport-key", key);
      role = who.role;
      location.hash = "#/pool";
    } catch (err) {
      key = null;
      error.textContent = err.status === 401 ? "This key is not known." : String(err.message);
    }
  } },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Use an API key (thingport-foundation api-key add)."),
    input, el("button", { type: "submit" }, "Sign in"), error);
  show(form);
  input.focus();
}

async function poolView(mine) {
  const body = el("tbody", { id: "members" });
  const head = el("p", { id: "table-info", class: "muted" }, "Loading…");
  show(el("h1", {}, "Pool"), head,
    el("table", {}, el("thead", {}, el("tr", {},
      el("th", {}, "Worker"), el("th", {}, "Health"), el("th", { class: "num" }, "Partitions held"),
      el("th", { class: "num" }, "Partitions led"), el("th", { class: "num" }, "Things held"),
      el("th", {}, "Gateways linked"), el("th", {}, "Peer address"))), body));
  const load = async () => {
    const view = await api("/v1/cluster");
    const table = view.table;
    head.textContent = table
      ? `Table version ${table.version}, ${table.members.length} workers, ${table.replicas} copies of each of ` +
        `${table.partitions} partitions` + (view.changing ? " — a table change is under way" : "") +
        `. This page is served by ${view.this_member}.`
      : "No partition table yet.";
    body.replaceChildren(...view.members.map((m) => {
      const answering = m.partitions_held !== null;
      const health = !answering ? "not answering" : m.in_table ? "ok" : "joining";
      return el("tr", { "data-worker": m.id },
        el("td", {}, el("strong", {}, m.id), el("div", { class: "muted" }, m.member)),
        el("td", { class: health === "ok" ? "online" : "offline" }, health),
        el("td", { class: "num" }, answering ? m.partitions_held : "–"),
        el("td", { class: "num" }, answering ? m.primaries : "–"),
        el("td", { class: "num" }, answering ? m.keys : "–"),
        el("td", { class: "gateways" }, (m.gateways || []).join(", ") || "none"),
        el("td", {}, m.peer_address || ""));
    }));
  };
  await load();
  still(mine);
  rendered();
  every(3000, () => load().catch(() => {}));
}

async function devicesView(mine, params) {
  const search = el("input", { id: "search", placeholder: "name contains", value: params.get("search") || "" });
  const tag = el("input", { id: "tag", placeholder: "tag", value: params.get("tag") || "" });
  const online = el("select", { id: "online" },
    el("option", { value: "" }, "online or not"), el("option", { value: "true" }, "online"),
    el("option", { value: "false" }, "offline"));
  online.value = params.get("online") || "";
  const apply = (after) => {
    const query = new URLSearchParams();
    if (search.value) query.set("search", search.value);
    if (tag.value) query.set("tag", tag.value);
    if (online.value) query.set("online", online.value);
    if (after) query.set("after", after);
    location.hash = "#/devices?" + query.toString();
  };
  const rows = el("tbody", { id: "things" });
  const summary = el("span", { id: "matching", class: "muted" }, "Loading…");
  const next = el("button", { id: "next", type: "button", disabled: true }, "Next page");
  const first = el("button", { id: "first", type: "button", onclick: () => apply(null) }, "First page");
  show(el("h1", {}, "Devices"),
    el("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); apply(null); } },
      search, tag, online, el("button", { type: "submit" }, "Filter")),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Thing"), el("th", {}, "State"),
      el("th", {}, "Transport"), el("th", {}, "Gateway"), el("th", {}, "Last seen"), el("th", {}, "Tags"),
      el("th", { class: "num" }, "Properties"))), rows),
    el("div", { class: "pager" }, first, next, summary));
  const load = async () => {
    const query = new URLSearchParams(params);
    query.set("limit", PAGE);
    const page = await api("/v1/things?" + query.toString());
    rows.replaceChildren(...page.things.map((t) => el("tr", { "data-thing": t.thing },
      el("td", {}, el("a", { href: "#/thing/" + encodeURIComponent(t.thing) }, t.thing)),
      el("td", { class: t.online ? "online" : "offline" }, t.online ? "online" : "offline"),
      el("td", {}, t.transport || ""),
      el("td", {}, t.gateway || ""),
      el("td", {}, ago(t.last_seen_ms)),
      el("td", {}, t.tags.join(", ")),
      el("td", { class: "num" }, t.properties))));
    summary.textContent = `${page.matching} matching` + (page.complete ? "" : " (a worker did not answer)");
    next.disabled = !page.next;
    next.onclick = () => apply(page.next);
  };
  await load();
  still(mine);
  rendered();
  every(5000, () => load().catch(() => {}));
}

function chart(svg, values, from, to) {
  const width = svg.clientWidth || 800, height = 260, pad = 40;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = values.filter((v) => typeof v.value === "number" || typeof v.value === "boolean")
    .map((v) => [v.timestamp_ms, Number(v.value)]);
  const parts = [];
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    parts.push(node);
  };
  make("line", { class: "axis", x1: pad, y1: height - pad, x2: width - 10, y2: height - pad });
  make("line", { class: "axis", x1: pad, y1: 10, x2: pad, y2: height - pad });
  if (points.length === 0) {
    make("text", { x: pad + 10, y: height / 2 }, "No numeric values in this range.");
    svg.replaceChildren(...parts);
    svg.dataset.points = "0";
    return;
  }
  const t0 = from ?? points[0][0], t1 = Math.max(to ?? points[points.length - 1][0], t0 + 1);
  let lo = Math.min(...points.map((p) => p[1])), hi = Math.max(...points.map((p) => p[1]));
  if (lo === hi) { lo -= 1; hi += 1; }
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (width - pad - 10);
  const y = (v) => height - pad - ((v - lo) / (hi - lo)) * (height - pad - 10);
  make("polyline", { class: "line", points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") });
  make("text", { x: 2, y: 14 }, String(hi));
  make("text", { x: 2, y: height - pad }, String(lo));
  make("text", { x: pad, y: height - 20 }, time(t0));
  make("text", { x: width - 190, y: height - 20 }, time(t1));
  svg.replaceChildren(...parts);
  svg.dataset.points = String(points.length);
}

async function thingView(mine, name) {
  const path = "/v1/things/" + encodeURIComponent(name);
  const thing = await api(path);
  still(mine);
  const state = el("span", { id: "online", class: thing.online ? "online" : "offline" },
    thing.online ? "online" : "offline");
  const via = (t) => t.gateway ? `${t.transport || ""} through ${t.gateway}` : "";
  const gateway = el("span", { id: "gateway" }, via(thing));
  const properties = el("tbody", { id: "properties" });
  const rowOf = new Map();
  const setProperty = (property, p) => {
    let row = rowOf.get(property);
    const cells = [el("td", {}, property), el("td", { class: "value" }, json(p.value)),
      el("td", {}, p.quality), el("td", {}, time(p.timestamp_ms))];
    if (!row) {
      row = el("tr", { "data-property": property });
      rowOf.set(property, row);
      properties.append(row);
      if (![...select.options].some((o) => o.value === property)) select.append(el("option", { value: property }, property));
    }
    row.replaceChildren(...cells);
  };
  const events = el("tbody", { id: "events" });
  const addEvent = (e, prepend) => {
    const row = el("tr", {}, el("td", {}, time(e.timestamp_ms)), el("td", {}, e.name ?? e.event),
      el("td", {}, json(e.payload)));
    if (prepend) events.prepend(row); else events.append(row);
    while (events.children.length > 100) events.lastChild.remove();
  };

  // the history chart of one property over a time range
  const select = el("select", { id: "history-property" });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.id = "chart";
  const fromInput = el("input", { id: "history-from", type: "datetime-local", step: 1 });
  const toInput = el("input", { id: "history-to", type: "datetime-local", step: 1 });
  let range = { from: Date.now() - 3600e3, to: null };
  let shown = [];
  const loadHistory = async () => {
    const property = select.value;
    if (!property) return;
    const query = new URLSearchParams({ order: "oldest", limit: "10000" });
    if (range.from !== null) query.set("from", String(Math.round(range.from)));
    if (range.to !== null) query.set("to", String(Math.round(range.to)));
    const page = await api(`${path}/properties/${encodeURIComponent(property)}/history?${query}`);
    shown = page.values;
    chart(svg, shown, range.from, range.to);
  };
  const rangeButton = (label, ms) => el("button", { type: "button", "data-range": label, onclick: () => {
    range = { from: ms === null ? null : Date.now() - ms, to: null };
    loadHistory().catch(() => {});
  } }, label);
  const localMs = (input) => input.value ? new Date(input.value).getTime() : null;

  const writeAnswer = el("pre", { id: "write-answer" });
  const callAnswer = el("pre", { id: "call-answer" });
  const forms = role === "viewer" ? [] : [
    el("h2", {}, "Write a property"),
    el("form", { id: "write", class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const form = e.target;
      writeAnswer.textContent = "…";
      try {
        const value = JSON.parse(form.elements.value.value);
        const answer = await api(`${path}/properties/${encodeURIComponent(form.elements.property.value)}`,
          { method: "PUT", body: { value } });
        writeAnswer.textContent = json(answer);
      } catch (err) {
        writeAnswer.textContent = "error: " + err.message;
      }
    } },
      el("input", { name: "property", placeholder: "property", required: true }),
      el("input", { name: "value", placeholder: "value (JSON)", required: true }),
      el("button", { type: "submit" }, "Write")),
    writeAnswer,
    el("h2", {}, "Call a service"),
    el("form", { id: "call", class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const form = e.target;
      callAnswer.textContent = "…";
      try {
        const text = form.elements.params.value.trim();
        const answer = await api(
          `${path}/services/${encodeURIComponent(form.elements.service.value)}?timeout_ms=10000`,
          { method: "POST", body: text ? JSON.parse(text) : null });
        callAnswer.textContent = json(answer);
      } catch (err) {
        callAnswer.textContent = "error: " + err.message;
      }
    } },
      el("input", { name: "service", placeholder: "service", required: true }),
      el("input", { name: "params", placeholder: "parameters (JSON)" }),
      el("button", { type: "submit" }, "Call")),
    callAnswer,
  ];

  show(el("h1", { id: "thing-name" }, name),
    el("div", { class: "cards" },
      el("div", { class: "card" }, "State: ", state, " ", gateway),
      el("div", { class: "card" }, "Tags: ", thing.tags.join(", ") || "none"),
      el("div", { class: "card" }, "Partition ", thing.partition, ", held by ", (thing.owners || []).join(", "))),
    thing.description ? el("p", {}, thing.description) : null,
    el("h2", {}, "Properties"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Property"), el("th", {}, "Value"),
      el("th", {}, "Quality"), el("th", {}, "Device time"))), properties),
    el("h2", {}, "History"),
    el("div", { class: "filters" }, select, rangeButton("5 min", 300e3), rangeButton("1 h", 3600e3),
      rangeButton("24 h", 86400e3), rangeButton("all", null), fromInput, toInput,
      el("button", { id: "history-apply", type: "button", onclick: () => {
        range = { from: localMs(fromInput), to: localMs(toInput) };
        loadHistory().catch(() => {});
      } }, "Show range")),
    svg,
    el("h2", {}, "Recent events"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Device time"), el("th", {}, "Event"),
      el("th", {}, "Payload"))), events),
    ...forms);
  select.onchange = () => loadHistory().catch(() => {});
  for (const [property, p] of Object.entries(thing.properties)) setProperty(property, p);
  for (const e of thing.events) addEvent(e, false);
  await loadHistory().catch(() => {});
  still(mine);
  rendered();

  stream(path + "/stream", (type, data) => {
    if (type === "property") {
      setProperty(data.property, data);
      if (data.property === select.value && (range.to === null || data.timestamp_ms <= range.to)) {
        shown.push(data);
        chart(svg, shown, range.from, range.to);
      }
    } else if (type === "event") {
      addEvent(data, true);
    } else if (type === "online") {
      state.textContent = "online"; state.className = "online"; gateway.textContent = via(data);
    } else if (type === "offline") {
      state.textContent = "offline"; state.className = "offline"; gateway.textContent = "";
    } else if (type === "removed") {
      if (data.property === null) {
        state.textContent = "removed"; state.className = "error"; gateway.textContent = "";
        rowOf.clear();
        properties.replaceChildren();
      } else {
        rowOf.get(data.property)?.remove();
        rowOf.delete(data.property);
      }
    } else if (type === "gap") {
      // changes may be missing: draw the thing again from what the pool holds now
      route();
    } else if (type === "refused") {
      state.textContent = `live updates refused (${data.status})`;
      state.className = "error";
    } else if (type === "snapshot") {
      for (const [property, p] of Object.entries(data.properties)) setProperty(property, p);
      state.textContent = data.online ? "online" : "offline";
      state.className = data.online ? "online" : "offline";
      gateway.textContent = via(data);
    }
  });
}

async function route() {
  for (const stop of cleanup) stop();
  cleanup = [];
  const mine = ++generation;
  delete document.body.dataset.rendered;
  if (!key) return loginView();
  if (!role) {
    try {
      role = (await api("/v1/key")).role;
    } catch (err) {
      return loginView(String(err.message));
    }
    if (mine !== generation) return;
  }
  const nav = document.getElementById("nav");
  nav.hidden = false;
  document.getElementById("whoami").textContent = "role: " + role;
  const hash = location.hash.replace(/^#/, "") || "/pool";
  const [where, query] = hash.split("?");
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("here", link.getAttribute("href") === "#" + where);
  try {
    if (where.startsWith("/thing/")) await thingView(mine, decodeURIComponent(where.slice(7)));
    else if (where === "/devices") await devicesView(mine, new URLSearchParams(query || ""));
    else await poolView(mine);
  } catch (err) {
    if (err instanceof Stale || mine !== generation) return;
    show(el("p", { class: "error", id: "view-error" }, String(err.message)));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", logout);
  route();
});
