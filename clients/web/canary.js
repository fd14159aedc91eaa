// canary.js - a canary's weights over time and its verify rounds, from the
// system log lines stages/canary.c and stages/verify.c write:
//   step 1/5: 10% of traffic to the canary
//   virtualservice shop/web: all traffic back to stable        (-> 0%)
//   request-success-rate = 99.5 (min 99) pass, round 1/3
//   latency-p99 = no data (no series): inconclusive, round 2/3
//   http GET http://... = 200 (expect 200) pass, round 1/1
// Charts are SVG drawn with createElementNS; every value is also in a
// table, and verdicts are told by shape and word as well as colour.
import { h, s, clear, fmtTime } from "./dom.js";

const WEIGHT = /^step (\d+)\/(\d+): (\d+)% of traffic to the canary/;
const STABLE = /^virtualservice [^:]+: all traffic (back )?to stable/;
const ROUND = /^(.+?) = (.+?) \((.*)\):? (pass|fail|inconclusive)(?:: .*)?, round (\d+)\/(\d+)$/;
const NODATA = /^(.+?) = (no data|error)(?: \((.*)\))?:? ?(inconclusive|fail)?.*, round (\d+)\/(\d+)$/;

export class CanaryData {
  constructor() {
    this.weights = []; // {t, w}
    this.rounds = [];  // {t, name, value, num, thr, verdict, round, of}
  }
  // Takes a log event of a canary or verify stage; true if it mattered.
  add(ev) {
    if (ev.stream && ev.stream !== "LOG_STREAM_SYSTEM") return false;
    const text = ev.message || "", t = Date.parse(ev.time) || Date.now();
    let m;
    if ((m = WEIGHT.exec(text))) { this.weights.push({ t, w: +m[3] }); return true; }
    if (STABLE.test(text)) { this.weights.push({ t, w: 0 }); return true; }
    if ((m = NODATA.exec(text))) {
      this.rounds.push({ t, name: m[1], value: m[2] + (m[3] ? " (" + m[3] + ")" : ""), num: null, thr: "",
                         verdict: m[2] === "error" ? "fail" : "inconclusive", round: +m[5], of: +m[6] });
      return true;
    }
    if ((m = ROUND.exec(text))) {
      const num = parseFloat(m[2]);
      this.rounds.push({ t, name: m[1], value: m[2], num: isNaN(num) ? null : num, thr: m[3],
                         min: thrOf(m[3], "min"), max: thrOf(m[3], "max"), verdict: m[4], round: +m[5], of: +m[6] });
      return true;
    }
    return false;
  }
}

function thrOf(thr, which) {
  const m = new RegExp("\\b" + which + " (-?[0-9.eE+]+)").exec(thr || "");
  return m ? parseFloat(m[1]) : null;
}

const CW = 560, CH = 200, L = 44, R = 12, T = 12, B = 28;

function axes(svg, x0, x1, y0, y1, yfmt) {
  const g = s("g", { class: "axes" });
  g.append(s("line", { x1: L, y1: CH - B, x2: CW - R, y2: CH - B }), s("line", { x1: L, y1: T, x2: L, y2: CH - B }));
  for (let k = 0; k <= 4; k++) {
    const v = y0 + (y1 - y0) * k / 4, y = CH - B - (CH - B - T) * k / 4;
    g.append(s("line", { class: "grid", x1: L, y1: y, x2: CW - R, y2: y }),
             s("text", { x: L - 4, y: y + 4, class: "tick", "text-anchor": "end" }, yfmt(v)));
  }
  g.append(s("text", { x: L, y: CH - 8, class: "tick" }, x0),
           s("text", { x: CW - R, y: CH - 8, class: "tick", "text-anchor": "end" }, x1));
  svg.append(g);
}

// The weights as a step line over time.
export function weightChart(data, stage) {
  const pts = data.weights;
  const svg = s("svg", { class: "chart weights", viewBox: `0 0 ${CW} ${CH}`, role: "img",
                         "aria-label": `${stage}: canary weight over time` });
  if (!pts.length) return svg;
  const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1000);
  const X = (t) => L + (CW - L - R) * (t - t0) / (t1 - t0), Y = (w) => CH - B - (CH - B - T) * w / 100;
  axes(svg, fmtTime(t0).split(" ").pop(), fmtTime(t1).split(" ").pop(), 0, 100, (v) => Math.round(v) + "%");
  let d = `M${X(pts[0].t)} ${Y(pts[0].w)}`;
  for (let i = 1; i < pts.length; i++) d += `H${X(pts[i].t)}V${Y(pts[i].w)}`;
  svg.append(s("path", { class: "wline", d }));
  pts.forEach((p) => svg.append(s("circle", { class: "wpt", cx: X(p.t), cy: Y(p.w), r: 3.5 },
    s("title", {}, `${fmtTime(p.t)}: ${p.w}%`))));
  return svg;
}

