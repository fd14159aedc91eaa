"""End-to-end test of the deploy and rollback stage kinds: kpld (through its
gRPC API) against the Kubernetes emulator (tests/emulators/kube).

    /usr/bin/python3 tests/e2e/deploy_test.py PATH/TO/kpld PATH/TO/kube_emulator.py

One emulator with a bearer token (--verbose: its request log counts PATCHes),
one over HTTPS that authenticates a client certificate; kpld's config names
them through kubeconfigs. The tests run in order on one Deployment
(shop/web): deploy, a crashloop deploy undone by a finally rollback, a 409
retried, kill -9 mid-rollout, a wrong token; then HTTPS + client cert.
"""

import base64

import grpc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, assert_eq, expect_rpc_error, run_suite, submit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
TOKEN = "kpl-e2e-token-7f3a9c"
BAD_TOKEN = "wrong-token-b41d02"
PY = "/usr/bin/python3"
WEB = "/apis/apps/v1/namespaces/shop/deployments/web"

DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "replicas": 2,
        "progressDeadlineSeconds": 3,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [
                {"name": "web", "image": "reg.example/web:1.0",
                 "env": [{"name": "MODE", "value": "prod"}]},
                {"name": "sidecar", "image": "reg.example/proxy:1"}]},
        },
    },
}


def deploy_pipeline(cluster, image, finally_rollback=False, name="dep"):
    text = """
name: %s
stages:
  - name: deploy
    kind: deploy
    with:
      cluster: %s
      namespace: shop
      deployment: web
      container: web
      image: "%s"
      env: { RELEASE: "${{ run.id }}" }
""" % (name, cluster, image)
    if finally_rollback:
        text += """
finally:
  - name: undo
    kind: rollback
    with: { cluster: %s, namespace: shop, deployment: web }
""" % cluster
    return text


class Emulator:
    def __init__(self, script, tmp, name, *args):
        self.err = os.path.join(tmp, name + ".err")
        port_file = os.path.join(tmp, name + ".port")
        self.proc = subprocess.Popen(
            [PY, script, "--port-file", port_file, "--lifetime", "900", "--verbose"] + list(args),
            stdout=subprocess.DEVNULL, stderr=open(self.err, "w"))
        deadline = time.monotonic() + 20
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("emulator %s did not start: %s" % (name, open(self.err).read()))
            time.sleep(0.05)
        self.port = int(open(port_file).read().strip())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def patches(self):
        """PATCH requests to shop/web so far, from the emulator's request log."""
        return len(re.findall(r'"PATCH %s[ ?]' % re.escape(WEB), open(self.err).read()))


