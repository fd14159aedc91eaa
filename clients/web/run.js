// run.js - #/runs/RUN[/STAGE[/L123]]: one run, live.
//
// GET /v1/runs/RUN gives the run and its stages (with needs); its event
// stream (/v1/runs/RUN/events, replayed from the start, then live) moves
// the graph, fills the log, the canary charts and the audit list. After a
// state change the run is read again (its outputs and times), unless an
// event newer than the answer has come meanwhile.
import { h, clear, fmtTime, fmtDuration, stateWord } from "./dom.js";
import * as api from "./api.js";
import { badge, act, can, errorText } from "./ui.js";
import { drawGraph } from "./graph.js";
import { LogView } from "./logs.js";
import { CanaryData, canaryCard } from "./canary.js";

const ACTIVE = new Set(["queued", "running"]);

function kv(obj, id) {
  const keys = Object.keys(obj || {}).sort();
  if (!keys.length) return h("p", { class: "muted", id }, "none");
  return h("table", { class: "kv", id },
    h("tbody", {}, keys.map((k) => h("tr", {}, h("th", { scope: "row", class: "mono" }, k),
                                              h("td", { class: "mono" }, String(obj[k]))))));
}

export function runView(main, parts) {
  const id = parts[0];
  let run = null, graph = null, sub = null, maxSeq = 0, refreshT = null, closed = false;
  let selected = parts[1] || "";
  const canary = new Map(); // stage -> CanaryData
  const audit = [];
  const logs = new LogView(id);

  const title = h("h1", {}, "Run ", h("span", { class: "mono" }, id));
  const head = h("div", { class: "runhead", id: "run-head" }, "loading…");
  const actions = h("div", { class: "row actions", id: "run-actions" });
  const answer = h("p", { class: "answer", id: "answer", role: "status" });
  const waiting = h("div", { id: "run-waiting" });
  const graphBox = h("div", { class: "graph scroll-x", id: "graph" });
  const stageBox = h("div", { id: "stage-detail" });
  const canaryBox = h("section", { id: "canary", class: "canaries", hidden: true },
    h("h2", {}, "Canary"));
  const paramsBox = h("div", { id: "run-params" });
  const outputsBox = h("div", { id: "run-outputs" });
  const auditBody = h("tbody", { id: "run-audit" });
  const live = h("span", { class: "live muted", id: "run-live" });

  main.append(title, head, actions, answer, waiting,
    h("section", { class: "card", "aria-labelledby": "graph-h" },
      h("h2", { id: "graph-h" }, "Stages ", live), graphBox,
      h("p", { class: "muted legend" }, "Choose a stage (click, or Tab then Enter) to see its log and outputs.")),
    stageBox, logs.el, canaryBox,
    h("div", { class: "cols" },
      h("section", { class: "card" }, h("h2", {}, "Params"), paramsBox),
      h("section", { class: "card" }, h("h2", {}, "Outputs"), outputsBox)),
    h("section", { class: "card" }, h("h2", {}, "Who did what"),
      h("div", { class: "scroll-x" }, h("table", { id: "audit-table" },
        h("thead", {}, h("tr", {}, ["Time", "Stage", "What"].map((t) => h("th", { scope: "col" }, t)))),
        auditBody))));

  function stageOf(name) {
    return run && run.stages.find((st) => st.name === name);
  }

  function renderHead() {
    const dur = run.startedAt ? fmtDuration((run.finishedAt ? Date.parse(run.finishedAt) : Date.now()) - Date.parse(run.startedAt)) : "";
    clear(head).append(h("dl", { class: "facts" },
      h("dt", {}, "Pipeline"), h("dd", { id: "run-pipeline" }, run.pipelineName || ""),
      h("dt", {}, "State"), h("dd", { id: "run-state", dataset: { state: stateWord(run.state) } }, badge(run.state)),
      run.attempt > 1 ? [h("dt", {}, "Attempt"), h("dd", {}, String(run.attempt))] : null,
      h("dt", {}, "Created"), h("dd", {}, fmtTime(run.createdAt)),
      dur ? [h("dt", {}, "Duration"), h("dd", {}, dur)] : null,
      run.message ? [h("dt", {}, "Message"), h("dd", { id: "run-message" }, run.message)] : null,
      run.source && run.source.repo ? [h("dt", {}, "Source"),
        h("dd", { class: "mono" }, `${run.source.repo} ${run.source.path || ""} @ ${(run.source.commit || "").slice(0, 12)}`)] : null));
  }

  let actionsKey = null;
  function renderActions() {
    const w = stateWord(run.state), p = run.pipelineName;
    const ws = run.stages.filter((st) => stateWord(st.state) === "waiting");
    // Redrawn only when the choices change, so a button keeps its focus
    // (and a click in flight its target) while events stream in.
    const key = JSON.stringify([w, p, ws.map((st) => [st.name, st.message])]);
    if (key === actionsKey) return;
    actionsKey = key;
    clear(actions);
    if (ACTIVE.has(w) && can("submit", p)) {
      actions.append(h("button", { type: "button", id: "btn-cancel", class: "danger", onclick: () => act({
        title: "Cancel run " + id, detail: "Running stages are stopped; finally stages still run.",
        okText: "Cancel the run", danger: true, answerEl: answer,
        run: () => api.post(api.R.cancel(id)),
        describe: (r) => "the run is " + stateWord(r.state) }) }, "Cancel run"));
    }
    if ((w === "failed" || w === "cancelled") && can("submit", p)) {
      actions.append(h("button", { type: "button", id: "btn-retry", class: "primary", onclick: () => act({
        title: "Retry run " + id, detail: "Stages that succeeded keep their results; the rest run again.",
        okText: "Retry", answerEl: answer,
        run: async () => { const r = await api.post(api.R.retry(id)); if (sub) sub.poke(); return r; },
        describe: (r) => "the run is " + stateWord(r.state) + (r.attempt ? ", attempt " + r.attempt : "") }) }, "Retry from the failed stage"));
    }
    clear(waiting);
    if (ws.length) {
      waiting.append(h("section", { class: "card waiting", "aria-labelledby": "waiting-h" },
        h("h2", { id: "waiting-h" }, "Waiting for approval"),
        ws.map((st) => h("div", { class: "row", dataset: { stage: st.name } },
          h("span", {}, badge(st.state), " ", h("strong", {}, st.name), st.message ? " — " + st.message : ""),
          can("approve", p) ? [
            h("button", { type: "button", class: "primary", id: "approve-" + st.name, onclick: () => decide(st.name, true) }, "Approve"),
            h("button", { type: "button", class: "danger", id: "reject-" + st.name, onclick: () => decide(st.name, false) }, "Reject")]
            : h("span", { class: "muted" }, "(your token cannot approve)")))));
    }
  }

  function decide(stage, yes) {
    return act({
      title: (yes ? "Approve " : "Reject ") + stage,
      detail: yes ? `The run goes on past ${stage}.` : `${stage} fails; stages that need it do not run.`,
      okText: yes ? "Approve" : "Reject", withComment: true, danger: !yes, answerEl: answer,
      run: (comment) => api.post(api.R.approve(id, stage), { approve: yes, comment }),
      describe: (r) => { const st = (r.stages || []).find((x) => x.name === stage); return `${stage} is ${st ? stateWord(st.state) : "?"}, the run is ${stateWord(r.state)}`; },
    });
  }

  function renderStage() {
    clear(stageBox);
    const st = stageOf(selected);
    if (!st) return;
    const d = st.startedAt ? fmtDuration((st.finishedAt ? Date.parse(st.finishedAt) : Date.now()) - Date.parse(st.startedAt)) : "";
    stageBox.append(h("section", { class: "card", id: "stage-card", dataset: { stage: st.name } },
      h("h2", {}, "Stage ", h("span", { class: "mono" }, st.name)),
      h("dl", { class: "facts" },
        h("dt", {}, "State"), h("dd", {}, badge(st.state)),
        h("dt", {}, "Kind"), h("dd", {}, st.kind || ""),
        h("dt", {}, "Attempt"), h("dd", {}, String(st.attempt || 0)),
        st.needs && st.needs.length ? [h("dt", {}, "Needs"), h("dd", {}, st.needs.join(", "))] : null,
        h("dt", {}, "Started"), h("dd", {}, fmtTime(st.startedAt)),
        d ? [h("dt", {}, "Duration"), h("dd", {}, d)] : null,
        st.message ? [h("dt", {}, "Message"), h("dd", { id: "stage-message" }, st.message)] : null),
      h("h3", {}, "Outputs"), kv(st.outputs, "stage-outputs")));
  }

  function renderRest() {
    clear(paramsBox).append(kv(run.params, "params"));
    const outs = {};
    for (const st of run.stages) for (const [k, v] of Object.entries(st.outputs || {})) outs[st.name + "." + k] = v;
    clear(outputsBox).append(kv(outs, "outputs"));
  }

  function select(name, lineNo) {
    selected = name;
    if (graph) graph.select(name);
    renderStage();
    logs.show(name || "*", lineNo);
  }

  function renderCanary(stage) {
    canaryBox.hidden = false;
    const old = canaryBox.querySelector(`section.canary[data-stage="${CSS.escape(stage)}"]`);
    const card = canaryCard(stage, canary.get(stage));
    if (old) old.replaceWith(card);
    else canaryBox.append(card);
  }

  // Batches what events change, drawn once per frame.
  let dirty = new Set();
  function mark(what) {
    if (!dirty.size) requestAnimationFrame(flush);
    dirty.add(what);
  }
  function flush() {
    const d = dirty;
    dirty = new Set();
    if (!run || closed) return;
    if (d.has("graph")) graph.update(run.stages);
    if (d.has("head")) { renderHead(); renderActions(); }
    if (d.has("stage")) renderStage();
    for (const x of d) if (x.startsWith("canary:")) renderCanary(x.slice(7));
    if (d.has("audit")) {
      clear(auditBody).append(...audit.map((e) => h("tr", {},
        h("td", {}, fmtTime(e.time)), h("td", {}, e.stage || ""), h("td", {}, e.message || ""))));
    }
  }

  function setRun(r) {
    run = r;
    run.stages = run.stages || [];
    if (!graph) {
      performance.mark("kpl:graph-start"); // bench/console_bench.py
      graph = drawGraph(run.stages, (name) => { location.hash = `#/runs/${encodeURIComponent(id)}/${encodeURIComponent(name)}`; });
      clear(graphBox).append(graph.svg);
      performance.measure("kpl:graph", "kpl:graph-start");
      // Style, layout and paint happen before the next frame's callbacks
      // and the task after it.
      requestAnimationFrame(() => setTimeout(() => performance.measure("kpl:graph-painted", "kpl:graph-start")));
      if (!selected) {
        const pick = run.stages.find((st) => ["running", "waiting", "failed"].includes(stateWord(st.state)));
        selected = pick ? pick.name : "";
      }
      graph.select(selected);
      logs.show(selected || "*", parts[2] ? parseInt(parts[2].slice(1), 10) : undefined);
    } else {
      graph.update(run.stages);
    }
    renderHead();
    renderActions();
    renderStage();
    renderRest();
  }

  function refresh() {
    clearTimeout(refreshT);
    refreshT = setTimeout(async () => {
      try {
        const r = await api.get(api.R.run(id));
        if (closed) return;
        if (Number(r.lastSeq || 0) < maxSeq) { refresh(); return; }
        setRun(r);
      } catch (_) { /* the stream says what matters */ }
    }, 300);
  }

  function onEvent(ev) {
    const seq = Number(ev.seq || 0);
    if (seq && seq <= maxSeq) return; // a repeat would be a server bug; be safe
    if (seq) maxSeq = seq;
    const st = ev.stage ? stageOf(ev.stage) : null;
    switch (ev.kind) {
      case "EVENT_KIND_LOG": {
        logs.add(ev);
        if (st && (st.kind === "canary" || st.kind === "verify")) {
          if (!canary.has(ev.stage)) canary.set(ev.stage, new CanaryData());
          if (canary.get(ev.stage).add(ev)) mark("canary:" + ev.stage);
        }
        break;
      }
      case "EVENT_KIND_STAGE_STATE":
        if (st) {
          const w = stateWord(ev.stageState);
          st.state = ev.stageState;
          if (ev.attempt) st.attempt = ev.attempt;
          if (w === "running" && ev.time) { st.startedAt = ev.time; st.finishedAt = null; }
          if (!ACTIVE.has(w) && w !== "waiting" && w !== "pending" && ev.time) st.finishedAt = ev.time;
          if (ev.message !== undefined) st.message = ev.message;
          mark("graph");
          mark("head");
          if (ev.stage === selected) mark("stage");
          refresh();
        }
        break;
      case "EVENT_KIND_RUN_STATE":
        if (run) {
          run.state = ev.runState;
          if (ev.message) run.message = ev.message;
          mark("head");
          refresh();
        }
        break;
      case "EVENT_KIND_AUDIT":
        audit.push(ev);
        mark("audit");
        break;
      default:
        break;
    }
  }

  (async () => {
    try {
      setRun(await api.get(api.R.run(id)));
    } catch (e) {
      clear(head).append(h("p", { class: "error-text", role: "alert" }, "Could not read run " + id + ": " + errorText(e)));
      return;
    }
    if (closed) return;
    sub = api.stream(api.R.runEvents(id), {
      onEvent: ({ data }) => { if (data && typeof data === "object") onEvent(data); },
      onState: (st, e) => {
        live.textContent = st === "open" ? "● live" : st === "retrying" ? "○ reconnecting" : st === "ended" ? "finished" : "";
        if (st === "closed" && e) live.textContent = "○ " + errorText(e);
      },
    });
  })();

  // Running stages' durations tick.
  const tick = setInterval(() => {
    if (run && run.stages.some((st) => stateWord(st.state) === "running")) graph && graph.update(run.stages.filter((st) => stateWord(st.state) === "running"));
  }, 1000);

  return {
    cleanup() {
      closed = true;
      clearInterval(tick);
      clearTimeout(refreshT);
      if (sub) sub.close();
    },
    // Same run, another stage or line: no reload.
    update(p) {
      if (p[0] !== id) return false;
      const line = p[2] ? parseInt(p[2].slice(1), 10) : undefined;
      select(p[1] || "", line);
      return true;
    },
  };
}
