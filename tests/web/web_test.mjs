// web_test.mjs - the console's pure parts under node, no browser:
//   node tests/web/web_test.mjs CLIENTS_WEB_DIR
// the Server-Sent Events parser (chunks cut anywhere, CR/LF/CRLF, multi-line
// data, comments, id and retry), stream()'s resume with Last-Event-ID after
// a broken connection and after a finished one, ANSI colours to classes,
// and the graph's layers by needs. Each check names what it expected.
import assert from "node:assert/strict";
import path from "node:path";
import { pathToFileURL } from "node:url";

const dir = path.resolve(process.argv[2]);
const load = (name) => import(pathToFileURL(path.join(dir, name)).href);

// api.js reads sessionStorage when it sends a request.
const store = new Map();
globalThis.sessionStorage = {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
};

const api = await load("api.js");
const ansi = await load("ansi.js");
const graph = await load("graph.js");

let failures = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log("PASS " + name);
  } catch (e) {
    failures++;
    console.log("FAIL " + name + "\n" + (e.stack || e));
  }
}

function parseAll(chunks) {
  const out = [];
  const p = new api.SseParser((ev) => out.push(ev));
  for (const c of chunks) p.push(c);
  return out;
}

await check("sse: whole events, ids, comments, multi-line data", () => {
  const evs = parseAll([": ok\n\nid: 1\ndata: {\"a\":1}\n\n: heartbeat\n\nid: 2\nevent: end\ndata: x\ndata: y\n\n"]);
  assert.deepEqual(evs.map((e) => [e.id, e.event, e.data]), [["1", "", "{\"a\":1}"], ["2", "end", "x\ny"]]);
});

await check("sse: the same stream cut at every byte gives the same events", () => {
  const text = "id: 7\r\ndata: one\r\n\r\nid: 8\rdata: two\r\rretry: 900\nid: 9\ndata:three\n\n";
  const want = parseAll([text]).map((e) => [e.id, e.data, e.retry]);
  assert.deepEqual(want, [["7", "one", 0], ["8", "two", 0], ["9", "three", 900]]);
  for (let i = 1; i < text.length; i++) {
    const got = parseAll([text.slice(0, i), text.slice(i)]).map((e) => [e.id, e.data, e.retry]);
    assert.deepEqual(got, want, "cut at " + i);
  }
  const bytes = parseAll(text.split("")).map((e) => [e.id, e.data, e.retry]);
  assert.deepEqual(bytes, want, "one character at a time");
});

await check("sse: no event without a blank line; a field without colon", () => {
  assert.deepEqual(parseAll(["data: half"]), []);
  assert.deepEqual(parseAll(["data\n\n"]).map((e) => e.data), [""]);
});

// A fetch() that answers each call from a script and records its headers.
function fakeFetch(script) {
  const calls = [];
  const fn = async (url, init) => {
    calls.push({ url, headers: init.headers });
    const step = script[calls.length - 1];
    if (!step) return new Promise(() => {}); // hangs until closed
    if (step.status && step.status !== 200) {
      return { ok: step.status < 300, status: step.status, body: null, json: async () => ({ code: 5, message: "gone" }), statusText: "" };
    }
    const enc = new TextEncoder();
    const body = new ReadableStream({
      start(ctl) {
        for (const c of step.chunks) ctl.enqueue(enc.encode(c));
        if (!step.error) ctl.close();
      },
      // The connection breaks once what was sent has been read.
      pull(ctl) {
        if (step.error) ctl.error(new TypeError("network"));
      },
    });
    return { ok: true, status: 200, body };
  };
  fn.calls = calls;
  return fn;
}

function until(cond, what) {
  return new Promise((res, rej) => {
    const t0 = Date.now();
    const poll = () => {
      if (cond()) return res();
      if (Date.now() - t0 > 20000) return rej(new Error("timed out waiting for " + what));
      setTimeout(poll, 10);
    };
    poll();
  });
}

