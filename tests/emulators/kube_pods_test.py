#!/usr/bin/python3
"""The Kubernetes emulator's pods, secrets, claims, RBAC and request log, checked with the installed
kubectl (run, get -w, logs -f, delete, auth can-i, apply) and raw API calls where kubectl has no verb
(log options, grace periods, fault knobs).

Usage: kube_pods_test.py EMULATOR   (sh_test //tests/emulators:kube_pods_test)
Every wait is bounded: a deadline is a failure bound, never a synchronisation.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl") or "/usr/bin/kubectl"
PY = "/usr/bin/python3"
DEADLINE = 60   # seconds any awaited state may take under heavy load


class Emulator:
    def __init__(self, path, work, *args):
        self.work = work
        self.root = os.path.join(work, "pods-root")
        port_file = os.path.join(work, "port")
        self.err = open(os.path.join(work, "emulator.err"), "w")
        self.proc = subprocess.Popen([PY, path, "--port-file", port_file, "--lifetime", "600",
                                      "--pod-root", self.root] + list(args),
                                     stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("emulator did not start: " + open(self.err.name).read())
            time.sleep(0.05)   # waiting for the process to listen
        self.base = "http://127.0.0.1:%s" % open(port_file).read().strip()
        self.kubeconfig = os.path.join(work, "kubeconfig")
        self.write_kubeconfig(self.kubeconfig)

    def write_kubeconfig(self, path, token=None):
        with open(path, "w") as f:
            f.write("apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster: {server: \"%s\"}\n"
                    "users:\n- name: u\n  user: {%s}\ncontexts:\n- name: emu\n  context: {cluster: emu, "
                    "user: u, namespace: default}\ncurrent-context: emu\n"
                    % (self.base, "token: %s" % token if token else ""))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()

    # raw API
    def call(self, method, path, body=None, ctype="application/json", token=None, raw=False):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE) as r:
                out = r.read()
                return r.status, (out if raw else json.loads(out or b"null"))
        except urllib.error.HTTPError as e:
            out = e.read()
            try:
                return e.code, json.loads(out)
            except ValueError:
                return e.code, out

    def pod(self, name, ns="default"):
        code, obj = self.call("GET", "/api/v1/namespaces/%s/pods/%s" % (ns, name))
        return obj if code == 200 else None

    def await_pod(self, name, pred, what, ns="default"):
        """Polls the pod until pred(pod) holds (None = gone); fails after DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        last = None
        while time.monotonic() < deadline:
            last = self.pod(name, ns)
            if pred(last):
                return last
            time.sleep(0.05)   # polling the API for an awaited state
        raise AssertionError("pod %s: %s not reached; last: %s" % (name, what, json.dumps(last)[:2000]))


def eq(got, want, what):
    if got != want:
        raise AssertionError("%s: expected %r, got %r" % (what, want, got))


def contains(hay, needle, what):
    if needle not in hay:
        raise AssertionError("%s: %r not in %r" % (what, needle, hay[-3000:]))


def phase(p):
    return (p or {}).get("status", {}).get("phase")


def cstate(p, i=0):
    return ((((p or {}).get("status") or {}).get("containerStatuses") or [{}])[i]).get("state") or {}


