// admin.js - #/releases, #/pipelines, #/secrets, #/tokens, #/audit.
import { h, clear, fmtTime, stateWord } from "./dom.js";
import * as api from "./api.js";
import { act, can, errorText, notify } from "./ui.js";

function table(id, heads, rows) {
  return h("div", { class: "scroll-x" }, h("table", { id },
    h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows)));
}

function failed(box, what, e) {
  clear(box).append(h("p", { class: "error-text", role: "alert" }, `Could not ${what}: ${errorText(e)}`));
}

const runLink = (id) => id ? h("a", { class: "mono", href: "#/runs/" + encodeURIComponent(id) }, id) : "";

// -- releases -------------------------------------------------------------

const RECENT = "kpl.deployments";

export function releasesView(main, query) {
  const dep = query.get("deployment") || "";
  const recent = JSON.parse(sessionStorage.getItem(RECENT) || "[]");
  const input = h("input", { id: "f-deployment", name: "deployment", value: dep, size: 36, list: "deps",
                             placeholder: "cluster/namespace/deployment", autocomplete: "off", spellcheck: "false" });
  const box = h("div", { id: "releases" });
  const answer = h("p", { class: "answer", id: "answer", role: "status" });
  main.append(h("h1", {}, "Releases"),
    h("form", { class: "row", id: "releases-form", onsubmit: (e) => {
      e.preventDefault();
      location.hash = "#/releases?deployment=" + encodeURIComponent(input.value.trim());
    } }, h("label", { for: "f-deployment" }, "Deployment"), input,
      h("datalist", { id: "deps" }, recent.map((d) => h("option", { value: d }))),
      h("button", { type: "submit" }, "Show")),
    answer, box);
  if (!dep) {
    box.append(h("p", { class: "muted" }, "Name a deployment as cluster/namespace/name (cluster: a kubernetes: endpoint of kpld's config)."));
    return null;
  }
  sessionStorage.setItem(RECENT, JSON.stringify([dep, ...recent.filter((d) => d !== dep)].slice(0, 20)));
  (async () => {
    let res;
    try { res = await api.get(api.R.releases(), { deployment: dep, limit: 100 }); } catch (e) { failed(box, "list releases", e); return; }
    const rel = res.releases || [];
    if (!rel.length) { box.append(h("p", { class: "muted" }, "No releases of " + dep + ".")); return; }
    box.append(table("releases-table", ["#", "Time", "Kind", "Revision", "Image", "Before", "Run"],
      rel.map((r) => h("tr", { dataset: { revision: r.revision || "" } },
        h("td", {}, String(r.seq || "")), h("td", {}, fmtTime(r.time)), h("td", {}, r.kind || ""),
        h("td", { class: "mono" }, r.revision || ""), h("td", { class: "mono" }, r.image || ""),
        h("td", { class: "mono" }, (r.previousRevision || "") + (r.previousImage ? " " + r.previousImage : "")),
        h("td", {}, runLink(r.runId), r.stage ? " " + r.stage : "")))));
    if (!can("approve")) return;
    // Every revision the history names, but the one running now.
    // (An entry without a revision is an action's intent, recorded before
    // its result.)
    const current = (rel.find((r) => r.revision) || {}).revision, choices = new Map();
    for (const r of rel) {
      if (r.revision && r.revision !== current && !choices.has(r.revision)) choices.set(r.revision, r.image || "");
      if (r.previousRevision && r.previousRevision !== current && !choices.has(r.previousRevision)) choices.set(r.previousRevision, r.previousImage || "");
    }
    if (!choices.size) return;
    const sel = h("select", { id: "rollback-to" }, [...choices].map(([rev, img]) =>
      h("option", { value: rev }, `revision ${rev}${img ? " — " + img : ""}`)));
    box.append(h("form", { class: "card row", id: "rollback-form", onsubmit: (e) => {
      e.preventDefault();
      const rev = sel.value;
      act({
        title: `Roll ${dep} back to revision ${rev}`,
        detail: `A run restores revision ${rev} (${choices.get(rev) || "its pod template"}) and sets the mesh weights back to stable.`,
        okText: "Roll back", danger: true, answerEl: answer,
        run: () => api.post(api.R.rollback(), { deployment: dep, toRevision: rev }),
        describe: (run) => { if (run.id) answer.dataset.run = run.id; return "run " + (run.id || "?") + " started (" + stateWord(run.state) + ")"; },
      });
    } }, h("label", { for: "rollback-to" }, "Roll back to"), sel,
      h("button", { type: "submit", class: "danger", id: "rollback-btn" }, "Roll back")));
  })();
  return null;
}

