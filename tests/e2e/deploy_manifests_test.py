"""deploy/kubernetes/ against the Kubernetes emulator (tests/emulators/kube):

    /usr/bin/python3 tests/e2e/deploy_manifests_test.py PATH/TO/kpld PATH/TO/kube_emulator.py MANIFEST...

kubectl applies the manifests (HTTPS, an admin token) and every object is read
back: each field a manifest sets is in the live object. Then kpld runs the way
the StatefulSet runs it: the container's args (ports and paths made local),
the ConfigMap's config as is (`in_cluster: true`), the service account's
token, CA and namespace at /var/run/secrets/kubernetes.io/serviceaccount (a
private mount namespace: `unshare -m`, root), KUBERNETES_SERVICE_HOST/PORT and
POD_NAMESPACE. The emulator authorizes that token as service account kpl/kpld
under the manifests' Role. A pipeline exercising every Kubernetes-facing stage
kind (PIPELINE_STAGES, data) must succeed, and the set of (API group,
resource, verb) kpld used, from the emulator's request log, must be exactly
the Role's rules: every call granted, every grant used. The probes' targets
(gRPC health, /healthz) answer on the ports the manifests name.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, assert_eq, run_suite, submit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
PY = "/usr/bin/python3"
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl") or "/usr/bin/kubectl"
ADMIN_TOKEN = "admin-7d1c9e"
SA_TOKEN = "sa-kpld-3b8f51"
SA_USER = "system:serviceaccount:kpl:kpld"
NS = "kpl"
DEADLINE = 120
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

WEB = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {"replicas": 2, "progressDeadlineSeconds": 30,
             "selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "web", "image": "reg.example/web:1.0"}]}}},
}
WEB_SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
API_MANIFEST = """apiVersion: apps/v1
kind: Deployment
metadata: {name: api, labels: {app: api}}
spec:
  replicas: 1
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: api, image: reg.example/api:1.0}]
"""

# Every Kubernetes-facing stage kind kpl has, in one pipeline (cluster `self`
# is the ConfigMap's in_cluster endpoint). A kind that calls a new verb must
# appear here, and the Role must grant it: the comparison below is data-driven.
PIPELINE_STAGES = [
    # a manifest in the workspace for create_from (a local script stage)
    ("manifest", """
    kind: script
    with:
      shell: |
        mkdir -p k8s
        cat > k8s/api.yaml <<'EOF'
%s        EOF""" % "".join("        " + ln + "\n" for ln in API_MANIFEST.splitlines())),
    ("deploy-create", """
    kind: deploy
    needs: [manifest]
    with: { cluster: self, deployment: api, image: "reg.example/api:1.1", create_from: k8s/api.yaml }"""),
    ("deploy", """
    kind: deploy
    needs: [deploy-create]
    with: { cluster: self, namespace: kpl, deployment: web, image: "reg.example/web:2.0" }"""),
    ("mesh", """
    kind: mesh
    needs: [deploy]
    with: { cluster: self, deployment: web, mode: mesh, service: web, version: v1 }"""),
    ("canary", """
    kind: canary
    needs: [mesh]
    with:
      cluster: self
      deployment: web
      image: "reg.example/web:3.0"
      version: v3
      steps: [ { weight: 50 }, { weight: 100 } ]"""),
    ("rollback", """
    kind: rollback
    needs: [canary]
    with: { cluster: self, deployment: web }"""),
    ("unmesh", """
    kind: mesh
    needs: [rollback]
    with: { cluster: self, deployment: web, mode: plain, service: web }"""),
    # a pod stage with a secret env (the attempt's Secret) and the run's workspace claim
    ("pod", """
    kind: script
    needs: [unmesh]
    env: { GREETING: hello, TOKEN: "${{ secrets.POD_TOKEN }}" }
    runs_on: { cluster: self, namespace: kpl, image: "registry.example/tools:1", workspace: 1Gi }
    with:
      shell: |
        echo "$GREETING from a pod" > /workspace/greeting
        echo "pod started"
        while [ ! -f /workspace/go ]; do sleep 0.1; done
        cat /workspace/greeting"""),
]


def pipeline_text():
    out = "name: on-kubernetes\nstages:\n"
    for name, body in PIPELINE_STAGES:
        out += "  - name: %s%s\n" % (name, body.rstrip() if body.startswith("\n") else body)
    return out


def subset(want, got, path=""):
    """The fields of want that are missing or different in got (paths)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [path or "."]
        out = []
        for k, v in want.items():
            out += subset(v, got.get(k), "%s.%s" % (path, k))
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [path]
        out = []
        for i, (w, g) in enumerate(zip(want, got)):
            out += subset(w, g, "%s[%d]" % (path, i))
        return out
    return [] if want == got else ["%s: want %r, got %r" % (path, want, got)]


