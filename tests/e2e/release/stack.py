"""The release stack on one machine, for `./dev demo` and the end-to-end
tests: the demo app's git repository, Debian's docker-registry with htpasswd
basic auth, the Kubernetes+Istio emulator (tests/emulators/kube) with namespaces
shop (production) and staging for the app's Deployment and Service
(k8s/*.json), the real Prometheus scraping the emulator
every second, and kpld with a config naming all three `local` (the
registry's password a secret set with `kplctl secret set` or the SetSecret
RPC, never on a command line).

    stack = Stack(tmp, kpld, emulator=..., kplctl=...)
    stack.start()            # or start_registry(), start_kube(), ... in turn
    stack.seed(build_and_push_yaml)   # v1.0.0 built, pushed and installed
    stack.commit("1.1.0")    # the release to make
    ...
    stack.stop()             # SIGTERM to kpld (its exit status is returned), then the rest

Every server listens on 127.0.0.1 on an ephemeral port and ends with the
process that started it (PR_SET_PDEATHSIG), so nothing outlives a test or
the demo however it ends; the emulator also ends by itself after its
--lifetime. Use /usr/bin/python3 (it has grpcio).
"""

import base64
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "lib"))
from kplgrpc import Client  # noqa: E402
from ports import start_on_free_port  # noqa: E402

P = "kpl.v1.Pipelines/"
PY = "/usr/bin/python3"
APP_DIR = os.path.join(HERE, "app")
K8S_DIR = os.path.join(HERE, "k8s")
NAMESPACE = "shop"
STAGING = "staging"
PODS = "ci"  # where release-pods.kpl.yaml's pod stages run
REG_USER = "kpl"
ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


