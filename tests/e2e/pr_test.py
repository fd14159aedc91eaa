"""Pull and merge requests, end to end: webhooks that start runs and the
commit statuses kpld sends back, against the forge emulator.

    /usr/bin/python3 tests/e2e/pr_test.py PATH/TO/kpld PATH/TO/kplctl FORGE_EMULATOR.py FIXTURES_DIR

A git repository made here plays the base repository: pull requests' head
commits are on a branch and under refs/pull/N/head (GitHub's layout), a
fork's commit only under refs/pull/N/head. Deliveries start from GitHub's
and GitLab's documented example payloads (tests/e2e/fixtures/forge), with
the URLs, shas and branches pointed at that repository, and are signed the
way the forges sign them. The forge emulator (tests/emulators/forge) takes
the statuses, checking them like the real APIs do.
"""

import copy
import hashlib
import hmac
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import grpc  # noqa: E402
from e2e_test import Daemon, assert_eq, expect_rpc_error, run_suite, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

GH_SECRET = "gh-pr-hook-key-5d1e"
GL_SECRET = "gl-mr-hook-token-0b7c"
GH_TOKEN = "ghp_statusTokenForTests0123"
GL_TOKEN = "glpat-statusTokenForTests"
DEPLOY_KEY = "deploy-key-value-9f8e7d"
CONSOLE = "http://console.example:8080"
GH_REPO = "Codertocat/Hello-World"  # the fixtures' base repository
GL_PROJECT = "1"                    # the fixture's project.id

PR_PIPELINE = """
name: prcheck
params:
  pr: {}
  head_sha: {}
  base_branch: {}
  head_branch: {}
stages:
  - name: show
    kind: script
    with:
      command: ["sh", "-c", "echo %s pr=$KPL_PARAM_PR head=$KPL_PARAM_HEAD_SHA base=$KPL_PARAM_BASE_BRANCH from=$KPL_PARAM_HEAD_BRANCH; exit %d"]
"""

# A fork's change: it reads a secret.
FORK_PIPELINE = """
name: prcheck
stages:
  - name: leak
    kind: script
    env: { KEY: "${{ secrets.DEPLOY_KEY }}" }
    with:
      command: ["sh", "-c", "echo key=$KEY"]
"""

# Waits for an approval: the test decides when the run ends.
GATED_PIPELINE = """
name: prcheck
stages:
  - name: gate
    kind: approval
  - name: after
    kind: script
    needs: [gate]
    with: { command: ["echo", "gated done"] }
"""


# One run per pull request at a time: a new head cancels the run of the old.
GROUPED_PIPELINE = """
name: prcheck
params:
  pr: {}
concurrency: { group: "pr-${{ params.pr }}", cancel_in_progress: true }
stages:
  - name: gate
    kind: approval
"""


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          capture_output=True, text=True).stdout.strip()


