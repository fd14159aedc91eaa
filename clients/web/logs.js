// logs.js - a stage's log, live, that stays quick at 100,000 lines.
//
// Lines are kept in arrays; the page holds only the rows in view (plus a
// margin) inside a spacer as tall as all of them, so the DOM's size does
// not grow with the log. Rows have one fixed height (no wrapping). Each
// line says its stream (stdout, stderr, system) by a class and a marker,
// links to itself (#/runs/RUN/STAGE/L123), and its ANSI colours become
// classed spans (ansi.js); text goes in with textContent only.
import { h, clear } from "./dom.js";
import { segments, strip } from "./ansi.js";

const LH = 18; // px, = .log .line height in style.css
const MARGIN = 40;
const STREAM = { LOG_STREAM_STDOUT: "out", LOG_STREAM_STDERR: "err", LOG_STREAM_SYSTEM: "sys" };

export class LogView {
  constructor(runId, onLink) {
    this.runId = runId;
    this.byStage = new Map(); // stage -> [{s, t, a}]
    this.all = [];            // [{st, s, t, a}]
    this.stage = "*";
    this.follow = true;
    this.hits = [];
    this.hit = -1;
    this.mark = -1;           // the line the URL names (0-based)
    this.dirty = false;
    this.onLink = onLink;

    this.count = h("span", { class: "muted", id: "log-count" }, "0 lines");
    this.followBtn = h("button", { type: "button", id: "log-follow", "aria-pressed": "true",
                                   onclick: () => this.setFollow(!this.follow) }, "Pause");
    this.q = h("input", { type: "search", id: "log-search", placeholder: "search the log", "aria-label": "Search the log",
                          onkeydown: (e) => { if (e.key === "Enter") { e.preventDefault(); this.search(e.shiftKey ? -1 : 1); } } });
    this.hitInfo = h("span", { class: "muted", id: "log-hits", "aria-live": "polite" }, "");
    this.stageSel = h("select", { id: "log-stage", "aria-label": "Stage", onchange: () => this.show(this.stageSel.value) },
      h("option", { value: "*" }, "all stages"));
    this.rows = h("div", { class: "rows", id: "log-rows" });
    this.spacer = h("div", { class: "spacer" }, this.rows);
    this.box = h("div", { class: "log", id: "log", tabindex: 0, role: "log", "aria-label": "Log lines" }, this.spacer);
    this.box.addEventListener("scroll", () => {
      const atEnd = this.box.scrollTop + this.box.clientHeight >= this.box.scrollHeight - LH * 1.5;
      // Scrolling up pauses; scrolling back to the end follows again.
      if (!atEnd && this.follow && !this.autoScrolling) this.setFollow(false);
      else if (atEnd && !this.follow && this.userScrolled) this.setFollow(true);
      this.autoScrolling = false;
      this.schedule();
    });
    this.box.addEventListener("wheel", () => { this.userScrolled = true; }, { passive: true });
    this.box.addEventListener("keydown", () => { this.userScrolled = true; });
    this.el = h("section", { class: "card logs", "aria-labelledby": "logs-h" },
      h("h2", { id: "logs-h" }, "Log"),
      h("div", { class: "row" },
        h("label", { for: "log-stage" }, "Stage"), this.stageSel, this.followBtn, this.count,
        this.q,
        h("button", { type: "button", id: "log-prev", onclick: () => this.search(-1), "aria-label": "Previous match" }, "↑"),
        h("button", { type: "button", id: "log-next", onclick: () => this.search(1), "aria-label": "Next match" }, "↓"),
        this.hitInfo),
      h("p", { class: "legend muted" },
        h("span", { class: "line s-out" }, "stdout"), " ", h("span", { class: "line s-err" }, "stderr"), " ",
        h("span", { class: "line s-sys" }, "system")),
      this.box);
  }

  lines() {
    return this.stage === "*" ? this.all : (this.byStage.get(this.stage) || []);
  }

  // The stage's option in the select, made once.
  option(stage) {
    if (stage === "*" || [...this.stageSel.options].some((o) => o.value === stage)) return;
    this.stageSel.append(h("option", { value: stage }, stage || "(run)"));
  }

