// api.js - kpld's JSON API (docs/http.md) from the browser.
//
// The token the user pasted lives in sessionStorage (this tab only, gone
// when it closes) and goes in an Authorization header: no cookies, so no
// request from another site can carry it (no CSRF).

const KEY = "kpl.token";

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

// An answer that was not 2xx: the server's {code, message}.
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || "HTTP " + status);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  const hd = Object.assign({ Accept: "application/json" }, extra || {});
  const t = token();
  if (t) hd.Authorization = "Bearer " + t;
  return hd;
}

// path with its query: q's empty values are left out.
export function url(path, q) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q || {})) {
    if (v !== undefined && v !== null && v !== "") p.set(k, String(v));
  }
  const qs = p.toString();
  return qs ? path + "?" + qs : path;
}

async function errorOf(r) {
  let code = "", message = "";
  try {
    const body = await r.json();
    const e = body && body.error ? body.error : body;
    code = e && e.code !== undefined ? e.code : "";
    message = (e && e.message) || "";
  } catch (_) {
    message = r.statusText;
  }
  return new ApiError(r.status, code, message || "HTTP " + r.status);
}

// JSON in and out; throws ApiError (or a TypeError when the network fails).
export async function call(method, path, body, opts) {
  const init = { method, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : null),
                 cache: "no-store", credentials: "omit", signal: opts && opts.signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (!r.ok) throw await errorOf(r);
  const text = await r.text();
  return text ? JSON.parse(text) : {};
}

export const get = (path, q, opts) => call("GET", url(path, q), undefined, opts);
export const post = (path, body) => call("POST", path, body === undefined ? {} : body);
export const put = (path, body) => call("PUT", path, body === undefined ? {} : body);
export const del = (path) => call("DELETE", path);

// Enc: one path segment.
export const seg = (v) => encodeURIComponent(String(v));

// Server-Sent Events parsed from a fetch() body, since EventSource cannot
// send an Authorization header. Reconnects after an error or the end of
// the stream, with Last-Event-ID so the server resumes after the last
// event seen (no gap, no repeat). Returns {close()}.
//   onEvent({id, event, data})   data parsed as JSON when it is JSON
//   onState("open"|"ended"|"retrying"|"closed", detail)
export function stream(path, { onEvent, onState, lastEventId }) {
  const ctl = { closed: false, abort: null, lastId: lastEventId || "" };
  let delay = 500;

  async function once() {
    const ac = new AbortController();
    ctl.abort = ac;
    const hd = headers({ Accept: "text/event-stream" });
    if (ctl.lastId) hd["Last-Event-ID"] = ctl.lastId;
    const r = await fetch(path, { headers: hd, signal: ac.signal, cache: "no-store", credentials: "omit" });
    if (!r.ok) {
      const e = await errorOf(r);
      e.fatal = r.status === 400 || r.status === 401 || r.status === 403 || r.status === 404;
      throw e;
    }
    // 204: a finished run's stream past its last event; nothing to read.
    if (r.status === 204 || !r.body) return;
    onState && onState("open");
    delay = 500;
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    const p = new SseParser((ev) => {
      if (ev.id !== undefined) ctl.lastId = ev.id;
      if (ev.retry) delay = ev.retry;
      if (ev.data === undefined) return;
      let data = ev.data;
      try { data = JSON.parse(ev.data); } catch (_) { /* plain text */ }
      onEvent({ id: ev.id, event: ev.event || "message", data });
    });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      p.push(value);
    }
  }

  let poked = null;
  (async () => {
    while (!ctl.closed) {
      let wait;
      try {
        await once();
        // The server ended the stream (a run's stream ends after its final
        // event): look again now and then, in case the run is retried.
        wait = 5000;
      } catch (e) {
        if (ctl.closed) break;
        if (e.fatal) {
          onState && onState("closed", e);
          ctl.closed = true;
          break;
        }
        onState && onState("retrying", e);
        wait = delay;
        delay = Math.min(delay * 2, 10000);
      }
      if (ctl.closed) break;
      onState && onState(wait === 5000 ? "ended" : "retrying");
      await new Promise((res) => { poked = res; setTimeout(res, wait); });
      poked = null;
    }
  })();

  return {
    close() {
      ctl.closed = true;
      if (ctl.abort) ctl.abort.abort();
      if (poked) poked();
    },
    // Reconnect now if the stream has ended (after a retry, say).
    poke() { if (poked) poked(); },
    get lastId() { return ctl.lastId; },
  };
}

// The event-stream format (HTML's "server-sent events" section): fields
// per line, an event ends at a blank line, ":" starts a comment.
export class SseParser {
  constructor(dispatch) {
    this.buf = "";
    this.dispatch = dispatch;
    this.reset();
  }
  reset() {
    this.data = [];
    this.event = "";
    this.id = undefined;
    this.retry = 0;
  }
  push(chunk) {
    // One pass over the buffer (a replay brings megabytes at once).
    const b = this.buf + chunk;
    const re = /\r\n|\r|\n/g;
    let start = 0, m;
    while ((m = re.exec(b))) {
      // A lone \r at the very end may be the first half of \r\n.
      if (m[0] === "\r" && m.index === b.length - 1) break;
      this.line(b.slice(start, m.index));
      start = m.index + m[0].length;
    }
    this.buf = b.slice(start);
  }
  line(line) {
    if (line === "") {
      const ev = { event: this.event, id: this.id, retry: this.retry };
      if (this.data.length) ev.data = this.data.join("\n");
      if (ev.data !== undefined || ev.id !== undefined) this.dispatch(ev);
      this.reset();
      return;
    }
    if (line[0] === ":") return;
    const c = line.indexOf(":");
    const field = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? "" : line.slice(c + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && value.indexOf("\0") < 0) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = parseInt(value, 10);
  }
}

// The routes of docs/http.md, in one place.
export const R = {
  whoami: () => "/v1/whoami",
  runs: () => "/v1/runs",
  run: (id) => `/v1/runs/${seg(id)}`,
  cancel: (id) => `/v1/runs/${seg(id)}:cancel`,
  retry: (id) => `/v1/runs/${seg(id)}:retry`,
  approve: (id, stage) => `/v1/runs/${seg(id)}/stages/${seg(stage)}:approve`,
  runPipeline: (id) => `/v1/runs/${seg(id)}/pipeline`,
  runEvents: (id) => `/v1/runs/${seg(id)}/events`,
  events: () => "/v1/events",
  releases: () => "/v1/releases",
  rollback: () => "/v1/releases:rollback",
  pipelines: () => "/v1/pipelines",
  pipeline: (name) => `/v1/pipelines/${seg(name)}`,
  secrets: () => "/v1/secrets",
  secret: (name) => `/v1/secrets/${seg(name)}`,
  tokens: () => "/v1/tokens",
  revoke: (id) => `/v1/tokens/${seg(id)}:revoke`,
  audit: () => "/v1/audit",
};
