"""kpld's HTTP API (docs/http.md) against its gRPC twin: every gRPC method
has a route (reflection against `kpld --print-http-routes` and docs/http.md),
routes answer what gRPC answers, the same tokens, scopes, pipeline limits and
audit entries, errors as {code, message} with grpc-gateway's HTTP status,
proto3 JSON bodies (an unknown field is named), Server-Sent Events resumed by
Last-Event-ID without gap or repeat, heartbeats, the stream cap, and TLS.

    /usr/bin/python3 tests/e2e/http_api_test.py KPLD DOCS_ROOT
"""

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import json_format

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import LONG, TWO_STAGES, assert_eq, run_suite  # noqa: E402
from security_test import APPROVAL  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"
JSON = {"Content-Type": "application/json"}


def proto_json(msg):
    """A message as proto3 JSON, the way the HTTP API must write it."""
    return json_format.MessageToDict(msg)


class Kpld:
    """kpld with an HTTP listener, its own data directory and log."""

    def __init__(self, binary, tmp, name, *flags):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "kpld.log")
        self.ready = os.path.join(self.dir, "ready")
        self.argv = [binary, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                     "--data-dir", os.path.join(self.dir, "data"),
                     "--ready-file", self.ready] + list(flags)
        self.proc = None

    def start(self):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=logf)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise AssertionError("kpld exited with %s before serving; log:\n%s"
                                     % (self.proc.returncode, open(self.log).read()))
            if time.monotonic() > deadline:
                raise AssertionError("kpld did not serve within 30 s")
            time.sleep(0.02)
        lines = open(self.ready).read().splitlines()
        self.addr = lines[0].strip()
        host, port = next(ln[5:] for ln in lines[1:] if ln.startswith("http=")).rsplit(":", 1)
        self.http = (host, int(port))
        return self

    def stop(self):
        if self.proc:
            self.proc.terminate()
            rc = self.proc.wait(timeout=30)
            self.proc = None
            return rc
        return None


class Http:
    """A small HTTP client: (status, headers, parsed JSON or None)."""

    def __init__(self, addr, token=None, tls_ca=None):
        self.addr = addr
        self.token = token
        self.tls_ca = tls_ca

    def conn(self):
        if self.tls_ca:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            return http.client.HTTPSConnection(self.addr[0], self.addr[1], timeout=60,
                                               context=ctx)
        return http.client.HTTPConnection(self.addr[0], self.addr[1], timeout=60)

    def req(self, method, path, body=None, headers=None, token=None):
        h = {}
        tok = token if token is not None else self.token
        if tok:
            h["Authorization"] = "Bearer " + tok
        if body is not None:
            h.update(JSON)
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
        h.update(headers or {})
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            parsed = json.loads(data) if data and hdrs.get("content-type", "").startswith(
                "application/json") else None
            return r.status, hdrs, parsed
        finally:
            c.close()

    def ok(self, method, path, body=None, token=None):
        status, _, js = self.req(method, path, body, token=token)
        if status != 200:
            raise AssertionError("%s %s: %s %r" % (method, path, status, js))
        return js


class Sse:
    """One SSE response read line by line off a socket (the socket timeout
    bounds every wait; nothing sleeps)."""

    def __init__(self, addr, path, token=None, headers=None, timeout=60):
        self.sock = socket.create_connection(addr, timeout=timeout)
        lines = ["GET %s HTTP/1.1" % path, "Host: kpl", "Accept: text/event-stream"]
        if token:
            lines.append("Authorization: Bearer " + token)
        for k, v in (headers or {}).items():
            lines.append("%s: %s" % (k, v))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n").decode()
        status_line, *hdr = head.split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip()
                        for ln in hdr if ":" in ln}
        self.body_json = None
        if self.status != 200:
            n = int(self.headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._recv()
            self.body_json = json.loads(self.buf[:n]) if n else None

    def _recv(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _until(self, sep):
        while sep not in self.buf:
            self._recv()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def frame(self):
        """The next frame as {"comment": [...], "id":..., "event":..., "data":...};
        None at the end of the stream."""
        try:
            block = self._until(b"\n\n").decode()
        except EOFError:
            return None
        f = {"comment": []}
        for ln in block.split("\n"):
            if ln.startswith(":"):
                f["comment"].append(ln[1:].strip())
            elif ":" in ln:
                k, v = ln.split(":", 1)
                f[k] = v[1:] if v.startswith(" ") else v
        return f

    def events(self, until_end=True, limit=None):
        """RunEvents (parsed data) until `event: end` (returned too) or limit."""
        out, end = [], None
        while limit is None or len(out) < limit:
            f = self.frame()
            if f is None:
                break
            if f.get("event") == "end":
                end = json.loads(f["data"])
                break
            if "data" in f:
                ev = json.loads(f["data"])
                ev["_id"] = f.get("id")
                out.append(ev)
        return out, end

    def close(self):
        self.sock.close()


def route_table(kpld):
    out = subprocess.run([kpld, "--print-http-routes"], check=True, capture_output=True,
                         text=True).stdout
    return [tuple(ln.split()) for ln in out.splitlines() if ln.strip()]


def pattern_re(pattern):
    """A route pattern as a regex over a path (variables: one segment)."""
    parts = re.split(r"(\{[a-z_]+\})", pattern)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p)
                                    for p in parts) + "$")