def _die_with_parent():
    """Runs in the child before exec: SIGTERM when the parent dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def need(tool, package):
    path = shutil.which(tool)
    if not path:
        raise RuntimeError("%s is missing: install %s (./dev does)" % (tool, package))
    return path


def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def wait_until(what, cond, timeout, proc=None, log=None, step=0.05):
    """Polls cond() (an external system's readiness) until it is true."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception as e:  # not listening yet
            last = e
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(step)
    tail = ""
    if log and os.path.exists(log):
        tail = "\n" + open(log, errors="replace").read()[-3000:]
    raise RuntimeError("%s did not come up within %d s (%s)%s" % (what, timeout, last, tail))


def git(*args, cwd=None):
    env = dict(os.environ, GIT_AUTHOR_NAME="kpl demo", GIT_AUTHOR_EMAIL="demo@localhost",
               GIT_COMMITTER_NAME="kpl demo", GIT_COMMITTER_EMAIL="demo@localhost")
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


class Stack:
    def __init__(self, tmp, kpld, emulator=None, kplctl=None, prometheus=None,
                 pace=0.2, traffic_interval=0.5, rps=40, lifetime=900, console=False):
        self.tmp = tmp
        self.kpld_bin = kpld
        self.kplctl_bin = kplctl
        self.emulator = emulator
        self.prometheus_bin = prometheus or os.environ.get("PROMETHEUS", "/usr/bin/prometheus")
        self.pace = pace
        self.traffic_interval = traffic_interval
        self.rps = rps  # requests/s per VirtualService: 10% of 40 is 4/s to a canary
        self.lifetime = lifetime
        self.procs = {}  # name -> Popen, in start order
        self.reg_pass = secrets.token_hex(16)
        self.kube_token = secrets.token_hex(16)
        self.registry = self.kube = self.prom = None
        self.addr = None
        self.client = None
        self.repo = None
        # console: kpld also serves HTTP (the web console and its API) and
        # makes an admin token (--bootstrap-token-file), which every gRPC
        # call and kplctl then send.
        self.console = console
        self.http = None  # HOST:PORT
        self.token = None

    # -- processes -------------------------------------------------------

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def _spawn(self, name, argv, log):
        logf = open(log, "w")
        # Their own session: a Ctrl-C at the terminal reaches the demo only,
        # which stops them in order (kpld, given SIGINT by the terminal and
        # SIGTERM by the demo, took the second as "exit at once").
        p = subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent, start_new_session=True)
        logf.close()
        self.procs[name] = p
        return p

    def start(self, registry=True, kube=True, prometheus=True):
        if registry:
            self.start_registry()
        if kube:
            self.start_kube()
        if prometheus:
            self.start_prometheus()
        self.start_kpld()
        return self

    def start_registry(self):
        """docker-registry (distribution) with htpasswd basic auth, user kpl."""
        d = self.path("registry")
        os.makedirs(os.path.join(d, "storage"))
        htpasswd = os.path.join(d, "htpasswd")
        # htpasswd -i reads the password from stdin: never on a command line.
        out = subprocess.run([need("htpasswd", "apache2-utils"), "-niB", REG_USER],
                             input=self.reg_pass, check=True, capture_output=True,
                             text=True).stdout
        with open(htpasswd, "w") as f:
            f.write(out)
        cfg = os.path.join(d, "config.yml")
        log = os.path.join(d, "registry.log")

        def start(port):
            with open(cfg, "w") as f:
                f.write("version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
                        "storage:\n  filesystem:\n    rootdirectory: %s\n"
                        "http:\n  addr: 127.0.0.1:%d\n"
                        "auth:\n  htpasswd:\n    realm: kpl-demo\n    path: %s\n"
                        % (os.path.join(d, "storage"), port, htpasswd))
            return self._spawn("registry", [need("docker-registry", "docker-registry"),
                                            "serve", cfg], log)
        # A port that is surely its own (tests/lib/ports.py).
        p, port = start_on_free_port(start, "docker-registry")
        self.registry = "http://127.0.0.1:%d" % port
        self.registry_host = "127.0.0.1:%d" % port

        def up():
            try:
                urllib.request.urlopen(self.registry + "/v2/", timeout=2)
            except urllib.error.HTTPError as e:
                return e.code == 401  # it serves, and asks for credentials
            return False
        wait_until("docker-registry", up, 20, p, log)

    def start_kube(self):
        """The emulator with a bearer token and the namespaces shop
        (production) and staging; install() puts the app in them."""
        if not self.emulator:
            raise RuntimeError("no kube emulator given")
        port_file = self.path("kube.port")
        log = self.path("kube.log")
        p = self._spawn("kube", [PY, self.emulator, "--port-file", port_file,
                                 "--lifetime", str(self.lifetime), "--pace", str(self.pace),
                                 "--traffic-interval", str(self.traffic_interval),
                                 "--rps", str(self.rps),
                                 "--token", self.kube_token, "--namespace", NAMESPACE,
                                 "--namespace", STAGING, "--namespace", PODS], log)
        wait_until("kube emulator", lambda: open(port_file).read().strip(), 30, p, log)
        self.kube = "http://127.0.0.1:%s" % open(port_file).read().strip()
        self.kubeconfig = self.path("kubeconfig")
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "local",
               "clusters": [{"name": "local", "cluster": {"server": self.kube}}],
               "users": [{"name": "kpl", "user": {"token": self.kube_token}}],
               "contexts": [{"name": "local", "context": {"cluster": "local", "user": "kpl",
                                                          "namespace": NAMESPACE}}]}
        fd = os.open(self.kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)  # JSON is YAML

    def install(self, image):
        """k8s/*.json (the app's Deployment and Service in production and in
        staging) running image, created through the API and rolled out."""
        self.installed_image = image
        for name in sorted(os.listdir(K8S_DIR)):
            if not name.endswith(".json"):
                continue
            doc = json.loads(open(os.path.join(K8S_DIR, name)).read().replace(
                '"IMAGE"', json.dumps(image)))
            for obj in doc["items"] if doc.get("kind") == "List" else [doc]:
                self.kube_create(obj)
        for ns in (NAMESPACE, STAGING):
            self.wait_rollout("web", image, ns=ns)

    def seed(self, pipeline, version="1.0.0"):
        """The version production runs before the release: the app's
        repository at VERSION version, built and pushed by pipeline
        (build-and-push.kpl.yaml) through kpld, and installed. Returns
        (run id, image as deployed: HOST/app:VERSION@sha256:...)."""
        self.make_repo(version)
        run_id = self.submit(pipeline, {"repo": self.repo})
        self.watch(run_id)
        run = self.get_run(run_id)
        if run["state"] != "RUN_STATE_SUCCEEDED":
            raise RuntimeError("seeding %s: run %s %s: %s" % (version, run_id, run["state"],
                                                           run.get("message")))
        pushed = self.stage(run, "push")["outputs"]["image"]
        name, digest = pushed.split("@", 1)
        image = "%s:%s@%s" % (name, version, digest)
        self.install(image)
        return run_id, image

    def start_prometheus(self):
        """The real Prometheus, scraping the emulator's /metrics every second."""
        conf = self.path("prometheus.yml")
        with open(conf, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: kube-emulator\n"
                    "    metrics_path: /metrics\n"
                    "    static_configs:\n      - targets: ['%s']\n"
                    % self.kube[len("http://"):])
        log = self.path("prometheus.log")

        def start(port):
            return self._spawn("prometheus", [need(self.prometheus_bin, "prometheus"),
                                              "--config.file", conf,
                                              "--storage.tsdb.path", self.path("tsdb"),
                                              "--web.listen-address", "127.0.0.1:%d" % port],
                               log)
        # A port that is surely its own (tests/lib/ports.py).
        p, port = start_on_free_port(start, "prometheus")
        self.prom = "http://127.0.0.1:%d" % port

        def ready():
            with urllib.request.urlopen(self.prom + "/-/ready", timeout=2) as r:
                return r.status == 200
        wait_until("prometheus", ready, 60, p, log, step=0.1)

    def write_config(self):
        cfg = self.path("kpld.yaml")
        lines = []
        if self.registry:
            lines += ["registries:",
                      '  local: { url: "%s", username: %s, password: "${{ secrets.REG_PASS }}" }'
                      % (self.registry, REG_USER)]
        if self.kube:
            lines += ["kubernetes:", '  local: { kubeconfig: "%s" }' % self.kubeconfig]
        if self.prom:
            lines += ["prometheus:", '  local: { url: "%s" }' % self.prom]
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        return cfg

    def start_kpld(self):
        cfg = self.write_config()
        ready = self.path("kpld.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        log = self.path("kpld.log")
        # Stages run in kpld's sandbox, where /tmp (the demo's work
        # directory) is a private, empty one: give them the app's
        # repository, which checkout reads by its path.
        os.makedirs(self.path("app.git"), exist_ok=True)
        extra = []
        if self.console:
            extra = ["--http-listen", "127.0.0.1:0",
                     "--bootstrap-token-file", self.path("admin.token")]
        p = self._spawn("kpld", [self.kpld_bin, "--listen", "127.0.0.1:0",
                                 "--data-dir", self.path("data"), "--config", cfg,
                                 "--sandbox-bind", self.path("app.git"),
                                 "--ready-file", ready, "--log-level", "info"] + extra, log)
        wait_until("kpld", lambda: os.path.exists(ready), 30, p, log, step=0.02)
        lines = open(ready).read().splitlines()
        self.addr = lines[0].strip()
        self.http = next((ln[5:] for ln in lines[1:] if ln.startswith("http=")), None)
        if self.console:
            self.token = open(self.path("admin.token")).read().strip()
        self.client = Client.connect(self.addr, token=self.token)
        if self.registry:
            self.set_secret("REG_PASS", self.reg_pass)

    def set_secret(self, name, value):
        """`kplctl secret set NAME` with the value on stdin when there is a
        kplctl, else the SetSecret RPC: never on a command line."""
        if self.kplctl_bin:
            r = self.kplctl("secret", "set", name, input=value, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError("kplctl secret set %s: %s" % (name, r.stderr.strip()))
        else:
            self.client.call(P + "SetSecret", {"name": name, "value": value})

    def stop_kpld(self, sig=signal.SIGTERM):
        """Stops kpld; returns its exit status."""
        p = self.procs.pop("kpld", None)
        if p is None:
            return None
        if self.client:
            self.client.close()
            self.client = None
        p.send_signal(sig)
        try:
            return p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return "did not stop within 30 s of SIGTERM"

    def stop(self):
        """kpld first (returns its exit status), then the rest, newest first."""
        rc = self.stop_kpld()
        for name in reversed(list(self.procs)):
            p = self.procs.pop(name)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return rc

    # -- the app's repository --------------------------------------------

    def make_repo(self, version=None):
        """A git repository holding tests/e2e/release/app, one commit on
        main. version overrides the VERSION file. Returns its path."""
        self.repo = self.path("app.git")
        shutil.copytree(APP_DIR, self.repo, dirs_exist_ok=True)
        git("init", "-q", "-b", "main", cwd=self.repo)
        return self.commit(version, "app %s" % (version or "from tests/e2e/release/app"))

    def commit(self, version=None, message=None):
        """A new commit on main (VERSION set to version if given); returns
        (repo path, sha)."""
        if version:
            with open(os.path.join(self.repo, "VERSION"), "w") as f:
                f.write(version + "\n")
        git("add", "-A", cwd=self.repo)
        git("commit", "-q", "--allow-empty", "-m", message or "version %s" % version,
            cwd=self.repo)
        return self.repo, git("rev-parse", "HEAD", cwd=self.repo)

    # -- kpld --------------------------------------------------------------

    def env(self):
        """kplctl's environment: the token, if kpld has one."""
        return dict(os.environ, KPL_TOKEN=self.token) if self.token else None

    def kplctl(self, *args, **kw):
        return subprocess.run([self.kplctl_bin, "--server", self.addr, *args], env=self.env(),
                              **kw)

    def submit(self, pipeline_file, params):
        """SubmitRun through gRPC; returns the run id."""
        with open(pipeline_file) as f:
            text = f.read()
        run = self.client.call(P + "SubmitRun", {"pipeline": text, "params": params,
                                                 "idempotency_key": ""})
        return Client.to_dict(run)["id"]

    def watch(self, run_id, timeout=300):
        """WatchRun to the run's end; the events as dicts."""
        return [Client.to_dict(e) for e in
                self.client.stream(P + "WatchRun", {"id": run_id}, timeout=timeout)]

    def get_run(self, run_id):
        return Client.to_dict(self.client.call(P + "GetRun", {"id": run_id}))

    @staticmethod
    def stage(run, name):
        for s in run.get("stages", []):
            if s["name"] == name:
                return s
        raise KeyError("run %s has no stage %s" % (run.get("id"), name))

    # -- the registry, read independently of kpl --------------------------

    def registry_get(self, path, accept=None, method="GET"):
        req = urllib.request.Request(self.registry + path, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(
            ("%s:%s" % (REG_USER, self.reg_pass)).encode()).decode())
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()

    def manifest(self, repo, ref):
        """(digest of the bytes, Docker-Content-Digest, parsed manifest) of
        repo:ref as the registry serves it."""
        _, headers, body = self.registry_get("/v2/%s/manifests/%s" % (repo, ref), ACCEPT)
        return sha256(body), headers.get("docker-content-digest"), json.loads(body)

    def tags(self, repo):
        _, _, body = self.registry_get("/v2/%s/tags/list" % repo)
        return sorted(json.loads(body).get("tags") or [])

    # -- the cluster, read independently of kpl ---------------------------

    def kube_api(self, method, path, body=None, content_type="application/json"):
        req = urllib.request.Request(self.kube + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Authorization", "Bearer " + self.kube_token)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def kube_get(self, path):
        """The object at path, or None when the API says 404."""
        try:
            return self.kube_api("GET", path)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    @staticmethod
    def api_path(obj):
        group = obj["apiVersion"]
        plural = {"Deployment": "deployments", "Service": "services",
                  "VirtualService": "virtualservices",
                  "DestinationRule": "destinationrules"}[obj["kind"]]
        ns = obj["metadata"].get("namespace", NAMESPACE)
        base = "/api/v1" if group == "v1" else "/apis/" + group
        return "%s/namespaces/%s/%s" % (base, ns, plural)

    def kube_create(self, obj):
        return self.kube_api("POST", self.api_path(obj), obj)

    def deployment(self, name, ns=NAMESPACE):
        return self.kube_get("/apis/apps/v1/namespaces/%s/deployments/%s" % (ns, name))

    @staticmethod
    def image_of(dep, container="web"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["name"] == container:
                return c["image"]
        return None

    def wait_rollout(self, name, image, timeout=30, ns=NAMESPACE):
        """Until the Deployment runs image on all its replicas, available."""
        def done():
            d = self.deployment(name, ns)
            st = d.get("status", {})
            want = d["spec"].get("replicas", 1)
            return (self.image_of(d) == image and st.get("updatedReplicas") == want and
                    st.get("availableReplicas") == want and st.get("replicas") == want and
                    st.get("observedGeneration") == d["metadata"].get("generation"))
        wait_until("deployment %s/%s on %s" % (ns, name, image), done, timeout, step=0.1)

    def virtualservice(self, name="web"):
        return self.kube_get("/apis/networking.istio.io/v1/namespaces/%s/virtualservices/%s"
                             % (NAMESPACE, name))

    def vs_weights(self, name="web"):
        """{subset or host: weight} of the VirtualService's routes, or None."""
        vs = self.virtualservice(name)
        if vs is None:
            return None
        out = {}
        for route in vs["spec"].get("http", []):
            for r in route.get("route", []):
                dest = r["destination"]
                out[dest.get("subset") or dest["host"]] = r.get("weight", 100)
        return out

    # -- Prometheus ---------------------------------------------------------

    def prom_query(self, q):
        url = self.prom + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]["result"]
