"""The checkout kind and the build kind's local driver, end to end: a real git
repository made here, real git, a static binary compiled by a script stage,
a real multi-stage Dockerfile built by buildah into an OCI layout.

    /usr/bin/python3 tests/e2e/build_local_test.py PATH/TO/kpld

Needs git, gcc (with a static libc) and buildah (vfs storage, chroot
isolation: root, no daemon, no network: every image is FROM scratch).
"""

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import (P, Client, Daemon, assert_eq, expect_rpc_error,  # noqa: E402
                      run_suite, submit, wait_for_log, watch)
from fault_proxy import FaultProxy  # noqa: E402
from git_server import GitServer  # noqa: E402

GIT_TOKEN = "kpl-git-token-5e81c2d9"
WRONG_TOKEN = "kpl-wrong-token-0b7a44"

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	if (argc > 1) { /* the sleeper: prints, then waits to be stopped */
		printf("kpl-sleeper sleeping\n");
		fflush(stdout);
		sleep(atoi(argv[1]));
		return 0;
	}
	printf("hello from kpl\n");
	return 0;
}
"""

DOCKERFILE = """\
ARG GREETING=none
FROM scratch AS base
ARG GREETING
COPY out/hello /bin/hello
LABEL kpl.greeting=$GREETING

FROM base
COPY --from=base /bin/hello /app/hello
"""

PIPELINE = """
name: image
params:
  repo: { required: true }
stages:
  - name: src
    kind: checkout
    with: { repo: "${{ params.repo }}", ref: main, depth: 1 }
  - name: compile
    kind: script
    needs: [src]
    with:
      workdir: src
      shell: |
        set -e
        mkdir -p out
        gcc -static -O2 -o out/hello hello.c
        ./out/hello
  - name: image
    kind: build
    needs: [compile]
    with:
      driver: local
      context: src
      args: { GREETING: "hi-${{ stages.src.outputs.short_sha }}" }
      output: oci/app
