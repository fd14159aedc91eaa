"""Failure paths: the rollback and mesh kinds against the Kubernetes
emulator (no history, an unknown revision, a Deployment kpl created, a
paused one, a missing one, a bad mode, a wrong token), and the requests
that WatchRuns, RollbackRelease, RevokeToken, ListRuns, ListSecrets,
ListPipelines and ListAudit refuse, each with its status and a message a
person can act on.

    /usr/bin/python3 tests/e2e/failures_test.py PATH/TO/kpld PATH/TO/kube_emulator.py
"""

import json
import os
import re
import signal
import sys
import tempfile
import urllib.error
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import P, Client, Daemon, assert_eq, expect_rpc_error, run_suite, submit  # noqa: E402
from deploy_test import BAD_TOKEN, DEPLOYMENT, TOKEN, Emulator  # noqa: E402
import deploy_test  # noqa: E402

S = "kpl.v1.Security/"
DEPS = "/apis/apps/v1/namespaces/shop/deployments"


def dep(name):
    d = json.loads(json.dumps(DEPLOYMENT))
    d["metadata"]["name"] = name
    d["metadata"]["labels"] = {"app": name}
    d["spec"]["selector"]["matchLabels"] = {"app": name}
    d["spec"]["template"]["metadata"]["labels"] = {"app": name, "version": "v1"}
    d["spec"]["template"]["spec"]["containers"] = [{"name": name, "image": "reg.example/%s:1" % name}]
    return d


