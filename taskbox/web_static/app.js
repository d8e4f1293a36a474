// The taskbox dashboard. Hand-written, no build step.
//
// Everything a task's workspace holds (Plan.md, file names, command output, commit
// messages, todo texts) is written by an agent and is hostile: this file never assigns
// markup (no innerHTML, no insertAdjacentHTML, no document.write). Every piece of data
// becomes a text node; the tiny Markdown renderer builds elements one by one.
"use strict";

const state = { lastId: null, ws: null, view: null, retry: 0 };

// --- DOM helpers -------------------------------------------------------------------------------

const SAFE_ATTRS = new Set(["class", "id", "type", "name", "value", "title", "role", "tabindex", "for",
  "placeholder", "colspan", "scope", "min", "max", "step", "rel", "target", "disabled", "checked"]);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "href") node.setAttribute("href", safeHref(String(value)));
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (SAFE_ATTRS.has(key) || key.startsWith("aria-") || key.startsWith("data-")) node.setAttribute(key, value === true ? "" : String(value));
    else throw new Error("attribute not allowed: " + key);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function safeHref(url) {
  if (url.startsWith("/") && !url.startsWith("//")) return url;
  if (/^https?:\/\//i.test(url)) return url;
  return "#";
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

// Live redraws replace elements: a keyboard user's focus moves to the same control in the
// new rows (found by its id, link or data attribute), instead of falling back to the page.
function focusKey(node) {
  if (!node || node === document.body) return null;
  if (node.id) return "#" + CSS.escape(node.id);
  for (const attr of ["data-restore", "data-diff", "href"]) {
    if (node.hasAttribute(attr)) return node.tagName.toLowerCase() + "[" + attr + '="' + CSS.escape(node.getAttribute(attr)) + '"]';
  }
  return null;
}

function keepFocus(container, redraw) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? focusKey(active) : null;
  const result = redraw();
  if (key && !container.contains(document.activeElement)) {
    const again = container.querySelector(key);
    if (again) again.focus({ preventScroll: true });
  }
  return result;
}

function ago(ts) {
  if (!ts) return "-";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s >= 86400) return Math.floor(s / 86400) + "d ago";
  if (s >= 3600) return Math.floor(s / 3600) + "h ago";
  if (s >= 60) return Math.floor(s / 60) + "m ago";
  return Math.floor(s) + "s ago";
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function badge(text) { return el("span", { class: "badge " + String(text).replace(/[^a-z-]/g, "") }, text); }

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// --- API ---------------------------------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) throw new Error((data && data.message) || ("HTTP " + res.status));
  return data;
}

const enc = encodeURIComponent;

// --- Markdown (a small, safe subset) ------------------------------------------------------------