class Suite:
    def __init__(self, kpld, root, tmp):
        self.kpld_bin = kpld
        self.root = root
        self.tmp = tmp
        self.d = Kpld(kpld, tmp, "main", "--sse-heartbeat", "1").start()
        self.daemon = self.d
        self.c = Client.connect(self.d.addr)
        # Open mode: the first token is made without one.
        self.tokens, self.ids = {}, {}
        self.create("admin", "root")
        for s in ("read", "submit", "approve"):
            self.create(s, s)
        self.create("submit", "ci", pipeline="two-stage")
        self.h = Http(self.d.http, token=self.tokens["root"])

    def md(self, name="root"):
        return [("authorization", "Bearer " + self.tokens[name])]

    def create(self, scope, name, pipeline=""):
        md = self.md() if "root" in self.tokens else None
        resp = proto_json(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_" + scope.upper(), "pipeline": pipeline,
            "description": name}, metadata=md))
        self.tokens[name] = resp["token"]
        self.ids[name] = resp["info"]["id"]

    def submit_http(self, text, token=None, params=None):
        return self.h.ok("POST", "/v1/runs", {"pipeline": text, "params": params or {}},
                         token=token)

    def wait_done(self, run_id):
        """Follows the run over gRPC until its stream ends (the run is over)."""
        for _ in self.c.stream(P + "WatchRun", {"id": run_id}, timeout=120, metadata=self.md()):
            pass

    # --- the route table -------------------------------------------------

    def test_every_method_has_one_route(self):
        routes = route_table(self.kpld_bin)
        methods = []
        for svc in self.c.list_services():
            if svc.startswith("grpc."):
                continue
            self.c.load_symbol(svc)
            sd = self.c.types.pool.FindServiceByName(svc)
            methods += ["%s/%s" % (svc, m.name) for m in sd.methods]
        if len(methods) < 20:
            raise AssertionError("reflection lists too few methods: %r" % methods)
        by_rpc = {}
        for method, path, rpc in routes:
            by_rpc.setdefault(rpc.lstrip("/"), []).append((method, path))
        for m in methods:
            assert_eq(len(by_rpc.get(m, [])), 1, "routes of %s" % m)
        extra = sorted(set(by_rpc) - set(methods))
        assert_eq(extra, [], "routes to methods reflection does not list")
        # Method + path unique.
        keys = [(m, p) for m, p, _ in routes]
        assert_eq(len(keys), len(set(keys)), "duplicate routes")

    def test_docs_list_the_routes(self):
        routes = route_table(self.kpld_bin)
        doc = open(os.path.join(self.root, "docs", "http.md"), encoding="utf-8").read()
        rows = re.findall(r"^\| (GET|POST|PUT|DELETE) \| (/v1/\S+) \| (\w+/\w+) \|", doc, re.M)
        got = sorted((m, p, "/kpl.v1." + r) for m, p, r in rows)
        assert_eq(got, sorted(routes), "docs/http.md's route table against the code's")
        # Every curl example is a route, with the method it says.
        curls = [ln for ln in doc.splitlines() if ln.startswith("curl ")]
        if len(curls) < len(routes):
            raise AssertionError("docs/http.md has %d curl lines for %d routes"
                                 % (len(curls), len(routes)))
        covered = set()
        for ln in curls:
            url = re.search(r'"(?:\$KPL|https://[^/"]+)(/v1/[^"?]*)', ln)
            if not url:
                raise AssertionError("curl line without a $KPL/v1 URL: %s" % ln)
            m = re.search(r"-X (\w+)", ln)
            method = m.group(1) if m else ("POST" if re.search(r" (-d|--data-binary) ", ln)
                                            else "GET")
            hits = [r for r in routes if r[0] == method and pattern_re(r[1]).match(url.group(1))]
            if len(hits) != 1:
                raise AssertionError("curl line matches %d routes: %s" % (len(hits), ln))
            if method in ("POST", "PUT") and "Content-Type: application/json" not in ln:
                raise AssertionError("curl line posts without the JSON Content-Type: %s" % ln)
            covered.add(hits[0])
        assert_eq(sorted(set(routes) - covered), [], "routes without a curl example")

    def test_docs_curl_lines_run(self):
        """Every curl line of docs/http.md (but those needing jq or another
        host) run by the shell against kpld: each reaches its route (no 404
        for the path, no 405) and none is a server error."""
        doc = open(os.path.join(self.root, "docs", "http.md"), encoding="utf-8").read()
        run = self.submit_http(TWO_STAGES)
        self.wait_done(run["id"])
        env = dict(os.environ, KPL="http://%s:%d" % self.d.http, TOKEN=self.tokens["root"])
        ran = 0
        for ln in doc.splitlines():
            if not ln.startswith("curl ") or "jq " in ln or "https://" in ln:
                continue
            cmd = ln.replace("01m91ms6279qs5ek", run["id"])
            # Streams that never end by themselves get a time bound.
            cmd = cmd.replace("curl -s -N", "curl -s -N -m 3", 1)
            cmd += " -o /dev/null -w '%{http_code}'"
            r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                               timeout=60)
            code = int(r.stdout[-3:] or 0)
            if r.returncode not in (0, 28) or code in (0, 405) or code >= 500:
                raise AssertionError("docs/http.md: %s -> exit %d, HTTP %s"
                                     % (ln, r.returncode, r.stdout))
            # A 404 must be the method's (an unknown run, secret, ...), not
            # the router's.
            if code == 404:
                body = subprocess.run(["bash", "-c", cmd.rsplit(" -o ", 1)[0]], env=env,
                                      capture_output=True, text=True, timeout=60).stdout
                if "no such API route" in body:
                    raise AssertionError("docs/http.md: %s is no route" % ln)
            ran += 1
        if ran < 20:
            raise AssertionError("ran only %d curl lines of docs/http.md" % ran)

    # --- unary twins ----------------------------------------------------

    def test_runs_answer_like_grpc(self):
        run = self.submit_http(TWO_STAGES, params={"greeting": "hey"})
        if not re.match(r"^[0-9a-z]{16}$", run.get("id", "")):
            raise AssertionError("POST /v1/runs: %r" % run)
        assert_eq(run["pipelineName"], "two-stage", "pipelineName (lowerCamelCase)")
        assert_eq(run["params"], {"greeting": "hey"}, "params map")
        self.wait_done(run["id"])
        got = self.h.ok("GET", "/v1/runs/" + run["id"])
        want = proto_json(self.c.call(P + "GetRun", {"id": run["id"]}, metadata=self.md()))
        assert_eq(got, want, "GET /v1/runs/{id} against GetRun")
        assert_eq(type(got["lastSeq"]), str, "uint64 as a string")
        got = self.h.ok("GET", "/v1/runs?pipeline_name=two-stage&pageSize=1")
        want = proto_json(self.c.call(P + "ListRuns", {"pipeline_name": "two-stage",
                                                       "page_size": 1}, metadata=self.md()))
        assert_eq(got, want, "GET /v1/runs against ListRuns")
        assert_eq(len(got["runs"]), 1, "page_size from the query")
        got = self.h.ok("GET", "/v1/runs?state=RUN_STATE_FAILED&pipeline_name=two-stage")
        assert_eq(got, {}, "no failed two-stage runs (defaults omitted)")
        got = self.h.ok("GET", "/v1/runs/%s/pipeline" % run["id"])
        assert_eq(got["pipeline"], TWO_STAGES, "GetRunPipeline's text")

    def test_cancel_audit_and_scopes(self):
        run = self.submit_http(LONG, token=self.tokens["submit"])
        status, _, js = self.h.req("POST", "/v1/runs/%s:cancel" % run["id"], {},
                                   token=self.tokens["read"])
        assert_eq((status, js["code"]), (403, 7), "read token cancelling")
        if "has scope read" not in js["message"]:
            raise AssertionError("the refusal says why: %r" % js)
        status, _, js = self.h.req("POST", "/v1/runs/%s:cancel" % run["id"], {},
                                   token=self.tokens["ci"])
        assert_eq((status, js["code"]), (403, 7), "token limited to two-stage cancelling long")
        status, _, js = self.h.req("GET", "/v1/runs/" + run["id"], token=self.tokens["ci"])
        assert_eq(status, 403, "limited token reading a run of another pipeline")
        status, _, js = self.h.req("GET", "/v1/runs", token=self.tokens["ci"])
        assert_eq(status, 403, "limited token listing without the filter")
        got = self.h.ok("POST", "/v1/runs/%s:cancel" % run["id"], {}, token=self.tokens["submit"])
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "the cancel's answer")
        audit = proto_json(self.c.call(S + "ListAudit", {"limit": 1000}, metadata=self.md()))
        want = "token %s (submit) cancelled the run" % self.ids["submit"]
        hits = [e for e in audit.get("events", []) if e.get("runId") == run["id"]
                and want in e.get("message", "")]
        assert_eq(len(hits), 1, "audit entries %r for the HTTP cancel" % want)
        # The same entry over HTTP.
        got = self.h.ok("GET", "/v1/audit?limit=1000")
        assert_eq(got, audit, "GET /v1/audit against ListAudit")

    def test_errors(self):
        status, hdrs, js = self.h.req("GET", "/v1/runs/nosuchrun0000000")
        assert_eq((status, js["code"]), (404, 5), "unknown run")
        assert_eq(hdrs.get("x-content-type-options"), "nosniff", "nosniff")
        assert_eq(hdrs.get("cache-control"), "no-store", "no-store")
        status, hdrs, js = self.h.req("GET", "/v1/runs", token="")
        assert_eq((status, js["code"]), (401, 16), "no token")
        assert_eq(hdrs.get("www-authenticate"), "Bearer", "WWW-Authenticate")
        status, _, js = self.h.req("GET", "/v1/runs", token="kpl_" + "x" * 43)
        assert_eq((status, js["code"]), (401, 16), "unknown token")
        status, _, js = self.h.req("POST", "/v1/runs", b'{"pipeline": ')
        assert_eq((status, js["code"]), (400, 3), "bad JSON")
        status, _, js = self.h.req("POST", "/v1/runs", {"pipelin": "x"})
        assert_eq((status, js["code"]), (400, 3), "unknown field")
        if "pipelin" not in js["message"]:
            raise AssertionError("the error names the field: %r" % js)
        status, _, js = self.h.req("POST", "/v1/runs", {"params": {"a": 1}})
        if status != 400 or "params.a" not in js["message"]:
            raise AssertionError("a wrong type names the field path: %s %r" % (status, js))
        status, _, js = self.h.req("GET", "/v1/runs?page_size=ten")
        if status != 400 or "page_size" not in js["message"]:
            raise AssertionError("a bad query parameter is named: %s %r" % (status, js))
        status, _, js = self.h.req("GET", "/v1/runs?nope=1")
        if status != 400 or "nope" not in js["message"]:
            raise AssertionError("an unknown query parameter is named: %s %r" % (status, js))
        status, _, js = self.h.req("POST", "/v1/runs", b"{}", headers={
            "Content-Type": "text/plain"})
        assert_eq(status, 400, "POST without the JSON Content-Type")
        status, hdrs, js = self.h.req("DELETE", "/v1/runs")
        assert_eq((status, js["code"]), (405, 12), "a route's path with another method")
        if "GET" not in hdrs.get("allow", "") or "POST" not in hdrs.get("allow", ""):
            raise AssertionError("Allow: %r" % hdrs.get("allow"))
        status, _, js = self.h.req("GET", "/v1/nothing")
        assert_eq((status, js["code"]), (404, 5), "no such route")
        deep = '{"pipeline": "x", "params": ' + "[" * 40 + "]" * 40 + "}"
        status, _, js = self.h.req("POST", "/v1/runs", deep.encode())
        assert_eq((status, js["code"]), (400, 3), "nested too deep")

    def twin(self, method, path, body, rpc, req, token="root"):
        """The route and its gRPC method answer alike: the same message, or
        the same error code (and HTTP status of it)."""
        status, _, js = self.h.req(method, path, body, token=self.tokens[token])
        try:
            want = proto_json(self.c.call(rpc, req, metadata=self.md(token)))
            code = 0
        except grpc.RpcError as e:
            want, code = None, e.code().value[0]
        if code == 0:
            assert_eq((status, js), (200, want), "%s %s against %s" % (method, path, rpc))
        else:
            assert_eq(js.get("code") if js else None, code,
                      "%s %s: code against %s's" % (method, path, rpc))
            statuses = {3: 400, 5: 404, 7: 403, 9: 400, 14: 503, 6: 409, 16: 401, 8: 429}
            if code in statuses:
                assert_eq(status, statuses[code], "%s %s: HTTP status of code %d"
                          % (method, path, code))
        return status, js

    def test_more_routes_answer_like_grpc(self):
        self.twin("GET", "/v1/pipelines", None, P + "ListPipelines", {})
        self.twin("POST", "/v1/pipelines:validate", {"pipeline": TWO_STAGES},
                  P + "ValidatePipeline", {"pipeline": TWO_STAGES})
        st, js = self.twin("POST", "/v1/pipelines:validate", {"pipeline": "name: x\nstages: 7"},
                           P + "ValidatePipeline", {"pipeline": "name: x\nstages: 7"})
        if js.get("valid") or not js.get("diagnostics"):
            raise AssertionError("a bad file has diagnostics: %r" % js)
        self.twin("GET", "/v1/releases?deployment=kind/default/web", None, P + "ListReleases",
                  {"deployment": "kind/default/web"})
        self.twin("POST", "/v1/releases:rollback", {"deployment": "nocluster/default/web"},
                  P + "RollbackRelease", {"deployment": "nocluster/default/web"})
        self.twin("POST", "/v1/pipelines/nosuch:run", {"ref": "main"}, P + "RunPipeline",
                  {"name": "nosuch", "ref": "main"})
        self.twin("PUT", "/v1/pipelines/web", {"repo": "/nonexistent.git", "secret": "NOPE"},
                  P + "RegisterPipeline", {"name": "web", "repo": "/nonexistent.git",
                                           "secret": "NOPE"})
        self.twin("DELETE", "/v1/pipelines/nosuch", None, P + "DeletePipeline",
                  {"name": "nosuch"})
        self.twin("GET", "/v1/tokens", None, S + "ListTokens", {})
        for who in ("root", "read", "ci"):
            self.twin("GET", "/v1/whoami", None, S + "WhoAmI", {}, token=who)
        me = self.h.ok("GET", "/v1/whoami", token=self.tokens["ci"])
        assert_eq((me["scope"], me["pipeline"], me["tokenId"]),
                  ("TOKEN_SCOPE_SUBMIT", "two-stage", self.ids["ci"]), "whoami of a limited token")
        if self.ids["ci"] not in me["who"]:
            raise AssertionError("whoami's who: %r" % me)

    def test_secrets_names_only(self):
        value = "sup3r-secret-value-42"
        got = self.h.ok("PUT", "/v1/secrets/HTTP_SECRET", {"value": value,
                                                           "pipelines": ["two-stage"]})
        assert_eq(got, {"name": "HTTP_SECRET", "pipelines": ["two-stage"]}, "PUT's answer")
        status, _, js = self.h.req("GET", "/v1/secrets", token=self.tokens["approve"])
        assert_eq(status, 403, "listing secrets with an approve token")
        st, js = self.twin("GET", "/v1/secrets", None, P + "ListSecrets", {})
        if value in json.dumps(js):
            raise AssertionError("a secret's value came out")
        got = self.h.ok("DELETE", "/v1/secrets/HTTP_SECRET")
        assert_eq(got["name"], "HTTP_SECRET", "DELETE's answer")
        status, _, js = self.h.req("DELETE", "/v1/secrets/HTTP_SECRET")
        assert_eq((status, js["code"]), (404, 5), "deleting it again")

    def test_tokens_over_http(self):
        got = self.h.ok("POST", "/v1/tokens", {"scope": "TOKEN_SCOPE_READ",
                                               "description": "via-http"})
        tok, tid = got["token"], got["info"]["id"]
        me = self.h.ok("GET", "/v1/whoami", token=tok)
        assert_eq((me["scope"], me["tokenId"]), ("TOKEN_SCOPE_READ", tid), "the new token")
        status, _, js = self.h.req("POST", "/v1/tokens", {"scope": "TOKEN_SCOPE_READ"},
                                   token=tok)
        assert_eq((status, js["code"]), (403, 7), "a read token making tokens")
        got = self.h.ok("POST", "/v1/tokens/%s:revoke" % tid, {})
        if not got.get("revokedAt"):
            raise AssertionError("revoke's answer: %r" % got)
        status, _, js = self.h.req("GET", "/v1/whoami", token=tok)
        assert_eq((status, js["code"]), (401, 16), "a revoked token")
        audit = self.h.ok("GET", "/v1/audit?from_seq=1&limit=1000")
        msgs = [e.get("message", "") for e in audit.get("events", [])]
        for want in ("created token %s" % tid, "revoked token %s" % tid):
            if not any(want in m and self.ids["root"] in m for m in msgs):
                raise AssertionError("no audit entry %r by root in %r" % (want, msgs[-5:]))

    def test_approve_and_retry(self):
        run = self.submit_http(APPROVAL)
        s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"])
        while True:
            evs, end = s.events(limit=1)
            if end is not None or not evs:
                raise AssertionError("the run ended before its approval waited")
            if evs[0].get("stage") == "ok" and evs[0].get("stageState") == "STAGE_STATE_WAITING":
                break
        path = "/v1/runs/%s/stages/ok:approve" % run["id"]
        status, _, js = self.h.req("POST", path, {"approve": True}, token=self.tokens["submit"])
        assert_eq((status, js["code"]), (403, 7), "approving with a submit token")
        got = self.h.ok("POST", path, {"approve": True, "comment": "ship"},
                        token=self.tokens["approve"])
        if got["id"] != run["id"]:
            raise AssertionError("approve's answer: %r" % got)
        rest, end = s.events()
        s.close()
        assert_eq(rest[-1].get("runState"), "RUN_STATE_SUCCEEDED", "the approved run")
        audits = [e for e in rest if e.get("kind") == "EVENT_KIND_AUDIT"]
        if not any(self.ids["approve"] in e.get("message", "") for e in audits):
            raise AssertionError("no audit event by the approve token: %r" % audits)
        # Retry: a cancelled run runs again as attempt 2.
        run = self.submit_http(LONG)
        self.h.ok("POST", "/v1/runs/%s:cancel" % run["id"], {})
        got = self.h.ok("POST", "/v1/runs/%s:retry" % run["id"], {}, token=self.tokens["submit"])
        assert_eq(got["attempt"], 2, "retry's attempt")
        self.h.ok("POST", "/v1/runs/%s:cancel" % run["id"], {})

    # --- streams --------------------------------------------------------

    def test_sse_matches_watchrun_and_resumes(self):
        run = self.submit_http(TWO_STAGES)
        self.wait_done(run["id"])
        want = [proto_json(e) for e in self.c.stream(P + "WatchRun", {"id": run["id"]},
                                                      timeout=60, metadata=self.md())]
        s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"])
        assert_eq(s.status, 200, "SSE status")
        assert_eq(s.headers.get("content-type", "").split(";")[0], "text/event-stream",
                  "SSE content type")
        got, end = s.events()
        s.close()
        assert_eq(end, {"code": 0, "message": ""}, "the end event")
        ids = [e.pop("_id") for e in got]
        assert_eq(got, want, "SSE data against WatchRun")
        assert_eq(ids, [e["seq"] for e in want], "id: is the seq")
        n = len(want)
        for k in (1, 3, n - 1):
            s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"],
                    headers={"Last-Event-ID": str(k)})
            got, _ = s.events()
            s.close()
            assert_eq([int(e["_id"]) for e in got], list(range(k + 1, n + 1)),
                      "resume after Last-Event-ID %d" % k)
        s = Sse(self.d.http, "/v1/runs/%s/events?from_seq=4" % run["id"],
                token=self.tokens["read"])
        got, _ = s.events()
        s.close()
        assert_eq([int(e["_id"]) for e in got], list(range(4, n + 1)), "?from_seq=4")
        # Past the end of a finished run: 204 (an EventSource stops there).
        s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"],
                headers={"Last-Event-ID": str(n)})
        assert_eq(s.status, 204, "resume past the end of a finished run")
        s.close()
        s = Sse(self.d.http, "/v1/runs/nosuchrun0000000/events", token=self.tokens["read"])
        assert_eq((s.status, s.body_json["code"]), (404, 5), "events of an unknown run")
        s.close()

    def test_sse_live_resume_no_gap_no_repeat(self):
        run = self.submit_http(LONG)
        s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"])
        first, _ = s.events(limit=2)
        s.close()  # cut mid-run
        last = first[-1]["_id"]
        # Cancel while no one watches, then resume.
        self.h.ok("POST", "/v1/runs/%s:cancel" % run["id"], {})
        s = Sse(self.d.http, "/v1/runs/%s/events" % run["id"], token=self.tokens["read"],
                headers={"Last-Event-ID": last})
        rest, end = s.events()
        s.close()
        assert_eq(end["code"], 0, "the stream ends OK after the run's last event")
        ids = [int(e["_id"]) for e in first + rest]
        assert_eq(ids, list(range(1, len(ids) + 1)), "ids across the reconnect")
        if rest[-1].get("runState") != "RUN_STATE_CANCELLED":
            raise AssertionError("last event: %r" % rest[-1])

    def test_global_events_and_heartbeat(self):
        s = Sse(self.d.http, "/v1/events?pipeline_name=two-stage&kinds=EVENT_KIND_RUN_STATE",
                token=self.tokens["read"])
        assert_eq(s.status, 200, "GET /v1/events")
        # Nothing happens: a heartbeat comes (--sse-heartbeat 1).
        beats = 0
        while beats == 0:
            f = s.frame()
            if f is None:
                raise AssertionError("the stream ended without a heartbeat")
            beats += f["comment"].count("heartbeat")
            if "data" in f:
                raise AssertionError("an event before any run: %r" % f)
        run = self.submit_http(TWO_STAGES)
        got = []
        while not got or got[-1].get("runState") not in ("RUN_STATE_SUCCEEDED",
                                                           "RUN_STATE_FAILED"):
            evs, _ = s.events(limit=1)
            got += evs
        s.close()
        assert_eq({e["runId"] for e in got}, {run["id"]}, "filtered to the new run")
        assert_eq({e["kind"] for e in got}, {"EVENT_KIND_RUN_STATE"}, "kinds filter")
        assert_eq([e["_id"] for e in got], [e["globalSeq"] for e in got],
                  "id: is the global seq")
        # Resume the global log after the first of them.
        s = Sse(self.d.http, "/v1/events?pipeline_name=two-stage&kinds=EVENT_KIND_RUN_STATE",
                token=self.tokens["read"], headers={"Last-Event-ID": got[0]["_id"]})
        again, _ = s.events(limit=len(got) - 1)
        s.close()
        assert_eq([e["_id"] for e in again], [e["_id"] for e in got[1:]],
                  "global resume by Last-Event-ID")

    def metric(self, name, label):
        c = http.client.HTTPConnection(*self.d.http, timeout=60)
        try:
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
        finally:
            c.close()
        m = re.search(r"^%s\{%s\} (\d+)$" % (re.escape(name), re.escape(label)), text, re.M)
        return int(m.group(1)) if m else 0

    def test_slow_reader_holds_kpld_back(self):
        # A run of many log lines, stored whole before anyone reads it.
        n_lines = 80000
        text = ("name: chatty\nstages:\n  - name: talk\n    kind: script\n"
                "    with: { shell: \"seq -f 'line %%g of a chatty stage, padded to be long "
                "enough' 1 %d\" }\n" % n_lines)
        run = self.submit_http(text)
        for ev in self.c.stream(P + "WatchRuns", {"from_global_seq": 1, "pipeline_name": "chatty",
                                                  "kinds": ["EVENT_KIND_RUN_STATE"]},
                                timeout=300, metadata=self.md()):
            if ev.run_id == run["id"] and ev.run_state >= 3:
                break
        total = int(self.h.ok("GET", "/v1/runs/" + run["id"])["lastSeq"])
        if total < n_lines:
            raise AssertionError("the run stored %d events" % total)
        label = 'method="WatchRun"'
        before = self.metric("kpl_api_events_read_total", label)
        # A reader that reads the response head and then nothing.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        sock.connect(self.d.http)
        sock.sendall(("GET /v1/runs/%s/events HTTP/1.1\r\nHost: kpl\r\nAuthorization: "
                      "Bearer %s\r\n\r\n" % (run["id"], self.tokens["read"])).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        # kpld reads on only as the socket drains: the count stops well
        # short of the run's events. Wait until it is the same over 20
        # requests in a row (each a turn of kpld's loop, at least).
        last, same = -1, 0
        while same < 20:
            now = self.metric("kpl_api_events_read_total", label) - before
            same = same + 1 if now == last else 0
            last = now
        if last >= total // 2:
            raise AssertionError("a stalled reader made kpld read %d of %d events"
                                 % (last, total))
        # Read it all now: every event, in order, once.
        buf, ids = b"", []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            *frames, buf = buf.split(b"\n\n")
            for f in frames:
                m = re.match(rb"id: (\d+)\n", f)
                if m:
                    ids.append(int(m.group(1)))
        sock.close()
        assert_eq(len(ids), total, "events read after the stall")
        assert_eq(ids == list(range(1, total + 1)), True, "ids 1..%d in order" % total)
        print("slow reader: kpld had read %d of %d events while it stalled" % (last, total))

    def test_stream_cap(self):
        d = Kpld(self.kpld_bin, self.tmp, "cap", "--max-streams", "2").start()
        try:
            a = Sse(d.http, "/v1/events")
            b = Sse(d.http, "/v1/events")
            assert_eq((a.status, b.status), (200, 200), "two streams under the cap")
            c = Sse(d.http, "/v1/events")
            assert_eq((c.status, c.body_json["code"]), (429, 8), "the third stream")
            if "max-streams" not in c.body_json["message"]:
                raise AssertionError("the refusal names the flag: %r" % c.body_json)
            c.close()
            a.close()
            # The freed slot is seen once kpld notices the close: retry
            # until it does (the deadline is a failure bound).
            deadline = time.monotonic() + 30
            while True:
                c = Sse(d.http, "/v1/events")
                if c.status == 200:
                    break
                c.close()
                if time.monotonic() > deadline:
                    raise AssertionError("a closed stream's slot never came back")
                time.sleep(0.05)
            c.close()
            b.close()
        finally:
            assert_eq(d.stop(), 0, "capped kpld's exit code")

    def test_stop_with_streams_open(self):
        d = Kpld(self.kpld_bin, self.tmp, "stop").start()
        try:
            run = Http(d.http).ok("POST", "/v1/runs", {"pipeline": LONG})
            one = Sse(d.http, "/v1/runs/%s/events" % run["id"])
            first, _ = one.events(limit=1)
            every = Sse(d.http, "/v1/events?from_global_seq=1")
            first_g, _ = every.events(limit=1)
            unary = http.client.HTTPConnection(*d.http, timeout=60)
            unary.request("GET", "/v1/runs")
            unary.getresponse().read()
        finally:
            rc = d.stop()
        assert_eq(rc, 0, "kpld's exit code, stopped with streams open")
        # Each stream ends saying where to resume (the end event is written
        # before the listener closes, into a socket with room for it).
        for s, field in ((one, "from_seq"), (every, "from_global_seq")):
            rest, end = s.events()
            s.close()
            if end is None or end["code"] != 14 or field not in end["message"]:
                raise AssertionError("the end of a stream cut by a stop: %r" % end)
        unary.close()

    def test_tls(self):
        pki = os.path.join(self.tmp, "pki")
        os.makedirs(pki, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem",
                        "-out", "cert.pem", "-days", "2", "-subj", "/CN=kpl test",
                        "-addext", "subjectAltName=IP:127.0.0.1"],
                       cwd=pki, check=True, capture_output=True)
        cert, key = os.path.join(pki, "cert.pem"), os.path.join(pki, "key.pem")
        for name, flags in (("tls", ["--http-tls-cert", cert, "--http-tls-key", key]),
                            ("tls-grpc", ["--tls-cert", cert, "--tls-key", key])):
            d = Kpld(self.kpld_bin, self.tmp, name, *flags).start()
            try:
                base = "https://127.0.0.1:%d" % d.http[1]
                r = subprocess.run(["curl", "-sS", "--cacert", cert, base + "/v1/whoami"],
                                   capture_output=True, text=True, timeout=60)
                assert_eq((r.returncode, json.loads(r.stdout or "null")),
                          (0, {"who": "local", "scope": "TOKEN_SCOPE_ADMIN"}),
                          "%s: curl --cacert GET /v1/whoami (%s)" % (name, r.stderr))
                r = subprocess.run(["curl", "-sS", base + "/v1/whoami"], capture_output=True,
                                   text=True, timeout=60)
                if r.returncode == 0:
                    raise AssertionError("%s: curl trusted an unknown certificate" % name)
                run = Http(d.http, tls_ca=cert).ok("POST", "/v1/runs", {"pipeline": TWO_STAGES})
                # SSE over TLS, read by curl to the stream's end.
                r = subprocess.run(["curl", "-sS", "-N", "--cacert", cert,
                                    base + "/v1/runs/%s/events" % run["id"]],
                                   capture_output=True, text=True, timeout=120)
                ids = [int(x) for x in re.findall(r"^id: (\d+)$", r.stdout, re.M)]
                if not ids or ids != list(range(1, len(ids) + 1)) or "event: end" not in r.stdout:
                    raise AssertionError("%s: SSE over TLS: %r" % (name, r.stdout[-500:]))
                # Plain HTTP to the TLS port gets no answer.
                c = http.client.HTTPConnection("127.0.0.1", d.http[1], timeout=30)
                try:
                    c.request("GET", "/v1/whoami")
                    c.getresponse()
                    raise AssertionError("%s: plain HTTP answered on the TLS port" % name)
                except (http.client.HTTPException, OSError):
                    pass
                finally:
                    c.close()
            finally:
                assert_eq(d.stop(), 0, "%s kpld's exit code" % name)

    def close(self):
        self.c.close()
        assert_eq(self.d.stop(), 0, "kpld exit code after SIGTERM")


def main():
    kpld = os.path.abspath(sys.argv[1])
    root = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else "."
    tmp = tempfile.mkdtemp(prefix="kpl-http-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, root, tmp))


if __name__ == "__main__":
    sys.exit(main())
