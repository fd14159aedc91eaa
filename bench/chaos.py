"""Chaos run: many concurrent release-shaped runs while kpld is killed with
SIGKILL at random, against the Jenkins and Kubernetes+Istio emulators, the
real docker-registry and the real Prometheus; every mutating request is
counted at the wire. Not a test (it measures, and takes minutes): a bench.

    /usr/bin/python3 bench/chaos.py KPLD KUBE_EMULATOR JENKINS_EMULATOR \
        [--runs 200] [--kills 200] [--duration 1800] [--seed N] [--json FILE]

Build first: `bazel build //:kpld`; KPLD is then bazel-bin/engine/kpld and
the emulators are tests/emulators/kube/kube_emulator.py and
tests/emulators/jenkins/jenkins_emulator.py. KPL_CHAOS_RUNS, KPL_CHAOS_KILLS
and KPL_CHAOS_DURATION are the defaults of the three options. Exit status 0
when every count below is 0. See bench/README.md for figures.

The pipeline (one per run, each on its own objects, so every side effect has
exactly one owner): checkout (git, a local repository) -> build (driver
jenkins: job `app`, V=<run key>) -> layout (script: copies a prepared OCI
layout) -> push (docker-registry, tag <run key>) -> deploy (staging/web-N,
the pushed image) and mesh (prod/app-N joins the mesh) -> canary (prod/app-N:
10%, 50%, 100%, each verified from Prometheus, then promoted). Submits carry
an idempotency key and are retried across kills.

kpld is killed --kills times while serving, at random moments spread over
the expected run time (half the restarts are killed again in start-up, in
recovery); then it is started once more and every run is awaited.

What is reported (all must be 0 but the times):
  runs lost         a key without exactly one run (answered by SubmitRun or
                    listed by ListRuns); runs still not final --drain
                    seconds after the last kill are reported apart
                    (runs_not_final), and so are FAILED or CANCELLED runs,
                    with their messages (not_succeeded)
  side effects repeated, counted where they land:
    Jenkins builds  builds of one run key beyond the first (the emulator's
                    /emulator/builds; one build per run is the contract)
    registry pushes manifest PUTs of one tag beyond the first (the fault
                    proxy in front of docker-registry: one tag per run)
    Deployment patches  a write (PATCH/PUT) to a Deployment whose body is
                    the same as the previous write to that Deployment (the
                    proxy in front of the emulator): the same change applied
                    twice, even if harmless; plus staging PATCHes beyond one
                    per run (the deploy stage patches its Deployment once)
    weight changes  a write to a VirtualService setting the same route
                    weights as the previous write to it (a canary step
                    applied twice)
  event-stream gaps per run (WatchRun from 1: seqs 1..N, no gap or
                    duplicate, one final run event, last; GetRun.last_seq
                    == N) and global (WatchRuns from 1: seqs strictly
                    increasing, no gap, as many as the runs' events)
  restart to serving  from the spawn of kpld to its ready file (it serves
                    gRPC), and to its first answered ListRuns, for every
                    restart after a kill: min, median, p95, max
"""

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
E2E = os.path.join(HERE, "..", "tests", "e2e")
sys.path.insert(0, E2E)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "lib"))

import grpc  # noqa: E402
from kplgrpc import Client  # noqa: E402
import crash_test  # noqa: E402
import kube_stack  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from push_test import PASS, Registry, make_layout, need  # noqa: E402
from ports import start_on_free_port  # noqa: E402

P = "kpl.v1.Pipelines/"
PY = "/usr/bin/python3"
J_USER, J_TOKEN = "kpl", "chaos-jenkins-token"
FINAL = ("RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED")
RETRYABLE = crash_test.RETRYABLE

JOBS = {"jobs": [{"name": "app", "parameters": [{"name": "V", "default": "0"}, "KPL_RUN_ID"],
                  "script": ["checking out ${V}", {"line": "compiling ${V}", "delay": 0.5},
                             "done ${V}"], "line_delay": 0.1, "result": "SUCCESS",
                  "concurrent": True, "image": "registry.local/app:${V}"}]}


def verify(version_q):
    return {"interval": "1s", "count": 2, "failure_limit": 0, "inconclusive_limit": 2,
            "queries": [{"name": "request-success-rate", "min": 99, "query": version_q}]}