def role_grants(role):
    """{(group, resource, verb)} a Role's rules grant (no wildcards allowed here)."""
    out = set()
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    if "*" in (g, r, v):
                        raise AssertionError("the Role must not use wildcards: %s" % rule)
                    out.add((g, r, v))
    return out


class Suite:
    def __init__(self, kpld, emulator, manifests, tmp):
        self.tmp = tmp
        self.kpld = kpld
        self.manifest_files = sorted(manifests)
        self.manifest_dir = os.path.dirname(self.manifest_files[0])
        self.docs = [d for f in self.manifest_files for d in yaml.safe_load_all(open(f)) if d]
        self.make_tls()
        port_file = os.path.join(tmp, "kube.port")
        self.emu_log = open(os.path.join(tmp, "kube.err"), "w")
        self.emu = subprocess.Popen(
            [PY, emulator, "--port-file", port_file, "--lifetime", "900", "--pace", "0.2",
             "--tls-cert", os.path.join(self.tls, "srv.crt"), "--tls-key", os.path.join(self.tls, "srv.key"),
             "--token", ADMIN_TOKEN, "--sa-token", "%s=%s/kpld" % (SA_TOKEN, NS),
             "--pod-root", os.path.join(tmp, "pods")], stdout=subprocess.DEVNULL, stderr=self.emu_log)
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.emu.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("emulator did not start: " + open(self.emu_log.name).read())
            time.sleep(0.05)   # waiting for the emulator to listen
        self.port = int(open(port_file).read())
        self.base = "https://127.0.0.1:%d" % self.port
        self.kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "emu",
                       "clusters": [{"name": "emu", "cluster": {
                           "server": self.base, "certificate-authority": os.path.join(self.tls, "ca.crt")}}],
                       "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
                       "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "admin",
                                                                "namespace": NS}}]}, f)
        self.env = dict(os.environ, KUBECONFIG=self.kubeconfig, HOME=tmp)
        self.daemon = Daemon(self.in_cluster_wrapper(), os.path.join(tmp, "data"), [])
        self.c = None

    # -- helpers

    def make_tls(self):
        self.tls = os.path.join(self.tmp, "tls")
        os.makedirs(self.tls)
        for c in ["openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=emu-ca -keyout ca.key -out ca.crt",
                  "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr",
                  "printf 'subjectAltName=IP:127.0.0.1\\n' >srv.ext",
                  "openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 "
                  "-extfile srv.ext -out srv.crt"]:
            subprocess.run(c, shell=True, cwd=self.tls, check=True, capture_output=True)

    def k(self, *args, ok=True):
        p = subprocess.run([KUBECTL] + list(args), env=self.env, capture_output=True, text=True,
                           timeout=DEADLINE)
        if ok and p.returncode != 0:
            raise AssertionError("kubectl %s: %s%s" % (" ".join(args), p.stdout, p.stderr))
        return p.stdout + (p.stderr if not ok else "")

    def api(self, method, path, body=None, token=ADMIN_TOKEN):
        import ssl
        ctx = ssl.create_default_context(cafile=os.path.join(self.tls, "ca.crt"))
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return json.loads(r.read() or b"null")

    def control(self, method, path):
        return self.api(method, "/emulator/" + path, token=None)

    def live(self, doc):
        md = doc["metadata"]
        kind = doc["kind"].lower()
        args = ["get", kind, md["name"], "-o", "json"]
        if md.get("namespace"):
            args += ["-n", md["namespace"]]
        return json.loads(self.k(*args))

    def container(self):
        sts = next(d for d in self.docs if d["kind"] == "StatefulSet")
        return sts, sts["spec"]["template"]["spec"]["containers"][0]

    def in_cluster_wrapper(self):
        """A kpld that sees the service account's files where a pod does, in a private mount
        namespace (a tmpfs on /run, /var/run's target, so the host's /run is untouched)."""
        sa = os.path.join(self.tmp, "serviceaccount")
        os.makedirs(sa)
        with open(os.path.join(sa, "token"), "w") as f:
            f.write(SA_TOKEN)
        shutil.copy(os.path.join(self.tls, "ca.crt"), os.path.join(sa, "ca.crt"))
        with open(os.path.join(sa, "namespace"), "w") as f:
            f.write(NS)
        real = os.path.realpath(SA_DIR.replace("/var/run", "/run", 1)) if os.path.islink("/var/run") else SA_DIR
        top = "/run" if real.startswith("/run/") else os.path.dirname(os.path.dirname(real))
        w = os.path.join(self.tmp, "kpld-in-cluster")
        with open(w, "w") as f:
            f.write("#!/bin/sh\n# kpld as in the kpld-0 pod: the service account's files at %s\n"
                    "exec unshare -m sh -c 'mount --make-rprivate / && mount -t tmpfs tmpfs %s && "
                    "mkdir -p %s && mount --bind %s %s && exec \"$0\" \"$@\"' %s \"$@\"\n"
                    % (SA_DIR, top, real, sa, real, self.kpld))
        os.chmod(w, 0o755)
        return w

    def kpld_args(self):
        """The StatefulSet container's args, with loopback ephemeral ports and local paths."""
        _, c = self.container()
        cm = next(d for d in self.docs if d["kind"] == "ConfigMap")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        cfg_dir = os.path.join(self.tmp, "config")
        os.makedirs(cfg_dir, exist_ok=True)
        for k, v in cm["data"].items():
            with open(os.path.join(cfg_dir, k), "w") as f:
                f.write(v)
        out = []
        for a in c["args"]:
            flag, _, val = a.partition("=")
            if flag in ("--listen", "--data-dir"):
                continue        # Daemon gives 127.0.0.1:0 and its data directory
            if flag == "--http-listen":
                val = "127.0.0.1:0"
            elif val.startswith(mounts["config"]):
                val = cfg_dir + val[len(mounts["config"]):]
            elif val.startswith(mounts["data"]):
                val = os.path.join(self.tmp, "volume") + val[len(mounts["data"]):]
            out.append(flag + ("=" + val if val else ""))
        return out

    def await_api(self, fn, what):
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            got = fn()
            if got:
                return got
            time.sleep(0.1)   # polling the emulator for an awaited state
        raise AssertionError("%s: not seen within %d s" % (what, DEADLINE))

    def wait_run(self, run_id):
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            run = Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))
            if run.get("state") in ("RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED"):
                return run
            time.sleep(0.2)   # polling the run's state
        raise AssertionError("run %s did not finish: %s" % (run_id, run))

    # -- tests

    def test_apply_creates_every_object(self):
        out = self.k("apply", "-f", self.manifest_dir)
        for d in self.docs:
            what = "%s/%s" % (d["kind"].lower(), d["metadata"]["name"])
            if d["apiVersion"].startswith("rbac."):
                what = "%s.rbac.authorization.k8s.io/%s" % (d["kind"].lower(), d["metadata"]["name"])
            elif d["apiVersion"].startswith("apps/"):
                what = "%s.apps/%s" % (d["kind"].lower(), d["metadata"]["name"])
            assert_eq(bool(re.search(r"^%s created$" % re.escape(what), out, re.M)), True,
                      "kubectl apply creates %s:\n%s" % (what, out))
        for d in self.docs:
            missing = subset(d, self.live(d))
            assert_eq(missing, [], "%s %s as applied" % (d["kind"], d["metadata"]["name"]))
        out = self.k("apply", "-f", self.manifest_dir)
        assert_eq(out.count("unchanged"), len(self.docs), "a second apply changes nothing:\n" + out)

    def test_statefulset_and_its_volume(self):
        sts, c = self.container()
        assert_eq(sts["spec"]["replicas"], 1, "one kpld: one writer per store")
        out = self.k("rollout", "status", "statefulset/kpld", "--timeout=%ds" % DEADLINE)
        assert_eq("complete" in out, True, "rollout status: " + out)
        pvc = json.loads(self.k("get", "pvc", "data-kpld-0", "-o", "json"))
        assert_eq((pvc["status"]["phase"], pvc["spec"]["resources"]["requests"]["storage"]), ("Bound", "10Gi"),
                  "the store's claim")
        pod = json.loads(self.k("get", "pod", "kpld-0", "-o", "json"))
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert_eq(vols["data"]["persistentVolumeClaim"]["claimName"], "data-kpld-0", "the pod mounts its claim")
        assert_eq(pod["spec"]["serviceAccountName"], "kpld", "the pod's identity")
        # what the args name must be where the volumes are mounted
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        args = dict(a.partition("=")[::2] for a in c["args"])
        for flag in ("--data-dir", "--config", "--bootstrap-token-file"):
            assert_eq(any(args[flag].startswith(m + "/") for m in mounts), True, "%s is on a volume" % flag)
        assert_eq(args["--data-dir"].startswith(next(m for m, n in mounts.items() if n == "data")), True,
                  "the store is on the claim")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert_eq(args["--listen"], "0.0.0.0:%d" % ports["grpc"], "gRPC port")
        assert_eq(args["--http-listen"], "0.0.0.0:%d" % ports["http"], "HTTP port")
        assert_eq((c["readinessProbe"]["grpc"]["port"], c["livenessProbe"]["httpGet"]["path"]),
                  (ports["grpc"], "/healthz"), "probes")
        svc = json.loads(self.k("get", "svc", "kpld", "-o", "json"))
        assert_eq(sorted((p["name"], p["port"]) for p in svc["spec"]["ports"]),
                  [("grpc", ports["grpc"]), ("http", ports["http"])], "the Service's ports")

    def test_role_as_kubectl_sees_it(self):
        role = next(d for d in self.docs if d["kind"] == "Role")
        sa = "--as=" + SA_USER
        for g, r, v in sorted(role_grants(role)):
            res, _, sub = r.partition("/")
            args = ["auth", "can-i", sa, "-n", NS, v, res + ("." + g if g else "")]
            if sub:
                args.append("--subresource=" + sub)
            assert_eq(self.k(*args, ok=False).strip(), "yes", "can-i %s %s %s" % (v, r, g))
        for args in (["list", "secrets"], ["get", "secrets"], ["create", "pods", "-n", "default"],
                     ["create", "roles.rbac.authorization.k8s.io"], ["list", "configmaps"],
                     ["delete", "statefulsets.apps"]):
            assert_eq(self.k("auth", "can-i", sa, "-n", NS, *args, ok=False).strip(), "no",
                      "can-i %s (not granted)" % " ".join(args))

    def test_kpld_in_cluster_runs_every_kind_with_exactly_the_role(self):
        self.api("POST", "/apis/apps/v1/namespaces/kpl/deployments", WEB)
        self.api("POST", "/api/v1/namespaces/kpl/services", WEB_SVC)
        self.k("rollout", "status", "deployment/web", "--timeout=%ds" % DEADLINE)
        os.makedirs(os.path.join(self.tmp, "volume", "data"), mode=0o700)
        self.daemon.extra = self.kpld_args()
        os.environ.update({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port),
                           "POD_NAMESPACE": NS})
        self.daemon.start().close()
        token = open(os.path.join(self.tmp, "volume", "admin-token")).read().strip()
        self.c = Client.connect(self.daemon.addr, token=token)
        # the probes' targets
        plain = Client.connect(self.daemon.addr)   # the kubelet's grpc probe has no token
        resp = plain.raw_call("/grpc.health.v1.Health/Check", b"", timeout=10)
        plain.close()
        assert_eq(resp, b"\x08\x01", "readiness: grpc.health.v1 Check answers status SERVING (1)")
        with urllib.request.urlopen("http://%s/healthz" % self.daemon.http, timeout=10) as r:
            assert_eq((r.status, r.read()), (200, b"ok\n"), "liveness: /healthz")
        self.c.call(P + "SetSecret", {"name": "POD_TOKEN", "value": "s3cr3t-for-the-pod"})
        self.control("DELETE", "requests")
        run = Client.to_dict(submit(self.c, pipeline_text()))
        # kill -9 while the pod stage runs, the data directory moved (kpld-0 rescheduled with its
        # volume): the next kpld re-attaches to the pod by name, nothing runs twice
        pod = self.await_api(lambda: [p for p in self.api("GET", "/api/v1/namespaces/kpl/pods?labelSelector="
                                                          "app.kubernetes.io%2Fmanaged-by%3Dkpl")["items"]
                                      if (p.get("status") or {}).get("phase") == "Running"], "a running pod stage")[0]
        claim = self.await_api(lambda: self.api("GET", "/api/v1/namespaces/kpl/persistentvolumeclaims?"
                                                "labelSelector=kpl.dev%2Frun")["items"], "the run's claim")[0]
        # A line of the pod's as an event: kpld has stored the pod as created (it follows the
        # log only then), so the restart must find it by name, not create it again. A pod
        # Running at the emulator alone could still be a create whose reply kpld had not stored.
        for ev in self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=DEADLINE):
            ev = Client.to_dict(ev)
            if ev.get("stage") == "pod" and "pod started" in ev.get("message", ""):
                break
        else:
            raise AssertionError("the run ended before its pod stage printed")
        self.daemon.proc.kill()
        self.daemon.proc.wait()
        # rescheduled: the same volume, attached elsewhere (another path)
        moved = os.path.join(self.tmp, "data-moved")
        shutil.move(self.daemon.data_dir, moved)
        self.daemon.data_dir = moved
        self.daemon.start().close()
        self.c.close()
        self.c = Client.connect(self.daemon.addr, token=token)
        open(os.path.join(self.tmp, "pods", "pvcs", NS, claim["metadata"]["name"], "go"), "w").close()
        run = self.wait_run(run["id"])
        stages = {s["name"]: (s.get("state"), s.get("message", "")) for s in run.get("stages", [])}
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "the pipeline: %s" % json.dumps(stages, indent=1))
        items = self.control("GET", "requests")["items"]
        used = set((e["group"], e["resource"] + ("/" + e["subresource"] if e["subresource"] else ""), e["verb"])
                   for e in items if e["user"] == SA_USER)
        others = set(e["user"] for e in items) - {SA_USER, "system:admin"}
        assert_eq(others, set(), "kpld's requests all carry the service account's token")
        granted = role_grants(next(d for d in self.docs if d["kind"] == "Role"))
        assert_eq(sorted(used - granted), [], "calls the Role does not grant")
        assert_eq(sorted(granted - used), [], "grants no stage used")
        assert_eq(set(e["namespace"] for e in items if e["user"] == SA_USER), {NS},
                  "kpld acted in its namespace only")
        creates = [e["name"] or "(generated)" for e in items if e["user"] == SA_USER and e["verb"] == "create"
                   and e["resource"] == "pods"]
        assert_eq(len(creates), 1, "one pod created across the kill -9: %s" % creates)
        assert_eq(any(e["verb"] == "get" and e["resource"] == "pods" and e["name"] == pod["metadata"]["name"]
                      and e["user"] == SA_USER for e in items), True, "the restarted kpld got its pod by name")
        log = [e for e in self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)]
        text = json.dumps([Client.to_dict(e) for e in log])
        assert_eq("hello from a pod" in text, True, "the pod's output is in the run's events")

    def close(self):
        try:
            if self.c:
                self.c.close()
            if self.daemon.proc:
                assert_eq(self.daemon.stop(), 0, "kpld exits 0 on SIGTERM")
        finally:
            self.emu.terminate()
            try:
                self.emu.wait(20)
            except subprocess.TimeoutExpired:
                self.emu.kill()
            self.emu_log.close()
            err = open(self.emu_log.name).read()
            if "Traceback" in err:
                raise AssertionError("the emulator logged a traceback:\n" + err[-4000:])


def main():
    kpld, emulator = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    manifests = [os.path.abspath(p) for p in sys.argv[3:]]
    tmp = tempfile.mkdtemp(prefix="kpl-manifests-", dir=os.environ.get("TEST_TMPDIR"))
    rc = run_suite(Suite, Suite(kpld, emulator, manifests, tmp))
    if rc == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