"""


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def get(c, run_id):
    return Client.to_dict(c.call(P + "GetRun", {"id": run_id}))


def stage(run, name):
    for s in run["stages"]:
        if s["name"] == name:
            return s
    raise AssertionError("no stage %s" % name)


def run_to_end(c, text, params=None):
    run = Client.to_dict(submit(c, text, params))
    events = watch(c, run["id"])
    return get(c, run["id"]), events


def logs(events, stage_name):
    return [e.get("message", "") for e in events
            if e.get("kind") == "EVENT_KIND_LOG" and e.get("stage") == stage_name]


def procs_matching(text):
    """pids whose command line holds text."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % d) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if text in cmd:
            out.append((int(d), cmd))
    return out


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.make_repo()

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def ws(self, run_id, *p):
        return self.path("data", "work", run_id, *p)

    def make_repo(self):
        """main: c1 (tag v1, annotated) -> c2; branch feature: c1 -> c3."""
        up = self.path("up")
        os.makedirs(up)
        env_cfg = ["-c", "user.name=kpl", "-c", "user.email=kpl@example.com"]
        git("init", "-q", "-b", "main", up)
        with open(os.path.join(up, "hello.c"), "w") as f:
            f.write(HELLO_C)
        with open(os.path.join(up, "Dockerfile"), "w") as f:
            f.write(DOCKERFILE)
        git("add", ".", cwd=up)
        git(*env_cfg, "commit", "-q", "-m", "c1", cwd=up)
        git(*env_cfg, "tag", "-a", "v1", "-m", "v1", cwd=up)
        git("checkout", "-q", "-b", "feature", cwd=up)
        with open(os.path.join(up, "feature.txt"), "w") as f:
            f.write("feature\n")
        git("add", ".", cwd=up)
        git(*env_cfg, "commit", "-q", "-m", "c3", cwd=up)
        git("checkout", "-q", "main", cwd=up)
        with open(os.path.join(up, "second.txt"), "w") as f:
            f.write("second\n")
        git("add", ".", cwd=up)
        git(*env_cfg, "commit", "-q", "-m", "c2", cwd=up)
        self.repo = "file://" + up
        self.c1 = git("rev-parse", "v1^{commit}", cwd=up)
        self.c2 = git("rev-parse", "main", cwd=up)
        self.c3 = git("rev-parse", "feature", cwd=up)
        assert len({self.c1, self.c2, self.c3}) == 3

    # -- checkout -------------------------------------------------------

    def test_checkout_branch_tag_sha(self):
        text = """
name: co
params:
  repo: { required: true }
  sha: { required: true }
stages:
  - { name: main, kind: checkout, with: { repo: "${{ params.repo }}", ref: main, path: m } }
  - { name: feature, kind: checkout, with: { repo: "${{ params.repo }}", ref: feature, path: f } }
  - { name: tag, kind: checkout, with: { repo: "${{ params.repo }}", ref: v1, depth: 1, path: t } }
  - { name: sha, kind: checkout, with: { repo: "${{ params.repo }}", ref: "${{ params.sha }}", depth: 1, path: s } }
  - { name: full, kind: checkout, with: { repo: "${{ params.repo }}", ref: feature, depth: 0, path: all } }
"""
        run, events = run_to_end(self.c, text, {"repo": self.repo, "sha": self.c1})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" %
                  [(s["name"], s.get("message")) for s in run["stages"]])
        want = {"main": (self.c2, "main", "m"), "feature": (self.c3, "feature", "f"),
                "tag": (self.c1, "v1", "t"), "sha": (self.c1, self.c1, "s"),
                "full": (self.c3, "feature", "all")}
        for name, (sha, ref, path) in want.items():
            out = stage(run, name)["outputs"]
            assert_eq(out, {"sha": sha, "short_sha": sha[:12], "ref": ref},
                      "outputs of %s" % name)
            d = self.ws(run["id"], path)
            assert_eq(git("rev-parse", "HEAD", cwd=d), sha, "HEAD of %s" % path)
            count = git("rev-list", "--count", "HEAD", cwd=d)
            assert_eq(count, "2" if name == "full" else "1", "history depth of %s" % name)
        lines = logs(events, "main")
        if not any(line.startswith("$ git -c protocol.ext.allow=never "
                                   "-c protocol.file.allow=user -C m fetch --no-tags "
                                   "--depth=1 origin main")
                   for line in lines):
            raise AssertionError("the fetch was not logged: %r" % lines)

    def test_checkout_sha_falls_back_to_full_fetch(self):
        # Protocol v0 without allowReachableSHA1InWant refuses a sha that no
        # ref points at: the kind fetches everything and checks the sha out.
        text = """
name: co-v0
params:
  repo: { required: true }
  sha: { required: true }
env: { GIT_CONFIG_COUNT: "1", GIT_CONFIG_KEY_0: protocol.version, GIT_CONFIG_VALUE_0: "0" }
stages:
  - { name: sha, kind: checkout, with: { repo: "${{ params.repo }}", ref: "${{ params.sha }}" } }
"""
        run, events = run_to_end(self.c, text, {"repo": self.repo, "sha": self.c1})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" %
                  stage(run, "sha").get("message"))
        assert_eq(stage(run, "sha")["outputs"]["sha"], self.c1, "sha")
        lines = logs(events, "sha")
        if not any("fetching every branch and tag instead" in line for line in lines):
            raise AssertionError("no fallback note in %r" % lines)
        assert_eq(git("rev-parse", "HEAD", cwd=self.ws(run["id"], "src")), self.c1, "HEAD")

    def test_checkout_unknown_ref_fails_with_gits_message(self):
        text = """
name: co-bad
params:
  repo: { required: true }
stages:
  - { name: bad, kind: checkout, with: { repo: "${{ params.repo }}", ref: no-such-branch } }
"""
        run, _ = run_to_end(self.c, text, {"repo": self.repo})
        st = stage(run, "bad")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        msg = st.get("message", "")
        if "git fetch failed" not in msg or "no-such-branch" not in msg:
            raise AssertionError("message %r does not say why" % msg)
        # A repository that is not there: git's first "fatal:" line says
        # so (its last line is advice: "... and the repository exists.").
        missing = self.path("no-such-repo")
        run, _ = run_to_end(self.c, text.replace("ref: no-such-branch", "ref: main"),
                            {"repo": missing})
        msg = stage(run, "bad").get("message", "")
        want = "git fetch failed (exit status 128): fatal: '%s' does not appear to be a git repository" % missing
        assert_eq(msg, want, "message of a missing repository")

    def test_checkout_refuses_credentials_in_url(self):
        text = """
name: co-creds
stages:
  - { name: c, kind: checkout, with: { repo: "https://bob:hunter2@git.example.com/app.git" } }
"""
        e = expect_rpc_error(lambda: submit(self.c, text), grpc.StatusCode.INVALID_ARGUMENT,
                             "secrets.NAME")
        if "hunter2" in (e.details() or ""):
            raise AssertionError("the password is in the error: %r" % e.details())
        # Through a parameter, the check happens at start.
        text = """
name: co-creds2
params: { repo: { required: true } }
stages:
  - { name: c, kind: checkout, with: { repo: "${{ params.repo }}" } }
"""
        run, events = run_to_end(self.c, text,
                                 {"repo": "https://bob:hunter2@git.example.com/app.git"})
        st = stage(run, "c")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        if "secrets.NAME" not in st.get("message", ""):
            raise AssertionError("message %r" % st.get("message"))

    def test_checkout_refuses_remote_helpers_and_tokens(self):
        for repo, why in (("ext::sh -c touch% /tmp/kpl-ext-pwned", "remote helper"),
                          ("fd::3", "remote helper"),
                          ("https://ghp_TOKEN123@git.example.com/app.git", "credentials"),
                          ("git://TOKEN123@git.example.com/app.git", "credentials")):
            text = """
name: co-helper
stages:
  - { name: c, kind: checkout, with: { repo: "%s" } }
""" % repo
            e = expect_rpc_error(lambda: submit(self.c, text),
                                 grpc.StatusCode.INVALID_ARGUMENT, why)
            if "TOKEN123" in (e.details() or ""):
                raise AssertionError("the token is in the error: %r" % e.details())
        # ssh users and local paths stay allowed (the daemon operator's own
        # repositories; docs/stages.md).
        for repo in ("ssh://git@git.example.com/app.git", "git@git.example.com:app.git",
                     self.repo, self.repo[len("file://"):]):
            text = """
name: co-ok
stages:
  - { name: c, kind: checkout, with: { repo: "%s" } }
""" % repo
            got = Client.to_dict(self.c.call(P + "ValidatePipeline", {"pipeline": text}))
            assert_eq(got.get("valid"), True, "%s (%r)" % (repo, got.get("diagnostics")))

    def test_checkout_submodule_transports(self):
        # A repository whose submodule URL is ext:: (runs a command) or a
        # local path: git refuses both for a submodule even when the git
        # config the stage sees allows them (GIT_CONFIG_* in the pipeline's
        # env stands for a user's ~/.gitconfig).
        marker = self.path("ext-ran")
        sub = self.path("sub-up")
        git("init", "-q", "-b", "main", sub)
        git("-c", "user.name=kpl", "-c", "user.email=kpl@example.com", "commit", "-q",
            "--allow-empty", "-m", "s", cwd=sub)
        sub_sha = git("rev-parse", "HEAD", cwd=sub)
        for name, url in (("ext", "ext::sh -c touch% " + marker), ("file", sub)):
            up = self.path("super-" + name)
            git("init", "-q", "-b", "main", up)
            with open(os.path.join(up, ".gitmodules"), "w") as f:
                f.write('[submodule "s"]\n\tpath = s\n\turl = %s\n' % url)
            git("add", ".gitmodules", cwd=up)
            git("update-index", "--add", "--cacheinfo", "160000,%s,s" % sub_sha, cwd=up)
            git("-c", "user.name=kpl", "-c", "user.email=kpl@example.com", "commit", "-q",
                "-m", "super", cwd=up)
            text = """
name: co-sub-%s
params: { repo: { required: true } }
env:
  GIT_CONFIG_COUNT: "2"
  GIT_CONFIG_KEY_0: protocol.ext.allow
  GIT_CONFIG_VALUE_0: always
  GIT_CONFIG_KEY_1: protocol.file.allow
  GIT_CONFIG_VALUE_1: always
stages:
  - { name: c, kind: checkout, with: { repo: "${{ params.repo }}", submodules: true } }
""" % name
            run, events = run_to_end(self.c, text, {"repo": "file://" + up})
            st = stage(run, "c")
            assert_eq(st["state"], "STAGE_STATE_FAILED",
                      "a %s submodule (%s)" % (name, st.get("message")))
            if "not allowed" not in " ".join(logs(events, "c")) + st.get("message", ""):
                raise AssertionError("git did not say the transport is not allowed: %r"
                                     % logs(events, "c")[-5:])
        if os.path.exists(marker):
            raise AssertionError("an ext:: submodule ran its command")

    def http_repos(self):
        """Bare repositories sub.git and super.git (whose submodule s is
        sub.git, by URL) behind a git HTTP server with basic auth; returns
        (server, super's sha, sub's sha)."""
        if getattr(self, "git_http", None):
            return self.git_http
        root = self.path("http-root")
        os.makedirs(root)
        cfg = ["-c", "user.name=kpl", "-c", "user.email=kpl@example.com"]
        srv = GitServer(root, "x-access-token", GIT_TOKEN)
        work = self.path("http-sub")
        git("init", "-q", "-b", "main", work)
        with open(os.path.join(work, "sub.txt"), "w") as f:
            f.write("from the submodule\n")
        git("add", ".", cwd=work)
        git(*cfg, "commit", "-q", "-m", "sub", cwd=work)
        sub_sha = git("rev-parse", "HEAD", cwd=work)
        git("clone", "-q", "--bare", work, os.path.join(root, "sub.git"))
        work = self.path("http-super")
        git("init", "-q", "-b", "main", work)
        with open(os.path.join(work, ".gitmodules"), "w") as f:
            f.write('[submodule "s"]\n\tpath = s\n\turl = %s/sub.git\n' % srv.url)
        with open(os.path.join(work, "top.txt"), "w") as f:
            f.write("top\n")
        git("add", ".", cwd=work)
        git("update-index", "--add", "--cacheinfo", "160000,%s,s" % sub_sha, cwd=work)
        git(*cfg, "commit", "-q", "-m", "super", cwd=work)
        super_sha = git("rev-parse", "HEAD", cwd=work)
        git("clone", "-q", "--bare", work, os.path.join(root, "super.git"))
        self.c.call(P + "SetSecret", {"name": "GIT_TOKEN", "value": GIT_TOKEN})
        self.c.call(P + "SetSecret", {"name": "WRONG_TOKEN", "value": WRONG_TOKEN})
        self.git_http = (srv, super_sha, sub_sha)
        return self.git_http

    def test_checkout_token_and_submodules_over_http(self):
        # The token reaches git only through GIT_ASKPASS: the server sees
        # it, no command line ever holds it (scanned while git talks to
        # the server), and no event, log or file of kpld's does.
        srv, super_sha, sub_sha = self.http_repos()
        text = """
name: co-http
params: { repo: { required: true } }
stages:
  - name: c
    kind: checkout
    with: { repo: "${{ params.repo }}", token: "${{ secrets.GIT_TOKEN }}", submodules: true }
  - name: plain
    kind: checkout
    with: { repo: "${{ params.repo }}", token: "${{ secrets.GIT_TOKEN }}", path: plain }
"""
        run, events = run_to_end(self.c, text, {"repo": srv.url + "/super.git"})
        st = stage(run, "c")
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s; %s)" % (st.get("message"), logs(events, "c")[-3:]))
        assert_eq(st["outputs"].get("sha"), super_sha, "sha output")
        with open(self.ws(run["id"], "src", "s", "sub.txt")) as f:
            assert_eq(f.read(), "from the submodule\n", "the submodule's file")
        assert_eq(git("rev-parse", "HEAD", cwd=self.ws(run["id"], "src", "s")), sub_sha,
                  "the submodule's commit")
        if not any(l.startswith("$ git") and "submodule update --init --recursive" in l
                   for l in logs(events, "c")):
            raise AssertionError("no submodule update logged: %r" % logs(events, "c"))
        # submodules left out: the submodule's directory stays empty.
        assert_eq(os.listdir(self.ws(run["id"], "plain", "s")), [], "s without submodules")
        if any("submodule" in l for l in logs(events, "plain")):
            raise AssertionError("submodules updated though not asked: %r"
                                 % logs(events, "plain"))

        paths = {(m, p.split("/")[1], how) for m, p, how in srv.requests}
        for repo in ("super.git", "sub.git"):
            if ("GET", repo, "ok") not in paths:
                raise AssertionError("no authenticated request for %s: %r"
                                     % (repo, srv.requests))
        assert_eq([how for _, _, how in srv.requests if how == "wrong"], [],
                  "requests with wrong credentials")
        assert_eq(srv.argv_hits, [], "command lines holding the token")
        self.assert_token_nowhere(run["id"], events, GIT_TOKEN)

    def assert_token_nowhere(self, run_id, events, token):
        if token in json.dumps(events) or token in json.dumps(get(self.c, run_id)):
            raise AssertionError("the token is in an event or the run")
        with open(self.daemon.log) as f:
            if token in f.read():
                raise AssertionError("the token is in kpld's log")
        for root, _, files in os.walk(self.ws(run_id)):
            for fn in files:
                with open(os.path.join(root, fn), "rb") as f:
                    if token.encode() in f.read():
                        raise AssertionError("the token is in %s" % os.path.join(root, fn))

    def test_checkout_restarts_a_step_kpld_never_began(self):
        # kpld killed between two checkout steps (the resume record names
        # fetch, whose shim never started): the attempt starts again from
        # its first step (each acts only on the workspace) and the run
        # succeeds; it used to fail "interrupted by restart".
        srv, super_sha, _ = self.http_repos()
        proxy = FaultProxy(srv.url)
        # fetch waits at its first request until the rule is cleared
        proxy.add(contains="git-upload-pack", count=-1, delay=300)
        text = """
name: co-restart
params: { repo: { required: true } }
stages:
  - name: c
    kind: checkout
    with: { repo: "${{ params.repo }}", token: "${{ secrets.GIT_TOKEN }}" }
"""
        try:
            run = Client.to_dict(submit(self.c, text, {"repo": proxy.url + "/super.git"}))
            deadline = time.monotonic() + 60
            while not proxy.count(contains="git-upload-pack"):
                if time.monotonic() > deadline:
                    raise AssertionError("git never asked the server")
                time.sleep(0.05)
            step = self.ws(run["id"], ".kpl", "c.1", "2-fetch")
            assert os.path.isdir(step), step
            assert_eq(self.daemon.stop(signal.SIGKILL), -signal.SIGKILL, "kpld killed")
            # Make it as if kpld died just before fetch's shim began: no
            # process, no step directory (the resume record names fetch).
            ws = self.ws(run["id"])
            for pid, _ in procs_matching(run["id"]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for d in os.listdir("/proc"):
                try:
                    if d.isdigit() and os.readlink("/proc/%s/cwd" % d).startswith(ws):
                        os.kill(int(d), signal.SIGKILL)
                except OSError:
                    pass
            shutil.rmtree(step)
            proxy.clear()
            self.c = self.daemon.start()
            events = watch(self.c, run["id"])
            run = get(self.c, run["id"])
        finally:
            proxy.clear()
            proxy.stop()
        st = stage(run, "c")
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("sha"), super_sha, "sha output")
        assert_eq(int(st.get("attempt", 0)), 2, "the attempt started again")
        msgs = [e.get("message", "") for e in events if e.get("stage") == "c"]
        want = ("restarting: kpld stopped before the attempt began "
                "(kpld stopped while starting step fetch)")
        if want not in msgs:
            raise AssertionError("no %r among %r" % (want, msgs))
        if any("interrupted by restart" in m for m in msgs):
            raise AssertionError("the attempt failed: %r" % msgs)

    def test_checkout_wrong_or_no_token(self):
        srv, _, _ = self.http_repos()
        before = len(srv.requests)
        text = """
name: co-http-bad
params: { repo: { required: true } }
stages:
  - name: c
    kind: checkout
    with: { repo: "${{ params.repo }}"%s }
"""
        run, events = run_to_end(self.c, text % ', token: "${{ secrets.WRONG_TOKEN }}"',
                                 {"repo": srv.url + "/super.git"})
        st = stage(run, "c")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "with a wrong token")
        if "Authentication failed for '%s/super.git/'" % srv.url not in st.get("message", ""):
            raise AssertionError("not git's message: %r" % st.get("message"))
        self.assert_token_nowhere(run["id"], events, WRONG_TOKEN)
        run, _ = run_to_end(self.c, text % "", {"repo": srv.url + "/super.git"})
        st = stage(run, "c")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "without a token")
        if "terminal prompts disabled" not in st.get("message", ""):
            raise AssertionError("without a token, not git's message: %r" % st.get("message"))
        hows = {how for _, _, how in srv.requests[before:]}
        if "wrong" not in hows:
            raise AssertionError("the wrong token never reached the server: %r"
                                 % srv.requests[before:])
        assert_eq(srv.argv_hits, [], "command lines holding the token")

    # -- build, driver local ----------------------------------------------

    def test_build_local_image(self):
        run, events = run_to_end(self.c, PIPELINE, {"repo": self.repo})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" %
                  [(s["name"], s.get("message")) for s in run["stages"]])
        assert_eq(logs(events, "compile")[-1], "hello from kpl", "the binary ran")
        out = stage(run, "image")["outputs"]
        layout = self.ws(run["id"], "oci", "app")
        assert_eq(out.get("image_dir"), layout, "image_dir")
        with open(os.path.join(layout, "oci-layout")) as f:
            assert_eq(json.load(f)["imageLayoutVersion"], "1.0.0", "oci-layout")
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        assert_eq(len(index["manifests"]), 1, "manifests in index.json")
        digest = index["manifests"][0]["digest"]
        assert_eq(out.get("digest"), digest, "digest output = index.json's")

        def blob(d):
            algo, hexd = d.split(":")
            with open(os.path.join(layout, "blobs", algo, hexd), "rb") as f:
                return f.read()
        manifest = json.loads(blob(digest))
        config = json.loads(blob(manifest["config"]["digest"]))
        src = stage(run, "src")["outputs"]["short_sha"]
        assert_eq(config["config"]["Labels"].get("kpl.greeting"), "hi-" + src,
                  "the build arg reached the image")
        names = set()
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                for m in t.getmembers():
                    names.add(m.name.lstrip("./"))
                    if m.name.lstrip("./") == "app/hello":
                        got = t.extractfile(m).read()
                        with open(self.ws(run["id"], "src", "out", "hello"), "rb") as f:
                            assert_eq(got == f.read(), True, "app/hello is the binary")
        if "app/hello" not in names:
            raise AssertionError("no app/hello in the layers: %r" % sorted(names))
        lines = logs(events, "image")
        if not any(line.startswith("$ buildah") and " bud " in line for line in lines):
            raise AssertionError("buildah bud not logged: %r" % lines[:5])

    def test_build_local_target(self):
        # target: base stops at the Dockerfile's first stage: /bin/hello
        # and its label are there, the last stage's /app/hello is not.
        text = PIPELINE.replace("output: oci/app", "output: oci/base\n      target: base")
        run, events = run_to_end(self.c, text, {"repo": self.repo})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" %
                  [(s["name"], s.get("message")) for s in run["stages"]])
        layout = self.ws(run["id"], "oci", "base")

        def blob(d):
            algo, hexd = d.split(":")
            with open(os.path.join(layout, "blobs", algo, hexd), "rb") as f:
                return f.read()
        with open(os.path.join(layout, "index.json")) as f:
            manifest = json.loads(blob(json.load(f)["manifests"][0]["digest"]))
        names = set()
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                names |= {m.name.lstrip("./") for m in t.getmembers()}
        assert_eq(("bin/hello" in names, "app/hello" in names), (True, False),
                  "the base stage's file, not the last stage's (layers: %r)" % sorted(names))
        config = json.loads(blob(manifest["config"]["digest"]))
        src = stage(run, "src")["outputs"]["short_sha"]
        assert_eq(config["config"]["Labels"].get("kpl.greeting"), "hi-" + src, "base's label")
        if not any(l.startswith("$ buildah") and "--target base" in l
                   for l in logs(events, "image")):
            raise AssertionError("--target base not on the logged buildah line: %r"
                                 % logs(events, "image")[:3])

    def test_build_local_dockerfile_error(self):
        text = PIPELINE.replace("output: oci/app", "output: oci/bad\n      dockerfile: Bad.dockerfile")
        text = text.replace("./out/hello\n", "./out/hello\n        printf 'FROM scratch\\nCOPY no-such-file /x\\n' > Bad.dockerfile\n")
        run, events = run_to_end(self.c, text, {"repo": self.repo})
        st = stage(run, "image")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        msg = st.get("message", "")
        if "buildah bud failed" not in msg or "no-such-file" not in msg:
            raise AssertionError("message %r is not buildah's" % msg)
        assert_eq(os.path.exists(self.ws(run["id"], "oci", "bad")), False, "no layout")

    def test_build_local_cancel_stops_buildah(self):
        text = PIPELINE.replace("output: oci/app", "output: oci/slow\n      dockerfile: Slow.dockerfile")
        # The sleeper's command line carries a word of this test's own (its
        # temporary directory's name): other tests' buildah and sleepers on
        # the machine never match.
        mark = os.path.basename(self.tmp)
        text = text.replace("./out/hello\n", "./out/hello\n        printf 'FROM scratch\\nCOPY out/hello /sleeper\\nRUN [\"/sleeper\", \"300\", \"%s\"]\\n' > Slow.dockerfile\n" % mark)
        run = Client.to_dict(submit(self.c, text, {"repo": self.repo}))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=120)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "kpl-sleeper sleeping" in ev.get("message", ""):
                stream.cancel()
                break
        else:
            raise AssertionError("the build's RUN never started: %r" % get(self.c, run["id"]))
        sleeper = "/sleeper 300 " + mark
        ours = lambda: [p for p in procs_matching("buildah") if self.tmp in p[1]]  # noqa: E731
        if not procs_matching(sleeper) or not ours():
            raise AssertionError("no buildah or sleeper of this test running before the cancel")
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "run state")
        assert_eq(stage(got, "image")["state"], "STAGE_STATE_CANCELLED", "stage state")
        left = procs_matching(sleeper) + ours()
        assert_eq(left, [], "processes left after the cancel")

    def close(self):
        self.c.close()
        if getattr(self, "git_http", None):
            self.git_http[0].stop()
        import signal
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-build-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
