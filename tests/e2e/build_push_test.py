"""Issue 4 end to end: checkout -> local multi-stage build -> push (basic
auth) -> promote tag, verified by pulling the manifest back from the registry
and comparing digests.

    /usr/bin/python3 tests/e2e/build_push_test.py KPLD PIPELINE

PIPELINE is pipelines/examples/build-and-push.kpl.yaml, run as it is
against a git repository of the demo app (tests/e2e/release/app) and
Debian's docker-registry with htpasswd basic auth (tests/e2e/release/
stack.py starts both, and kpld with a config naming the registry `local`,
its password set through SetSecret). Real git, gcc -static, buildah (every
stage FROM scratch: no network), the real registry read back over HTTP.
"""

import gzip
import io
import json
import os
import sys
import tarfile
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "release"))
from e2e_test import assert_eq, run_suite  # noqa: E402
from stack import P, Stack, git  # noqa: E402

OK = "RUN_STATE_SUCCEEDED"
STAGES = ["checkout", "compile", "image", "push", "promote"]


class Suite:
    def __init__(self, kpld, pipeline, tmp):
        self.pipeline = pipeline
        self.stack = Stack(tmp, kpld)
        self.stack.start(registry=True, kube=False, prometheus=False)
        self.daemon = types.SimpleNamespace(log=self.stack.path("kpld.log"))
        self.repo, self.sha1 = self.stack.make_repo()
        self.first = None

    def run(self, **params):
        params.setdefault("repo", self.repo)
        run_id = self.stack.submit(self.pipeline, params)
        events = self.stack.watch(run_id)
        return self.stack.get_run(run_id), events

    def ok(self, **params):
        run, events = self.run(**params)
        if run["state"] != OK:
            logs = ["%s: %s" % (e.get("stage"), e.get("message")) for e in events
                    if e.get("kind") == "EVENT_KIND_LOG"]
            raise AssertionError("run %s %s: %s\n%s" % (
                run["id"], run["state"],
                [(s["name"], s["state"], s.get("message")) for s in run["stages"]],
                "\n".join(logs[-40:])))
        return run

    def blob(self, repo, digest):
        _, _, body = self.stack.registry_get("/v2/%s/blobs/%s" % (repo, digest))
        return body

    # -- tests ---------------------------------------------------------------

    def test_checkout_build_push_promote(self):
        run = self.ok()
        st = {s["name"]: s for s in run["stages"]}
        assert_eq([s["name"] for s in run["stages"]], STAGES, "stages")
        short = self.sha1[:12]
        assert_eq(st["checkout"]["outputs"]["sha"], self.sha1, "checked-out sha")
        assert_eq(st["compile"]["outputs"]["version"], "1.1.0", "the app's version")

        push, promote = st["push"]["outputs"], st["promote"]["outputs"]
        digest = push["digest"]
        assert_eq(digest, st["image"]["outputs"]["digest"],
                  "pushed digest = the OCI layout's manifest digest from buildah")
        assert_eq(push["image"], "%s/app@%s" % (self.stack.registry_host, digest), "push image")
        assert_eq(push["tags"], short, "push tags")
        assert_eq(promote["digest"], digest, "promote digest")
        assert_eq(promote["image"], push["image"], "promote image")
        assert_eq(promote["tags"], "latest", "promote tags")

        # Pulled back from the registry, independently of kpl.
        for ref in (short, "latest", digest):
            body_digest, dcd, manifest = self.stack.manifest("app", ref)
            assert_eq(body_digest, digest, "digest of the manifest bytes at app:%s" % ref)
            assert_eq(dcd, digest, "Docker-Content-Digest at app:%s" % ref)
        assert_eq(self.stack.tags("app"), sorted([short, "latest"]), "the registry's tags")

        # What the image holds: the static binary and VERSION, from the final
        # stage of the multi-stage Dockerfile, and the revision label.
        files = {}
        for layer in manifest["layers"]:
            data = self.blob("app", layer["digest"])
            assert_eq("sha256:" + __import__("hashlib").sha256(data).hexdigest(),
                      layer["digest"], "layer blob digest")
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for m in tf.getmembers():
                    if m.isfile():
                        files[m.name.lstrip("./")] = tf.extractfile(m).read()
        assert_eq(sorted(files), ["app/VERSION", "app/server"], "files in the image")
        assert_eq(files["app/VERSION"], b"1.1.0\n", "VERSION in the image")
        if not files["app/server"].startswith(b"\x7fELF") or b"/lib64/ld-linux" in files["app/server"]:
            raise AssertionError("app/server is not a static ELF binary")
        config = json.loads(self.blob("app", manifest["config"]["digest"]))
        assert_eq(config["config"]["Labels"].get("org.opencontainers.image.revision"),
                  self.sha1, "revision label (the build arg)")
        assert_eq(config["config"].get("Entrypoint"), ["/app/server"], "entrypoint")
        self.first = (short, digest)

    def test_new_commit_moves_latest_only(self):
        if not self.first:
            raise AssertionError("needs test_checkout_build_push_promote")
        _, sha2 = self.stack.commit("1.2.0")
        run = self.ok()
        st = {s["name"]: s for s in run["stages"]}
        digest2 = st["push"]["outputs"]["digest"]
        if digest2 == self.first[1]:
            raise AssertionError("a new version gave the same digest")
        assert_eq(self.stack.manifest("app", "latest")[0], digest2, "latest moved")
        assert_eq(self.stack.manifest("app", sha2[:12])[0], digest2, "the new sha tag")
        assert_eq(self.stack.manifest("app", self.first[0])[0], self.first[1],
                  "the first sha tag still names the first image")
        assert_eq(self.stack.tags("app"), sorted([self.first[0], sha2[:12], "latest"]), "tags")

    def test_compile_error_pushes_nothing(self):
        with open(os.path.join(self.repo, "server.c"), "a") as f:
            f.write("\nthis is not C;\n")
        self.stack.commit(None, "break the build")
        before = self.stack.manifest("app", "latest")[0]
        run, _ = self.run()
        st = {s["name"]: s["state"] for s in run["stages"]}
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(st, {"checkout": "STAGE_STATE_SUCCEEDED", "compile": "STAGE_STATE_FAILED",
                       "image": "STAGE_STATE_SKIPPED", "push": "STAGE_STATE_SKIPPED",
                       "promote": "STAGE_STATE_SKIPPED"}, "stage states")
        assert_eq(self.stack.manifest("app", "latest")[0], before, "latest unchanged")
        git("revert", "--no-edit", "HEAD", cwd=self.repo)

    def test_wrong_password_is_refused(self):
        self.stack.client.call(P + "SetSecret", {"name": "REG_PASS", "value": "not-it"})
        try:
            run, events = self.run()
        finally:
            self.stack.client.call(P + "SetSecret", {"name": "REG_PASS",
                                                     "value": self.stack.reg_pass})
        push = self.stack.stage(run, "push")
        assert_eq((run["state"], push["state"]), ("RUN_STATE_FAILED", "STAGE_STATE_FAILED"),
                  "states")
        if "401" not in push.get("message", "") and "UNAUTHORIZED" not in push.get("message", ""):
            raise AssertionError("push message does not say unauthorized: %r" % push.get("message"))
        if self.stack.reg_pass in json.dumps(events):
            raise AssertionError("the registry password appears in the events")

    def close(self):
        rc = self.stack.stop()
        assert_eq(rc, 0, "kpld's exit status on SIGTERM")


def main():
    kpld = os.path.abspath(sys.argv[1])
    pipeline = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-build-push-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, pipeline, tmp))


if __name__ == "__main__":
    sys.exit(main())
