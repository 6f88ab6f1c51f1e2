// lmforge board: one page, no build step, nothing fetched from elsewhere.
// Forms are built from /api/catalog (the option declarations); every UI string comes from /api/locale/LANG.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
};

const state = { strings: {}, catalog: null, run: null, curve: [], compare: null, compareCurve: [], poll: null,
                plan: null, chat: [], detail: null };

// ---------------------------------------------------------------------------- strings
function t(key) { return state.strings[key] || key; }

async function setLanguage(lang) {
  state.strings = await api("/api/locale/" + lang);
  localStorage.setItem("lmforge-board-lang", lang);
  document.documentElement.lang = lang;
  $$("[data-i18n]").forEach(node => { node.textContent = t(node.dataset.i18n); });
  $$("[data-i18n-placeholder]").forEach(node => { node.placeholder = t(node.dataset.i18nPlaceholder); });
  if (state.catalog) buildForms();
  if (state.detail) showDetail(state.detail);
}

function statusText(s) {
  switch (s) {
    case "pending": return t("status_pending");
    case "starting": return t("status_starting");
    case "running": return t("status_running");
    case "done": return t("status_done");
    case "failed": return t("status_failed");
    case "stopped": return t("status_stopped");
    default: return t("status_lost");
  }
}

// ---------------------------------------------------------------------------- talking to the board
async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: "HTTP " + response.status }));
  if (!response.ok) {
    const error = new Error(data.error || ("HTTP " + response.status));
    error.field = data.field || null;   // {command, option, flag}: the form field whose value is wrong
    throw error;
  }
  return data;
}

// One message in two places that come and go together: the banner at the top of the page and the
// line beside Start (the form is long: the buttons are far below the banner). The field in error,
// when the board names one, is marked with the message too, opened, scrolled to and focused.
function showError(message, field = null) {
  for (const box of [$("#error"), $("#action-error")]) {
    box.textContent = message ? "error: " + message : "";
    box.hidden = !message;
  }
  $$(".opt.invalid, .basics .invalid").forEach(unmark);
  if (message && field) markField(field, message);
}

function unmark(box) {
  box.classList.remove("invalid");
  $$(".field-error", box).forEach(n => n.remove());
}

function markField(field, message) {
  let input = $(`#forms [data-command="${CSS.escape(field.command)}"][data-opt="${CSS.escape(field.option)}"]`) ||
              $(`#eval-form [data-command="${CSS.escape(field.command)}"][data-opt="${CSS.escape(field.option)}"]`);
  if (!input && field.option === "model") input = $("#model");   // wired by the board: the model box above
  if (!input) return;
  const panel = input.closest("details");
  if (panel) panel.open = true;
  const box = input.closest("label") || input.parentNode;
  box.classList.add("invalid");
  box.append(el("span", { class: "field-error", role: "alert", text: message }));
  input.scrollIntoView({ block: "center" });
  input.focus({ preventScroll: true });
}

async function busy(work) {
  showError("");
  $("#busy").hidden = false;
  try { return await work(); } catch (e) { showError(e.message, e.field); return null; } finally { $("#busy").hidden = true; }
}

// ---------------------------------------------------------------------------- configure
function stage() { return $("#stage").value; }
function pipelineCommands() { return ["data align", "data pack", "train " + stage()]; }

function control(command, opt) {
  const attrs = { "data-command": command, "data-opt": opt.name };
  let input;
  if (opt.type === "bool") {
    input = el("input", { type: "checkbox", ...attrs });
    input.checked = !!opt.default;
  } else if (opt.choices.length && !opt.many) {
    input = el("select", attrs);
    if (opt.default === null) input.append(el("option", { value: "", text: "" }));
    for (const c of opt.choices) input.append(el("option", { value: c, text: c }));
    input.value = opt.default === null ? "" : String(opt.default);
  } else if (opt.many) {
    input = el("textarea", { rows: 2, ...attrs });
    input.value = Array.isArray(opt.default) ? opt.default.join("\n") : "";
  } else {
    input = el("input", { type: "text", ...attrs });
    input.value = opt.default === null ? "" : String(opt.default);
  }
  input.dataset.default = opt.type === "bool" ? String(!!opt.default) : (opt.default === null ? "" :
    (Array.isArray(opt.default) ? opt.default.join("\n") : String(opt.default)));
  // eval --data defaults to the run's own data (the board fills it in when left empty)
  const required = opt.required && !(command.startsWith("eval ") && opt.name === "data");
  const box = el("label", { class: "opt" },
    el("span", { class: "name", text: opt.flag + (required ? " *" : "") }), input,
    el("span", { class: "help", text: opt.help + (required ? " (" + t("required") + ")" : "") }));
  input.addEventListener("input", () => {
    box.classList.toggle("changed", value(input) !== input.dataset.default);
    if (box.classList.contains("invalid")) unmark(box);   // being corrected
  });
  input.addEventListener("change", () => box.classList.toggle("changed", value(input) !== input.dataset.default));
  return box;
}