def pipeline(repo, layout):
    """The release shape, as JSON (one text for every run: params pick the
    objects)."""
    q = ('sum(rate(istio_requests_total{reporter="destination",'
         'destination_workload_namespace="prod",destination_version="${{ canary.version }}",'
         'response_code!~"5.*"}[30s])) / sum(rate(istio_requests_total{reporter="destination",'
         'destination_workload_namespace="prod",destination_version="${{ canary.version }}"}'
         '[30s])) * 100')
    return json.dumps({
        "name": "chaos-release",
        "params": {"key": {"required": True}, "n": {"required": True},
                   "cluster": {"required": True}},
        "stages": [
            {"name": "checkout", "kind": "checkout", "with": {"repo": repo, "ref": "main"}},
            {"name": "build", "kind": "build", "needs": ["checkout"],
             "with": {"driver": "jenkins", "jenkins": "ci", "job": "app",
                      "params": {"V": "${{ params.key }}"}}},
            {"name": "layout", "kind": "script", "needs": ["build"],
             "with": {"command": ["cp", "-r", layout, "oci"]}},
            {"name": "push", "kind": "push", "needs": ["layout"],
             "with": {"registry": "reg", "repository": "chaos/app",
                      "tags": ["${{ params.key }}"], "from": "oci:oci"}},
            {"name": "deploy", "kind": "deploy", "needs": ["push"],
             "with": {"cluster": "${{ params.cluster }}", "namespace": "staging", "deployment": "web-${{ params.n }}",
                      "container": "web", "image": "${{ stages.push.outputs.image }}"}},
            {"name": "mesh", "kind": "mesh", "needs": ["push"],
             "with": {"cluster": "${{ params.cluster }}", "namespace": "prod",
                      "deployment": "app-${{ params.n }}", "mode": "mesh", "version": "stable"}},
            {"name": "canary", "kind": "canary", "needs": ["deploy", "mesh"],
             "with": {"cluster": "${{ params.cluster }}", "namespace": "prod",
                      "deployment": "app-${{ params.n }}", "container": "web", "image": "${{ stages.push.outputs.image }}",
                      "version": "c${{ params.n }}", "prometheus": "prom",
                      "steps": [{"weight": 10}, {"verify": verify(q)},
                                {"weight": 50}, {"verify": verify(q)},
                                {"weight": 100}, {"verify": verify(q)}]}},
        ]})


def deployment(ns, name, replicas=1):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"replicas": replicas, "progressDeadlineSeconds": 600,
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web",
                                                           "image": "reg.example/app:0"}]}}}}


