"""End-to-end test of a `build` stage with `driver: local` run as a pod
(`runs_on`, stages/build_local.c handing stages/pod.c its command) against
the Kubernetes emulator, whose kubelet runs the pod's command as a local
process (real buildah, offline: FROM scratch), pushing to Debian's
docker-registry with htpasswd basic auth:

    /usr/bin/python3 tests/e2e/pod_build_test.py KPLD KUBE_EMULATOR

A script pod writes the build context into the run's workspace claim; the
build pod builds it and pushes it under its tags; its outputs (image,
digest, tags) arrive by the termination message and match what the
registry serves; the registry password is only in the attempt's Secret
(the Pod refers to it), and pod and Secret are deleted. kplctl lint's
rules for a build in a pod (ValidatePipeline) are checked too.
"""

import base64
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "release"))
from e2e_test import Daemon, P, assert_eq, run_suite, submit, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402
from kube_stack import start_emulator  # noqa: E402
from pods_test import NS, logs  # noqa: E402
from stack import Stack  # noqa: E402

BUILDAH_IMAGE = "quay.io/buildah/stable:v1.37"


def pipeline(name, image=BUILDAH_IMAGE, extra_runs_on=""):
    """src (a script pod) writes a Dockerfile into the run's claim; image
    (kind build, driver local, in a pod) builds and pushes it."""
    return """name: %s
defaults:
  runs_on: { cluster: emu, namespace: %s, image: "busybox:1.36", workspace: 64Mi }
stages:
  - name: src
    kind: script
    with:
      shell: |
        mkdir -p app
        printf 'hello from a pod build\\n' > app/hello.txt
        printf 'FROM scratch\\nARG NOTE\\nLABEL note=$NOTE\\nCOPY hello.txt /hello.txt\\n' > app/Containerfile
  - name: image
    kind: build
    needs: [src]
    runs_on: { image: "%s"%s }
    with:
      driver: local
      context: app
      dockerfile: Containerfile
      args: { NOTE: "built-in-a-pod" }
      registry: local
      repository: team/app
      tags: [v1, "r-${{ run.id }}"]
  - name: after
    kind: script
    needs: [image]
    runs_on: local
    with: { command: [echo, "got ${{ stages.image.outputs.image }}"] }
""" % (name, NS, image, extra_runs_on)