function value(input) {
  if (input.type === "checkbox") return String(input.checked);
  return input.value.trim();
}

function buildForm(command, container) {
  const saved = collectOptions([command])[command] || {};
  container.innerHTML = "";
  const opts = state.catalog.commands[command] || [];
  const wired = state.catalog.wired[command] || [];
  container.append(el("h2", { class: "command" }, t("options_of") + " ", el("code", { text: "lmforge " + command })));
  if (wired.length) {
    container.append(el("p", { class: "muted", text: t("wired_note") + ": " +
      opts.filter(o => wired.includes(o.name)).map(o => o.flag).join(", ") }));
  }
  const panels = new Map();
  for (const opt of opts) {
    if (wired.includes(opt.name)) continue;
    if (!panels.has(opt.panel)) panels.set(opt.panel, []);
    panels.get(opt.panel).push(opt);
  }
  let first = true;
  for (const [panel, list] of panels) {
    const grid = el("div", { class: "opts" });
    list.forEach(opt => grid.append(control(command, opt)));
    container.append(el("details", { class: "panel", open: first || list.some(o => o.required) },
      el("summary", { text: panel }), grid));
    first = false;
  }
  for (const [name, v] of Object.entries(saved)) {   // keep what the user typed across rebuilds
    const input = $(`[data-command="${command}"][data-opt="${name}"]`, container);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = v === true; else input.value = Array.isArray(v) ? v.join("\n") : v;
    input.dispatchEvent(new Event("change"));
  }
}

function buildForms() {
  const forms = $("#forms");
  for (const command of pipelineCommands()) {
    const id = "form-" + command.replace(/ /g, "-");
    let box = document.getElementById(id);
    if (!box) { box = el("div", { id, class: "form" }); forms.append(box); }
    buildForm(command, box);
  }
  $$(".form", forms).forEach(box => {
    if (!pipelineCommands().some(c => box.id === "form-" + c.replace(/ /g, "-"))) box.remove();
  });
}

function collectOptions(commands) {
  const out = {};
  for (const command of commands) {
    const values = {};
    $$(`[data-command="${command}"]`).forEach(input => {
      const v = value(input);
      if (v === input.dataset.default) return;
      const opt = state.catalog.commands[command].find(o => o.name === input.dataset.opt);
      if (opt.type === "bool") values[opt.name] = input.checked;
      else if (opt.many) values[opt.name] = v.split("\n").map(s => s.trim()).filter(Boolean);
      else values[opt.name] = v;
    });
    out[command] = values;
  }
  return out;
}

function config() {
  return {
    stage: stage(), model: $("#model").value.trim(), run: $("#run-name").value.trim() || null,
    data: {
      files: $$("#data-files input:checked").map(i => i.value),
      dataset_info: $("#dataset-info").value.trim(),
      names: $$("#info-entries input:checked").map(i => i.value),
    },
    options: collectOptions(pipelineCommands()),
  };
}

async function loadFiles() {
  const data = await api("/api/files");
  $("#workspace").textContent = data.workspace;
  const models = $("#model-list");
  models.innerHTML = "";
  data.models.forEach(m => models.append(el("option", { value: m })));
  if (!$("#model").value && data.models.length) $("#model").value = data.models[0];
  const box = $("#data-files");
  box.innerHTML = "";
  if (!data.files.length) box.append(el("span", { class: "muted", "data-i18n": "no_files", text: t("no_files") }));
  for (const f of data.files) {
    if (f.endsWith("dataset_info.json")) { if (!$("#dataset-info").value) $("#dataset-info").value = f; continue; }
    box.append(el("label", {}, el("input", { type: "checkbox", value: f }), " " + f));
  }
}

async function loadEntries() {
  const data = await api("/api/dataset_info?path=" + encodeURIComponent($("#dataset-info").value.trim()));
  const box = $("#info-entries");
  box.innerHTML = "";
  for (const e of data.entries) {   // local entries first (the board sorts them): each marked
    box.append(el("label", { class: "entry", title: (e.file || "") + " " + (e.format || "") },
      el("input", { type: "checkbox", value: e.name }), " " + e.name + " ",
      el("span", { class: "source source-" + e.source, text: sourceText(e) })));
  }
}

