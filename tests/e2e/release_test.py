"""pipelines/examples/release.kpl.yaml end to end, as `./dev demo` runs it,
with the outcome checked against the systems themselves.

    /usr/bin/python3 tests/e2e/release_test.py KPLD KPLCTL EMULATOR RELEASE_YAML SEED_YAML \
        RELEASE_PODS_YAML

The stack is tests/e2e/release/stack.py: the demo app's git repository,
docker-registry (htpasswd), the Kubernetes+Istio emulator, the real
Prometheus scraping it every second, kpld configured for all three (the
registry password set with `kplctl secret set`). Version 1.0.0 is built and
pushed by SEED_YAML (build-and-push.kpl.yaml) and installed in production
(shop) and staging first. Then, in order:

  - 1.1.0 is released: the run SUCCEEDS; the image's digest in the registry
    (tags 1.1.0, the short sha, latest) is the push stage's; production and
    staging run that image; the canary went 10/50/100 with three passing
    analyses; the VirtualService ends 100/0 to stable and web-canary is gone;
    the finally rollback was skipped;
  - 1.2.0-bad is released (the emulator fails 30% of the requests of an
    image whose tag says `bad`): the run FAILS, the canary aborts on the
    success rate it measured, production never ran the image, the finally
    rollback puts staging back on 1.1.0, and `latest` stays on 1.1.0;
  - 1.3.0 is released by RELEASE_PODS_YAML (release-pods.kpl.yaml, what
    `./dev demo --pods` runs): `compile` and `image` run as pods the
    emulator's kubelet runs, sharing the run's claim; the registry holds the
    digest the image pod reported under 1.3.0, the short sha and latest; the
    cluster runs it; the pods, their Secrets and the claim are gone; no
    credential is in the events or in any Pod the emulator was sent.

Waiting is on WatchRun streams and on the emulator's own state; no sleep
stands for a condition.
"""

import json
import os
import re
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "release"))
from e2e_test import assert_eq, run_suite  # noqa: E402
from stack import NAMESPACE, PODS, STAGING, Stack  # noqa: E402

SUCCEEDED, FAILED, SKIPPED = "STAGE_STATE_SUCCEEDED", "STAGE_STATE_FAILED", "STAGE_STATE_SKIPPED"


