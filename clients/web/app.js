// app.js - the console's entry: sign-in, the header, the router (#/...).
//
// Routes live in the URL's fragment (#/runs, #/runs/RUN/STAGE/L12, ...) so
// kpld serves one page; views are functions that fill <main> and return a
// cleanup (streams to close) or {cleanup, update(parts)} when they can
// follow a change of the fragment themselves (same run, another line).
import { h, clear } from "./dom.js";
import * as api from "./api.js";
import { loadMe, me, can, errorText } from "./ui.js";
import { runsView } from "./runs.js";
import { runView } from "./run.js";
import { releasesView, pipelinesView, secretsView, tokensView, auditView } from "./admin.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let current = null; // {name, cleanup, update}
let ready = false;   // the token's scope is known

const SECTIONS = [
  { name: "runs", label: "Runs", scope: "read", view: runsView },
  // Not about one pipeline: a token limited to one may not see them.
  { name: "releases", label: "Releases", scope: "read", view: releasesView, unbound: true },
  { name: "pipelines", label: "Pipelines", scope: "read", view: pipelinesView, unbound: true },
  { name: "secrets", label: "Secrets", scope: "admin", view: secretsView },
  { name: "tokens", label: "Tokens", scope: "admin", view: tokensView },
  { name: "audit", label: "Audit", scope: "admin", view: auditView },
];

function allowed(sec) {
  return can(sec.scope) && !(sec.unbound && me.pipeline);
}

function signIn(message) {
  stop();
  clear(main);
  clear(nav);
  clear(who);
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off",
                             spellcheck: "false", "aria-describedby": "token-help", required: true });
  const form = h("form", { class: "card signin", id: "signin", onsubmit: (e) => {
    e.preventDefault();
    api.setToken(input.value.trim());
    if (!location.hash || location.hash === "#/signout") location.hash = "#/runs";
    start();
  } },
    h("h1", {}, "Sign in to kpl"),
    h("label", { for: "token" }, "Token"),
    input,
    h("p", { id: "token-help", class: "muted" },
      "Paste a token (kplctl token create, or kpld --bootstrap-token-file). It stays in this tab only " +
      "(sessionStorage) and goes to kpld in an Authorization header; no cookie is ever set."),
    h("p", { class: "error-text", id: "signin-error", role: "alert" }, message || ""),
    h("button", { type: "submit", class: "primary" }, "Sign in"));
  main.append(form);
  input.focus();
}

function stop() {
  if (current && current.cleanup) current.cleanup();
  current = null;
}

function header(section) {
  clear(nav);
  for (const sec of SECTIONS) {
    if (!allowed(sec)) continue;
    nav.append(h("a", { href: "#/" + sec.name, "aria-current": sec.name === section ? "page" : null }, sec.label));
  }
  clear(who).append(me.known ? `${me.scope} token${me.pipeline ? " for " + me.pipeline : ""} ` : "signed in ",
    h("button", { type: "button", id: "signout", onclick: () => { api.setToken(""); ready = false; signIn(); } }, "Sign out"));
}

function parse() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, qs] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { section: parts[0] || "runs", rest: parts.slice(1), query: new URLSearchParams(qs || "") };
}

function route() {
  if (!api.token()) { signIn(); return; }
  const { section, rest, query } = parse();
  if (current && current.name === section + "/" + (rest[0] || "") && current.update && current.update(rest)) return;
  stop();
  clear(main);
  header(section);
  const sec = SECTIONS.find((x) => x.name === section);
  let ret;
  if (section === "runs" && rest.length) ret = runView(main, rest);
  else if (sec && allowed(sec)) ret = sec.view(main, query);
  else main.append(h("h1", {}, "Not here"), h("p", {}, "No such page, or your token may not see it. ", h("a", { href: "#/runs" }, "Runs")));
  current = { name: section + "/" + (rest[0] || ""), cleanup: typeof ret === "function" ? ret : ret && ret.cleanup,
              update: ret && ret.update };
  if (!rest[1]) main.focus({ preventScroll: true });
}

async function start() {
  ready = false;
  try {
    await loadMe();
    ready = true;
  } catch (e) {
    api.setToken("");
    signIn("kpld refused the token: " + errorText(e));
    return;
  }
  route();
}

window.addEventListener("hashchange", () => { if (api.token() && ready) route(); });
if (api.token()) start();
else signIn();