def load_emulator(path):
    spec = importlib.util.spec_from_file_location("forge_emulator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Suite:
    def __init__(self, binary, kplctl, emulator_py, fixtures, tmp):
        self.tmp = tmp
        self.kplctl = kplctl
        self.fixtures = fixtures
        self.repo = os.path.join(tmp, "app")
        self.make_repo()
        emu = load_emulator(emulator_py)
        self.forge = emu.ForgeEmulator(github_repos=[GH_REPO], gitlab_projects=[GL_PROJECT],
                                       tokens=[GH_TOKEN, GL_TOKEN], lifetime=900)
        port = self.forge.start()
        self.daemon = Daemon(binary, os.path.join(tmp, "data"), [
            "--http-listen", "127.0.0.1:0",
            "--console-url", CONSOLE + "/",
            "--github-api-url", "http://127.0.0.1:%d" % port,
            "--gitlab-api-url", "http://127.0.0.1:%d/api/v4" % port])
        self.start()
        for name, value in (("GH_HOOK", GH_SECRET), ("GL_HOOK", GL_SECRET),
                            ("GH_TOKEN", GH_TOKEN), ("GL_TOKEN", GL_TOKEN),
                            ("DEPLOY_KEY", DEPLOY_KEY)):
            self.c.call(P + "SetSecret", {"name": name, "value": value})
        self.register(name="prcheck", repo=self.repo, secret="GH_HOOK", pull_requests=True,
                      status_token="GH_TOKEN")
        self.register(name="mrcheck", repo="file://" + self.repo, secret="GL_HOOK",
                      pull_requests=True, status_token="GL_TOKEN")
        self.n = 0

    def start(self):
        self.c = self.daemon.start()
        if not self.daemon.http:
            raise AssertionError("no http= line in the ready file")
        self.host, self.port = self.daemon.http.rsplit(":", 1)

    def close(self):
        self.forge.stop()

    # -- the repository -------------------------------------------------

    def make_repo(self):
        os.makedirs(self.repo)
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "t@example.com")
        git(self.repo, "config", "user.name", "t")
        self.commit(PR_PIPELINE % ("main", 0))
        git(self.repo, "checkout", "-q", "-b", "feature")
        git(self.repo, "checkout", "-q", "main")

    def commit(self, text, branch=None):
        """Commits .kpl.yaml with text (on branch, or detached when None
        after the first commit) and returns the sha."""
        with open(os.path.join(self.repo, ".kpl.yaml"), "w") as f:
            f.write(text)
        git(self.repo, "add", ".kpl.yaml")
        git(self.repo, "commit", "-q", "--allow-empty", "-m", "pipeline")
        return git(self.repo, "rev-parse", "HEAD")

    def head_commit(self, number, text, branch="feature"):
        """A pull request's new head: a commit on branch (None: a fork's,
        in no branch), published as refs/pull/N/head and
        refs/merge-requests/N/head the way the forges keep them."""
        if branch:
            git(self.repo, "checkout", "-q", branch)
        else:
            git(self.repo, "checkout", "-q", "--detach", "main")
        sha = self.commit(text)
        git(self.repo, "update-ref", "refs/pull/%d/head" % number, sha)
        git(self.repo, "update-ref", "refs/merge-requests/%d/head" % number, sha)
        git(self.repo, "checkout", "-q", "main")
        return sha

    # -- deliveries -----------------------------------------------------

    def http(self, path, body, headers):
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read().decode("utf-8", "replace")
        conn.close()
        return r.status, data

    def github_pr(self, action, number, sha, head_branch="feature", before=None, fork=False):
        with open(os.path.join(self.fixtures, "github_pull_request_%s.json" % action)) as f:
            d = json.load(f)
        self.n += 1
        pr = d["pull_request"]
        d["number"] = pr["number"] = number
        pr["head"]["sha"] = sha
        pr["head"]["ref"] = head_branch
        pr["base"]["ref"] = "main"
        pr["updated_at"] = "2026-01-01T00:00:%02dZ" % (self.n % 60)
        d["repository"]["clone_url"] = self.repo
        if fork:
            pr["head"]["repo"] = copy.deepcopy(pr["head"]["repo"])
            pr["head"]["repo"]["id"] = 4242
            pr["head"]["repo"]["full_name"] = "forker/Hello-World"
        if before is not None:
            d["before"] = before
            d["after"] = sha
        return json.dumps(d).encode()

    def github(self, body, delivery, event="pull_request"):
        sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
        return self.http("/hooks/github", body, {
            "Content-Type": "application/json", "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": sig,
            "User-Agent": "GitHub-Hookshot/test"})

    def gitlab_mr(self, action, iid, sha, oldrev=None, fork=False):
        with open(os.path.join(self.fixtures, "gitlab_merge_request_open.json")) as f:
            d = json.load(f)
        self.n += 1
        oa = d["object_attributes"]
        oa["action"] = action
        oa["iid"] = iid
        oa["last_commit"]["id"] = sha
        oa["source_branch"] = "feature"
        oa["target_branch"] = "main"
        oa["updated_at"] = "2026-01-01T00:00:%02dZ" % (self.n % 60)
        if fork:
            oa["source_project_id"] = 99
        if oldrev:
            oa["oldrev"] = oldrev
        d["project"]["git_http_url"] = "file://" + self.repo
        return json.dumps(d).encode()

    def gitlab(self, body, key):
        return self.http("/hooks/gitlab", body, {
            "Content-Type": "application/json", "X-Gitlab-Event": "Merge Request Hook",
            "X-Gitlab-Token": GL_SECRET, "Idempotency-Key": key})

    @staticmethod
    def run_ids(body):
        out = {}
        for line in body.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] != "error:":
                out[parts[0]] = parts[1]
        return out

    def register(self, **kw):
        return Client.to_dict(self.c.call(P + "RegisterPipeline", kw))

    def runs_of(self, name):
        return Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": name})).get(
            "runs", [])

    def get_run(self, run_id):
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))

    @staticmethod
    def logs(events):
        return [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]

    def statuses(self, sha, want, forge="github"):
        """Waits until the emulator took (201) the states want, in order, for
        sha; returns those calls."""
        def taken(calls):
            return [c for c in calls if c["forge"] == forge and c["path"].endswith("/" + sha)
                    and c["status"] == 201]
        calls = self.forge.wait_for(lambda cs: len(taken(cs)) >= len(want),
                                    "%s statuses %s of %s" % (forge, want, sha[:12]))
        got = taken(calls)
        assert_eq([c["body"]["state"] for c in got], want, "states sent for %s" % sha[:12])
        return got

    def wait_waiting(self, run_id, stage):
        stream = self.c.stream(P + "WatchRun", {"id": run_id}, timeout=120)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("stage") == stage and ev.get("stage_state") == "STAGE_STATE_WAITING":
                stream.cancel()
                return
        raise AssertionError("run %s ended before stage %s waited" % (run_id, stage))

    # -- tests ----------------------------------------------------------

    def ctl(self, *args):
        r = subprocess.run([self.kplctl, "--server", self.daemon.addr] + list(args),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError("kplctl %s: exit %d: %s" % (" ".join(args), r.returncode,
                                                            r.stderr))
        return r.stdout

    def test_registration(self):
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo, secret="GH_HOOK",
                                               pull_requests=True, status_token="NOPE"),
                         grpc.StatusCode.INVALID_ARGUMENT, "status_token: no secret NOPE")
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo, secret="GH_HOOK",
                                               fork_secrets=True),
                         grpc.StatusCode.INVALID_ARGUMENT, "fork_secrets: only with pull_requests")
        expect_rpc_error(lambda: self.register(name="x", repo=self.repo, secret="GH_HOOK",
                                               status_token="GH_TOKEN"),
                         grpc.StatusCode.INVALID_ARGUMENT, "status_token: only with pull_requests")
        # kplctl: every field, and show prints them; the token's name only.
        out = self.ctl("pipeline", "register", "viactl", "--repo", "https://github.com/a/b.git",
                       "--secret", "GH_HOOK", "--pull-requests", "--fork-secrets",
                       "--status-token", "${{ secrets.GH_TOKEN }}")
        assert_eq(out, "pipeline viactl registered\n", "kplctl pipeline register")
        shown = self.ctl("pipeline", "show", "viactl")
        for want in ("pull requests: yes, forks get secrets", "statuses:  token in secret GH_TOKEN"):
            if want not in shown:
                raise AssertionError("pipeline show lacks %r:\n%s" % (want, shown))
        if GH_TOKEN in shown:
            raise AssertionError("pipeline show prints the token")
        got = json.loads(self.ctl("pipeline", "show", "viactl", "-o", "json"))
        assert_eq((got.get("pull_requests"), got.get("fork_secrets"), got.get("status_token")),
                  (True, True, "GH_TOKEN"), "pipeline show -o json")
        self.ctl("pipeline", "delete", "viactl")

    def test_opened_runs_at_head_with_params_and_reports(self):
        sha = self.head_commit(7, PR_PIPELINE % ("v1", 0))
        status, body = self.github(self.github_pr("opened", 7, sha), "gh-open-7")
        assert_eq(status, 202, "status (%s)" % body)
        run_id = self.run_ids(body).get("prcheck")
        if not run_id or "mrcheck" in body:
            raise AssertionError("want one run, of prcheck: %r" % body)
        logs = self.logs(watch(self.c, run_id))
        assert_eq(logs, ["v1 pr=7 head=%s base=main from=feature" % sha], "the stage's output")
        run = self.get_run(run_id)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(run["params"], {"pr": "7", "head_sha": sha, "base_branch": "main",
                                  "head_branch": "feature"}, "params")
        assert_eq((run["source"]["commit"], run["source"]["ref"]), (sha, "refs/pull/7/head"),
                  "source")
        if run["source"].get("secrets_withheld"):
            raise AssertionError("a same-repository PR's run has its secrets withheld")
        calls = self.statuses(sha, ["pending", "success"])
        for c in calls:
            h = c["headers"]
            assert_eq(c["path"], "/repos/%s/statuses/%s" % (GH_REPO, sha), "path")
            assert_eq((h.get("authorization"), h.get("accept"), h.get("x-github-api-version")),
                      ("Bearer " + GH_TOKEN, "application/vnd.github+json", "2022-11-28"),
                      "GitHub headers")
            if not h.get("user-agent"):
                raise AssertionError("no User-Agent")
            assert_eq((c["body"]["context"], c["body"]["target_url"]),
                      ("kpl/prcheck", CONSOLE + "/#/runs/" + run_id), "context and target_url")
            if run_id not in c["body"]["description"]:
                raise AssertionError("description %r names no run" % c["body"]["description"])

    def test_synchronize_starts_another_and_redelivery_does_not(self):
        before = git(self.repo, "rev-parse", "refs/pull/7/head")
        sha = self.head_commit(7, PR_PIPELINE % ("v2", 0))
        body = self.github_pr("synchronize", 7, sha, before=before)
        status, text = self.github(body, "gh-sync-7")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        logs = self.logs(watch(self.c, run_id))
        assert_eq(logs, ["v2 pr=7 head=%s base=main from=feature" % sha], "output at the new head")
        # The same delivery again (GitHub's redelivery keeps its id and body).
        status, again = self.github(body, "gh-sync-7")
        assert_eq((status, self.run_ids(again).get("prcheck")), (202, run_id), "redelivery")
        if "seen before" not in again:
            raise AssertionError("the redelivery's answer does not say so: %r" % again)
        self.statuses(sha, ["pending", "success"])

    def test_closed_and_other_actions_start_nothing(self):
        before = len(self.runs_of("prcheck"))
        sha = git(self.repo, "rev-parse", "refs/pull/7/head")
        status, text = self.github(self.github_pr("closed", 7, sha), "gh-close-7")
        assert_eq(status, 200, "closed")
        if "action closed starts no run" not in text:
            raise AssertionError("the answer does not say why: %r" % text)
        status, text = self.github(b"{}", "gh-ping", event="ping")
        assert_eq(status, 200, "ping")
        assert_eq(len(self.runs_of("prcheck")), before, "runs after a closed PR")

    def test_gitlab_merge_request(self):
        sha = self.head_commit(3, PR_PIPELINE % ("mr", 0))
        status, text = self.gitlab(self.gitlab_mr("open", 3, sha), "gl-open-3")
        assert_eq(status, 202, "status (%s)" % text)
        if "prcheck" in text:
            raise AssertionError("a GitLab delivery started the GitHub registration: %r" % text)
        run_id = self.run_ids(text)["mrcheck"]
        assert_eq(self.logs(watch(self.c, run_id)),
                  ["mr pr=3 head=%s base=main from=feature" % sha], "the MR run's output")
        calls = self.statuses(sha, ["pending", "success"], forge="gitlab")
        for c in calls:
            assert_eq(c["path"], "/api/v4/projects/%s/statuses/%s" % (GL_PROJECT, sha), "path")
            assert_eq(c["headers"].get("private-token"), GL_TOKEN, "PRIVATE-TOKEN")
            assert_eq((c["body"]["name"], c["body"]["ref"], c["body"]["target_url"]),
                      ("kpl/mrcheck", "feature", CONSOLE + "/#/runs/" + run_id), "GitLab body")
        # An update that changed no code (no oldrev) starts nothing; one
        # with new commits does.
        before = len(self.runs_of("prcheck"))
        status, text = self.gitlab(self.gitlab_mr("update", 3, sha), "gl-upd-3a")
        assert_eq(status, 200, "update without oldrev (%s)" % text)
        assert_eq(len(self.runs_of("prcheck")), before, "runs after a metadata update")
        sha2 = self.head_commit(3, PR_PIPELINE % ("mr2", 0))
        status, text = self.gitlab(self.gitlab_mr("update", 3, sha2, oldrev=sha), "gl-upd-3b")
        assert_eq(status, 202, "update with oldrev (%s)" % text)
        assert_eq(self.logs(watch(self.c, self.run_ids(text)["mrcheck"])),
                  ["mr2 pr=3 head=%s base=main from=feature" % sha2], "after new commits")

    def test_fork_gets_no_secrets(self):
        sha = self.head_commit(8, FORK_PIPELINE, branch=None)
        if git(self.repo, "branch", "--contains", sha):
            raise AssertionError("the fork's commit is on a branch of the base repository")
        status, text = self.github(self.github_pr("opened", 8, sha, head_branch="patch-1",
                                                  fork=True), "gh-fork-8")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        events = watch(self.c, run_id)
        run = self.get_run(run_id)
        assert_eq(run["state"], "RUN_STATE_FAILED", "a fork's run that reads a secret")
        assert_eq(run["source"].get("secrets_withheld"), True, "source.secrets_withheld")
        stage = [s for s in run["stages"] if s["name"] == "leak"][0]
        for want in ("secrets.DEPLOY_KEY", "withheld", "fork"):
            if want not in stage.get("message", ""):
                raise AssertionError("the stage's message %r lacks %r" % (stage.get("message"),
                                                                         want))
        if any(DEPLOY_KEY in json.dumps(e) for e in events) or self.logs(events):
            raise AssertionError("the fork's run saw the secret or ran: %r" % events)
        self.statuses(sha, ["pending", "failure"])
        # fork_secrets: true gives them (the value redacted in the log).
        self.register(name="trusted", repo=self.repo, secret="GH_HOOK", pull_requests=True,
                      fork_secrets=True)
        try:
            status, text = self.github(self.github_pr("reopened", 8, sha, head_branch="patch-1",
                                                      fork=True), "gh-fork-8b")
            assert_eq(status, 202, "status (%s)" % text)
            run_id = self.run_ids(text)["trusted"]
            events = watch(self.c, run_id)
            assert_eq(self.get_run(run_id)["state"], "RUN_STATE_SUCCEEDED", "with fork_secrets")
            assert_eq(self.logs(events), ["key=***"], "the secret reached the run, redacted")
        finally:
            self.c.call(P + "DeletePipeline", {"name": "trusted"})

    def test_gitlab_fork_gets_no_secrets(self):
        sha = self.head_commit(13, FORK_PIPELINE, branch=None)
        status, text = self.gitlab(self.gitlab_mr("open", 13, sha, fork=True), "gl-fork-13")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["mrcheck"]
        events = watch(self.c, run_id)
        run = self.get_run(run_id)
        assert_eq((run["state"], run["source"].get("secrets_withheld")),
                  ("RUN_STATE_FAILED", True), "a fork MR's run")
        if any(DEPLOY_KEY in json.dumps(e) for e in events):
            raise AssertionError("the fork MR's run saw the secret")
        self.statuses(sha, ["pending", "failed"], forge="gitlab")

    def test_new_head_cancels_the_old_run_with_a_concurrency_group(self):
        sha1 = self.head_commit(14, GROUPED_PIPELINE)
        status, text = self.github(self.github_pr("opened", 14, sha1), "gh-open-14")
        assert_eq(status, 202, "status (%s)" % text)
        old = self.run_ids(text)["prcheck"]
        self.wait_waiting(old, "gate")
        sha2 = self.head_commit(14, GROUPED_PIPELINE + "# v2\n")
        status, text = self.github(self.github_pr("synchronize", 14, sha2, before=sha1),
                                   "gh-sync-14")
        assert_eq(status, 202, "status (%s)" % text)
        new = self.run_ids(text)["prcheck"]
        watch(self.c, old)
        assert_eq(self.get_run(old)["state"], "RUN_STATE_CANCELLED", "the old head's run")
        self.statuses(sha1, ["pending", "error"])
        self.wait_waiting(new, "gate")
        self.c.call(P + "ApproveStage", {"run_id": new, "stage": "gate", "approve": True,
                                         "by": "pr_test"})
        watch(self.c, new)
        self.statuses(sha2, ["pending", "success"])

    def test_failed_run_reports_failure(self):
        sha = self.head_commit(10, PR_PIPELINE % ("broken", 3))
        status, text = self.github(self.github_pr("opened", 10, sha), "gh-open-10")
        assert_eq(status, 202, "status (%s)" % text)
        watch(self.c, self.run_ids(text)["prcheck"])
        self.statuses(sha, ["pending", "failure"])

    def test_forge_500_is_retried(self):
        self.forge.fault(500, 2)
        sha = self.head_commit(9, PR_PIPELINE % ("retry", 0))
        status, text = self.github(self.github_pr("opened", 9, sha), "gh-open-9")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        watch(self.c, run_id)
        assert_eq(self.get_run(run_id)["state"], "RUN_STATE_SUCCEEDED", "run state")
        self.statuses(sha, ["pending", "success"])
        mine = [c for c in self.forge.snapshot() if c["path"].endswith(sha)]
        assert_eq([(c["status"], c["body"]["state"]) for c in mine],
                  [(500, "pending"), (500, "pending"), (201, "pending"), (201, "success")],
                  "calls for %s" % sha[:12])

    def test_rate_limit_waits_for_the_reset(self):
        self.forge.fault(403, 1)
        sha = self.head_commit(15, PR_PIPELINE % ("limited", 0))
        status, text = self.github(self.github_pr("opened", 15, sha), "gh-open-15")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        self.statuses(sha, ["pending", "success"])
        # The wait kpld planned: until x-ratelimit-reset (5 s after the
        # answer), not its first backoff (1000 ms).
        with open(self.daemon.log) as f:
            waits = re.findall(r"run %s: github status pending: try 1 of 6 failed: HTTP 403"
                               r"[^\n]*again in (\d+) ms" % run_id, f.read())
        assert_eq(len(waits), 1, "log lines of the rate-limited try")
        if not 1000 < int(waits[0]) <= 5000:
            raise AssertionError("planned wait %s ms, want the reset's (1000, 5000]" % waits[0])

    def test_cancelled_run_reports_error(self):
        sha = self.head_commit(12, GATED_PIPELINE)
        status, text = self.github(self.github_pr("opened", 12, sha), "gh-open-12")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        self.wait_waiting(run_id, "gate")
        self.c.call(P + "CancelRun", {"id": run_id})
        watch(self.c, run_id)
        assert_eq(self.get_run(run_id)["state"], "RUN_STATE_CANCELLED", "run state")
        # GitHub has no cancelled state: error ("did not finish").
        calls = self.statuses(sha, ["pending", "error"])
        if "cancelled" not in calls[1]["body"]["description"]:
            raise AssertionError("description %r" % calls[1]["body"]["description"])

    def test_kill9_before_the_final_status_then_restart_sends_it(self):
        sha = self.head_commit(11, GATED_PIPELINE)
        status, text = self.github(self.github_pr("opened", 11, sha), "gh-open-11")
        assert_eq(status, 202, "status (%s)" % text)
        run_id = self.run_ids(text)["prcheck"]
        self.statuses(sha, ["pending"])
        self.wait_waiting(run_id, "gate")
        # From now on the forge fails: the final status cannot get through.
        self.forge.fault(503, 1000)
        self.c.call(P + "ApproveStage", {"run_id": run_id, "stage": "gate", "approve": True,
                                         "by": "pr_test"})
        watch(self.c, run_id)
        assert_eq(self.get_run(run_id)["state"], "RUN_STATE_SUCCEEDED", "run state")
        self.forge.wait_for(lambda cs: any(c["path"].endswith(sha) and c["fault"] and
                                           c["body"]["state"] == "success" for c in cs),
                            "a failed try of the final status")
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(timeout=30)
        self.forge.fault(0, 0)
        self.start()
        self.statuses(sha, ["pending", "success"])


def main():
    binary, kplctl, emulator_py, fixtures = (os.path.abspath(a) for a in sys.argv[1:5])
    tmp = tempfile.mkdtemp(prefix="kpl-pr-")
    suite = Suite(binary, kplctl, emulator_py, fixtures, tmp)
    rc = 1
    try:
        rc = run_suite(Suite, suite)
    finally:
        if suite.daemon.proc:
            suite.daemon.stop()
        suite.close()
        if rc == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept %s (kpld.log there)" % tmp)
    sys.exit(rc)


if __name__ == "__main__":
    main()