class Suite:
    def __init__(self, binary, emulator, tmp):
        self.tmp = tmp
        self.reg = Stack(os.path.join(tmp, "reg"), binary)
        os.mkdir(self.reg.tmp)
        self.reg.start_registry()
        self.emu, self.base = start_emulator(
            emulator, tmp, ["--pace", "0.3", "--lifetime", "1200", "--namespace", NS,
                            "--pod-root", os.path.join(tmp, "pods")],
            os.path.join(tmp, "emulator.log"))
        kc = os.path.join(tmp, "kubeconfig")
        with open(kc, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "ctx",
                       "clusters": [{"name": "c", "cluster": {"server": self.base}}],
                       "users": [{"name": "u", "user": {"token": "t"}}],
                       "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u",
                                                                "namespace": NS}}]}, f)
        self.cfg = os.path.join(tmp, "kpld.yaml")
        with open(self.cfg, "w") as f:
            # The password written in the config, not a kpl secret: the
            # run's redaction does not know it, so only the driver's
            # secret_env keeps it out of the Pod spec.
            f.write("kubernetes:\n  emu: { kubeconfig: %s }\n"
                    "registries:\n  local: { url: \"%s\", username: kpl, "
                    "password: \"%s\" }\n" % (kc, self.reg.registry, self.reg.reg_pass))
        os.chmod(self.cfg, 0o600)
        self.daemon = Daemon(binary, os.path.join(tmp, "data"), ["--config", self.cfg])
        self.c = self.daemon.start()

    # -- helpers ---------------------------------------------------------

    def api(self, method, path):
        import urllib.error
        import urllib.request
        req = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def listed(self, what, run_id):
        code, lst = self.api("GET", "/api/v1/namespaces/%s/%s?labelSelector=kpl.dev%%2Frun%%3D%s"
                             % (NS, what, run_id))
        assert_eq(code, 200, "list %s" % what)
        return lst["items"]

    def assert_gone(self, run_id):
        assert_eq([p["metadata"]["name"] for p in self.listed("pods", run_id)], [],
                  "pods left of run %s" % run_id)
        assert_eq([s["metadata"]["name"] for s in self.listed("secrets", run_id)], [],
                  "secrets left of run %s" % run_id)

    # -- tests ----------------------------------------------------------

    def test_build_in_a_pod_pushes_and_outputs_flow(self):
        run = Client.to_dict(submit(self.c, pipeline("pod-build")))
        events = watch(self.c, run["id"])
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        image = run["stages"][1]
        assert_eq(image["name"], "image", "stage")
        out = image.get("outputs", {})
        host = self.reg.registry_host
        tags = ["v1", "r-" + run["id"]]
        # What the registry serves, read independently of kpl.
        got_digest, header, manifest = self.reg.manifest("team/app", "v1")
        assert_eq(header, got_digest, "the registry's digest header")
        assert_eq(out, {"image": "%s/team/app@%s" % (host, got_digest), "digest": got_digest,
                        "tags": ",".join(tags)}, "outputs (termination message)")
        assert_eq(self.reg.manifest("team/app", tags[1])[0], got_digest, "second tag")
        assert_eq(self.reg.tags("team/app"), sorted(tags), "the registry's tags")
        _, _, cfg = self.reg.registry_get("/v2/team/app/blobs/%s"
                                          % manifest["config"]["digest"])
        assert_eq(json.loads(cfg)["config"]["Labels"].get("note"), "built-in-a-pod",
                  "the build argument reached the build")
        assert_eq(logs(events, "after"), ["got %s/team/app@%s" % (host, got_digest)],
                  "the output reached a later stage")
        system = [e["message"] for e in events if e.get("stream") == "LOG_STREAM_SYSTEM"
                  and e.get("stage") == "image"]
        assert any(m.startswith("created pod kpl-%s-image-1 " % run["id"]) for m in system), system
        pushed = [m for m in logs(events, "image") if m.startswith("pushed ")]
        assert_eq(pushed, ["pushed %s/team/app:%s (%s)" % (host, t, got_digest) for t in tags],
                  "the pod's push lines")
        text = json.dumps(events)
        assert self.reg.reg_pass not in text, "the registry password reached an event"
        self.assert_gone(run["id"])

    def test_a_failed_build_names_the_pod_and_pushes_nothing(self):
        text = pipeline("pod-build-fails").replace(
            "COPY hello.txt /hello.txt", "COPY missing.txt /missing.txt").replace(
            "tags: [v1, ", "tags: [broken, ")
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state (%s)" % run.get("message"))
        image = run["stages"][1]
        want = "pod kpl-%s-image-1 (namespace %s, cluster emu): the command exited with status" \
            % (run["id"], NS)
        assert image.get("message", "").startswith(want), image.get("message")
        assert any("missing.txt" in m for m in logs(events, "image")), logs(events, "image")
        assert_eq(image.get("outputs", {}), {}, "no outputs")
        assert "broken" not in self.reg.tags("team/app"), self.reg.tags("team/app")
        self.assert_gone(run["id"])

    def test_password_only_in_the_attempts_secret(self):
        # An image that cannot be pulled keeps the pod Pending (the
        # emulator never runs it): its spec can be read while it exists.
        run = Client.to_dict(submit(self.c, pipeline(
            "pod-build-secret", image="registry.invalid/pullerror/buildah",
            extra_runs_on=", image_pull_timeout: 1h")))
        deadline = time.monotonic() + 60
        while True:
            pods = self.listed("pods", run["id"])
            if pods and pods[0]["metadata"]["labels"].get("kpl.dev/stage") == "image":
                break
            if time.monotonic() > deadline:
                raise AssertionError("no build pod for run %s within 60 s" % run["id"])
            time.sleep(0.1)  # the emulator's state: no kpld event to wait on
        pod = pods[0]
        assert self.reg.reg_pass not in json.dumps(pod), "the password is in the Pod object"
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        ref = env["KPL_BUILD_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert "value" not in env["KPL_BUILD_PASSWORD"], env["KPL_BUILD_PASSWORD"]
        assert_eq(env["KPL_BUILD_USERNAME"].get("value"), "kpl", "the username (not secret)")
        assert_eq(ref["name"], "%s-env" % pod["metadata"]["name"], "the attempt's Secret")
        code, sec = self.api("GET", "/api/v1/namespaces/%s/secrets/%s" % (NS, ref["name"]))
        assert_eq(code, 200, "the attempt's Secret exists while the pod does")
        assert_eq(base64.b64decode(sec["data"]["KPL_BUILD_PASSWORD"]).decode(),
                  self.reg.reg_pass, "the password in the Secret")
        assert_eq(sec["metadata"]["labels"]["kpl.dev/run"], run["id"], "the Secret's run label")
        cmd = json.dumps(pod["spec"]["containers"][0].get("command", []) +
                         pod["spec"]["containers"][0].get("args", []))
        assert "--build-arg" in cmd and "NOTE=built-in-a-pod" in cmd, cmd
        self.c.call(P + "CancelRun", {"id": run["id"]})
        watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "run state (%s)" % got.get("message"))
        self.assert_gone(run["id"])

    def test_lint(self):
        def diags(text):
            r = Client.to_dict(self.c.call(P + "ValidatePipeline", {"pipeline": text}))
            return [(d.get("path"), d.get("line"), d.get("column"), d.get("message"))
                    for d in r.get("diagnostics", [])]
        # No workspace: the context could not reach the pod.
        text = pipeline("lint-ws").replace(", workspace: 64Mi", "")
        got = diags(text)
        assert_eq([(p, ln, col) for p, ln, col, _ in got],
                  [("stages[1].runs_on.workspace", 15, 14)], "where (%s)" % got)
        assert got[0][3].startswith("required for a build in a pod"), got
        # Pod-only keys on kpld's host, and a jenkins build's runs_on.
        text = ("name: lint-host\nstages:\n  - name: image\n    kind: build\n"
                "    with: { driver: local, registry: local, repository: app }\n"
                "  - name: j\n    kind: build\n    runs_on: { cluster: emu, image: x }\n"
                "    with: { driver: jenkins, jenkins: ci, job: x }\n")
        got = [(p, ln, col) for p, ln, col, _ in diags(text)]
        assert ("stages[0].with.registry", 5, 38) in got, got
        assert ("stages[1].runs_on", 8, 14) in got, got
        assert_eq(diags(pipeline("lint-ok")), [], "a valid build in a pod")
        # A jenkins build under defaults.runs_on stays in kpld: no diagnostic.
        text = ("name: lint-jenkins\ndefaults:\n  runs_on: { cluster: emu, image: x }\n"
                "stages:\n  - name: j\n    kind: build\n"
                "    with: { driver: jenkins, jenkins: ci, job: x }\n")
        assert_eq([p for p, _, _, _ in diags(text) if "runs_on" in p], [],
                  "defaults.runs_on leaves a jenkins build alone")

    def close(self):
        self.c.close()
        if self.daemon.proc:
            self.daemon.stop()
        self.emu.terminate()
        self.emu.wait(timeout=30)
        self.reg.stop()


def main():
    binary = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-podbuild-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, emulator, tmp))


if __name__ == "__main__":
    sys.exit(main())