class Suite:
    def __init__(self, kpld, kplctl, emulator, release, seed, release_pods, tmp):
        self.release = release
        self.release_pods = release_pods
        self.stack = Stack(tmp, kpld, emulator=emulator, kplctl=kplctl)
        self.daemon = types.SimpleNamespace(log=self.stack.path("kpld.log"))
        self.stack.start()
        self.seed_run, self.v1 = self.stack.seed(seed, "1.0.0")

    # -- helpers -------------------------------------------------------------

    def run(self, version, pipeline=None, params=None):
        _, sha = self.stack.commit(version)
        run_id = self.stack.submit(pipeline or self.release, dict(params or {}, repo=self.stack.repo))
        events = self.stack.watch(run_id)
        return self.stack.get_run(run_id), events, sha

    @staticmethod
    def states(run):
        return {s["name"]: s["state"] for s in run["stages"]}

    @staticmethod
    def logs(events, stage):
        return [e.get("message", "") for e in events
                if e.get("kind") == "EVENT_KIND_LOG" and e.get("stage") == stage]

    def explain(self, run, events):
        return "run %s %s (%s); stages %s; canary log:\n%s" % (
            run["id"], run["state"], run.get("message"),
            [(s["name"], s["state"], s.get("message")) for s in run["stages"]],
            "\n".join(self.logs(events, "canary")[-30:]))

    def assert_mesh_settled(self):
        """The VirtualService's primary route 100% stable / 0% canary, no
        header route, web-canary gone."""
        vs = self.stack.virtualservice("web")
        if vs is None:
            raise AssertionError("no VirtualService shop/web")
        routes = vs["spec"]["http"]
        assert_eq([r.get("name") for r in routes], ["primary"], "VirtualService routes")
        weights = {d["destination"].get("subset"): d.get("weight", 100) for d in routes[0]["route"]}
        if weights.get("stable") != 100 or any(w for k, w in weights.items() if k != "stable"):
            raise AssertionError("primary route weights: %r" % weights)
        assert_eq(self.stack.deployment("web-canary"), None, "deployment web-canary")

    def prom_sum(self, q):
        r = self.stack.prom_query(q)
        return float(r[0]["value"][1]) if r else 0.0

    def replicaset_images(self, ns, owner):
        rss = self.stack.kube_api("GET", "/apis/apps/v1/namespaces/%s/replicasets" % ns)["items"]
        return {c["image"] for rs in rss
                for ref in rs["metadata"].get("ownerReferences", []) if ref["name"] == owner
                for c in rs["spec"]["template"]["spec"]["containers"]}

    # -- tests ---------------------------------------------------------------

    def test_1_release_succeeds(self):
        run, events, sha = self.run("1.1.0")
        if run["state"] != "RUN_STATE_SUCCEEDED":
            raise AssertionError(self.explain(run, events))
        want = {n: SUCCEEDED for n in ("checkout", "compile", "image", "push", "ref", "deploy",
                                       "mesh", "canary", "promote")}
        want["rollback"] = SKIPPED
        assert_eq(self.states(run), want, "stage states")
        out = {s["name"]: s.get("outputs", {}) for s in run["stages"]}

        # The registry holds what the push stage says, under every tag.
        digest = out["push"]["digest"]
        assert_eq(digest, out["image"]["digest"], "pushed digest = buildah's layout digest")
        host = self.stack.registry_host
        assert_eq(out["push"]["image"], "%s/app@%s" % (host, digest), "push image")
        for tag in ("1.1.0", sha[:12], "latest", digest):
            got, dcd, _ = self.stack.manifest("app", tag)
            assert_eq((got, dcd), (digest, digest), "manifest digest of app:%s" % tag)
        released = "%s/app:1.1.0@%s" % (host, digest)
        assert_eq(out["ref"]["image"], released, "the released reference")

        # The cluster runs it: production (promoted by the canary) and staging.
        self.stack.wait_rollout("web", released, ns=NAMESPACE)
        self.stack.wait_rollout("web", released, ns=STAGING)
        prod = self.stack.deployment("web")
        labels = prod["spec"]["template"]["metadata"]["labels"]
        assert_eq((labels.get("version"), labels.get("sidecar.istio.io/inject")),
                  ("stable", "true"), "production pod labels set by mesh")
        assert_eq(out["canary"].get("image"), released, "canary image output")
        assert_eq(out["canary"].get("weight"), "100", "canary weight output")

        # The canary's steps, each analysis passed, then promotion.
        lines = self.logs(events, "canary")
        steps = [l for l in lines if re.match(r"step \d+/6: (\d+% of traffic|verify (passed|failed))", l)]
        assert_eq([re.sub(r"verify passed: 2 rounds, 0 failed, \d inconclusive", "verify passed", l)
                   for l in steps],
                  ["step 1/6: 10% of traffic to the canary", "step 2/6: verify passed",
                   "step 3/6: 50% of traffic to the canary", "step 4/6: verify passed",
                   "step 5/6: 100% of traffic to the canary", "step 6/6: verify passed"],
                  "canary steps")
        rates = [float(m.group(1)) for m in
                 (re.match(r"request-success-rate = ([0-9.]+) \(min [0-9.]+\) pass", l) for l in lines) if m]
        if not rates or min(rates) < 99:
            raise AssertionError("success rates measured: %r" % rates)
        self.assert_mesh_settled()

        # Prometheus saw the canary's version serve, without errors.
        served = self.prom_sum('sum(istio_requests_total{destination_workload_namespace="%s",'
                               'destination_version="1.1.0"})' % NAMESPACE)
        errors = self.prom_sum('sum(istio_requests_total{destination_workload_namespace="%s",'
                               'destination_version="1.1.0",response_code=~"5.."})' % NAMESPACE)
        if served <= 0 or errors != 0:
            raise AssertionError("prometheus: 1.1.0 served %s requests, %s errors" % (served, errors))
        if self.stack.reg_pass in json.dumps(events) or self.stack.kube_token in json.dumps(events):
            raise AssertionError("a credential appears in the run's events")

    def test_2_bad_release_fails_and_is_rolled_back(self):
        # What runs now (1.1.0 after the first test, else 1.0.0) must stay.
        previous = self.stack.image_of(self.stack.deployment("web"))
        assert_eq(self.stack.image_of(self.stack.deployment("web", STAGING)), previous,
                  "staging runs what production runs before the release")
        previous_digest = self.stack.manifest("app", "latest")[0]
        assert_eq(previous.split("@")[1], previous_digest, "latest is what production runs")
        run, events, sha = self.run("1.2.0-bad")
        states = self.states(run)
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state (%s)" % self.explain(run, events))
        assert_eq(states, {"checkout": SUCCEEDED, "compile": SUCCEEDED, "image": SUCCEEDED,
                           "push": SUCCEEDED, "ref": SUCCEEDED, "deploy": SUCCEEDED,
                           "mesh": SUCCEEDED, "canary": FAILED, "promote": SKIPPED,
                           "rollback": SUCCEEDED}, "stage states")
        canary = self.stack.stage(run, "canary")
        m = re.match(r"canary aborted: verify failed: request-success-rate = ([0-9.]+), below min 99 ",
                     canary["message"])
        if not m or not 40 < float(m.group(1)) < 99:
            raise AssertionError("canary message: %r" % canary["message"])
        bad_digest = self.stack.stage(run, "push")["outputs"]["digest"]
        bad = "%s/app:1.2.0-bad@%s" % (self.stack.registry_host, bad_digest)

        # Production never ran it; staging did, and the rollback undid that.
        assert_eq(self.stack.image_of(self.stack.deployment("web")), previous, "production image")
        if bad in self.replicaset_images(NAMESPACE, "web"):
            raise AssertionError("production's Deployment had a ReplicaSet with the bad image")
        rollback = self.stack.stage(run, "rollback")
        assert_eq(rollback["outputs"].get("image"), previous, "rollback image output")
        self.stack.wait_rollout("web", previous, ns=STAGING)
        self.stack.wait_rollout("web", previous, ns=NAMESPACE)
        self.assert_mesh_settled()

        # The registry: the bad image was pushed, `latest` did not move.
        assert_eq(self.stack.manifest("app", "1.2.0-bad")[0], bad_digest, "app:1.2.0-bad")
        assert_eq(self.stack.manifest("app", "latest")[0], previous_digest, "app:latest")

        # What the analysis measured is what Prometheus holds: the bad
        # version answered 500s.
        errors = self.prom_sum('sum(istio_requests_total{destination_workload_namespace="%s",'
                               'destination_version="1.2.0-bad",response_code="500"})' % NAMESPACE)
        if errors <= 0:
            raise AssertionError("prometheus has no 500s of version 1.2.0-bad")
        lines = self.logs(events, "canary")
        if not any(l.startswith("aborting the canary: verify failed: request-success-rate")
                   for l in lines):
            raise AssertionError("no abort line in the canary's log: %r" % lines[-10:])

    def test_servers_in_a_session_of_their_own(self):
        # `./dev demo --console` stops on Ctrl-C, which the terminal sends to
        # its whole foreground process group: a kpld in that group got
        # SIGINT from it and SIGTERM from the demo, and took the second as
        # "exit at once" (exit 1). The stack's servers run in a session of
        # their own, and only the demo stops them.
        ours = os.getpgid(0)
        for name, p in self.stack.procs.items():
            if p.poll() is None:
                assert_eq(os.getpgid(p.pid) != ours, True,
                          "%s outside this process group" % name)

    def test_3_release_in_pods(self):
        run, events, sha = self.run("1.3.0", self.release_pods,
                                    {"registry": self.stack.registry_host})
        if run["state"] != "RUN_STATE_SUCCEEDED":
            raise AssertionError(self.explain(run, events))
        want = {n: SUCCEEDED for n in ("checkout", "compile", "image", "ref", "deploy", "mesh",
                                       "canary", "promote")}
        want["rollback"] = SKIPPED
        assert_eq(self.states(run), want, "stage states")
        out = {s["name"]: s.get("outputs", {}) for s in run["stages"]}
        for stage in ("compile", "image"):
            created = [l for l in self.logs(events, stage) if l.startswith("created pod kpl-")]
            assert_eq(len(created), 1, "%s ran as one pod: %r" % (stage, created))
            assert "(namespace %s, cluster local)" % PODS in created[0], created[0]
        assert_eq(out["compile"]["version"], "1.3.0", "version from the compile pod")
        digest = out["image"]["digest"]
        host = self.stack.registry_host
        assert_eq(out["image"]["image"], "%s/app@%s" % (host, digest), "image pod's output")
        for tag in ("1.3.0", sha[:12], "latest"):
            assert_eq(self.stack.manifest("app", tag)[0], digest, "manifest digest of app:%s" % tag)
        released = "%s/app:1.3.0@%s" % (host, digest)
        assert_eq(out["ref"]["image"], released, "the released reference")
        self.stack.wait_rollout("web", released, ns=NAMESPACE)
        self.stack.wait_rollout("web", released, ns=STAGING)
        self.assert_mesh_settled()
        sel = "labelSelector=kpl.dev%%2Frun%%3D%s" % run["id"]
        for kind in ("pods", "secrets"):
            left = self.stack.kube_api("GET", "/api/v1/namespaces/%s/%s?%s" % (PODS, kind, sel))
            assert_eq(left["items"], [], "%s left in %s" % (kind, PODS))
        if self.stack.reg_pass in json.dumps(events) or self.stack.kube_token in json.dumps(events):
            raise AssertionError("a credential appears in the run's events")

    def close(self):
        rc = self.stack.stop()
        assert_eq(rc, 0, "kpld's exit status on SIGTERM")


def main():
    kpld, kplctl, emulator, release, seed, pods = (os.path.abspath(a) for a in sys.argv[1:7])
    tmp = tempfile.mkdtemp(prefix="kpl-release-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, kplctl, emulator, release, seed, pods, tmp))


if __name__ == "__main__":
    sys.exit(main())