class Suite:
    def __init__(self, emulator, work):
        self.work = work
        self.emu = Emulator(emulator, work, "--pace", "0.2", "--container-log-max-bytes", "100000")
        self.env = dict(os.environ, KUBECONFIG=self.emu.kubeconfig, HOME=work)

    def k(self, *args, ok=True, inp=None):
        p = subprocess.run([KUBECTL] + list(args), env=self.env, input=inp, capture_output=True, text=True,
                           timeout=DEADLINE * 2)
        if ok and p.returncode != 0:
            raise AssertionError("kubectl %s failed (%d): %s%s" % (" ".join(args), p.returncode, p.stdout,
                                                                   p.stderr))
        return p.stdout + p.stderr if not ok else p.stdout

    def apply(self, yaml_text):
        return self.k("apply", "-f", "-", inp=yaml_text)

    def create_pod(self, name, script, image="registry.example/step:1", extra=None, ns="default"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"restartPolicy": "Never", "containers": [
                   {"name": "step", "image": image, "command": ["/bin/sh", "-c", script]}]}}
        for k, v in (extra or {}).items():
            if k == "container":
                pod["spec"]["containers"][0].update(v)
            else:
                pod["spec"][k] = v
        code, out = self.emu.call("POST", "/api/v1/namespaces/%s/pods" % ns, pod)
        eq(code, 201, "create pod %s: %s" % (name, out))
        return out

    def ws(self, name="ws"):
        """A claim and its host directory."""
        code, out = self.emu.call("POST", "/api/v1/namespaces/default/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        eq(code, 201, "create claim %s" % name)
        eq(out["status"]["phase"], "Bound", "claim bound at once")
        d = os.path.join(self.emu.root, "pvcs", "default", name)
        eq(os.path.isdir(d), True, "claim directory %s exists" % d)
        return d

    @staticmethod
    def ws_extra(claim="ws"):
        return {"volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": claim}}],
                "container": {"volumeMounts": [{"name": "ws", "mountPath": "/ws"}]}}

    # ---- tests

    def test_run_watch_phases(self):
        """kubectl run + get pod -w: Pending → Running → Completed, the real command's exit."""
        code, lst = self.emu.call("GET", "/api/v1/namespaces/default/pods")
        rv = lst["metadata"]["resourceVersion"]
        out = self.k("run", "w1", "--image=busybox:1.36", "--restart=Never", "--",
                     "sh", "-c", "echo one; sleep 0.5; echo two")
        contains(out, "pod/w1 created", "kubectl run")
        p = self.emu.await_pod("w1", lambda p: phase(p) == "Succeeded", "Succeeded")
        t = cstate(p)["terminated"]
        eq((t["exitCode"], t["reason"]), (0, "Completed"), "terminated state")
        for k in ("startedAt", "finishedAt", "containerID"):
            eq(bool(t.get(k)), True, "terminated.%s set" % k)
        conds = {c["type"]: c for c in p["status"]["conditions"]}
        for typ in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
            eq(typ in conds, True, "condition %s present" % typ)
        eq(conds["Ready"]["status"], "False", "Ready after completion")
        eq(conds["Ready"].get("reason"), "PodCompleted", "Ready reason after completion")
        eq(p["spec"]["nodeName"], "emulated-node", "scheduled to the node")
        eq(p["status"]["containerStatuses"][0]["image"], "busybox:1.36", "image recorded")
        # the history as a raw watch from before the creation: the phases in order
        code, body = self.emu.call("GET", "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1&"
                                   "fieldSelector=metadata.name%%3Dw1&resourceVersion=%s" % rv, raw=True)
        phases = []
        for line in body.decode().splitlines():
            ev = json.loads(line)
            ph = ev["object"].get("status", {}).get("phase")
            st = cstate(ev["object"])
            label = "%s:%s" % (ph, ",".join(sorted(st)))
            if not phases or phases[-1] != label:
                phases.append(label)
        eq([x.split(":")[0] for x in phases if x.split(":")[0]][0], "Pending", "first phase")
        eq(any(x == "Running:running" for x in phases), True, "a Running event: %s" % phases)
        eq(phases[-1], "Succeeded:terminated", "last event")
        # kubectl get -w shows the current state and ends with its request timeout
        out = self.k("get", "pod", "w1", "--watch", "--request-timeout=2s", ok=False)
        contains(out, "Completed", "kubectl get -w")
        out = self.k("get", "pods")
        eq(bool(re.search(r"w1\s+0/1\s+Completed\s+0", out)), True, "kubectl get pods: %s" % out)
        contains(self.k("logs", "w1"), "one\ntwo\n", "kubectl logs")

    def test_failed_exit_and_termination_message(self):
        self.create_pod("tm1", "echo out; echo 'why it failed' > /dev/termination-log; exit 3")
        p = self.emu.await_pod("tm1", lambda p: phase(p) == "Failed", "Failed")
        t = cstate(p)["terminated"]
        eq((t["exitCode"], t["reason"], t["message"]), (3, "Error", "why it failed\n"), "terminated")
        self.create_pod("tm2", "head -c 5000 /dev/zero | tr '\\0' x > /dev/termination-log")
        p = self.emu.await_pod("tm2", lambda p: phase(p) == "Succeeded", "Succeeded")
        eq(len(cstate(p)["terminated"]["message"]), 4096, "termination message cut at 4096 bytes")
        self.create_pod("tm3", "echo result > /tekton/termination",
                        extra={"container": {"terminationMessagePath": "/tekton/termination"}})
        p = self.emu.await_pod("tm3", lambda p: phase(p) == "Succeeded", "Succeeded")
        eq(cstate(p)["terminated"]["message"], "result\n", "custom terminationMessagePath")
        self.create_pod("tm4", "echo last words; exit 1",
                        extra={"container": {"terminationMessagePolicy": "FallbackToLogsOnError"}})
        p = self.emu.await_pod("tm4", lambda p: phase(p) == "Failed", "Failed")
        eq(cstate(p)["terminated"]["message"], "last words\n", "FallbackToLogsOnError")
        self.create_pod("tm5", "exit 0", extra={"container": {"command": ["no-such-binary-x"]}})
        p = self.emu.await_pod("tm5", lambda p: phase(p) == "Failed", "Failed")
        t = cstate(p)["terminated"]
        eq((t["exitCode"], t["reason"]), (128, "StartError"), "missing executable")
        contains(t["message"], 'exec: "no-such-binary-x": executable file not found in $PATH', "StartError")

    def test_already_exists_and_errors(self):
        self.create_pod("dup", "sleep 0.2")
        code, out = self.emu.call("POST", "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dup"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}})
        eq((code, out["kind"], out["reason"], out["message"]), (409, "Status", "AlreadyExists",
                                                               'pods "dup" already exists'), "409")
        eq(out["details"], {"name": "dup", "group": "", "kind": "pods"}, "409 details")
        code, out = self.emu.call("GET", "/api/v1/namespaces/default/pods/nosuch")
        eq((code, out["reason"], out["message"]), (404, "NotFound", 'pods "nosuch" not found'), "404")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/nosuch")
        eq((code, out["reason"]), (404, "NotFound"), "delete of a missing pod")
        code, out = self.emu.call("POST", "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad"}, "spec": {"containers": []}})
        eq((code, out["reason"]), (422, "Invalid"), "no containers")
        code, out = self.emu.call("GET", "/api/v1/namespaces/default/pods?labelSelector=nosuch%3Dx")
        eq((code, out["kind"], out["items"]), (200, "PodList", []), "list with a selector")

    def test_logs_follow_and_options(self):
        d = self.ws("logws")
        self.create_pod("lg", "echo first; echo err >&2; while [ ! -f /ws/go ]; do sleep 0.05; done; "
                        "echo second; printf partial", extra=self.ws_extra("logws"))
        self.emu.await_pod("lg", lambda p: phase(p) == "Running", "Running")
        f = subprocess.Popen([KUBECTL, "logs", "-f", "lg"], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        eq(f.stdout.readline(), "first\n", "logs -f: first line streamed while the process runs")
        eq(f.stdout.readline(), "err\n", "logs -f: stderr interleaved")
        open(os.path.join(d, "go"), "w").close()
        rest = f.stdout.read()
        eq(f.wait(DEADLINE), 0, "logs -f ends when the container ends")
        eq(rest, "second\npartial", "logs -f: the rest, up to the end of the container")
        self.emu.await_pod("lg", lambda p: phase(p) == "Succeeded", "Succeeded")
        base = "/api/v1/namespaces/default/pods/lg/log"
        code, body = self.emu.call("GET", base + "?timestamps=true", raw=True)
        lines = body.decode().split("\n")
        for ln in lines:
            if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (first|err|second|partial)$", ln):
                raise AssertionError("timestamped line %r" % ln)
        code, body = self.emu.call("GET", base + "?tailLines=2", raw=True)
        eq(body, b"second\npartial", "tailLines=2")
        code, body = self.emu.call("GET", base + "?limitBytes=8", raw=True)
        eq(body, b"first\ner", "limitBytes cuts mid-line")
        code, body = self.emu.call("GET", base + "?sinceTime=2099-01-01T00:00:00Z", raw=True)
        eq((code, body), (200, b""), "sinceTime in the future")
        ts = lines[2].split(" ")[0]
        code, body = self.emu.call("GET", base + "?timestamps=true&sinceTime=" + urllib.parse.quote(ts),
                                   raw=True)
        eq(body.decode().split("\n")[-2:], lines[2:], "sinceTime: from that line's second on")
        contains(body.decode(), lines[2], "sinceTime of a line includes it (second precision)")
        code, out = self.emu.call("GET", base + "?tailLines=-1")
        eq((code, out["reason"]), (422, "Invalid"), "tailLines < 0")
        code, out = self.emu.call("GET", base + "?sinceSeconds=5&sinceTime=" + urllib.parse.quote(ts))
        eq((code, out["reason"]), (422, "Invalid"), "sinceSeconds with sinceTime")
        code, out = self.emu.call("GET", base + "?container=nosuch")
        eq((code, out["message"]), (400, "container nosuch is not valid for pod lg"), "unknown container")
        # two containers: container= is required
        code, out = self.emu.call("POST", "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "two"},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "a", "image": "x", "command": ["sh", "-c", "echo from-a"]},
                {"name": "b", "image": "x", "command": ["sh", "-c", "echo from-b"]}]}})
        self.emu.await_pod("two", lambda p: phase(p) == "Succeeded", "Succeeded")
        code, out = self.emu.call("GET", "/api/v1/namespaces/default/pods/two/log")
        eq((code, out["message"]), (400, "a container name must be specified for pod two, choose one of: [a b]"),
           "multi-container log without container")
        eq(self.k("logs", "two", "-c", "b"), "from-b\n", "kubectl logs -c")
        # waiting to start
        self.create_pod("pl", "true", image="registry.example/pullerror:1")
        self.emu.await_pod("pl", lambda p: "waiting" in cstate(p), "waiting")
        out = self.k("logs", "pl", ok=False)
        contains(out, 'container "step" in pod "pl" is waiting to start', "log of a waiting container")

    def test_log_cap(self):
        self.create_pod("big", "seq -f 'line %06g of the big log, padded to about fifty bytes' 1 5000")
        self.emu.await_pod("big", lambda p: phase(p) == "Succeeded", "Succeeded")
        code, body = self.emu.call("GET", "/api/v1/namespaces/default/pods/big/log", raw=True)
        lines = body.decode().splitlines()
        eq((len(body) <= 100000, lines[-1]), (True, "line 005000 of the big log, padded to about fifty bytes"),
           "the log keeps its newest 100000 bytes (--container-log-max-bytes)")
        eq(lines[0].startswith("line 00"), True, "whole lines are dropped: %r" % lines[0])
        eq(int(lines[0].split()[1]) > 1, True, "the oldest lines went")

    def test_env_secrets_volumes(self):
        d = self.ws("envws")
        self.apply("""
apiVersion: v1
kind: Secret
metadata: {name: s1}
stringData: {token: abc, other: xyz}
data: {bin: aGVsbG8=}
""")
        code, sec = self.emu.call("GET", "/api/v1/namespaces/default/secrets/s1")
        eq(sec["data"], {"bin": "aGVsbG8=", "other": "eHl6", "token": "YWJj"}, "stringData merged into data")
        eq(("stringData" in sec, sec["type"]), (False, "Opaque"), "stringData never returned; type")
        out = self.k("get", "secrets")
        contains(out, "s1     Opaque   3      ", "kubectl get secrets")
        script = ("echo TOKEN=$TOKEN X_other=$X_other bin=$X_bin V=$(V) lit='$$(V)'; cat /sec/token; echo; "
                  "pwd; echo data > /ws/f; echo tmp > /tmp/t; ls /scratch; cat /cm/k")
        self.create_pod("env1", script, extra={
            "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "envws"}},
                        {"name": "sec", "secret": {"secretName": "s1"}},
                        {"name": "scratch", "emptyDir": {}},
                        {"name": "cm", "configMap": {"name": "cm1"}}],
            "container": {"workingDir": "/ws/sub", "env": [
                {"name": "V", "value": "vee"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "token"}}}],
                "envFrom": [{"secretRef": {"name": "s1"}, "prefix": "X_"}],
                "volumeMounts": [{"name": "ws", "mountPath": "/ws"}, {"name": "sec", "mountPath": "/sec"},
                                 {"name": "scratch", "mountPath": "/scratch"},
                                 {"name": "cm", "mountPath": "/cm"}]}})
        p = self.emu.await_pod("env1", lambda p: "waiting" in cstate(p) and
                               cstate(p)["waiting"].get("reason") == "ContainerCreating" and
                               "cm1" in cstate(p)["waiting"].get("message", ""), "waiting for the ConfigMap")
        self.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm1}\ndata: {k: from-cm}\n")
        p = self.emu.await_pod("env1", lambda p: phase(p) in ("Succeeded", "Failed"), "finished")
        eq(phase(p), "Succeeded", "env pod: %s" % json.dumps(cstate(p)))
        eq(self.k("logs", "env1"), "TOKEN=abc X_other=xyz bin=hello V=vee lit=$(V)\nabc\n/ws/sub\nfrom-cm",
           "env, $(VAR), secret volume, workingDir, configMap volume")
        eq(open(os.path.join(d, "f")).read(), "data\n", "the claim's host directory has the pod's file")
        eq(os.path.exists("/tmp/t") and open("/tmp/t").read() == "tmp\n", False, "the pod's /tmp is private")
        # a missing key: CreateContainerConfigError until it exists
        self.create_pod("env2", "echo $K", extra={"container": {"env": [
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}]}})
        p = self.emu.await_pod("env2", lambda p: cstate(p).get("waiting", {}).get("reason") ==
                               "CreateContainerConfigError", "CreateContainerConfigError")
        eq(cstate(p)["waiting"]["message"], 'secret "s2" not found', "config error message")
        eq(phase(p), "Pending", "phase while the secret is missing")
        code, _ = self.emu.call("POST", "/api/v1/namespaces/default/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s2"}, "stringData": {"k": "late"}})
        eq(code, 201, "create s2")
        self.emu.await_pod("env2", lambda p: phase(p) == "Succeeded", "Succeeded once the secret exists")
        eq(self.k("logs", "env2"), "late\n", "env from the late secret")
        # the claim's directory goes with the claim
        self.k("delete", "pvc", "envws")
        eq(os.path.exists(d), False, "claim directory removed with the claim")
        code, out = self.emu.call("POST", "/api/v1/namespaces/default/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad64"}, "data": {"k": "!!!"}})
        eq((code, out["reason"]), (422, "Invalid"), "data must be base64")

    def test_delete_grace(self):
        d = self.ws("delws")
        ex = self.ws_extra("delws")
        ex["terminationGracePeriodSeconds"] = 30
        self.create_pod("g1", "trap 'echo term > /ws/g1-term; exit 0' TERM; echo $$ > /ws/g1-pid; "
                        "while :; do sleep 0.05; done", extra=ex)
        self.emu.await_pod("g1", lambda p: phase(p) == "Running" and os.path.exists(os.path.join(d, "g1-pid")),
                           "Running with its trap set")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/g1",
                                  {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 10,
                                   "propagationPolicy": "Background"})
        eq(code, 200, "graceful delete answers 200")
        eq((bool(out["metadata"].get("deletionTimestamp")), out["metadata"].get("deletionGracePeriodSeconds")),
           (True, 10), "deletionTimestamp and grace on the answer")
        self.emu.await_pod("g1", lambda p: p is None, "gone after the process exits on SIGTERM")
        eq(open(os.path.join(d, "g1-term")).read(), "term\n", "the process got SIGTERM")
        # TERM ignored: SIGKILL after the grace period; Terminating meanwhile
        self.create_pod("g2", "trap '' TERM; echo started > /ws/g2; while :; do sleep 0.05; done", extra=ex)
        self.emu.await_pod("g2", lambda p: phase(p) == "Running" and os.path.exists(os.path.join(d, "g2")),
                           "Running with its trap set")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/g2?gracePeriodSeconds=300")
        eq(code, 200, "delete with the grace period in the query")
        p = self.emu.pod("g2")
        eq(bool(p and p["metadata"].get("deletionTimestamp")), True, "still there, terminating")
        contains(self.k("get", "pod", "g2"), "Terminating", "kubectl shows Terminating")
        eq(phase(self.emu.pod("g2")), "Running", "TERM ignored: still running")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/g2?gracePeriodSeconds=1")
        eq((code, out["metadata"]["deletionGracePeriodSeconds"]), (200, 1), "a second delete shortens the grace")
        self.emu.await_pod("g2", lambda p: p is None, "gone after SIGKILL")
        # force: gone at once, the process killed
        self.create_pod("g3", "echo $$ > /ws/g3-pid; exec sleep 1000", extra=ex)
        self.emu.await_pod("g3", lambda p: phase(p) == "Running" and os.path.exists(os.path.join(d, "g3-pid")),
                           "Running")
        out = self.k("delete", "pod", "g3", "--grace-period=0", "--force")
        contains(out, 'pod "g3" force deleted', "kubectl delete --force")
        eq(self.emu.pod("g3"), None, "force delete: gone at once")
        # kubectl delete waits for the graceful end
        self.create_pod("g4", "exec sleep 1000", extra={"terminationGracePeriodSeconds": 30})
        self.emu.await_pod("g4", lambda p: phase(p) == "Running", "Running")
        contains(self.k("delete", "pod", "g4"), 'pod "g4" deleted', "kubectl delete")
        eq(self.emu.pod("g4"), None, "gone when kubectl delete returns")
        # a finished pod goes at once; preconditions
        self.create_pod("g5", "true")
        p = self.emu.await_pod("g5", lambda p: phase(p) == "Succeeded", "Succeeded")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/g5",
                                  {"preconditions": {"uid": "wrong"}})
        eq((code, out["reason"]), (409, "Conflict"), "uid precondition")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/pods/g5",
                                  {"preconditions": {"uid": p["metadata"]["uid"]}})
        eq(code, 200, "delete with the right uid")
        eq(self.emu.pod("g5"), None, "a finished pod is removed at once")

    def test_init_containers(self):
        d = self.ws("initws")
        ex = self.ws_extra("initws")
        ex["initContainers"] = [{"name": "prep", "image": "registry.example/prep:1", "command": [
            "sh", "-c", "echo init-log; while [ ! -f /ws/go ]; do sleep 0.05; done; echo prepared > /ws/p"],
            "volumeMounts": [{"name": "ws", "mountPath": "/ws"}]}]
        self.create_pod("in1", "cat /ws/p", extra=ex)
        p = self.emu.await_pod("in1", lambda p: "running" in (((p["status"].get("initContainerStatuses") or [{}])[0])
                                                             .get("state") or {}), "the init container running")
        eq(cstate(p)["waiting"]["reason"], "PodInitializing", "the main container waits")
        conds = {c["type"]: c for c in p["status"]["conditions"]}
        eq((conds["Initialized"]["status"], conds["Initialized"]["reason"], phase(p)),
           ("False", "ContainersNotInitialized", "Pending"), "initializing")
        eq(bool(re.search(r"in1\s+0/1\s+Init:0/1", self.k("get", "pod", "in1"))), True, "kubectl: Init:0/1")
        open(os.path.join(d, "go"), "w").close()
        p = self.emu.await_pod("in1", lambda p: phase(p) in ("Succeeded", "Failed"), "finished")
        eq(phase(p), "Succeeded", "the pod after its init container")
        eq(self.k("logs", "in1"), "prepared\n", "the main container saw the init container's file")
        eq(self.k("logs", "in1", "-c", "prep"), "init-log\n", "the init container's log")
        eq(p["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"], "Completed", "init status")
        # a failing init container with restartPolicy Never fails the pod; the main one never starts
        ex2 = {"initContainers": [{"name": "prep", "image": "x", "command": ["sh", "-c", "exit 2"]}]}
        self.create_pod("in2", "echo never", extra=ex2)
        p = self.emu.await_pod("in2", lambda p: phase(p) == "Failed", "Failed")
        eq(p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"], 2, "init exit code")
        eq(cstate(p)["waiting"]["reason"], "PodInitializing", "the main container never started")
        eq(bool(re.search(r"in2\s+0/1\s+Init:Error", self.k("get", "pod", "in2"))), True, "kubectl: Init:Error")

    def test_restart_policy(self):
        self.create_pod("rp", "echo run; exit 1", extra={"restartPolicy": "OnFailure"})
        p = self.emu.await_pod("rp", lambda p: (p["status"].get("containerStatuses") or [{}])[0]
                               .get("restartCount", 0) >= 2, "restarted twice")
        eq(phase(p), "Running", "a restarting pod is Running")
        eq(p["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 1, "lastState")
        code, body = self.emu.call("GET", "/api/v1/namespaces/default/pods/rp/log?previous=true", raw=True)
        eq((code, body), (200, b"run\n"), "previous log")
        self.k("delete", "pod", "rp", "--grace-period=0", "--force")

    def test_failure_modes(self):
        self.create_pod("pe", "true", image="registry.example/pullerror:1.0")
        p = self.emu.await_pod("pe", lambda p: cstate(p).get("waiting", {}).get("reason") == "ErrImagePull",
                               "ErrImagePull")
        contains(cstate(p)["waiting"]["message"], 'Failed to pull image "registry.example/pullerror:1.0"',
                 "ErrImagePull message")
        p = self.emu.await_pod("pe", lambda p: cstate(p).get("waiting", {}).get("reason") == "ImagePullBackOff",
                               "ImagePullBackOff")
        eq(cstate(p)["waiting"]["message"], 'Back-off pulling image "registry.example/pullerror:1.0"',
           "ImagePullBackOff message")
        eq(phase(p), "Pending", "pull errors keep the pod Pending")
        self.create_pod("un", "true", image="registry.example/unschedulable:1")
        p = self.emu.await_pod("un", lambda p: (p["status"].get("conditions") or [{}])[0].get("reason") ==
                               "Unschedulable", "Unschedulable")
        c = p["status"]["conditions"][0]
        eq((c["type"], c["status"], phase(p), p["spec"].get("nodeName")),
           ("PodScheduled", "False", "Pending", None), "unschedulable")
        contains(c["message"], "0/1 nodes are available: 1 Insufficient cpu.", "unschedulable message")
        contains(self.k("get", "pod", "un"), "Pending", "kubectl shows Pending")
        self.create_pod("oo", "echo big; exec sleep 1000", image="registry.example/app:oom")
        p = self.emu.await_pod("oo", lambda p: phase(p) == "Failed", "Failed")
        t = cstate(p)["terminated"]
        eq((t["reason"], t["exitCode"]), ("OOMKilled", 137), "OOMKilled")
        self.create_pod("bloom", "true", image="registry.example/bloom:1")
        eq(cstate(self.emu.await_pod("bloom", lambda p: phase(p) == "Succeeded", "Succeeded"))
           ["terminated"]["reason"], "Completed", "'oom' inside a word is not OOM")
        # eviction
        self.create_pod("ev", "exec sleep 1000")
        self.emu.await_pod("ev", lambda p: phase(p) == "Running", "Running")
        code, out = self.emu.call("POST", "/emulator/evict", {"namespace": "default", "name": "ev"})
        eq((code, out), (200, {"pods": ["default/ev"]}), "evict")
        p = self.emu.await_pod("ev", lambda p: phase(p) == "Failed", "Failed")
        eq((p["status"]["reason"], p["status"]["message"].startswith("The node was low on resource: memory.")),
           ("Evicted", True), "evicted")
        eq(cstate(p)["terminated"]["exitCode"], 137, "evicted container killed")
        # activeDeadlineSeconds: stopped (SIGTERM) and failed by the kubelet
        self.create_pod("dl", "exec sleep 1000", extra={"activeDeadlineSeconds": 1})
        p = self.emu.await_pod("dl", lambda p: phase(p) == "Failed", "Failed")
        eq((p["status"]["reason"], p["status"]["message"], cstate(p)["terminated"]["exitCode"]),
           ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline", 143),
           "active deadline")
        # node lost: Ready=False, then Terminating (taint manager), then gone (pod GC)
        self.create_pod("nl", "exec sleep 1000")
        self.emu.await_pod("nl", lambda p: phase(p) == "Running", "Running")
        code, lst = self.emu.call("GET", "/api/v1/namespaces/default/pods")
        rv = lst["metadata"]["resourceVersion"]
        code, out = self.emu.call("POST", "/emulator/node-lost", {"name": "nl", "delete_after": 0.3,
                                                                  "gc_after": 0.3})
        eq(out, {"pods": ["default/nl"]}, "node-lost")
        self.emu.await_pod("nl", lambda p: p is None, "gone")
        code, body = self.emu.call("GET", "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1&"
                                   "fieldSelector=metadata.name%%3Dnl&resourceVersion=%s" % rv, raw=True)
        evs = [json.loads(l) for l in body.decode().splitlines()]
        ready = [[c["status"] for c in e["object"]["status"]["conditions"] if c["type"] == "Ready"][0]
                 for e in evs]
        eq(ready[0], "False", "node lost: Ready=False first")
        eq(cstate(evs[0]["object"]).get("running") is not None, True, "node lost: last known state kept")
        eq(bool(evs[1]["object"]["metadata"].get("deletionTimestamp")), True, "then terminating")
        eq(evs[1]["object"]["status"]["conditions"][0]["reason"], "DeletionByTaintManager", "DisruptionTarget")
        eq(evs[-1]["type"], "DELETED", "then deleted")
        for n in ("pe", "un"):
            self.k("delete", "pod", n)

    def test_rbac(self):
        self.apply("""
apiVersion: v1
kind: Namespace
metadata: {name: ci}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: runner, namespace: ci}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pods-rw, namespace: ci}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [only-this]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: runner-pods, namespace: ci}
subjects:
- {kind: ServiceAccount, name: runner, namespace: ci}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pods-rw}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ns-reader}
rules:
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list]
- apiGroups: [apps]
  resources: ["*"]
  verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: runner-ns}
subjects:
- {kind: Group, name: "system:serviceaccounts:ci", apiGroup: rbac.authorization.k8s.io}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ns-reader}
""")
        out = self.k("get", "sa,role,rolebinding", "-n", "ci", "-o", "wide")
        for want in ("serviceaccount/runner", "role.rbac.authorization.k8s.io/pods-rw",
                     "rolebinding.rbac.authorization.k8s.io/runner-pods"):
            contains(out, want, "kubectl get sa,role,rolebinding")
        eq(bool(re.search(r"runner-pods\s+Role/pods-rw\s+\S+\s+ci/runner", out)), True, "binding row: " + out)
        contains(self.k("get", "clusterrole,clusterrolebinding"), "clusterrolebinding.rbac.authorization.k8s.io/"
                 "runner-ns", "cluster-scoped RBAC objects listed")
        sa = "--as=system:serviceaccount:ci:runner"
        for args, want in [(("create", "pods"), "yes"), (("delete", "pods"), "yes"), (("patch", "pods"), "no"),
                           (("get", "pods", "--subresource=log"), "yes"),
                           (("get", "pods", "--subresource=exec"), "no"),
                           (("create", "pods", "-n", "default"), "no"), (("list", "secrets"), "no"),
                           (("get", "secrets/only-this"), "yes"), (("get", "secrets/other"), "no"),
                           (("list", "namespaces"), "yes"), (("list", "deployments.apps"), "yes"),
                           (("create", "deployments.apps"), "no")]:
            out = self.k("auth", "can-i", sa, "-n", "ci", *args, ok=False).strip()
            eq(out.splitlines()[0] if out else "", want, "kubectl auth can-i %s" % " ".join(args))
        eq(self.k("auth", "can-i", "patch", "pods", "-n", "ci").strip(), "yes", "the admin may do anything")
        out = self.k("auth", "can-i", "--list", sa, "-n", "ci")
        for row in (r"^pods\s+\[\]\s+\[\]\s+\[get list watch create delete\]$",
                    r"^pods/log\s+\[\]\s+\[\]\s+\[get\]$",
                    r"^secrets\s+\[\]\s+\[only-this\]\s+\[get\]$",
                    r"^namespaces\s+\[\]\s+\[\]\s+\[get list\]$"):
            eq(bool(re.search(row, out, re.M)), True, "can-i --list has /%s/:\n%s" % (row, out))
        # a service account's bearer token: RBAC on every request
        code, out = self.emu.call("POST", "/emulator/token", {"namespace": "ci", "serviceAccount": "runner"})
        tok = out["token"]
        code, out = self.emu.call("GET", "/api/v1/namespaces/ci/pods", token=tok)
        eq(code, 200, "allowed list")
        code, out = self.emu.call("GET", "/api/v1/namespaces/ci/secrets", token=tok)
        eq((code, out["reason"], out["message"]), (403, "Forbidden", 'secrets is forbidden: User '
           '"system:serviceaccount:ci:runner" cannot list resource "secrets" in API group "" in the namespace '
           '"ci"'), "forbidden list")
        code, out = self.emu.call("DELETE", "/apis/apps/v1/namespaces/ci/deployments/web", token=tok)
        eq((code, out["message"]), (403, 'deployments.apps "web" is forbidden: User "system:serviceaccount:ci:'
                                         'runner" cannot delete resource "deployments" in API group "apps" in the '
                                         'namespace "ci"'), "forbidden delete")
        code, out = self.emu.call("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": "ci", "verb": "get", "resource": "pods",
                                            "subresource": "log"}}}, token=tok)
        eq((code, out["status"]["allowed"]), (201, True), "SelfSubjectAccessReview with the token")
        contains(out["status"]["reason"], 'RoleBinding "runner-pods/ci" of Role "pods-rw"', "review reason")
        code, out = self.emu.call("GET", "/version", token=tok)
        eq(code, 200, "discovery is open")

    def test_service_account_token_in_pods(self):
        self.apply("""
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: default}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
""")
        d = "/var/run/secrets/kubernetes.io/serviceaccount"
        script = ('cat %s/namespace; echo; T=$(cat %s/token); for p in pods/sa1 secrets; do '
                  'curl -s -o /dev/null -w "%%{http_code}\\n" -H "Authorization: Bearer $T" '
                  '"http://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/$p"; done; '
                  'cp %s/token /ws/sa1-token' % (d, d, d))
        self.ws("saws")
        ex = self.ws_extra("saws")
        ex["serviceAccountName"] = "reader"
        self.create_pod("sa1", script, extra=ex)
        self.emu.await_pod("sa1", lambda p: phase(p) in ("Succeeded", "Failed"), "finished")
        eq(self.k("logs", "sa1"), "default\n200\n403\n", "the pod's token is its service account's, under RBAC")
        tok = open(os.path.join(self.emu.root, "pvcs", "default", "saws", "sa1-token")).read()
        code, _ = self.emu.call("GET", "/api/v1/namespaces/default/pods/sa1", token=tok)
        eq(code, 200, "the token works while the pod exists")
        # without --token an unknown token is the admin, like no token: the list is allowed again
        sec = "/api/v1/namespaces/default/secrets"
        eq(self.emu.call("GET", sec, token=tok)[0], 403, "the pod's token may not list secrets")
        self.k("delete", "pod", "sa1")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and self.emu.call("GET", sec, token=tok)[0] != 200:
            time.sleep(0.05)   # the kubelet forgets the pod's token shortly after the pod is gone
        eq(self.emu.call("GET", sec, token=tok)[0], 200, "the token is no longer the service account's")
        self.create_pod("sa2", "ls %s 2>&1 || true" % d, extra={"automountServiceAccountToken": False})
        self.emu.await_pod("sa2", lambda p: phase(p) == "Succeeded", "Succeeded")
        contains(self.k("logs", "sa2"), "No such file or directory", "automountServiceAccountToken: false")

    def test_claim_protection(self):
        d = self.ws("protws")
        self.create_pod("pp", "exec sleep 1000", extra=self.ws_extra("protws"))
        self.emu.await_pod("pp", lambda p: phase(p) == "Running", "Running")
        code, out = self.emu.call("DELETE", "/api/v1/namespaces/default/persistentvolumeclaims/protws")
        eq((code, bool(out["metadata"].get("deletionTimestamp"))), (200, True), "a claim in use: Terminating")
        code, out = self.emu.call("GET", "/api/v1/namespaces/default/persistentvolumeclaims/protws")
        eq((code, os.path.isdir(d)), (200, True), "still there while the pod uses it")
        contains(self.k("get", "pvc", "protws"), "protws", "kubectl get pvc")
        self.k("delete", "pod", "pp", "--grace-period=0", "--force")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and self.emu.call(
                "GET", "/api/v1/namespaces/default/persistentvolumeclaims/protws")[0] != 404:
            time.sleep(0.05)   # the protection controller removes it once the pod is gone
        eq(self.emu.call("GET", "/api/v1/namespaces/default/persistentvolumeclaims/protws")[0], 404,
           "gone with the pod")
        eq(os.path.exists(d), False, "its directory too")

    def test_statefulset(self):
        self.apply("""
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{port: 5432, name: pg}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - {name: db, image: registry.example/db:1, volumeMounts: [{name: data, mountPath: /data}]}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 2Gi}}
""")
        out = self.k("rollout", "status", "statefulset/db", "--timeout=%ds" % DEADLINE)
        contains(out, "partitioned roll out complete: 2 new pods have been updated", "rollout status sts")
        out = self.k("get", "pvc")
        eq(bool(re.search(r"data-db-0\s+Bound\s+pvc-\S+\s+2Gi\s+RWO", out)), True, "claim per pod: " + out)
        contains(self.k("get", "pods", "-l", "app=db", "-o", "name"), "pod/db-0\npod/db-1", "pods db-0, db-1")
        contains(self.k("get", "sts", "db"), "2/2", "kubectl get sts")

    def test_request_log(self):
        self.emu.call("DELETE", "/emulator/requests")
        self.create_pod("rq", "echo hi")
        self.emu.await_pod("rq", lambda p: phase(p) == "Succeeded", "Succeeded")
        self.k("logs", "rq")
        self.k("delete", "pod", "rq")
        code, out = self.emu.call("GET", "/emulator/requests")
        got = set((e["verb"], e["group"], e["resource"], e["subresource"], e["namespace"]) for e in out["items"])
        for want in [("create", "", "pods", "", "default"), ("get", "", "pods", "", "default"),
                     ("get", "", "pods", "log", "default"), ("delete", "", "pods", "", "default")]:
            eq(want in got, True, "request log has %s: %s" % (want, sorted(got)))


def main(argv):
    emulator = os.path.abspath(argv[1])
    work = tempfile.mkdtemp(prefix="kube_pods_test.", dir=os.environ.get("TEST_TMPDIR"))
    only = os.environ.get("ONLY")
    suite = Suite(emulator, work)
    fails = 0
    try:
        for name in [n for n in Suite.__dict__ if n.startswith("test_")]:
            if only and name not in only.split(","):
                continue
            t0 = time.monotonic()
            try:
                getattr(suite, name)()
                print("ok   - %s (%.1fs)" % (name, time.monotonic() - t0))
            except Exception:
                fails += 1
                print("FAIL - %s" % name)
                traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
    finally:
        suite.emu.stop()
    err = open(os.path.join(work, "emulator.err")).read()
    if "Traceback" in err:
        fails += 1
        print("FAIL - the emulator logged a traceback:\n" + err[-5000:])
    if fails:
        print("%d test(s) failed; files in %s" % (fails, work))
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