// -- pipelines ------------------------------------------------------------

export function pipelinesView(main) {
  const box = h("div", { id: "pipelines" });
  main.append(h("h1", {}, "Pipelines"), h("p", { class: "muted" },
    "Registered pipelines: pushes to their repository's branches start runs (docs/hooks.md)."), box);
  (async () => {
    let res;
    try { res = await api.get(api.R.pipelines()); } catch (e) { failed(box, "list pipelines", e); return; }
    const ps = res.pipelines || [];
    if (!ps.length) { box.append(h("p", { class: "muted" }, "No registered pipelines.")); return; }
    box.append(table("pipelines-table", ["Name", "Repository", "Branches", "File", "Secret", "Created", ""],
      ps.map((p) => h("tr", {},
        h("td", {}, h("a", { href: "#/runs?pipeline=" + encodeURIComponent(p.name) }, p.name)),
        h("td", { class: "mono" }, p.repo || ""), h("td", {}, (p.branches || []).join(", ")),
        h("td", { class: "mono" }, p.path || ""), h("td", { class: "mono" }, p.secret || ""),
        h("td", {}, fmtTime(p.createdAt), p.createdBy ? " by " + p.createdBy : ""),
        h("td", {}, can("submit", p.name) ? h("button", { type: "button", onclick: () => act({
          title: "Run " + p.name, detail: `Starts ${p.name} from its repository's first branch.`, okText: "Run",
          run: () => api.post(api.R.pipeline(p.name) + ":run", {}),
          describe: (run) => { if (run.id) location.hash = "#/runs/" + encodeURIComponent(run.id); return "run " + run.id; } }) }, "Run") : null)))));
  })();
  return null;
}

// -- secrets --------------------------------------------------------------

export function secretsView(main) {
  const box = h("div", { id: "secrets" });
  const answer = h("p", { class: "answer", id: "answer", role: "status" });
  const name = h("input", { id: "s-name", required: true, pattern: "[A-Za-z_][A-Za-z0-9_]*", autocomplete: "off", spellcheck: "false" });
  const value = h("input", { id: "s-value", type: "password", required: true, autocomplete: "new-password" });
  const pipes = h("input", { id: "s-pipelines", placeholder: "all pipelines", autocomplete: "off" });
  main.append(h("h1", {}, "Secrets"),
    h("p", { class: "muted" }, "Names and the pipelines that may read them. Values are never shown: kpld returns none."),
    box, answer,
    can("admin") ? h("form", { class: "card", id: "secret-form", autocomplete: "off", onsubmit: async (e) => {
      e.preventDefault();
      const n = name.value.trim();
      const res = await act({ title: "Set secret " + n, detail: "The value is sealed in kpld's store and cannot be read back.",
        okText: "Set", answerEl: answer,
        run: () => api.put(api.R.secret(n), { name: n, value: value.value,
          pipelines: pipes.value.split(",").map((x) => x.trim()).filter(Boolean) }),
        describe: (sec) => "set " + (sec.name || n) });
      if (res) { value.value = ""; load(); }
    } }, h("h2", {}, "Set a secret"),
      h("div", { class: "row" }, h("label", { for: "s-name" }, "Name"), name),
      h("div", { class: "row" }, h("label", { for: "s-value" }, "Value"), value),
      h("div", { class: "row" }, h("label", { for: "s-pipelines" }, "Pipelines (comma-separated)"), pipes),
      h("button", { type: "submit", class: "primary" }, "Set")) : null);
  async function load() {
    let res;
    try { res = await api.get(api.R.secrets()); } catch (e) { failed(box, "list secrets", e); return; }
    const ss = res.secrets || [];
    clear(box).append(ss.length ? table("secrets-table", ["Name", "Pipelines", ""], ss.map((sec) => h("tr", { dataset: { name: sec.name } },
      h("td", { class: "mono" }, sec.name), h("td", {}, (sec.pipelines || []).join(", ") || "all"),
      h("td", {}, can("admin") ? h("button", { type: "button", class: "danger", onclick: async () => {
        if (await act({ title: "Delete secret " + sec.name, detail: "Runs that use it will fail to start.", okText: "Delete",
          danger: true, answerEl: answer, run: () => api.del(api.R.secret(sec.name)), describe: () => "deleted" })) load();
      } }, "Delete") : null)))) : h("p", { class: "muted" }, "No secrets."));
  }
  load();
  return null;
}