class Suite:
    def __init__(self, binary, emulator, tmp):
        self.tmp = tmp
        self.emu = Emulator(emulator, tmp, "plain", "--pace", "0.3", "--token", TOKEN,
                            "--namespace", "shop", "--bookmark-interval", "1")
        self.base = "http://127.0.0.1:%d" % self.emu.port
        self.api("POST", "/apis/apps/v1/namespaces/shop/deployments", DEPLOYMENT)
        self.wait_image("reg.example/web:1.0")
        self.tls = self.make_tls(emulator)
        kc_good = self.kubeconfig("good", self.base, {"token": TOKEN})
        kc_bad = self.kubeconfig("bad", self.base, {"token": BAD_TOKEN})
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("kubernetes:\n  test: { kubeconfig: %s }\n  bad: { kubeconfig: %s }\n"
                    "  tls: { kubeconfig: %s, context: tls }\n" % (kc_good, kc_bad, self.tls_kc))
        self.daemon = Daemon(binary, os.path.join(tmp, "data"), ["--config", cfg])
        self.c = self.daemon.start()
        self.all_runs = []

    # -- helpers ---------------------------------------------------------

    def api(self, method, path, body=None, base=None, token=TOKEN):
        req = urllib.request.Request((base or self.base) + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Authorization", "Bearer " + token)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def control(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def image(self):
        d = self.api("GET", WEB)
        return [c["image"] for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "web"][0]

    def wait_image(self, image):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            d = self.api("GET", WEB)
            st = d.get("status", {})
            if self.image() == image and st.get("availableReplicas") == 2 and \
                    st.get("updatedReplicas") == 2 and st.get("replicas") == 2:
                return
            time.sleep(0.1)  # waiting on the emulator's controller, no event to wait on
        raise AssertionError("deployment did not settle on %s" % image)

    def kubeconfig(self, name, server, user, cluster_extra=None, context="ctx"):
        path = os.path.join(self.tmp, "kc-" + name)
        cluster = {"server": server}
        cluster.update(cluster_extra or {})
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": context,
               "clusters": [{"name": "c", "cluster": cluster}],
               "users": [{"name": "u", "user": user}],
               "contexts": [{"name": "other", "context": {"cluster": "nowhere", "user": "u"}},
                            {"name": context, "context": {"cluster": "c", "user": "u",
                                                          "namespace": "shop"}}]}
        with open(path, "w") as f:
            json.dump(doc, f)  # JSON is YAML; kubectl reads both
        return path

    def make_tls(self, emulator):
        d = os.path.join(self.tmp, "tls")
        os.makedirs(d)
        cmds = [
            "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=emu-ca -keyout ca.key -out ca.crt",
            "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr",
            "printf 'subjectAltName=IP:127.0.0.1\\n' >srv.ext",
            "openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 "
            "-extfile srv.ext -out srv.crt",
            "openssl req -newkey rsa:2048 -nodes -subj /CN=kpl -keyout cli.key -out cli.csr",
            "openssl x509 -req -in cli.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out cli.crt",
        ]
        for c in cmds:
            subprocess.run(c, shell=True, cwd=d, check=True, capture_output=True)
        emu = Emulator(emulator, self.tmp, "tls", "--pace", "0.2", "--namespace", "shop",
                       "--tls-cert", os.path.join(d, "srv.crt"), "--tls-key",
                       os.path.join(d, "srv.key"), "--client-ca", os.path.join(d, "ca.crt"))
        b64 = lambda p: base64.b64encode(open(os.path.join(d, p), "rb").read()).decode()
        self.tls_base = "https://127.0.0.1:%d" % emu.port
        self.tls_dir = d
        self.tls_kc = self.kubeconfig(
            "tls", self.tls_base,
            {"client-certificate-data": b64("cli.crt"), "client-key-data": b64("cli.key")},
            {"certificate-authority-data": b64("ca.crt")}, context="tls")
        return emu

    def run(self, text):
        """Submits text and follows WatchRun to the end; returns (run, events)."""
        run = Client.to_dict(submit(self.c, text))
        self.all_runs.append(run["id"])
        events = []
        for ev in self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=120):
            events.append(Client.to_dict(ev))
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})), events

    @staticmethod
    def stage(run, name):
        return [s for s in run["stages"] if s["name"] == name][0]

    def assert_no_secret(self, events):
        text = json.dumps(events)
        for secret in (TOKEN, BAD_TOKEN):
            if secret in text:
                raise AssertionError("a token appears in the events")

    # -- tests -----------------------------------------------------------

    def test_deploy_new_image(self):
        before = self.emu.patches()
        run, events = self.run(deploy_pipeline("test", "reg.example/web:2.0"))
        st = self.stage(run, "deploy")
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("revision"), "2", "revision output")
        assert_eq(st["outputs"].get("image"), "reg.example/web:2.0", "image output")
        assert_eq(st.get("message"), 'deployment "web" successfully rolled out', "message")
        d = self.api("GET", WEB)
        cs = {c["name"]: c for c in d["spec"]["template"]["spec"]["containers"]}
        assert_eq(cs["web"]["image"], "reg.example/web:2.0", "emulator image")
        assert_eq(cs["sidecar"]["image"], "reg.example/proxy:1", "other container untouched")
        env = {e["name"]: e.get("value") for e in cs["web"]["env"]}
        assert_eq(env.get("MODE"), "prod", "env merged by name")
        assert_eq(env.get("RELEASE"), run["id"], "env set")
        assert_eq(self.emu.patches() - before, 1, "PATCH requests")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if not any(l.startswith('Waiting for deployment "web" rollout to finish') for l in logs):
            raise AssertionError("no kubectl progress line in %r" % logs)
        self.assert_no_secret(events)

    def test_crashloop_fails_and_finally_rolls_back(self):
        run, events = self.run(deploy_pipeline("test", "reg.example/web:3.0-crashloop",
                                               finally_rollback=True))
        dep, undo = self.stage(run, "deploy"), self.stage(run, "undo")
        assert_eq(dep["state"], "STAGE_STATE_FAILED", "deploy state")
        assert_eq(dep["message"], 'deployment "web" exceeded its progress deadline',
                  "kubectl's message")
        assert_eq(undo["state"], "STAGE_STATE_SUCCEEDED", "rollback state (%s)" % undo.get("message"))
        assert_eq(undo["outputs"].get("image"), "reg.example/web:2.0", "rollback image output")
        self.wait_image("reg.example/web:2.0")
        # The rollback restored the whole recorded template (env of run 1).
        self.assert_no_secret(events)

    def test_rollback_again_is_a_noop(self):
        before = self.emu.patches()
        run, events = self.run("""
name: undo-again
stages:
  - { name: undo, kind: rollback, with: { cluster: test, deployment: web } }
""")
        st = self.stage(run, "undo")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(self.emu.patches() - before, 0, "no PATCH: the template already matches")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if not any(l.startswith("skipped rollback") for l in logs):
            raise AssertionError("no 'skipped rollback' in %r" % logs)

    def test_release_history_and_rollback_release(self):
        """ListReleases shows what deploys and rollbacks did; RollbackRelease
        starts a run that restores a named revision."""
        rels = Client.to_dict(self.c.call(P + "ListReleases",
                                          {"deployment": "test/shop/web"})).get("releases", [])
        done = [r for r in rels if r.get("revision")]
        if not done or done[0]["kind"] != "rollback":
            raise AssertionError("newest finished release should be the rollback: %r" % rels)
        seqs = [int(r["seq"]) for r in rels]
        assert_eq(seqs, sorted(seqs, reverse=True), "newest first")
        deploys = [r for r in done if r["kind"] == "deploy"]
        assert_eq((deploys[0]["image"], deploys[0]["revision"], deploys[0]["previous_image"]),
                  ("reg.example/web:2.0", "2", "reg.example/web:1.0"), "the first deploy")
        expect_rpc_error(lambda: self.c.call(P + "ListReleases", {"deployment": "web"}),
                         grpc.StatusCode.INVALID_ARGUMENT, "cluster/namespace/name")
        run = Client.to_dict(self.c.call(P + "RollbackRelease", {
            "deployment": "test/shop/web", "to_revision": "1"}))
        self.all_runs.append(run["id"])
        assert_eq(run["pipeline_name"], "rollback-web", "generated pipeline")
        events = [Client.to_dict(e) for e in
                  self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=120)]
        assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "rollback run")
        self.wait_image("reg.example/web:1.0")
        newest = Client.to_dict(self.c.call(P + "ListReleases", {
            "deployment": "test/shop/web", "limit": 1}))["releases"]
        assert_eq((len(newest), newest[0]["kind"], newest[0]["run_id"]),
                  (1, "rollback", run["id"]), "the rollback is recorded")

    def test_conflict_is_retried(self):
        before = self.emu.patches()
        self.control("POST", "/emulator/fault", {"path_prefix": WEB, "method": "PATCH",
                                                 "count": 1, "status": 409})
        run, events = self.run(deploy_pipeline("test", "reg.example/web:4.0"))
        st = self.stage(run, "deploy")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(self.emu.patches() - before, 2, "PATCH requests (409, then the retry)")
        assert_eq(self.image(), "reg.example/web:4.0", "emulator image")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if not any("Conflict: injected fault: 409" in l for l in logs):
            raise AssertionError("the conflict is not in the log: %r" % logs)
        assert_eq(self.control("GET", "/emulator/state")["faults"], [], "fault consumed")

    def test_kill_mid_rollout(self):
        self.control("POST", "/emulator/config", {"pace": 2.0})
        before = self.emu.patches()
        run = Client.to_dict(submit(self.c, deploy_pipeline("test", "reg.example/web:5.0")))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "patched to" in ev.get("message", ""):
                stream.cancel()
                break
        else:
            raise AssertionError("the stage never patched")
        self.daemon.stop(signal.SIGKILL)
        assert_eq(self.emu.patches() - before, 1, "PATCHes before the kill")
        self.control("POST", "/emulator/config", {"pace": 0.3})
        self.c = self.daemon.start()
        events = [Client.to_dict(e) for e in
                  self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=120)]
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got, "deploy")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state after restart (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("image"), "reg.example/web:5.0", "image output")
        assert_eq(self.emu.patches() - before, 1, "no second PATCH after the restart")
        assert_eq(self.image(), "reg.example/web:5.0", "emulator image")
        self.assert_no_secret(events)

    def test_cancel_stops_following(self):
        self.control("POST", "/emulator/config", {"pace": 2.0})
        run = Client.to_dict(submit(self.c, deploy_pipeline("test", "reg.example/web:8.0")))
        self.all_runs.append(run["id"])
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "patched to" in ev.get("message", ""):
                stream.cancel()
                break
        self.c.call(P + "CancelRun", {"id": run["id"]})
        [Client.to_dict(e) for e in self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)]
        st = self.stage(Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})), "deploy")
        assert_eq(st["state"], "STAGE_STATE_CANCELLED", "state")
        assert_eq(st["message"], "cancelled (a rollout already started goes on in the cluster)",
                  "message")
        self.control("POST", "/emulator/config", {"pace": 0.3})
        self.wait_image("reg.example/web:8.0")  # the cluster finished the rollout

    def test_wrong_token(self):
        before = self.emu.patches()
        run, events = self.run(deploy_pipeline("bad", "reg.example/web:6.0"))
        st = self.stage(run, "deploy")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state")
        assert_eq(st["message"], "get deployment shop/web: kubernetes %s: 401 Unauthorized: "
                  "Unauthorized" % self.base, "the server, the Status code, reason and message")
        assert_eq(self.emu.patches() - before, 0, "no PATCH")
        self.assert_no_secret(events)

    def test_https_with_client_certificate(self):
        ctx = __import__("ssl").create_default_context(cafile=os.path.join(self.tls_dir, "ca.crt"))
        ctx.load_cert_chain(os.path.join(self.tls_dir, "cli.crt"), os.path.join(self.tls_dir, "cli.key"))
        req = urllib.request.Request(self.tls_base + "/apis/apps/v1/namespaces/shop/deployments",
                                     method="POST", data=json.dumps(DEPLOYMENT).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10, context=ctx).read()
        run, events = self.run(deploy_pipeline("tls", "reg.example/web:7.0"))
        st = self.stage(run, "deploy")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("revision"), "2", "revision")
        with urllib.request.urlopen(self.tls_base + WEB, timeout=10, context=ctx) as r:
            d = json.loads(r.read())
        assert_eq(d["spec"]["template"]["spec"]["containers"][0]["image"], "reg.example/web:7.0",
                  "image over HTTPS")

    def test_create_from_and_resources(self):
        """create_from makes a Deployment that does not exist from a manifest
        in the workspace, with the stage's image, replicas, env and
        resources; a second run patches it (the manifest is not used
        again); a manifest that is not a Deployment, or is missing, fails
        the stage by name."""
        api = "/apis/apps/v1/namespaces/shop/deployments/api"
        manifest = json.dumps({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "labels": {"app": "api"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}},
                                  "spec": {"containers": [{"name": "api",
                                                           "image": "placeholder"}]}}}})

        def text(image, cpu, path="k8s/api.yaml", body=manifest, deployment="api"):
            return """
name: create
stages:
  - name: manifest
    kind: script
    with:
      shell: |
        mkdir -p k8s
        cat > k8s/api.yaml <<'EOF'
        %s
        EOF
  - name: deploy
    kind: deploy
    needs: [manifest]
    with:
      cluster: test
      namespace: shop
      deployment: %s
      image: "%s"
      replicas: 2
      env: { TIER: backend }
      resources: { limits: { cpu: "%s", memory: 128Mi }, requests: { cpu: 100m } }
      create_from: %s
""" % (body, deployment, image, cpu, path)

        run, events = self.run(text("reg.example/api:1.0", "500m"))
        st = self.stage(run, "deploy")
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s)" % st.get("message"))
        assert_eq(st.get("message"), 'deployment "api" successfully rolled out', "message")
        assert_eq(st["outputs"].get("revision"), "1", "revision of a new Deployment")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if not any("created with" in l for l in logs):
            raise AssertionError("no 'created with' line in %r" % logs)
        d = self.api("GET", api)
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert_eq(c["image"], "reg.example/api:1.0", "image of the created Deployment")
        assert_eq(c.get("resources"), {"limits": {"cpu": "500m", "memory": "128Mi"},
                                       "requests": {"cpu": "100m"}}, "resources")
        assert_eq([(e["name"], e.get("value")) for e in c.get("env", [])],
                  [("TIER", "backend")], "env")
        assert_eq(d["spec"]["replicas"], 2, "replicas")
        assert_eq(d["metadata"].get("annotations", {}).get("kubernetes.io/change-cause"),
                  "kpl run %s stage deploy: image reg.example/api:1.0" % run["id"],
                  "change-cause")
        self.assert_no_secret(events)

        # It exists now: patched, not created again.
        before = len(re.findall(r'"PATCH %s[ ?]' % re.escape(api), open(self.emu.err).read()))
        run, events = self.run(text("reg.example/api:1.1", "1"))
        st = self.stage(run, "deploy")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "second deploy (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("revision"), "2", "revision after the patch")
        after = len(re.findall(r'"PATCH %s[ ?]' % re.escape(api), open(self.emu.err).read()))
        assert_eq(after - before, 1, "PATCHes of shop/api")
        c = self.api("GET", api)["spec"]["template"]["spec"]["containers"][0]
        assert_eq((c["image"], c["resources"]["limits"]["cpu"]), ("reg.example/api:1.1", "1"),
                  "image and cpu limit after the patch")

        service = json.dumps({"apiVersion": "v1", "kind": "Service",
                              "metadata": {"name": "nope"}})
        run, _ = self.run(text("reg.example/nope:1", "1", body=service, deployment="nope"))
        st = self.stage(run, "deploy")
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "create_from k8s/api.yaml: not a Deployment "
                   "(kind: Service)"), "a manifest that is not a Deployment")
        run, _ = self.run(text("reg.example/nope:1", "1", path="k8s/none.yaml",
                               deployment="nope"))
        st = self.stage(run, "deploy")
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "create_from k8s/none.yaml: cannot read it"),
                  "a missing manifest")
        try:
            self.api("GET", "/apis/apps/v1/namespaces/shop/deployments/nope")
            raise AssertionError("deployment nope was created")
        except urllib.error.HTTPError as e:
            assert_eq(e.code, 404, "GET of deployment nope")

    def test_no_token_in_any_event(self):
        for rid in self.all_runs:
            events = [Client.to_dict(e) for e in self.c.stream(P + "WatchRun", {"id": rid}, timeout=60)]
            self.assert_no_secret(events)
        log = open(self.daemon.log).read()
        for secret in (TOKEN, BAD_TOKEN):
            if secret in log:
                raise AssertionError("a token appears in kpld's log")

    def test_longest_kubernetes_names(self):
        # A 63-character namespace (the most Kubernetes allows) and a
        # 236-character Deployment (the most whose pods' names fit) make a
        # release target of 305 bytes: its release record used to hit the
        # store's 300-byte BUG() and abort kpld (and again at each restart).
        ns, name = "n" * 63, "d" * 236
        self.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": ns}})
        # create_from is a path in the run's workspace: a stage writes it.
        manifest = json.dumps({"apiVersion": "apps/v1", "kind": "Deployment",
                               "metadata": {"name": name},
                               "spec": {"replicas": 1,
                                        "selector": {"matchLabels": {"app": "long"}},
                                        "template": {"metadata": {"labels": {"app": "long"}},
                                                     "spec": {"containers": [
                                                         {"name": "web",
                                                          "image": "reg.example/web:1"}]}}}})
        text = """
name: long
stages:
  - name: manifest
    kind: script
    with:
      shell: |
        cat > long.json <<'EOF'
        %s
        EOF
  - name: deploy
    kind: deploy
    needs: [manifest]
    with:
      cluster: test
      namespace: %s
      deployment: %s
      container: web
      image: reg.example/web:2
      create_from: long.json
""" % (manifest, ns, name)
        run, events = self.run(text)
        st = self.stage(run, "deploy")
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s)" % st.get("message"))
        assert_eq(self.daemon.proc.poll(), None, "kpld is running")
        # A target no Kubernetes name makes (a template can) is refused by name.
        text = text.replace("deployment: %s" % name, "deployment: %s" % ("e" * 460))
        run, events = self.run(text)
        st = self.stage(run, "deploy")
        assert_eq(st["state"], "STAGE_STATE_FAILED", "a 529-byte target")
        if "cluster/namespace/deployment is 529 bytes, over 500" not in st.get("message", ""):
            raise AssertionError("message %r" % st.get("message"))

    def close(self):
        self.daemon.stop()
        self.emu.stop()
        self.tls.stop()


def main():
    binary = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-deploy-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, emulator, tmp))


if __name__ == "__main__":
    sys.exit(main())
