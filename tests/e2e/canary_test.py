"""The mesh and canary stage kinds (and rollback's mesh reset) end to end:
the Kubernetes+Istio emulator (tests/emulators/kube: VirtualService
weights steer its synthetic traffic; an image tag with `bad` answers 30%
errors; `crashloop` never becomes ready), the real Prometheus (Debian's
/usr/bin/prometheus) scraping its /metrics every second, and kpld (--config
naming both) driven through its gRPC API.

    /usr/bin/python3 tests/e2e/canary_test.py PATH/TO/kpld PATH/TO/kube_emulator.py

The tests run in order on one Service and Deployment (shop/web, pods
labelled version=v1): mesh on, a healthy canary promoted, a bad one
aborted with its measured success rate, a crashlooping one aborted, kill -9
in the middle of a step (the emulator's request log, --verbose, counts the
VirtualService PUTs: nothing is applied twice), on_failure: freeze then
approve and reject, rollback's mesh reset, a promotion that misses its
progress deadline undone (the emulator's pods made slow once the canary is
ready), the same undo with kpld killed in the middle, mesh off. Waiting is on WatchRun
streams; the only polling is for the emulator's controllers, its taking an
injected fault, and Prometheus's first data, bounded.
"""

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kube_stack  # noqa: E402
from e2e_test import P, Client, Daemon, assert_eq, submit, watch  # noqa: E402

TOKEN = "kpl-canary-token-5e21b7"
NS = "shop"
WEB = "/apis/apps/v1/namespaces/shop/deployments/web"
CANARY = "/apis/apps/v1/namespaces/shop/deployments/web-canary"
VS = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web"
DR = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules/web"

SUCCESS_RATE = (
    'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="shop",'
    'destination_workload="web-canary",destination_version="${{ canary.version }}",'
    'response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter="destination",'
    'destination_workload_namespace="shop",destination_workload="web-canary",'
    'destination_version="${{ canary.version }}"}[1m])) * 100')

DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
    "spec": {
        "replicas": 2,
        "progressDeadlineSeconds": 3,
        "selector": {"matchLabels": {"app": "web", "version": "v1"}},
        "template": {
            "metadata": {"labels": {"app": "web", "version": "v1"}},
            "spec": {"containers": [{"name": "web", "image": "reg.example/web:1.0"}]},
        },
    },
}
SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": NS},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
}


def canary_pipeline(name, image, version, steps, extra=""):
    """A canary stage; steps are YAML flow items."""
    return """
name: %s
stages:
  - name: canary
    kind: canary
    with:
      cluster: test
      namespace: shop
      deployment: web
      image: "%s"
      version: %s
      prometheus: main
%s      steps:
%s""" % (name, image, version, extra, "".join("        - %s\n" % s for s in steps))


def verify_step(count, failure_limit):
    return ("{ verify: { interval: 1s, count: %d, failure_limit: %d, inconclusive_limit: 8, "
            "queries: [ { name: request-success-rate, min: 99, query: %s } ] } }"
            % (count, failure_limit, json.dumps(SUCCESS_RATE)))


