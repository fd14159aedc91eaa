"""Chat commands end to end: Slack slash commands and buttons, DingTalk's
outgoing robot, on kpld's --http-listen (engine/chatops.c).

    /usr/bin/python3 tests/e2e/chatops_test.py PATH/TO/kpld PATH/TO/kube_emulator.py

Requests are signed here the way Slack and DingTalk sign them; a Slack
emulator (an HTTP server on 127.0.0.1) takes the response_url posts. The
actions are checked where they land: the run's state on WatchRun, the stage
message, the Kubernetes emulator's Deployment, and ListAudit.
"""

import base64
import hashlib
import hmac
import http.client
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, assert_eq, run_suite, submit  # noqa: E402
from deploy_test import DEPLOYMENT, TOKEN, WEB, Emulator, deploy_pipeline  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DING_SECRET = "dt-app-secret-Qx81nB0c"

APPROVAL = """
name: gate
stages:
  - { name: build, kind: script, with: { command: ["true"] } }
  - name: ok
    kind: approval
    needs: [build]
    timeout: 120s
    with: { message: "ship it?" }
  - { name: ship, kind: script, needs: [ok], with: { command: ["echo", "shipped"] } }
"""

NOTIFIED = """
name: notified
notify:
  - { notifier: team-slack, events: [waiting, failed] }
stages:
  - name: ok
    kind: approval
    timeout: 120s
    with: { message: "ship it?" }
  - { name: boom, kind: script, needs: [ok], with: { command: ["false"] } }
"""

SLEEPER = """
name: sleeper
stages:
  - name: nap
    kind: script
    with:
      shell: |
        echo started
        exec sleep 300
"""


class SlackEmulator:
    """Takes POSTs to any path (a response_url) and keeps them in order."""

    def __init__(self):
        self.posts = []
        self.cond = threading.Condition()
        emu = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with emu.cond:
                    emu.posts.append((self.path, self.headers.get("Content-Type"),
                                      json.loads(body)))
                    emu.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def wait(self, path, timeout=60):
        """The first post to path, awaited (timeout is a failure bound)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for p in self.posts:
                    if p[0] == path:
                        return p
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no post to %s; got %r" % (path, self.posts))
                self.cond.wait(left)

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def slack_sign(body, ts, secret=SLACK_SECRET):
    base = b"v0:" + str(ts).encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def ding_sign(ts_ms, secret=DING_SECRET):
    mac = hmac.new(secret.encode(), ("%d\n%s" % (ts_ms, secret)).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


class Suite:
    def __init__(self, binary, emulator, tmp):
        self.tmp = tmp
        self.emu = Emulator(emulator, tmp, "kube", "--pace", "0.1", "--token", TOKEN,
                            "--namespace", "shop")
        self.kube = "http://127.0.0.1:%d" % self.emu.port
        self.kube_api("POST", "/apis/apps/v1/namespaces/shop/deployments", DEPLOYMENT)
        self.slack_emu = SlackEmulator()
        kc = os.path.join(tmp, "kc")
        with open(kc, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "ctx",
                       "clusters": [{"name": "c", "cluster": {"server": self.kube}}],
                       "users": [{"name": "u", "user": {"token": TOKEN}}],
                       "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u",
                                                                "namespace": "shop"}}]}, f)
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("""
kubernetes:
  test: { kubeconfig: %s }
notifiers:
  team-slack: { kind: slack, url: "http://127.0.0.1:%d/notify", buttons: true }
chatops:
  slack:
    signing_secret: "${{ secrets.SLACK_SIGNING_SECRET }}"
    response_url_prefix: "http://127.0.0.1:%d/"
    team_id: T1
    users:
      U1: { identity: alice, scope: approve }
      U2: { identity: rita, scope: read }
      U3: { identity: sam, scope: approve, pipelines: [other] }
  dingtalk:
    app_secret: "${{ secrets.DING_APP_SECRET }}"
    users:
      staff1: { identity: bob, scope: submit }
