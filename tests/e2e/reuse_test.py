"""Matrix stages and stage templates (issue #13, Reuse): `kplctl lint` shows
the expansion and a template's diagnostic with both files' lines; a real run
of a matrix pipeline whose downstream stage waits for every instance while
max_parallel holds (measured from the recorded stage start and end times);
a template used through a registered pipeline run from a git repository and
through `kplctl submit` of a local file; the run records the templates it
used and keeps them across a restart; paths that would leave the repository
are refused.

    /usr/bin/python3 tests/e2e/reuse_test.py PATH/TO/kpld PATH/TO/kplctl \
        pipelines/examples/reuse.kpl.yaml

The example (with its template, examples/templates/announce.kpl.yaml) is
linted and run as it is.
"""

import hashlib
import os
import shutil
import socket
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

TEMPLATE = """description: deploy one environment
inputs:
  env: { type: string, required: true }
  replicas: { type: number, default: 2 }
stage:
  kind: script
  timeout: 5m
  with:
    shell: echo "deploying env=${{ inputs.env }} replicas=${{ inputs.replicas }} tpl=%s"
"""

# ci/release.kpl.yaml: the template is beside it, under templates/.
RELEASE = """name: release
stages:
  - name: prep
    kind: script
    with: { shell: "echo prep" }
  - name: build
    needs: prep
    matrix: { os: [linux, darwin], ver: [1, 2] }
    max_parallel: 2
    kind: script
    with: { shell: "echo build ${{ matrix.os }} ${{ matrix.ver }}; sleep 1" }
  - name: deploy
    needs: [build]
    uses: ./templates/deploy.kpl.yaml
    with: { env: "prod eu", replicas: 3 }
"""

SLOW = """name: slow-tpl
stages:
  - name: wait
    uses: ./templates/wait.kpl.yaml
    with: { seconds: 300 }
"""

WAIT_TEMPLATE = """inputs:
  seconds: { type: number, required: true }
stage:
  kind: script
  with: { shell: "echo waiting; exec sleep ${{ inputs.seconds }}" }
"""


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          capture_output=True, text=True).stdout.strip()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def ts(t):
    """A Timestamp from to_dict ("2026-11-25T01:19:56.287Z") in seconds."""
    import datetime
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


