#!/usr/bin/python3
"""GitHub and GitLab commit status APIs, emulated for kpl's tests (test
infrastructure only).

Python 3 standard library only. Listens on 127.0.0.1, port 0 by default,
prints PORT=N on stdout (and writes --port-file), stops after --lifetime
seconds or on SIGTERM. Usable in-process too: ForgeEmulator(...).start().

    GitHub  POST /repos/OWNER/REPO/statuses/SHA      (kpld --github-api-url http://H:P)
    GitLab  POST /api/v4/projects/ID/statuses/SHA    (kpld --gitlab-api-url http://H:P/api/v4)
    GET  /_emulator/calls   every status call so far, as JSON (oldest first)
    POST /_emulator/fault   {"status": 500, "count": N}: the next N status
                            calls are answered that status (recorded too);
                            403 is GitHub's primary rate limit (x-ratelimit-
                            remaining 0, x-ratelimit-reset 5 s ahead)

Checks, as the real APIs answer them (/work/shared/reference/external-apis-2.md
sections 4.3 and 5.2):
  GitHub: no User-Agent -> 403; no or unknown token (Authorization: Bearer T
  or token T) -> 401 "Requires authentication" / "Bad credentials"; an
  unsupported X-GitHub-Api-Version -> 400; unknown repository -> 404; a body
  that is not JSON -> 400 "Problems parsing JSON"; state not one of error,
  failure, pending, success, or a description over 140 characters -> 422
  "Validation Failed"; a sha that is not 40 hex digits -> 422; else 201 and
  the Status object.
  GitLab: no or unknown PRIVATE-TOKEN (or Authorization: Bearer) -> 401
  "401 Unauthorized"; unknown project -> 404 "404 Project Not Found"; state
  missing or not one of pending, running, success, failed, canceled, skipped
  -> 400; the state the (sha, name) status already has -> 400 "Cannot
  transition status ..."; else 201.
"""

import argparse
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GITHUB_STATES = ("error", "failure", "pending", "success")
GITLAB_STATES = ("pending", "running", "success", "failed", "canceled", "skipped")
GITHUB_API_VERSIONS = ("2022-11-28", "2026-03-10")
# GitLab's commit status state machine events, named in its 400 answer.
GITLAB_EVENT = {"pending": "enqueue", "running": "run", "success": "success",
                "failed": "drop", "canceled": "cancel", "skipped": "skip"}


