"""End-to-end test of pod stages (`runs_on`, stages/pod.c) against the
Kubernetes emulator, whose kubelet runs a standalone pod's command as a
local process (tests/emulators/kube):

    /usr/bin/python3 tests/e2e/pods_test.py PATH/TO/kpld PATH/TO/kube_emulator.py

A pod stage runs and its lines arrive as log events; its outputs (the
termination message) reach a later stage; a secret reaches the command
through the attempt's Kubernetes Secret and never appears in the Pod; kill
-9 of kpld mid-stage, its data directory moved, a new kpld re-attaches: the
pod was created once (the emulator's request log), the command ran once (a
file it appends to), no log line is lost or repeated; a create whose reply
is lost is sent again and its 409 means attach; cancel and the stage
timeout delete the pod; each failure names the pod and what Kubernetes said
(a non-zero exit, ErrImagePull, Unschedulable, OOMKilled, Evicted, the node
lost), and the retry policy applies.

The pods' processes see the host's files but a private /tmp: the files the
tests share with them live under TEST_TMPDIR (bazel's, outside /tmp).
Waiting is on the WatchRun stream or on the emulator's objects, with
generous deadlines.
"""

import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_test  # noqa: E402
from e2e_test import Daemon, P, assert_eq, run_suite, submit, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402
from kube_stack import start_emulator  # noqa: E402

NS = "ci"
SECRET = "tok-Pod-Secret-7Hq2"


def logs(events, stage=None):
    return [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"
            and e.get("stream") != "LOG_STREAM_SYSTEM" and (stage is None or e.get("stage") == stage)]


def pipeline(name, shell, runs_on="", extra="", stage_extra="", env=""):
    """One pod stage `work` (its runs_on keys after the defaults) and extra
    stages after it."""
    return ("name: %s\nparams:\n  dir: { default: \"\" }\n%s"
            "defaults:\n  runs_on: { cluster: emu, namespace: %s, image: \"busybox:1.36\" }\n"
            "stages:\n  - name: work\n    kind: script\n%s    with:\n      shell: |\n%s"
            "    runs_on: { %s }\n%s"
            % (name, env, NS, stage_extra,
               "".join("        %s\n" % ln for ln in shell.strip("\n").split("\n")),
               runs_on, extra))