function inline(text) {
  // `code`, **bold**, *em* / _em_, [text](http…) — each becomes an element with text content.
  const out = [];
  const re = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(\b_[^_\n]+_\b)|(\[[^\]\n]+\]\([^)\s]+\))/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const tok = m[0];
    if (m[1]) out.push(el("code", {}, tok.slice(1, -1)));
    else if (m[2]) out.push(el("strong", {}, tok.slice(2, -2)));
    else if (m[3] || m[4]) out.push(el("em", {}, tok.slice(1, -1)));
    else {
      const close = tok.indexOf("](");
      const label = tok.slice(1, close), url = tok.slice(close + 2, -1);
      out.push(/^https?:\/\//i.test(url) ? el("a", { href: url, rel: "noopener noreferrer nofollow", target: "_blank" }, label) : label);
    }
    last = m.index + tok.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function renderMarkdown(text) {
  const root = el("div", { class: "md" });
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let list = null, para = [], i = 0;
  const flush = () => {
    if (para.length) { root.appendChild(el("p", {}, inline(para.join(" ")))); para = []; }
    list = null;
  };
  while (i < lines.length) {
    const line = lines[i];
    if (/^\s*<!--.*-->\s*$/.test(line)) { i++; continue; }
    if (/^```/.test(line)) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^```/.test(lines[i])) code.push(lines[i++]);
      i++;
      root.appendChild(el("pre", {}, el("code", {}, code.join("\n"))));
      continue;
    }
    const h = /^(#{1,6})\s+(.*)$/.exec(line);
    if (h) { flush(); root.appendChild(el("h" + Math.min(6, h[1].length + 2), {}, inline(h[2]))); i++; continue; }
    if (/^\s*\|.*\|\s*$/.test(line)) {
      flush();
      const table = el("table", {});
      let first = true;
      while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) {
        const cells = lines[i].trim().slice(1, -1).split("|").map((c) => c.trim());
        i++;
        if (cells.every((c) => /^:?-{2,}:?$/.test(c))) continue;
        table.appendChild(el("tr", {}, cells.map((c) => el(first ? "th" : "td", {}, inline(c)))));
        first = false;
      }
      root.appendChild(table);
      continue;
    }
    const li = /^\s*(?:[-*+]|\d+[.)])\s+(.*)$/.exec(line);
    if (li) {
      if (para.length) { root.appendChild(el("p", {}, inline(para.join(" ")))); para = []; }
      if (!list) { list = el("ul", {}); root.appendChild(list); }
      let body = li[1];
      const box = /^\[([ xX~-])\]\s*(.*)$/.exec(body);
      let mark = null;
      if (box) { mark = box[1] === " " ? "☐ " : box[1] === "x" || box[1] === "X" ? "☑ " : "◐ "; body = box[2]; }
      list.appendChild(el("li", {}, mark, inline(body)));
      i++;
      continue;
    }
    if (!line.trim()) { flush(); i++; continue; }
    list = null;
    para.push(line.trim());
    i++;
  }
  flush();
  return root;
}

function renderDiff(text) {
  const pre = el("pre", { class: "diff" });
  for (const line of String(text).split("\n")) {
    let cls = null;
    if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ")) cls = "file";
    else if (line.startsWith("@@")) cls = "hunk";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    pre.appendChild(cls ? el("span", { class: cls }, line) : document.createTextNode(line + "\n"));
  }
  return pre;
}

// --- the live event stream ------------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const since = state.lastId === null ? "" : "?since=" + state.lastId;
  const ws = new WebSocket(proto + location.host + "/api/events" + since);
  state.ws = ws;
  const conn = document.getElementById("conn");
  ws.onopen = () => { state.retry = 0; conn.textContent = "live"; conn.classList.add("live"); };
  ws.onmessage = (msg) => {
    let data;
    try { data = JSON.parse(msg.data); } catch (e) { return; }
    if (data.kind === "hello") { if (state.lastId === null) state.lastId = data.last_id; return; }
    if (data.kind === "event") state.lastId = Math.max(state.lastId || 0, data.id);
    if (state.view && state.view.onMessage) state.view.onMessage(data);
  };
  ws.onclose = () => {
    conn.textContent = "reconnecting…";
    conn.classList.remove("live");
    state.retry = Math.min(state.retry + 1, 5);
    setTimeout(connect, 500 * state.retry);
  };
}

// --- the task list --------------------------------------------------------------------------------

