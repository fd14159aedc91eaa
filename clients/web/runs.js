// runs.js - #/runs: every run, newest first, live.
//
// A page comes from GET /v1/runs (filtered by pipeline and state, paged by
// token); /v1/events (run and stage state changes only) then keeps it
// current: a state change updates its row, a new run that fits the filters
// appears at the top of the first page.
import { h, clear, fmtTime, fmtDuration, stateWord } from "./dom.js";
import * as api from "./api.js";
import { badge, notify, errorText, me } from "./ui.js";

const PAGE = 50;
const STATES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

function hashFor(q) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v) p.set(k, v);
  const qs = p.toString();
  return "#/runs" + (qs ? "?" + qs : "");
}

function duration(run) {
  const a = Date.parse(run.startedAt || run.createdAt);
  const b = run.finishedAt ? Date.parse(run.finishedAt) : Date.now();
  return isNaN(a) ? "" : fmtDuration(b - a);
}

export function runsView(main, query) {
  // A token limited to one pipeline may list only that one's runs.
  const q = { pipeline: me.pipeline || query.get("pipeline") || "", state: query.get("state") || "",
              page: query.get("page") || "", prev: query.get("prev") || "" };
  const rows = new Map(); // run id -> {tr, run}
  const tbody = h("tbody", { id: "runs-body" });
  const info = h("p", { class: "muted", id: "runs-info" }, "loading…");
  const live = h("span", { class: "live muted", id: "runs-live" }, "");

  const pipeline = h("input", { id: "f-pipeline", name: "pipeline", value: q.pipeline, placeholder: "any",
                                list: "pipelines-list", autocomplete: "off", size: 16, readonly: !!me.pipeline });
  const state = h("select", { id: "f-state", name: "state" },
    STATES.map((st) => h("option", { value: st, selected: st === q.state }, st || "any")));
  const search = h("input", { id: "f-id", name: "id", placeholder: "run id", autocomplete: "off",
                              spellcheck: "false", size: 24 });
  const datalist = h("datalist", { id: "pipelines-list" });

  main.append(
    h("h1", {}, "Runs ", live),
    h("form", { class: "row filters", id: "runs-filter", onsubmit: (e) => {
      e.preventDefault();
      location.hash = hashFor({ pipeline: pipeline.value.trim(), state: state.value });
    } },
      h("label", { for: "f-pipeline" }, "Pipeline"), pipeline, datalist,
      h("label", { for: "f-state" }, "State"), state,
      h("button", { type: "submit" }, "Filter")),
    h("form", { class: "row", id: "runs-search", onsubmit: async (e) => {
      e.preventDefault();
      const id = search.value.trim();
      if (!id) return;
      try {
        await api.get(api.R.run(id));
        location.hash = "#/runs/" + encodeURIComponent(id);
      } catch (err) {
        notify("run " + id + ": " + errorText(err), true);
      }
    } },
      h("label", { for: "f-id" }, "Find a run by id"), search, h("button", { type: "submit" }, "Open")),
    info,
    h("div", { class: "scroll-x" },
      h("table", { class: "runs", id: "runs" },
        h("thead", {}, h("tr", {}, ["Run", "Pipeline", "State", "Created", "Duration", "Message"]
          .map((t) => h("th", { scope: "col" }, t)))),
        tbody)),
    h("nav", { class: "row pager", "aria-label": "Pages" },
      q.page ? h("a", { class: "btn", id: "page-first", href: hashFor({ pipeline: q.pipeline, state: q.state }) }, "« Newest") : null,
      q.prev !== "" && q.page ? h("button", { type: "button", id: "page-prev", onclick: () => history.back() }, "‹ Previous") : null,
      h("span", { id: "page-next-slot" })));

  function row(run) {
    const tr = h("tr", { dataset: { run: run.id, state: stateWord(run.state) } },
      h("td", { class: "mono" }, h("a", { href: "#/runs/" + encodeURIComponent(run.id) }, run.id)),
      h("td", {}, run.pipelineName || ""),
      h("td", { class: "state-cell" }, badge(run.state)),
      h("td", {}, fmtTime(run.createdAt)),
      h("td", { class: "dur" }, duration(run)),
      h("td", { class: "msg" }, run.message || ""));
    return tr;
  }

  function put(run, atTop) {
    const old = rows.get(run.id);
    const tr = row(run);
    if (old) old.tr.replaceWith(tr);
    else if (atTop) tbody.prepend(tr);
    else tbody.append(tr);
    rows.set(run.id, { tr, run });
  }

  function fits(run) {
    return (!q.pipeline || run.pipelineName === q.pipeline) &&
           (!q.state || stateWord(run.state) === q.state);
  }

  // Refetches one run (its row, or a new one) after an event about it.
  const pending = new Map();
  function refresh(id, isNew) {
    if (pending.has(id)) return;
    pending.set(id, setTimeout(async () => {
      pending.delete(id);
      try {
        const run = await api.get(api.R.run(id));
        if (rows.has(id)) {
          if (fits(run)) put(run);
          else { rows.get(id).tr.remove(); rows.delete(id); }
        } else if (isNew && fits(run)) {
          put(run, true);
          while (rows.size > PAGE && tbody.lastChild) {
            rows.delete(tbody.lastChild.dataset.run);
            tbody.lastChild.remove();
          }
        }
      } catch (_) { /* it may be gone (retention): nothing to show */ }
    }, 150));
  }

  let sub = null;
  (async () => {
    try {
      const res = await api.get(api.R.runs(), {
        pipelineName: q.pipeline, state: q.state ? "RUN_STATE_" + q.state.toUpperCase() : "",
        pageSize: PAGE, pageToken: q.page });
      const runs = res.runs || [];
      runs.forEach((r) => put(r));
      const names = new Set(runs.map((r) => r.pipelineName));
      names.forEach((n) => datalist.append(h("option", { value: n })));
      info.textContent = runs.length ? `${runs.length} runs on this page` : "No runs.";
      // For bench/console_bench.py: the first useful paint.
      performance.mark("kpl:runs-listed");
      if (res.nextPageToken) {
        document.getElementById("page-next-slot").append(h("a", { class: "btn", id: "page-next",
          href: hashFor({ pipeline: q.pipeline, state: q.state, page: res.nextPageToken, prev: q.page || "-" }) }, "Older ›"));
      }
    } catch (e) {
      info.textContent = "Could not list runs: " + errorText(e);
      info.className = "error-text";
      return;
    }
    // Live: state changes of every run (new runs only on the first page).
    sub = api.stream(api.url(api.R.events(), { kinds: "EVENT_KIND_RUN_STATE", pipelineName: q.pipeline }), {
      onState: (st, e) => { live.textContent = st === "open" ? "● live" : st === "retrying" ? "○ reconnecting" : "○ not live" + (e ? ": " + errorText(e) : ""); },
      onEvent: ({ data }) => {
        if (!data || typeof data !== "object" || !data.runId) return;
        if (data.kind && data.kind !== "EVENT_KIND_RUN_STATE") return;
        if (rows.has(data.runId)) {
          const { run } = rows.get(data.runId);
          if (data.runState) {
            // At once from the event, then the whole run from the server.
            put(Object.assign({}, run, { state: data.runState, message: data.message || run.message }));
          }
          refresh(data.runId, false);
        } else if (!q.page) {
          refresh(data.runId, true);
        }
      },
    });
  })();

  // Running runs' durations tick.
  const tick = setInterval(() => {
    for (const { tr, run } of rows.values()) {
      if (!run.finishedAt) tr.querySelector(".dur").textContent = duration(run);
    }
  }, 1000);

  return () => {
    clearInterval(tick);
    if (sub) sub.close();
    pending.forEach((t) => clearTimeout(t));
  };
}