class Suite:
    def __init__(self, binary, emulator, tmp):
        self.tmp = tmp
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
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
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("kubernetes:\n  emu: { kubeconfig: %s }\n" % kc)
        self.cfg = cfg
        self.data = os.path.join(tmp, "data")
        self.daemon = Daemon(binary, self.data, ["--config", cfg])
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "TOKEN", "value": SECRET})

    # -- helpers ---------------------------------------------------------

    def api(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def pod(self, name):
        return self.api("GET", "/api/v1/namespaces/%s/pods/%s" % (NS, name))

    def pods_of(self, run_id):
        code, lst = self.api("GET", "/api/v1/namespaces/%s/pods?labelSelector=kpl.dev%%2Frun%%3D%s"
                             % (NS, run_id))
        assert_eq(code, 200, "list pods")
        return lst["items"]

    def wait_pod(self, run_id, what, pred, seconds=60):
        """The run's first pod once pred(pod) holds (the emulator's state;
        no event of kpld's to wait on)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            items = self.pods_of(run_id)
            if items and pred(items[0]):
                return items[0]
            time.sleep(0.1)
        raise AssertionError("pod of run %s: %s did not happen within %d s" % (run_id, what, seconds))

    def creates(self, run_id=None):
        """POST pods seen by the emulator (its request log), for run_id's
        pods when given."""
        code, reqs = self.api("GET", "/emulator/requests")
        assert_eq(code, 200, "emulator request log")
        out = []
        for r in reqs["items"]:
            if r.get("verb") == "create" and r.get("resource") == "pods" and not r.get("subresource"):
                out.append(r)
        return out

    def wait_stdout(self, run_id):
        """Follows the run's events until the command's first line (the pod
        was created, and kpld recorded so, before it)."""
        stream = self.c.stream(P + "WatchRun", {"id": run_id}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and ev.get("stream") == "LOG_STREAM_STDOUT":
                stream.cancel()
                return ev
        raise AssertionError("run %s ended without a line of its command" % run_id)

    def run_to_end(self, text, params=None):
        run = Client.to_dict(submit(self.c, text, params))
        events = watch(self.c, run["id"])
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})), events

    def assert_gone(self, run):
        """Every pod and Secret of the run is deleted."""
        items = self.pods_of(run["id"])
        assert_eq([p["metadata"]["name"] for p in items], [], "pods left of run %s" % run["id"])
        code, lst = self.api("GET", "/api/v1/namespaces/%s/secrets?labelSelector=kpl.dev%%2Frun%%3D%s"
                             % (NS, run["id"]))
        assert_eq([s["metadata"]["name"] for s in lst["items"]], [], "secrets left")

    # -- tests ----------------------------------------------------------

    def test_pod_stage_runs_and_outputs_flow(self):
        text = pipeline("pod-ok", """
echo "hello from $HOSTNAME"
echo "in $PWD"
echo "second line"
echo version=1.2.3 >> "$KPL_OUTPUTS"
echo "digest=sha256:abc" >> "$KPL_OUTPUTS"
""", extra="  - name: after\n    kind: script\n    needs: [work]\n"
            "    with: { command: [\"echo\", \"got ${{ stages.work.outputs.version }}\"] }\n")
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        work = run["stages"][0]
        assert_eq(work["outputs"], {"version": "1.2.3", "digest": "sha256:abc"}, "outputs")
        got = logs(events, "work")
        assert_eq(got[1:], ["in /workspace", "second line"], "the pod's lines as events")
        assert got[0].startswith("hello from kpl-%s-work-1" % run["id"]), got[0]
        assert_eq(logs(events, "after"), ["got 1.2.3"], "the output reached a later stage")
        system = [e["message"] for e in events if e.get("stream") == "LOG_STREAM_SYSTEM"
                  and e.get("stage") == "work"]
        assert any(m.startswith("created pod kpl-") and "namespace ci, cluster emu" in m
                   for m in system), system
        self.assert_gone(run)

    def test_lint_names_an_unknown_cluster(self):
        # ValidatePipeline (kplctl lint through kpld) checks runs_on.cluster
        # against the daemon config, as it does deploy's with.cluster.
        def diags(text):
            r = Client.to_dict(self.c.call(P + "ValidatePipeline", {"pipeline": text}))
            return r.get("valid", False), [(d.get("path"), d.get("message"), d.get("line"))
                                           for d in r.get("diagnostics", [])]
        valid, got = diags(pipeline("pod-nope", "true", runs_on="cluster: nope"))
        assert not valid, got
        assert_eq([(p, m) for p, m, _ in got],
                  [("stages[0].runs_on.cluster", "no kubernetes.nope in the daemon config %s "
                    "(declared: emu)" % self.cfg)], "diagnostics")
        valid, got = diags(pipeline("pod-nope", "true").replace("cluster: emu", "cluster: nope"))
        assert_eq(([p for p, _, _ in got], got[0][2]), (["defaults.runs_on.cluster"], 5),
                  "defaults' diagnostic, once, at its line")
        assert_eq(diags(pipeline("pod-ok", "true"))[0], True, "a known cluster")

    def test_a_long_line_is_cut_into_events(self):
        # 2 MB on one line (past the HTTP layer's usual 1 MiB line bound):
        # events of at most 8 KiB, and the stream goes on after it.
        text = pipeline("pod-long", "head -c 2000000 /dev/zero | tr '\\0' x; echo\necho after\n")
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        got = logs(events, "work")
        assert_eq(got[-1], "after", "the line after the long one")
        assert_eq(sum(len(m) for m in got[:-1]), 2000000, "the long line's bytes")
        assert max(len(m.encode()) for m in got) <= 8192, max(len(m) for m in got)

    def test_workspace_empty_or_the_runs_claim(self):
        # Without runs_on.workspace a pod stage starts in an empty
        # /workspace; with it, the run's pod stages share one claim, deleted
        # when the run ends.
        text = ("name: pod-ws\nstages:\n"
                "  - name: empty\n    kind: script\n"
                "    with: { shell: 'echo \"files: $(ls -A | wc -l)\"; echo x > mine' }\n"
                "    runs_on: { cluster: emu, namespace: ci, image: busybox }\n"
                "  - name: write\n    kind: script\n    needs: [empty]\n"
                "    with: { shell: 'echo \"files: $(ls -A | wc -l)\"; echo shared > note' }\n"
                "    runs_on: { cluster: emu, namespace: ci, image: busybox, workspace: 64Mi }\n"
                "  - name: read\n    kind: script\n    needs: [write]\n"
                "    with: { shell: 'echo \"read $(cat note)\"' }\n"
                "    runs_on: { cluster: emu, namespace: ci, image: busybox, workspace: 64Mi }\n")
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        assert_eq((logs(events, "empty"), logs(events, "write"), logs(events, "read")),
                  (["files: 0"], ["files: 0"], ["read shared"]), "what each stage saw")
        claim = "kpl-%s-ws" % run["id"]
        deadline = time.monotonic() + 30
        while self.api("GET", "/api/v1/namespaces/%s/persistentvolumeclaims/%s"
                       % (NS, claim))[0] != 404:
            if time.monotonic() > deadline:
                raise AssertionError("claim %s still there 30 s after the run" % claim)
            time.sleep(0.1)  # kpld deletes it after the run's end; no event to wait on
        self.assert_gone(run)

    def test_secret_through_a_kubernetes_secret(self):
        go = os.path.join(self.shared, "go-secret")
        text = pipeline("pod-secret", """
echo "token: $TOKEN (${#TOKEN} bytes)"
while [ ! -e "$KPL_PARAM_DIR/go-secret" ]; do sleep 0.05; done
""", env="env:\n  TOKEN: \"${{ secrets.TOKEN }}\"\n")
        run = Client.to_dict(submit(self.c, text, {"dir": self.shared}))
        self.wait_stdout(run["id"])
        pod = self.wait_pod(run["id"], "running", lambda p: True)
        spec = json.dumps(pod)
        assert SECRET not in spec, "the secret's value is in the Pod object"
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        ref = env["TOKEN"]["valueFrom"]["secretKeyRef"]
        assert_eq(ref["key"], "TOKEN", "secretKeyRef key")
        assert "value" not in env["TOKEN"], env["TOKEN"]
        code, sec = self.api("GET", "/api/v1/namespaces/%s/secrets/%s" % (NS, ref["name"]))
        assert_eq(code, 200, "the attempt's Secret exists while the pod runs")
        assert_eq(sec["metadata"]["labels"]["kpl.dev/run"], run["id"], "the Secret's run label")
        assert_eq(pod["spec"]["restartPolicy"], "Never", "restartPolicy")
        labels = pod["metadata"]["labels"]
        assert_eq((labels["kpl.dev/run"], labels["kpl.dev/stage"], labels["kpl.dev/attempt"]),
                  (run["id"], "work", "1"), "labels")
        open(go, "w").close()
        events = watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % got.get("message"))
        # The command got the value (redaction replaces exactly it); the
        # log shows it redacted.
        assert_eq(logs(events, "work"), ["token: *** (%d bytes)" % len(SECRET)],
                  "the secret reached the command")
        self.assert_gone(run)

    def _restart_mid_stage(self, sig, move):
        go = os.path.join(self.shared, "go-%d" % sig)
        ledger = os.path.join(self.shared, "ledger-%d" % sig)
        text = pipeline("pod-survive", """
echo ran >> "$KPL_PARAM_DIR/ledger-%d"
i=0
while [ ! -e "$KPL_PARAM_DIR/go-%d" ]; do i=$((i+1)); echo "line $i"; sleep 0.02; done
echo "line end"
""" % (sig, sig))
        before = len(self.creates())
        run = Client.to_dict(submit(self.c, text, {"dir": self.shared}))
        self.wait_stdout(run["id"])
        self.c.close()
        rc = self.daemon.stop(sig)
        if sig == signal.SIGTERM:
            assert_eq(rc, 0, "kpld's exit status on SIGTERM (the pod left running)")
        # The pod goes on printing while no kpld listens.
        self.wait_pod(run["id"], "running", lambda p: p["status"].get("phase") == "Running")
        if move:
            moved = self.data + "-moved"
            os.rename(self.data, moved)
            self.data = moved
        self.daemon = Daemon(self.daemon.binary, self.data, ["--config", self.cfg])
        self.c = self.daemon.start()
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq((got["state"], got["stages"][0]["state"], got["stages"][0]["attempt"]),
                  ("RUN_STATE_RUNNING", "STAGE_STATE_RUNNING", 1), "running after the restart")
        open(go, "w").close()
        events = watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % got.get("message"))
        assert_eq([int(e["seq"]) for e in events], list(range(1, len(events) + 1)),
                  "no event gap or duplicate")
        lines = logs(events, "work")
        assert_eq(lines[-1], "line end", "last line")
        n = len(lines) - 1
        assert n >= 2, lines
        assert_eq(lines[:-1], ["line %d" % i for i in range(1, n + 1)],
                  "every line once, in order, across the restart")
        assert_eq(open(ledger).read(), "ran\n", "the command ran once")
        assert_eq(len(self.creates()) - before, 1, "pods created for the attempt")
        system = [e["message"] for e in events if e.get("stream") == "LOG_STREAM_SYSTEM"]
        assert any(m.startswith("re-attached to pod kpl-") for m in system), system
        self.assert_gone(run)

    def test_kill9_moved_data_dir_reattaches_once(self):
        self._restart_mid_stage(signal.SIGKILL, True)

    def test_sigterm_reattaches_once(self):
        self._restart_mid_stage(signal.SIGTERM, False)

    def test_lost_create_reply_attaches(self):
        # The API server creates the pod but its reply is lost (RST): kpld
        # sends the create again, gets 409 AlreadyExists and attaches to
        # that pod; the command runs once.
        ledger = os.path.join(self.shared, "ledger-lost")
        text = pipeline("pod-lost-reply", 'echo ran >> "$KPL_PARAM_DIR/ledger-lost"\necho done\n')
        before = len(self.creates())
        code, _ = self.api("POST", "/emulator/fault", {
            "path_prefix": "/api/v1/namespaces/%s/pods" % NS, "method": "POST", "after": True})
        assert_eq(code, 200, "fault")
        run, events = self.run_to_end(text, {"dir": self.shared})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        system = [e["message"] for e in events if e.get("stream") == "LOG_STREAM_SYSTEM"]
        assert any("POST pods:" in m and "sending it again" in m for m in system), system
        assert any(m.startswith("attached to the existing pod kpl-") for m in system), system
        assert_eq(logs(events, "work"), ["done"], "the pod's log")
        assert_eq(open(ledger).read(), "ran\n", "the command ran once")
        assert_eq(len(self.creates()) - before, 2, "creates sent (the lost one, then 409)")
        self.assert_gone(run)

    def test_cancel_deletes_the_pod(self):
        # exec: SIGTERM reaches the sleep itself (a shell killed between
        # its fork and the sleep's start would leave the sleep to the
        # SIGKILL after the grace period, as in a real cluster).
        text = pipeline("pod-cancel", "echo started\nexec sleep 300\n")
        run = Client.to_dict(submit(self.c, text))
        self.wait_stdout(run["id"])
        pod = self.wait_pod(run["id"], "running", lambda p: True)
        self.c.call(P + "CancelRun", {"id": run["id"]}, timeout=90)
        watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq((got["state"], got["stages"][0]["state"]),
                  ("RUN_STATE_CANCELLED", "STAGE_STATE_CANCELLED"), "states")
        assert "deleted pod %s" % pod["metadata"]["name"] in got["stages"][0]["message"], got
        self.assert_gone(run)

    def test_timeout_deletes_the_pod(self):
        text = pipeline("pod-timeout", "echo started\nexec sleep 300\n", stage_extra="    timeout: 3s\n")
        run, _ = self.run_to_end(text)
        assert_eq((run["state"], run["stages"][0]["message"]),
                  ("RUN_STATE_FAILED", "timed out after 3s"), "timeout")
        self.assert_gone(run)

    def _fails(self, name, shell, runs_on, want, fault=None, stage_extra=""):
        text = pipeline(name, shell, runs_on=runs_on, stage_extra=stage_extra)
        run = Client.to_dict(submit(self.c, text))
        if fault:
            pod = self.wait_pod(run["id"], "running",
                                lambda p: p["status"].get("phase") == "Running")
            code, out = self.api("POST", "/emulator/" + fault,
                                 {"namespace": NS, "name": pod["metadata"]["name"]})
            assert_eq(code, 200, "fault %s: %s" % (fault, out))
        watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        msg = got["stages"][0]["message"]
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state (%s)" % msg)
        assert ("pod kpl-" in msg and "(namespace ci, cluster emu)" in msg), msg
        for w in want:
            assert w in msg, "%r lacks %r" % (msg, w)
        self.assert_gone(got)
        return got

    def test_rbac_the_documented_verbs_suffice(self):
        # kpld as a service account bound to a Role with exactly the verbs
        # docs/security.md lists: a pod stage with a secret and the
        # workspace claim runs; without `watch` it fails, naming it.
        rules = [{"apiGroups": [""], "resources": ["pods"],
                  "verbs": ["create", "get", "list", "watch", "delete"]},
                 {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                 {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
                 {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
                  "verbs": ["create", "delete"]}]
        rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/%s/" % NS
        code, _ = self.api("POST", rbac + "roles", {"metadata": {"name": "kpld"}, "rules": rules})
        assert_eq(code, 201, "Role")
        code, _ = self.api("POST", rbac + "rolebindings", {
            "metadata": {"name": "kpld"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kpld"},
            "subjects": [{"kind": "ServiceAccount", "name": "kpld", "namespace": NS}]})
        assert_eq(code, 201, "RoleBinding")
        code, tok = self.api("POST", "/emulator/token", {"namespace": NS, "serviceAccount": "kpld"})
        assert_eq(code, 200, "token")
        kc = os.path.join(self.tmp, "kubeconfig-sa")
        with open(kc, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "sa",
                       "clusters": [{"name": "c", "cluster": {"server": self.base}}],
                       "users": [{"name": "sa", "user": {"token": tok["token"]}}],
                       "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa",
                                                               "namespace": NS}}]}, f)
        with open(self.cfg, "a") as f:
            f.write("  sa: { kubeconfig: %s }\n" % kc)
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld's exit status on SIGTERM")
        self.daemon = Daemon(self.daemon.binary, self.data, ["--config", self.cfg])
        self.c = self.daemon.start()
        text = pipeline("pod-rbac", 'echo "token ${#TOKEN} bytes" > note\ncat note\n',
                        runs_on="cluster: sa, workspace: 16Mi",
                        env="env:\n  TOKEN: \"${{ secrets.TOKEN }}\"\n")
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state (%s)" % run.get("message"))
        assert_eq(logs(events, "work"), ["token %d bytes" % len(SECRET)], "the pod's log")
        self.assert_gone(run)
        rules[0]["verbs"].remove("watch")
        code, _ = self.api("PUT", rbac + "roles/kpld", {"metadata": {"name": "kpld"},
                                                         "rules": rules})
        assert_eq(code, 200, "Role without watch")
        run, _ = self.run_to_end(pipeline("pod-rbac", "true", runs_on="cluster: sa",
                                          stage_extra="    timeout: 60s\n"))
        msg = run["stages"][0]["message"]
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state (%s)" % msg)
        assert "cannot watch it" in msg and "Forbidden" in msg, msg
        self.assert_gone(run)

    def test_exit_status(self):
        self._fails("pod-exit", "echo failing\nexit 3\n", "", ["the command exited with status 3"])

    def test_image_pull_error(self):
        self._fails("pod-pull", "true", "image: \"reg.example/pullerror:1\", image_pull_timeout: 2s",
                    ["image reg.example/pullerror:1 cannot be pulled", "ImagePullBackOff",
                     "runs_on.image_pull_timeout"])

    def test_unschedulable(self):
        self._fails("pod-sched", "true", "image: \"reg.example/unschedulable\", schedule_timeout: 2s",
                    ["cannot be scheduled", "Unschedulable", "0/1 nodes are available"])

    def test_oom_killed(self):
        self._fails("pod-oom", "echo eating\nsleep 60\n", "image: \"reg.example/oom\"",
                    ["OOMKilled"])

    def test_evicted(self):
        self._fails("pod-evict", "echo working\nsleep 60\n", "", ["Evicted",
                    "The node was low on resource: memory"], fault="evict")

    def test_node_lost(self):
        self._fails("pod-node", "echo working\nsleep 60\n", "", ["node was lost"],
                    fault="node-lost")

    def test_retry_policy_applies(self):
        before = len(self.creates())
        got = self._fails("pod-retry", "exit 7", "", ["exited with status 7"],
                             stage_extra="    retries: { count: 1, backoff: 100ms }\n")
        assert_eq(got["stages"][0]["attempt"], 2, "attempts")
        names = [r.get("name") or "" for r in self.creates()[before:]]
        assert_eq(len(names), 2, "a pod per attempt (%s)" % names)

    def close(self):
        self.c.close()
        if self.daemon.proc:
            assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")
        self.emu.terminate()
        self.emu.wait(timeout=30)


def main():
    binary = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-pods-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, emulator, tmp))


if __name__ == "__main__":
    sys.exit(main())