  add(ev) {
    const stage = ev.stage || "";
    let arr = this.byStage.get(stage);
    if (!arr) {
      arr = [];
      this.byStage.set(stage, arr);
      this.option(stage);
    }
    const line = { st: stage, s: STREAM[ev.stream] || "sys", t: ev.message || "", a: ev.attempt || 0, n: arr.length + 1 };
    arr.push(line);
    this.all.push(line);
    if (this.stage === "*" || this.stage === stage) this.schedule();
  }

  show(stage, lineNo) {
    this.stage = stage;
    this.option(stage);
    this.stageSel.value = stage;
    this.hits = [];
    this.hit = -1;
    this.hitInfo.textContent = "";
    this.mark = lineNo ? lineNo - 1 : -1;
    this.jumped = false;
    if (this.mark >= 0) {
      this.follow = false;
      this.setFollow(false);
    }
    this.render(true);
  }

  setFollow(on) {
    this.follow = on;
    this.userScrolled = false;
    this.followBtn.textContent = on ? "Pause" : "Follow";
    this.followBtn.setAttribute("aria-pressed", on ? "true" : "false");
    this.box.classList.toggle("paused", !on);
    if (on) this.schedule();
  }

  search(dir) {
    const q = this.q.value.toLowerCase();
    const L = this.lines();
    if (!q) { this.hits = []; this.hitInfo.textContent = ""; this.render(); return; }
    this.hits = [];
    for (let i = 0; i < L.length; i++) if (strip(L[i].t).toLowerCase().includes(q)) this.hits.push(i);
    if (!this.hits.length) { this.hit = -1; this.hitInfo.textContent = "no match"; this.render(); return; }
    this.hit = this.hit < 0 ? (dir > 0 ? 0 : this.hits.length - 1)
      : (this.hit + dir + this.hits.length) % this.hits.length;
    this.hitInfo.textContent = `${this.hit + 1} of ${this.hits.length}`;
    this.setFollow(false);
    this.scrollTo(this.hits[this.hit]);
  }

  scrollTo(i) {
    this.box.scrollTop = Math.max(0, i * LH - this.box.clientHeight / 2);
    this.render(true);
  }

  schedule() {
    if (this.dirty) return;
    this.dirty = true;
    requestAnimationFrame(() => { this.dirty = false; this.render(); });
  }

  render(jump) {
    const L = this.lines();
    this.count.textContent = L.length === 1 ? "1 line" : `${L.length} lines`;
    this.spacer.style.height = L.length * LH + "px"; // CSSOM, not a style attribute: allowed by the CSP
    // The line the URL names, once it has come.
    if (this.mark >= 0 && (jump || !this.jumped) && L.length > this.mark) {
      this.jumped = true;
      this.box.scrollTop = Math.max(0, this.mark * LH - this.box.clientHeight / 3);
    } else if (this.follow && this.box.scrollTop + this.box.clientHeight < L.length * LH) {
      this.autoScrolling = true;
      this.box.scrollTop = L.length * LH;
    }
    const top = this.box.scrollTop, view = this.box.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / LH) - MARGIN);
    const last = Math.min(L.length, Math.ceil((top + view) / LH) + MARGIN);
    const hitSet = this.hit >= 0 ? this.hits[this.hit] : -1;
    clear(this.rows);
    this.rows.style.transform = `translateY(${first * LH}px)`;
    const frag = document.createDocumentFragment();
    for (let i = first; i < last; i++) frag.append(this.row(L[i], i, i === hitSet));
    this.rows.append(frag);
  }

  row(line, i, isHit) {
    const stage = this.stage === "*" ? line.st : this.stage;
    const n = line.n;
    const link = `#/runs/${encodeURIComponent(this.runId)}/${encodeURIComponent(stage)}/L${n}`;
    const text = h("span", { class: "t" });
    for (const seg of segments(line.t)) {
      text.append(seg.cls ? h("span", { class: seg.cls }, seg.text) : document.createTextNode(seg.text));
    }
    const cls = ["line", "s-" + line.s, isHit && "hit", this.stage !== "*" && i === this.mark && "marked"];
    return h("div", { class: cls, id: this.stage !== "*" ? "L" + n : null, dataset: { n, stream: line.s } },
      h("a", { class: "ln", href: link, "aria-label": `line ${n}`, tabindex: -1 }, String(n)),
      h("span", { class: "sm", title: line.s, "aria-hidden": "true" }, line.s === "err" ? "E" : line.s === "sys" ? "»" : " "),
      this.stage === "*" ? h("span", { class: "stg" }, stage) : null,
      text);
  }
}