class ForgeEmulator:
    def __init__(self, github_repos=(), gitlab_projects=(), tokens=(), lifetime=600.0):
        self.github_repos = {r.lower() for r in github_repos}
        self.gitlab_projects = {str(p) for p in gitlab_projects}
        self.tokens = set(tokens)
        self.lifetime = lifetime
        self.lock = threading.Condition()
        self.calls = []
        self.fault_status = 0
        self.fault_count = 0
        self.gitlab_state = {}  # (project, sha, name) -> state
        self.next_id = 1
        self.server = None

    # -- in-process use ---------------------------------------------------

    def start(self, port=0):
        emu = self

        class Handler(_Handler):
            emulator = emu

        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        # Stops by itself, whatever the test does.
        self.timer = threading.Timer(self.lifetime, self.stop)
        self.timer.daemon = True
        self.timer.start()
        return self.server.server_address[1]

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def fault(self, status, count):
        with self.lock:
            self.fault_status, self.fault_count = status, count

    def snapshot(self):
        with self.lock:
            return list(self.calls)

    def wait_for(self, pred, what, timeout=120):
        """Waits until pred(calls) is true; returns the calls. The timeout
        is a failure bound, not a synchronization."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not pred(self.calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("forge emulator: %s not seen within %d s; calls: %s"
                                         % (what, timeout, json.dumps(self.calls, indent=1)))
                self.lock.wait(min(left, 1.0))
            return list(self.calls)

    # -- the APIs ---------------------------------------------------------

    def record(self, call):
        with self.lock:
            self.calls.append(call)
            self.lock.notify_all()

    def take_fault(self):
        with self.lock:
            if self.fault_count > 0:
                self.fault_count -= 1
                return self.fault_status
            return 0

    def github(self, h, owner, repo, sha, body):
        ua = h.headers.get("User-Agent")
        if not ua:
            return 403, {"message": "Request forbidden by administrative rules. Please make "
                                    "sure your request has a User-Agent header"}
        auth = h.headers.get("Authorization") or ""
        m = re.match(r"(?i)^(bearer|token) (\S+)$", auth)
        if not auth:
            return 401, {"message": "Requires authentication",
                         "documentation_url": "https://docs.github.com/rest"}
        if not m or m.group(2) not in self.tokens:
            return 401, {"message": "Bad credentials",
                         "documentation_url": "https://docs.github.com/rest"}
        ver = h.headers.get("X-GitHub-Api-Version")
        if ver is not None and ver not in GITHUB_API_VERSIONS:
            return 400, {"message": "API version %s is not supported." % ver}
        if ("%s/%s" % (owner, repo)).lower() not in self.github_repos:
            return 404, {"message": "Not Found"}
        try:
            doc = json.loads(body or b"null")
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}
        if not isinstance(doc, dict):
            return 400, {"message": "Problems parsing JSON"}
        if not re.fullmatch(r"[0-9a-fA-F]{40}", sha):
            return 422, {"message": "No commit found for SHA: %s" % sha}
        state = doc.get("state")
        if state not in GITHUB_STATES:
            return 422, {"message": "Validation Failed", "errors": [
                {"resource": "Status", "code": "custom", "field": "state",
                 "message": "state is not included in the list"}]}
        desc = doc.get("description")
        if desc is not None and len(desc) > 140:
            return 422, {"message": "Validation Failed", "errors": [
                {"resource": "Status", "code": "custom", "field": "description",
                 "message": "description is too long (maximum is 140 characters)"}]}
        with self.lock:
            sid = self.next_id
            self.next_id += 1
        return 201, {"url": "https://api.github.com/repos/%s/%s/statuses/%s" % (owner, repo, sha),
                     "id": sid, "state": state, "description": desc,
                     "target_url": doc.get("target_url"),
                     "context": doc.get("context") or "default",
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def gitlab(self, h, project, sha, body):
        token = h.headers.get("PRIVATE-TOKEN")
        auth = h.headers.get("Authorization") or ""
        if token is None and auth.lower().startswith("bearer "):
            token = auth[7:]
        if token is None or token not in self.tokens:
            return 401, {"message": "401 Unauthorized"}
        if project not in self.gitlab_projects:
            return 404, {"message": "404 Project Not Found"}
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        doc = {}
        if body:
            if ctype != "application/json":
                return 400, {"error": "unsupported Content-Type %s" % ctype}
            try:
                doc = json.loads(body)
            except ValueError:
                return 400, {"error": "the body is not JSON"}
        if not isinstance(doc, dict) or not doc.get("state"):
            return 400, {"error": "state is missing"}
        state = doc["state"]
        if state not in GITLAB_STATES:
            return 400, {"error": "state does not have a valid value"}
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return 404, {"message": "404 Commit Not Found"}
        name = doc.get("name") or doc.get("context") or "default"
        key = (project, sha, name)
        with self.lock:
            have = self.gitlab_state.get(key)
            if have == state:
                return 400, {"message": "Cannot transition status via :%s from :%s (Reason(s): "
                                        "Status cannot transition via \"%s\")"
                                        % (GITLAB_EVENT[state], have, GITLAB_EVENT[state])}
            self.gitlab_state[key] = state
            sid = self.next_id
            self.next_id += 1
        return 201, {"id": sid, "sha": sha, "ref": doc.get("ref"), "status": state,
                     "name": name, "target_url": doc.get("target_url"),
                     "description": doc.get("description"), "allow_failure": False}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client killed mid-request (the tests kill -9 kpld) is no news.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    emulator = None
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, doc, extra=None):
        data = json.dumps(doc).encode()
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        if self.path == "/_emulator/calls":
            self.answer(200, self.emulator.snapshot())
        else:
            self.answer(404, {"message": "Not Found"})

    def do_POST(self):
        emu = self.emulator
        body = self.body()
        if self.path == "/_emulator/fault":
            doc = json.loads(body or b"{}")
            emu.fault(int(doc.get("status", 500)), int(doc.get("count", 1)))
            self.answer(200, {"ok": True})
            return
        gh = re.fullmatch(r"/repos/([^/]+)/([^/]+)/statuses/([^/?]+)", self.path)
        gl = re.fullmatch(r"/api/v4/projects/([^/]+)/statuses/([^/?]+)", self.path)
        if not gh and not gl:
            self.answer(404, {"message": "Not Found"})
            return
        fault = emu.take_fault()
        extra = {}
        if fault == 403:
            # GitHub's primary rate limit, as it answers it.
            status, doc = 403, {"message": "API rate limit exceeded for user ID 1.",
                                "documentation_url": "https://docs.github.com/rest"}
            extra = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0",
                     "x-ratelimit-used": "5000",
                     "x-ratelimit-reset": str(int(time.time()) + 5),
                     "x-ratelimit-resource": "core"}
        elif fault:
            status, doc = fault, {"message": "Server Error (injected)"}
        elif gh:
            status, doc = emu.github(self, gh.group(1), gh.group(2), gh.group(3), body)
        else:
            status, doc = emu.gitlab(self, gl.group(1), gl.group(2), body)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        emu.record({"forge": "github" if gh else "gitlab", "method": "POST",
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": parsed, "status": status, "fault": bool(fault),
                    "time": time.time()})
        self.answer(status, doc, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description="GitHub/GitLab commit status emulator (tests)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--lifetime", type=float, default=600.0,
                    help="stop after this many seconds (default 600)")
    ap.add_argument("--github-repo", action="append", default=[], metavar="OWNER/REPO")
    ap.add_argument("--gitlab-project", action="append", default=[], metavar="ID")
    ap.add_argument("--token", action="append", default=[], help="a valid API token")
    ap.add_argument("--fault", metavar="STATUS:COUNT",
                    help="answer the first COUNT status calls with STATUS")
    a = ap.parse_args(argv)
    emu = ForgeEmulator(a.github_repo, a.gitlab_project, a.token, a.lifetime)
    if a.fault:
        st, _, n = a.fault.partition(":")
        emu.fault(int(st), int(n or 1))
    port = emu.start(a.port)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write("%d\n" % port)
        import os
        os.rename(a.port_file + ".tmp", a.port_file)
    print("PORT=%d" % port, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait(a.lifetime)
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