function sourceText(entry) {
  switch (entry.source) {
    case "local": return t("source_local");
    case "hub": return t("source_hub") + (entry.hub && entry.hub !== "hf" ? " (" + entry.hub + ")" : "");
    default: return t("source_missing");
  }
}

// ---------------------------------------------------------------------------- preview, plan, start
function tokenView(pieces) {
  const box = el("div", { class: "example" });
  for (const p of pieces) box.append(el("span", { class: p.trained ? "tok trained" : "tok", title: "id " + p.id, text: p.text }));
  return box;
}

async function preview() {
  const data = await busy(() => api("/api/preview", config()));
  if (!data) return;
  $("#preview").hidden = false;
  const tokens = $("#preview-tokens");
  tokens.innerHTML = "";
  data.tokens.forEach(pieces => tokens.append(tokenView(pieces)));
  const stats = $("#preview-stats");
  stats.innerHTML = "";
  const flat = { rows: data.stats.rows, loss_fraction: data.stats.loss_fraction,
                 packing_efficiency: data.stats.packing_efficiency, cutoff: data.stats.cutoff,
                 template: data.stats.template, tokens: (data.stats.lengths && data.stats.lengths.input_ids || {}).total,
                 "examples.mean": (data.stats.examples || {}).mean, "examples.max": (data.stats.examples || {}).max,
                 truncated: (data.stats.pack || {}).truncated };
  for (const [k, v] of Object.entries(flat)) if (v !== undefined) stats.append(el("tr", {}, el("th", { text: k }), el("td", { text: String(v) })));
  $("#preview-rows").textContent = data.rows.map(r => JSON.stringify(r, null, 1)).join("\n\n");
}

async function plan() {
  const data = await busy(() => api("/api/pipeline", config()));
  if (!data) return null;
  state.plan = data;
  $("#plan").hidden = false;
  $("#shell").textContent = data.shell;
  return data;
}

function download(name, text) {
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/plain" })), download: name });
  document.body.append(link); link.click(); link.remove();
}

async function start() {
  const data = await busy(() => api("/api/runs", config()));
  if (!data) return;
  $("#plan").hidden = false;
  $("#shell").textContent = data.shell;
  switchTab("runs");
  await loadRuns();
  openRun(data.id);
}

// ---------------------------------------------------------------------------- runs
function switchTab(name) {
  $$(".tab").forEach(b => b.classList.toggle("active", b.dataset.tab === name));
  $$(".page").forEach(p => { p.hidden = p.id !== "tab-" + name; });
  if (name === "runs") loadRuns();
}

function fmt(v, digits = 4) {
  if (v === undefined || v === null || v === "") return "";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(Math.max(1, digits - 2));
  return String(Number(v.toPrecision(digits)));
}

async function loadRuns() {
  const data = await api("/api/runs").catch(e => { showError(e.message); return { runs: [] }; });
  state.runs = data.runs;
  const body = $("#runs-table tbody");
  body.innerHTML = "";
  $("#no-runs").hidden = data.runs.length > 0;
  for (const r of data.runs) {
    const m = r.metrics || {};
    const row = el("tr", { "data-run": r.id, class: r.id === state.run ? "selected" : "" },
      el("td", { text: r.id }), el("td", { class: "status-" + r.status, text: statusText(r.status) }),
      el("td", { text: r.stage || "" }), el("td", { text: r.method || "" }), el("td", { text: r.model || "" }),
      el("td", { text: Array.isArray(r.data) ? r.data.join(", ") : (r.data || "") }),
      el("td", { text: fmt(m.steps) }), el("td", { text: fmt(m.train_loss) }), el("td", { text: fmt(m.tokens_per_second, 6) }));
    row.addEventListener("click", () => openRun(r.id));
    body.append(row);
  }
  const compare = $("#compare");
  const chosen = compare.value;
  compare.innerHTML = "";
  compare.append(el("option", { value: "", text: t("none") }));
  data.runs.filter(r => r.id !== state.run).forEach(r => compare.append(el("option", { value: r.id, text: r.id })));
  compare.value = data.runs.some(r => r.id === chosen) ? chosen : "";
}