def service(ns, name):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80,
                                                           "targetPort": 8080}]}}


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Daemon(crash_test.Daemon):
    """crash_test's kpld (one data directory across restarts, WatchRuns read
    live) with a config, timing each start from spawn to serving."""

    def __init__(self, binary, tmp, config):
        super().__init__(binary, tmp)
        self.config = config
        # the app's repository and the OCI layout live in tmp, which the
        # stages' sandbox (a private /tmp) would hide
        self.extra = ["--sandbox-bind", os.path.join(tmp, "app.git"),
                      "--sandbox-bind", os.path.join(tmp, "layout")]
        self.start_times = []   # seconds from spawn to the ready file
        self.answer_times = []  # ... and to the first answered ListRuns

    def _spawn(self):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        self._t_spawn = time.monotonic()
        with open(self.log, "a") as logf:
            logf.write("==== kpld start (generation %d) ====\n" % (self.gen + 1))
            logf.flush()
            p = subprocess.Popen(
                [self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir,
                 "--ready-file", self.ready, "--config", self.config] + self.extra,
                stdout=logf, stderr=logf)
        # the newest kpld, for main() to kill if the bench fails half-way
        with open(os.path.join(os.path.dirname(self.data_dir), "kpld.pid"), "w") as f:
            f.write(str(p.pid))
        return p

    def start(self):
        """crash_test's start, patient: under load a kpld recovering many
        runs may take longer than a client's default 10 s to answer its
        first call. Records the time from spawn to the ready file and to the
        first answered ListRuns."""
        proc = self._spawn()
        deadline = time.monotonic() + 300
        while not os.path.exists(self.ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                raise AssertionError("kpld did not serve (status %s); log tail:\n%s"
                                     % (proc.returncode, crash_test.tail(self.log)))
            time.sleep(0.01)
        t_ready = time.monotonic() - self._t_spawn
        addr = open(self.ready).read().strip()
        while True:
            try:
                c = Client.connect(addr, timeout=120)
                for m in ("SubmitRun", "GetRun", "ListRuns", "WatchRun", "WatchRuns"):
                    c.method(P + m)
                c.call(P + "ListRuns", {"page_size": 1}, timeout=120)
                break
            except (grpc.RpcError, grpc.FutureTimeoutError, KeyError) as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError("kpld did not answer: %r" % (e,))
        self.start_times.append(t_ready)
        self.answer_times.append(time.monotonic() - self._t_spawn)
        stream = c.stream(P + "WatchRuns", {"from_global_seq": 0}, timeout=3600)
        with self.cond:
            self.proc = proc
            self.gen += 1
            self.client = c
            self.since_start = 0
            self.cond.notify_all()
        self.reader = threading.Thread(target=self._read, args=(stream, self.gen), daemon=True)
        self.reader.start()
        return c


class Chaos:
    def __init__(self, a, tmp):
        self.a = a
        self.tmp = tmp
        self.rng = random.Random(a.seed)
        self.procs = []
        self.lock = threading.Lock()
        self.submit_ids = {}
        self.submit_errors = []

    # -- the stack ---------------------------------------------------------

    def start_stack(self):
        t0 = time.monotonic()
        tmp = self.tmp
        # git repository of the app
        self.repo = os.path.join(tmp, "app.git")
        os.makedirs(self.repo)
        for cmd in (["git", "init", "-q", "-b", "main"],
                    ["git", "-c", "user.name=chaos", "-c", "user.email=chaos@kpl",
                     "commit", "-q", "--allow-empty", "-m", "app"]):
            subprocess.run(cmd, cwd=self.repo, check=True)
        self.layout = os.path.join(tmp, "layout")
        make_layout(self.layout, os.urandom(20000))
        # Jenkins
        jobs = os.path.join(tmp, "jobs.json")
        with open(jobs, "w") as f:
            json.dump(JOBS, f)
        jlog = open(os.path.join(tmp, "jenkins.log"), "w")
        jp = subprocess.Popen([PY, self.a.jenkins_emulator, "--jobs", jobs, "--user",
                               "%s:%s" % (J_USER, J_TOKEN), "--lifetime", "7200",
                               "--queue-delay", "0.5"],
                              stdout=subprocess.PIPE, stderr=jlog, text=True)
        jlog.close()
        self.procs.append(jp)
        self.jenkins = "http://127.0.0.1:%s" % jp.stdout.readline().strip()[5:]
        self.jp = FaultProxy(self.jenkins)
        # Kubernetes + Istio, one staging and one production Deployment per
        # run, in shards of --per-cluster runs per emulator (its controller
        # is one Python thread whose work grows with the objects it holds)
        self.shards = []
        kube_cfg = ""
        n_shards = (self.a.runs + self.a.per_cluster - 1) // self.a.per_cluster
        for k in range(n_shards):
            d = os.path.join(tmp, "kube%d" % k)
            os.makedirs(d)
            kp, kube = kube_stack.start_emulator(
                self.a.kube_emulator, d, ["--pace", "0.3", "--namespace", "staging",
                                          "--namespace", "prod", "--lifetime", "7200",
                                          "--rps", "5", "--bookmark-interval", "5"],
                os.path.join(d, "kube.log"))
            self.procs.append(kp)
            proxy = FaultProxy(kube, record_bodies=True)
            self.shards.append((kube, proxy))
            kc = os.path.join(d, "kubeconfig")
            with open(kc, "w") as f:
                json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                           "clusters": [{"name": "c", "cluster": {"server": proxy.url}}],
                           "users": [{"name": "u", "user": {}}],
                           "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]},
                          f)
            kube_cfg += "  k%d: { kubeconfig: %s }\n" % (k, kc)
        for i in range(self.a.runs):
            kube = self.shards[self.shard(i)][0]
            self.kube_post(kube, "/apis/apps/v1/namespaces/staging/deployments",
                           deployment("staging", "web-%d" % i))
            self.kube_post(kube, "/apis/apps/v1/namespaces/prod/deployments",
                           deployment("prod", "app-%d" % i))
            self.kube_post(kube, "/api/v1/namespaces/prod/services", service("prod", "app-%d" % i))
        # Prometheus scraping every emulator
        conf = os.path.join(tmp, "prometheus.yml")
        with open(conf, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: kube-emulators\n"
                    "    static_configs:\n      - targets: [%s]\n"
                    % ", ".join("'%s'" % k[len("http://"):] for k, _ in self.shards))

        def start(port):
            plog = open(os.path.join(tmp, "prometheus.log"), "a")
            p = subprocess.Popen([kube_stack.PROMETHEUS, "--config.file", conf,
                                  "--storage.tsdb.path", os.path.join(tmp, "tsdb"),
                                  "--web.listen-address", "127.0.0.1:%d" % port],
                                 stdout=plog, stderr=plog)
            plog.close()
            return p
        pp, port = start_on_free_port(start, "prometheus")
        self.procs.append(pp)
        self.prom = "http://127.0.0.1:%d" % port
        kube_stack.wait_for_data(self.prom, pp, tmp, ["vector(1)"], 60)
        # docker-registry
        htpasswd = os.path.join(tmp, "htpasswd")
        with open(htpasswd, "w") as f:
            f.write(subprocess.run([need("htpasswd"), "-Bbn", "kpl", PASS], check=True,
                                   stdout=subprocess.PIPE, text=True).stdout)
        self.reg = Registry(tmp, "reg", "auth:\n  htpasswd:\n    realm: r\n    path: %s\n"
                            % htpasswd)
        self.rp = FaultProxy(self.reg.url)
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("kubernetes:\n%s"
                    "jenkins:\n  ci: { url: \"%s\", username: %s, token: \"%s\" }\n"
                    "prometheus:\n  prom: { url: \"%s\" }\n"
                    "registries:\n  reg: { url: %s, username: kpl, password: \"${{ secrets.RP }}\" }\n"
                    % (kube_cfg, self.jp.url, J_USER, J_TOKEN, self.prom, self.rp.url))
        self.daemon = Daemon(self.a.kpld, tmp, cfg)
        c = self.daemon.start()
        c.call(P + "SetSecret", {"name": "RP", "value": PASS})
        self.daemon.start_times = []   # only restarts after a kill count
        self.daemon.answer_times = []
        print("stack up in %.1fs: %d staging and %d production Deployments in %d "
              "emulators" % (time.monotonic() - t0, self.a.runs, self.a.runs,
                             len(self.shards)), flush=True)

    def shard(self, i):
        return i // self.a.per_cluster

    def kube_post(self, kube, path, obj):
        req = urllib.request.Request(kube + path, method="POST",
                                     data=json.dumps(obj).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def stop_stack(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.reg.stop()
        for p in [self.jp, self.rp] + [k[1] for k in self.shards]:
            p.stop()

    # -- runs --------------------------------------------------------------

    def submit_one(self, i, deadline):
        key = self.keys[i]
        req = {"pipeline": self.text,
               "params": {"key": key, "n": str(i), "cluster": "k%d" % self.shard(i)},
               "idempotency_key": key}
        while time.monotonic() < deadline:
            c, gen = self.daemon.current(deadline)
            try:
                run = c.call(P + "SubmitRun", req, timeout=30)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    with self.lock:
                        self.submit_errors.append("%s: %s %s" % (key, e.code(), e.details()))
                    return
                self.daemon.wait_change(gen, 0.5)
                continue
            except ValueError:
                self.daemon.wait_change(gen, 0.5)
                continue
            with self.lock:
                self.submit_ids.setdefault(key, []).append(run.id)
            return
        with self.lock:
            self.submit_errors.append("%s: not submitted before the deadline" % key)

    def final_count(self):
        """Runs final now (ListRuns through the live kpld), or None."""
        try:
            c, _ = self.daemon.current(time.monotonic() + 5)
            n, token = 0, ""
            while True:
                r = Client.to_dict(c.call(P + "ListRuns", {"page_size": 500,
                                                          "page_token": token}, timeout=20))
                n += sum(1 for x in r.get("runs", []) if x.get("state") in FINAL)
                token = r.get("next_page_token", "")
                if not token:
                    return n
        except Exception:
            return None

    def kill_loop(self, t_end):
        """Kills kpld --kills times, at random, spread over the time still
        expected; stops early at t_end (the duration limit)."""
        kills = startup = 0
        mean = self.a.expected / max(1, self.a.kills)
        while kills < self.a.kills and time.monotonic() < t_end:
            time.sleep(self.rng.uniform(0.05, 2 * mean))
            self.daemon.kill9()
            kills += 1
            if self.rng.random() < 0.5:
                self.daemon.kill_in_startup(self.rng.uniform(0.0, 0.05))
                startup += 1
            self.daemon.start()
            if kills % 10 == 0:
                print("kill %d/%d (+%d in start-up), %.0fs, runs final: %s" %
                      (kills, self.a.kills, startup, time.monotonic() - self.t0,
                       self.final_count()), flush=True)
        return kills, startup

    def wait_final(self, ids, deadline):
        c, _ = self.daemon.current(deadline)
        runs, events, problems = {}, {}, []
        for rid in ids:
            while True:
                got = Client.to_dict(c.call(P + "GetRun", {"id": rid}, timeout=30))
                if got["state"] in FINAL or time.monotonic() > deadline:
                    break
                time.sleep(0.5)  # waiting on the runs, the kpld under test has no such event for many runs
            runs[rid] = got
            if got["state"] not in FINAL:
                problems.append("run %s: %s at the end" % (rid, got["state"]))
                continue
            events[rid] = [Client.to_dict(e) for e in
                           c.stream(P + "WatchRun", {"id": rid, "from_seq": 1}, timeout=60)]
        return runs, events, problems

    # -- counting at the wire ----------------------------------------------

    def side_effects(self):
        out = {}
        with urllib.request.urlopen(self.jenkins + "/emulator/builds", timeout=30) as r:
            builds = json.loads(r.read())
        per_key = collections.Counter(b["params"].get("V") for b in builds)
        out["jenkins_builds"] = sum(per_key.values())
        out["jenkins_builds_repeated"] = sum(n - 1 for n in per_key.values() if n > 1)
        puts = collections.Counter(r["path"] for r in self.rp.seen("PUT")
                                   if "/manifests/" in r["path"])
        out["registry_manifest_puts"] = sum(puts.values())
        out["registry_pushes_repeated"] = sum(n - 1 for n in puts.values() if n > 1)
        out["registry_tags_repeated"] = sorted(t for t, n in puts.items() if n > 1)[:20]
        with open(os.path.join(self.tmp, "wire.json"), "w") as f:
            json.dump({"registry": self.rp.seen(),
                       "kube": [kp.seen() for _, kp in self.shards],
                       "jenkins": self.jp.seen(), "builds": builds}, f)
        dep_writes = collections.defaultdict(list)
        vs_writes = collections.defaultdict(list)
        staging = collections.Counter()
        for r in [r for _, kp in self.shards for r in kp.seen()]:
            if r["method"] not in ("PATCH", "PUT", "POST") or r.get("status", 0) >= 300:
                continue
            if re.match(r"^/apis/apps/v1/namespaces/[^/]+/deployments/[^/]+$", r["path"]):
                dep_writes[r["path"]].append(r["body"])
                if "/namespaces/staging/" in r["path"] and r["method"] == "PATCH":
                    staging[r["path"]] += 1
            elif re.match(r"^/apis/networking.istio.io/[^/]+/namespaces/[^/]+/virtualservices(/|$)",
                          r["path"]):
                w = weights(r["body"])
                if w is not None:
                    name = r["path"].rstrip("/").split("/")[-1]
                    if name == "virtualservices":
                        name = json_name(r["body"])
                    vs_writes[name].append(w)
        out["deployment_writes"] = sum(len(v) for v in dep_writes.values())
        out["deployment_patches_repeated"] = (
            sum(consecutive_repeats(v) for v in dep_writes.values()) +
            sum(n - 1 for n in staging.values() if n > 1))
        out["weight_changes"] = sum(len(v) for v in vs_writes.values())
        out["weight_changes_repeated"] = sum(consecutive_repeats(v) for v in vs_writes.values())
        return out

    # -- the whole run -----------------------------------------------------

    def run(self):
        a = self.a
        self.start_stack()
        self.text = pipeline(self.repo, self.layout)
        self.keys = ["chaos-%d-%03d" % (a.seed, i) for i in range(a.runs)]
        self.t0 = time.monotonic()
        t_end = self.t0 + a.duration
        subs = [threading.Thread(target=self.submit_one, args=(i, t_end), daemon=True)
                for i in range(a.runs)]
        for t in subs:
            t.start()
        kills, startup = self.kill_loop(t_end)
        t_kills = time.monotonic() - self.t0
        print("killed kpld %d times while serving and %d in start-up, in %.0fs" %
              (kills, startup, t_kills), flush=True)
        for t in subs:
            t.join(max(0.0, t_end - time.monotonic()))
        ids, lost = {}, list(self.submit_errors)
        for key in self.keys:
            got = set(self.submit_ids.get(key, []))
            if len(got) != 1:
                lost.append("key %s: runs %r" % (key, sorted(got)))
            else:
                ids[key] = got.pop()
        c, _ = self.daemon.current(time.monotonic() + 30)
        listed = collections.Counter()
        token = ""
        while True:
            r = Client.to_dict(c.call(P + "ListRuns", {"page_size": 500, "page_token": token}))
            for x in r.get("runs", []):
                listed[x["id"]] += 1
            token = r.get("next_page_token", "")
            if not token:
                break
        for key, rid in ids.items():
            if listed[rid] != 1:
                lost.append("key %s: run %s listed %d times" % (key, rid, listed[rid]))
        runs, events, not_final = self.wait_final(list(ids.values()),
                                                  time.monotonic() + a.drain)
        t_all = time.monotonic() - self.t0
        states = collections.Counter(r["state"] for r in runs.values())
        not_ok = ["%s: %s" % (rid, "; ".join("%s %s %s" % (s["name"], s["state"], s.get("message", ""))
                                            for s in r["stages"] if s["state"] != "STAGE_STATE_SUCCEEDED"))
                  for rid, r in runs.items() if r["state"] != "RUN_STATE_SUCCEEDED"]
        gaps = []
        total_events = 0
        for rid, evs in events.items():
            seqs = [int(e.get("seq", 0)) for e in evs]
            total_events += len(seqs)
            if seqs != list(range(1, len(seqs) + 1)):
                gaps.append("run %s: seqs not 1..%d" % (rid, len(seqs)))
            finals = [i for i, e in enumerate(evs) if e.get("run_state") in FINAL]
            if finals != [len(evs) - 1]:
                gaps.append("run %s: final run events at %r of %d" % (rid, finals, len(evs)))
            if int(runs[rid].get("last_seq", 0)) != len(seqs):
                gaps.append("run %s: last_seq %s, %d events" % (rid, runs[rid].get("last_seq"),
                                                                len(seqs)))
        glob = global_events(c, total_events)
        gseqs = [int(e.get("global_seq", 0)) for e in glob]
        if gseqs != list(range(1, len(gseqs) + 1)) or len(gseqs) != total_events:
            gaps.append("WatchRuns: %d events, seqs 1..%d expected %d (first bad at %r)" % (
                len(gseqs), len(gseqs), total_events,
                next((i for i, s in enumerate(gseqs) if s != i + 1), None)))
        fx = self.side_effects()
        st = self.daemon.start_times
        at = self.daemon.answer_times
        report = {
            "runs": a.runs, "kills": kills, "kills_in_startup": startup, "seed": a.seed,
            "seconds_kill_phase": round(t_kills, 1), "seconds_total": round(t_all, 1),
            "states": dict(states), "runs_lost": len(lost), "lost": lost[:20],
            "runs_not_final": len(not_final), "not_final": not_final[:20],
            "not_succeeded": not_ok[:20], "event_gaps": len(gaps), "gaps": gaps[:20],
            "restart_to_serving_s": {"n": len(st), "min": round(min(st), 3) if st else None,
                                     "median": round(pct(st, 50), 3) if st else None,
                                     "p95": round(pct(st, 95), 3) if st else None,
                                     "max": round(max(st), 3) if st else None},
            "restart_to_first_answer_s": {"n": len(at), "min": round(min(at), 3) if at else None,
                                          "median": round(pct(at, 50), 3) if at else None,
                                          "p95": round(pct(at, 95), 3) if at else None,
                                          "max": round(max(at), 3) if at else None},
            "kpld_died_on_its_own": self.daemon.died,
        }
        report.update(fx)
        rc = self.daemon.stop()
        report["kpld_sigterm_exit"] = rc
        return report


def global_events(c, total, idle=60):
    """WatchRuns from 1 until total events came, or none for idle s."""
    out = []
    stream = c.stream(P + "WatchRuns", {"from_global_seq": 1}, timeout=3600)
    last = [time.monotonic()]
    done = threading.Event()

    def watchdog():
        while not done.wait(1):
            if time.monotonic() - last[0] > idle:
                stream.cancel()
                return
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for ev in stream:
            out.append(Client.to_dict(ev))
            last[0] = time.monotonic()
            if len(out) >= total:
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            raise
    done.set()
    stream.cancel()
    return out


def weights(body):
    """The route weights a VirtualService write sets, as a tuple, or None."""
    try:
        j = json.loads(body or "null")
    except ValueError:
        return None
    try:
        http = j["spec"]["http"]
    except (KeyError, TypeError):
        return None
    out = []
    for h in http or []:
        out.append(tuple((d.get("destination", {}).get("subset") or
                          d.get("destination", {}).get("host"), d.get("weight"))
                         for d in h.get("route", [])))
    return tuple(out)


def json_name(body):
    try:
        return json.loads(body)["metadata"]["name"]
    except (ValueError, KeyError, TypeError):
        return "?"


def consecutive_repeats(writes):
    return sum(1 for x, y in zip(writes, writes[1:]) if x == y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kpld")
    ap.add_argument("kube_emulator")
    ap.add_argument("jenkins_emulator")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KPL_CHAOS_RUNS") or 200))
    ap.add_argument("--kills", type=int, default=int(os.environ.get("KPL_CHAOS_KILLS") or 200))
    ap.add_argument("--duration", type=float,
                    default=float(os.environ.get("KPL_CHAOS_DURATION") or 1800),
                    help="seconds at most for submits and kills")
    ap.add_argument("--drain", type=float, default=1200,
                    help="seconds the runs get to end after the last kill (default 1200)")
    ap.add_argument("--expected", type=float, default=0,
                    help="seconds the kills are spread over (default: duration / 2)")
    ap.add_argument("--per-cluster", type=int, default=25,
                    help="runs per Kubernetes emulator (default 25)")
    ap.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1, 10**6))
    ap.add_argument("--json", help="write the report there too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    a.kpld, a.kube_emulator, a.jenkins_emulator = (os.path.abspath(p) for p in
                                                   (a.kpld, a.kube_emulator, a.jenkins_emulator))
    if not a.expected:
        a.expected = a.duration / 2
    tmp = tempfile.mkdtemp(prefix="kpl-chaos-")
    print("chaos: %d runs, %d kills, at most %.0fs, seed %d, tmp %s" %
          (a.runs, a.kills, a.duration, a.seed, tmp), flush=True)
    ch = Chaos(a, tmp)
    try:
        report = ch.run()
    except BaseException:
        # the newest kpld may be one start() had not handed over yet
        try:
            os.kill(int(open(os.path.join(tmp, "kpld.pid")).read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        raise
    finally:
        try:
            if ch.daemon.proc:
                ch.daemon.proc.kill()
        except Exception:
            pass
        try:
            ch.stop_stack()
        except Exception:
            pass
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = (report["runs_lost"] + report["runs_not_final"] + report["event_gaps"] + report["jenkins_builds_repeated"] +
           report["registry_pushes_repeated"] + report["deployment_patches_repeated"] +
           report["weight_changes_repeated"] + len(report["kpld_died_on_its_own"]))
    if not bad and not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
