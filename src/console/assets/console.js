// The operator console: plain JS, no dependencies. The admin key lives in sessionStorage and is
// sent as `Authorization: Bearer`. Live progress: `GET /v1/events` read with fetch (EventSource
// cannot send the header); when that answers 404 (or drops), the task list is polled every 2 s.
"use strict";
(function () {
  const KEY = "vo-console-key";
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const state = { view: "tasks", tasks: new Map(), live: "off", stream: null, poll: null, refresh: null };

  function key() { return sessionStorage.getItem(KEY); }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  class Unauthorized extends Error {}

  async function api(path, options) {
    const response = await fetch(path, Object.assign({}, options, {
      headers: { Authorization: "Bearer " + key(), Accept: "application/json" },
    }));
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      throw new Unauthorized(body.error || response.statusText);
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || response.status + " " + response.statusText);
    }
    return response.json();
  }

  function fmtTime(t) {
    if (!t) return "–";
    const d = new Date(t);
    return d.toLocaleString(undefined, { hour12: false });
  }
  function fmtNum(n, digits) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 0 : digits });
  }
  function setStatus(text, isError) {
    const line = $("status-line");
    line.textContent = text;
    line.className = isError ? "error" : "muted";
  }

  function bar(task) {
    const p = Math.max(0, Math.min(100, Number(task.progress) || 0));
    const cls = task.status === "completed" ? "bar done"
      : (task.status === "failed" || task.status === "timed_out") ? "bar bad" : "bar";
    const fill = el("span");
    fill.style.width = (task.status === "completed" ? 100 : p) + "%";
    return el("div", { class: cls, role: "progressbar", "aria-valuenow": String(p), "aria-valuemin": "0", "aria-valuemax": "100" },
      fill, el("em", {}, (task.status === "completed" ? 100 : p) + "%"));
  }

  // ----- tasks -----
  function taskRow(t) {
    return el("tr", { "data-request-id": t.requestId },
      el("td", { "data-label": "requestId" }, el("a", { href: "#task/" + encodeURIComponent(t.requestId) }, t.requestId)),
      el("td", { "data-label": "tenant" }, t.virtualKeyId),
      el("td", { "data-label": "status" }, el("span", { class: "status " + t.status }, t.status)),
      el("td", { "data-label": "progress", class: "progress" }, bar(t)),
      el("td", { "data-label": "provider" }, t.provider || "–"),
      el("td", { "data-label": "checks", class: "checks" }, fmtNum(t.checks)),
      el("td", { "data-label": "created" }, fmtTime(t.createdAt)));
  }

  function renderTasks() {
    const body = $("tasks-body");
    body.replaceChildren(...[...state.tasks.values()].map(taskRow));
    $("tasks-empty").hidden = state.tasks.size > 0;
  }

  async function loadTasks() {
    const q = new URLSearchParams();
    if ($("f-q").value.trim()) q.set("q", $("f-q").value.trim());
    if ($("f-tenant").value.trim()) q.set("tenant", $("f-tenant").value.trim());
    if ($("f-status").value) q.set("status", $("f-status").value);
    q.set("limit", "100");
    const data = await api("/v1/admin/tasks?" + q);
    state.tasks = new Map(data.tasks.map((t) => [t.requestId, t]));
    renderTasks();
  }

  function matchesFilters(update) {
    const tenant = $("f-tenant").value.trim(), status = $("f-status").value, q = $("f-q").value.trim().toLowerCase();
    return (!tenant || update.virtualKeyId === tenant) && (!status || update.status === status)
      && (!q || String(update.requestId).toLowerCase().includes(q));
  }

  // One event of the stream: update the task's row in place, or reload when it is new to us.
  function applyUpdate(update) {
    if (!update || !update.requestId) return;
    const known = state.tasks.get(update.requestId);
    if (!known) {
      if (matchesFilters(update)) scheduleRefresh();
      return;
    }
    if (update.status) known.status = update.status;
    if (update.progress !== undefined && update.progress !== null) known.progress = update.progress;
    const row = document.querySelector('tr[data-request-id="' + CSS.escape(update.requestId) + '"]');
    if (row) row.replaceWith(taskRow(known));
    if (state.view === "task" && state.taskId === update.requestId) loadTask(update.requestId).catch(() => {});
  }

  function scheduleRefresh() {
    if (state.refresh) return;
    state.refresh = setTimeout(() => { state.refresh = null; loadTasks().catch(report); }, 300);
  }

  // ----- live updates -----
  function startPolling(why) {
    state.live = "polling";
    $("live-mode").textContent = "Live: polling every 2 s (" + why + ").";
    stopPolling();
    state.poll = setInterval(() => {
      if (state.view === "tasks") loadTasks().catch(report);
      if (state.view === "task" && state.taskId) loadTask(state.taskId).catch(report);
    }, POLL_MS);
  }
  function stopPolling() { if (state.poll) { clearInterval(state.poll); state.poll = null; } }

  async function startStream() {
    const controller = new AbortController();
    state.stream = controller;
    let response;
    try {
      response = await fetch("/v1/events", {
        headers: { Authorization: "Bearer " + key(), Accept: "text/event-stream" },
        signal: controller.signal,
      });
    } catch (e) {
      startPolling("stream unreachable");
      setTimeout(() => { if (key() && state.stream === controller) startStream(); }, 10000);
      return;
    }
    if (response.status === 404) { startPolling("this build serves no /v1/events"); return; }
    if (!response.ok || !response.body) {
      startPolling("stream answered " + response.status);
      setTimeout(() => { if (key() && state.stream === controller) startStream(); }, 10000);
      return;
    }
    stopPolling();
    // Events carry status and progress; the other columns (checks, new pending tasks) are
    // refreshed now and then.
    state.poll = setInterval(() => { if (state.view === "tasks") loadTasks().catch(report); }, 15000);
    state.live = "stream";
    $("live-mode").textContent = "Live: streaming from /v1/events.";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          handleBlock(block);
        }
      }
    } catch (e) { /* aborted or the connection broke: fall through to reconnect */ }
    if (state.stream !== controller || !key()) return;
    startPolling("stream ended; reconnecting");
    setTimeout(() => { if (key() && state.stream === controller) startStream(); }, 3000);
  }

  function handleBlock(block) {
    let event = "message", data = [];
    for (const line of block.split(/\r?\n/)) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = v; else if (field === "data") data.push(v);
    }
    if (!data.length || event === "dropped") return;
    try { applyUpdate(JSON.parse(data.join("\n"))); } catch (e) { /* not JSON: ignore */ }
  }

  // ----- one task -----
  function facts(pairs) {
    const dl = el("dl", { class: "facts" });
    for (const [k, v] of pairs) dl.append(el("dt", {}, k), el("dd", {}, v === null || v === undefined || v === "" ? "–" : v));
    return dl;
  }

  async function loadTask(id) {
    const d = await api("/v1/admin/tasks/" + encodeURIComponent(id));
    const t = d.task;
    const timeline = el("ol", { class: "timeline" }, ...d.timeline.map((e) =>
      el("li", { "data-kind": e.kind }, el("time", {}, fmtTime(e.at)), el("span", { class: "kind" }, e.kind), e.detail)));
    const hooks = d.webhooks.length
      ? el("table", { class: "list" },
          el("thead", {}, el("tr", {}, el("th", {}, "event"), el("th", {}, "url"), el("th", {}, "attempts"), el("th", {}, "delivered"), el("th", {}, "last error"))),
          el("tbody", {}, ...d.webhooks.map((w) => el("tr", {},
            el("td", { "data-label": "event" }, w.eventType), el("td", { "data-label": "url" }, w.url),
            el("td", { "data-label": "attempts" }, w.attempts), el("td", { "data-label": "delivered" }, fmtTime(w.deliveredAt)),
            el("td", { "data-label": "last error" }, w.lastError || "–")))))
      : el("p", { class: "muted" }, "No webhook deliveries (no callbackUrl, or none yet).");
    $("task-detail").replaceChildren(
      el("h2", {}, t.requestId),
      el("div", { class: "grid2" },
        el("div", { class: "card" },
          facts([["status", el("span", { class: "status " + t.status }, t.status)], ["progress", bar(t)],
                 ["tenant", t.virtualKeyId], ["model", t.model], ["message", t.message], ["error", t.error],
                 ["video", t.videoUrl], ["created", fmtTime(t.createdAt)], ["finished", fmtTime(t.finishedAt)]])),
        el("div", { class: "card" },
          facts([["provider", d.provider.name], ["provider job", d.provider.jobId],
                 ["submitted", fmtTime(d.provider.submitAttemptedAt)], ["checks", fmtNum(d.checks.count)],
                 ["last check", fmtTime(d.checks.lastAt)], ["next check", fmtTime(d.checks.nextAt)],
                 ["check sequence", d.checks.sequence], ["tracking stopped", d.checks.trackingStopped ? "yes" : "no"],
                 ["outbox waiting", d.outbox.length], ["parked", d.parked.length]]))),
      el("h2", {}, "Timeline"), timeline,
      el("h2", {}, "Webhook deliveries"), hooks);
  }

  // ----- instances -----
  async function loadInstances() {
    const d = await api("/v1/admin/instances");
    const rows = d.instances.map((i) => el("tr", { "data-instance-id": i.instanceId },
      el("td", { "data-label": "instance" }, i.instanceId),
      el("td", { "data-label": "heartbeat" }, i.heartbeatAgeSeconds === null ? "none" : fmtNum(i.heartbeatAgeSeconds, 1) + " s ago"),
      el("td", { "data-label": "partitions" }, el("div", { class: "partitions" }, ...i.partitions.map((p) => el("span", {}, p)))),
      el("td", { "data-label": "count" }, i.partitions.length)));
    $("instances-detail").replaceChildren(
      el("p", {}, "Topology ", el("code", {}, d.topologyPrefix), ": " + d.partitions + " partitions, " + d.instances.length + " instances."),
      el("table", { class: "list" },
        el("thead", {}, el("tr", {}, el("th", {}, "instance"), el("th", {}, "heartbeat"), el("th", {}, "partitions held"), el("th", {}, "count"))),
        el("tbody", {}, ...rows)),
      el("h2", {}, "Partitions with no owner"),
      d.unowned.length ? el("div", { class: "partitions" }, ...d.unowned.map((p) => el("span", { class: "unowned" }, p)))
        : el("p", { class: "muted" }, "None: every partition has an owner."));
  }

  // ----- parked -----
  async function loadParked() {
    const d = await api("/v1/admin/parked?limit=100");
    $("parked-body").replaceChildren(...d.parked.map((p) => {
      const button = el("button", { type: "button", class: "requeue", "data-id": String(p.id) }, "Requeue");
      button.addEventListener("click", () => requeue(p.id, button));
      return el("tr", { "data-parked-id": String(p.id) },
        el("td", { "data-label": "id" }, p.id),
        el("td", { "data-label": "parked at" }, fmtTime(p.parkedAt)),
        el("td", { "data-label": "from queue" }, p.originalQueue),
        el("td", { "data-label": "routing key" }, p.routingKey),
        el("td", { "data-label": "reason", class: "reason" }, p.reason, el("br"), el("code", { class: "muted" }, p.bodyPreview)),
        el("td", {}, button));
    }));
    $("parked-empty").hidden = d.parked.length > 0;
  }

  async function requeue(id, button) {
    button.disabled = true;
    try {
      await api("/v1/admin/parked/" + id + "/requeue", { method: "POST" });
      setStatus("Requeued parked message " + id + ".");
      await loadParked();
      await loadFigures();
    } catch (e) { button.disabled = false; report(e); }
  }

  // ----- figures -----
  async function loadFigures() {
    const f = await api("/v1/admin/figures");
    $("fig-checks").textContent = f.checksPerSecond === null ? "–" : fmtNum(f.checksPerSecond, 1);
    $("fig-lag").textContent = f.lagP99Seconds === null ? "–" : fmtNum(f.lagP99Seconds * 1000, 1) + " ms";
    $("fig-orphaned").textContent = fmtNum(f.orphaned);
    $("fig-rearmed").textContent = fmtNum(f.rearmed);
    $("fig-parked").textContent = fmtNum(f.parkedWaiting);
    $("fig-parked").title = fmtNum(f.parked) + " parked by this instance since it started";
  }

  // ----- navigation -----
  function report(e) {
    if (e instanceof Unauthorized) { logout(e.message); return; }
    setStatus(String(e.message || e), true);
  }

  async function show() {
    const hash = location.hash.replace(/^#/, "") || "tasks";
    const [view, ...rest] = hash.split("/");
    state.view = ["tasks", "task", "instances", "parked"].includes(view) ? view : "tasks";
    state.taskId = state.view === "task" ? decodeURIComponent(rest.join("/")) : null;
    for (const v of ["tasks", "task", "instances", "parked"]) $("view-" + v).hidden = v !== state.view;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === state.view);
    try {
      if (state.view === "tasks") await loadTasks();
      if (state.view === "task") await loadTask(state.taskId);
      if (state.view === "instances") await loadInstances();
      if (state.view === "parked") await loadParked();
    } catch (e) { report(e); }
  }

  function loggedIn() {
    $("login").hidden = true; $("app").hidden = false; $("nav").hidden = false;
    show();
    loadFigures().catch(report);
    state.figures = setInterval(() => {
      loadFigures().catch(report);
      if (state.view === "instances") loadInstances().catch(report);
      if (state.view === "parked") loadParked().catch(report);
    }, POLL_MS);
    startStream();
  }

  function logout(message) {
    sessionStorage.removeItem(KEY);
    if (state.stream) state.stream.abort();
    state.stream = null;
    stopPolling();
    clearInterval(state.figures);
    $("app").hidden = true; $("nav").hidden = true; $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, $("key").value.trim());
      try {
        await api("/v1/admin/figures");
        $("key").value = "";
        $("login-error").textContent = "";
        loggedIn();
      } catch (e) {
        sessionStorage.removeItem(KEY);
        $("login-error").textContent = e instanceof Unauthorized ? "Refused: " + e.message : String(e.message || e);
      }
    });
    $("logout").addEventListener("click", () => logout());
    $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadTasks().catch(report); });
    $("f-status").addEventListener("change", () => loadTasks().catch(report));
    window.addEventListener("hashchange", show);
    if (key()) loggedIn();
  });
})();