// -- tokens ---------------------------------------------------------------

export function tokensView(main) {
  const box = h("div", { id: "tokens" });
  const answer = h("p", { class: "answer", id: "answer", role: "status" });
  const scope = h("select", { id: "t-scope" }, ["read", "submit", "approve", "admin"].map((x) => h("option", { value: x }, x)));
  const pipeline = h("input", { id: "t-pipeline", placeholder: "any pipeline", autocomplete: "off" });
  const desc = h("input", { id: "t-desc", autocomplete: "off", size: 30 });
  const made = h("div", { id: "t-made" });
  main.append(h("h1", {}, "Tokens"), box, answer,
    h("form", { class: "card", id: "token-form", onsubmit: async (e) => {
      e.preventDefault();
      const res = await act({ title: "Create a " + scope.value + " token", detail: "The token is shown once, here.", okText: "Create",
        answerEl: answer,
        run: () => api.post(api.R.tokens(), { scope: "TOKEN_SCOPE_" + scope.value.toUpperCase(), pipeline: pipeline.value.trim(),
                                               description: desc.value }),
        describe: (r) => "created " + (r.info ? r.info.id : "") });
      if (res && res.token) {
        clear(made).append(h("p", {}, "Copy it now; it is not shown again: ", h("code", { id: "t-secret" }, res.token)));
        load();
      }
    } }, h("h2", {}, "Create a token"),
      h("div", { class: "row" }, h("label", { for: "t-scope" }, "Scope"), scope,
        h("label", { for: "t-pipeline" }, "Pipeline"), pipeline, h("label", { for: "t-desc" }, "Description"), desc),
      h("button", { type: "submit", class: "primary" }, "Create"), made));
  async function load() {
    let res;
    try { res = await api.get(api.R.tokens()); } catch (e) { failed(box, "list tokens", e); return; }
    clear(box).append(table("tokens-table", ["Id", "Scope", "Pipeline", "Description", "Created", "Revoked", ""],
      (res.tokens || []).map((t) => h("tr", {},
        h("td", { class: "mono" }, t.id), h("td", {}, String(t.scope || "").replace(/^TOKEN_SCOPE_/, "").toLowerCase()),
        h("td", {}, t.pipeline || "any"), h("td", {}, t.description || ""),
        h("td", {}, fmtTime(t.createdAt), t.createdBy ? " by " + t.createdBy : ""), h("td", {}, fmtTime(t.revokedAt)),
        h("td", {}, t.revokedAt ? null : h("button", { type: "button", class: "danger", onclick: async () => {
          if (await act({ title: "Revoke token " + t.id, detail: "Clients using it are refused from now on.", okText: "Revoke",
            danger: true, answerEl: answer, run: () => api.post(api.R.revoke(t.id), {}), describe: () => "revoked" })) load();
        } }, "Revoke"))))));
  }
  load();
  return null;
}

// -- audit ----------------------------------------------------------------

export function auditView(main, query) {
  const from = query.get("from") || "";
  const box = h("div", { id: "audit" });
  main.append(h("h1", {}, "Audit log"), h("p", { class: "muted" }, "Approvals, cancels, rollbacks, token and secret changes, with who did them."), box);
  (async () => {
    let res;
    try { res = await api.get(api.R.audit(), { fromSeq: from, limit: 200 }); } catch (e) { failed(box, "read the audit log", e); return; }
    const evs = res.events || [];
    box.append(evs.length ? table("audit-log", ["Seq", "Time", "Run", "Stage", "What"], evs.map((e) => h("tr", {},
      h("td", {}, String(e.globalSeq || e.seq || "")), h("td", {}, fmtTime(e.time)), h("td", {}, runLink(e.runId)),
      h("td", {}, e.stage || ""), h("td", {}, e.message || "")))) : h("p", { class: "muted" }, "Nothing yet."));
    if (res.nextSeq && evs.length) {
      box.append(h("p", {}, h("a", { class: "btn", id: "audit-next", href: "#/audit?from=" + encodeURIComponent(res.nextSeq) }, "Later entries ›")));
    }
  })();
  return null;
}

export { notify };
