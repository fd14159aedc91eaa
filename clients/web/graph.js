// graph.js - a run's stages as an SVG DAG, laid out in layers by `needs`.
//
// A stage's layer is one more than its deepest need's; within a layer the
// stages are ordered by the mean position of their needs (one barycentre
// pass), which keeps most edges short. Each node says its state by colour,
// by a glyph's shape and in words, with its attempt and duration.
import { s, fmtDuration, stateWord } from "./dom.js";
import { glyph } from "./ui.js";

const W = 164, H = 58, GX = 36, GY = 14, PAD = 8;

export function layout(stages) {
  const byName = new Map(stages.map((st) => [st.name, st]));
  const layer = new Map();
  const visiting = new Set();
  function depth(name) {
    if (layer.has(name)) return layer.get(name);
    if (visiting.has(name)) return 0; // a cycle cannot be stored; be safe
    visiting.add(name);
    let d = 0;
    for (const n of (byName.get(name) || {}).needs || []) if (byName.has(n)) d = Math.max(d, depth(n) + 1);
    visiting.delete(name);
    layer.set(name, d);
    return d;
  }
  stages.forEach((st) => depth(st.name));
  const cols = [];
  stages.forEach((st) => { (cols[layer.get(st.name)] ||= []).push(st.name); });
  const row = new Map();
  cols.forEach((col, i) => {
    if (i > 0) {
      const key = (name) => {
        const ns = ((byName.get(name).needs) || []).filter((n) => row.has(n));
        return ns.length ? ns.reduce((a, n) => a + row.get(n), 0) / ns.length : 0;
      };
      const k = new Map(col.map((n, j) => [n, key(n) + j * 1e-6]));
      col.sort((a, b) => k.get(a) - k.get(b));
    }
    col.forEach((n, j) => row.set(n, j));
  });
  const rows = Math.max(1, ...cols.map((c) => c.length));
  const pos = new Map();
  cols.forEach((col, i) => col.forEach((n, j) => {
    // Centre short columns against the tallest.
    const off = (rows - col.length) / 2;
    pos.set(n, { x: PAD + i * (W + GX), y: PAD + (j + off) * (H + GY) });
  }));
  return { pos, width: PAD * 2 + cols.length * (W + GX) - GX, height: PAD * 2 + rows * (H + GY) - GY };
}

function stageDuration(st, now) {
  const a = Date.parse(st.startedAt);
  if (isNaN(a)) return "";
  const b = st.finishedAt ? Date.parse(st.finishedAt) : now;
  return fmtDuration(Math.max(0, b - a));
}

function nodeLabel(st) {
  const w = stateWord(st.state);
  let t = `${st.name}: ${w}`;
  if (st.attempt > 1) t += `, attempt ${st.attempt}`;
  const d = stageDuration(st, Date.now());
  if (d) t += `, ${d}`;
  return t;
}

function trim(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// Draws the graph; onSelect(name) when a node is chosen (click, Enter or
// Space). Returns {svg, update(stages), select(name)}.
export function drawGraph(stages, onSelect) {
  const lay = layout(stages);
  // Up to about 10 layers the graph shrinks to fit the page; wider, it
  // keeps its size and scrolls.
  const svg = s("svg", { class: lay.width <= 2100 ? "dag fit" : "dag", id: "dag", role: "group", "aria-label": "Stage graph",
                         viewBox: `0 0 ${lay.width} ${lay.height}`, width: lay.width, height: lay.height });
  const edges = s("g", { class: "edges" });
  const nodes = s("g", { class: "nodes" });
  svg.append(edges, nodes);
  for (const st of stages) {
    const b = lay.pos.get(st.name);
    for (const n of st.needs || []) {
      const a = lay.pos.get(n);
      if (!a) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      edges.append(s("path", { d: `M${x1} ${y1}C${mx} ${y1} ${mx} ${y2} ${x2} ${y2}`,
                               class: "edge", dataset: { from: n, to: st.name } }));
    }
  }
  const els = new Map();
  for (const st of stages) {
    const p = lay.pos.get(st.name);
    const g = s("g", { class: "node", transform: `translate(${p.x} ${p.y})`, tabindex: 0, role: "button",
                       dataset: { stage: st.name } });
    const choose = () => onSelect && onSelect(st.name);
    g.addEventListener("click", choose);
    g.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); choose(); }
    });
    els.set(st.name, g);
    nodes.append(g);
  }

  function paint(st) {
    const g = els.get(st.name);
    if (!g) return;
    const w = stateWord(st.state);
    while (g.firstChild) g.removeChild(g.firstChild);
    g.setAttribute("class", `node state-${w}` + (g.dataset.selected ? " selected" : ""));
    g.dataset.state = w;
    g.dataset.attempt = st.attempt || 0;
    g.setAttribute("aria-label", nodeLabel(st));
    const title = s("title", {}, nodeLabel(st) + (st.message ? " — " + st.message : ""));
    const d = stageDuration(st, Date.now());
    g.append(title,
      s("rect", { class: "box", width: W, height: H, rx: 6 }),
      s("rect", { class: "bar", width: 6, height: H, rx: 2 }),
      glyph(w, 14, 8),
      s("text", { class: "name", x: 36, y: 20 }, trim(st.name, 16)),
      s("text", { class: "sub", x: 14, y: 44 },
        trim(w + (st.attempt > 1 ? ` · try ${st.attempt}` : "") + (d ? ` · ${d}` : "") + (st.kind ? ` · ${st.kind}` : ""), 25)));
  }
  stages.forEach(paint);
  return {
    svg,
    update(list) { list.forEach(paint); },
    select(name) {
      for (const [n, g] of els) {
        if (n === name) { g.dataset.selected = "1"; g.classList.add("selected"); g.setAttribute("aria-pressed", "true"); }
        else { delete g.dataset.selected; g.classList.remove("selected"); g.setAttribute("aria-pressed", "false"); }
      }
    },
  };
}