class Suite:
    def __init__(self, binary, kplctl, example, tmp):
        self.tmp = tmp
        self.example = example
        self.kplctl = kplctl
        self.work = os.path.join(tmp, "work")
        write(os.path.join(self.work, "ci", "release.kpl.yaml"), RELEASE)
        write(os.path.join(self.work, "ci", "templates", "deploy.kpl.yaml"), TEMPLATE % "local")
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "HOOK_KEY", "value": "hook-key-1234"})

    def ctl(self, *args, ok=True, server=None):
        r = subprocess.run([self.kplctl, "--server", server or self.daemon.addr] + list(args),
                           capture_output=True, text=True, timeout=120, cwd=self.work)
        if ok and r.returncode != 0:
            raise AssertionError("kplctl %s: exit %d\nstdout:\n%s\nstderr:\n%s"
                                 % (" ".join(args), r.returncode, r.stdout, r.stderr))
        return r

    def stages(self, run_id):
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))
        return got, {s["name"]: s for s in got["stages"]}

    # -- lint -------------------------------------------------------------

    def test_lint_shows_the_expansion(self):
        want = [
            "ci/release.kpl.yaml: ok",
            "ci/release.kpl.yaml: 6 stages once matrix and templates are expanded:",
            "  prep (script)",
            "  build[os=linux,ver=1] (script) needs: prep [matrix build, max_parallel 2]",
            "  build[os=linux,ver=2] (script) needs: prep [matrix build, max_parallel 2]",
            "  build[os=darwin,ver=1] (script) needs: prep [matrix build, max_parallel 2]",
            "  build[os=darwin,ver=2] (script) needs: prep [matrix build, max_parallel 2]",
            "  deploy (script) needs: build[os=linux,ver=1], build[os=linux,ver=2], "
            "build[os=darwin,ver=1], build[os=darwin,ver=2] [uses ./templates/deploy.kpl.yaml]",
        ]
        r = self.ctl("lint", "ci/release.kpl.yaml")
        assert_eq(r.stdout.splitlines(), want, "kplctl lint output")
        # Offline (nothing listens): the same parser, the same expansion.
        refuser = socket.socket()
        refuser.bind(("127.0.0.1", 0))
        off = self.ctl("lint", "ci/release.kpl.yaml",
                       server="127.0.0.1:%d" % refuser.getsockname()[1])
        refuser.close()
        assert_eq(off.stdout.splitlines(), want, "kplctl lint offline output")

    def test_lint_names_both_files(self):
        bad = RELEASE.replace('with: { env: "prod eu", replicas: 3 }',
                              'with: { replicas: many, region: eu }')
        write(os.path.join(self.work, "ci", "bad.kpl.yaml"), bad)
        r = self.ctl("lint", "ci/bad.kpl.yaml", ok=False)
        assert_eq(r.returncode, 1, "lint exit status of a bad file")
        got = r.stdout.splitlines()
        want = [
            'ci/templates/deploy.kpl.yaml:3:3: input "env" is required, and the stage that '
            'uses the template gives no with.env (used at ci/bad.kpl.yaml:14:11)',
            'ci/bad.kpl.yaml:15:23: stages[2].with.replicas: input "replicas" (declared at '
            'templates/deploy.kpl.yaml:4:3) is a number, found "many"',
            'ci/bad.kpl.yaml:15:29: stages[2].with.region: unknown input "region": '
            'templates/deploy.kpl.yaml declares env, replicas',
        ]
        assert_eq(got, want, "diagnostics of a bad use")
        # A path out of the directory, a URL: refused where `uses:` says it.
        esc = RELEASE.replace("./templates/deploy.kpl.yaml", "./../../etc/passwd")
        write(os.path.join(self.work, "ci", "esc.kpl.yaml"), esc)
        r = self.ctl("lint", "ci/esc.kpl.yaml", ok=False)
        if "ci/esc.kpl.yaml:14:11: stages[2].uses: \"./../../etc/passwd\": \"..\" would " \
           "leave the pipeline's directory" not in r.stdout:
            raise AssertionError("lint of ..: %r" % r.stdout)
        url = RELEASE.replace("./templates/deploy.kpl.yaml", "https://example.com/t.yaml")
        write(os.path.join(self.work, "ci", "url.kpl.yaml"), url)
        r = self.ctl("lint", "ci/url.kpl.yaml", ok=False)
        if "never from a URL" not in r.stdout:
            raise AssertionError("lint of a URL: %r" % r.stdout)

    def test_server_refuses_escaping_files(self):
        for path in ("../x.yaml", "/etc/passwd", "a/../../b", "https://h/x"):
            expect_rpc_error(lambda: self.c.call(P + "SubmitRun", {
                "pipeline": RELEASE, "files": {path: TEMPLATE}}),
                grpc.StatusCode.INVALID_ARGUMENT, "files[")
            expect_rpc_error(lambda: self.c.call(P + "ValidatePipeline", {
                "pipeline": RELEASE, "files": {path: TEMPLATE}}),
                grpc.StatusCode.INVALID_ARGUMENT, "files[")
        # Without its template the pipeline does not run.
        expect_rpc_error(lambda: self.c.call(P + "SubmitRun", {"pipeline": RELEASE}),
                         grpc.StatusCode.INVALID_ARGUMENT, "no such file beside the pipeline")

    # -- a real run: kplctl submit of a local file ------------------------

    def test_submit_runs_the_matrix_and_the_template(self):
        r = self.ctl("submit", "ci/release.kpl.yaml")
        run_id = r.stdout.strip()
        events = watch(self.c, run_id)
        run, st = self.stages(run_id)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        names = [s["name"] for s in run["stages"]]
        assert_eq(names, ["prep", "build[os=linux,ver=1]", "build[os=linux,ver=2]",
                          "build[os=darwin,ver=1]", "build[os=darwin,ver=2]", "deploy"],
                  "the run's stages")
        # Events name the instances.
        seen = {e.get("stage") for e in events if e.get("kind") == "EVENT_KIND_STAGE_STATE"}
        if not set(names) <= seen:
            raise AssertionError("stage events lack instances: %r" % seen)
        logs = [(e.get("stage"), e.get("message")) for e in events
                if e.get("kind") == "EVENT_KIND_LOG"]
        if ("build[os=darwin,ver=2]", "build darwin 2") not in logs:
            raise AssertionError("matrix values not in the log: %r" % logs)
        if ("deploy", "deploying env=prod eu replicas=3 tpl=local") not in logs:
            raise AssertionError("template's stage did not run with its inputs: %r" % logs)
        # deploy waits for every instance; at most 2 instances at once.
        builds = [st[n] for n in names if n.startswith("build[")]
        last_end = max(ts(b["finished_at"]) for b in builds)
        if not ts(st["deploy"]["started_at"]) >= last_end:
            raise AssertionError("deploy started %s before the last build ended %s"
                                 % (st["deploy"]["started_at"], last_end))
        # An instance starts only once another's end is recorded: at equal
        # times the end comes first.
        points = sorted([(ts(b["started_at"]), 1) for b in builds] +
                        [(ts(b["finished_at"]), -1) for b in builds])
        level = peak = 0
        for _, d in points:
            level += d
            peak = max(peak, level)
        # Two start in the same scheduling pass, before either can end.
        if peak != 2:
            raise AssertionError("%d instances ran at once, want max_parallel's 2: %r"
                                 % (peak, [(b["name"], b["started_at"], b["finished_at"])
                                           for b in builds]))
        assert_eq(st["deploy"]["needs"], names[1:5], "deploy's recorded needs")
        # The run records the template it used.
        src = run["source"]
        tpl_text = TEMPLATE % "local"
        assert_eq(src.get("templates"), [{"path": "templates/deploy.kpl.yaml",
                                          "sha256": hashlib.sha256(tpl_text.encode()).hexdigest()}],
                  "source.templates")
        text = Client.to_dict(self.c.call(P + "GetRunPipeline", {"id": run_id}))
        assert_eq(text["pipeline"], RELEASE, "GetRunPipeline text")
        assert_eq(text["templates"][0]["text"], tpl_text, "GetRunPipeline template text")

    def test_failed_instance_fails_the_run(self):
        text = RELEASE.replace("sleep 1", "test ${{ matrix.os }} != darwin")
        run = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": text, "files": {"templates/deploy.kpl.yaml": TEMPLATE % "x"}}))
        watch(self.c, run["id"])
        got, st = self.stages(run["id"])
        assert_eq(got["state"], "RUN_STATE_FAILED", "run with a failed instance")
        assert_eq(st["deploy"]["state"], "STAGE_STATE_SKIPPED", "downstream of a failed instance")
        assert_eq(st["build[os=linux,ver=1]"]["state"], "STAGE_STATE_SUCCEEDED", "a good instance")
        if not got["message"].startswith("stage build[os=darwin,ver="):
            raise AssertionError("run message: %r" % got["message"])

    # -- a registered pipeline from a git repository ----------------------

    def test_registered_pipeline_reads_the_template_at_its_commit(self):
        repo = os.path.join(self.tmp, "app")
        os.makedirs(repo)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.email", "t@example.com")
        git(repo, "config", "user.name", "t")
        write(os.path.join(repo, "ci", "release.kpl.yaml"), RELEASE.replace("; sleep 1", ""))
        write(os.path.join(repo, "ci", "templates", "deploy.kpl.yaml"), TEMPLATE % "v1")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "v1")
        sha1 = git(repo, "rev-parse", "HEAD")
        write(os.path.join(repo, "ci", "templates", "deploy.kpl.yaml"), TEMPLATE % "v2")
        git(repo, "commit", "-q", "-am", "v2")
        self.c.call(P + "RegisterPipeline", {"name": "release", "repo": repo,
                                             "path": "ci/release.kpl.yaml",
                                             "secret": "HOOK_KEY"})
        ids = []
        for ref, want in (({"ref": "main"}, "v2"), ({"sha": sha1}, "v1")):
            run = Client.to_dict(self.c.call(P + "RunPipeline", dict(name="release", **ref)))
            ids.append(run["id"])
            events = watch(self.c, run["id"])
            got, _ = self.stages(run["id"])
            assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "registered run at %r" % ref)
            logs = [e.get("message") for e in events if e.get("stage") == "deploy"
                    and e.get("kind") == "EVENT_KIND_LOG"]
            line = "deploying env=prod eu replicas=3 tpl=%s" % want
            if line not in logs:
                raise AssertionError("at %r the template of its commit did not run: %r"
                                     % (ref, logs))
            assert_eq(got["source"]["templates"][0]["sha256"],
                      hashlib.sha256((TEMPLATE % want).encode()).hexdigest(),
                      "template sha256 at %r" % ref)
        # kplctl get names the template; kplctl diff shows what changed in
        # it (the pipeline files are the same).
        sha_v2 = hashlib.sha256((TEMPLATE % "v2").encode()).hexdigest()
        got = self.ctl("get", ids[0]).stdout
        if "template:  templates/deploy.kpl.yaml %s\n" % sha_v2 not in got:
            raise AssertionError("kplctl get lacks the template: %s" % got)
        d = self.ctl("diff", ids[0], ids[1], ok=False)
        assert_eq(d.returncode, 1, "kplctl diff exit status of differing templates")
        lines = d.stdout.splitlines()
        for want in ("--- %s:templates/deploy.kpl.yaml" % ids[0],
                     "+++ %s:templates/deploy.kpl.yaml" % ids[1],
                     "-    shell: echo \"deploying env=${{ inputs.env }} replicas=${{ "
                     "inputs.replicas }} tpl=v2\"",
                     "+    shell: echo \"deploying env=${{ inputs.env }} replicas=${{ "
                     "inputs.replicas }} tpl=v1\""):
            if want not in lines:
                raise AssertionError("kplctl diff lacks %r:\n%s" % (want, d.stdout))
        if any(line.startswith("--- %s (" % ids[0]) for line in lines):
            raise AssertionError("the pipeline files are equal, yet diffed:\n%s" % d.stdout)
        # A template missing at that commit: the run is refused, naming the line.
        git(repo, "rm", "-q", "ci/templates/deploy.kpl.yaml")
        git(repo, "commit", "-q", "-m", "gone")
        expect_rpc_error(lambda: self.c.call(P + "RunPipeline", {"name": "release",
                                                                "ref": "main"}),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         "ci/release.kpl.yaml:14:11: stages[2].uses")

    # -- the documented example ------------------------------------------

    def test_example_runs_as_it_is(self):
        # A copy keeps the layout: the pipeline, and templates/ beside it.
        ex = os.path.join(self.tmp, "example")
        os.makedirs(os.path.join(ex, "templates"))
        shutil.copy(self.example, os.path.join(ex, "reuse.kpl.yaml"))
        shutil.copy(os.path.join(os.path.dirname(self.example), "templates",
                                 "announce.kpl.yaml"), os.path.join(ex, "templates"))
        lint = self.ctl("lint", os.path.join(ex, "reuse.kpl.yaml")).stdout
        for want in ("  test[os=debian,python=3.11] (script) [matrix test, max_parallel 2]",
                     "  ship (script) needs: test[os=debian,python=3.11], "
                     "test[os=debian,python=3.12], test[os=alpine,python=3.12] "
                     "[uses ./templates/announce.kpl.yaml]"):
            if want not in lint.splitlines():
                raise AssertionError("lint of the example lacks %r:\n%s" % (want, lint))
        r = self.ctl("submit", os.path.join(ex, "reuse.kpl.yaml"), "-p", "version=2.0")
        run_id = r.stdout.strip()
        events = watch(self.c, run_id)
        got, _ = self.stages(run_id)
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "the example's run")
        logs = [(e.get("stage"), e.get("message")) for e in events
                if e.get("kind") == "EVENT_KIND_LOG"]
        for want in (("test[os=alpine,python=3.12]", "testing 2.0 on alpine with python 3.12"),
                     ("ship", "shipped version 2.0")):
            if want not in logs:
                raise AssertionError("the example's log lacks %r: %r" % (want, logs))
        assert_eq(sum(1 for st, m in logs if st == "ship" and m == "shipped version 2.0"), 2,
                  "ship's lines (times: 2)")

    # -- restarts ---------------------------------------------------------

    def test_templates_survive_a_restart(self):
        run = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": SLOW, "files": {"templates/wait.kpl.yaml": WAIT_TEMPLATE}}))
        wait_for_log(self.c, run["id"])
        assert_eq(self.daemon.stop(), 0, "kpld exit status")
        self.c = self.daemon.start()
        # The run came back: its pipeline parsed again with its template.
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "the recovered run, cancelled")
        assert_eq(got["source"]["templates"][0]["path"], "templates/wait.kpl.yaml",
                  "templates after a restart")
        text = Client.to_dict(self.c.call(P + "GetRunPipeline", {"id": run["id"]}))
        assert_eq(text["templates"][0]["text"], WAIT_TEMPLATE, "template text after a restart")

    def close(self):
        rc = self.daemon.stop()
        assert_eq(rc, 0, "kpld exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    kplctl = os.path.abspath(sys.argv[2])
    example = os.path.abspath(sys.argv[3])
    tmp = tempfile.mkdtemp(prefix="kpl-reuse-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, kplctl, example, tmp))


if __name__ == "__main__":
    sys.exit(main())
