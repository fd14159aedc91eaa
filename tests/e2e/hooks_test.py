"""Webhooks, /metrics and /healthz of kpld --http-listen, end to end.

    /usr/bin/python3 tests/e2e/hooks_test.py PATH/TO/kpld

A git repository made here holds pipeline files on two branches; pipelines
are registered through RegisterPipeline, pushes are POSTed the way GitHub
(HMAC-SHA256 signature) and GitLab (token) send them, and the runs they
start are followed on WatchRun.
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import Daemon, assert_eq, expect_rpc_error, run_suite, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

GH_SECRET = "gh-hook-key-3b9f0c"
GL_SECRET = "gl-hook-token-77aa"

# The pipeline on main: v1 in the first commit, v2 in the second, so a run
# shows which commit its file was read at.
MAIN_PIPELINE = """
name: hooked
params:
  ref: { required: true }
  sha: { required: true }
stages:
  - name: show
    kind: script
    with: { command: ["sh", "-c", "echo %s sha=$KPL_PARAM_SHA ref=$KPL_PARAM_REF"] }
"""

# On release-1, in another file: declares sha and branch only, so only
# those two are passed (an undeclared param would fail the run).
RELEASE_PIPELINE = """
name: released
params:
  sha: {}
  branch: {}
stages:
  - name: show
    kind: script
    with: { command: ["sh", "-c", "echo release branch=$KPL_PARAM_BRANCH sha=$KPL_PARAM_SHA"] }
