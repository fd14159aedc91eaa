// ui.js - pieces the views share: state badges, the status area, the
// confirmation dialog, the caller's scope.
import { h, s, clear, stateWord } from "./dom.js";
import * as api from "./api.js";

// Each state has a colour, a word and a shape, so no one needs colour to
// tell them apart (and the words are there for screen readers).
export const SHAPES = {
  succeeded: "check", failed: "cross", running: "ring", queued: "hollow", pending: "hollow",
  waiting: "pause", skipped: "dash", cancelled: "slash", unknown: "hollow",
};

// An SVG glyph for a state, drawn in a 16x16 box at (x, y).
export function glyph(word, x = 0, y = 0) {
  const g = s("g", { class: "glyph glyph-" + (SHAPES[word] || "hollow"), transform: `translate(${x} ${y})`,
                     "aria-hidden": "true" });
  switch (SHAPES[word] || "hollow") {
    case "check":
      g.append(s("circle", { cx: 8, cy: 8, r: 8 }), s("path", { d: "M4 8.5l3 3 5-6", class: "stroke" }));
      break;
    case "cross":
      g.append(s("rect", { x: 0, y: 0, width: 16, height: 16, rx: 2 }),
               s("path", { d: "M4.5 4.5l7 7M11.5 4.5l-7 7", class: "stroke" }));
      break;
    case "ring":
      g.append(s("circle", { cx: 8, cy: 8, r: 6.5, class: "ringline" }), s("circle", { cx: 8, cy: 8, r: 3 }));
      break;
    case "pause":
      g.append(s("path", { d: "M8 0l8 8-8 8-8-8z" }), s("path", { d: "M6.5 5v6M9.5 5v6", class: "stroke" }));
      break;
    case "dash":
      g.append(s("circle", { cx: 8, cy: 8, r: 7, class: "ringline" }), s("path", { d: "M4 8h8", class: "stroke dark" }));
      break;
    case "slash":
      g.append(s("circle", { cx: 8, cy: 8, r: 7, class: "ringline" }), s("path", { d: "M3.5 12.5l9-9", class: "stroke dark" }));
      break;
    default:
      g.append(s("circle", { cx: 8, cy: 8, r: 6.5, class: "ringline" }));
  }
  return g;
}

// <span class="badge state-failed"><svg>x</svg> failed</span>
export function badge(state) {
  const w = stateWord(state);
  return h("span", { class: ["badge", "state-" + w], dataset: { state: w } },
    s("svg", { viewBox: "0 0 16 16", width: 14, height: 14, class: "state-" + w }, glyph(w)), " " + w);
}

// Messages in the live region at the bottom right (role=status).
export function notify(text, isError) {
  const box = document.getElementById("status");
  const m = h("div", { class: ["msg", isError && "error"] }, text);
  box.append(m);
  setTimeout(() => m.remove(), isError ? 15000 : 8000);
  return m;
}

export function errorText(e) {
  if (e instanceof api.ApiError) return `${e.status} ${e.code || ""}: ${e.message}`.replace(" :", ":");
  return String(e && e.message ? e.message : e);
}

// A modal <dialog> asking to confirm an action; resolves {ok, comment}.
// withComment adds a text area. Escape or Cancel resolve ok=false.
export function confirmDialog(title, detail, { okText = "Confirm", withComment = false, danger = false } = {}) {
  return new Promise((resolve) => {
    const comment = withComment ? h("textarea", { id: "confirm-comment", rows: 3, maxlength: 1000 }) : null;
    const ok = h("button", { type: "submit", value: "ok", class: danger ? "danger" : "primary", id: "confirm-ok" }, okText);
    const dlg = h("dialog", { class: "confirm", "aria-labelledby": "confirm-title", id: "confirm" },
      h("form", { method: "dialog" },
        h("h2", { id: "confirm-title" }, title),
        h("p", {}, detail),
        withComment ? [h("label", { for: "confirm-comment" }, "Comment (optional)"), comment] : null,
        h("div", { class: "row" }, ok,
          h("button", { type: "submit", value: "cancel", id: "confirm-cancel" }, "Cancel"))));
    dlg.addEventListener("close", () => {
      resolve({ ok: dlg.returnValue === "ok", comment: comment ? comment.value : "" });
      dlg.remove();
    });
    document.body.append(dlg);
    dlg.showModal();
    (comment || ok).focus();
  });
}

// Runs an action after confirmation; shows what the server answered, in
// the status area and in the given element (id="answer").
export async function act({ title, detail, okText, withComment, danger, run, answerEl, describe }) {
  const c = await confirmDialog(title, detail, { okText, withComment, danger });
  if (!c.ok) return null;
  try {
    const res = await run(c.comment);
    const text = describe ? describe(res) : "done";
    notify(title + ": " + text);
    if (answerEl) {
      clear(answerEl).append(h("strong", {}, title + ": "), text);
      answerEl.className = "answer ok";
    }
    return res;
  } catch (e) {
    notify(title + " refused: " + errorText(e), true);
    if (answerEl) {
      clear(answerEl).append(h("strong", {}, title + " refused: "), errorText(e));
      answerEl.className = "answer error";
    }
    return null;
  }
}

// The caller's scope: read < submit < approve < admin, maybe one pipeline.
const RANK = { read: 1, submit: 2, approve: 3, admin: 4 };
export const me = { scope: "", pipeline: "", rank: 0 };

export async function loadMe() {
  try {
    const w = await api.get(api.R.whoami());
    const scope = String(w.scope || "").replace(/^TOKEN_SCOPE_/, "").toLowerCase();
    me.scope = scope;
    me.pipeline = w.pipeline || "";
    me.rank = RANK[scope] || 0;
    me.known = true;
  } catch (e) {
    if (e instanceof api.ApiError && (e.status === 401 || e.status === 403)) throw e;
    // No whoami (or it failed): show everything, the server still decides.
    me.scope = "unknown";
    me.rank = 4;
    me.known = false;
  }
  return me;
}

// True if the token may do what needs scope on pipeline (undefined: any).
export function can(scope, pipeline) {
  if (me.rank < RANK[scope]) return false;
  return !me.pipeline || pipeline === undefined || me.pipeline === pipeline;
}