async function openRun(id) {
  if (state.run !== id) { state.run = id; state.curve = []; state.chat = []; renderChat(); $("#eval-results").innerHTML = ""; }
  $$("#runs-table tbody tr").forEach(r => r.classList.toggle("selected", r.dataset.run === id));
  $("#run-detail").hidden = false;
  $("#run-makefile").href = "/api/runs/" + encodeURIComponent(id) + "/makefile";
  if (state.poll) clearInterval(state.poll);
  await refresh();
  state.poll = setInterval(refresh, 1000);
}

async function refresh() {
  if (!state.run) return;
  const id = state.run;
  let data;
  try { data = await api(`/api/runs/${encodeURIComponent(id)}?since=${state.curve.length}`); }
  catch (e) { showError(e.message); clearInterval(state.poll); return; }
  if (id !== state.run) return;
  state.curve = state.curve.concat(data.curve);
  state.detail = data;
  showDetail(data);
  const active = data.status === "running" || data.status === "starting" ||
    data.evals.some(e => e.status === "running" || e.status === "starting");
  if (!active) { clearInterval(state.poll); state.poll = null; loadRuns(); }
}

function showDetail(data) {
  $("#run-id").textContent = data.id;
  const status = $("#run-status");
  status.textContent = statusText(data.status);
  status.className = "status-" + data.status;
  $("#stop-btn").disabled = !(data.status === "running" || data.status === "starting");
  $("#resume-btn").disabled = !(data.status === "stopped" || data.status === "failed" || data.status === "lost");
  const p = data.progress;
  $("#progress").max = p.total || 1;
  $("#progress").value = p.done;
  $("#progress-text").textContent = p.total ? `${p.done} / ${p.total}` : "";
  $("#time-left").textContent = p.seconds_left === null ? "–" : duration(p.seconds_left);
  const steps = $("#run-steps");
  steps.innerHTML = "";
  for (const s of data.steps) {
    steps.append(el("tr", {}, el("td", { class: "status-" + s.status, text: statusText(s.status) }),
      el("td", {}, el("code", { text: s.argv.join(" ") })), el("td", { text: s.error ? "error: " + s.error : "" })));
  }
  const log = $("#log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = data.log.split("\n").slice(-80).join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;
  $("#record").textContent = Object.keys(data.record).length ? JSON.stringify(data.record, null, 1) : "";
  drawCharts();
  const finished = data.status === "done";
  $("#finished-tools").hidden = !finished;
  $("#needs-finished").hidden = finished;
  showEvals(data.evals);
}

function duration(s) {
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// ---------------------------------------------------------------------------- charts (inline SVG)
const COLORS = ["#2458c6", "#d9480f"];

function lineChart(svg, series) {
  const W = 420, H = 220, L = 58, R = 10, T = 10, B = 26;
  svg.innerHTML = "";
  const pts = series.flatMap(s => s.points);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "white", stroke: "#d7dbe3" });
  if (!pts.length) return;
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.1; y0 = y0 - Math.abs(y0 || 1) * 0.1; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    add("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), stroke: "#eef0f4" });
    add("text", { x: L - 4, y: Y(y) + 4, "text-anchor": "end", "font-size": 10, fill: "#667" }, fmt(y, 3));
  }
  add("text", { x: L, y: H - 8, "font-size": 10, fill: "#667" }, String(x0));
  add("text", { x: W - R, y: H - 8, "font-size": 10, fill: "#667", "text-anchor": "end" }, String(x1));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    add("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2, class: "series", "data-name": s.name });
    s.points.forEach(p => add("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.2, fill: COLORS[i % COLORS.length] }));
    add("text", { x: W - R - 4, y: T + 12 + 12 * i, "text-anchor": "end", "font-size": 10, fill: COLORS[i % COLORS.length] }, s.name);
  });
}

function seriesOf(curve, key) { return curve.filter(e => typeof e[key] === "number").map(e => [e.step, e[key]]); }

function drawCharts() {
  const runs = [{ name: state.run, curve: state.curve }];
  if (state.compare) runs.push({ name: state.compare, curve: state.compareCurve });
  for (const [id, key] of [["#chart-loss", "loss"], ["#chart-lr", "learning_rate"], ["#chart-tps", "tokens_per_second"]]) {
    lineChart($(id), runs.map(r => ({ name: r.name, points: seriesOf(r.curve, key) })));
  }
}

async function chooseCompare() {
  state.compare = $("#compare").value || null;
  state.compareCurve = state.compare ? (await api("/api/runs/" + encodeURIComponent(state.compare))).curve : [];
  drawCharts();
}

// ---------------------------------------------------------------------------- evaluate
function buildEvalForm() {
  buildForm("eval " + $("#eval-kind").value, $("#eval-form"));
}

async function runEval() {
  const command = "eval " + $("#eval-kind").value;
  const data = await busy(() => api(`/api/runs/${encodeURIComponent(state.run)}/eval`,
    { kind: $("#eval-kind").value, options: collectOptions([command])[command] }));
  if (data && !state.poll) state.poll = setInterval(refresh, 1000);
}

function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v !== null && typeof v === "object" && !Array.isArray(v)) flatten(v, prefix + k + ".", out);
    else if (!Array.isArray(v)) out.push([prefix + k, v]);
  }
  return out;
}