class Suite(deploy_test.Suite):
    """deploy_test's emulators, kpld and helpers; its tests are not run."""

    def __init__(self, binary, emulator, tmp):
        super().__init__(binary, emulator, tmp)
        for name in ("lonely", "paused", "meshy"):
            self.api("POST", DEPS, dep(name))

    def one(self, text):
        """The only stage of a run of text, once the run has ended."""
        run, events = self.run(text)
        return run["stages"][0], events

    def rollback_text(self, deployment, extra="", cluster="test"):
        return ("name: rb\nstages:\n  - name: rb\n    kind: rollback\n"
                "    with: { cluster: %s, namespace: shop, deployment: %s%s }\n"
                % (cluster, deployment, extra))

    # -- the rollback kind --------------------------------------------------

    def test_rollback_without_history(self):
        st, _ = self.one(self.rollback_text("lonely"))
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "no rollout history found for test/shop/lonely "
                   "(no deploy recorded by kpl)"), "rollback of a Deployment kpl never changed")

    def test_rollback_to_unknown_revision(self):
        run, _ = self.run(deploy_test.deploy_pipeline("test", "reg.example/web:2.0"))
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "the deploy before")
        before = self.emu.patches()
        st, _ = self.one(self.rollback_text("web", ', to_revision: "42"'))
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "unable to find specified revision 42 in the release "
                   "history of test/shop/web"), "rollback to a revision never recorded")
        assert_eq(self.emu.patches() - before, 0, "PATCHes of a failed rollback")

    def test_rollback_of_a_missing_deployment(self):
        st, _ = self.one(self.rollback_text("missing"))
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state")
        if not st.get("message", "").startswith("get deployment shop/missing: kubernetes %s: 404"
                                                 % self.base):
            raise AssertionError("message: %r" % st.get("message"))

    def test_rollback_of_a_created_deployment(self):
        text = """
name: make
stages:
  - name: manifest
    kind: script
    with:
      shell: |
        mkdir -p k
        printf '%%s' '%s' > k/d.json
  - name: deploy
    kind: deploy
    needs: [manifest]
    with: { cluster: test, namespace: shop, deployment: fresh, image: "reg.example/fresh:2",
            create_from: k/d.json }
""" % json.dumps(dep("fresh"))
        run, _ = self.run(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "the deploy that created it (%s)"
                  % [s.get("message") for s in run["stages"]])
        st, _ = self.one(self.rollback_text("fresh"))
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state")
        want = ("the last deploy of test/shop/fresh (run %s stage deploy) created it: there is "
                "no earlier revision to restore" % run["id"])
        assert_eq(st.get("message"), want, "message")

    def test_create_from_outside_the_workspace(self):
        # kpld reads create_from itself, outside the stages' sandbox: a
        # host path or one leading out of the workspace is refused.
        other = os.path.join(self.tmp, "outside.json")
        with open(other, "w") as f:
            json.dump(dep("outside"), f)
        for path in (other, "../" + os.path.basename(other), "k/../../x.json"):
            st, _ = self.one("name: out\nstages:\n  - name: d\n    kind: deploy\n"
                             "    with: { cluster: test, namespace: shop, deployment: outside,"
                             " image: \"reg.example/outside:1\", create_from: \"%s\" }\n" % path)
            assert_eq((st["state"], st.get("message")),
                      ("STAGE_STATE_FAILED", "create_from %s: want a path in the run's "
                       "workspace (relative, without ..)" % path), "create_from " + path)
        try:
            self.api("GET", DEPS + "/outside")
            raise AssertionError("deployment outside was created")
        except urllib.error.HTTPError as e:
            assert_eq(e.code, 404, "GET of deployment outside")

    def test_rollback_of_a_paused_deployment(self):
        run, _ = self.run(deploy_test.deploy_pipeline("test", "reg.example/paused:2")
                          .replace("deployment: web", "deployment: paused")
                          .replace("container: web", "container: paused"))
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "the deploy before (%s)"
                  % [s.get("message") for s in run["stages"]])
        req = urllib.request.Request(self.base + DEPS + "/paused", method="PATCH",
                                     data=json.dumps({"spec": {"paused": True}}).encode())
        req.add_header("Authorization", "Bearer " + TOKEN)
        req.add_header("Content-Type", "application/merge-patch+json")
        urllib.request.urlopen(req, timeout=10).read()
        st, _ = self.one(self.rollback_text("paused"))
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "you cannot rollback a paused deployment; resume it "
                   "first with 'kubectl rollout resume' and try again"), "paused")
        img = self.api("GET", DEPS + "/paused")["spec"]["template"]["spec"]["containers"][0]
        assert_eq(img["image"], "reg.example/paused:2", "the paused Deployment's image")

    def test_rollback_with_a_wrong_token(self):
        st, events = self.one(self.rollback_text("web", cluster="bad"))
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "get deployment shop/web: kubernetes %s: 401 "
                   "Unauthorized: Unauthorized" % self.base), "wrong token")
        self.assert_no_secret(events)

    # -- the mesh kind ------------------------------------------------------

    def mesh_text(self, deployment, mode="mesh", cluster="test"):
        return ("name: m\nparams: { mode: { default: %s } }\nstages:\n"
                "  - name: m\n    kind: mesh\n"
                "    with: { cluster: %s, namespace: shop, deployment: %s, "
                "mode: \"${{ params.mode }}\" }\n" % (mode, cluster, deployment))

    def test_mesh_of_a_missing_deployment(self):
        st, _ = self.one(self.mesh_text("missing"))
        assert_eq(st["state"], "STAGE_STATE_FAILED", "state")
        if not st.get("message", "").startswith("get deployment shop/missing: kubernetes %s: 404"
                                                 % self.base):
            raise AssertionError("message: %r" % st.get("message"))
        for kind, path in (("DestinationRule", "destinationrules"),
                           ("VirtualService", "virtualservices")):
            try:
                self.api("GET", "/apis/networking.istio.io/v1beta1/namespaces/shop/%s/missing"
                         % path)
                raise AssertionError("a %s was made for a missing Deployment" % kind)
            except urllib.error.HTTPError as e:
                assert_eq(e.code, 404, "GET of the %s" % kind)

    def test_mesh_bad_mode(self):
        # From a parameter: the stage fails naming the value; literal: the
        # submit is refused with its line.
        run = Client.to_dict(submit(self.c, self.mesh_text("meshy"), {"mode": "bogus"}))
        self.all_runs.append(run["id"])
        for _ in self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60):
            pass
        st = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))["stages"][0]
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", 'with.mode: "bogus": must be mesh or plain'),
                  "a bad mode from a parameter")
        labels = self.api("GET", DEPS + "/meshy")["spec"]["template"]["metadata"]["labels"]
        assert_eq("sidecar.istio.io/inject" in labels, False, "the Deployment left alone")
        e = expect_rpc_error(lambda: submit(self.c, self.mesh_text("meshy").replace(
            '"${{ params.mode }}"', "bogus")), grpc.StatusCode.INVALID_ARGUMENT, "mode")
        if not re.search(r"pipeline:\d+:\d+: ", e.details()):
            raise AssertionError("no line:column in %r" % e.details())

    def test_mesh_with_a_wrong_token(self):
        st, events = self.one(self.mesh_text("meshy", cluster="bad"))
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_FAILED", "get deployment shop/meshy: kubernetes %s: 401 "
                   "Unauthorized: Unauthorized" % self.base), "wrong token")
        self.assert_no_secret(events)

    # -- RollbackRelease ----------------------------------------------------

    def test_rollback_release_refusals(self):
        for target, want in (("", "deployment: required, as cluster/namespace/name"),
                             ("web", "deployment web: want cluster/namespace/name"),
                             ("test/shop", "deployment test/shop: want cluster/namespace/name"),
                             ("test/shop/web/x", "want cluster/namespace/name"),
                             ("test/shop/we b", "only letters, digits, '.', '_' and '-'")):
            expect_rpc_error(lambda: self.c.call(P + "RollbackRelease", {"deployment": target}),
                             grpc.StatusCode.INVALID_ARGUMENT, want)
        expect_rpc_error(lambda: self.c.call(P + "RollbackRelease", {
            "deployment": "test/shop/web", "to_revision": "two"}),
            grpc.StatusCode.INVALID_ARGUMENT, "to_revision: a revision number, like 4")
        expect_rpc_error(lambda: self.c.call(P + "RollbackRelease", {
            "deployment": "nope/shop/web"}), grpc.StatusCode.INVALID_ARGUMENT,
            "deployment nope/shop/web: no kubernetes.nope in the daemon config "
            "(declared: test, bad, tls)")

    def test_rollback_release_run_fails(self):
        for target, rev, want in (
                ("test/shop/lonely", "", "no rollout history found for test/shop/lonely "
                 "(no deploy recorded by kpl)"),
                ("test/shop/web", "77", "unable to find specified revision 77 in the release "
                 "history of test/shop/web")):
            run = Client.to_dict(self.c.call(P + "RollbackRelease", {
                "deployment": target, "to_revision": rev}))
            self.all_runs.append(run["id"])
            events = [Client.to_dict(e) for e in
                      self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)]
            assert_eq(events[-1].get("run_state"), "RUN_STATE_FAILED", "run of " + target)
            got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
            assert_eq(got["stages"][0].get("message"), want, "rollback of " + target)

    # -- reads and tokens ---------------------------------------------------

    def test_list_runs_refusals(self):
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {"page_size": -1}),
                         grpc.StatusCode.INVALID_ARGUMENT, "page_size: must not be negative")
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {"page_token": "../x"}),
                         grpc.StatusCode.INVALID_ARGUMENT, "page_token: only letters, digits")
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {"page_token": "x" * 65}),
                         grpc.StatusCode.INVALID_ARGUMENT, "page_token: longer than 64")
        got = Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": "no-such"}))
        assert_eq((got.get("runs", []), got.get("next_page_token", "")), ([], ""),
                  "ListRuns of a pipeline with no runs")

    def test_watch_runs_refusals(self):
        s = self.c.stream(P + "WatchRuns", {"kinds": ["EVENT_KIND_LOG"] * 9}, timeout=30)
        expect_rpc_error(lambda: list(s), grpc.StatusCode.INVALID_ARGUMENT, "kinds: at most 8")

    def test_list_audit_refusals(self):
        expect_rpc_error(lambda: self.c.call(S + "ListAudit", {"limit": -1}),
                         grpc.StatusCode.INVALID_ARGUMENT, "limit: must not be negative")
        got = Client.to_dict(self.c.call(S + "ListAudit", {"from_seq": 10 ** 12}))
        assert_eq(got.get("events", []), [], "ListAudit past the end")

    def test_revoke_token_refusals(self):
        expect_rpc_error(lambda: self.c.call(S + "RevokeToken", {"id": ""}),
                         grpc.StatusCode.INVALID_ARGUMENT, "id: required")
        expect_rpc_error(lambda: self.c.call(S + "RevokeToken", {"id": "t_" + "0" * 40}),
                         grpc.StatusCode.INVALID_ARGUMENT, "id: required")
        expect_rpc_error(lambda: self.c.call(S + "RevokeToken", {"id": "t_000000000000"}),
                         grpc.StatusCode.NOT_FOUND, "no token t_000000000000")

    def test_revoked_token_refused_everywhere(self):
        # Tokens from here on: the first (admin) one, then a second one
        # revoked; every list call refuses the revoked one, and a second
        # revoke changes nothing and adds no audit entry.
        admin = Client.to_dict(self.c.call(S + "CreateToken", {"scope": "TOKEN_SCOPE_ADMIN", "description": "a"}))
        md = [("authorization", "Bearer " + admin["token"])]
        victim = Client.to_dict(self.c.call(S + "CreateToken", {"scope": "TOKEN_SCOPE_ADMIN", "description": "v"},
                                            metadata=md))
        vid = victim["info"]["id"]
        self.c.call(S + "RevokeToken", {"id": vid}, metadata=md)
        n = len(Client.to_dict(self.c.call(S + "ListAudit", {"limit": 1000}, metadata=md))
                .get("events", []))
        again = Client.to_dict(self.c.call(S + "RevokeToken", {"id": vid}, metadata=md))
        if not again.get("info", again).get("revoked_at"):
            raise AssertionError("a second revoke: %r" % again)
        assert_eq(len(Client.to_dict(self.c.call(S + "ListAudit", {"limit": 1000}, metadata=md))
                      .get("events", [])), n, "audit entries after a second revoke")
        bad = [("authorization", "Bearer " + victim["token"])]
        for method in (P + "ListRuns", P + "ListSecrets", P + "ListPipelines", S + "ListAudit",
                       S + "RevokeToken"):
            expect_rpc_error(lambda: self.c.call(method, {"id": vid} if "Revoke" in method
                                                 else {}, metadata=bad),
                             grpc.StatusCode.UNAUTHENTICATED)
        s = self.c.stream(P + "WatchRuns", {}, timeout=30, metadata=bad)
        expect_rpc_error(lambda: list(s), grpc.StatusCode.UNAUTHENTICATED)
        self.md = md

    def test_watch_runs_ends_with_where_to_resume(self):
        # SIGTERM ends an open WatchRuns with UNAVAILABLE naming the
        # from_global_seq to resume from (it named from_seq, a WatchRun
        # field).
        s = self.c.stream(P + "WatchRuns", {}, timeout=60, metadata=self.md)
        run = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": "name: n\nstages:\n  - { name: a, kind: noop }\n"}, metadata=self.md))
        last = None
        for ev in s:
            ev = Client.to_dict(ev)
            last = int(ev["global_seq"])
            if ev.get("run_id") == run["id"] and ev.get("run_state") == "RUN_STATE_SUCCEEDED":
                break
        self.daemon.proc.send_signal(signal.SIGTERM)
        e = expect_rpc_error(lambda: list(s), grpc.StatusCode.UNAVAILABLE)
        want = "watch again with from_global_seq=%d" % (last + 1)
        if want not in e.details():
            raise AssertionError("%r lacks %r" % (e.details(), want))
        assert_eq(self.daemon.proc.wait(timeout=30), 0, "kpld exit status")
        self.daemon.proc = None

    def close(self):
        self.c.close()
        if self.daemon.proc:
            self.daemon.stop()
        self.emu.stop()
        self.tls.stop()


def main():
    binary = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-failures-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, emulator, tmp))


if __name__ == "__main__":
    sys.exit(main())