class Suite:
    def __init__(self, kpld, emulator, tmp):
        self.tmp = tmp
        self.procs = []
        self.err = os.path.join(tmp, "kube.err")
        p, self.kube = kube_stack.start_emulator(
            emulator, tmp, ["--lifetime", "900", "--pace", "0.2", "--traffic-interval", "0.5",
                            "--token", TOKEN, "--namespace", NS, "--bookmark-interval", "1",
                            "--verbose"], self.err, stdout_to_log=False)
        self.procs.append(p)
        self.api("POST", "/api/v1/namespaces/shop/services", SERVICE)
        self.api("POST", "/apis/apps/v1/namespaces/shop/deployments", DEPLOYMENT)
        self.wait_settled(WEB, "reg.example/web:1.0")
        prom, self.prom = kube_stack.start_prometheus(tmp, self.kube)
        self.procs.append(prom)
        kc = os.path.join(tmp, "kubeconfig")
        with open(kc, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                       "clusters": [{"name": "c", "cluster": {"server": self.kube}}],
                       "users": [{"name": "u", "user": {"token": TOKEN}}],
                       "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u",
                                                             "namespace": NS}}]}, f)
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("kubernetes:\n  test: { kubeconfig: %s }\n"
                    "prometheus:\n  main: { url: \"%s\" }\n" % (kc, self.prom))
        self.daemon = Daemon(kpld, os.path.join(tmp, "data"), ["--config", cfg])
        self.c = self.daemon.start()
        # Until Prometheus has scraped the stable version's traffic twice.
        kube_stack.wait_for_data(self.prom, prom, tmp, [
            'sum(rate(istio_requests_total{destination_workload="web",'
            'destination_version="v1"}[1m]))'])

    # -- helpers -----------------------------------------------------------

    def api(self, method, path, body=None):
        req = urllib.request.Request(self.kube + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Authorization", "Bearer " + TOKEN)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def exists(self, path):
        try:
            self.api("GET", path)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def image(self, path=WEB):
        d = self.api("GET", path)
        return d["spec"]["template"]["spec"]["containers"][0]["image"]

    def wait_settled(self, path, image):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            d = self.api("GET", path)
            st = d.get("status", {})
            want = d["spec"]["replicas"]
            if self.image(path) == image and st.get("availableReplicas") == want and \
                    st.get("updatedReplicas") == want and st.get("replicas") == want:
                return
            time.sleep(0.1)  # the emulator's controller, no event to wait on
        raise AssertionError("%s did not settle on %s" % (path, image))

    def weights(self):
        """(stable, canary, header route?) of the VirtualService's primary route."""
        vs = self.api("GET", VS)
        http = vs["spec"]["http"]
        primary = [r for r in http if r.get("name") == "primary"][0]
        w = {d["destination"].get("subset"): d.get("weight", 100) for d in primary["route"]}
        return w.get("stable"), w.get("canary", 0), any(r.get("name") == "canary-header"
                                                        for r in http)

    def requests(self, method, path):
        """Requests so far, from the emulator's request log."""
        return len(re.findall(r'"%s %s[ ?]' % (method, re.escape(path)), open(self.err).read()))

    def run(self, text):
        run = Client.to_dict(submit(self.c, text))
        events = watch_all(self.c, run["id"])
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})), events

    @staticmethod
    def stage(run, name="canary"):
        return [s for s in run["stages"] if s["name"] == name][0]

    @staticmethod
    def logs(events):
        return [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"]

    def wait_waiting(self, run_id):
        """Follows the run until its canary stage is WAITING; returns the events."""
        out = []
        stream = self.c.stream(P + "WatchRun", {"id": run_id}, timeout=90)
        for ev in stream:
            ev = Client.to_dict(ev)
            out.append(ev)
            if ev.get("kind") == "EVENT_KIND_STAGE_STATE" and \
                    ev.get("stage_state") == "STAGE_STATE_WAITING":
                stream.cancel()
                return out
        raise AssertionError("the canary never waited: %r" % self.logs(out))

    # -- tests -------------------------------------------------------------

    def test_mesh_on(self):
        run, events = self.run("""
name: mesh-on
stages:
  - name: mesh
    kind: mesh
    with:
      cluster: test
      deployment: web
      mode: mesh
      hosts: [web, web.example.com]
      gateways: [istio-system/public]
""")
        st = self.stage(run, "mesh")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(st["message"], 'deployment "web" successfully rolled out', "message")
        assert_eq(st["outputs"].get("mode"), "mesh", "mode output")
        d = self.api("GET", WEB)
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert_eq(labels.get("sidecar.istio.io/inject"), "true", "injection label")
        assert_eq(labels.get("version"), "v1", "version label kept")
        dr = self.api("GET", DR)
        assert_eq(dr["spec"]["host"], "web", "DR host")
        assert_eq(dr["spec"]["subsets"], [{"name": "stable", "labels": {"version": "v1"}}],
                  "DR subsets")
        vs = self.api("GET", VS)
        assert_eq(vs["spec"]["hosts"], ["web", "web.example.com"], "VS hosts")
        assert_eq(vs["spec"]["gateways"], ["istio-system/public", "mesh"], "VS gateways")
        assert_eq(vs["metadata"]["labels"].get("kpl.dev/deployment"), "web", "VS label")
        assert_eq(self.weights(), (100, 0, False), "weights")
        self.wait_settled(WEB, "reg.example/web:1.0")
        # again: nothing to patch, objects already as wanted
        puts = self.requests("PUT", VS)
        run, events = self.run(run_text_mesh("mesh"))
        assert_eq(self.stage(run, "mesh")["state"], "STAGE_STATE_SUCCEEDED", "second mesh on")
        assert_eq(self.requests("PUT", VS) - puts, 0, "no PUT when already as wanted")
        assert "virtualservice shop/web: already as wanted" in self.logs(events), \
            self.logs(events)

    def test_healthy_canary_promoted(self):
        puts = self.requests("PUT", VS)
        posts = self.requests("POST", "/apis/apps/v1/namespaces/shop/deployments")
        run, events = self.run(canary_pipeline(
            "healthy", "reg.example/web:2.0", "v2",
            ["{ weight: 10 }", "{ pause: 1s }", "{ weight: 50 }", verify_step(3, 0),
             "{ weight: 100 }"],
            extra="      header_route: { header: X-Canary, value: \"yes\" }\n"))
        st = self.stage(run)
        assert_eq((run["state"], st["state"]), ("RUN_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED"),
                  "states (%s)" % st.get("message"))
        assert re.match(r"promoted reg\.example/web:2\.0: deployment web at revision \d+, "
                        r"100% of traffic to stable, canary removed$", st["message"]), st["message"]
        assert_eq(st["outputs"].get("image"), "reg.example/web:2.0", "image output")
        assert_eq(st["outputs"].get("weight"), "100", "weight output")
        assert st["outputs"].get("revision"), st["outputs"]
        assert_eq(self.image(), "reg.example/web:2.0", "stable took the image")
        assert_eq(self.exists(CANARY), False, "canary deployment removed")
        assert_eq(self.weights(), (100, 0, False), "weights back, header route gone")
        dr = self.api("GET", DR)
        assert_eq(sorted((s["name"], s["labels"]["version"]) for s in dr["spec"]["subsets"]),
                  [("canary", "v2"), ("stable", "v1")], "DR subsets")
        # prepare (100/0 + header route), 10, 50, 100, back to 100/0
        assert_eq(self.requests("PUT", VS) - puts, 5, "VirtualService PUTs")
        assert_eq(self.requests("POST", "/apis/apps/v1/namespaces/shop/deployments") - posts, 1,
                  "canary created once")
        lines = self.logs(events)
        steps = [l for l in lines if l.startswith("step ")]
        want = ["step 1/5: 10% of traffic to the canary", "step 2/5: pause, 1000 ms left",
                "step 2/5: pause over", "step 3/5: 50% of traffic to the canary",
                "step 4/5: verify (canary version v2)",
                "step 4/5: verify passed: 3 rounds, 0 failed, 0 inconclusive",
                "step 5/5: 100% of traffic to the canary"]
        got = [re.sub(r"pause, \d+ ms left", "pause, 1000 ms left", l) for l in steps]
        # the verify may see inconclusive rounds while the series is new
        got = [re.sub(r"verify passed: 3 rounds, 0 failed, \d+ inconclusive",
                      "verify passed: 3 rounds, 0 failed, 0 inconclusive", l) for l in got]
        assert_eq(got, want, "step lines")
        rates = [l for l in lines if l.startswith("request-success-rate = ")]
        assert_eq(len(rates), 3, "measurements: %r" % lines)
        assert not any(" fail, " in l for l in rates), rates
        state = self.api("GET", "/emulator/state")
        assert "v2" in json.dumps(state.get("traffic", state)), "the canary version had traffic"

    def test_bad_canary_aborts_with_measured_rate(self):
        puts = self.requests("PUT", VS)
        run, events = self.run(canary_pipeline(
            "bad", "reg.example/web:3.0-bad", "v3",
            ["{ weight: 50 }", verify_step(5, 1), "{ weight: 100 }"]))
        st = self.stage(run)
        assert_eq((run["state"], st["state"]), ("RUN_STATE_FAILED", "STAGE_STATE_FAILED"),
                  "states")
        m = re.match(r"canary aborted: verify failed: request-success-rate = ([0-9.]+), below "
                     r"min 99 \(2 failed rounds, limit 1\) \(traffic back to 100% stable, "
                     r"deployment web-canary removed\)$", st.get("message", ""))
        assert m, "message %r" % st.get("message")
        assert 55 <= float(m.group(1)) <= 85, "a 30%% error rate measured as %s" % m.group(1)
        assert_eq(st["outputs"].get("weight"), "50", "weight reached")
        assert_eq(self.weights(), (100, 0, False), "weights back to stable")
        assert_eq(self.exists(CANARY), False, "canary removed")
        assert_eq(self.image(), "reg.example/web:2.0", "stable untouched")
        # 50, then abort's reset (prepare found 100/0 already, as the last
        # promotion left it); the 100 step never ran
        assert_eq(self.requests("PUT", VS) - puts, 2, "VirtualService PUTs")
        assert not any(l.startswith("step 3/3") for l in self.logs(events)), self.logs(events)

    def test_crashloop_canary_aborts(self):
        run, events = self.run(canary_pipeline(
            "crash", "reg.example/web:4.0-crashloop", "v4", ["{ weight: 50 }"]))
        st = self.stage(run)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state")
        assert_eq(st["message"], 'canary aborted: canary deployment "web-canary" exceeded its '
                  'progress deadline (traffic back to 100% stable, deployment web-canary '
                  'removed)', "message")
        assert_eq(self.weights(), (100, 0, False), "no traffic moved")
        assert_eq(self.exists(CANARY), False, "canary removed")
        assert not any(l.startswith("step ") for l in self.logs(events)), self.logs(events)

    def test_kill_mid_step_resumes_at_that_step(self):
        puts = self.requests("PUT", VS)
        run = Client.to_dict(submit(self.c, canary_pipeline(
            "kill", "reg.example/web:5.0", "v5",
            ["{ weight: 10 }", "{ pause: 4s }", "{ weight: 50 }", "{ weight: 100 }"])))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and \
                    ev.get("message", "").startswith("step 2/4: pause"):
                last_seq = int(ev["seq"])
                stream.cancel()
                break
        else:
            raise AssertionError("the canary never paused")
        self.c.close()
        self.daemon.stop(signal.SIGKILL)
        # prepare finds 100/0 (no header route) already: only the 10 step
        assert_eq(self.requests("PUT", VS) - puts, 1, "PUTs before the kill")
        assert_eq(self.weights()[:2], (90, 10), "weights at the kill")
        self.c = self.daemon.start()
        after = watch_all(self.c, run["id"], from_seq=last_seq + 1)
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state after restart (%s)"
                  % st.get("message"))
        steps = [l for l in self.logs(after) if l.startswith("step ")]
        assert_eq([re.sub(r"\d+ ms left", "N ms left", l) for l in steps],
                  ["step 2/4: pause, N ms left", "step 2/4: pause over",
                   "step 3/4: 50% of traffic to the canary",
                   "step 4/4: 100% of traffic to the canary"], "steps after the restart")
        left = int(re.search(r"(\d+) ms left", steps[0]).group(1))
        assert left < 4000, "the pause waits only what is left (%d ms)" % left
        assert_eq(self.requests("PUT", VS) - puts, 4, "no step applied twice (10, 50, 100, "
                  "100/0)")
        assert_eq(self.image(), "reg.example/web:5.0", "promoted")
        assert_eq(self.exists(CANARY), False, "canary removed")

    def test_freeze_then_approve_promotes(self):
        run = Client.to_dict(submit(self.c, canary_pipeline(
            "freeze-ok", "reg.example/web:6.0-bad", "v6",
            ["{ weight: 50 }", verify_step(8, 0), "{ weight: 100 }"],
            extra="      on_failure: freeze\n")))
        before = self.wait_waiting(run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert re.match(r"canary frozen at 50% to web-canary: verify failed: "
                        r"request-success-rate = [0-9.]+, below min 99 \(1 failed round, "
                        r"limit 0\); approve to promote, reject to abort$", st["message"]), \
            st["message"]
        assert_eq(self.weights()[:2], (50, 50), "weights held")
        assert_eq(self.exists(CANARY), True, "canary kept")
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "canary", "approve": True,
                                         "by": "tester", "comment": "migration ran"})
        rest = watch_all(self.c, run["id"], from_seq=int(before[-1]["seq"]) + 1)
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(self.image(), "reg.example/web:6.0-bad", "promoted on approval")
        assert_eq(self.weights(), (100, 0, False), "weights back")
        assert_eq(self.exists(CANARY), False, "canary removed")
        # no analysis ran on after the freeze
        assert not any(l.startswith("request-success-rate = ") for l in self.logs(rest)), \
            self.logs(rest)
        assert "approved by tester: migration ran" in self.logs(rest), self.logs(rest)

    def test_freeze_then_reject_aborts(self):
        run = Client.to_dict(submit(self.c, canary_pipeline(
            "freeze-no", "reg.example/web:7.0-bad", "v7",
            ["{ weight: 40 }", verify_step(8, 0), "{ weight: 100 }"],
            extra="      on_failure: freeze\n")))
        before = self.wait_waiting(run["id"])
        assert_eq(self.weights()[:2], (60, 40), "weights held")
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "canary",
                                         "approve": False, "by": "tester", "comment": "no"})
        rest = watch_all(self.c, run["id"], from_seq=int(before[-1]["seq"]) + 1)
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert_eq((got["state"], st["state"]), ("RUN_STATE_FAILED", "STAGE_STATE_FAILED"),
                  "states")
        assert_eq(st["message"], "canary aborted: frozen canary rejected by tester: no "
                  "(traffic back to 100% stable, deployment web-canary removed)", "message")
        assert_eq(self.weights(), (100, 0, False), "weights back")
        assert_eq(self.exists(CANARY), False, "canary removed")
        assert_eq(self.image(), "reg.example/web:6.0-bad", "stable untouched")
        assert not any(l.startswith("request-success-rate = ") for l in self.logs(rest)), \
            self.logs(rest)

    def test_approve_refused_when_not_waiting(self):
        run = Client.to_dict(submit(self.c, canary_pipeline(
            "not-waiting", "reg.example/web:6.0-bad", "v8", ["{ pause: 3s }"])))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "pause" in ev.get("message", ""):
                stream.cancel()
                break
        import grpc
        try:
            self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "canary",
                                             "approve": True})
            raise AssertionError("a running canary accepted an approval")
        except grpc.RpcError as e:
            assert_eq(e.code(), grpc.StatusCode.FAILED_PRECONDITION, "status")
        self.c.call(P + "CancelRun", {"id": run["id"]})
        watch_all(self.c, run["id"])
        st = self.stage(Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})))
        assert_eq(st["state"], "STAGE_STATE_CANCELLED", "cancelled")
        assert_eq(st["message"], "cancelled: canary aborted (traffic back to 100% stable, "
                  "deployment web-canary removed)", "message")
        assert_eq(self.exists(CANARY), False, "canary removed on cancel")

    def test_rollback_resets_mesh_weights(self):
        # A release of its own to roll back (not whatever an earlier test
        # left): a deploy from the current image to 9.0-undo.
        before = self.image()
        run, _ = self.run("""
name: undo-base
stages:
  - name: d
    kind: deploy
    with: { cluster: test, namespace: shop, deployment: web, image: "reg.example/web:9.0-undo" }
""")
        st = self.stage(run, "d")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "the deploy (%s)" % st.get("message"))
        assert_eq(self.image(), "reg.example/web:9.0-undo", "deployed")
        # a canary left half-way (as a kpld that lost its data would leave it)
        canary = json.loads(json.dumps(DEPLOYMENT))
        canary["metadata"]["name"] = "web-canary"
        canary["spec"]["replicas"] = 1
        canary["spec"]["selector"]["matchLabels"]["version"] = "v9"
        canary["spec"]["template"]["metadata"]["labels"]["version"] = "v9"
        self.api("POST", "/apis/apps/v1/namespaces/shop/deployments", canary)
        vs = self.api("GET", VS)
        vs["spec"]["http"] = [
            {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "1"}}}],
             "route": [{"destination": {"host": "web", "subset": "canary"}}]},
            {"name": "primary", "route": [
                {"destination": {"host": "web", "subset": "stable"}, "weight": 60},
                {"destination": {"host": "web", "subset": "canary"}, "weight": 40}]}]
        self.api("PUT", VS, vs)
        run, events = self.run("""
name: undo
stages:
  - { name: undo, kind: rollback, with: { cluster: test, namespace: shop, deployment: web } }
""")
        st = self.stage(run, "undo")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        # the newest release record is this test's deploy: back to what it replaced
        assert_eq(st["outputs"].get("image"), before, "restored image")
        assert_eq(self.image(), before, "the Deployment's image")
        assert_eq(self.weights(), (100, 0, False), "weights back to stable")
        assert_eq(self.exists(CANARY), False, "canary removed")
        lines = self.logs(events)
        assert "virtualservice shop/web: all traffic back to stable" in lines, lines
        assert "deployment shop/web-canary: deleted" in lines, lines

    def revision(self):
        return self.api("GET", WEB)["metadata"]["annotations"][
            "deployment.kubernetes.io/revision"]

    def submit_until_paused(self, text, step):
        """Submits text and follows the run until its log says step (a
        pause) began; returns the run."""
        run = Client.to_dict(submit(self.c, text))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        seen = []
        for ev in stream:
            ev = Client.to_dict(ev)
            seen.append(ev.get("message", ""))
            if ev.get("kind") == "EVENT_KIND_LOG" and \
                    ev.get("message", "").startswith(step):
                stream.cancel()
                return run
        raise AssertionError("the canary never reached %r: %r" % (step, seen))

    def slow_pods(self):
        """From now on a new pod takes a minute to start: pods already
        ready stay ready, but the stable Deployment's rollout to the
        canary's image misses its 3 s progress deadline."""
        self.api("POST", "/emulator/config", {"pace": 60})

    def normal_pods(self):
        self.api("POST", "/emulator/config", {"pace": 0.2})
        self.api("DELETE", "/emulator/fault")

    def test_failed_promotion_undone(self):
        before, rev = self.image(), self.revision()
        patches = self.requests("PATCH", WEB)
        try:
            run = self.submit_until_paused(canary_pipeline(
                "promote-fails", "reg.example/web:10.0", "v10",
                ["{ weight: 50 }", "{ pause: 2s }"],
                extra="      header_route: { header: x-canary, value: \"1\" }\n"),
                "step 2/2: pause")
            self.slow_pods()
            assert_eq(self.weights(), (50, 50, True), "the canary took its share")
            events = watch_all(self.c, run["id"])
        finally:
            self.normal_pods()
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert_eq((got["state"], st["state"]), ("RUN_STATE_FAILED", "STAGE_STATE_FAILED"),
                  "states (%s)" % st.get("message"))
        assert_eq(st["message"], 'promotion failed: deployment "web" exceeded its progress '
                  'deadline; stable restored to revision %s, canary removed' % rev, "message")
        assert_eq(self.image(), before, "stable back on its image")
        self.wait_settled(WEB, before)
        assert_eq(self.weights(), (100, 0, False), "all traffic to stable, header route gone")
        assert_eq(self.exists(CANARY), False, "canary removed")
        # the promotion's patch and the restore's, nothing more
        assert_eq(self.requests("PATCH", WEB) - patches, 2, "PATCHes of the stable deployment")
        lines = self.logs(events)
        assert any(l.startswith("undoing the promotion (deployment \"web\" exceeded its "
                                "progress deadline): deployment web back to revision %s (%s)"
                                % (rev, before)) for l in lines), lines
        assert "patch deployment shop/web: pod template of revision %s restored (%s)" \
            % (rev, before) in lines, lines
        assert "virtualservice shop/web: all traffic back to stable" in lines, lines
        assert "deployment shop/web-canary: deleted" in lines, lines

    def test_kill_mid_undo_finishes_it(self):
        before, rev = self.image(), self.revision()
        patches = self.requests("PATCH", WEB)
        try:
            run = self.submit_until_paused(canary_pipeline(
                "undo-killed", "reg.example/web:11.0", "v11",
                ["{ weight: 30 }", "{ pause: 2s }"]), "step 2/2: pause")
            self.slow_pods()
            # the undo's reset of the weights is the next PUT of the
            # VirtualService: held 8 s (then refused), kpld is killed meanwhile
            self.api("POST", "/emulator/fault", {"path_prefix": VS, "method": "PUT",
                                                  "count": 1, "status": 500,
                                                  "delay_ms": 8000})
            deadline = time.monotonic() + 60
            while self.api("GET", "/emulator/state").get("faults"):
                assert time.monotonic() < deadline, "the undo never reset the weights"
                time.sleep(0.1)  # the emulator takes the fault: no event to wait on
            self.c.close()
            self.daemon.stop(signal.SIGKILL)
            assert_eq(self.image(), before, "stable restored before the kill")
            assert_eq(self.weights()[:2], (70, 30), "weights at the kill")
            assert_eq(self.exists(CANARY), True, "canary there at the kill")
            self.c = self.daemon.start()
            events = watch_all(self.c, run["id"])
        finally:
            self.normal_pods()
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(got)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state (%s)" % st.get("message"))
        assert_eq(st["message"], 'promotion failed: deployment "web" exceeded its progress '
                  'deadline; stable restored to revision %s, canary removed' % rev, "message")
        assert_eq(self.image(), before, "stable on its image")
        assert_eq(self.weights(), (100, 0, False), "all traffic to stable")
        assert_eq(self.exists(CANARY), False, "canary removed")
        assert_eq(self.requests("PATCH", WEB) - patches, 2, "not restored twice")
        assert "deployment shop/web: already on the template of revision %s" % rev in \
            self.logs(events), self.logs(events)

    def test_mesh_off(self):
        run, _ = self.run(run_text_mesh("plain"))
        st = self.stage(run, "mesh")
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "state (%s)" % st.get("message"))
        assert_eq(st["outputs"].get("mode"), "plain", "mode output")
        labels = self.api("GET", WEB)["spec"]["template"]["metadata"]["labels"]
        assert_eq(labels.get("sidecar.istio.io/inject"), "false", "injection off")
        assert_eq(self.exists(VS), False, "VirtualService removed")
        assert_eq(self.exists(DR), False, "DestinationRule removed")

    def test_no_token_anywhere(self):
        log = open(self.daemon.log).read()
        assert TOKEN not in log, "the token appears in kpld's log"

    def close(self):
        kube_stack.stop(self.c, self.daemon, self.procs)


def run_text_mesh(mode):
    return """
name: mesh-%s
stages:
  - name: mesh
    kind: mesh
    with: { cluster: test, deployment: web, mode: %s, hosts: [web, web.example.com],
            gateways: [istio-system/public] }
""" % (mode, mode)


def watch_all(c, run_id, from_seq=0):
    out = []
    for ev in c.stream(P + "WatchRun", {"id": run_id, "from_seq": from_seq}, timeout=180):
        out.append(Client.to_dict(ev))
    return out


def main():
    return kube_stack.run_suite(Suite, sys.argv[1:], "kpl-canary-", "CANARY_TEST_ONLY")


if __name__ == "__main__":
    sys.exit(main())
