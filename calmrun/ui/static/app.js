// calmrun's operator page: hash-routed views over the page's JSON API, refreshed by server-sent events.
// No framework and no download: every element is built with h() and text goes in as textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const main = $("#main");
let me = { role: "viewer", user: "?" };
let current = null; // {view, args, refresh}
let refreshTimer = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const lastText = new Map(); // GET path -> last body: a refresh that changes nothing leaves the DOM alone
let changed = false;

async function api(path, opts) {
  const resp = await fetch(path, opts);
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${resp.status}: ${text}`);
  if (!opts && lastText.get(path) !== text) { lastText.set(path, text); changed = true; }
  return JSON.parse(text);
}

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.classList.add("show");
  setTimeout(() => t.classList.remove("show"), 4000);
}

const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 23) : "-");
const fmtMs = (ms) => (ms === undefined || ms === null ? "-" : ms < 1000 ? `${ms.toFixed(1)} ms` : `${(ms / 1000).toFixed(2)} s`);
const fmtUsd = (v) => `$${Number(v || 0).toFixed(6)}`;
const statusCell = (s) => h("span", { class: `status-${s}` }, s);
const json = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 1));

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "") || "runs";
  const [path, query] = raw.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return { view: parts[0], arg: parts.slice(1).join("/"), params: new URLSearchParams(query || "") };
}

function setParams(params) {
  const { view } = parseHash();
  const q = params.toString();
  history.replaceState(null, "", `#/${view}${q ? "?" + q : ""}`);
}

// -- Runs -----------------------------------------------------------------------------------------

const FILTERS = ["workflow", "version", "status", "outcome", "tenant"];

