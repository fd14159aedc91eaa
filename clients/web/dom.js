// dom.js - building the page without HTML parsing.
//
// Everything that reaches the page from the server (log text, stage names,
// params, messages) is attacker-controlled: it goes in with textContent,
// createElement(NS) and setAttribute only, never parsed as HTML markup.
// h() and s() are the only ways the console makes elements.

export const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") {
      el.addEventListener(k.slice(2), v);
    } else if (k === "text") {
      el.textContent = String(v);
    } else if (k === "class" && Array.isArray(v)) {
      el.setAttribute("class", v.filter(Boolean).join(" "));
    } else if (k === "dataset") {
      for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = String(dv);
    } else {
      el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// h("a", {href: "#/x", class: "btn"}, "text", child...)
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

// s("rect", {x: 1}) : an SVG element.
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function fmtTime(t) {
  if (!t) return "";
  const d = new Date(t);
  if (isNaN(d)) return String(t);
  return d.toLocaleString(undefined, { hour12: false });
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined || isNaN(ms) || ms < 0) return "";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.round(s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

// "RUN_STATE_SUCCEEDED" -> "succeeded"
export function stateWord(state) {
  if (!state) return "unknown";
  return String(state).replace(/^(RUN|STAGE)_STATE_/, "").toLowerCase();
}