function listView(main) {
  const filter = { status: "", q: "" };
  const usage = {};
  const body = el("tbody", { id: "task-rows" });
  const count = el("span", { class: "muted", id: "task-count" });
  const statusSel = el("select", { id: "status-filter", on: { change: (e) => { filter.status = e.target.value; refresh(); } } },
    ["", "pending", "active", "paused", "completed", "failed", "aborted", "archived"].map((s) => el("option", { value: s }, s || "all")));
  const search = el("input", { id: "search", type: "search", placeholder: "id, title, branch…",
    on: { input: debounce((e) => { filter.q = e.target.value; refresh(); }, 250) } });
  append(main, [
    el("h1", {}, "Tasks ", count),
    el("div", { class: "toolbar" }, el("label", {}, "Status", statusSel), el("label", {}, "Search", search)),
    el("table", { id: "tasks" },
      el("thead", {}, el("tr", {}, ["Task", "Title", "Status", "Agent", "Branch", "CPU", "Memory", "Last activity"]
        .map((h, i) => el("th", { scope: "col", class: i === 1 || i === 4 ? "hide-narrow" : null }, h)))),
      body),
  ]);
  let rows = [];
  function draw() { keepFocus(body, drawRows); }
  function drawRows() {
    clear(body);
    count.textContent = "(" + rows.length + ")";
    if (!rows.length) body.appendChild(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No tasks yet. Create one with `taskbox create-task`.")));
    for (const t of rows) {
      const u = usage[t.task_id];
      const agents = (t.current_agents || []).join(", ");
      body.appendChild(el("tr", { "data-task": t.task_id },
        el("td", {}, el("a", { href: "/task/" + enc(t.task_id), "data-nav": "1" }, t.task_id)),
        el("td", { class: "hide-narrow" }, t.title),
        el("td", {}, badge(t.status)),
        el("td", {}, agents || t.agent),
        el("td", { class: "hide-narrow" }, el("code", {}, t.branch)),
        el("td", { class: "num" }, u && u.cpu_percent !== null && u.cpu_percent !== undefined ? u.cpu_percent + "%" : "-"),
        el("td", { class: "num" }, u ? bytes(u.memory_bytes) + (u.memory_percent !== null ? " (" + u.memory_percent + "%)" : "") : "-"),
        el("td", { class: "num" }, ago(t.last_active))));
    }
  }
  async function refresh() {
    const qs = [];
    if (filter.status) qs.push("status=" + enc(filter.status));
    if (filter.q) qs.push("q=" + enc(filter.q));
    try {
      rows = (await api("GET", "/api/tasks" + (qs.length ? "?" + qs.join("&") : ""))).tasks;
      draw();
    } catch (e) { clear(body).appendChild(el("tr", {}, el("td", { colspan: 8, class: "error" }, e.message))); }
  }
  async function pollUsage() {
    try {
      const fresh = (await api("GET", "/api/usage")).usage;
      for (const k of Object.keys(usage)) delete usage[k]; // a task that stopped shows none
      for (const u of fresh) usage[u.task_id] = u;
      draw();
    } catch (e) { /* the next poll tries again */ }
  }
  const later = debounce(refresh, 200);
  refresh();
  pollUsage();
  const timers = [setInterval(pollUsage, 3000), setInterval(draw, 10000)];
  return {
    onMessage: (m) => { if (m.kind === "event" && m.type !== "exec.output") later(); },
    close: () => timers.forEach(clearInterval),
  };
}

// --- a task's page --------------------------------------------------------------------------------

function taskView(main, taskId) {
  const sec = (id, title, ...extra) => el("section", { class: "card", id, "aria-labelledby": id + "-h" }, el("h2", { id: id + "-h" }, title), ...extra);
  const head = el("div", { id: "task-head" });
  const plan = el("div", { id: "plan-body" }, el("p", { class: "muted" }, "Loading…"));
  const todos = el("ul", { class: "todos", id: "todo-list" });
  const output = el("pre", { class: "output", id: "live-output", "aria-live": "polite" });
  const outputLabel = el("p", { class: "muted", id: "live-command" }, "No command running.");
  const execs = el("tbody", { id: "exec-rows" });
  const jobs = el("tbody", { id: "job-rows" });
  const cps = el("tbody", { id: "checkpoint-rows" });
  const cpResult = el("div", { id: "checkpoint-result", role: "status", "aria-live": "polite" });
  const diffBox = el("div", { id: "diff-body" }, el("p", { class: "muted" }, "Press “Show diff” to load the branch diff."));
  const events = el("ul", { class: "events", id: "event-list" });
  const graph = el("div", { id: "subtask-graph" });
  const cmdInput = el("input", { id: "command", type: "text", placeholder: "e.g. pytest -q", "aria-label": "Command" });
  const runForm = el("form", { class: "toolbar", id: "run-form", on: { submit: (e) => { e.preventDefault(); run(); } } },
    el("label", { for: "command" }, "Command", cmdInput), el("button", { type: "submit", id: "run" }, "Run"));
  const cpName = el("input", { id: "checkpoint-name", type: "text", placeholder: "name (optional)", "aria-label": "Checkpoint name" });
  const cpForm = el("form", { class: "toolbar", id: "checkpoint-form", on: { submit: (e) => { e.preventDefault(); createCheckpoint(); } } },
    el("label", { for: "checkpoint-name" }, "New checkpoint", cpName), el("button", { type: "submit", id: "create-checkpoint" }, "Create checkpoint"));
  const diffButton = el("button", { type: "button", id: "load-diff", on: { click: () => loadDiff() } }, "Show diff");
  const graphCard = sec("subtasks", "Sub-tasks", graph);
  graphCard.classList.add("wide");
  graphCard.hidden = true;

  append(main, [
    head,
    el("div", { class: "grid" },
      graphCard,
      sec("commands", "Commands", runForm, outputLabel, output,
        el("h3", {}, "Background jobs"), el("table", {}, el("tbody", {}, jobs)),
        el("h3", {}, "Recent executions"),
        el("table", {}, el("thead", {}, el("tr", {}, ["Command", "Exit", "Took", "Status"].map((h) => el("th", { scope: "col" }, h)))), execs)),
      sec("plan", "Plan.md", plan),
      sec("todos", "Todos", todos),
      sec("checkpoints", "Checkpoints", cpForm,
        el("table", {}, el("thead", {}, el("tr", {}, ["Name", "Id", "Trigger", "Taken", ""].map((h) => el("th", { scope: "col" }, h)))), cps),
        cpResult),
      sec("events", "Events", events),
      el("section", { class: "card wide", id: "diff", "aria-labelledby": "diff-h" }, el("h2", { id: "diff-h" }, "Branch diff"),
        el("div", { class: "toolbar" }, diffButton),
        diffBox)),
  ]);

  let task = null;
  let children = [];
  const followed = {}; // running background jobs: job id -> next byte offset

  async function loadHead() {
    try {
      task = await api("GET", "/api/tasks/" + enc(taskId));
    } catch (e) { clear(head).appendChild(el("p", { class: "error" }, e.message)); return; }
    document.title = "taskbox · " + task.task_id;
    keepFocus(head, () => drawHead(task));
    if (!diffShown && task.container_state === "running") loadDiff();
  }

  function drawHead(task) {
    clear(head);
    append(head, [
      el("h1", {}, task.title, " ", badge(task.status)),
      el("div", { class: "meta" },
        el("span", {}, "id ", el("code", {}, task.task_id)),
        el("span", {}, "branch ", el("code", {}, task.branch)),
        el("span", {}, "agent ", (task.current_agents || []).join(", ") || task.agent),
        el("span", {}, "container ", badge(task.container_state)),
        el("span", {}, "last activity ", ago(task.last_active)),
        task.parent_id ? el("span", {}, "parent ", el("a", { href: "/task/" + enc(task.parent_id), "data-nav": "1" }, task.parent_id)) : null),
    ]);
    clear(todos);
    if (!task.todos.length) todos.appendChild(el("li", { class: "muted" }, "No todos."));
    for (const t of task.todos) {
      const mark = t.status === "completed" ? "☑" : t.status === "in_progress" ? "◐" : t.status === "cancelled" ? "☒" : "☐";
      todos.appendChild(el("li", {}, mark + " ", t.text, t.major ? el("span", { class: "badge" }, "major") : null));
    }
    clear(jobs);
    for (const j of task.jobs || []) {
      jobs.appendChild(el("tr", {}, el("td", {}, el("code", {}, j.command)), el("td", {}, badge(j.status)), el("td", { class: "num" }, bytes(j.output_bytes))));
      if (j.status === "running" && !(j.job_id in followed)) followed[j.job_id] = Math.max(0, (j.output_bytes || 0) - 4096);
    }
  }

  async function loadPlan() {
    try {
      const p = await api("GET", "/api/tasks/" + enc(taskId) + "/plan");
      clear(plan).appendChild(renderMarkdown(p.content));
    } catch (e) { clear(plan).appendChild(el("p", { class: "muted" }, e.message)); }
  }

  async function loadExecs() {
    try {
      const rows = (await api("GET", "/api/tasks/" + enc(taskId) + "/executions?limit=15")).executions;
      clear(execs);
      for (const x of rows.slice().reverse()) {
        execs.appendChild(el("tr", {}, el("td", {}, el("code", {}, x.command || "")),
          el("td", { class: "num" }, x.exit_code === null || x.exit_code === undefined ? "-" : x.exit_code),
          el("td", { class: "num" }, x.duration_ms ? Math.round(x.duration_ms) + " ms" : "-"),
          el("td", {}, x.status || "")));
      }
    } catch (e) { clear(execs).appendChild(el("tr", {}, el("td", { class: "error" }, e.message))); }
  }

  async function loadCheckpoints() {
    try {
      const rows = (await api("GET", "/api/tasks/" + enc(taskId) + "/checkpoints")).checkpoints;
      keepFocus(cps, () => drawCheckpoints(rows));
    } catch (e) { clear(cps).appendChild(el("tr", {}, el("td", { class: "error" }, e.message))); }
  }

  function drawCheckpoints(rows) {
    clear(cps);
    if (!rows.length) cps.appendChild(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No checkpoints.")));
    for (const c of rows.slice().reverse()) {
      const id = c.checkpoint_id;
      cps.appendChild(el("tr", { "data-checkpoint": id },
        el("td", {}, c.name, c.current ? el("span", { class: "badge" }, "current") : null),
        el("td", {}, el("code", {}, id)),
        el("td", {}, c.trigger),
        el("td", { class: "num" }, ago(c.created_at)),
        el("td", {},
          el("button", { type: "button", class: "danger", "data-restore": id, "aria-label": "Restore checkpoint " + c.name, on: { click: (e) => restore(id, c.name, e.currentTarget) } },
            armed.id === id && Date.now() <= armed.until ? "Confirm restore" : "Restore"), " ",
          el("button", { type: "button", "data-diff": id, "aria-label": "Diff checkpoint " + c.name + " against now", on: { click: () => cpDiff(id) } }, "Diff"))));
    }
  }

  let armed = { id: null, until: 0 };
  async function restore(id, name, button) {
    // Two presses (no modal dialog): the first arms the button, the second restores. The
    // arming outlives a redraw of the table (a new event may redraw it in between).
    if (armed.id !== id || Date.now() > armed.until) {
      armed = { id, until: Date.now() + 8000 };
      button.textContent = "Confirm restore";
      setTimeout(() => { if (armed.id === id && Date.now() > armed.until) loadCheckpoints(); }, 8100);
      return;
    }
    armed = { id: null, until: 0 };
    clear(cpResult).appendChild(el("p", { class: "muted" }, "Restoring…"));
    try {
      const r = await api("POST", "/api/tasks/" + enc(taskId) + "/checkpoints/" + enc(id) + "/restore", {});
      clear(cpResult).appendChild(el("p", { id: "restore-done" }, "Restored “", r.name, "”: ", String(r.files_changed), " changed, ",
        String(r.files_restored), " brought back, ", String(r.files_removed), " removed."));
      loadCheckpoints(); loadPlan(); loadHead();
    } catch (e) { clear(cpResult).appendChild(el("p", { class: "error" }, e.message)); }
  }

  async function cpDiff(id) {
    try {
      const d = await api("GET", "/api/tasks/" + enc(taskId) + "/checkpoints/diff?a=" + enc(id) + "&b=current");
      const box = clear(cpResult);
      box.appendChild(el("p", {}, "Changes from ", el("code", {}, id), " to now: ", String(d.added), " added, ",
        String(d.modified), " modified, ", String(d.deleted), " deleted."));
      box.appendChild(el("ul", { id: "checkpoint-changes" }, (d.changes || []).slice(0, 200).map((c) => el("li", {}, c.status + " ", el("code", {}, c.path)))));
      if (d.patch) box.appendChild(renderDiff(d.patch));
    } catch (e) { clear(cpResult).appendChild(el("p", { class: "error" }, e.message)); }
  }

  async function createCheckpoint() {
    const name = cpName.value.trim();
    clear(cpResult).appendChild(el("p", { class: "muted" }, "Taking a checkpoint…"));
    try {
      const r = await api("POST", "/api/tasks/" + enc(taskId) + "/checkpoints", name ? { name } : {});
      clear(cpResult).appendChild(el("p", {}, "Checkpoint “", r.name, "” taken."));
      cpName.value = "";
      loadCheckpoints();
    } catch (e) { clear(cpResult).appendChild(el("p", { class: "error" }, e.message)); }
  }

  // The branch diff loads by itself once when the task's container runs (a cheap command
  // there; a stopped task would need a throwaway container, so it waits for the button).
  // It is not reloaded on every event: each load runs a command in the container, and one
  // started while a checkpoint freezes the container can wedge the engine (docs/serve.md,
  // Known limits); the button refreshes it.
  let diffShown = false;
  async function loadDiff() {
    clear(diffBox).appendChild(el("p", { class: "muted" }, "Loading…"));
    diffShown = true;
    diffButton.textContent = "Refresh diff";
    try {
      const d = await api("GET", "/api/tasks/" + enc(taskId) + "/diff");
      clear(diffBox).appendChild(d.diff ? renderDiff(d.diff) : el("p", { class: "muted" }, "No changes."));
      if (d.truncated) diffBox.appendChild(el("p", { class: "muted" }, "(cut: the diff is longer)"));
    } catch (e) { clear(diffBox).appendChild(el("p", { class: "error" }, e.message)); }
  }

  // The live command log: exec.output events of any command of this task, whichever process
  // runs it (the CLI, an agent over MCP, this page). It follows the newest command.
  const live = { id: null, seq: -1, done: true, command: "" };
  const OUTPUT_CHARS = 20000;
  function trimOutput() {
    let size = output.textContent.length;
    while (size > OUTPUT_CHARS && output.firstChild) {
      size -= output.firstChild.textContent.length;
      output.removeChild(output.firstChild);
    }
  }
  function showOutput(p) {
    if (!p || typeof p.exec_id !== "string" || typeof p.seq !== "number") return;
    if (p.exec_id !== live.id) {
      if (!live.done && p.seq !== 0 && live.id !== null) return; // another command's tail: keep following this one
      Object.assign(live, { id: p.exec_id, seq: -1, done: false, command: String(p.command || "") });
      clear(output);
    }
    if (p.seq <= live.seq) return; // seen already (replayed history and the stream overlap)
    live.seq = p.seq;
    if (p.skipped) output.appendChild(el("span", { class: "muted" }, "[… " + bytes(p.skipped) + " of output not streamed …]\n"));
    if (p.text) output.appendChild(p.stream === "stderr" ? el("span", { class: "stderr" }, String(p.text)) : document.createTextNode(String(p.text)));
    trimOutput();
    if (p.done) {
      live.done = true;
      outputLabel.textContent = (p.exit_code === null || p.exit_code === undefined ? "Ended (no exit code)" : "Exited " + p.exit_code) + ": " + live.command;
    } else outputLabel.textContent = "Running: " + live.command;
  }

  async function run() {
    const command = cmdInput.value.trim();
    if (!command) return;
    outputLabel.textContent = "Running: " + command;
    clear(output);
    try {
      const r = await api("POST", "/api/tasks/" + enc(taskId) + "/exec", { command });
      Object.assign(live, { id: r.exec_id, seq: Number.MAX_SAFE_INTEGER, done: true }); // the answer has it all
      output.textContent = (r.stdout || "") + (r.stderr || "");
      trimOutput();
      outputLabel.textContent = "Exited " + r.exit_code + " after " + Math.round(r.duration_ms) + " ms: " + command;
    } catch (e) { outputLabel.textContent = "Failed: " + e.message; }
    loadExecs();
  }

  async function followJobs() {
    for (const [job, offset] of Object.entries(followed)) {
      try {
        const r = await api("GET", "/api/tasks/" + enc(taskId) + "/jobs/" + enc(job) + "/output?offset=" + offset);
        if (r.output) {
          outputLabel.textContent = "Job " + job + ": " + (r.command || "");
          output.textContent = (output.textContent + r.output).slice(-20000);
        }
        followed[job] = r.next_offset;
        if (r.status !== "running" && !r.more) delete followed[job];
      } catch (e) { delete followed[job]; }
    }
  }

  function addEvent(m, top) {
    const text = Object.entries(m.payload || {}).filter(([, v]) => v !== null && v !== "" && typeof v !== "object")
      .map(([k, v]) => k + "=" + String(v).slice(0, 160)).join(" ");
    const item = el("li", { "data-event": m.id }, el("span", { class: "muted" }, new Date(m.ts * 1000).toLocaleTimeString(), " "),
      el("span", { class: "etype" }, m.type), text);
    if (top) events.insertBefore(item, events.firstChild); else events.appendChild(item);
    while (events.childNodes.length > 300) events.removeChild(events.lastChild);
  }

  async function loadEvents() {
    const base = "/api/tasks/" + enc(taskId) + "/events?newest=1&";
    try {
      const rows = (await api("GET", base + "limit=150&exclude=exec.output")).events;
      clear(events);
      for (const r of rows.slice().reverse()) addEvent(r, false);
    } catch (e) { clear(events).appendChild(el("li", { class: "error" }, e.message)); }
    try {
      // The newest command's output so far (it may still run): the log has it.
      for (const r of (await api("GET", base + "limit=80&type=exec.output")).events) showOutput(r.payload);
    } catch (e) { /* the live stream still brings new output */ }
  }

  // The sub-task graph of an ultrawork parent: one column per stage (a sub-task stands right
  // of everything it depends on), an arrow per dependency, statuses live (any subtask.* event
  // of the parent, or an event of a child task, reloads it).
  let graphData = null;
  async function loadChildren() {
    let rows = [];
    try {
      rows = (await api("GET", "/api/tasks/" + enc(taskId) + "/subtasks")).subtasks || [];
    } catch (e) { rows = []; }
    children = rows.filter((r) => r.task_id).map((r) => ({ task_id: r.task_id }));
    graphCard.hidden = !rows.length;
    graphData = rows;
    drawGraph();
  }

  function drawGraph() { keepFocus(graph, drawNodes); }
  function drawNodes() {
    const rows = graphData || [];
    clear(graph);
    if (!rows.length) return;
    const byId = Object.fromEntries(rows.map((r) => [r.id, r]));
    const depth = {};
    const level = (id, seen) => {
      if (depth[id] !== undefined) return depth[id];
      if (seen.has(id)) return 0;
      seen.add(id);
      const deps = ((byId[id] || {}).depends_on || []).filter((d) => byId[d]);
      depth[id] = deps.length ? 1 + Math.max(...deps.map((d) => level(d, seen))) : 0;
      return depth[id];
    };
    const cols = [];
    for (const r of rows) (cols[level(r.id, new Set())] ||= []).push(r);
    const done = rows.filter((r) => ["merged", "failed", "timed_out", "blocked", "conflict"].includes(r.status)).length;
    graph.appendChild(el("p", { class: "muted", id: "subtask-progress" }, done + "/" + rows.length + " finished"));
    const stage = el("div", { class: "graph" });
    graph.appendChild(stage);
    const nodes = {};
    cols.forEach((col, i) => {
      stage.appendChild(el("div", { class: "col", role: "list", "aria-label": "Stage " + (i + 1) },
        (col || []).map((r) => {
          const deps = (r.depends_on || []);
          const node = el("div", { class: "node status-" + String(r.status).replace(/[^a-z_]/g, ""), role: "listitem",
            "data-subtask": r.id, "data-status": r.status },
            el("div", { class: "node-head" },
              r.task_id ? el("a", { href: "/task/" + enc(r.task_id), "data-nav": "1" }, r.id) : el("strong", {}, r.id),
              " ", badge(r.status)),
            el("div", { class: "muted" }, r.title),
            deps.length ? el("div", { class: "deps" }, "after ", deps.join(", ")) : null,
            r.status === "conflict" && (r.conflict_files || []).length ? el("div", { class: "error" }, "conflicts: ", r.conflict_files.join(", ")) : null);
          nodes[r.id] = node;
          return node;
        })));
    });
    // Arrows, once the nodes are laid out: an SVG over the columns, built element by element.
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "edges");
    svg.setAttribute("aria-hidden", "true");
    const defs = document.createElementNS(NS, "defs");
    const marker = document.createElementNS(NS, "marker");
    for (const [k, v] of Object.entries({ id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" })) marker.setAttribute(k, v);
    const tip = document.createElementNS(NS, "path");
    tip.setAttribute("d", "M 0 0 L 10 5 L 0 10 z");
    marker.appendChild(tip);
    defs.appendChild(marker);
    svg.appendChild(defs);
    stage.appendChild(svg);
    const box = stage.getBoundingClientRect();
    svg.setAttribute("width", String(Math.ceil(stage.scrollWidth)));
    svg.setAttribute("height", String(Math.ceil(stage.clientHeight)));
    for (const r of rows) {
      for (const d of r.depends_on || []) {
        if (!nodes[d] || !nodes[r.id]) continue;
        const a = nodes[d].getBoundingClientRect(), b = nodes[r.id].getBoundingClientRect();
        const x1 = a.right - box.left + stage.scrollLeft, y1 = a.top + a.height / 2 - box.top;
        const x2 = b.left - box.left + stage.scrollLeft, y2 = b.top + b.height / 2 - box.top;
        const path = document.createElementNS(NS, "path");
        const mid = (x1 + x2) / 2;
        path.setAttribute("d", `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`);
        path.setAttribute("class", "edge status-" + String(byId[d].status).replace(/[^a-z_]/g, ""));
        path.setAttribute("marker-end", "url(#arrow)");
        path.setAttribute("data-edge", d + "->" + r.id);
        svg.appendChild(path);
      }
    }
  }
  const redrawGraph = debounce(drawGraph, 150);
  window.addEventListener("resize", redrawGraph);

  const reload = {
    head: debounce(loadHead, 150), plan: debounce(loadPlan, 300), execs: debounce(loadExecs, 200),
    cps: debounce(loadCheckpoints, 200), children: debounce(loadChildren, 300),
  };
  loadHead(); loadPlan(); loadExecs(); loadCheckpoints(); loadEvents(); loadChildren();
  // Events bring every change at once; this catches a Plan.md edit that records none (an
  // agent's file tool). A host-side read of the file: nothing runs in the container.
  const timers = [setInterval(followJobs, 1000), setInterval(() => reload.plan(), 10000)];

  return {
    onMessage: (m) => {
      if (m.kind !== "event") return;
      if (m.type === "exec.output") {
        if (m.task_id === taskId) showOutput(m.payload);
        return;
      }
      if (children.some((c) => c.task_id === m.task_id)) reload.children();
      if (m.task_id !== taskId) return;
      addEvent(m, true);
      reload.head(); reload.plan();
      if (m.type === "task.exec" || m.type.startsWith("exec.") || m.type.startsWith("job.")) reload.execs();
      if (m.type.startsWith("checkpoint.")) reload.cps();
      if (m.type.startsWith("subtask") || m.type.startsWith("ultrawork.") || m.type === "task.merged") reload.children();
    },
    close: () => { timers.forEach(clearInterval); window.removeEventListener("resize", redrawGraph); },
  };
}

// --- routing --------------------------------------------------------------------------------------

function route() {
  if (state.view && state.view.close) state.view.close();
  const main = clear(document.getElementById("main"));
  const m = /^\/task\/([^/]+)$/.exec(location.pathname);
  document.title = "taskbox";
  state.view = m ? taskView(main, decodeURIComponent(m[1])) : listView(main);
}

document.addEventListener("click", (e) => {
  const a = e.target.closest && e.target.closest("a[data-nav]");
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
  document.getElementById("main").focus();
});
window.addEventListener("popstate", route);
document.addEventListener("DOMContentLoaded", () => { route(); connect(); });