async function viewRuns(_arg, params) {
  const q = new URLSearchParams(params);
  for (const k of ["since", "until"]) {
    if (q.get(k)) q.set(k, String(Date.parse(q.get(k) + "Z")));
  }
  const data = await api(`/api/runs?${q}`);
  const form = h("form", { class: "filters", role: "search", onsubmit: (e) => { e.preventDefault(); apply(); } });
  const controls = {};
  for (const f of FILTERS) {
    const sel = h("select", { name: f, id: `f-${f}`, onchange: () => apply() },
      h("option", { value: "" }, "any"),
      (data.choices[f] || []).sort().map((v) => h("option", { value: v, selected: params.get(f) === v }, v)));
    controls[f] = sel;
    form.append(h("label", { for: `f-${f}` }, f, sel));
  }
  for (const k of ["since", "until"]) {
    const inp = h("input", { type: "datetime-local", id: `f-${k}`, name: k, step: "1", value: params.get(k) || "", onchange: () => apply() });
    controls[k] = inp;
    form.append(h("label", { for: `f-${k}` }, `${k} (UTC)`, inp));
  }
  const search = h("input", { type: "search", id: "f-q", name: "q", placeholder: "run ID", value: params.get("q") || "" });
  controls.q = search;
  form.append(h("label", { for: "f-q" }, "search", search), h("button", { type: "submit" }, "Search"));
  function apply() {
    const p = new URLSearchParams();
    for (const [k, el] of Object.entries(controls)) if (el.value) p.set(k, el.value);
    setParams(p);
    render();
  }
  const counts = h("div", { class: "counts", id: "counts" },
    h("span", { class: "count" }, "total ", h("b", { "data-testid": "count-total" }, data.total)),
    Object.entries(data.counts).sort().map(([s, n]) =>
      h("span", { class: "count" }, statusCell(s), " ", h("b", { "data-testid": `count-${s}` }, n))));
  const rows = data.runs.map((r) =>
    h("tr", { "data-run": r.run_id },
      h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.run_id)}` }, r.run_id)),
      h("td", {}, r.workflow), h("td", {}, r.version), h("td", {}, r.tenant),
      h("td", { "data-testid": "status" }, statusCell(r.status)),
      h("td", {}, r.outcome || (r.error_type ? h("span", { class: "error" }, r.error_type) : "-")),
      h("td", {}, fmtTime(r.created_ms)), h("td", { class: "num" }, fmtUsd(r.spent_usd))));
  return [
    h("h1", {}, "Runs", data.caught_up ? "" : h("span", { class: "muted" }, " (rebuilding the index...)")),
    form, counts,
    h("table", { id: "runs" },
      h("thead", {}, h("tr", {}, ["run", "workflow", "version", "tenant", "status", "outcome", "created (UTC)", "cost"].map((c) => h("th", { class: c === "cost" ? "num" : null }, c)))),
      h("tbody", {}, rows)),
    data.total > data.runs.length ? h("p", { class: "muted" }, `showing the newest ${data.runs.length} of ${data.total}`) : null,
  ];
}

// -- Run ------------------------------------------------------------------------------------------

const runHref = (id) => `#/run/${encodeURIComponent(id)}`;

async function viewRun(runId) {
  const data = await api(`/api/runs/${encodeURIComponent(runId)}`);
  const st = data.state || {};
  const span = Math.max(1, data.end_ms - data.start_ms);
  const pct = (ms) => `${Math.max(0, Math.min(100, ((ms - data.start_ms) / span) * 100))}%`;
  const actions = h("div", { class: "actions" });
  if (["quarantined", "over_budget"].includes(st.status)) {
    actions.append(h("button", {
      class: "danger", id: "redrive-run", disabled: me.role !== "operator",
      title: me.role !== "operator" ? "operators only" : null,
      onclick: () => confirmRedrive(st.workflow, [runId]),
    }, "Redrive this run"));
  }
  const canAct = me.role === "operator";
  const opOnly = canAct ? null : "operators only";
  for (const w of data.waiting || []) {
    const box = h("div", { class: "waiting", "data-step": w.step },
      h("b", {}, w.step), " ", w.kind === "approval"
        ? `waits for an approval by ${w.approvers.length ? w.approvers.join(", ") : "anyone"}`
        : `waits for the signal ${w.signal}`,
      w.due_ms ? h("span", { class: "muted" }, ` until ${fmtTime(w.due_ms)} UTC`) : "", " ");
    if (w.kind === "approval") {
      box.append(
        h("button", { class: "primary", "data-action": "approve", disabled: !canAct, title: opOnly, onclick: () => act(runId, "approve", w) }, "Approve"), " ",
        h("button", { class: "danger", "data-action": "reject", disabled: !canAct, title: opOnly, onclick: () => act(runId, "reject", w) }, "Reject"));
    } else {
      box.append(h("button", { class: "primary", "data-action": "signal", disabled: !canAct, title: opOnly, onclick: () => act(runId, "signal", w) }, `Send ${w.signal}`));
    }
    actions.append(box);
  }
  if (["running", "quarantined", "over_budget"].includes(st.status)) {
    actions.append(h("button", { class: "danger", id: "cancel-run", disabled: !canAct, title: opOnly, onclick: () => act(runId, "cancel", {}) }, "Cancel this run"));
  }
  const replayOut = h("div", { id: "replay-result" });
  const versions = (me.definitions || {})[st.workflow] || [];
  const against = h("select", { id: "replay-version", "aria-label": "replay against version", disabled: !versions.length },
    versions.map((v) => h("option", { value: v, selected: v === st.version }, `against v${v}`)));
  actions.append(h("button", {
    id: "replay-run", disabled: !data.replayable,
    title: data.replayable ? null : "start calmrun ui with -w WORKFLOW.yaml to replay",
    onclick: async () => {
      replayOut.replaceChildren(h("p", {}, "replaying..."));
      const q = new URLSearchParams(against.value ? { version: against.value } : {});
      replayOut.replaceChildren(...renderReplay(await api(`/api/runs/${encodeURIComponent(runId)}/replay?${q}`, { method: "POST" })));
    },
  }, "Replay this run (recorded)"), against);
  // each agent's journaled model requests and tool calls, under their attempt (calmrun.ui.views.request_rows)
  const requestBars = (a) => (data.requests || []).filter((r) => r.step === a.step && r.attempt === a.attempt && a.kind === "run")
    .map((r) => h("div", { class: `wf-row wf-request ${r.op}` },
      h("div", { class: "wf-label muted", title: r.label }, `  ${r.position}. ${r.label}`.slice(0, 48)),
      h("div", { class: "wf-track", title: `${fmtTime(r.start_ms)} -> ${fmtTime(r.end_ms)}` },
        h("div", { class: `wf-bar ${r.op}`, style: `left:${pct(r.start_ms)};width:calc(${pct(r.end_ms)} - ${pct(r.start_ms)})` })),
      h("div", { class: "wf-dur" }, r.op === "model" ? `${fmtMs(r.latency_ms)} ${r.tokens_in}/${r.tokens_out}` : fmtMs(r.latency_ms))));
  const bars = data.attempts.flatMap((a) => [attemptBar(a), ...requestBars(a)]);
  function attemptBar(a) {
    const end = a.end_ms || data.end_ms;
    const start = a.start_ms || a.scheduled_ms;
    return h("div", { class: "wf-row" },
      h("div", { class: "wf-label" }, `${a.step}${a.kind === "compensate" ? " (undo)" : ""} #${a.attempt}`, a.model ? h("span", { class: "muted" }, ` ${a.model}`) : ""),
      h("div", { class: "wf-track", title: `${fmtTime(a.scheduled_ms)} -> ${fmtTime(a.end_ms)}` },
        h("div", { class: "wf-wait", style: `left:${pct(a.scheduled_ms)};width:calc(${pct(start)} - ${pct(a.scheduled_ms)})` }),
        h("div", { class: `wf-bar ${a.status}`, style: `left:${pct(start)};width:calc(${pct(end)} - ${pct(start)})` })),
      h("div", { class: "wf-dur" }, a.status === "running" ? "running" : fmtMs(a.latency_ms)));
  }
  const attemptRows = data.attempts.map((a) => h("tr", {},
    h("td", {}, a.step), h("td", {}, a.attempt), h("td", {}, statusCell(a.status)), h("td", {}, a.model || "-"),
    h("td", {}, fmtTime(a.scheduled_ms)), h("td", { class: "num" }, fmtMs(a.wait_ms)), h("td", { class: "num" }, fmtMs(a.latency_ms)),
    h("td", { class: "num" }, a.tokens_in === undefined ? "-" : `${a.tokens_in}/${a.tokens_out}`),
    h("td", { class: "num" }, a.cost_usd === undefined ? "-" : fmtUsd(a.cost_usd)),
    h("td", {}, a.input !== undefined ? h("details", {}, h("summary", {}, "input"), h("pre", { "data-testid": "attempt-input" }, json(a.input))) : "-"),
    h("td", {}, a.error ? h("details", {}, h("summary", { class: "error" }, a.error_type), h("pre", {}, a.error))
      : a.output !== undefined && a.output !== null ? h("details", {}, h("summary", {}, "output"), h("pre", {}, json(a.output))) : "-")));
  const dead = data.dead_letters.map((d) => h("li", {},
    h("a", { href: `#/dlq?workflow=${encodeURIComponent(d.workflow)}&run=${encodeURIComponent(runId)}` }, `${d.topic}[${d.part}]@${d.off}`),
    ` ${d.reason}: ${d.error_type}: ${d.error}`));
  return [
    h("h1", {}, "Run ", h("span", { class: "path" }, runId)),
    h("dl", { class: "meta" },
      h("dt", {}, "workflow"), h("dd", {}, `${st.workflow || "-"} v${st.version || "-"}`),
      h("dt", {}, "tenant"), h("dd", {}, st.tenant || "-"),
      h("dt", {}, "status"), h("dd", { id: "run-status" }, statusCell(st.status || "unknown"), st.outcome ? ` (${st.outcome})` : st.status === "rejected" ? ` (${st.error_type}: ${st.error})` : ""),
      st.error ? [h("dt", {}, "cause"), h("dd", { class: "error", id: "run-cause" }, st.error_type ? `${st.error_type}: ${st.error}` : st.error)] : null,
      h("dt", {}, "path"), h("dd", { class: "path", id: "run-path" }, data.path.join(" -> ")),
      h("dt", {}, "started"), h("dd", {}, fmtTime(data.start_ms)),
      h("dt", {}, "duration"), h("dd", {}, fmtMs(data.end_ms - data.start_ms)),
      h("dt", {}, "cost"), h("dd", {}, fmtUsd(st.spent_usd), (data.children || []).length ? h("span", { class: "muted" }, " with its children's") : ""),
      data.parent ? [h("dt", {}, "parent"), h("dd", { id: "run-parent" },
        h("a", { href: runHref(data.parent.run_id) }, data.parent.run_id),
        ` (${data.parent.workflow}, step ${data.parent.step}) `, data.parent.status ? statusCell(data.parent.status) : "")] : null,
      (data.children || []).length ? [h("dt", {}, "children"), h("dd", {}, h("ul", { id: "run-children" },
        data.children.map((c) => h("li", { "data-child": c.run_id },
          h("a", { href: runHref(c.run_id) }, c.run_id), ` (step ${c.step}, ${c.workflow}) `, statusCell(c.status),
          c.outcome ? ` (${c.outcome})` : "", c.spent_usd !== null ? h("span", { class: "muted" }, ` ${fmtUsd(c.spent_usd)}`) : ""))))] : null),
    actions,
    replayOut,
    dead.length ? [h("h2", {}, "Dead letters"), h("ul", { id: "run-dlq" }, dead)] : null,
    h("h2", {}, "Timeline"),
    h("div", { class: "waterfall", id: "waterfall", "aria-label": "waterfall of step attempts" }, bars.length ? bars : h("p", { class: "muted" }, "no step attempts yet")),
    h("h2", {}, "Attempts"),
    h("table", { id: "attempts" },
      h("thead", {}, h("tr", {}, ["step", "attempt", "status", "model", "issued (UTC)", "wait", "duration", "tokens in/out", "cost", "input", "output or error"].map((c) => h("th", {}, c)))),
      h("tbody", {}, attemptRows)),
    h("h2", {}, "Input"),
    h("pre", {}, json(st.input)),
    h("h2", {}, "History"),
    h("table", { id: "history" },
      h("thead", {}, h("tr", {}, ["seq", "at (UTC)", "event", "step", "attempt", "detail"].map((c) => h("th", {}, c)))),
      h("tbody", {}, data.events.map((e) => h("tr", {},
        h("td", {}, e.seq), h("td", {}, fmtTime(e.at_ms)), h("td", {}, e.type), h("td", {}, e.step || ""),
        h("td", {}, e.attempt || ""), h("td", {}, h("code", {}, JSON.stringify(e.data).slice(0, 160))))))),
  ];
}

function renderReplay(r) {
  if (r.error) return [h("p", { class: "error" }, r.error)];
  const out = [h("h2", {}, "Recorded replay: ", h("span", { id: "replay-verdict", class: r.verdict === "converged" ? "status-completed" : "status-quarantined" }, r.verdict)),
    h("p", {}, `recorded v${r.recorded_version}, replayed against v${r.replay_version}: ${r.decisions} decisions, ${r.events} events`),
    h("p", { class: "path" }, "replay path: ", r.replay_path.join(" -> "))];
  const d = r.divergence;
  if (d) {
    out.push(h("p", { class: "error", id: "divergence" }, `first divergent decision #${d.decision}: ${d.input}: ${d.reason}`));
    const side = (title, evs, other) => h("div", {}, h("h3", {}, title),
      evs.map((e, i) => h("pre", { class: JSON.stringify(e) !== JSON.stringify(other[i]) ? "diff" : null }, `${e.seq} ${e.type} ${e.step || ""} ${JSON.stringify(e.data)}`)));
    out.push(h("div", { class: "side", id: "replay-side" }, side("recorded", d.original, d.replay), side("replay", d.replay, d.original)));
  }
  return out;
}

// -- Dead letters ---------------------------------------------------------------------------------

const dlqChecked = new Set();
const REDRIVABLE = ["quarantined", "over_budget"];

async function viewDlq(_arg, params) {
  const wf = params.get("workflow") || "";
  const data = await api(`/api/dlq?${new URLSearchParams(wf ? { workflow: wf } : {})}`);
  let records = data.records;
  const onlyRun = params.get("run");
  if (onlyRun) records = records.filter((r) => r.run_id === onlyRun);
  const sel = h("select", { id: "dlq-workflow", onchange: () => { const p = new URLSearchParams(); if (sel.value) p.set("workflow", sel.value); setParams(p); render(); } },
    h("option", { value: "" }, "every workflow"),
    Object.keys(data.counts).sort().map((w) => h("option", { value: w, selected: w === wf }, `${w} (${data.counts[w]})`)));
  const canAct = me.role === "operator";
  const checks = [];
  const rows = records.map((r) => {
    const id = `${r.topic}/${r.part}/${r.off}`;
    const box = h("input", { type: "checkbox", "aria-label": `select ${r.run_id || r.source}`, disabled: !canAct || r.reason !== "quarantined" || !REDRIVABLE.includes(r.run_status),
      checked: dlqChecked.has(id), onchange: () => (box.checked ? dlqChecked.add(id) : dlqChecked.delete(id)) });
    checks.push([box, r]);
    return h("tr", { "data-run": r.run_id || "" },
      h("td", {}, box), h("td", {}, fmtTime(r.at_ms)), h("td", {}, r.workflow), h("td", {}, h("span", { class: "badge" }, r.reason)),
      h("td", { class: "error", "data-testid": "cause" }, `${r.error_type}: ${r.error}`),
      h("td", {}, r.run_id ? h("a", { href: `#/run/${encodeURIComponent(r.run_id)}` }, r.run_id) : "-"),
      h("td", {}, r.step || "-"), h("td", {}, r.attempt), h("td", {}, r.source),
      h("td", { "data-testid": "run-status" }, r.run_status ? statusCell(r.run_status) : "-"),
      h("td", {}, h("details", {}, h("summary", {}, `payload (${r.size} bytes)`), h("pre", { "data-testid": "preview" }, r.preview))),
      h("td", {}, r.reason === "quarantined" && r.run_id
        ? h("button", { class: "danger", disabled: !canAct || !REDRIVABLE.includes(r.run_status), title: canAct ? null : "operators only", "data-action": "redrive", onclick: () => confirmRedrive(r.workflow, [r.run_id]) }, "Redrive")
        : ""));
  });
  const many = h("button", {
    class: "danger", id: "redrive-selected", disabled: !canAct,
    onclick: () => {
      const chosen = checks.filter(([b]) => b.checked).map(([, r]) => r);
      if (!chosen.length) return toast("select quarantined runs first");
      const wfs = [...new Set(chosen.map((r) => r.workflow))];
      confirmRedrive(wfs, chosen.map((r) => r.run_id), chosen);
    },
  }, "Redrive selected");
  const all = h("button", {
    class: "danger", id: "redrive-all", disabled: !canAct || !wf,
    title: wf ? null : "choose a workflow first",
    onclick: () => confirmRedrive(wf, null),
  }, "Redrive all of this workflow (runs and poison records)");
  return [
    h("h1", {}, "Dead letters"),
    h("div", { class: "filters" }, h("label", { for: "dlq-workflow" }, "workflow", sel), many, all,
      onlyRun ? h("a", { href: `#/dlq${wf ? "?workflow=" + encodeURIComponent(wf) : ""}` }, `only ${onlyRun}: show all`) : null),
    h("div", { class: "counts" }, Object.entries(data.counts).sort().map(([w, n]) => h("span", { class: "count" }, w, " ", h("b", {}, n)))),
    records.length
      ? h("table", { id: "dlq" },
        h("thead", {}, h("tr", {}, ["", "at (UTC)", "workflow", "reason", "cause", "run", "step", "attempt", "source", "run now", "payload", ""].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows))
      : h("p", { class: "muted" }, "no dead letters"),
  ];
}

// -- Actions: approve, reject, signal, cancel (each confirmed, sent with the user's name) ------------

let validateDialog = null; // () => error text or null, checked before the dialog may close with "ok"

function openDialog(title, text, okText, fields, validate) {
  const dlg = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okText;
  $("#confirm-fields").replaceChildren(...fields);
  $("#confirm-error").textContent = "";
  validateDialog = validate || null;
  dlg.returnValue = "";
  dlg.showModal();
  (fields.length ? fields[0].querySelector("textarea, input") : $("#confirm-cancel")).focus();
  return new Promise((resolve) => dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true }));
}