""" % (kc, self.slack_emu.port, self.slack_emu.port))
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             ["--config", cfg, "--http-listen", "127.0.0.1:0"])
        self.c = self.daemon.start()
        host, port = self.daemon.http.rsplit(":", 1)
        self.http = (host, int(port))
        self.c.call(P + "SetSecret", {"name": "SLACK_SIGNING_SECRET", "value": SLACK_SECRET})
        self.c.call(P + "SetSecret", {"name": "DING_APP_SECRET", "value": DING_SECRET})
        self.n = 0
        self.last_ts = 0

    def close(self):
        assert_eq(self.daemon.stop(), 0, "kpld exit code")
        self.slack_emu.stop()
        self.emu.stop()
        log = open(self.daemon.log).read()
        for s in (SLACK_SECRET, DING_SECRET):
            if s in log:
                raise AssertionError("a chat secret is in kpld's log")

    # -- helpers ---------------------------------------------------------

    def kube_api(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.emu.port, timeout=10)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": "Bearer " + TOKEN,
                              "Content-Type": "application/json"})
        r = conn.getresponse()
        out = json.loads(r.read() or b"null")
        conn.close()
        return out

    def image(self):
        d = self.kube_api("GET", WEB)
        return [c["image"] for c in d["spec"]["template"]["spec"]["containers"]
                if c["name"] == "web"][0]

    def post(self, path, body, headers):
        conn = http.client.HTTPConnection(*self.http, timeout=30)
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def slack_raw(self, fields, ts=None, secret=SLACK_SECRET, sig=None):
        body = urllib.parse.urlencode(fields).encode()
        ts = int(time.time()) if ts is None else ts
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "X-Slack-Request-Timestamp": str(ts),
                   "X-Slack-Signature": sig or slack_sign(body, ts, secret)}
        return body, headers

    def slack(self, text, user="U1", url=None, team="T1", **kw):
        """A slash command; returns (status, parsed JSON or raw bytes, path of its
        response_url)."""
        self.n += 1
        path = "/commands/%d" % self.n
        fields = {"token": "deprecated", "team_id": team, "team_domain": "acme",
                  "channel_id": "C1", "channel_name": "releases", "user_id": user,
                  "user_name": "someone", "command": "/kpl", "text": text,
                  "response_url": url or "http://127.0.0.1:%d%s" % (self.slack_emu.port, path),
                  "trigger_id": "1.2.3", "api_app_id": "A1"}
        body, headers = self.slack_raw(fields, **kw)
        status, data = self.post("/chatops/slack", body, headers)
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return status, data, path

    def posts_to(self, path, n):
        """The first n posts to path, awaited."""
        deadline = time.monotonic() + 60
        with self.slack_emu.cond:
            while True:
                got = [p for p in self.slack_emu.posts if p[0] == path]
                if len(got) >= n:
                    return got[:n]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%d posts to %s, want %d" % (len(got), path, n))
                self.slack_emu.cond.wait(left)

    def button(self, action, value, user="U1"):
        self.n += 1
        path = "/actions/%d" % self.n
        payload = {"type": "block_actions",
                   "user": {"id": user, "username": "amy", "name": "amy", "team_id": "T1"},
                   "api_app_id": "A1", "team": {"id": "T1", "domain": "acme"},
                   "channel": {"id": "C1", "name": "releases"},
                   "container": {"type": "message", "message_ts": "1700000000.000100",
                                 "channel_id": "C1", "is_ephemeral": False},
                   "trigger_id": "1.2.3",
                   "response_url": "http://127.0.0.1:%d%s" % (self.slack_emu.port, path),
                   "actions": [{"type": "button", "action_id": action, "block_id": "kpl",
                                "value": value, "action_ts": "1700000001.000200",
                                "text": {"type": "plain_text", "text": "x"}}]}
        body, headers = self.slack_raw({"payload": json.dumps(payload)})
        status, _ = self.post("/chatops/slack", body, headers)
        return status, path

    def ding(self, text, staff="staff1", ts=None, sign=None):
        if ts is None:
            # DingTalk's sign covers the timestamp only: kpld takes each
            # (timestamp, sign) once, so two messages here differ in it.
            ts = self.last_ts = max(int(time.time() * 1000), self.last_ts + 1)
        body = json.dumps({"msgtype": "text", "text": {"content": " " + text},
                           "msgId": "msg%d" % ts, "createAt": ts, "conversationType": "2",
                           "conversationId": "cid1", "conversationTitle": "releases",
                           "senderId": "$:LWCP_v1:$abc", "senderNick": "Bob",
                           "senderCorpId": "corp1", "senderStaffId": staff,
                           "chatbotUserId": "$:LWCP_v1:$bot", "isAdmin": False,
                           "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=x",
                           "sessionWebhookExpiredTime": ts + 5400000}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "timestamp": str(ts), "sign": sign or ding_sign(ts)}
        status, data = self.post("/chatops/dingtalk", body, headers)
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return status, data

    def audit(self):
        log = Client.to_dict(self.c.call(S + "ListAudit", {"limit": 1000}))
        return [e["message"] for e in log.get("events", [])]

    def get(self, run_id):
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))

    def stage(self, run, name):
        return [s for s in run["stages"] if s["name"] == name][0]

    def until(self, run_id, pred, from_seq=0):
        """Follows WatchRun until pred(event) holds; returns that event."""
        stream = self.c.stream(P + "WatchRun", {"id": run_id, "from_seq": from_seq},
                               timeout=120)
        for ev in stream:
            ev = Client.to_dict(ev)
            if pred(ev):
                stream.cancel()
                return ev
        raise AssertionError("run %s ended before the awaited event" % run_id)

    def end(self, run_id):
        """Follows WatchRun to the end; returns the run (with "_last_seq")."""
        last = 0
        for ev in self.c.stream(P + "WatchRun", {"id": run_id}, timeout=120):
            last = int(Client.to_dict(ev).get("seq", 0))
        run = self.get(run_id)
        run["_last_seq"] = last
        return run

    def waiting_run(self):
        run = Client.to_dict(submit(self.c, APPROVAL))
        self.until(run["id"], lambda e: e.get("stage_state") == "STAGE_STATE_WAITING")
        return run["id"]

    def running_sleeper(self):
        run = Client.to_dict(submit(self.c, SLEEPER))
        self.until(run["id"], lambda e: e.get("kind") == "EVENT_KIND_LOG")
        return run["id"]

    # -- Slack -----------------------------------------------------------

    def test_slack_approve_command(self):
        rid = self.waiting_run()
        status, data, path = self.slack("approve %s ok lgtm, ship" % rid)
        assert_eq(status, 200, "status")
        assert_eq(data["response_type"], "in_channel", "response_type")
        if "alice asked to approve stage ok of run %s" % rid not in data["text"]:
            raise AssertionError("ack: %r" % data)
        _, ctype, msg = self.slack_emu.wait(path)
        assert_eq(ctype, "application/json", "response_url content type")
        assert_eq(msg["text"], "alice approved stage ok of run %s: lgtm, ship" % rid,
                  "outcome posted")
        assert_eq(msg["replace_original"], False, "a command's outcome is a new message")
        run = self.end(rid)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(self.stage(run, "ok")["message"], "approved by alice: lgtm, ship",
                  "stage message")
        if "slack:U1 (alice) approved stage ok" not in self.audit():
            raise AssertionError("no audit entry: %r" % self.audit()[-5:])

    def test_slack_reject_button(self):
        rid = self.waiting_run()
        status, path = self.button("kpl_reject", "%s ok" % rid)
        assert_eq(status, 200, "status")
        _, _, msg = self.slack_emu.wait(path)
        assert_eq(msg["text"], "alice rejected stage ok of run %s" % rid, "outcome")
        assert_eq(msg["replace_original"], True, "the clicked message is replaced")
        run = self.end(rid)
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(self.stage(run, "ok")["message"], "rejected by alice", "stage message")
        if "slack:U1 (alice) rejected stage ok" not in self.audit():
            raise AssertionError("no audit entry")

    def test_slack_cancel_then_retry(self):
        rid = self.running_sleeper()
        status, data, path = self.slack("cancel " + rid)
        assert_eq(status, 200, "status")
        run = self.end(rid)
        assert_eq(run["state"], "RUN_STATE_CANCELLED", "cancelled")
        assert_eq(self.slack_emu.wait(path)[2]["text"], "alice cancelled run %s" % rid, "outcome")
        status, path = self.button("kpl_retry", rid)
        assert_eq(status, 200, "retry status")
        assert_eq(self.slack_emu.wait(path)[2]["text"], "alice retried run %s" % rid, "outcome")
        # The second attempt's stage logs again.
        self.until(rid, lambda e: e.get("kind") == "EVENT_KIND_LOG",
                   from_seq=run["_last_seq"] + 1)
        self.c.call(P + "CancelRun", {"id": rid})
        log = self.audit()
        for want in ["slack:U1 (alice) cancelled the run", "slack:U1 (alice) retried run %s" % rid]:
            if want not in log:
                raise AssertionError("%r not in the audit log: %r" % (want, log[-6:]))

    def test_slack_rollback(self):
        run = Client.to_dict(submit(self.c, deploy_pipeline("test", "reg.example/web:2.0")))
        assert_eq(self.end(run["id"])["state"], "RUN_STATE_SUCCEEDED", "deploy")
        assert_eq(self.image(), "reg.example/web:2.0", "deployed")
        status, data, path = self.slack("rollback test/shop/web 1")
        assert_eq(status, 200, "status")
        text = self.slack_emu.wait(path)[2]["text"]
        prefix = "alice started a rollback of test/shop/web to revision 1: run "
        if not text.startswith(prefix):
            raise AssertionError("outcome: %r" % text)
        rb = self.end(text[len(prefix):])
        assert_eq((rb["pipeline_name"], rb["state"]), ("rollback-web", "RUN_STATE_SUCCEEDED"),
                  "rollback run")
        assert_eq(self.image(), "reg.example/web:1.0", "rolled back")
        want = "slack:U1 (alice) asked for a rollback of test/shop/web to revision 1"
        if want not in self.audit():
            raise AssertionError("no audit entry")

    def test_slack_status(self):
        rid = self.waiting_run()
        status, data, _ = self.slack("status " + rid, user="U2")
        assert_eq(status, 200, "status")
        assert_eq(data["response_type"], "ephemeral", "only the asker sees it")
        assert_eq(data["text"], "run %s (pipeline gate): running; build succeeded, "
                  "ok waiting, ship pending" % rid, "status text")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_bad_signature_refused(self):
        rid = self.waiting_run()
        before = len(self.audit())
        status, data, _ = self.slack("approve %s ok" % rid, secret="not-the-secret")
        assert_eq(status, 401, "status")
        status, _, _ = self.slack("approve %s ok" % rid, sig="v0=" + "0" * 64)
        assert_eq(status, 401, "status, zero signature")
        status, _, _ = self.slack("approve %s ok" % rid, sig="garbage")
        assert_eq(status, 401, "status, malformed signature")
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        assert_eq(len(self.audit()), before, "nothing audited")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_stale_timestamp_refused(self):
        rid = self.waiting_run()
        for ts in (int(time.time()) - 301 - 60, int(time.time()) + 400):
            status, data, _ = self.slack("approve %s ok" % rid, ts=ts)
            assert_eq(status, 401, "status")
            if b"timestamp" not in data:
                raise AssertionError("reason: %r" % data)
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_replay_refused(self):
        rid = self.running_sleeper()
        fields = {"team_id": "T1", "user_id": "U1", "command": "/kpl", "text": "cancel " + rid,
                  "response_url": "http://127.0.0.1:%d/replayed" % self.slack_emu.port}
        body, headers = self.slack_raw(fields)
        status, _ = self.post("/chatops/slack", body, headers)
        assert_eq(status, 200, "first")
        self.end(rid)
        self.slack_emu.wait("/replayed")
        before = self.audit()
        status, data = self.post("/chatops/slack", body, headers)
        assert_eq((status, data), (401, b"unauthorized: replayed request\n"), "replay")
        assert_eq(self.audit(), before, "the replay did nothing")

    def test_slack_unmapped_user_told(self):
        rid = self.waiting_run()
        before = self.audit()
        status, data, _ = self.slack("approve %s ok" % rid, user="U999")
        assert_eq(status, 200, "status")
        assert_eq(data["response_type"], "ephemeral", "told privately")
        if "not mapped to a kpl identity" not in data["text"] or "U999" not in data["text"]:
            raise AssertionError("text: %r" % data)
        status, path = self.button("kpl_approve", "%s ok" % rid, user="U998")
        assert_eq(status, 200, "button status")
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        assert_eq(self.audit(), before, "nothing audited")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_other_workspace_refused(self):
        rid = self.waiting_run()
        before = self.audit()
        status, data, _ = self.slack("approve %s ok" % rid, team="T2")
        assert_eq(status, 200, "status")
        if "one Slack workspace only" not in data["text"]:
            raise AssertionError("text: %r" % data)
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        assert_eq(self.audit(), before, "nothing audited")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_scope_refused(self):
        rid = self.waiting_run()
        before = self.audit()
        status, data, _ = self.slack("approve %s ok" % rid, user="U2")
        assert_eq(status, 200, "status")
        assert_eq(data["text"], "rita may not approve: the chat mapping's scope is read, "
                  "and approve needs approve", "scope refusal")
        status, data, _ = self.slack("approve %s ok" % rid, user="U3")
        if "limited to other pipelines" not in data["text"]:
            raise AssertionError("pipeline refusal: %r" % data)
        status, data, _ = self.slack("rollback test/shop/web", user="U3")
        if "may not roll back" not in data["text"]:
            raise AssertionError("rollback refusal: %r" % data)
        status, data, _ = self.slack("frobnicate " + rid)
        if "unknown command frobnicate" not in data["text"]:
            raise AssertionError("unknown command: %r" % data)
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        assert_eq(self.audit(), before, "nothing audited")
        self.c.call(P + "CancelRun", {"id": rid})

    def test_slack_response_url_elsewhere_not_posted(self):
        """A response_url outside response_url_prefix gets no post (kpld
        would otherwise POST wherever a signed request points)."""
        rid = self.waiting_run()
        status, data, _ = self.slack("reject %s ok" % rid,
                                     url="http://127.0.0.2:%d/elsewhere" % self.slack_emu.port)
        assert_eq(status, 200, "status")
        assert_eq(self.end(rid)["state"], "RUN_STATE_FAILED", "rejected")
        if "does not start with chatops.slack.response_url_prefix" not in \
                open(self.daemon.log).read():
            raise AssertionError("no warning in kpld's log")
        assert_eq([p for p in self.slack_emu.posts if p[0] == "/elsewhere"], [], "no post")

    def test_buttons_on_kpl_messages(self):
        """The Slack message kpl posts for a waiting stage carries Approve and
        Reject; pressing Approve (its action_id and value sent back as Slack
        would) approves. The failed run's message carries Retry."""
        run = Client.to_dict(submit(self.c, NOTIFIED))
        rid = run["id"]
        _, _, msg = self.posts_to("/notify", 1)[0]
        actions = [b for b in msg["blocks"] if b["type"] == "actions"]
        assert_eq(len(actions), 1, "one actions block")
        els = actions[0]["elements"]
        assert_eq([(e["action_id"], e["value"], e["text"]["text"]) for e in els],
                  [("kpl_approve", "%s ok" % rid, "Approve"),
                   ("kpl_reject", "%s ok" % rid, "Reject")], "buttons")
        assert_eq(els[0]["style"], "primary", "approve style")
        if "confirm" not in els[0]:
            raise AssertionError("approve has no confirm dialog")
        status, path = self.button(els[0]["action_id"], els[0]["value"])
        assert_eq(status, 200, "status")
        assert_eq(self.slack_emu.wait(path)[2]["text"], "alice approved stage ok of run %s" % rid,
                  "outcome")
        assert_eq(self.end(rid)["state"], "RUN_STATE_FAILED", "boom failed after approval")
        _, _, failed = self.posts_to("/notify", 2)[1]
        els = [b for b in failed["blocks"] if b["type"] == "actions"][0]["elements"]
        assert_eq([(e["action_id"], e["value"]) for e in els], [("kpl_retry", rid)],
                  "retry button")

    def test_slack_ssl_check(self):
        """Slack's certificate check of a slash command URL gets an empty 200."""
        body, headers = self.slack_raw({"ssl_check": "1", "token": "deprecated"})
        assert_eq(self.post("/chatops/slack", body, headers), (200, b""), "ssl_check")

    def test_config_errors_stop_kpld(self):
        """A mistake in chatops: stops kpld at start, naming file, line,
        column and key, and never the secret."""
        cases = [
            ("chatops:\n  slack:\n    signing_secret: s3cr3t-value-x\n"
             "    users:\n      U1: { identity: alice, scope: boss }\n",
             "bad.yaml:5:37: chatops.slack.users.U1.scope: one of read, submit, approve, admin"),
            ("chatops:\n  slack:\n    users: {}\n",
             "bad.yaml:3:5: chatops.slack: needs `signing_secret`"),
            ("chatops:\n  teams: {}\n",
             "bad.yaml:2:3: chatops.teams: unknown chat (allowed: slack, dingtalk)"),
            ("chatops:\n  dingtalk:\n    app_secret: s3cr3t-value-x\n    user: {}\n",
             "bad.yaml:4:5: chatops.dingtalk.user: unknown key (allowed: app_secret, users)"),
        ]
        for i, (text, want) in enumerate(cases):
            path = os.path.join(self.tmp, "bad.yaml")
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.run([self.daemon.binary, "--listen", "127.0.0.1:0", "--data-dir",
                                os.path.join(self.tmp, "bad%d" % i), "--config", path],
                               capture_output=True, text=True, timeout=60)
            assert_eq(p.returncode, 1, "exit code (%s)" % p.stderr)
            if want not in p.stderr or "s3cr3t" in p.stderr:
                raise AssertionError("stderr %r, want %r" % (p.stderr, want))

    # -- DingTalk --------------------------------------------------------

    def test_dingtalk_cancel(self):
        rid = self.running_sleeper()
        status, data = self.ding("cancel " + rid)
        assert_eq(status, 200, "status")
        assert_eq(data, {"msgtype": "text", "text": {"content": "bob cancelled run %s" % rid}},
                  "reply")
        assert_eq(self.get(rid)["state"], "RUN_STATE_CANCELLED", "cancelled")
        if "dingtalk:staff1 (bob) cancelled the run" not in self.audit():
            raise AssertionError("no audit entry")

    def test_dingtalk_refusals(self):
        rid = self.waiting_run()
        before = self.audit()
        status, data = self.ding("approve %s ok" % rid)
        assert_eq(status, 200, "status")
        assert_eq(data["text"]["content"], "bob may not approve: the chat mapping's scope is "
                  "submit, and approve needs approve", "scope")
        status, data = self.ding("approve %s ok" % rid, staff="nobody")
        if "not mapped to a kpl identity" not in data["text"]["content"]:
            raise AssertionError("unmapped: %r" % data)
        status, _ = self.ding("cancel " + rid, sign=ding_sign(int(time.time() * 1000), "wrong"))
        assert_eq(status, 401, "bad sign")
        old = int(time.time() * 1000) - 3600 * 1000 - 120000
        status, data = self.ding("cancel " + rid, ts=old)
        assert_eq(status, 401, "stale timestamp")
        ts = self.last_ts = int(time.time() * 1000) + 1000
        status, data = self.ding("status " + rid, ts=ts)
        assert_eq(status, 200, "first")
        status, data = self.ding("cancel " + rid, ts=ts)
        assert_eq(status, 401, "the same timestamp and sign again, with another body")
        assert_eq(self.stage(self.get(rid), "ok")["state"], "STAGE_STATE_WAITING", "still waiting")
        assert_eq(self.audit(), before, "nothing audited")
        self.c.call(P + "CancelRun", {"id": rid})


    def test_metrics_count_requests(self):
        """Every chat request is counted by chat and result on /metrics
        (kpl_webhook_deliveries_total, as push deliveries are)."""
        conn = http.client.HTTPConnection(*self.http, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        got = {}
        for line in text.splitlines():
            if line.startswith('kpl_webhook_deliveries_total{source="slack"') or \
                    line.startswith('kpl_webhook_deliveries_total{source="dingtalk"'):
                k, v = line.rsplit(" ", 1)
                got[k] = int(float(v))
        for want in ['{source="slack",result="accepted"}', '{source="slack",result="unauthorized"}',
                     '{source="slack",result="replayed"}', '{source="slack",result="unmapped"}',
                     '{source="slack",result="forbidden"}', '{source="slack",result="bad_request"}',
                     '{source="dingtalk",result="accepted"}',
                     '{source="dingtalk",result="unauthorized"}',
                     '{source="dingtalk",result="replayed"}',
                     '{source="dingtalk",result="forbidden"}',
                     '{source="dingtalk",result="unmapped"}']:
            if got.get("kpl_webhook_deliveries_total" + want, 0) < 1:
                raise AssertionError("%s not counted: %r" % (want, got))
        # Exactly one replay was sent to each.
        assert_eq(got['kpl_webhook_deliveries_total{source="slack",result="replayed"}'], 1,
                  "slack replays")


def main():
    binary = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-chatops-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, emulator, tmp))


if __name__ == "__main__":
    sys.exit(main())
