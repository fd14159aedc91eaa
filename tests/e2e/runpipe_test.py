"""Registered pipelines started by hand (issue #13): RunPipeline at a ref or
a sha, where a run's file came from (GetRun's source, kplctl get),
GetRunPipeline's exact text, kplctl pipeline register|list|show|delete|run
and kplctl diff.

    /usr/bin/python3 tests/e2e/runpipe_test.py PATH/TO/kpld PATH/TO/kplctl

A git repository made here holds the pipeline file in two versions on main
and a tag; kpld runs without --http-listen (RunPipeline needs no webhook
listener).
"""

import hashlib
import os
import subprocess
import sys
import tempfile

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import (Daemon, assert_eq, expect_rpc_error, run_suite, wait_for_log,  # noqa: E402
                      watch)
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"

# VERSION % (greeting): the file on main, changed by one line between the
# two commits, so a run shows which commit its file was read at.
VERSION = """name: manual
params:
  ref: {}
  sha: {}
  who: { default: nobody }
stages:
  - name: show
    kind: script
    with: { command: ["sh", "-c", "echo %s who=$KPL_PARAM_WHO ref=$KPL_PARAM_REF sha=$KPL_PARAM_SHA"] }
"""


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          capture_output=True, text=True).stdout.strip()


class Suite:
    def __init__(self, binary, kplctl, tmp):
        self.tmp = tmp
        self.kplctl = kplctl
        self.repo = os.path.join(tmp, "app")
        self.make_repo()
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "HOOK_KEY", "value": "hook-key-1234"})

    def make_repo(self):
        os.makedirs(self.repo)
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "t@example.com")
        git(self.repo, "config", "user.name", "t")
        self.v1 = VERSION % "hello-v1"
        self.v2 = VERSION % "hello-v2"
        self.commit("ci/kpl.yaml", self.v1)
        self.sha1 = git(self.repo, "rev-parse", "HEAD")
        git(self.repo, "tag", "-a", "v1.0", "-m", "first")
        self.commit("ci/kpl.yaml", self.v2)
        self.sha2 = git(self.repo, "rev-parse", "HEAD")

    def commit(self, path, text):
        full = os.path.join(self.repo, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        git(self.repo, "add", path)
        git(self.repo, "commit", "-q", "-m", "change " + path)

    def ctl(self, *args, ok=True):
        r = subprocess.run([self.kplctl, "--server", self.daemon.addr] + list(args),
                           capture_output=True, text=True, timeout=120)
        if ok and r.returncode != 0:
            raise AssertionError("kplctl %s: exit %d\nstdout:\n%s\nstderr:\n%s"
                                 % (" ".join(args), r.returncode, r.stdout, r.stderr))
        return r

    def register(self):
        self.c.call(P + "RegisterPipeline", {"name": "manual", "repo": self.repo,
                                             "path": "ci/kpl.yaml", "secret": "HOOK_KEY"})

    def run_pipeline(self, **kw):
        run = Client.to_dict(self.c.call(P + "RunPipeline", dict(name="manual", **kw)))
        events = watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "run %s state" % run["id"])
        logs = [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        return got, logs

    # -- RunPipeline and provenance ---------------------------------------

    def test_run_at_ref_records_its_source(self):
        self.register()
        run, logs = self.run_pipeline(ref="main", params={"who": "alice"})
        want_line = "hello-v2 who=alice ref=refs/heads/main sha=%s" % self.sha2
        if want_line not in logs:
            raise AssertionError("log lacks %r: %r" % (want_line, logs))
        src = run.get("source", {})
        assert_eq((src.get("repo"), src.get("commit"), src.get("path"), src.get("ref")),
                  (self.repo, self.sha2, "ci/kpl.yaml", "refs/heads/main"), "GetRun source")
        assert_eq(src.get("sha256"), hashlib.sha256(self.v2.encode()).hexdigest(),
                  "source sha256 is the text's")
        text = Client.to_dict(self.c.call(P + "GetRunPipeline", {"id": run["id"]}))
        assert_eq(text["pipeline"], self.v2, "GetRunPipeline text")
        assert_eq(text["source"]["commit"], self.sha2, "GetRunPipeline source")
        self.run_v2 = run["id"]

    def test_run_at_sha_and_tag_reads_the_older_file(self):
        run, logs = self.run_pipeline(sha=self.sha1)
        if not any(line.startswith("hello-v1 who=nobody") for line in logs):
            raise AssertionError("the older commit's file did not run: %r" % logs)
        assert_eq(run["source"]["commit"], self.sha1, "source commit of --sha")
        text = Client.to_dict(self.c.call(P + "GetRunPipeline", {"id": run["id"]}))
        assert_eq(text["pipeline"], self.v1, "GetRunPipeline text of the older run")
        self.run_v1 = run["id"]
        # The same idempotency key: the same run, nothing started again.
        first = Client.to_dict(self.c.call(P + "RunPipeline", {
            "name": "manual", "sha": self.sha1, "idempotency_key": "deploy-42"}))
        again = Client.to_dict(self.c.call(P + "RunPipeline", {
            "name": "manual", "ref": "main", "idempotency_key": "deploy-42"}))
        assert_eq(again["id"], first["id"], "RunPipeline with a key seen before")
        watch(self.c, first["id"])
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "manual", "ref": "main", "idempotency_key": "hook:x"}),
            grpc.StatusCode.INVALID_ARGUMENT, "kpld's own")
        # An annotated tag resolves to its commit, not the tag object.
        run, logs = self.run_pipeline(ref="v1.0")
        assert_eq((run["source"]["commit"], run["source"]["ref"]),
                  (self.sha1, "refs/tags/v1.0"), "source of a tag")

    def test_bad_ref_and_bad_requests(self):
        e = expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "manual", "ref": "no-such-branch"}), grpc.StatusCode.NOT_FOUND,
            "ref no-such-branch")
        if self.repo not in e.details():
            raise AssertionError("the error does not name the repository: %r" % e.details())
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "nope", "ref": "main"}), grpc.StatusCode.NOT_FOUND,
            "no registered pipeline nope")
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "manual", "ref": "main", "sha": self.sha1}),
            grpc.StatusCode.INVALID_ARGUMENT, "not both")
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "manual", "sha": "xyz"}), grpc.StatusCode.INVALID_ARGUMENT, "sha")
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {
            "name": "manual", "ref": "--upload-pack=x"}),
            grpc.StatusCode.INVALID_ARGUMENT, "ref")
        expect_rpc_error(lambda: self.c.call(P + "GetRunPipeline", {"id": "r_nope"}),
                         grpc.StatusCode.NOT_FOUND, "r_nope")

    def test_submitted_run_has_only_a_sha256(self):
        run = Client.to_dict(self.c.call(P + "SubmitRun", {"pipeline": self.v1}))
        watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["source"], {"sha256": hashlib.sha256(self.v1.encode()).hexdigest()},
                  "a submitted text's source")

    def test_source_survives_restarts(self):
        # A run still going when kpld stops is recovered and its record
        # written again (here by the cancel): the source must stay.
        git(self.repo, "checkout", "-q", "-b", "slow")
        self.commit("slow.yaml", "name: slow\nstages:\n  - name: wait\n    kind: script\n"
                    "    with: { shell: \"echo waiting; exec sleep 300\" }\n")
        slow_sha = git(self.repo, "rev-parse", "HEAD")
        git(self.repo, "checkout", "-q", "main")
        self.c.call(P + "RegisterPipeline", {"name": "slow", "repo": self.repo,
                                             "branches": ["slow"], "path": "slow.yaml",
                                             "secret": "HOOK_KEY"})
        run = Client.to_dict(self.c.call(P + "RunPipeline", {"name": "slow"}))
        wait_for_log(self.c, run["id"])
        assert_eq(self.daemon.stop(), 0, "kpld exit status")
        self.c = self.daemon.start()
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "the recovered run, cancelled")
        assert_eq((got["source"]["commit"], got["source"]["path"], got["source"]["ref"]),
                  (slow_sha, "slow.yaml", "refs/heads/slow"), "source after a restart")
        done = Client.to_dict(self.c.call(P + "GetRun", {"id": self.run_v2}))
        assert_eq(done["source"]["commit"], self.sha2, "a finished run's source after a restart")

    # -- kplctl -----------------------------------------------------------

    def test_kplctl_pipeline_register_list_show_delete(self):
        r = self.ctl("pipeline", "register", "every-field", "--repo", "file://" + self.repo,
                     "--branch", "main", "--branch", "release/*", "--path", "ci/kpl.yaml",
                     "--secret", "HOOK_KEY")
        assert_eq(r.stdout, "pipeline every-field registered\n", "register output")
        shown = self.ctl("pipeline", "show", "every-field").stdout
        for want in ("name:      every-field\n", "repo:      file://%s\n" % self.repo,
                     "branches:  main, release/*\n", "path:      ci/kpl.yaml\n",
                     "secret:    HOOK_KEY\n", "by:        local\n"):
            if want not in shown:
                raise AssertionError("pipeline show lacks %r:\n%s" % (want, shown))
        import json
        got = json.loads(self.ctl("pipeline", "show", "every-field", "-o", "json").stdout)
        assert_eq((got["branches"], got["path"], got["secret"]),
                  (["main", "release/*"], "ci/kpl.yaml", "HOOK_KEY"), "show -o json")
        listed = self.ctl("pipeline", "list").stdout
        rows = {ln.split()[0]: ln for ln in listed.splitlines()[1:]}
        if "every-field" not in rows or "main,release/*" not in rows["every-field"]:
            raise AssertionError("pipeline list: %r" % listed)
        assert_eq(self.ctl("pipeline", "delete", "every-field").stdout,
                  "pipeline every-field deleted\n", "delete output")
        r = self.ctl("pipeline", "show", "every-field", ok=False)
        assert_eq(r.returncode, 3, "show of a deleted pipeline")
        if "no registered pipeline every-field" not in r.stderr:
            raise AssertionError("show of a deleted pipeline: %r" % r.stderr)
        r = self.ctl("pipeline", "register", "x", "--repo", self.repo, ok=False)
        assert_eq(r.returncode, 2, "register without --secret")
        r = self.ctl("pipeline", "list", "--ref", "main", ok=False)
        assert_eq(r.returncode, 2, "--ref on list")

    def test_kplctl_pipeline_run_watch_and_get(self):
        r = self.ctl("pipeline", "run", "manual", "--ref", "main", "-p", "who=bob", "--watch",
                     "--plain")
        if "hello-v2 who=bob" not in r.stdout or "run SUCCEEDED" not in r.stdout:
            raise AssertionError("pipeline run --watch:\n%s" % r.stdout)
        run_id = r.stdout.splitlines()[0].strip()
        got = self.ctl("get", run_id).stdout
        for want in ("repo:      %s\n" % self.repo, "commit:    %s\n" % self.sha2,
                     "path:      ci/kpl.yaml\n", "ref:       refs/heads/main\n",
                     "sha256:    %s\n" % hashlib.sha256(self.v2.encode()).hexdigest()):
            if want not in got:
                raise AssertionError("kplctl get lacks %r:\n%s" % (want, got))
        r = self.ctl("pipeline", "run", "manual", "--ref", "nope", ok=False)
        assert_eq(r.returncode, 3, "run at a bad ref")
        if "ref nope" not in r.stderr or self.repo not in r.stderr:
            raise AssertionError("bad ref error: %r" % r.stderr)
        r = self.ctl("pipeline", "run", "manual", "--sha", self.sha1, "--watch", "--plain")
        if "hello-v1" not in r.stdout:
            raise AssertionError("pipeline run --sha:\n%s" % r.stdout)
        self.kplctl_v2, self.kplctl_v1 = run_id, r.stdout.splitlines()[0].strip()

    def test_kplctl_diff(self):
        a, b = self.kplctl_v1, self.kplctl_v2
        r = self.ctl("diff", a, b, ok=False)
        assert_eq(r.returncode, 1, "diff of two different files")
        lines = r.stdout.splitlines()
        assert_eq(lines[0], "--- %s (ci/kpl.yaml at %s)" % (a, self.sha1[:12]), "--- label")
        assert_eq(lines[1], "+++ %s (ci/kpl.yaml at %s)" % (b, self.sha2[:12]), "+++ label")
        changed = [ln for ln in lines[2:] if ln[:1] in "+-"]
        old = [ln for ln in self.v1.splitlines() if "hello" in ln][0]
        new = [ln for ln in self.v2.splitlines() if "hello" in ln][0]
        assert_eq(changed, ["-" + old, "+" + new], "the changed line")
        if not lines[2].startswith("@@ -"):
            raise AssertionError("no hunk header: %r" % lines[2])
        # The diff applies: patch(1) turns run A's text into run B's.
        pa = os.path.join(self.tmp, "a.yaml")
        with open(pa, "w") as f:
            f.write(self.v1)
        subprocess.run(["patch", "-s", pa], input=r.stdout, text=True, check=True)
        assert_eq(open(pa).read(), self.v2, "the diff applied")
        r = self.ctl("diff", a, a)
        assert_eq(r.stdout, "", "diff of a run with itself")

    # -- last: tokens (from here on every call needs one) -------------------

    def test_limited_token(self):
        admin = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_ADMIN", "description": "admin"}))["token"]
        md = [("authorization", "Bearer " + admin)]
        other = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_SUBMIT", "pipeline": "other", "description": "other"},
            metadata=md))["token"]
        mine = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_SUBMIT", "pipeline": "manual", "description": "mine"},
            metadata=md))["token"]
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {"name": "manual",
                                                                 "ref": "main"},
                                             metadata=[("authorization", "Bearer " + other)]),
                         grpc.StatusCode.PERMISSION_DENIED, "limited to pipeline other")
        run = Client.to_dict(self.c.call(P + "RunPipeline", {"name": "manual", "ref": "main"},
                                         metadata=[("authorization", "Bearer " + mine)]))
        assert_eq(run["pipeline_name"], "manual", "run by the limited token")
        self.c.token = admin
        watch(self.c, run["id"])
        audit = Client.to_dict(self.c.call(S + "ListAudit", {"limit": 1000}))
        said = [e.get("message", "") for e in audit.get("events", [])]
        if not any("(mine) ran registered pipeline manual at main" in m for m in said):
            raise AssertionError("no audit entry of the run: %r" % said[-5:])

    def close(self):
        rc = self.daemon.stop()
        assert_eq(rc, 0, "kpld exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    kplctl = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-runpipe-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, kplctl, tmp))


if __name__ == "__main__":
    sys.exit(main())