"""

METRIC_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
    r'(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$')


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          capture_output=True, text=True).stdout.strip()


class HookDaemon(Daemon):
    """kpld with --http-listen; the ready file's second line is http=HOST:PORT."""

    def start(self):
        c = super().start()
        if not self.http:
            raise AssertionError("no http= line in the ready file")
        return c


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.repo = os.path.join(tmp, "app")
        self.make_repo()
        self.daemon = HookDaemon(binary, os.path.join(tmp, "data"),
                                 ["--http-listen", "127.0.0.1:0"])
        self.c = self.daemon.start()
        self.host, self.port = self.daemon.http.rsplit(":", 1)
        self.c.call(P + "SetSecret", {"name": "GH_HOOK", "value": GH_SECRET})
        self.c.call(P + "SetSecret", {"name": "GL_HOOK", "value": GL_SECRET})
        self.deliveries = 0

    def make_repo(self):
        os.makedirs(self.repo)
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "t@example.com")
        git(self.repo, "config", "user.name", "t")
        self.commit(".kpl.yaml", MAIN_PIPELINE % "v1")
        self.sha1 = git(self.repo, "rev-parse", "HEAD")
        self.commit(".kpl.yaml", MAIN_PIPELINE % "v2")
        self.sha2 = git(self.repo, "rev-parse", "HEAD")
        git(self.repo, "checkout", "-q", "-b", "release-1")
        self.commit("ci/pipeline.yaml", RELEASE_PIPELINE)
        self.sha_rel = git(self.repo, "rev-parse", "HEAD")
        git(self.repo, "checkout", "-q", "-b", "feature")
        self.commit("notes.txt", "x\n")
        self.sha_feat = git(self.repo, "rev-parse", "HEAD")
        git(self.repo, "checkout", "-q", "main")

    def commit(self, path, text):
        full = os.path.join(self.repo, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        git(self.repo, "add", path)
        git(self.repo, "commit", "-q", "-m", "change " + path)

    # -- helpers --------------------------------------------------------

    def http(self, method, path, body=b"", headers=None, conn=None):
        own = conn is None
        if own:
            conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        if own:
            conn.close()
        return r.status, data.decode("utf-8", "replace"), r

    def github_payload(self, ref, sha, url=None, before="0" * 40):
        return json.dumps({
            "ref": ref, "before": before, "after": sha, "deleted": False,
            "repository": {"name": "app", "full_name": "t/app",
                           "clone_url": url or self.repo,
                           "html_url": "https://example.invalid/t/app"},
            "pusher": {"name": "t"}}).encode()

    def github(self, body, delivery, secret=GH_SECRET, event="push", sig=None):
        headers = {"Content-Type": "application/json", "X-GitHub-Event": event,
                   "X-GitHub-Delivery": delivery, "User-Agent": "GitHub-Hookshot/test"}
        if sig is None and secret is not None:
            sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if sig is not None:
            headers["X-Hub-Signature-256"] = sig
        return self.http("POST", "/hooks/github", body, headers)

    def gitlab(self, ref, sha, token, key):
        body = json.dumps({
            "object_kind": "push", "event_name": "push", "ref": ref, "before": "0" * 40,
            "after": sha, "checkout_sha": sha,
            "project": {"name": "app", "git_http_url": "file://" + self.repo + ".git",
                        "path_with_namespace": "t/app"},
            "repository": {"name": "app", "url": "file://" + self.repo}}).encode()
        headers = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook",
                   "Idempotency-Key": key}
        if token is not None:
            headers["X-Gitlab-Token"] = token
        return self.http("POST", "/hooks/gitlab", body, headers)

    def runs_of(self, name):
        resp = Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": name}))
        return resp.get("runs", [])

    def register(self, **kw):
        return Client.to_dict(self.c.call(P + "RegisterPipeline", kw))

    @staticmethod
    def run_ids(body):
        """'NAME RUN_ID' lines of a 202 answer."""
        out = {}
        for line in body.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] != "error:":
                out[parts[0]] = parts[1]
        return out

    # -- tests ----------------------------------------------------------

    def test_healthz_and_routes(self):
        status, body, _ = self.http("GET", "/healthz")
        assert_eq((status, body), (200, "ok\n"), "/healthz")
        assert_eq(self.http("GET", "/nope")[0], 404, "unknown path")
        status, _, r = self.http("GET", "/hooks/github")
        assert_eq(status, 405, "GET on a POST route")
        assert_eq(r.getheader("Allow"), "POST", "Allow header")
        # Keep-alive: three requests on one connection.
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
        for _ in range(3):
            assert_eq(self.http("GET", "/healthz", conn=conn)[0], 200, "keep-alive request")
        # HEAD is GET without the body: GET's length, and the next request
        # on the connection is read right (no stray body bytes before it).
        conn.request("HEAD", "/healthz")
        r = conn.getresponse()
        assert_eq((r.status, r.getheader("Content-Length"), r.read()), (200, "3", b""),
                  "HEAD /healthz")
        assert_eq(self.http("GET", "/healthz", conn=conn)[:2], (200, "ok\n"), "GET after HEAD")
        conn.close()

    def test_limits(self):
        big = b"x" * (1024 * 1024 + 1)
        status, _, r = self.http("POST", "/hooks/github", big,
                                 {"X-Hub-Signature-256": "sha256=" + "0" * 64})
        assert_eq(status, 413, "a body over 1 MiB")
        refusals = [r]
        status, _, r = self.http("GET", "/healthz", headers={"X-Big": "y" * 17000})
        assert_eq(status, 431, "headers over 16 KiB")
        refusals.append(r)
        status, _, r = self.http("DELETE", "/healthz")
        assert_eq(status, 405, "a method no route has")
        refusals.append(r)
        status, _, r = self.http("GET", "/nowhere")
        assert_eq(status, 404, "a path no route has")
        refusals.append(r)
        # The listener's own answers carry what every route's answer does.
        for r in refusals:
            assert_eq((r.getheader("X-Content-Type-Options"), r.getheader("Cache-Control")),
                      ("nosniff", "no-store"), "headers of the %d" % r.status)

    def test_register_list_delete(self):
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo),
                         grpc.StatusCode.INVALID_ARGUMENT, "secret")
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo, secret="NOPE"),
                         grpc.StatusCode.INVALID_ARGUMENT, "no secret NOPE")
        expect_rpc_error(lambda: self.register(name="Bad Name", repo=self.repo,
                                               secret="GH_HOOK"),
                         grpc.StatusCode.INVALID_ARGUMENT, "name")
        expect_rpc_error(lambda: self.register(name="x", repo="-uhoh", secret="GH_HOOK"),
                         grpc.StatusCode.INVALID_ARGUMENT, "repo")
        expect_rpc_error(lambda: self.register(name="x", secret="GH_HOOK",
                                               repo="https://u:pw@example.invalid/a/b"),
                         grpc.StatusCode.INVALID_ARGUMENT, "no credentials")
        # A token alone as the user (https://TOKEN@host/...), and a remote
        # helper: refused too, and the token is not echoed.
        for repo, why in (("https://ghp_SECRET123@github.com/a/b.git", "no credentials"),
                          ("git://ghp_SECRET123@example.invalid/a/b", "no credentials"),
                          ("ssh://git:ghp_SECRET123@example.invalid/a/b", "no credentials"),
                          ("ext::sh -c true", "remote helper"),
                          ("ext::sh", "remote helper")):
            e = expect_rpc_error(lambda: self.register(name="x", secret="GH_HOOK", repo=repo),
                                 grpc.StatusCode.INVALID_ARGUMENT, why)
            if "SECRET123" in (e.details() or ""):
                raise AssertionError("the token is in the error: %r" % e.details())
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo, secret="GH_HOOK",
                                               path="../etc/passwd"),
                         grpc.StatusCode.INVALID_ARGUMENT, "path")
        got = self.register(name="hooked", repo=self.repo, secret="GH_HOOK")
        assert_eq((got["name"], got["branches"], got["path"], got["secret"]),
                  ("hooked", ["main"], ".kpl.yaml", "GH_HOOK"), "defaults")
        # The ${{ secrets.X }} form names the same secret.
        got = self.register(name="released", repo="file://" + self.repo + "/",
                            branches=["rel*"], path="ci/pipeline.yaml",
                            secret="${{ secrets.GL_HOOK }}")
        assert_eq(got["secret"], "GL_HOOK", "secret given as a template")
        self.register(name="temp", repo="git@example.invalid:t/other.git", secret="GH_HOOK")
        self.register(name="temp2", repo="ssh://git@example.invalid/t/o.git", secret="GH_HOOK")
        self.c.call(P + "DeletePipeline", {"name": "temp2"})
        names = [p["name"] for p in Client.to_dict(
            self.c.call(P + "ListPipelines", {})).get("pipelines", [])]
        assert_eq(names, ["hooked", "released", "temp"], "ListPipelines")
        assert_eq(Client.to_dict(self.c.call(P + "DeletePipeline", {"name": "temp"}))["name"],
                  "temp", "deleted")
        expect_rpc_error(lambda: self.c.call(P + "DeletePipeline", {"name": "temp"}),
                         grpc.StatusCode.NOT_FOUND, "temp")
        names = [p["name"] for p in Client.to_dict(
            self.c.call(P + "ListPipelines", {})).get("pipelines", [])]
        assert_eq(names, ["hooked", "released"], "ListPipelines after delete")

    def test_github_push_runs_the_file_at_that_sha(self):
        # main is at sha2 (v2); the delivery says sha1: v1 must run.
        status, body, _ = self.github(self.github_payload("refs/heads/main", self.sha1),
                                      "delivery-1")
        assert_eq(status, 202, "status (%s)" % body)
        run_id = self.run_ids(body).get("hooked")
        if not run_id:
            raise AssertionError("no run in the answer: %r" % body)
        events = watch(self.c, run_id)
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["v1 sha=%s ref=refs/heads/main" % self.sha1], "the stage's output")
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(run["params"], {"ref": "refs/heads/main", "sha": self.sha1}, "params")
        assert_eq(run["pipeline_name"], "hooked", "pipeline")
        # And at sha2, v2.
        status, body, _ = self.github(self.github_payload("refs/heads/main", self.sha2),
                                      "delivery-2")
        assert_eq(status, 202, "second push (%s)" % body)
        logs = [e["message"] for e in watch(self.c, self.run_ids(body)["hooked"])
                if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["v2 sha=%s ref=refs/heads/main" % self.sha2], "output at sha2")

    def test_bad_or_missing_signature_is_401_without_a_run(self):
        before = len(self.runs_of("hooked"))
        body = self.github_payload("refs/heads/main", self.sha2)
        status, text, _ = self.github(body, "delivery-bad", secret="not-the-secret")
        assert_eq(status, 401, "wrong key")
        if "refs/heads" in text or self.sha2 in text:
            raise AssertionError("the 401 echoes the payload: %r" % text)
        status, _, _ = self.github(body, "delivery-bad-2", sig="sha256=" + "0" * 64)
        assert_eq(status, 401, "wrong signature")
        status, _, _ = self.github(body, "delivery-bad-3", secret=None)
        assert_eq(status, 401, "no signature")
        # Signed, then the body changed by one byte.
        sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
        status, _, _ = self.github(body.replace(b"main", b"mair"), "delivery-bad-4", sig=sig)
        assert_eq(status, 401, "body changed after signing")
        assert_eq(len(self.runs_of("hooked")), before, "runs after refused deliveries")

    def test_github_test_vector(self):
        # GitHub's documented example: secret "It's a Secret to Everybody",
        # body "Hello, World!". Verified, then refused as not a push payload.
        self.c.call(P + "SetSecret", {"name": "VECTOR", "value": "It's a Secret to Everybody"})
        self.register(name="vector", repo="https://example.invalid/v/v", secret="VECTOR")
        status, text, _ = self.github(
            b"Hello, World!", "delivery-vector", secret=None,
            sig="sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
        assert_eq(status, 400, "verified, but not JSON (%s)" % text)
        self.c.call(P + "DeletePipeline", {"name": "vector"})

    def test_same_delivery_twice_starts_one_run(self):
        before = len(self.runs_of("hooked"))
        # Pushes of sha2 again, each on top of another commit than the
        # pushes before (a push's before sha is part of what it is).
        body = self.github_payload("refs/heads/main", self.sha2, before="1" * 40)
        s1, b1, _ = self.github(body, "delivery-dup")
        s2, b2, _ = self.github(body, "delivery-dup")
        assert_eq((s1, s2), (202, 202), "statuses")
        assert_eq(self.run_ids(b2)["hooked"], self.run_ids(b1)["hooked"], "the same run")
        if "seen before" not in b2:
            raise AssertionError("the second answer does not say so: %r" % b2)
        # Three at once, while none is stored yet.
        out = []
        body = self.github_payload("refs/heads/main", self.sha2, before="2" * 40)
        ts = [threading.Thread(target=lambda: out.append(self.github(body, "delivery-race")))
              for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert_eq(len(out), 3, "answers")
        # Every one answered 202 with the run: a 500 (or a dropped answer)
        # for two of them is not "one run for three deliveries".
        assert_eq([s for s, _, _ in out], [202, 202, 202],
                  "statuses of three concurrent deliveries (%r)" % out)
        ids = {self.run_ids(b)["hooked"] for s, b, _ in out}
        assert_eq(len(ids), 1, "one run for three concurrent deliveries (%r)" % out)
        watch(self.c, self.run_ids(b1)["hooked"])
        watch(self.c, ids.pop())
        assert_eq(len(self.runs_of("hooked")), before + 2, "runs added")

    def test_replayed_push_with_a_new_delivery_id_starts_no_run(self):
        # Whoever holds an old signed delivery can send it again with any
        # X-GitHub-Delivery (the signature covers the body only): it is the
        # same push, so the same run. A new push starts a new one.
        before = len(self.runs_of("hooked"))
        body = self.github_payload("refs/heads/main", self.sha1, before="3" * 40)
        s1, b1, _ = self.github(body, "delivery-orig")
        assert_eq(s1, 202, "the push (%s)" % b1)
        first = self.run_ids(b1)["hooked"]
        s2, b2, _ = self.github(body, "delivery-replayed-with-a-new-id")
        assert_eq(s2, 202, "the replay (%s)" % b2)
        assert_eq(self.run_ids(b2)["hooked"], first, "the replay's run")
        if "seen before" not in b2:
            raise AssertionError("the replay's answer does not say so: %r" % b2)
        watch(self.c, first)
        assert_eq(len(self.runs_of("hooked")), before + 1, "runs after the replay")
        # A new push: sha2 on top of sha1.
        s3, b3, _ = self.github(self.github_payload("refs/heads/main", self.sha2,
                                                    before=self.sha1), "delivery-new-push")
        assert_eq(s3, 202, "a new push (%s)" % b3)
        second = self.run_ids(b3)["hooked"]
        if second == first or "seen before" in b3:
            raise AssertionError("a new push did not start a run: %r" % b3)
        watch(self.c, second)
        assert_eq(len(self.runs_of("hooked")), before + 2, "runs after a new push")
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": second}))
        if not run["idempotency_key"].startswith("hook:github:") \
                or len(run["idempotency_key"]) != len("hook:github:") + 64:
            raise AssertionError("idempotency key of a hook run: %r" % run["idempotency_key"])

    def test_gitlab_token(self):
        status, text, _ = self.gitlab("refs/heads/release-1", self.sha_rel, "wrong", "gl-1")
        assert_eq(status, 401, "wrong token")
        status, text, _ = self.gitlab("refs/heads/release-1", self.sha_rel, None, "gl-2")
        assert_eq(status, 401, "no token")
        assert_eq(self.runs_of("released"), [], "runs after refused deliveries")
        status, text, _ = self.gitlab("refs/heads/release-1", self.sha_rel, GL_SECRET, "gl-3")
        assert_eq(status, 202, "right token (%s)" % text)
        ids = self.run_ids(text)
        assert_eq(list(ids), ["released"], "pipelines run (the GitHub one has another key)")
        logs = [e["message"] for e in watch(self.c, ids["released"])
                if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["release branch=release-1 sha=%s" % self.sha_rel], "output")
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": ids["released"]}))
        assert_eq(run["params"], {"branch": "release-1", "sha": self.sha_rel},
                  "only the declared params")

    def test_unwatched_branch_and_other_events(self):
        before = len(self.runs_of("hooked"))
        status, text, _ = self.github(self.github_payload("refs/heads/feature", self.sha_feat),
                                      "delivery-feature")
        assert_eq(status, 204, "a branch no one watches")
        status, _, _ = self.github(self.github_payload("refs/tags/v1", self.sha2), "delivery-tag")
        assert_eq(status, 204, "a tag")
        status, _, _ = self.github(self.github_payload("refs/heads/main", "0" * 40),
                                   "delivery-delete")
        assert_eq(status, 204, "a branch deletion")
        status, _, _ = self.github(b'{"zen": "x"}', "delivery-issue", event="issues")
        assert_eq(status, 204, "not a push")
        status, text, _ = self.github(b'{"zen": "x"}', "delivery-ping", event="ping")
        assert_eq(status, 200, "ping")
        status, _, _ = self.github(self.github_payload(
            "refs/heads/main", self.sha2, url="https://example.invalid/someone/else"),
            "delivery-other-repo")
        assert_eq(status, 204, "another repository")
        assert_eq(len(self.runs_of("hooked")), before, "no run")

    def test_missing_pipeline_file(self):
        # feature is watched now, but has no ci/pipeline.yaml... it does
        # (branched from release-1); main's first commit has none.
        self.register(name="released", repo=self.repo, branches=["rel*", "main"],
                      path="ci/pipeline.yaml", secret="GL_HOOK")
        status, text, _ = self.gitlab("refs/heads/main", self.sha1, GL_SECRET, "gl-missing")
        assert_eq(status, 422, "no pipeline file at that sha (%s)" % text)
        if "ci/pipeline.yaml" not in text:
            raise AssertionError("the answer does not name the file: %r" % text)

    def test_metrics(self):
        status, text, r = self.http("GET", "/metrics")
        assert_eq(status, 200, "/metrics")
        if not r.getheader("Content-Type", "").startswith("text/plain; version=0.0.4"):
            raise AssertionError("content type %r" % r.getheader("Content-Type"))
        values, types = {}, {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                continue
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(" ", 3)
                types[name] = typ
                continue
            if not METRIC_LINE.match(line):
                raise AssertionError("not a Prometheus sample line: %r" % line)
            key, val = line.rsplit(" ", 1)
            values[key] = float(val)
        assert_eq(types, {"kpl_runs": "gauge", "kpl_runs_active": "gauge",
                          "kpl_queue_depth": "gauge", "kpl_stage_duration_seconds": "histogram",
                          "kpl_grpc_calls_total": "counter",
                          "kpl_webhook_deliveries_total": "counter",
                          "kpl_api_events_read_total": "counter",
                          "kpl_watch_runs_scan_max": "gauge"}, "families")
        # Runs: every hook run above succeeded (2 + 2 + 1), none queued now.
        if values['kpl_runs{state="succeeded"}'] < 5:
            raise AssertionError("succeeded runs: %r" % values)
        assert_eq(values['kpl_runs{state="queued"}'], 0, "queued runs")
        assert_eq(values['kpl_runs{state="running"}'], 0, "running runs")
        assert_eq(values["kpl_queue_depth"], 0, "queue depth")
        assert_eq(values["kpl_runs_active"], 0, "active runs")
        count = values['kpl_stage_duration_seconds_count{kind="script"}']
        if count < 5:
            raise AssertionError("script stages timed: %r" % count)
        assert_eq(values['kpl_stage_duration_seconds_bucket{kind="script",le="+Inf"}'], count,
                  "+Inf bucket")
        buckets = [v for k, v in values.items()
                   if k.startswith('kpl_stage_duration_seconds_bucket{kind="script"')]
        assert_eq(buckets, sorted(buckets), "buckets are cumulative")
        g = 'kpl_grpc_calls_total{method="/kpl.v1.Pipelines/%s",code="%s"}'
        assert_eq(values.get(g % ("DeletePipeline", "NOT_FOUND")), 1, "DeletePipeline NOT_FOUND")
        if values.get(g % ("RegisterPipeline", "INVALID_ARGUMENT"), 0) < 6:
            raise AssertionError("RegisterPipeline refusals not counted")
        if values.get(g % ("WatchRun", "OK"), 0) < 5:
            raise AssertionError("WatchRun calls not counted")
        w = 'kpl_webhook_deliveries_total{source="%s",result="%s"}'
        expect = {("github", "accepted"): 3, ("github", "duplicate"): 1,
                  ("github", "unauthorized"): 4, ("github", "ignored"): 5,
                  ("github", "bad_request"): 1, ("gitlab", "unauthorized"): 2,
                  ("gitlab", "accepted"): 1, ("gitlab", "error"): 1}
        for (src, res), n in expect.items():
            got = values.get(w % (src, res), 0)
            if got < n:
                raise AssertionError("deliveries %s/%s: %r, want at least %d"
                                     % (src, res, got, n))
        # ./dev installs promtool (Debian's prometheus package): a skip
        # here would hide a broken install, so its absence fails.
        promtool = shutil.which("promtool")
        if not promtool:
            raise AssertionError("promtool is not installed: ./dev installs it (Debian "
                                 "package prometheus)")
        p = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                           capture_output=True)
        # promtool's lint notes (exit 3 in some versions) are not format errors.
        if p.returncode not in (0, 3) or "error" in (p.stdout + p.stderr).lower():
            raise AssertionError("promtool check metrics: %s%s" % (p.stdout, p.stderr))

    def test_secrets_never_logged(self):
        log = open(self.daemon.log).read()
        for s in (GH_SECRET, GL_SECRET, "It's a Secret to Everybody"):
            if s in log:
                raise AssertionError("a webhook secret is in kpld's log")

    def close(self):
        rc = self.daemon.stop()
        assert_eq(rc, 0, "kpld exit code after SIGTERM")
        if "loop did not close clean" in open(self.daemon.log).read():
            raise AssertionError("the loop did not close clean")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-hooks-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
