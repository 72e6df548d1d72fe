/* fleetloop operator dashboard: plain JS, no build step, no third-party code.
 *
 * Routes (location.hash): "#/" job list, "#/jobs/<id>" one job, live.
 * The API key lives in localStorage and travels only in the Authorization header; the live view
 * reads /v1/jobs/<id>/live (server-sent events) with fetch() + a ReadableStream for that reason
 * (EventSource cannot send headers). Charts are small hand-written SVG.
 */
"use strict";

(() => {
  const KEY_STORE = "fleetloop.apiKey";
  const SERIES_MAX = 3600;
  const EVENTS_MAX = 400;
  const SMOOTH = 5;           // points in the moving window of the rate charts
  const STALL_MS = 15000;     // no snapshot for this long: reconnect the live stream
  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
                   "#4b5563", "#65a30d"];
  const OPS = new Set(["operator", "admin"]);
  const TERMINAL = new Set(["stopped", "failed"]);

  const $ = (id) => document.getElementById(id);
  const state = {
    key: localStorage.getItem(KEY_STORE) || "",
    me: null,            // whoami
    gen: 0,              // bumps on every route / key change; stale loops check it and quit
    abort: null,         // AbortController of the live stream
    jobId: null,
    job: null, actors: [], policies: null, series: [], events: [], now: 0,
    releases: null,      // GET /v1/jobs/<id>/releases, carried by every live snapshot
    range: 0,            // chart window in seconds (0 = everything)
    busy: false,
  };

  // -- small helpers ------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "–");
  const fmtAxisPct = (v) => `${Math.round(v * 100)}%`;
  const fmtPct = (v) => (isNum(v) ? `${(v * 100).toFixed(v >= 0.995 || v === 0 ? 0 : 1)}%` : "–");
  function fmtNum(v, digits = 3) {
    if (!isNum(v)) return "–";
    const a = Math.abs(v);
    if (a >= 10000) return Math.round(v).toLocaleString("en-US");
    if (a >= 100) return v.toFixed(0);
    if (a === 0) return "0";
    if (a < 0.001) return v.toExponential(1);
    return Number(v.toPrecision(digits)).toString();
  }
  function fmtClock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }
  function fmtAgo(seconds) {
    if (!isNum(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 1) return "now";
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }
  const setText = (id, text) => { const el = $(id); if (el && el.textContent !== text) el.textContent = text; };

  // -- errors --------------------------------------------------------------------------------
  let bannerSource = null;
  function showError(message, source = "ui") {
    bannerSource = source;
    $("error-text").textContent = message;
    $("error-banner").hidden = false;
  }
  function clearError(source) {
    if (source === undefined || source === bannerSource) {
      $("error-banner").hidden = true;
      bannerSource = null;
    }
  }
  $("error-close").addEventListener("click", () => clearError());

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  /** The API's error as one line: {error:{message}}, FastAPI's 422 {detail:[...]}, or the status. */
  async function errorMessage(res) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    let msg = "";
    if (body && body.error && body.error.message) msg = body.error.message;
    else if (body && Array.isArray(body.detail)) {
      msg = body.detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
    } else if (body && typeof body.detail === "string") msg = body.detail;
    return `${res.status} ${res.statusText || ""}`.trim() + (msg ? ` – ${msg}` : "");
  }

  async function api(method, path, { signal } = {}) {
    const res = await fetch(path, {
      method, signal, cache: "no-store",
      headers: { Authorization: `Bearer ${state.key}`, Accept: "application/json" },
    });
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    return { status: res.status, body: res.status === 204 ? null : await res.json() };
  }

  // -- API key and identity -----------------------------------------------------------------
  function renderIdentity() {
    const who = $("whoami");
    const hasKey = !!state.key;
    $("key-form").hidden = hasKey && !!state.me;
    $("key-clear").hidden = !hasKey;
    if (state.me) {
      who.hidden = false;
      who.replaceChildren(h("span", { class: "who-name", text: state.me.name }),
        h("span", { class: `role role-${state.me.role}`, id: "whoami-role", "data-testid": "whoami-role", text: state.me.role }));
      who.dataset.role = state.me.role;
    } else {
      who.hidden = true;
      who.replaceChildren();
      delete who.dataset.role;
    }
  }

  async function loadIdentity() {
    state.me = null;
    renderIdentity();
    if (!state.key) return false;
    try {
      state.me = (await api("GET", "/v1/whoami")).body;
      clearError("auth");
      renderIdentity();
      return true;
    } catch (e) {
      showError(`API key not accepted: ${e.message}`, "auth");
      renderIdentity();
      return false;
    }
  }

  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = $("key-input").value.trim();
    if (!value) { showError("Paste an API key first.", "auth"); return; }
    state.key = value;
    localStorage.setItem(KEY_STORE, value);
    $("key-input").value = "";
    clearError();
    if (await loadIdentity()) route();
  });
  $("key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    state.key = "";
    state.me = null;
    clearError();
    renderIdentity();
    route();
  });

  // -- routing -------------------------------------------------------------------------------
  function stopLoops() {
    state.gen += 1;
    if (state.abort) { state.abort.abort(); state.abort = null; }
    setLive(null);
  }

  function route() {
    stopLoops();
    const gen = state.gen;
    const m = location.hash.match(/^#\/jobs\/([^/?#]+)/);
    for (const id of ["welcome", "jobs-view", "job-view"]) $(id).hidden = true;
    if (!state.key || !state.me) {
      $("welcome").hidden = false;
      setCrumbs([]);
      return;
    }
    if (m) {
      const jobId = decodeURIComponent(m[1]);
      setCrumbs([["Jobs", "#/"], [jobId, null]]);
      openJob(jobId, gen);
    } else {
      setCrumbs([["Jobs", null]]);
      $("jobs-view").hidden = false;
      pollJobs(gen);
    }
  }

  function setCrumbs(items) {
    $("crumbs").replaceChildren(...items.map(([label, href]) =>
      href ? h("a", { href, text: label }) : h("span", { text: label })));
  }

  // -- job list ------------------------------------------------------------------------------
  async function pollJobs(gen) {
    while (gen === state.gen) {
      try {
        const jobs = (await api("GET", "/v1/jobs")).body;
        if (gen !== state.gen) return;
        renderJobs(jobs);
        clearError("jobs");
      } catch (e) {
        if (gen !== state.gen) return;
        showError(`Could not list jobs: ${e.message}`, "jobs");
      }
      await sleep(3000);
    }
  }

  function renderJobs(jobs) {
    const now = Date.now() / 1000;
    const rows = jobs.map((j) => {
      const st = j.status || {};
      const href = `#/jobs/${encodeURIComponent(j.id)}`;
      return h("tr", { "data-testid": "job-row", "data-job-id": j.id, class: "clickable", onclick: (ev) => {
        if (ev.target.tagName !== "A") location.hash = href;
      } },
        h("td", {}, h("a", { href, class: "job-link", "data-testid": "job-link", text: j.id })),
        h("td", {}, stateBadge(j.state)),
        h("td", { class: "tasks", text: ((j.spec && j.spec.tasks) || []).join(", ") }),
        h("td", { class: "num", text: isNum(st.version) ? `v${st.version}` : "–" }),
        h("td", { class: "num", text: String(j.fleet_robots ?? 0) }),
        h("td", {}, learnerBadge(j)),
        h("td", { class: "muted", title: new Date(j.created_at * 1000).toISOString(), text: fmtAgo(now - j.created_at) }));
    });
    $("jobs-table").tBodies[0].replaceChildren(...rows);
    $("jobs-empty").hidden = jobs.length > 0;
    setText("jobs-updated", `updated ${fmtClock(now)}`);
  }

  function stateBadge(s, id) {
    return h("span", { class: `badge state-${s}`, id, text: s });
  }
  function learnerBadge(j) {
    if (TERMINAL.has(j.state)) return h("span", { class: "muted", text: "–" });
    if (j.learner_alive) return h("span", { class: "ok", text: "alive" });
    if (isNum(j.heartbeat_age_s)) return h("span", { class: "bad", text: `silent ${Math.round(j.heartbeat_age_s)} s` });
    return h("span", { class: "muted", text: "not started" });
  }

  // -- one job, live -------------------------------------------------------------------------
  function setLive(mode, detail) {
    const el = $("live-status");
    if (!mode) { el.hidden = true; return; }
    el.hidden = false;
    el.className = `live live-${mode}`;
    el.dataset.state = mode;
    el.textContent = { live: "● live", connecting: "connecting…", reconnecting: "reconnecting…", error: "not live" }[mode] || mode;
    el.title = detail || "";
  }

  function resetJobData(jobId) {
    Object.assign(state, { jobId, job: null, actors: [], policies: null, series: [], events: [], now: 0, releases: null });
    $("fleet-table").tBodies[0].replaceChildren();
    $("release-evidence").tBodies[0].replaceChildren();
    for (const b of [...$("release-history").tBodies]) b.remove();
    $("release-controls-slot").replaceChildren();
    $("releases-card").hidden = true;
    $("tasks-table").tBodies[0].replaceChildren();
    $("events-list").replaceChildren();
    for (const id of ["chart-success", "chart-intervention", "chart-loss", "chart-ingest", "chart-versions"]) $(id).replaceChildren();
    $("controls-slot").replaceChildren();
    setText("job-name", jobId);
    $("job-state").textContent = "…";
    $("job-state").className = "badge";
  }

  function openJob(jobId, gen) {
    resetJobData(jobId);
    $("job-view").hidden = false;
    renderControls();
    streamJob(jobId, gen);
  }

  async function streamJob(jobId, gen) {
    let backoff = 1000;
    while (gen === state.gen) {
      const ctrl = new AbortController();
      state.abort = ctrl;
      setLive(state.job ? "reconnecting" : "connecting");
      let lastData = Date.now();
      const watchdog = setInterval(() => { if (Date.now() - lastData > STALL_MS) ctrl.abort(); }, 1000);
      try {
        const res = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/live?interval=1`, {
          signal: ctrl.signal, cache: "no-store",
          headers: { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" },
        });
        if (!res.ok) {
          const msg = await errorMessage(res);
          if (gen !== state.gen) return;
          showError(`Live view of ${jobId}: ${msg}`, "live");
          if ([401, 403, 404].includes(res.status)) { setLive("error", msg); return; }
          throw new ApiError(res.status, msg);
        }
        // a new stream starts over: its first snapshot carries the whole history
        state.series = [];
        state.events = [];
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done || gen !== state.gen) break;
          lastData = Date.now();
          buf += decoder.decode(value, { stream: true }).replace(/\r/g, "");
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            if (handleBlock(block, gen)) { backoff = 1000; setLive("live", `last update ${fmtClock(Date.now() / 1000)}`); }
          }
        }
      } catch (e) {
        if (gen !== state.gen) return;
        if (!(e instanceof ApiError) && e.name !== "AbortError") showError(`Live view of ${jobId} lost: ${e.message}`, "live");
      } finally {
        clearInterval(watchdog);
      }
      if (gen !== state.gen) return;
      setLive("reconnecting");
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 10000);
    }
  }

  /** One SSE block ("event: x\ndata: ..."); true when it was a snapshot. */
  function handleBlock(block, gen) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (type !== "snapshot" || !data.length || gen !== state.gen) return false;
    let snap;
    try { snap = JSON.parse(data.join("\n")); } catch (e) { showError(`Bad snapshot from the API: ${e.message}`, "live"); return false; }
    clearError("live");
    onSnapshot(snap);
    return true;
  }

  const VERSIONS_MAX = 5000;

  function onSnapshot(snap) {
    state.job = snap.job;
    state.actors = snap.actors || [];
    // snapshots carry only versions newer than the previous snapshot's (and evaluated ones): merge
    if (snap.policies) {
      const byVersion = new Map(((state.policies && state.policies.versions) || []).map((v) => [v.version, v]));
      for (const v of snap.policies.versions || []) byVersion.set(v.version, v);
      let merged = [...byVersion.values()].sort((a, b) => a.version - b.version);
      if (merged.length > VERSIONS_MAX) merged = merged.slice(merged.length - VERSIONS_MAX);
      state.policies = { ...snap.policies, versions: merged };
    }
    if (snap.releases) state.releases = snap.releases;
    state.now = snap.time || Date.now() / 1000;
    if (snap.role && state.me && snap.role !== state.me.role) { state.me.role = snap.role; renderIdentity(); }
    const lastT = state.series.length ? state.series[state.series.length - 1].t : -Infinity;
    for (const p of snap.series || []) if (p.t > lastT) state.series.push(p);
    if (state.series.length > SERIES_MAX) state.series.splice(0, state.series.length - SERIES_MAX);
    const seen = new Set(state.events.map((e) => e.id));
    for (const e of snap.events || []) if (!seen.has(e.id)) state.events.push(e);
    trimEvents();
    renderJob();
  }

  /** Keep at most EVENTS_MAX events, dropping the frequent "published" reports first, so that
   * state changes and commands stay visible however many versions were published since. */
  function trimEvents() {
    let extra = state.events.length - EVENTS_MAX;
    if (extra <= 0) return;
    const keepPublished = 50;
    let published = state.events.filter((e) => e.type === "published").length;
    state.events = state.events.filter((e) => {
      if (extra > 0 && e.type === "published" && published > keepPublished) { extra -= 1; published -= 1; return false; }
      return true;
    });
    if (state.events.length > EVENTS_MAX) state.events.splice(0, state.events.length - EVENTS_MAX);
  }

  function renderJob() {
    if (!state.job) return;
    renderHeader();
    renderControls();
    renderReleases();
    renderFleet();
    renderTasks();
    renderEvaluations();
    renderCharts();
    renderEvents();
  }

  function lastValue(field) {
    for (let i = state.series.length - 1; i >= 0; i--) if (isNum(state.series[i][field])) return state.series[i][field];
    return null;
  }

  function renderHeader() {
    const j = state.job, st = j.status || {}, pol = state.policies || {};
    setText("job-name", j.id);
    const badge = $("job-state");
    badge.textContent = j.state;
    badge.className = `badge state-${j.state}`;
    badge.dataset.state = j.state;
    let learner = "";
    if (j.learner && !TERMINAL.has(j.state)) learner = `learner ${j.learner.target}`;
    if (!TERMINAL.has(j.state) && j.state !== "pending" && !j.learner_alive) {
      learner += isNum(j.heartbeat_age_s) ? ` · silent for ${Math.round(j.heartbeat_age_s)} s` : " · no heartbeat yet";
    }
    if (TERMINAL.has(j.state) && st.final) learner = `learner stopped${isNum(st.stopped_at) ? ` at ${fmtClock(st.stopped_at)}` : ""} · final numbers`;
    if (j.error) learner += ` · error: ${j.error}`;
    setText("job-learner", learner);
    $("job-learner").className = j.error || (!j.learner_alive && !TERMINAL.has(j.state)) ? "bad" : "muted";
    setText("stat-version", isNum(st.version) ? `v${st.version}` : "–");
    const pinned = pol.pinned ?? j.pinned;
    setText("stat-pinned", isNum(pinned) ? `v${pinned}` : "none");
    $("stat-pinned").className = isNum(pinned) ? "pinned" : "";
    const fv = pol.fleet_version ?? st.fleet_version;
    setText("stat-fleet-version", isNum(fv) ? `v${fv}` : "–");
    setText("stat-step", fmtInt(st.step));
    setText("stat-loss", fmtNum(st.loss, 4));
    // a stopped learner's final status says 0: nothing is trained or ingested any more
    setText("stat-updates", fmtNum(st.final ? st.updates_per_s : lastValue("updates_per_s")));
    setText("stat-ingest", fmtNum(st.final ? st.ingest_steps_per_s : lastValue("ingest_steps_per_s")));
    const tasks = Object.values(st.tasks || {});
    const sum = (f) => (tasks.length ? tasks.reduce((a, t) => a + (t[f] || 0), 0) : null);
    setText("stat-online", fmtInt(sum("online_buffer")));
    setText("stat-offline", fmtInt(sum("offline_buffer")));
    // two different stalenesses: of the samples trained on (bounded), and how far robots run behind now
    const stale = st.staleness_max_autonomous ?? st.staleness_max;
    const bound = st.staleness_bound;
    setText("stat-staleness", isNum(stale) ? (isNum(bound) ? `${stale} / ${bound}` : String(stale)) : "–");
    $("stat-staleness").title = "Largest staleness (learner version at training minus the version that produced it) of any " +
      "autonomous frame trained on, whole run" + (isNum(bound) ? `, / the bound ${bound}: frames past it are dropped, not trained` : "");
    renderFleetStaleness(bound);
  }

  /** Header: the furthest-behind robot (learner's newest version minus its newest chunk's) and the
   * steps dropped at ingest, summed over robots, by reason. */
  function renderFleetStaleness(bound) {
    let worst = null;
    for (const a of state.actors) {
      if (!isNum(a.staleness) || a.status === "gone" || a.status === "left") continue;
      if (!worst || a.staleness > worst.staleness) worst = a;
    }
    const el = $("stat-fleet-staleness");
    setText("stat-fleet-staleness", worst ? String(worst.staleness) : "–");
    el.className = worst && isNum(bound) && worst.staleness > bound ? "bad" : "";
    el.title = worst ? `${worst.actor_id} runs v${worst.version}, ${worst.staleness} versions behind the learner's newest` +
      (isNum(bound) && worst.staleness > bound ? `: past the bound ${bound}, its autonomous frames are dropped` : "") : "";
    const byReason = {};
    for (const a of state.actors) for (const [r, n] of Object.entries(a.dropped || {})) byReason[r] = (byReason[r] || 0) + n;
    const total = Object.values(byReason).reduce((x, y) => x + y, 0);
    setText("stat-dropped", fmtInt(total));
    $("stat-dropped").className = total ? "bad" : "";
    $("stat-dropped").title = total ? Object.entries(byReason).map(([r, n]) => `${fmtInt(n)} ${dropLabel(r)}`).join(" · ") +
      " (steps dropped at ingest, whole run)" : "no step dropped at ingest";
  }
  const DROP_LABELS = { stale: "stale", stale_expert_only: "stale autonomous (operator frames kept)", future_version: "future version" };
  const dropLabel = (r) => DROP_LABELS[r] || r.replace(/_/g, " ");

  // -- operator controls ---------------------------------------------------------------------
  function canOperate() { return !!state.me && OPS.has(state.me.role); }

  function renderControls() {
    const slot = $("controls-slot");
    if (!canOperate()) { if (slot.firstChild) slot.replaceChildren(); return; }
    if (!$("controls")) {
      slot.replaceChildren($("controls-template").content.cloneNode(true));
      bindControls();
    }
    const j = state.job;
    const s = j ? j.state : null;
    const active = s === "running" || s === "paused";
    const pinned = state.policies ? state.policies.pinned : j && j.pinned;
    const latest = state.policies ? state.policies.latest : null;
    const dis = (id, off) => { $(id).disabled = state.busy || off; };
    dis("btn-pause", s !== "running");
    dis("btn-resume", s !== "paused");
    dis("btn-stop", !j || TERMINAL.has(s) || s === "stopping");
    dis("btn-pin", !active || !isNum(latest));
    dis("btn-unpin", !active || !isNum(pinned));
    dis("btn-rollback", !active || !isNum(latest));
    dis("btn-evaluate", !isNum(latest));
    const input = $("version-input");
    if (isNum(latest)) { input.max = String(latest); input.placeholder = `0–${latest}`; }
    $("version-input").disabled = state.busy || !active;
  }

  function bindControls() {
    const base = () => `/v1/jobs/${encodeURIComponent(state.jobId)}`;
    $("btn-pause").addEventListener("click", () => control("Pause", `${base()}/pause`));
    $("btn-resume").addEventListener("click", () => control("Resume", `${base()}/resume`));
    $("btn-stop").addEventListener("click", () => control("Stop", `${base()}/stop`,
      `Stop job ${state.jobId}? The fleet finishes its episodes and leaves; the learner checkpoints and exits. This cannot be undone.`));
    $("btn-unpin").addEventListener("click", () => control("Unpin", `${base()}/policies/unpin`));
    $("btn-pin").addEventListener("click", () => {
      const v = chosenVersion();
      if (v !== null) control(`Pin v${v}`, `${base()}/policies/${v}/pin`);
    });
    $("btn-rollback").addEventListener("click", () => {
      const v = chosenVersion();
      if (v !== null) control(`Roll back to v${v}`, `${base()}/policies/${v}/rollback`,
        `Roll back job ${state.jobId} to v${v}? Its weights are republished as a new version and training continues from them; any pin is cleared.`);
    });
    bindEvaluate(base);
  }

  function bindEvaluate(base) {
    $("btn-evaluate").addEventListener("click", () => {
      const v = chosenVersion();
      if (v !== null) control(`Evaluate v${v}`, `${base()}/policies/${v}/evaluate?trials=20`);
    });
  }

  function chosenVersion() {
    const raw = $("version-input").value.trim();
    if (!/^\d+$/.test(raw)) { showError("Enter a policy version number (0 or more) first.", "control"); $("version-input").focus(); return null; }
    return Number(raw);
  }

  /** POST `path`; the outcome goes to the status line `statusId` (a release command also refreshes the panel). */
  async function control(label, path, confirmText, statusId = "control-status") {
    if (confirmText && !window.confirm(confirmText)) return;
    const gen = state.gen;
    state.busy = true;
    renderControls();
    renderReleaseControls();
    setText(statusId, `${label}…`);
    try {
      const res = await api("POST", path);
      clearError("control");
      const queued = res.status === 202 && res.body && res.body.status === "queued";
      const el = $(statusId);
      if (el) { el.dataset.status = queued ? "queued" : "done"; el.dataset.commandId = (res.body && res.body.command_id) || ""; }
      setText(statusId, queued ? `${label}: queued – the learner runs it when it next polls` : `${label}: done`);
      // show the effect now rather than at the next snapshot
      const job = (await api("GET", `/v1/jobs/${encodeURIComponent(state.jobId)}`)).body;
      if (gen === state.gen && state.job) { state.job = job; renderHeader(); }
      if (statusId === "release-control-status") {
        const rel = (await api("GET", `/v1/jobs/${encodeURIComponent(state.jobId)}/releases`)).body;
        if (gen === state.gen) { state.releases = rel; renderReleases(); }
      }
    } catch (e) {
      setText(statusId, `${label}: failed`);
      if ($(statusId)) $(statusId).dataset.status = "failed";
      showError(`${label} failed: ${e.message}`, "control");
    } finally {
      state.busy = false;
      if (gen === state.gen) { renderControls(); renderReleaseControls(); }
    }
  }


  // -- releases (canary cohorts, automatic promotion and rollback) ------------------------------
  const PCT_METRICS = new Set(["autonomous_success", "intervention_rate"]);
  /** "canary" when the actor runs the open candidate, "stable" when it is in the stable cohort, else "". */
  function releaseChannel(actorId) {
    const rel = state.releases;
    if (!rel || rel.strategy !== "canary" || !rel.cohorts) return "";
    if (isNum(rel.candidate) && (rel.cohorts.canary || []).includes(actorId)) return "canary";
    return (rel.cohorts.stable || []).includes(actorId) ? "stable" : "";
  }
  const fmtVersion = (v) => (isNum(v) ? `v${v}` : "–");
  const fmtMetric = (k, v) => (PCT_METRICS.has(k) ? fmtPct(v) : fmtNum(v));

  function policyText(rel) {
    const p = rel.policy || {};
    if (rel.strategy !== "canary") return "strategy all: every robot runs the newest version";
    const cohort = (p.canary_actors || []).length ? `canary robots ${p.canary_actors.join(", ")}` : `canary ${isNum(p.canary_fraction) ? Number((p.canary_fraction * 100).toFixed(1)) : "–"}% of the robots`;
    return `strategy canary · ${cohort} · decide after ${p.min_episodes} episodes per cohort (forced at ${p.max_episodes}) on ` +
      `${(p.metrics || []).join(", ")} · max regression ${p.max_regression} · confidence ${p.confidence}`;
  }

  function releaseStateText(rel) {
    if (isNum(rel.pinned)) return `pinned to v${rel.pinned}: the pin overrides releases`;
    if (rel.strategy !== "canary") return "every robot runs the newest version";
    if (!isNum(rel.candidate)) return "no candidate open: the next published version becomes one";
    const p = rel.policy || {}, ev = rel.evidence || {};
    const nc = (ev.candidate && ev.candidate.episodes) || 0, ns = (ev.stable && ev.stable.episodes) || 0;
    if (nc < p.min_episodes || ns < p.min_episodes) {
      return `collecting evidence: ${nc} canary / ${ns} stable episodes of ${p.min_episodes} each`;
    }
    return `deciding: ${nc} canary / ${ns} stable episodes (a decision is forced at ${p.max_episodes})`;
  }

  function renderReleases() {
    const rel = state.releases;
    $("releases-card").hidden = !rel;
    if (!rel) return;
    $("releases-card").dataset.strategy = rel.strategy;
    setText("releases-policy", policyText(rel));
    setText("release-stable", fmtVersion(rel.stable));
    setText("release-candidate", isNum(rel.candidate) ? `v${rel.candidate}` : "none");
    $("release-candidate").className = isNum(rel.candidate) ? "candidate" : "";
    const sizes = rel.cohort_sizes || { canary: 0, stable: 0 };
    setText("release-canary-size", rel.strategy === "canary" ? `${sizes.canary} of ${sizes.canary + sizes.stable}` : "–");
    setText("release-state", releaseStateText(rel));
    let note = !rel.reported ? "The learner has reported no release yet." : rel.problem || "";
    if (!note && rel.strategy !== "canary") {
      note = `New versions reach every robot at once. To try them on a canary cohort first: fleetloop job rollout ${rel.job_id} --strategy canary`;
    }
    setText("release-note", note);
    $("release-note").hidden = !note;
    $("release-note").className = rel.problem ? "bad small" : "muted small";
    renderReleaseControls();
    renderReleaseEvidence(rel);
    renderReleaseHistory(rel);
  }

  function evidenceCells(m, names) {
    m = m || {};
    return names.map((k) => h("td", { class: "num", "data-col": k, text: k === "episodes" ? fmtInt(m.episodes) : fmtMetric(k, m[k]) }));
  }
  const EVIDENCE_COLS = ["episodes", "autonomous_success", "intervention_rate", "episode_length", "reward"];

  function renderReleaseEvidence(rel) {
    const ev = rel.evidence || {}, cohorts = rel.cohorts || {};
    const show = rel.strategy === "canary" || isNum(rel.candidate);
    $("release-evidence-box").hidden = !show;
    if (!show) { $("release-evidence").tBodies[0].replaceChildren(); return; }
    const rows = [];
    for (const [cohort, version, ids, m] of [["canary", rel.candidate, cohorts.canary || [], ev.candidate],
                                             ["stable", rel.stable, cohorts.stable || [], ev.stable]]) {
      const robots = ids.length ? ids.map((id) => h("span", { class: `pill robot robot-${cohort}`, text: id })) : [h("span", { class: "muted", text: "none" })];
      rows.push(h("tr", { "data-cohort": cohort, "data-testid": "release-cohort" },
        h("td", {}, h("span", { class: `pill cohort-${cohort}`, text: cohort === "canary" ? (isNum(rel.candidate) ? "canary (candidate)" : "canary") : "stable" })),
        h("td", { class: "num", text: fmtVersion(version) }),
        h("td", { class: "robots", "data-col": "robots" }, ...robots),
        ...evidenceCells(m, EVIDENCE_COLS)));
      for (const [task, tm] of Object.entries((m && m.per_task) || {}).sort()) {
        rows.push(h("tr", { class: "subrow", "data-cohort": cohort, "data-task": task },
          h("td", { class: "muted", text: `  ${task}` }), h("td", {}), h("td", {}), ...evidenceCells(tm, EVIDENCE_COLS)));
      }
    }
    $("release-evidence").tBodies[0].replaceChildren(...rows);
  }

  function renderReleaseHistory(rel) {
    const hist = rel.history || [];
    $("release-history-box").hidden = !hist.length;
    const pair = (k, mc, ms) => `${fmtMetric(k, (mc || {})[k])} / ${fmtMetric(k, (ms || {})[k])}`;
    // one <tbody> per decision: its numbers, then its reason across the whole table
    const bodies = hist.slice().reverse().map((d) => {
      const m = d.metrics || {}, eps = d.episodes || {};
      const sizes = d.cohort_sizes ? ` (${d.cohort_sizes.canary} / ${d.cohort_sizes.stable} robots)` : "";
      return h("tbody", { "data-testid": "release-decision", "data-decision": d.decision, "data-release": String(d.id) },
        h("tr", {},
          h("td", { text: String(d.id) }),
          h("td", { class: "muted", title: isNum(d.decided_at) ? new Date(d.decided_at * 1000).toISOString() : "",
            text: isNum(d.decided_at) ? `${fmtClock(d.decided_at)} (${fmtAgo(state.now - d.decided_at)})` : "–" }),
          h("td", { text: fmtVersion(d.candidate) }), h("td", { text: fmtVersion(d.stable) }),
          h("td", {}, h("span", { class: `pill decision-${d.decision}`, text: d.decision.replace("_", " ") })),
          h("td", { text: d.by }),
          h("td", { class: "num", text: `${fmtInt(eps.canary)} / ${fmtInt(eps.stable)}${sizes}` }),
          h("td", { class: "num", text: pair("autonomous_success", m.candidate, m.stable) }),
          h("td", { class: "num", text: pair("intervention_rate", m.candidate, m.stable) }),
          h("td", { class: "num", text: isNum(d.p_not_worse) ? d.p_not_worse.toFixed(3) : "–" })),
        h("tr", { class: "reason-row" },
          h("td", {}), h("td", { colspan: "9", class: "reason" }, h("span", { class: "muted", text: "reason: " }),
            h("span", { "data-testid": "release-reason", text: d.reason || "–" }))));
    });
    const table = $("release-history");
    for (const b of [...table.tBodies]) b.remove();
    table.append(...bodies);
  }

  function renderReleaseControls() {
    const slot = $("release-controls-slot");
    const rel = state.releases;
    if (!canOperate() || !rel || (rel.strategy !== "canary" && !isNum(rel.candidate))) {
      if (slot.firstChild) slot.replaceChildren();
      return;
    }
    if (!$("release-controls")) {
      slot.replaceChildren($("release-controls-template").content.cloneNode(true));
      const base = () => `/v1/jobs/${encodeURIComponent(state.jobId)}/releases`;
      $("btn-promote").addEventListener("click", () => {
        const rel = state.releases || {};
        control(`Promote v${rel.candidate}`, `${base()}/promote`,
          `Promote v${rel.candidate} to stable now, without waiting for the evidence? Every robot runs it from its next episode.`,
          "release-control-status");
      });
      $("btn-abort-release").addEventListener("click", () => {
        const rel = state.releases || {};
        control(`Abort v${rel.candidate}`, `${base()}/abort`,
          `Abort the release of v${rel.candidate}? Every robot runs the stable version v${rel.stable} again from its next episode.`,
          "release-control-status");
      });
    }
    const s = state.job ? state.job.state : null;
    const open = (s === "running" || s === "paused") && isNum(state.releases.candidate);
    $("btn-promote").disabled = state.busy || !open;
    $("btn-abort-release").disabled = state.busy || !open;
    const why = open ? "" : isNum(state.releases.candidate) ? "the job is not running" : "no release candidate is open";
    $("btn-promote").title = why || `make v${state.releases.candidate} stable now: every robot runs it from its next episode`;
    $("btn-abort-release").title = why || `every robot runs the stable v${state.releases.stable} again`;
  }

  // -- fleet and task tables -----------------------------------------------------------------
  const FLEET_COLS = ["actor", "status", "task", "version", "staleness", "dropped", "episodes", "success", "intervention", "seen"];

  function renderFleet() {
    const tbody = $("fleet-table").tBodies[0];
    const byId = new Map([...tbody.rows].map((r) => [r.dataset.actorId, r]));
    const keep = new Set();
    const counts = {};
    state.actors.forEach((a, i) => {
      keep.add(a.actor_id);
      counts[a.status] = (counts[a.status] || 0) + 1;
      let row = byId.get(a.actor_id);
      if (!row) {
        row = h("tr", { "data-testid": "actor-row", "data-actor-id": a.actor_id },
          ...FLEET_COLS.map((c) => h("td", { "data-col": c, class: ["actor", "status", "task"].includes(c) ? "" : "num" })));
      }
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
      row.dataset.status = a.status;
      const cell = (c) => row.querySelector(`[data-col="${c}"]`);
      const actor = cell("actor");
      if (!actor.firstChild) actor.append(h("b", { text: a.actor_id }), " ", h("span", { class: "muted small", text: a.kind }));
      const channel = releaseChannel(a.actor_id);
      if ((row.dataset.channel || "") !== channel) {
        row.dataset.channel = channel;
        const old = actor.querySelector(".channel");
        if (old) old.remove();
        if (channel === "canary") actor.append(h("span", { class: "pill channel channel-canary", "data-testid": "canary-pill", text: "canary",
          title: `runs the release candidate v${state.releases && state.releases.candidate}` }));
      }
      const st = cell("status");
      if (st.textContent !== a.status) st.replaceChildren(h("span", { class: `pill status-${a.status}`, text: a.status }));
      setCell(cell("task"), a.task || "–", (a.tasks || []).length ? `tasks: ${a.tasks.join(", ")}` : "");
      setCell(cell("version"), a.version >= 0 ? `v${a.version}` : "–");
      const bound = ((state.job && state.job.status) || {}).staleness_bound;
      const past = isNum(a.staleness) && isNum(bound) && a.staleness > bound;
      setCell(cell("staleness"), isNum(a.staleness) ? String(a.staleness) : "–", isNum(a.staleness)
        ? `${a.staleness} versions behind the learner's newest${past ? `: past the bound ${bound}, its autonomous frames are dropped` : ""}` : "");
      cell("staleness").classList.toggle("bad", past);
      renderDropped(cell("dropped"), a.dropped || {});
      setCell(cell("episodes"), fmtInt(a.episodes));
      const succ = cell("success");
      const pct = fmtPct(a.success_rate);
      if (succ.dataset.v !== pct) {
        succ.dataset.v = pct;
        succ.replaceChildren(bar(a.success_rate, "bar-ok"), h("span", { text: pct }));
        succ.title = `${a.successes} of ${a.episodes} episodes`;
      }
      const intr = cell("intervention");
      const ipct = fmtPct(a.episodes || a.steps ? a.intervention_ratio : null);
      if (intr.dataset.v !== ipct) {
        intr.dataset.v = ipct;
        intr.replaceChildren(bar(a.steps ? a.intervention_ratio : null, "bar-warn"), h("span", { text: ipct }));
        intr.title = `${fmtInt(a.intervention_steps)} of ${fmtInt(a.steps)} steps by the operator`;
      }
      setCell(cell("seen"), fmtAgo(state.now - a.last_seen), new Date(a.last_seen * 1000).toISOString());
    });
    for (const [id, row] of byId) if (!keep.has(id)) row.remove();
    $("fleet-empty").hidden = state.actors.length > 0;
    const order = ["active", "idle", "stopping", "gone", "stopped", "left", "revoked"];
    setText("fleet-summary", state.actors.length
      ? order.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(" · ")
      : "");
  }
  /** Steps of one robot dropped at ingest, per reason: "374 stale · 12 stale autonomous". */
  function renderDropped(td, dropped) {
    const items = Object.entries(dropped).filter(([, n]) => n > 0).sort((x, y) => y[1] - x[1]);
    const key = JSON.stringify(items);
    if (td.dataset.v === key) return;
    td.dataset.v = key;
    td.title = items.length ? "steps dropped at ingest by the staleness gate, whole run: " +
      items.map(([r, n]) => `${fmtInt(n)} ${dropLabel(r)}`).join(", ") : "no step dropped";
    if (!items.length) { td.replaceChildren(h("span", { class: "muted", text: "–" })); return; }
    td.replaceChildren(...items.flatMap(([r, n], i) => [...(i ? [" · "] : []),
      h("span", { class: "drop", "data-reason": r, "data-count": String(n), text: `${fmtInt(n)} ${r === "stale_expert_only" ? "stale autonomous" : dropLabel(r)}` })]));
  }
  function setCell(td, text, title) {
    if (td.textContent !== text) td.textContent = text;
    if (title !== undefined && td.title !== title) td.title = title;
  }
  function bar(frac, cls) {
    const w = isNum(frac) ? Math.max(0, Math.min(1, frac)) * 100 : 0;
    return h("span", { class: `bar ${cls}` }, h("span", { style: `width:${w.toFixed(1)}%` }));
  }

  function renderEvaluations() {
    const vs = ((state.policies && state.policies.versions) || []).filter((v) => v.evaluation);
    $("evals-box").hidden = !vs.length;
    const rows = vs.slice().reverse().map((v) => {
      const e = v.evaluation;
      const per = e.tasks ? Object.entries(e.tasks).map(([t, r]) => `${t} ${fmtPct(r.success_rate)}`).join(" · ") : (e.error || "");
      return h("tr", { "data-version": String(v.version) },
        h("td", { text: `v${v.version}` }), h("td", { text: e.state }),
        h("td", { class: "num", text: fmtInt(e.trials) }),
        h("td", { class: "num", text: isNum(e.mean_success) ? fmtPct(e.mean_success) : "–" }),
        h("td", { text: per }));
    });
    $("evals-table").tBodies[0].replaceChildren(...rows);
  }

  function renderTasks() {
    const st = (state.job && state.job.status) || {};
    const tasks = taskNames();
    const rows = tasks.map((t, i) => {
      const v = (st.tasks || {})[t] || {};
      const ep = v.episodes || {};
      const n = Object.values(ep).reduce((a, b) => a + b, 0);
      return h("tr", { "data-task": t },
        h("td", {}, h("span", { class: "swatch", style: `background:${taskColor(i)}` }), t),
        h("td", { class: "num", text: fmtInt(n) }),
        h("td", { class: "num", text: n ? `${fmtInt(ep.success || 0)} (${fmtPct((ep.success || 0) / n)})` : "–" }),
        h("td", { class: "num", text: `${fmtInt(ep.failure || 0)} / ${fmtInt(ep.timeout || 0)}` }),
        h("td", { class: "num", text: isNum(v.steps) && v.steps ? `${fmtInt(v.intervention_steps)} (${fmtPct(v.intervention_steps / v.steps)})` : "–" }),
        h("td", { class: "num", text: fmtInt(v.online_buffer) }));
    });
    $("tasks-table").tBodies[0].replaceChildren(...rows);
  }

  function taskNames() {
    const j = state.job;
    const names = [...((j && j.spec && j.spec.tasks) || [])];
    for (const p of state.series) for (const t of Object.keys(p.tasks || {})) if (!names.includes(t)) names.push(t);
    return names;
  }
  const taskColor = (i) => PALETTE[i % PALETTE.length];

  // -- events --------------------------------------------------------------------------------
  function eventSummary(e) {
    const d = e.data || {};
    switch (e.type) {
      case "state": return `${d.previous || "?"} → ${d.state}${d.error ? ` (${d.error})` : ""}`;
      case "command": {
        const args = d.result && typeof d.result === "object"
          ? Object.entries(d.result).map(([k, v]) => `${k}=${v}`).join(" ") : "";
        return `${d.op}${d.ok === false ? ` failed: ${d.error}` : ""}${args ? ` (${args})` : ""}`;
      }
      case "published": return d.count > 1 ? `v${d.version - d.count + 1} → v${d.version} at step ${fmtInt(d.step)}`
        : `v${d.version} at step ${fmtInt(d.step)}`;
      default:
        return Object.entries(d).filter(([, v]) => v !== null && v !== undefined && v !== "")
          .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    }
  }

  function renderEvents() {
    // newest first; runs of "published" collapse into one line
    const items = [];
    for (let i = state.events.length - 1; i >= 0 && items.length < 60; i--) {
      const e = state.events[i];
      const prev = items[items.length - 1];
      if (e.type === "published" && prev && prev.type === "published") {
        prev.first = e;
        prev.n += 1;
        continue;
      }
      items.push({ type: e.type, last: e, first: e, n: 1 });
    }
    const lis = items.map((it) => {
      let text;
      if (it.type === "published" && it.n > 1) {
        const from = it.first.data.version - Math.max(1, it.first.data.count || 1) + 1;
        const total = it.last.data.version - from + 1;
        text = `v${from} → v${it.last.data.version} (${fmtInt(total)} versions)`;
      } else text = eventSummary(it.last);
      return h("li", { "data-type": it.type || "" },
        h("time", { text: fmtClock(it.last.time), title: new Date(it.last.time * 1000).toISOString() }),
        h("span", { class: `etype etype-${it.type}`, text: it.type || "event" }),
        h("span", { class: "esrc", text: it.last.source || "" }),
        h("span", { class: "etext", text }));
    });
    if (!lis.length) lis.push(h("li", { class: "empty", text: "No events yet." }));
    $("events-list").replaceChildren(...lis);
  }

  // -- charts --------------------------------------------------------------------------------
  /** Per task, [t, value] of `field` (success | intervention) averaged over the last SMOOTH
   * points that have one (weighted by the episodes each point covers); null points are skipped. */
  function smoothTask(points, task, field) {
    const out = [], win = [];
    for (const p of points) {
      const v = p.tasks && p.tasks[task];
      if (!v || !isNum(v[field])) continue;
      win.push([v[field], Math.max(1, v.episodes || 0)]);
      if (win.length > SMOOTH) win.shift();
      let s = 0, w = 0;
      for (const [x, wt] of win) { s += x * wt; w += wt; }
      out.push([p.t, s / w]);
    }
    return out;
  }
  function smoothField(points, field, k = 3) {
    const out = [], win = [];
    for (const p of points) {
      if (!isNum(p[field])) continue;
      win.push(p[field]);
      if (win.length > k) win.shift();
      out.push([p.t, win.reduce((a, b) => a + b, 0) / win.length]);
    }
    return out;
  }

  function xDomain() {
    const end = state.now || Date.now() / 1000;
    let start = state.series.length ? state.series[0].t : end - 60;
    const vs = (state.policies && state.policies.versions) || [];
    if (vs.length && vs[0].published_at < start) start = vs[0].published_at;
    if (state.range > 0) start = Math.max(start, end - state.range);
    if (end - start < 30) start = end - 30;
    return [start, end];
  }

  function renderCharts() {
    const [x0, x1] = xDomain();
    const pts = state.series.filter((p) => p.t >= x0);
    const tasks = taskNames();
    const perTask = (field) => tasks.map((t, i) => ({ name: t, color: taskColor(i), points: smoothTask(pts, t, field) }));
    // the rate charts are recent: each point averages the last SMOOTH reports (one per ~2 s window)
    const gaps = pts.slice(-20).map((p, i, a) => (i ? p.t - a[i - 1].t : null)).filter((g) => isNum(g) && g > 0).sort((a, b) => a - b);
    const dt = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 2;
    const win = `recent: moving window of the last ${SMOOTH} reports (≈ ${Math.round(SMOOTH * dt)} s)`;
    setText("success-window", win);
    setText("intervention-window", win);
    lineChart($("chart-success"), { series: perTask("success"), x0, x1, y0: 0, y1: 1, yFmt: fmtPct, yAxisFmt: fmtAxisPct,
      empty: "Waiting for finished episodes…" });
    lineChart($("chart-intervention"), { series: perTask("intervention"), x0, x1, y0: 0, y1: 1, yFmt: fmtPct, yAxisFmt: fmtAxisPct,
      empty: "Waiting for finished episodes…" });
    const loss = smoothField(pts, "loss", 1);
    lineChart($("chart-loss"), { series: [{ name: "loss", color: "#7c3aed", points: loss }], x0, x1, yFmt: fmtNum,
      log: loss.length > 1 && loss.every(([, v]) => v > 0) && Math.max(...loss.map((p) => p[1])) / Math.min(...loss.map((p) => p[1])) > 30,
      empty: "Waiting for the learner…" });
    lineChart($("chart-ingest"), { series: [
      { name: "ingest steps/s", color: "#0891b2", points: smoothField(pts, "ingest_steps_per_s", 3) },
    ], x0, x1, y0: 0, yFmt: fmtNum, empty: "Waiting for the learner…" });
    renderVersions(x0, x1);
  }

  function renderVersions(x0, x1) {
    const pol = state.policies || { versions: [] };
    const vs = pol.versions || [];
    const pts = vs.filter((v) => v.published_at >= x0 - 1e-6).map((v) => [v.published_at, v.version]);
    // extend the step line to now at the newest version
    if (vs.length) pts.push([x1, vs[vs.length - 1].version]);
    const marks = [];
    const pinned = pol.pinned;
    if (isNum(pinned)) marks.push({ y: pinned, label: `pinned v${pinned}`, cls: "mark-pin" });
    if (isNum(pol.fleet_version) && pol.fleet_version !== pinned && pol.fleet_version !== pol.latest) {
      marks.push({ y: pol.fleet_version, label: `fleet v${pol.fleet_version}`, cls: "mark-fleet" });
    }
    const vmarks = [];
    for (const e of state.events) {
      if (e.type !== "command" || !e.data || e.data.ok === false || e.time < x0) continue;
      const op = e.data.op;
      if (!["pause", "resume", "pin", "unpin", "rollback"].includes(op)) continue;
      const r = e.data.result || {};
      const label = op === "pin" ? `pin v${r.pinned}` : op === "rollback" ? `rollback → v${r.source_version}` : op;
      vmarks.push({ x: e.time, label, cls: `vmark-${op}` });
    }
    const pinnedRow = vs.find((v) => v.version === pinned);
    const dots = pinnedRow ? [{ x: pinnedRow.published_at, y: pinnedRow.version, cls: "dot-pin", label: `v${pinned}` }] : [];
    lineChart($("chart-versions"), { series: [{ name: "newest version", color: "#2563eb", points: pts, step: true }],
      x0, x1, y0: 0, yFmt: (v) => `v${Math.round(v)}`, marks, vmarks, dots, height: 170, integer: true,
      empty: "No versions published yet." });
    setText("versions-summary", vs.length
      ? `${vs.length} versions · newest v${pol.latest}${isNum(pinned) ? ` · fleet pinned to v${pinned}` : " · fleet follows the newest"}`
      : "");
  }

  function niceStep(span, n) {
    const raw = span / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  }

  function timeTicks(x0, x1, n) {
    const span = x1 - x0;
    const steps = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
    const step = steps.find((s) => span / s <= n) || 86400;
    const out = [];
    const tz = new Date().getTimezoneOffset() * 60;
    for (let t = Math.ceil((x0 - tz) / step) * step + tz; t <= x1; t += step) out.push(t);
    return { ticks: out, fmt: (t) => { const s = fmtClock(t); return step >= 60 ? s.slice(0, 5) : s; } };
  }

  /** A line chart as inline SVG, sized to its container. series: [{name, color, points: [[t, v]], step}]. */
  function lineChart(el, opts) {
    const W = Math.max(280, Math.floor(el.clientWidth || 520));
    const H = opts.height || 190;
    const m = { l: 52, r: 14, t: 10, b: 24 };
    const iw = W - m.l - m.r, ih = H - m.t - m.b;
    const { x0, x1 } = opts;
    const all = opts.series.flatMap((s) => s.points.map((p) => p[1]));
    let y0 = opts.y0, y1 = opts.y1;
    const log = !!opts.log;
    if (log) {
      const pos = all.filter((v) => v > 0);
      y0 = Math.pow(10, Math.floor(Math.log10(Math.min(...pos))));
      y1 = Math.pow(10, Math.ceil(Math.log10(Math.max(...pos))));
      if (y1 <= y0) y1 = y0 * 10;
    } else {
      const marksY = (opts.marks || []).map((mk) => mk.y);
      const vals = all.concat(marksY);
      if (y0 === undefined) y0 = vals.length ? Math.min(0, ...vals) : 0;
      if (y1 === undefined) {
        const hi = vals.length ? Math.max(...vals) : 1;
        const step = niceStep(Math.max(hi - y0, opts.integer ? 4 : 1e-9), 4);
        y1 = Math.max(y0 + step, Math.ceil(hi / step) * step);
        if (y1 === hi && !opts.integer) y1 += step;
      }
    }
    const sx = (t) => m.l + ((t - x0) / Math.max(1e-9, x1 - x0)) * iw;
    const sy = log
      ? (v) => m.t + ih - ((Math.log10(Math.max(v, y0)) - Math.log10(y0)) / (Math.log10(y1) - Math.log10(y0))) * ih
      : (v) => m.t + ih - ((v - y0) / Math.max(1e-12, y1 - y0)) * ih;
    const f = (v) => v.toFixed(1);
    const parts = [];
    // y grid and labels
    const yt = [];
    if (log) for (let v = y0; v <= y1 * 1.0001; v *= 10) yt.push(v);
    else {
      const step = opts.integer ? Math.max(1, niceStep(y1 - y0, 4)) : niceStep(y1 - y0, 4);
      for (let v = Math.ceil(y0 / step) * step; v <= y1 + step * 1e-6; v += step) yt.push(v);
    }
    for (const v of yt) {
      const y = f(sy(v));
      parts.push(`<line class="grid" x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}"/>`);
      parts.push(`<text class="ylab" x="${m.l - 6}" y="${y}" dy="0.32em" text-anchor="end">${esc((opts.yAxisFmt || opts.yFmt || String)(v))}</text>`);
    }
    // x ticks
    const tt = timeTicks(x0, x1, Math.max(2, Math.floor(iw / 90)));
    for (const t of tt.ticks) {
      const x = f(sx(t));
      parts.push(`<line class="tick" x1="${x}" x2="${x}" y1="${m.t + ih}" y2="${m.t + ih + 4}"/>`);
      parts.push(`<text class="xlab" x="${x}" y="${H - 6}" text-anchor="middle">${esc(tt.fmt(t))}</text>`);
    }
    parts.push(`<line class="axis" x1="${m.l}" x2="${W - m.r}" y1="${m.t + ih}" y2="${m.t + ih}"/>`);
    // mark labels never overlap: each takes the first free slot, or is left out (its line keeps a tooltip)
    const boxes = [];
    const place = (cands) => cands.find((b) => boxes.every((o) => b[2] + 3 <= o[0] || o[2] + 3 <= b[0] || b[3] <= o[1] || o[3] <= b[1]));
    // horizontal marks (pinned version, fleet version): label above the line, else below
    for (const mk of opts.marks || []) {
      const py = sy(mk.y), y = f(py), xr = W - m.r - 4, w = mk.label.length * 7 + 4;
      parts.push(`<line class="hmark ${mk.cls || ""}" x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}"><title>${esc(mk.label)}</title></line>`);
      const box = place([[xr - w, py - 15, xr, py - 2], [xr - w, py + 2, xr, py + 15]]);
      if (!box) continue;
      boxes.push(box);
      parts.push(`<text class="hmark-label ${mk.cls || ""}" x="${xr}" y="${f(box[3] - 3)}" text-anchor="end">${esc(mk.label)}</text>`);
    }
    // vertical event marks: labels staggered over up to 3 rows, from the left; near the right edge on the left of the line
    let skipped = 0;
    for (const vm of [...(opts.vmarks || [])].sort((a, b) => a.x - b.x)) {
      if (vm.x < x0 || vm.x > x1) continue;
      const px = sx(vm.x), x = f(px), w = vm.label.length * 6 + 4;
      const right = px + 3 + w > W - m.r;
      parts.push(`<line class="vmark ${vm.cls || ""}" x1="${x}" x2="${x}" y1="${m.t}" y2="${m.t + ih}"><title>${esc(vm.label)} at ${esc(fmtClock(vm.x))}</title></line>`);
      const box = place([0, 1, 2].map((row) => {
        const top = m.t + 1 + row * 12;
        return right ? [px - 3 - w, top, px - 3, top + 12] : [px + 3, top, px + 3 + w, top + 12];
      }));
      if (!box) { skipped += 1; continue; }
      boxes.push(box);
      parts.push(`<text class="vmark-label ${vm.cls || ""}" x="${f(right ? box[2] : box[0])}" y="${f(box[1])}" dy="0.85em" text-anchor="${right ? "end" : "start"}">${esc(vm.label)}</text>`);
    }
    // the lines
    let drawn = 0;
    for (const s of opts.series) {
      const p = s.points.filter(([t, v]) => t >= x0 && t <= x1 + 1e-6 && isNum(v) && (!log || v > 0));
      if (!p.length) continue;
      drawn += 1;
      let d = "";
      p.forEach(([t, v], i) => {
        const x = f(sx(t)), y = f(sy(v));
        if (i === 0) d += `M${x},${y}`;
        else if (s.step) d += `H${x}V${y}`;
        else d += `L${x},${y}`;
      });
      const name = esc(s.name);
      if (p.length > 1) {
        parts.push(`<path class="line" data-series="${name}" data-points="${p.length}" d="${d}" stroke="${s.color}"/>`);
      }
      const [lt, lv] = p[p.length - 1];
      parts.push(`<circle class="last" data-series="${name}" cx="${f(sx(lt))}" cy="${f(sy(lv))}" r="3" fill="${s.color}"/>`);
    }
    for (const dot of opts.dots || []) {
      if (dot.x < x0) continue;
      parts.push(`<circle class="dot ${dot.cls || ""}" cx="${f(sx(dot.x))}" cy="${f(sy(dot.y))}" r="5"><title>${esc(dot.label)}</title></circle>`);
    }
    if (!drawn) parts.push(`<text class="empty-label" x="${m.l + iw / 2}" y="${m.t + ih / 2}" text-anchor="middle">${esc(opts.empty || "No data yet")}</text>`);
    const svg = `<svg class="chart-svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img">${parts.join("")}</svg>`;
    // legend: name and newest (smoothed) value
    const legend = opts.series.map((s) => {
      const last = s.points.length ? s.points[s.points.length - 1][1] : null;
      return `<span class="legend-item" data-series="${esc(s.name)}"><span class="swatch" style="background:${s.color}"></span>` +
        `${esc(s.name)} <b>${esc(isNum(last) ? (opts.yFmt ? opts.yFmt(last) : last) : "–")}</b></span>`;
    }).join("");
    const hidden = skipped ? `<span class="muted small">${skipped} mark label${skipped > 1 ? "s" : ""} hidden: hover the lines</span>` : "";
    el.innerHTML = svg + `<div class="legend">${legend}${log ? '<span class="muted small">log scale</span>' : ""}${hidden}</div>`;
    el.dataset.lines = String(drawn);
    el.dataset.unlabelledMarks = String(skipped);
  }

  // chart window selector (built here so index.html stays declarative)
  function addRangeSelect() {
    const sel = h("select", { id: "range-select", "data-testid": "range-select", "aria-label": "Chart window",
      onchange: (ev) => { state.range = Number(ev.target.value); renderCharts(); } },
      h("option", { value: "0", text: "whole run" }), h("option", { value: "3600", text: "last hour" }),
      h("option", { value: "900", text: "last 15 min" }), h("option", { value: "300", text: "last 5 min" }));
    const head = h("div", { class: "section-head charts-head" }, h("h2", { text: "Training" }),
      h("label", { class: "muted small" }, "Charts show ", sel));
    document.querySelector(".charts").before(head);
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.job) renderCharts(); }, 150);
  });
  window.addEventListener("hashchange", route);

  // -- start -------------------------------------------------------------------------------
  addRangeSelect();
  (async () => {
    renderIdentity();
    if (state.key) await loadIdentity();
    route();
  })();
})();
