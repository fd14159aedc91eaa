"""The forge emulator answers like GitHub's and GitLab's status APIs.

    python3 tests/emulators/forge_test.py tests/emulators/forge/forge_emulator.py

Starts the emulator as a process (as a test would run it by hand) and
drives it with urllib: the happy paths, each refusal it is documented to
make, fault injection, and the call record.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def check(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def post(base, path, doc, headers):
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    req = urllib.request.Request(base + path, data=data, method="POST")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main(emulator):
    tmp = tempfile.mkdtemp(prefix="forge-emu-")
    port_file = os.path.join(tmp, "port")
    proc = subprocess.Popen([sys.executable, emulator, "--port-file", port_file,
                             "--lifetime", "120", "--github-repo", "Codertocat/Hello-World",
                             "--gitlab-project", "14", "--token", "tok-1",
                             "--fault", "500:1"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT="):
            raise AssertionError("no PORT= line: %r" % line)
        check(int(open(port_file).read()), int(line[5:]), "--port-file")
        base = "http://127.0.0.1:%d" % int(line[5:])
        gh = {"Authorization": "Bearer tok-1", "Accept": "application/vnd.github+json",
              "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "forge-test",
              "Content-Type": "application/json"}
        path = "/repos/Codertocat/Hello-World/statuses/" + SHA
        ok = {"state": "pending", "context": "kpl/app", "description": "d"}
        # The injected fault comes first.
        check(post(base, path, ok, gh)[0], 500, "injected 500")
        st, doc = post(base, path, ok, gh)
        check((st, doc["state"], doc["context"]), (201, "pending", "kpl/app"), "github 201")
        check(post(base, path, ok, dict(gh, Authorization="Bearer nope")),
              (401, {"message": "Bad credentials",
                     "documentation_url": "https://docs.github.com/rest"}), "bad token")
        check(post(base, path, ok, {k: v for k, v in gh.items() if k != "Authorization"})[0],
              401, "no token")
        check(post(base, path, ok, dict(gh, **{"User-Agent": ""}))[0], 403, "no User-Agent")
        check(post(base, path, dict(ok, state="done"), gh)[0], 422, "bad state")
        check(post(base, path, dict(ok, description="x" * 141), gh)[0], 422, "long description")
        check(post(base, "/repos/a/b/statuses/" + SHA, ok, gh)[0], 404, "unknown repo")
        check(post(base, path, b"{", gh)[0], 400, "not JSON")
        check(post(base, path, ok, dict(gh, **{"X-GitHub-Api-Version": "1999-01-01"}))[0],
              400, "unsupported API version")
        gl = {"PRIVATE-TOKEN": "tok-1", "Content-Type": "application/json"}
        glpath = "/api/v4/projects/14/statuses/" + SHA
        st, doc = post(base, glpath, {"state": "pending", "name": "kpl/app"}, gl)
        check((st, doc["status"]), (201, "pending"), "gitlab 201")
        st, doc = post(base, glpath, {"state": "pending", "name": "kpl/app"}, gl)
        check(st, 400, "the same state again")
        if "Cannot transition status" not in doc.get("message", ""):
            raise AssertionError("the repeat's message: %r" % doc)
        check(post(base, glpath, {"state": "success", "name": "kpl/app"}, gl)[0], 201, "next")
        check(post(base, glpath, {"state": "failure"}, gl)[0], 400, "GitHub's word on GitLab")
        check(post(base, glpath, {"name": "x"}, gl)[0], 400, "no state")
        check(post(base, glpath, {"state": "pending"}, {"PRIVATE-TOKEN": "x"})[0], 401,
              "gitlab bad token")
        check(post(base, "/api/v4/projects/99/statuses/" + SHA, {"state": "pending"}, gl)[0],
              404, "unknown project")
        with urllib.request.urlopen(base + "/_emulator/calls", timeout=30) as r:
            calls = json.loads(r.read())
        check(len(calls), 17, "calls recorded")
        check((calls[1]["headers"]["authorization"], calls[1]["body"]["state"]),
              ("Bearer tok-1", "pending"), "the record of a call")
        check([c["fault"] for c in calls[:2]], [True, False], "the fault is marked")
    finally:
        proc.terminate()
        check(proc.wait(timeout=30), 0, "exit on SIGTERM")
    print("forge emulator: ok")
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    sys.exit(main(sys.argv[1]))