// One metric's rounds: values against min/max lines; pass a circle, fail
// a cross, inconclusive a hollow triangle (at the axis when no value).
export function roundChart(name, rounds) {
  const svg = s("svg", { class: "chart rounds", viewBox: `0 0 ${CW} ${CH}`, role: "img",
                         "aria-label": `${name}: measured value per verify round against its thresholds` });
  const vals = rounds.map((r) => r.num).filter((v) => v !== null);
  const thr = rounds.flatMap((r) => [r.min, r.max]).filter((v) => v !== null && v !== undefined);
  let lo = Math.min(...vals, ...thr), hi = Math.max(...vals, ...thr);
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi === lo) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.1; lo -= pad; hi += pad;
  const n = rounds.length;
  const X = (i) => L + 12 + (CW - L - R - 24) * (n > 1 ? i / (n - 1) : 0.5);
  const Y = (v) => CH - B - (CH - B - T) * (v - lo) / (hi - lo);
  axes(svg, "round 1", `round ${n}`, lo, hi, (v) => +v.toPrecision(4));
  const last = rounds[rounds.length - 1];
  for (const [k, cls] of [["min", "thr-min"], ["max", "thr-max"]]) {
    if (last && last[k] !== null && last[k] !== undefined) {
      svg.append(s("line", { class: "thr " + cls, x1: L, x2: CW - R, y1: Y(last[k]), y2: Y(last[k]) }),
                 s("text", { class: "tick thr-label", x: CW - R - 2, y: Y(last[k]) - 4, "text-anchor": "end" }, `${k} ${last[k]}`));
    }
  }
  rounds.forEach((r, i) => {
    const x = X(i), y = r.num === null ? CH - B - 8 : Y(r.num);
    const title = s("title", {}, `round ${i + 1}: ${r.value} ${r.verdict}`);
    let mark;
    if (r.verdict === "pass") mark = s("circle", { cx: x, cy: y, r: 5 });
    else if (r.verdict === "fail") mark = s("path", { d: `M${x - 5} ${y - 5}l10 10M${x + 5} ${y - 5}l-10 10` });
    else mark = s("path", { d: `M${x} ${y - 6}l6 10h-12z` });
    svg.append(s("g", { class: "mark v-" + r.verdict, dataset: { verdict: r.verdict } }, mark, title));
  });
  return svg;
}

// The card for one stage: both charts and the rounds' table.
export function canaryCard(stage, data) {
  const card = h("section", { class: "card canary", dataset: { stage }, "aria-label": "canary " + stage });
  clear(card);
  card.append(h("h3", {}, stage));
  const charts = h("div", { class: "charts" });
  card.append(charts);
  if (data.weights.length) {
    charts.append(h("figure", {}, h("figcaption", {}, "Traffic to the canary (%)"), weightChart(data, stage)));
  }
  const names = [...new Set(data.rounds.map((r) => r.name))];
  for (const name of names) {
    const rs = data.rounds.filter((r) => r.name === name);
    charts.append(h("figure", {}, h("figcaption", {}, name + " per verify round"), roundChart(name, rs)));
  }
  if (data.rounds.length) {
    card.append(h("div", { class: "scroll-x" }, h("table", { class: "verify-table" },
      h("thead", {}, h("tr", {}, ["Time", "Measure", "Value", "Thresholds", "Verdict"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, data.rounds.map((r) => h("tr", { dataset: { verdict: r.verdict } },
        h("td", {}, fmtTime(r.t)), h("td", {}, r.name), h("td", { class: "mono" }, r.value), h("td", {}, r.thr),
        h("td", { class: "v-" + r.verdict }, (r.verdict === "pass" ? "● " : r.verdict === "fail" ? "✕ " : "△ ") + r.verdict)))))));
  }
  if (!data.weights.length && !data.rounds.length) card.append(h("p", { class: "muted" }, "No measurements yet."));
  return card;
}
