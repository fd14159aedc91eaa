// ansi.js - ANSI SGR colours in log text as classed segments.
//
// Colours and bold/italic/underline become CSS classes (ansi-fg-N,
// ansi-bg-N, ansi-b, ansi-i, ansi-u; N 0-15); every other escape sequence
// is dropped. The text itself is never interpreted: the caller inserts
// each segment with textContent.

const SEQ = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?/g;

// "\x1b[31mred\x1b[0m ok" -> [{text: "red", cls: "ansi-fg-1"}, {text: " ok", cls: ""}]
export function segments(line) {
  const out = [];
  let st = { fg: -1, bg: -1, b: false, i: false, u: false };
  let last = 0, m;
  SEQ.lastIndex = 0;
  const cls = () => [st.fg >= 0 && "ansi-fg-" + st.fg, st.bg >= 0 && "ansi-bg-" + st.bg,
                     st.b && "ansi-b", st.i && "ansi-i", st.u && "ansi-u"].filter(Boolean).join(" ");
  const emit = (text) => {
    if (!text) return;
    const c = cls();
    if (out.length && out[out.length - 1].cls === c) out[out.length - 1].text += text;
    else out.push({ text, cls: c });
  };
  while ((m = SEQ.exec(line))) {
    emit(line.slice(last, m.index));
    last = SEQ.lastIndex;
    if (m[2] === "m") st = sgr(st, m[1]);
  }
  emit(line.slice(last));
  return out;
}

// The text without any escape sequence (for search).
export function strip(line) {
  return line.indexOf("\x1b") < 0 ? line : line.replace(SEQ, "");
}

function sgr(prev, params) {
  const st = Object.assign({}, prev);
  const p = params === "" ? [0] : params.split(";").map((x) => parseInt(x || "0", 10));
  for (let k = 0; k < p.length; k++) {
    const n = p[k];
    if (n === 0) Object.assign(st, { fg: -1, bg: -1, b: false, i: false, u: false });
    else if (n === 1) st.b = true;
    else if (n === 3) st.i = true;
    else if (n === 4) st.u = true;
    else if (n === 22) st.b = false;
    else if (n === 23) st.i = false;
    else if (n === 24) st.u = false;
    else if (n >= 30 && n <= 37) st.fg = n - 30;
    else if (n === 39) st.fg = -1;
    else if (n >= 40 && n <= 47) st.bg = n - 40;
    else if (n === 49) st.bg = -1;
    else if (n >= 90 && n <= 97) st.fg = n - 90 + 8;
    else if (n >= 100 && n <= 107) st.bg = n - 100 + 8;
    else if ((n === 38 || n === 48) && p[k + 1] === 5) {
      // 256 colours: the first 16 have classes; the rest are left plain.
      const c = p[k + 2];
      st[n === 38 ? "fg" : "bg"] = c < 16 ? c : -1;
      k += 2;
    } else if ((n === 38 || n === 48) && p[k + 1] === 2) {
      st[n === 38 ? "fg" : "bg"] = -1; // true colour: left plain
      k += 4;
    }
  }
  return st;
}