function showEvals(evals) {
  const box = $("#eval-results");
  box.innerHTML = "";
  for (const e of evals) {
    box.append(el("p", {}, el("strong", { text: e.id }), " · ", el("span", { class: "status-" + e.status, text: statusText(e.status) }),
      e.error ? el("span", { class: "error-line", text: " error: " + e.error }) : ""));
    if (e.result) {
      const table = el("table", { class: "eval-table" }, el("tr", {}, el("th", { text: t("metric") }), el("th", { text: t("value") })));
      flatten(e.result).slice(0, 60).forEach(([k, v]) => table.append(el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v, 6) }))));
      box.append(table);
    }
  }
}

// ---------------------------------------------------------------------------- chat (streamed, Server-Sent Events)
function renderChat() {
  const box = $("#chat-log");
  box.innerHTML = "";
  state.chat.forEach(m => box.append(el("div", { class: "msg " + m.role, text: m.content })));
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (!text || !state.run) return;
  $("#chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "" };
  state.chat.push(answer);
  renderChat();
  showError("");
  const response = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: state.run, messages: state.chat.slice(0, -1), max_tokens: 48, temperature: 0 }) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    state.chat.pop(); renderChat();
    showError(data.error || ("HTTP " + response.status));
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      const event = JSON.parse(line);
      if (event.text) { answer.content += event.text; $("#chat-log").lastChild.textContent = answer.content; }
      if (event.error) showError(event.error);
    }
  }
  $("#chat-log").lastChild.classList.add("complete");
}

// ---------------------------------------------------------------------------- start-up
async function main() {
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
  const lang = localStorage.getItem("lmforge-board-lang") || "en";
  $("#lang").value = lang;
  state.catalog = await api("/api/catalog");
  for (const s of state.catalog.stages) $("#stage").append(el("option", { value: s, text: s }));
  $("#stage").value = "sft";
  for (const k of state.catalog.evals) $("#eval-kind").append(el("option", { value: k, text: k }));
  await setLanguage(lang);
  buildEvalForm();
  await loadFiles().catch(e => showError(e.message));
  $("#lang").addEventListener("change", () => setLanguage($("#lang").value));
  $("#stage").addEventListener("change", buildForms);
  $$(".tab").forEach(b => b.addEventListener("click", () => switchTab(b.dataset.tab)));
  $("#load-info").addEventListener("click", () => busy(loadEntries));
  $("#preview-btn").addEventListener("click", preview);
  $("#plan-btn").addEventListener("click", plan);
  $("#start-btn").addEventListener("click", start);
  $("#copy-btn").addEventListener("click", async () => {
    await navigator.clipboard.writeText($("#shell").textContent).catch(() => {});
    $("#copy-btn").textContent = t("copied");
    setTimeout(() => { $("#copy-btn").textContent = t("copy"); }, 1500);
  });
  $("#makefile-btn").addEventListener("click", async () => {
    const data = state.plan || await plan();
    if (data) download("Makefile", data.makefile);
  });
  $("#refresh-runs").addEventListener("click", loadRuns);
  $("#stop-btn").addEventListener("click", () => busy(async () => { await api(`/api/runs/${encodeURIComponent(state.run)}/stop`, {}); }));
  $("#resume-btn").addEventListener("click", () => busy(async () => {
    await api(`/api/runs/${encodeURIComponent(state.run)}/resume`, {});
    openRun(state.run);
  }));
  $("#compare").addEventListener("change", chooseCompare);
  $("#eval-kind").addEventListener("change", buildEvalForm);
  $("#eval-btn").addEventListener("click", runEval);
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-input").addEventListener("keydown", e => { if (e.key === "Enter") sendChat(); });
  $("#chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); });
  document.body.dataset.ready = "1";
}

main().catch(e => showError(e.message));