function field(id, label, el) {
  el.id = id;
  return h("label", { for: id }, label, el);
}

async function act(runId, kind, w) {
  const who = `This is recorded with your name (${me.user}).`;
  let body, title, text, ok, fields = [], validate = null;
  if (kind === "approve" || kind === "reject") {
    const comment = h("textarea", { rows: 3 });
    fields = [field("action-comment", kind === "reject" ? "comment (required)" : "comment (optional)", comment)];
    title = `${kind === "approve" ? "Approve" : "Reject"} ${w.step} of ${runId}?`;
    text = `The run goes on ${kind === "approve" ? "as approved" : "as rejected (its on_reject route, if it has one)"}. ${who}`;
    ok = kind === "approve" ? "Approve" : "Reject";
    if (kind === "reject") validate = () => (comment.value.trim() ? null : "a rejection needs a comment");
    body = () => ({ command: kind, step: w.step, comment: comment.value });
  } else if (kind === "signal") {
    const payload = h("textarea", { rows: 6 }, "{}");
    fields = [field("action-payload", "payload (a JSON object)", payload)];
    title = `Send the signal ${w.signal} to ${runId}?`;
    text = `The step ${w.step} resumes with this payload as its output. ${who}`;
    ok = "Send signal";
    validate = () => {
      try {
        const v = JSON.parse(payload.value);
        return v && typeof v === "object" && !Array.isArray(v) ? null : "the payload must be a JSON object";
      } catch (e) { return `not JSON: ${e.message}`; }
    };
    body = () => ({ command: "signal", name: w.signal, data: JSON.parse(payload.value) });
  } else {
    const reason = h("input", { type: "text" });
    fields = [field("action-reason", "reason (required)", reason)];
    title = `Cancel ${runId}?`;
    text = `Its active steps stop and its succeeded steps are compensated, last first. ${who}`;
    ok = "Cancel the run";
    validate = () => (reason.value.trim() ? null : "a cancellation needs a reason");
    body = () => ({ command: "cancel", reason: reason.value });
  }
  if (!(await openDialog(title, text, ok, fields, validate))) return;
  try {
    const res = await api(`/api/runs/${encodeURIComponent(runId)}/command`, {
      method: "POST", headers: { "Content-Type": "application/json", "X-Calmrun-Action": "1" }, body: JSON.stringify(body()),
    });
    toast(`${res.sent} sent for ${res.run_id} by ${res.by}`);
  } catch (e) {
    toast(`${kind} failed: ${e.message}`);
  }
}