await check("stream: resumes after a broken connection with Last-Event-ID, no repeat", async () => {
  api.setToken("kpl_test");
  globalThis.fetch = fakeFetch([
    { chunks: ["id: 1\ndata: {\"seq\":\"1\"}\n\nid: 2\ndata: {\"seq\":\"2\"}\n\nid: 3\ndata: {\"se"], error: true },
    { chunks: ["id: 3\ndata: {\"seq\":\"3\"}\n\n"] },
  ]);
  const got = [];
  const st = api.stream("/v1/runs/r/events", { onEvent: (e) => got.push(e.data.seq) });
  await until(() => got.length === 3, "three events");
  const calls = globalThis.fetch.calls;
  assert.equal(calls[0].headers["Last-Event-ID"], undefined, "first request");
  assert.equal(calls[0].headers.Authorization, "Bearer kpl_test");
  assert.equal(calls[1].headers["Last-Event-ID"], "2", "resumed after the last whole event");
  assert.deepEqual(got, ["1", "2", "3"]);
  st.close();
});

await check("stream: a finished stream is asked again later, from its last id; 204 reads nothing", async () => {
  globalThis.fetch = fakeFetch([
    { chunks: ["id: 5\ndata: {\"seq\":\"5\"}\n\nevent: end\ndata: {\"code\":0}\n\n"] },
    { status: 204 },
  ]);
  const states = [];
  const st = api.stream("/v1/runs/r/events", { onEvent: () => {}, onState: (s) => states.push(s) });
  await until(() => states.includes("ended"), "ended");
  assert.equal(globalThis.fetch.calls.length, 1, "not asked again at once");
  st.poke();
  await until(() => globalThis.fetch.calls.length === 2, "the poke");
  assert.equal(globalThis.fetch.calls[1].headers["Last-Event-ID"], "5");
  st.close();
});

await check("stream: 404 stops for good", async () => {
  globalThis.fetch = fakeFetch([{ status: 404 }]);
  const states = [];
  api.stream("/v1/runs/nope/events", { onEvent: () => {}, onState: (s) => states.push(s) });
  await until(() => states.includes("closed"), "closed");
  assert.equal(globalThis.fetch.calls.length, 1);
});

await check("ansi: colours and bold become classes, other escapes go", () => {
  const segs = ansi.segments("\x1b[31mred\x1b[0m plain \x1b[1;32mbold\x1b[39m b\x1b[0m\x1b[2K\x1b]0;title\x07end");
  assert.deepEqual(segs, [
    { text: "red", cls: "ansi-fg-1" }, { text: " plain ", cls: "" },
    { text: "bold", cls: "ansi-fg-2 ansi-b" }, { text: " b", cls: "ansi-b" }, { text: "end", cls: "" }]);
  assert.equal(ansi.strip("\x1b[31m<img src=x>\x1b[0m"), "<img src=x>");
  // 256 colours: the first 16 have classes, the rest and true colour are plain.
  assert.deepEqual(ansi.segments("\x1b[38;5;9mx\x1b[38;5;200my\x1b[91mz\x1b[38;2;1;2;3mw"),
    [{ text: "x", cls: "ansi-fg-9" }, { text: "y", cls: "" }, { text: "z", cls: "ansi-fg-9" }, { text: "w", cls: "" }]);
});

await check("graph: layers by needs, columns ordered, sizes", () => {
  const st = (name, needs) => ({ name, needs });
  const lay = graph.layout([st("a", []), st("b", ["a"]), st("c", ["a"]), st("d", ["b", "c"]), st("fin", [])]);
  const x = (n) => lay.pos.get(n).x;
  assert.ok(x("a") === x("fin") && x("a") < x("b") && x("b") === x("c") && x("c") < x("d"));
  // 200 stages in 20 layers: 20 columns, nothing lost, no two in one place.
  const many = [];
  for (let l = 0; l < 20; l++) for (let i = 0; i < 10; i++) {
    many.push(st(`s${l}_${i}`, l ? [`s${l - 1}_${i}`, `s${l - 1}_${(i + 1) % 10}`] : []));
  }
  const big = graph.layout(many);
  assert.equal(big.pos.size, 200);
  assert.equal(new Set([...big.pos.values()].map((p) => p.x)).size, 20);
  assert.equal(new Set([...big.pos.values()].map((p) => p.x + "," + p.y)).size, 200);
  // A need that is not a stage, or a cycle, does not hang the layout.
  graph.layout([st("a", ["b"]), st("b", ["a"]), st("c", ["zz"])]);
});

console.log(failures ? `${failures} failed` : "all passed");
process.exit(failures ? 1 : 0);
