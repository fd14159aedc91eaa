"""Security of kpld through its gRPC API (docs/security.md): tokens and
scopes on every method (the method list comes from server reflection), the
loopback-only rule without tokens, pipeline-limited tokens, the bootstrap
token file, TLS and client certificates (a test CA made with the openssl
command), audit entries with who did what, and kplctl's token commands.

    /usr/bin/python3 tests/e2e/security_test.py PATH/TO/kpld PATH/TO/kplctl
"""

import os
import stat
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import LONG, TWO_STAGES, assert_eq, expect_rpc_error, run_suite  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"
SCOPES = ["read", "submit", "approve", "admin"]
SCOPE_ENUM = {s: "TOKEN_SCOPE_" + s.upper() for s in SCOPES}

# The decided scope and pipeline binding of every method (docs/security.md
# has the same table). Every method the server lists through reflection
# must be here: test_every_method_checks_its_scope fails on one that is not,
# so a new method cannot go untested. Binding: what a token limited to one
# pipeline may use it for ("run": a run of its pipeline, "text": a pipeline
# file of that name, "filter": pipeline_name set to it, "name": the registered
# pipeline of that name, None: refused).
EXPECTED = {
    P + "SubmitRun": ("submit", "text"), P + "GetRun": ("read", "run"),
    P + "ListRuns": ("read", "filter"), P + "WatchRun": ("read", "run"),
    P + "CancelRun": ("submit", "run"), P + "ValidatePipeline": ("read", "text"),
    P + "ApproveStage": ("approve", "run"), P + "RetryRun": ("submit", "run"),
    P + "WatchRuns": ("read", "filter"),
    P + "SetSecret": ("admin", None), P + "ListSecrets": ("admin", None),
    P + "DeleteSecret": ("admin", None),
    P + "ListReleases": ("read", None), P + "RollbackRelease": ("approve", None),
    P + "RegisterPipeline": ("admin", None), P + "ListPipelines": ("read", None),
    P + "DeletePipeline": ("admin", None),
    P + "RunPipeline": ("submit", "name"), P + "GetRunPipeline": ("read", "run"),
    S + "CreateToken": ("admin", None), S + "ListTokens": ("admin", None),
    S + "RevokeToken": ("admin", None), S + "ListAudit": ("admin", None),
    # About the caller itself: any token, a limited one too.
    S + "WhoAmI": ("read", "self"),
}

APPROVAL = """
name: gated
stages:
  - { name: build, kind: script, with: { command: ["true"] } }
  - name: ok
    kind: approval
    needs: [build]
    timeout: 60s
    with: { message: "ship it?" }
"""

# A pipeline whose one stage runs until cancelled, in a concurrency group:
# GROUPED % (name, group, cancel_in_progress).
GROUPED = """
name: %s
concurrency: { group: "%s", cancel_in_progress: %s }
stages:
  - name: sleepy
    kind: script
    with: { shell: "echo started; exec sleep 300" }
"""

# A pipeline whose stage checks it got a secret's value:
# USES_SECRET % (name, secret). The values the test sets all end in a digit
# and are over 8 bytes.
USES_SECRET = """
name: %s
stages:
  - name: use
    kind: script
    env: { V: "${{ secrets.%s }}" }
    with: { shell: "test ${#V} -gt 8" }
"""

# USES_SECRET behind an approval: GATED_SECRET % (name, secret).
GATED_SECRET = """
name: %s
stages:
  - { name: gate, kind: approval, timeout: 60s, with: { message: "go?" } }
  - name: use
    kind: script
    needs: [gate]
    env: { V: "${{ secrets.%s }}" }
    with: { shell: "test ${#V} -gt 8" }
"""

# A pipeline of one quick stage: QUICK % name.
QUICK = """
name: %s
stages:
  - { name: one, kind: script, with: { command: ["true"] } }
"""

AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Kpld:
    """kpld with extra flags and its own data directory and log."""

    def __init__(self, binary, tmp, name, *flags):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "kpld.log")
        self.ready = os.path.join(self.dir, "ready")
        self.argv = [binary, "--listen", "127.0.0.1:0", "--data-dir",
                     os.path.join(self.dir, "data"), "--ready-file", self.ready] + list(flags)
        self.proc = None
        self.addr = None

    def start(self):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=logf)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise AssertionError("kpld exited with %s before serving; log:\n%s"
                                     % (self.proc.returncode, self.log_text()))
            if time.monotonic() > deadline:
                raise AssertionError("kpld did not serve within 30 s")
            time.sleep(0.02)
        self.addr = open(self.ready).read().strip()
        return self

    def client(self, **kw):
        return Client.connect(self.addr, **kw)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def log_text(self):
        return open(self.log).read() if os.path.exists(self.log) else ""


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_pki(d):
    """A test CA, a server certificate for 127.0.0.1 and a client one, and a
    second CA that signed nothing of these."""
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", ca + ".key", "-out", ca + ".pem",
                "-days", "2", "-subj", "/CN=kpl test " + ca, cwd=d)
    with open(os.path.join(d, "srv.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "extendedKeyUsage=serverAuth\n")
    with open(os.path.join(d, "cli.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for name, cn in (("srv", "127.0.0.1"), ("cli", "kpl-test-client")):
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
                "-subj", "/CN=" + cn, cwd=d)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2",
                "-extfile", name + ".ext", cwd=d)
    return {k: os.path.join(d, k) for k in
            ("ca.pem", "other-ca.pem", "srv.pem", "srv.key", "cli.pem", "cli.key")}


def call_any(c, method, token=None, no_auth=False):
    """Calls method with an empty request; returns None if it got past
    authorization (whatever the handler said then), else the status code."""
    md = [("authorization", "Bearer " + token)] if token else None
    if no_auth:
        md = [("x-none", "1")]
    _, _, _, streaming = c.method(method)
    try:
        if streaming:
            stream = c.stream(method, {}, timeout=1.5, metadata=md)
            try:
                next(iter(stream))
            except StopIteration:
                pass
            stream.cancel()
        else:
            c.call(method, {}, metadata=md)
    except grpc.RpcError as e:
        if e.code() in AUTH_CODES:
            return e.code()
    return None


def submit(c, text, token=None):
    md = [("authorization", "Bearer " + token)] if token else None
    return Client.to_dict(c.call(P + "SubmitRun", {"pipeline": text}, metadata=md))


def events_of(c, run_id):
    return [Client.to_dict(e) for e in c.stream(P + "WatchRun", {"id": run_id}, timeout=60)]


class Suite:
    def __init__(self, kpld, kplctl, tmp):
        self.kpld_bin = kpld
        self.kplctl_bin = kplctl
        self.tmp = tmp
        self.d = Kpld(kpld, tmp, "main").start()
        self.daemon = self.d  # run_suite prints its log on failure
        self.c = self.d.client()
        self.tokens = {}     # name -> token text
        self.ids = {}        # name -> token id
        self.shown = []      # every token text this suite saw, for the log check
        self.pki = None

    def create(self, scope, name, pipeline="", token=None):
        md = [("authorization", "Bearer " + (token or self.tokens["admin"]))]
        resp = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": SCOPE_ENUM[scope], "pipeline": pipeline, "description": name},
            metadata=md))
        tok = resp["token"]
        if not tok.startswith("kpl_") or len(tok) != 47:
            raise AssertionError("token format: %r" % tok)
        self.tokens[name] = tok
        self.ids[name] = resp["info"]["id"]
        self.shown.append(tok)
        return tok

    def close(self):
        self.c.close()
        proc = self.d.proc
        proc.terminate()
        assert_eq(proc.wait(timeout=30), 0, "kpld exit code after SIGTERM")
        self.d.proc = None

    # -- tests ----------------------------------------------------------

    def test_no_token_means_loopback_only(self):
        d = os.path.join(self.tmp, "refuse")
        p = subprocess.run([self.kpld_bin, "--listen", "0.0.0.0:0", "--data-dir",
                            os.path.join(d, "data")], capture_output=True, text=True,
                           timeout=30)
        assert_eq(p.returncode, 2, "exit code of kpld on 0.0.0.0 without tokens")
        if "refusing to listen on 0.0.0.0:0" not in p.stderr or "no API token" not in p.stderr:
            raise AssertionError("refusal message: %r" % p.stderr)
        if "listening on" in p.stderr:
            raise AssertionError("kpld bound the address before refusing: %r" % p.stderr)
        if "every call is allowed" not in self.d.log_text():
            raise AssertionError("kpld did not say it runs without tokens")
        # Open mode: no token needed, the caller is "local".
        self.c.call(P + "ListRuns", {})
        assert_eq(self.c.health_check(""), "SERVING", "health")

    def test_first_admin_token_without_auth(self):
        resp = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_ADMIN", "description": "root"}))
        self.tokens["admin"] = resp["token"]
        self.ids["admin"] = resp["info"]["id"]
        self.shown.append(resp["token"])
        # From now on a token is needed, even for the same call.
        expect_rpc_error(lambda: self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_ADMIN"}), grpc.StatusCode.UNAUTHENTICATED, "needs a token")
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {}, metadata=[
            ("authorization", "Bearer kpl_not-a-real-token")]),
            grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {}, metadata=[
            ("authorization", "Basic Zm9vOmJhcg==")]), grpc.StatusCode.UNAUTHENTICATED)
        for s in ("read", "submit", "approve"):
            self.create(s, s)
        self.create("read", "revoked")
        self.c.call(S + "RevokeToken", {"id": self.ids["revoked"]},
                    metadata=[("authorization", "Bearer " + self.tokens["admin"])])
        # Admin tokens cannot be limited to a pipeline.
        expect_rpc_error(lambda: self.create("admin", "x", pipeline="p"),
                         grpc.StatusCode.INVALID_ARGUMENT, "admin")

    def test_every_method_checks_its_scope(self):
        methods = []
        for svc in self.c.list_services():
            if svc.startswith("grpc."):
                continue
            self.c.load_symbol(svc)
            sd = self.c.types.pool.FindServiceByName(svc)
            methods += ["%s/%s" % (svc, m.name) for m in sd.methods]
        for m in EXPECTED:
            if m not in methods:
                raise AssertionError("%s is not served (reflection lists %r)" % (m, methods))
        missing = [m for m in methods if m not in EXPECTED]
        if missing:
            raise AssertionError("served but not in EXPECTED (decide their scope and "
                                 "binding, here and in docs/security.md): %r" % missing)
        self.methods = methods
        for m in methods:
            got = call_any(self.c, m, no_auth=True)
            assert_eq(got, grpc.StatusCode.UNAUTHENTICATED, "%s without a token" % m)
            got = call_any(self.c, m, token=self.tokens["revoked"])
            assert_eq(got, grpc.StatusCode.UNAUTHENTICATED, "%s with a revoked token" % m)
            allowed = [s for s in SCOPES if call_any(self.c, m, token=self.tokens[s]) is None]
            for s in SCOPES:
                if s not in allowed:
                    assert_eq(call_any(self.c, m, token=self.tokens[s]),
                              grpc.StatusCode.PERMISSION_DENIED, "%s with scope %s" % (m, s))
            if not allowed or allowed != SCOPES[SCOPES.index(allowed[0]):]:
                raise AssertionError("%s: allowed scopes %r are not a top range" % (m, allowed))
            assert_eq(allowed[0], EXPECTED[m][0], "least scope of %s" % m)
        # Health and reflection stay open.
        anon = self.d.client()
        assert_eq(anon.health_check(""), "SERVING", "health without a token")
        anon.list_services()
        anon.close()

    def test_pipeline_limited_token(self):
        admin = self.tokens["admin"]
        ci = self.create("submit", "ci-two-stage", pipeline="two-stage")
        run = submit(self.c, TWO_STAGES, token=ci)
        other = submit(self.c, LONG, token=admin)
        expect_rpc_error(lambda: submit(self.c, LONG, token=ci),
                         grpc.StatusCode.PERMISSION_DENIED, "limited to pipeline two-stage")
        md = [("authorization", "Bearer " + ci)]
        self.c.call(P + "GetRun", {"id": run["id"]}, metadata=md)
        expect_rpc_error(lambda: self.c.call(P + "GetRun", {"id": other["id"]}, metadata=md),
                         grpc.StatusCode.PERMISSION_DENIED, "of pipeline long")
        expect_rpc_error(lambda: self.c.call(P + "CancelRun", {"id": other["id"]}, metadata=md),
                         grpc.StatusCode.PERMISSION_DENIED)
        expect_rpc_error(lambda: self.c.call(P + "ListRuns", {}, metadata=md),
                         grpc.StatusCode.PERMISSION_DENIED, "set pipeline_name")
        got = Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": "two-stage"},
                                         metadata=md))
        if run["id"] not in [r["id"] for r in got.get("runs", [])]:
            raise AssertionError("ListRuns with the filter lacks the run")
        self.c.call(P + "CancelRun", {"id": other["id"]},
                    metadata=[("authorization", "Bearer " + admin)])

    def test_limited_token_refused_on_unbound_methods(self):
        # Every method bound to no pipeline (releases, secrets,
        # registrations, tokens) is refused to a limited token of any scope,
        # whatever the request: ListReleases and RollbackRelease used to let
        # one through.
        limited = {s: self.create(s, "lim-" + s, pipeline="two-stage")
                   for s in ("read", "submit", "approve")}
        methods = getattr(self, "methods", list(EXPECTED))
        for m in methods:
            if EXPECTED[m][1] is not None:
                continue
            for s, tok in limited.items():
                assert_eq(call_any(self.c, m, token=tok), grpc.StatusCode.PERMISSION_DENIED,
                          "%s with a %s token limited to a pipeline" % (m, s))
        md = [("authorization", "Bearer " + limited["approve"])]
        expect_rpc_error(lambda: self.c.call(P + "RollbackRelease", {
            "deployment": "kind/default/web"}, metadata=md),
            grpc.StatusCode.PERMISSION_DENIED, "is not about one pipeline")
        expect_rpc_error(lambda: self.c.call(P + "ListReleases", {
            "deployment": "kind/default/web"}, metadata=[
                ("authorization", "Bearer " + limited["read"])]),
            grpc.StatusCode.PERMISSION_DENIED, "limited to pipeline two-stage")
        # The same calls with unlimited tokens get past authorization.
        assert_eq(call_any(self.c, P + "ListReleases", token=self.tokens["read"]), None,
                  "ListReleases with an unlimited read token")
        # A run id that is not stored is not found for a limited token.
        expect_rpc_error(lambda: self.c.call(P + "CancelRun", {"id": "no-such-run"},
                                             metadata=md),
                         grpc.StatusCode.NOT_FOUND, "not found")

    def test_idempotency_and_concurrency_are_per_pipeline(self):
        admin = self.tokens["admin"]
        amd = [("authorization", "Bearer " + admin)]
        # Two pipelines, one idempotency key: two runs.
        one = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": TWO_STAGES, "idempotency_key": "shared-key"}, metadata=amd))
        two = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": QUICK % "other",
            "idempotency_key": "shared-key"}, metadata=amd))
        if one["id"] == two["id"]:
            raise AssertionError("two pipelines with one idempotency key share run %s"
                                 % one["id"])
        assert_eq((one["pipeline_name"], two["pipeline_name"]), ("two-stage", "other"),
                  "pipelines of the two runs")
        again = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": QUICK % "other",
            "idempotency_key": "shared-key"}, metadata=amd))
        assert_eq(again["id"], two["id"], "the same pipeline and key again")
        # A token limited to "mine" cannot read the other's run by its key:
        # it gets a run of its own pipeline.
        mine = self.create("submit", "mine-bot", pipeline="mine")
        got = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": QUICK % "mine",
            "idempotency_key": "shared-key"},
            metadata=[("authorization", "Bearer " + mine)]))
        if got["id"] in (one["id"], two["id"]) or got["pipeline_name"] != "mine":
            raise AssertionError("a limited token got another pipeline's run by its key: %r"
                                 % got)
        # Keys starting with hook: are kpld's own (webhook deliveries).
        expect_rpc_error(lambda: self.c.call(P + "SubmitRun", {
            "pipeline": QUICK % "mine",
            "idempotency_key": "hook:github:x:mine"},
            metadata=[("authorization", "Bearer " + mine)]),
            grpc.StatusCode.INVALID_ARGUMENT, "hook:")

    def test_concurrency_groups_are_per_pipeline(self):
        # The same concurrency group in another pipeline with
        # cancel_in_progress does not cancel this one.
        amd = [("authorization", "Bearer " + self.tokens["admin"])]
        mine = self.tokens["mine-bot"]
        victim = Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": GROUPED % ("victim", "deploy", "false")}, metadata=amd))
        Client.to_dict(self.c.call(P + "SubmitRun", {
            "pipeline": GROUPED % ("mine", "deploy", "true")},
            metadata=[("authorization", "Bearer " + mine)]))
        for ev in self.c.stream(P + "WatchRun", {"id": victim["id"]}, timeout=60,
                                metadata=amd):
            if ev.stage == "sleepy" and ev.message == "started":
                break
        run = Client.to_dict(self.c.call(P + "GetRun", {"id": victim["id"]}, metadata=amd))
        assert_eq(run["state"], "RUN_STATE_RUNNING",
                  "a run of another pipeline's group with cancel_in_progress")
        self.c.call(P + "CancelRun", {"id": victim["id"]}, metadata=amd)
        for r in Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": "mine"},
                                            metadata=amd)).get("runs", []):
            if r["state"] in ("RUN_STATE_QUEUED", "RUN_STATE_RUNNING"):
                try:
                    self.c.call(P + "CancelRun", {"id": r["id"]}, metadata=amd)
                except grpc.RpcError as e:  # it ended meanwhile
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise

    def test_audit_cancel_approve_tokens_secrets(self):
        admin = Client.connect(self.d.addr, token=self.tokens["admin"])
        sub = self.create("submit", "ci-bot")
        appr = self.create("approve", "alice")
        # Cancel: the audit event names the token and comes before the end.
        run = submit(self.c, LONG, token=sub)
        self.c.call(P + "CancelRun", {"id": run["id"]},
                    metadata=[("authorization", "Bearer " + sub)])
        evs = events_of(admin, run["id"])
        audit = [e for e in evs if e.get("kind") == "EVENT_KIND_AUDIT"]
        want = "token %s (ci-bot) cancelled the run" % self.ids["ci-bot"]
        assert_eq([e["message"] for e in audit], [want], "audit events of the cancelled run")
        if evs.index(audit[0]) > evs.index(evs[-1]) or evs[-1].get("kind") != "EVENT_KIND_RUN_STATE":
            raise AssertionError("the audit event is not before the run's final event")
        # Approve: submit cannot, approve can; the event names the approver.
        run = submit(self.c, APPROVAL, token=sub)
        for ev in admin.stream(P + "WatchRun", {"id": run["id"]}, timeout=60):
            if ev.stage == "ok" and ev.stage_state == 7:  # WAITING
                break
        expect_rpc_error(lambda: self.c.call(P + "ApproveStage", {
            "run_id": run["id"], "stage": "ok", "approve": True},
            metadata=[("authorization", "Bearer " + sub)]), grpc.StatusCode.PERMISSION_DENIED)
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "ok", "approve": True,
                                         "by": "someone else"},
                    metadata=[("authorization", "Bearer " + appr)])
        evs = events_of(admin, run["id"])
        audit = [e for e in evs if e.get("kind") == "EVENT_KIND_AUDIT"]
        assert_eq([(e["message"], e.get("stage")) for e in audit],
                  [("token %s (alice) approved stage ok" % self.ids["alice"], "ok")],
                  "audit events of the approved run")
        assert_eq(evs[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "approved run")
        # Secrets and tokens: in the audit log (admin only).
        admin.call(P + "SetSecret", {"name": "db_pass", "value": "s3cr3t-value"})
        admin.call(P + "DeleteSecret", {"name": "db_pass"})
        log = Client.to_dict(admin.call(S + "ListAudit", {}))
        msgs = [e["message"] for e in log.get("events", [])]
        aid = self.ids["admin"]
        for w in ["local created token %s (scope admin, \"root\")" % aid,
                  "token %s (root) revoked token %s" % (aid, self.ids["revoked"]),
                  "token %s (root) created token %s (scope submit, \"ci-bot\")"
                  % (aid, self.ids["ci-bot"]),
                  want, "token %s (alice) approved stage ok" % self.ids["alice"],
                  "token %s (root) set secret db_pass" % aid,
                  "token %s (root) deleted secret db_pass" % aid]:
            if w not in msgs:
                raise AssertionError("audit log lacks %r:\n%s" % (w, "\n".join(msgs)))
        if any("s3cr3t-value" in m for m in msgs):
            raise AssertionError("a secret value is in the audit log")
        # Paging: from next_seq there is nothing more.
        more = Client.to_dict(admin.call(S + "ListAudit", {"from_seq": log["next_seq"]}))
        assert_eq(more.get("events", []), [], "audit after next_seq")
        page = Client.to_dict(admin.call(S + "ListAudit", {"limit": 2}))
        assert_eq(len(page["events"]), 2, "audit page size")
        admin.close()

    def test_secret_limited_to_pipelines(self):
        admin = Client.connect(self.d.addr, token=self.tokens["admin"])
        got = Client.to_dict(admin.call(P + "SetSecret", {
            "name": "deploy_key", "value": "dk-value-123", "pipelines": ["allowed", "also"]}))
        assert_eq(got.get("pipelines"), ["allowed", "also"], "SetSecret's answer")
        listed = {x["name"]: x.get("pipelines", []) for x in
                  Client.to_dict(admin.call(P + "ListSecrets", {})).get("secrets", [])}
        assert_eq(listed.get("deploy_key"), ["allowed", "also"], "ListSecrets")
        # Another pipeline refers to it: refused at submit, naming both.
        expect_rpc_error(lambda: admin.call(P + "SubmitRun", {
            "pipeline": USES_SECRET % ("intruder", "deploy_key")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "secret deploy_key is limited to pipelines allowed, also; pipeline intruder "
            "may not use it")
        # A pipeline on the list gets the value (the run succeeds only if
        # the value is what was set).
        run = Client.to_dict(admin.call(P + "SubmitRun", {
            "pipeline": USES_SECRET % ("allowed", "deploy_key")}))
        evs = events_of(admin, run["id"])
        assert_eq(evs[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                  "a run of a pipeline the secret allows")
        # Limited after a run was submitted: its stage cannot have it.
        admin.call(P + "SetSecret", {"name": "later", "value": "later-value-1"})
        run = Client.to_dict(admin.call(P + "SubmitRun", {
            "pipeline": GATED_SECRET % ("intruder", "later")}))
        for ev in admin.stream(P + "WatchRun", {"id": run["id"]}, timeout=60):
            if ev.stage == "gate" and ev.stage_state == 7:  # WAITING
                break
        admin.call(P + "SetSecret", {"name": "later", "value": "later-value-1",
                                     "pipelines": ["allowed"]})
        admin.call(P + "ApproveStage", {"run_id": run["id"], "stage": "gate",
                                        "approve": True})
        evs = events_of(admin, run["id"])
        assert_eq(evs[-1].get("run_state"), "RUN_STATE_FAILED",
                  "a run that refers to a secret limited after its submit")
        if not any("secrets.later" in e.get("message", "") for e in evs):
            raise AssertionError("no event names the secret: %r" % evs[-3:])
        expect_rpc_error(lambda: admin.call(P + "SubmitRun", {
            "pipeline": USES_SECRET % ("intruder", "later")}),
            grpc.StatusCode.INVALID_ARGUMENT, "pipeline intruder may not use it")
        # Set again without pipelines: every pipeline may use it.
        admin.call(P + "SetSecret", {"name": "later", "value": "later-value-1"})
        run = Client.to_dict(admin.call(P + "SubmitRun", {
            "pipeline": USES_SECRET % ("intruder", "later")}))
        assert_eq(events_of(admin, run["id"])[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                  "a secret for every pipeline again")
        expect_rpc_error(lambda: admin.call(P + "SetSecret", {
            "name": "bad", "value": "bad-value", "pipelines": ["Not A Name"]}),
            grpc.StatusCode.INVALID_ARGUMENT, "not a pipeline name")
        # kplctl secret set --pipeline, repeated and comma-separated.
        s = ["--server", self.d.addr, "--token", self.tokens["admin"]]
        p = self._ctl(*s, "secret", "set", "ctl_limited", "--pipeline", "allowed,also",
                      "--pipeline", "third", stdin="ctl-limited-value")
        assert_eq(p.returncode, 0, "kplctl secret set --pipeline: " + p.stderr)
        assert_eq(p.stdout.strip(), "secret ctl_limited set for pipelines allowed, also, third",
                  "kplctl secret set --pipeline output")
        p = self._ctl(*s, "secret", "list")
        if "ctl_limited (pipelines: allowed, also, third)" not in p.stdout.splitlines():
            raise AssertionError("kplctl secret list: %r" % p.stdout)
        p = self._ctl(*s, "secret", "rm", "ctl_limited", "--pipeline", "x")
        assert_eq(p.returncode, 2, "kplctl secret rm --pipeline: exit code")
        expect_rpc_error(lambda: admin.call(P + "SubmitRun", {
            "pipeline": USES_SECRET % ("intruder", "ctl_limited")}),
            grpc.StatusCode.INVALID_ARGUMENT, "secret ctl_limited is limited to pipelines "
            "allowed, also, third; pipeline intruder")
        admin.close()

    def _ctl(self, *args, env=None, stdin=None):
        e = dict(os.environ, HOME=os.path.join(self.tmp, "home"))
        for k in ("KPL_SERVER", "KPL_TOKEN", "KPL_CA", "KPL_CERT", "KPL_KEY", "KPL_CONFIG",
                  "XDG_CONFIG_HOME"):
            e.pop(k, None)
        e.update(env or {})
        return subprocess.run([self.kplctl_bin] + list(args), capture_output=True,
                              text=True, timeout=60, env=e, input=stdin or "")

    def test_kplctl_token_commands(self):
        s = ["--server", self.d.addr]
        p = self._ctl(*s, "token", "create", "--scope", "read", "--description", "ctl")
        assert_eq(p.returncode, 3, "token create without a token: exit code")
        if "UNAUTHENTICATED" not in p.stderr:
            raise AssertionError(p.stderr)
        p = self._ctl(*s, "token", "create", "--scope", "read", "--pipeline", "two-stage",
                      "--description", "ctl", env={"KPL_TOKEN": self.tokens["admin"]})
        assert_eq(p.returncode, 0, "token create: " + p.stderr)
        tok = p.stdout.strip()
        self.shown.append(tok)
        if not tok.startswith("kpl_") or "\n" in tok or tok in p.stderr:
            raise AssertionError("token create output: %r / %r" % (p.stdout, p.stderr))
        p = self._ctl(*s, "--token", self.tokens["admin"], "token", "list")
        assert_eq(p.returncode, 0, "token list: " + p.stderr)
        line = [ln for ln in p.stdout.splitlines() if ln.endswith("ctl")]
        if len(line) != 1 or "read" not in line[0] or "two-stage" not in line[0]:
            raise AssertionError("token list: %r" % p.stdout)
        if "kpl_" in p.stdout:
            raise AssertionError("token list shows a token")
        tid = line[0].split()[0]
        # The config file: server and token, read by any command.
        cfg = os.path.join(self.tmp, "home", ".config", "kpl")
        os.makedirs(cfg, exist_ok=True)
        with open(os.path.join(cfg, "config"), "w") as f:
            f.write("# test\nserver = %s\ntoken = %s\n" % (self.d.addr, tok))
        os.chmod(os.path.join(cfg, "config"), 0o600)
        p = self._ctl("list", "--pipeline", "two-stage")
        assert_eq(p.returncode, 0, "list with the config file: " + p.stderr)
        p = self._ctl("token", "list")
        assert_eq(p.returncode, 3, "a read token lists tokens: exit code")
        if "PERMISSION_DENIED" not in p.stderr or tok in p.stderr:
            raise AssertionError(p.stderr)
        p = self._ctl(*s, "--token", self.tokens["admin"], "token", "revoke", tid)
        assert_eq((p.returncode, p.stdout.strip()), (0, tid + " revoked"), "revoke")
        p = self._ctl("list", "--pipeline", "two-stage")
        assert_eq(p.returncode, 3, "a revoked token: exit code")
        if "UNAUTHENTICATED" not in p.stderr or "revoked" not in p.stderr:
            raise AssertionError(p.stderr)
        p = self._ctl(*s, "--token", self.tokens["admin"], "audit")
        if p.returncode or "revoked token " + tid not in p.stdout:
            raise AssertionError("kplctl audit: %r %r" % (p.stdout, p.stderr))

    def test_bootstrap_token_file(self):
        path = os.path.join(self.tmp, "boot", "admin.token")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        d = Kpld(self.kpld_bin, self.tmp, "boot", "--bootstrap-token-file", path).start()
        try:
            assert_eq(stat.S_IMODE(os.stat(path).st_mode), 0o600, "token file mode")
            tok = open(path).read().strip()
            self.shown.append(tok)
            c = d.client()
            expect_rpc_error(lambda: c.call(P + "ListRuns", {}),
                             grpc.StatusCode.UNAUTHENTICATED)
            c.call(S + "ListTokens", {}, metadata=[("authorization", "Bearer " + tok)])
            c.close()
            d.stop()
            d.start()  # an admin token exists: the file stays as it was
            assert_eq(open(path).read().strip(), tok, "token file after a restart")
            if "admin token exists" not in d.log_text():
                raise AssertionError("kpld did not say it left the file alone")
        finally:
            d.stop()

    def _pki(self):
        if not self.pki:
            self.pki = make_pki(os.path.join(self.tmp, "pki"))
        return self.pki

    def test_tls(self):
        k = self._pki()
        d = Kpld(self.kpld_bin, self.tmp, "tls", "--tls-cert", k["srv.pem"],
                 "--tls-key", k["srv.key"]).start()
        try:
            for kw in ({}, {"tls_ca": k["other-ca.pem"]}):
                try:
                    Client.connect(d.addr, timeout=2, **kw).close()
                except Exception:
                    pass
                else:
                    raise AssertionError("connected to a TLS kpld with %r" % kw)
            c = d.client(tls_ca=k["ca.pem"])
            assert_eq(c.health_check(""), "SERVING", "health over TLS")
            c.call(P + "ListRuns", {})
            c.close()
            p = self._ctl("--server", d.addr, "--ca", k["ca.pem"], "list")
            assert_eq(p.returncode, 0, "kplctl --ca: " + p.stderr)
            p = self._ctl("--server", d.addr, "list")
            assert_eq(p.returncode, 3, "kplctl without --ca against TLS")
        finally:
            d.stop()
        if "(port" not in d.log_text() or "TLS" not in d.log_text():
            raise AssertionError("kpld did not say it serves TLS")

    def test_mtls(self):
        k = self._pki()
        d = Kpld(self.kpld_bin, self.tmp, "mtls", "--tls-cert", k["srv.pem"],
                 "--tls-key", k["srv.key"], "--client-ca", k["ca.pem"]).start()
        try:
            try:
                c = Client.connect(d.addr, timeout=2, tls_ca=k["ca.pem"])
                c.health_check("")
            except Exception:
                pass
            else:
                raise AssertionError("an mTLS kpld answered a client without a certificate")
            c = d.client(tls_ca=k["ca.pem"], client_cert=k["cli.pem"], client_key=k["cli.key"])
            assert_eq(c.health_check(""), "SERVING", "health over mTLS")
            c.call(P + "SetSecret", {"name": "api_key", "value": "abcd1234"})
            msgs = [e["message"] for e in Client.to_dict(c.call(S + "ListAudit", {}))["events"]]
            if not any(m.startswith("local (cert ") and "kpl-test-client" in m
                       and m.endswith("set secret api_key") for m in msgs):
                raise AssertionError("audit lacks the client certificate: %r" % msgs)
            c.close()
            self._kplctl_mtls(d, k)
        finally:
            d.stop()

    def _kplctl_mtls(self, d, k):
        """kplctl against the mTLS kpld: --cert/--key, KPL_CERT/KPL_KEY,
        cert/key in the config file, and the errors without them."""
        s = ["--server", d.addr, "--ca", k["ca.pem"]]
        p = self._ctl(*s, "list")
        assert_eq(p.returncode, 3, "kplctl --ca without a client certificate: exit code")
        if "UNAVAILABLE" not in p.stderr or "TLS" not in p.stderr \
                or "--client-ca" not in p.stderr or "--cert" not in p.stderr:
            raise AssertionError("no TLS handshake message: %r" % p.stderr)
        p = self._ctl(*s, "--cert", k["cli.pem"], "--key", k["cli.key"], "list")
        assert_eq(p.returncode, 0, "kplctl --cert --key list: " + p.stderr)
        p = self._ctl(*s, "--cert", k["cli.pem"], "--key", k["cli.key"], "secret", "set",
                      "ctl_key", stdin="abcd-from-kplctl")
        assert_eq(p.returncode, 0, "kplctl secret set over mTLS: " + p.stderr)
        env = {"KPL_CERT": k["cli.pem"], "KPL_KEY": k["cli.key"]}
        p = self._ctl(*s, "list", env=env)
        assert_eq(p.returncode, 0, "kplctl with KPL_CERT/KPL_KEY: " + p.stderr)
        p = self._ctl(*s, "audit", env=env)
        if p.returncode or not any("(cert " in ln and "kpl-test-client" in ln
                                   and ln.endswith("set secret ctl_key")
                                   for ln in p.stdout.splitlines()):
            raise AssertionError("kplctl audit lacks kplctl's certificate: %r %r"
                                 % (p.stdout, p.stderr))
        # The config file: every connection key, nothing on the command line.
        cfg = os.path.join(self.tmp, "mtls-config")
        with open(cfg, "w") as f:
            f.write("server = %s\nca = %s\ncert = %s\nkey = %s\n"
                    % (d.addr, k["ca.pem"], k["cli.pem"], k["cli.key"]))
        p = self._ctl("list", env={"KPL_CONFIG": cfg})
        assert_eq(p.returncode, 0, "kplctl with cert and key in the config file: " + p.stderr)
        # A missing key file, only one of the two, a cert without --ca: exit 2.
        missing = os.path.join(self.tmp, "pki", "missing.key")
        p = self._ctl(*s, "--cert", k["cli.pem"], "--key", missing, "list")
        assert_eq(p.returncode, 2, "kplctl with a missing key file: exit code")
        if missing not in p.stderr or "No such file" not in p.stderr:
            raise AssertionError("missing key file not named: %r" % p.stderr)
        p = self._ctl(*s, "list", env={"KPL_CERT": k["cli.pem"], "KPL_KEY": missing})
        assert_eq(p.returncode, 2, "KPL_KEY naming a missing file: exit code")
        if missing not in p.stderr:
            raise AssertionError("missing KPL_KEY file not named: %r" % p.stderr)
        p = self._ctl(*s, "--cert", k["cli.pem"], "list")
        assert_eq(p.returncode, 2, "kplctl --cert without --key: exit code")
        if k["cli.pem"] not in p.stderr or "--key" not in p.stderr:
            raise AssertionError("--cert without --key: %r" % p.stderr)
        p = self._ctl("--server", d.addr, "--cert", k["cli.pem"], "--key", k["cli.key"], "list")
        assert_eq(p.returncode, 2, "kplctl --cert --key without --ca: exit code")
        p = self._ctl(*s, "--cert", k["cli.key"], "--key", k["cli.pem"], "list")
        assert_eq(p.returncode, 2, "kplctl with cert and key swapped: exit code")
        if "not a PEM certificate" not in p.stderr or k["cli.key"] not in p.stderr:
            raise AssertionError("swapped cert and key: %r" % p.stderr)

    def test_no_token_in_any_log(self):
        logs = [self.d.log_text()]
        for name in ("boot", "tls", "mtls"):
            p = os.path.join(self.tmp, name, "kpld.log")
            if os.path.exists(p):
                logs.append(open(p).read())
        if len(self.shown) < 5:
            raise AssertionError("too few tokens seen to check: %d" % len(self.shown))
        for tok in self.shown:
            for text in logs:
                if tok in text or tok[4:] in text:
                    raise AssertionError("a token is in a kpld log")


def main():
    kpld = os.path.abspath(sys.argv[1])
    kplctl = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-sec-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, kplctl, tmp))


if __name__ == "__main__":
    sys.exit(main())