$("#confirm-ok").addEventListener("click", (e) => {
  const why = validateDialog ? validateDialog() : null;
  if (why) { e.preventDefault(); $("#confirm-error").textContent = why; }
});

// -- Inbox: everything waiting for a person --------------------------------------------------------

async function viewInbox(_arg, params) {
  const approver = params.get("approver") || "";
  const data = await api(`/api/inbox?${new URLSearchParams(approver ? { approver } : {})}`);
  const canAct = me.role === "operator";
  const opOnly = canAct ? null : "operators only";
  const sel = h("select", { id: "inbox-approver", onchange: () => { const p = new URLSearchParams(); if (sel.value) p.set("approver", sel.value); setParams(p); render(); } },
    h("option", { value: "" }, "everyone"),
    data.approvers.map((a) => h("option", { value: a, selected: a === approver }, a)));
  const rows = data.waiting.map((w) => h("tr", { "data-run": w.run_id, "data-step": w.step },
    h("td", {}, h("a", { href: `#/run/${encodeURIComponent(w.run_id)}` }, w.run_id)),
    h("td", {}, w.workflow), h("td", {}, w.step), h("td", {}, h("span", { class: "badge" }, w.kind)),
    h("td", {}, w.kind === "approval" ? (w.approvers.join(", ") || "anyone") : `signal ${w.signal}`),
    h("td", {}, fmtTime(w.since_ms)), h("td", {}, w.due_ms ? fmtTime(w.due_ms) : "no timeout"),
    h("td", {}, w.kind === "approval"
      ? [h("button", { class: "primary", "data-action": "approve", disabled: !canAct, title: opOnly, onclick: () => act(w.run_id, "approve", w) }, "Approve"), " ",
        h("button", { class: "danger", "data-action": "reject", disabled: !canAct, title: opOnly, onclick: () => act(w.run_id, "reject", w) }, "Reject")]
      : h("button", { class: "primary", "data-action": "signal", disabled: !canAct, title: opOnly, onclick: () => act(w.run_id, "signal", w) }, "Signal"))));
  return [
    h("h1", {}, "Inbox", data.caught_up ? "" : h("span", { class: "muted" }, " (rebuilding the index...)")),
    h("div", { class: "filters" }, h("label", { for: "inbox-approver" }, "approver", sel)),
    h("p", { class: "muted" }, `${data.waiting.length} step(s) waiting for a person${approver ? ` that ${approver} may answer` : ""}`),
    rows.length
      ? h("table", { id: "inbox" },
        h("thead", {}, h("tr", {}, ["run", "workflow", "step", "kind", "who", "waiting since (UTC)", "due (UTC)", ""].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows))
      : h("p", { class: "muted" }, "nothing is waiting"),
  ];
}

async function confirmRedrive(workflow, runIds, records) {
  const dlg = $("#confirm");
  $("#confirm-ok").textContent = "Redrive";
  $("#confirm-fields").replaceChildren();
  $("#confirm-error").textContent = "";
  validateDialog = null;
  if (runIds === null) {
    $("#confirm-title").textContent = `Redrive everything in ${workflow}'s dead letters?`;
    $("#confirm-text").textContent = `Every quarantined run continues and every poison record is re-injected into its source topic (as calmrun dlq redrive --all). This is recorded with your name (${me.user}).`;
  } else {
    $("#confirm-title").textContent = runIds.length > 1 ? `Redrive ${runIds.length} runs?` : "Redrive this run?";
    $("#confirm-text").textContent = `${runIds.join(", ")} continue from the failed step with a fresh retry budget. This is recorded with your name (${me.user}).`;
  }
  dlg.returnValue = "";
  dlg.showModal();
  $("#confirm-cancel").focus();
  const answer = await new Promise((resolve) => dlg.addEventListener("close", () => resolve(dlg.returnValue), { once: true }));
  if (answer !== "ok") return;
  const groups = {};
  if (Array.isArray(workflow)) for (const r of records) (groups[r.workflow] ||= []).push(r.run_id);
  else groups[workflow] = runIds;
  try {
    let n = 0, m = 0;
    for (const [wf, ids] of Object.entries(groups)) {
      const body = ids === null ? { workflow: wf, all: true } : { workflow: wf, run_ids: ids };
      const res = await api("/api/redrive", { method: "POST", headers: { "Content-Type": "application/json", "X-Calmrun-Action": "1" }, body: JSON.stringify(body) });
      n += res.runs;
      m += res.records;
    }
    dlqChecked.clear();
    toast(`redrive sent for ${n} run(s)${m ? `, ${m} record(s) re-injected` : ""} by ${me.user}`);
  } catch (e) {
    toast(`redrive failed: ${e.message}`);
  }
}

// -- Costs ----------------------------------------------------------------------------------------

function barChart(id, title, buckets, fmt) {
  const W = 600, H = 160, pad = 30;
  const max = Math.max(1e-12, ...buckets.map((b) => b.v));
  const bw = buckets.length ? (W - pad) / buckets.length : 0;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  add("line", { class: "axis", x1: pad, y1: H, x2: W, y2: H });
  add("text", { class: "tick", x: 0, y: 10 }, fmt(max));
  buckets.forEach((b, i) => {
    const bh = (b.v / max) * (H - 10);
    const w = Math.min(40, Math.max(1, bw - 2));
    const r = add("rect", { class: "bar", x: pad + i * bw + (bw - w) / 2, y: H - bh, width: w, height: bh });
    const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
    t.textContent = `${fmtTime(b.t)}: ${fmt(b.v)}`;
    r.append(t);
  });
  if (buckets.length) {
    add("text", { class: "tick", x: pad, y: H + 14 }, fmtTime(buckets[0].t).slice(11, 16));
    add("text", { class: "tick", x: W - 40, y: H + 14 }, fmtTime(buckets[buckets.length - 1].t).slice(11, 16));
  }
  const total = buckets.reduce((a, b) => a + b.v, 0);
  return h("div", { class: "chart", id }, h("h3", {}, title, " ", h("span", { class: "muted", "data-testid": `${id}-total` }, `total ${fmt(total)}`)), svg);
}

async function viewCosts(_arg, params) {
  const dim = params.get("by") || "workflow";
  const win = params.get("window") || "1m";
  const data = await api(`/api/costs?window=${win}`);
  const change = () => { const p = new URLSearchParams({ by: dimSel.value, window: winSel.value }); setParams(p); render(); };
  const dimSel = h("select", { id: "cost-by", onchange: change }, ["workflow", "agent", "model", "tenant"].map((d) => h("option", { value: d, selected: d === dim }, d)));
  const winSel = h("select", { id: "cost-window", onchange: change }, ["1m", "1h", "1d"].map((w) => h("option", { value: w, selected: w === win }, w)));
  if (!data.available) {
    return [h("h1", {}, "Costs"), h("p", { class: "muted" }, "no cost totals yet: is the cost aggregator running (calmrun costs-aggregator)?")];
  }
  const rows = data.totals[dim] || [];
  const sum = (f) => rows.reduce((a, r) => a + Number(r[f]), 0);
  const byBucket = (f) => {
    const m = new Map();
    for (const r of data.series[dim] || []) m.set(r.start_ms, (m.get(r.start_ms) || 0) + Number(r[f]));
    return [...m.entries()].sort((a, b) => a[0] - b[0]).map(([t, v]) => ({ t, v }));
  };
  const series = data.series[dim] || [];
  const tokens = new Map();
  for (const r of series) tokens.set(r.start_ms, (tokens.get(r.start_ms) || 0) + r.tokens_in + r.tokens_out);
  const calls = new Map();
  for (const r of series) calls.set(r.start_ms, (calls.get(r.start_ms) || 0) + r.requests + r.api_calls);
  const asBuckets = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]).map(([t, v]) => ({ t, v }));
  return [
    h("h1", {}, "Costs"),
    h("div", { class: "filters" }, h("label", { for: "cost-by" }, "by", dimSel), h("label", { for: "cost-window" }, "window", winSel)),
    h("div", { class: "grid3" },
      barChart("chart-money", `money per ${win}`, byBucket("cost_usd"), fmtUsd),
      barChart("chart-tokens", `tokens per ${win}`, asBuckets(tokens), (v) => String(Math.round(v))),
      barChart("chart-calls", `requests + API calls per ${win}`, asBuckets(calls), (v) => String(Math.round(v)))),
    h("h2", {}, `Totals by ${dim} (all time, from the aggregator)`),
    h("table", { id: "cost-totals" },
      h("thead", {}, h("tr", {}, [dim, "attempts", "ok", "failed", "tokens in", "tokens out", "requests", "api calls", "cost"].map((c, i) => h("th", { class: i ? "num" : null }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", { "data-value": r.value },
        h("td", {}, r.value), ...["attempts", "succeeded", "failed", "tokens_in", "tokens_out", "requests", "api_calls"].map((f) => h("td", { class: "num", "data-field": f }, r[f])),
        h("td", { class: "num", "data-field": "cost_usd" }, r.cost_usd)))),
      h("tfoot", {}, h("tr", { id: "cost-total-row" }, h("th", {}, "total"),
        ...["attempts", "succeeded", "failed", "tokens_in", "tokens_out", "requests", "api_calls"].map((f) => h("th", { class: "num", "data-field": f }, sum(f))),
        h("th", { class: "num", "data-field": "cost_usd" }, sum("cost_usd").toFixed(6))))),
    h("h2", {}, "Per step (from the recorded attempts)"),
    h("table", { id: "cost-steps" }, h("thead", {}, h("tr", {}, ["workflow", "step", "attempts", "tokens", "calls", "cost"].map((c) => h("th", {}, c)))),
      h("tbody", {}, data.steps.map((s) => h("tr", {}, h("td", {}, s.workflow), h("td", {}, s.step), h("td", {}, s.attempts), h("td", {}, s.tokens), h("td", {}, s.calls), h("td", {}, fmtUsd(s.usd)))))),
    h("h2", {}, "Top runs by cost"),
    h("table", { id: "cost-top" }, h("thead", {}, h("tr", {}, ["run", "workflow", "tenant", "status", "cost"].map((c) => h("th", {}, c)))),
      h("tbody", {}, data.top_runs.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.run_id)}` }, r.run_id)), h("td", {}, r.workflow), h("td", {}, r.tenant), h("td", {}, statusCell(r.status)), h("td", {}, fmtUsd(r.spent_usd)))))),
    h("h2", {}, "Tenant spend against budget"),
    data.budgets.length
      ? h("table", { id: "cost-budgets" }, h("thead", {}, h("tr", {}, ["tenant", "window", "spent", "budget", ""].map((c) => h("th", {}, c)))),
        h("tbody", {}, data.budgets.map((b) => {
          const frac = Number(b.spent_usd) / Math.max(1e-12, Number(b.budget_usd));
          return h("tr", {}, h("td", {}, b.tenant), h("td", {}, b.window), h("td", {}, fmtUsd(b.spent_usd)), h("td", {}, fmtUsd(b.budget_usd)),
            h("td", {}, h("span", { class: `meter ${frac > 1 ? "over" : ""}`, role: "meter", "aria-valuenow": frac.toFixed(2), "aria-valuemin": "0", "aria-valuemax": "1", "aria-label": `${b.tenant} budget used` }, h("span", { style: `width:${Math.min(100, frac * 100)}%` }))));
        })))
      : h("p", { class: "muted" }, "no tenant budgets configured (budgets.tenants)"),
  ];
}

// -- Workers --------------------------------------------------------------------------------------

async function viewWorkers() {
  const data = await api("/api/workers");
  return [
    h("h1", {}, "Workers"),
    data.groups.map((g) => [
      h("h2", {}, `${g.role}: `, h("code", {}, g.group), " ", h("span", { class: "badge" }, g.state)),
      g.error ? h("p", { class: "error" }, g.error) : null,
      g.role.startsWith("pool ") ? h("p", { class: "pool", "data-pool": g.role.slice(5) },
        "attempts issued (from the run states): ", h("b", { "data-testid": "pool-issued" }, g.issued), "; ",
        g.executors
          ? ["agents running: ", h("b", { "data-testid": "pool-running" }, g.executors.running),
            ", fencings: ", h("b", { "data-testid": "pool-fenced" }, g.executors.fenced),
            h("span", { class: "muted" }, ` (from ${g.executors.executors} executor(s)' /metrics)`)]
          : h("span", { class: "muted" }, data.metrics.configured ? "no executor of this pool answered on ui.pool_metrics" : "running agents and fencings: list the executors' /metrics URLs in ui.pool_metrics")) : null,
      h("table", { class: "members" }, h("thead", {}, h("tr", {}, ["member", "client", "host", "instance", "partitions"].map((c) => h("th", {}, c)))),
        h("tbody", {}, g.members.length ? g.members.map((m) => h("tr", {}, h("td", {}, m.member), h("td", {}, m.client), h("td", {}, m.host), h("td", {}, m.instance || "-"), h("td", {}, m.partitions)))
          : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "no members")))),
      h("table", { class: "lag" }, h("thead", {}, h("tr", {}, ["topic", "partitions", "consumer lag"].map((c) => h("th", {}, c)))),
        h("tbody", {}, g.lag.map((l) => h("tr", {}, h("td", {}, l.topic), h("td", {}, l.partitions), h("td", { class: "num", "data-testid": "lag" }, l.lag))))),
    ]),
    data.metrics.unreachable.length ? h("p", { class: "error" }, `not answering: ${data.metrics.unreachable.join(", ")}`) : null,
    h("h2", {}, "Tasks in flight (from the run states)"),
    h("p", { id: "in-flight" }, Object.keys(data.in_flight).length ? Object.entries(data.in_flight).map(([k, v]) => `${k}: ${v}`).join(", ") : "none"),
    h("h2", {}, "This page's index"),
    h("p", {}, `${data.index.runs} runs, ${data.index.events} events, ${data.index.dlq} dead letters, ${(data.index.bytes / 1048576).toFixed(1)} MiB; rebuilt from the topics in ${data.index.rebuild_s === null ? "(not yet)" : data.index.rebuild_s.toFixed(2) + " s"}`),
  ];
}

// -- router ---------------------------------------------------------------------------------------

const VIEWS = { runs: viewRuns, run: viewRun, inbox: viewInbox, dlq: viewDlq, costs: viewCosts, workers: viewWorkers };

let renders = 0; // only the latest render may draw: an older one's answer can arrive after a newer one's

async function render(isRefresh) {
  const seq = ++renders;
  const { view, arg, params } = parseHash();
  changed = false;
  const fn = VIEWS[view] || viewRuns;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === (view === "run" ? "runs" : view));
  const key = location.hash;
  try {
    const nodes = await fn(arg, params);
    if (seq !== renders) { changed = true; lastText.clear(); return; } // a newer render draws what this one read
    if (key !== location.hash) return; // navigated away meanwhile
    if (isRefresh && !changed) return;
    const focused = document.activeElement && document.activeElement.id;
    main.replaceChildren(...[nodes].flat(Infinity).filter((n) => n));
    if (focused) { const el = document.getElementById(focused); if (el && el !== document.body) el.focus(); }
    current = { view };
  } catch (e) {
    if (seq !== renders) return;
    main.replaceChildren(h("h1", {}, "Error"), h("p", { class: "error" }, e.message));
  }
}

let missed = false; // a change came while the dialog was open: refresh when it closes

function scheduleRefresh() {
  if (refreshTimer) return;
  const view = parseHash().view;
  if ($("#confirm").open) { missed = true; return; }
  const wait = view === "costs" || view === "workers" ? 2000 : 150;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if ($("#confirm").open) missed = true;
    else render(true);
  }, wait);
}

$("#confirm").addEventListener("close", () => { if (missed) { missed = false; scheduleRefresh(); } });

function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("open", () => { $("#live").textContent = "live"; $("#live").classList.add("on"); });
  es.addEventListener("change", () => scheduleRefresh());
  es.addEventListener("error", () => { $("#live").textContent = "reconnecting"; $("#live").classList.remove("on"); });
}

window.addEventListener("hashchange", () => { render(); main.focus(); });
(async () => {
  me = await api("/api/me");
  $("#me").textContent = `${me.user} (${me.role}) on ${me.prefix}`;
  await render();
  connect();
})();
