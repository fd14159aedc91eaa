"""End-to-end test of kpl-chatbot: kpld, three local webhook receivers (one
per chat kind) that record what they accept, and the bot between them.

    /usr/bin/python3 tests/e2e/chatbot_test.py PATH/TO/kpld PATH/TO/kpl-chatbot

What it checks, in one story:
  1. a run that succeeds, one whose stage fails (with its last 10 log lines),
     and runs of other pipelines: every chat gets exactly the messages its
     filters allow, byte for byte as docs/chatbot.md says; the DingTalk
     receiver verifies every signature with the secret;
  2. WeCom fails twice with 500 and Slack is slow: WeCom gets its messages
     after the retries, in order, and DingTalk gets its own without waiting
     for either (an approval that waits, then is approved);
  3. Slack goes down (503), a run is cancelled, the bot is killed with
     SIGKILL while Slack's message is still queued, two more runs happen
     while it is down (one rolls back), Slack comes back, the bot restarts:
     every chat ends with exactly the expected list, nothing repeated,
     nothing missing;
  4. a chat that always answers 500 is given up on after max_tries, and the
     others go on;
  5. SIGTERM stops the bot cleanly; its log never shows a webhook URL or the
     secret.
"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, P, assert_eq, submit, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402

WECOM_KEY = "wecom-key-0f3a9c"
DING_TOKEN = "ding-token-77b1e2"
DING_SECRET = "SECd1ngs3cr3t4242"
SLACK_PATH = "/services/T0KPL/B0BOT/slacksecretpath99"
DEAD_KEY = "dead-key-5150"

# --- What the bot sends (docs/chatbot.md, "Messages") -------------------

SHOWS_MESSAGE = ("stage_failed", "waiting", "failed")
WECOM_COLOR = {"succeeded": "info", "started": "comment", "waiting": "comment",
               "cancelled": "comment"}


def title(kind, pipeline, run, stage=None):
    return {
        "started": "%s run %s started" % (pipeline, run),
        "stage_failed": "%s run %s: stage %s failed" % (pipeline, run, stage),
        "waiting": "%s run %s: stage %s is waiting for approval" % (pipeline, run, stage),
        "succeeded": "%s run %s succeeded" % (pipeline, run),
        "failed": "%s run %s failed" % (pipeline, run),
        "cancelled": "%s run %s was cancelled" % (pipeline, run),
        "rolled_back": "%s run %s rolled back (stage %s succeeded)" % (pipeline, run, stage),
    }[kind]


def body(chat_kind, n):
    """The JSON body chat_kind gets for notice n (a dict: kind, pipeline,
    run, stage, message, log)."""
    t = title(n["kind"], n["pipeline"], n["run"], n.get("stage"))
    msg = n.get("message") if n["kind"] in SHOWS_MESSAGE else None
    log = n.get("log") or []
    if chat_kind == "slack":
        esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa
        text = "*" + esc(t) + "*"
        if msg:
            text += "\n" + esc(msg)
        if log:
            text += "\n```" + "".join("\n" + esc(x) for x in log) + "\n```"
        return {"text": t, "blocks": [{"type": "section",
                                       "text": {"type": "mrkdwn", "text": text}}]}
    if chat_kind == "wecom":
        text = '<font color="%s">**%s**</font>' % (WECOM_COLOR.get(n["kind"], "warning"), t)
    else:
        text = "#### " + t
    if msg:
        text += "\n\n" + msg
    if log:
        text += "\n\nlast log lines:" + "".join("\n> " + x for x in log)
    if chat_kind == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": text}}
    return {"msgtype": "markdown", "markdown": {"title": t, "text": text}}


# --- Receivers ------------------------------------------------------------

class Receiver:
    """A webhook on 127.0.0.1:0. Records every request it accepts (2xx) with
    its arrival time; can fail the next N requests with 500, be down (503
    for everything), or hold requests unanswered until released (a chat that
    is slow for as long as the test needs it to be)."""

    def __init__(self, kind):
        self.kind = kind
        self.lock = threading.Lock()
        self.accepted = []   # (time, body dict, headers dict, query dict)
        self.refused = 0     # 5xx answers given
        self.bad = []        # requests that broke the protocol (wrong key, bad sign)
        self.fail_next = 0
        self.down = False
        self.hold = None     # a threading.Event: requests wait for it, then go on
        self.held = 0        # requests that waited on hold
        recv = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(n)
                with recv.lock:
                    hold = recv.hold
                    if hold is not None:
                        recv.held += 1
                if hold is not None:
                    hold.wait(120)
                code, reply = recv.handle(self.path, dict(self.headers.items()), raw)
                data = reply.encode()
                self.send_response(code)
                self.send_header("Content-Type",
                                 "text/plain" if recv.kind == "slack" else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path, headers, raw):
        u = urllib.parse.urlsplit(path)
        q = dict(urllib.parse.parse_qsl(u.query))
        with self.lock:
            if self.down:
                self.refused += 1
                return 503, "down"
            if self.fail_next > 0:
                self.fail_next -= 1
                self.refused += 1
                return 500, "boom"
            problem = self.check(u.path, q, headers)
            if problem:
                self.bad.append(problem)
                return 200, json.dumps({"errcode": 310000, "errmsg": problem})
            try:
                doc = json.loads(raw.decode("utf-8"))
            except ValueError as e:
                self.bad.append("not JSON: %s" % e)
                return 400, "invalid_payload"
            self.accepted.append((time.monotonic(), doc, headers, q))
        if self.kind == "slack":
            return 200, "ok"
        return 200, json.dumps({"errcode": 0, "errmsg": "ok"})

    def check(self, path, q, headers):
        if not headers.get("Content-Type", "").startswith("application/json"):
            return "content type %r" % headers.get("Content-Type")
        if self.kind == "wecom":
            if path != "/cgi-bin/webhook/send" or q.get("key") != WECOM_KEY:
                return "wrong wecom path or key"
        elif self.kind == "dingtalk":
            if path != "/robot/send" or q.get("access_token") != DING_TOKEN:
                return "wrong dingtalk path or token"
            ts = q.get("timestamp", "")
            if not ts.isdigit() or abs(int(ts) - time.time() * 1000) > 3600 * 1000:
                return "timestamp %r not within an hour" % ts
            want = base64.b64encode(hmac.new(DING_SECRET.encode(),
                                             ("%s\n%s" % (ts, DING_SECRET)).encode(),
                                             hashlib.sha256).digest()).decode()
            # parse_qsl already URL-decoded sign.
            if not hmac.compare_digest(q.get("sign", ""), want):
                return "bad sign"
        elif self.kind == "slack":
            if path != SLACK_PATH:
                return "wrong slack path"
        return None

    def url(self):
        base = "http://127.0.0.1:%d" % self.port
        return {"wecom": base + "/cgi-bin/webhook/send?key=" + WECOM_KEY,
                "dingtalk": base + "/robot/send?access_token=" + DING_TOKEN,
                "slack": base + SLACK_PATH}[self.kind]

    def bodies(self):
        with self.lock:
            return [a[1] for a in self.accepted]

    def times(self):
        with self.lock:
            return [a[0] for a in self.accepted]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- Pipelines --------------------------------------------------------------

OK = """
name: shop
stages:
  - name: build
    kind: script
    with: { command: ["echo", "built"] }
"""

FAIL = """
name: shop
stages:
  - name: compile
    kind: script
    with: { shell: 'for i in $(seq 1 12); do echo "line $i <x&y>"; done; exit 3' }
  - name: never
    kind: noop
    needs: [compile]
"""

OTHER = """
name: other
stages:
  - { name: a, kind: noop }
"""

THIRD = """
name: third
stages:
  - { name: a, kind: noop }
"""

APPROVAL = """
name: shop
stages:
  - name: gate
    kind: approval
    with: { message: "ship it?" }
"""

CANCEL = """
name: shop
stages:
  - name: sleepy
    kind: script
    with: { shell: 'echo started; sleep 300' }
"""

SENTINEL = """
name: shop
stages:
  - { name: last, kind: noop }
"""

ROLLBACK = """
name: shop
stages:
  - { name: deploy, kind: noop }
  - name: rollback
    kind: script
    needs: [deploy]
    with: { command: ["echo", "rolled back"] }
"""


class Bot:
    def __init__(self, binary, config, log):
        self.binary, self.config, self.log = binary, config, log
        self.proc = None

    def start(self):
        logf = open(self.log, "a")
        # Debug is asked for: the bot must still keep webhook URLs out.
        self.proc = subprocess.Popen([self.binary, "--config", self.config,
                                      "--log-level", "debug"],
                                     stdout=logf, stderr=logf, env=dict(os.environ))
        logf.close()

    def kill(self, sig):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc


def wait_until(what, fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class Suite:
    def __init__(self, kpld, bot, tmp):
        self.tmp = tmp
        self.daemon = Daemon(kpld, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.r = {k: Receiver(k) for k in ("wecom", "dingtalk", "slack")}
        self.dead = Receiver("wecom")  # always 500: given up on
        self.dead.fail_next = 10 ** 9
        self.state = os.path.join(tmp, "chatbot.state")
        cfg = os.path.join(tmp, "chatbot.yaml")
        # The DingTalk URL and secret come from the environment, the others
        # from the file.
        os.environ["KPL_TEST_DING_URL"] = self.r["dingtalk"].url()
        os.environ["KPL_TEST_DING_SECRET"] = DING_SECRET
        with open(cfg, "w") as f:
            f.write("""
server: %s
state_file: %s
start: beginning
backoff: 300ms
max_backoff: 2s
max_tries: 5
timeout: 10s
rollback_stages: [rollback]
chats:
  - name: team-wecom
    kind: wecom
    url: "%s"
    pipelines: [shop]
  - name: team-ding
    kind: dingtalk
    url_env: KPL_TEST_DING_URL
    secret_env: KPL_TEST_DING_SECRET
    pipelines: [shop, third]
  - name: team-slack
    kind: slack
    url: "%s"
    events: [stage_failed, waiting, succeeded, failed, cancelled, rolled_back]
  - name: dead
    kind: wecom
    url: "%s"
    pipelines: [other]
    events: [succeeded]
""" % (self.daemon.addr, self.state, self.r["wecom"].url(), self.r["slack"].url(),
                self.dead.url().replace(WECOM_KEY, DEAD_KEY)))
        self.bot = Bot(bot, cfg, os.path.join(tmp, "chatbot.log"))
        # Expected notices per chat, in order.
        self.want = {"wecom": [], "dingtalk": [], "slack": []}

    def close(self):
        if self.bot.proc:
            self.bot.kill(signal.SIGKILL)
        if self.daemon.proc:
            self.daemon.stop()
        for r in list(self.r.values()) + [self.dead]:
            r.close()

    # -- helpers ---------------------------------------------------------

    def expect(self, n):
        """Adds notice n to the lists of the chats whose filters take it."""
        p, k = n["pipeline"], n["kind"]
        if p == "shop":
            self.want["wecom"].append(n)
        if p in ("shop", "third"):
            self.want["dingtalk"].append(n)
        if k != "started":
            self.want["slack"].append(n)

    def expect_run(self, run_id, pipeline, *notices):
        for n in notices:
            d = {"pipeline": pipeline, "run": run_id}
            d.update(n)
            self.expect(d)

    def wanted_bodies(self, kind):
        return [body(kind, n) for n in self.want[kind]]

    def wait_all(self, timeout=30.0):
        """Until every receiver holds exactly what is expected (a longer
        list fails at once: that is a repeat or a stray)."""
        def done():
            ok = True
            for k, r in self.r.items():
                got, want = r.bodies(), self.wanted_bodies(k)
                if len(got) > len(want) or got != want[:len(got)]:
                    self.compare(k)
                if got != want:
                    ok = False
            return ok
        try:
            wait_until("every chat's messages", done, timeout)
        except AssertionError:
            for k in self.r:
                self.compare(k)
            raise

    def compare(self, kind):
        got, want = self.r[kind].bodies(), self.wanted_bodies(kind)
        if got != want:
            raise AssertionError("%s received:\n  %s\nwanted:\n  %s\nbot log tail:\n%s" % (
                kind, "\n  ".join(json.dumps(b) for b in got),
                "\n  ".join(json.dumps(b) for b in want), self.log_tail()))

    def log_tail(self):
        try:
            return "".join(open(self.bot.log).readlines()[-40:])
        except OSError:
            return ""

    def run_to_end(self, text):
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        return run["id"], events

    def final_global_seq(self, events):
        return int(events[-1]["global_seq"])

    def state_file(self):
        try:
            with open(self.state) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- the story -------------------------------------------------------

    def test_z_resume_mid_stage(self):
        ResumeSuite(self).run()

    def test_story(self):
        self.bot.start()

        # 1. Success, a failing stage with its last log lines, other pipelines.
        ok, _ = self.run_to_end(OK)
        self.expect_run(ok, "shop", {"kind": "started"}, {"kind": "succeeded"})
        bad, _ = self.run_to_end(FAIL)
        lines = ["line %d <x&y>" % i for i in range(3, 13)]
        self.expect_run(bad, "shop", {"kind": "started"},
                        {"kind": "stage_failed", "stage": "compile",
                         "message": "shell script exited with status 3", "log": lines},
                        {"kind": "failed",
                         "message": "stage compile failed: shell script exited with status 3"})
        other, _ = self.run_to_end(OTHER)
        self.expect_run(other, "other", {"kind": "started"}, {"kind": "succeeded"})
        third, _ = self.run_to_end(THIRD)
        self.expect_run(third, "third", {"kind": "started"}, {"kind": "succeeded"})
        self.wait_all()
        assert_eq(len(self.r["wecom"].bodies()), 5, "wecom: only pipeline shop")
        assert_eq(len(self.r["slack"].bodies()), 5, "slack: every pipeline, no started")
        assert_eq(len(self.r["dingtalk"].bodies()), 7, "dingtalk: shop and third")
        for k, r in self.r.items():
            assert_eq(r.bad, [], "%s: protocol problems" % k)
            ct = r.accepted[0][2].get("Content-Type")
            if k == "dingtalk":
                assert_eq(ct, "application/json; charset=utf-8", "dingtalk content type")
            else:
                assert_eq(ct, "application/json", "%s content type" % k)

        # 2. WeCom fails (500) and Slack hangs, both until DingTalk has its
        #    messages: DingTalk is not delayed by either. Conditions, not
        #    times: the other two are released only once DingTalk has both.
        release = threading.Event()
        with self.r["wecom"].lock:
            self.r["wecom"].fail_next = 10 ** 9
        with self.r["slack"].lock:
            self.r["slack"].hold = release
        base = {k: len(r.bodies()) for k, r in self.r.items()}
        run = Client.to_dict(submit(self.c, APPROVAL))
        gate = {"kind": "waiting", "stage": "gate", "message": "waiting for approval: ship it?"}
        self.expect_run(run["id"], "shop", {"kind": "started"}, gate)
        try:
            wait_until("dingtalk's two messages while wecom refuses and slack hangs", lambda: (
                len(self.r["dingtalk"].bodies()) == base["dingtalk"] + 2 and
                self.r["wecom"].refused >= 2 and self.r["slack"].held >= 1))
            assert_eq(len(self.r["wecom"].bodies()), base["wecom"], "wecom accepted nothing yet")
            assert_eq(len(self.r["slack"].bodies()), base["slack"], "slack answered nothing yet")
        finally:
            with self.r["wecom"].lock:
                self.r["wecom"].fail_next = 0
            with self.r["slack"].lock:
                self.r["slack"].hold = None
            release.set()
        self.wait_all()
        # The retries kept to the configured backoff (300ms, doubling), as
        # the bot planned them (its log, not a stopwatch).
        log = open(self.bot.log).read()
        for n, ms in ((1, 300), (2, 600)):
            if "chat team-wecom: try %d of started of run %s" % (n, run["id"]) not in log or \
                    not re.search(r"chat team-wecom: try %d of [^\n]*; again in %d ms" % (n, ms),
                                  log):
                raise AssertionError("no 'chat team-wecom: try %d ... again in %d ms' in the "
                                     "bot's log:\n%s" % (n, ms, self.log_tail()))
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "gate",
                                         "approve": True, "by": "test"})
        watch(self.c, run["id"])
        self.expect_run(run["id"], "shop", {"kind": "succeeded"})
        self.wait_all()

        # 3. Slack down; a cancelled run; SIGKILL with Slack's message queued;
        #    two runs while the bot is down; restart.
        with self.r["slack"].lock:
            self.r["slack"].down = True
        run = Client.to_dict(submit(self.c, CANCEL))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            if Client.to_dict(ev).get("kind") == "EVENT_KIND_LOG":
                break
        stream.cancel()
        self.c.call(P + "CancelRun", {"id": run["id"]})
        events = watch(self.c, run["id"])
        last = self.final_global_seq(events)
        self.expect_run(run["id"], "shop", {"kind": "started"}, {"kind": "cancelled"})
        want_slack = len(self.want["slack"])
        # WeCom and DingTalk have it and the state file says so; Slack has not.
        wait_until("wecom and dingtalk to take the cancelled run", lambda: (
            len(self.r["wecom"].bodies()) == len(self.want["wecom"]) and
            len(self.r["dingtalk"].bodies()) == len(self.want["dingtalk"])))
        st = wait_until("the state file to record them", lambda: (
            lambda s: s if s and s["chats"]["team-wecom"] >= last and
            s["chats"]["team-ding"] >= last else None)(self.state_file()))
        wait_until("slack to refuse a try", lambda: self.r["slack"].refused >= 1)
        if st["chats"]["team-slack"] >= last:
            raise AssertionError("slack's progress passed a message it refused: %r" % st)
        assert_eq(st["global_seq"], min(st["chats"].values()), "global_seq is the minimum")
        assert_eq(self.bot.kill(signal.SIGKILL), -signal.SIGKILL, "bot killed")
        assert_eq(len(self.r["slack"].bodies()), want_slack - 1, "slack lacks the cancel")

        rb, _ = self.run_to_end(ROLLBACK)
        self.expect_run(rb, "shop", {"kind": "started"},
                        {"kind": "rolled_back", "stage": "rollback"}, {"kind": "succeeded"})
        t2, _ = self.run_to_end(THIRD)
        self.expect_run(t2, "third", {"kind": "started"}, {"kind": "succeeded"})
        with self.r["slack"].lock:
            self.r["slack"].down = False
        self.bot.start()
        self.wait_all()
        # Nothing more comes: a run after all that reaches every chat after
        # anything the restarted bot could repeat (each chat is sent to in
        # event order), and wait_all fails at once on a longer list.
        sentinel, _ = self.run_to_end(SENTINEL)
        self.expect_run(sentinel, "shop", {"kind": "started"}, {"kind": "succeeded"})
        self.wait_all()
        for k in self.r:
            self.compare(k)
            assert_eq(self.r[k].bad, [], "%s: protocol problems" % k)

        # 4. The dead chat: its one message (other succeeded) was given up.
        wait_until("the dead chat to be given up on",
                   lambda: "chat dead: giving up on succeeded of run %s" % other
                   in open(self.bot.log).read())
        assert_eq(len(self.dead.accepted), 0, "dead chat accepted nothing")
        if self.dead.refused < 5:
            raise AssertionError("dead chat tried %d times, want 5" % self.dead.refused)

        # 5. SIGTERM: clean exit; no URL or secret in the log.
        assert_eq(self.bot.kill(signal.SIGTERM), 0, "bot exit status on SIGTERM")
        log = open(self.bot.log).read()
        # Debug on: the HTTP layer's lines name the chat, never its URL.
        if "delivered" not in log or "DEBUG http: POST chat team-wecom" not in log:
            raise AssertionError("bot log: want info lines and HTTP debug lines naming chats")
        for secret in (WECOM_KEY, DING_TOKEN, DING_SECRET, SLACK_PATH, "slacksecretpath99",
                       DEAD_KEY, "sign="):
            if secret in log:
                raise AssertionError("bot log shows %r" % secret)
        if "loop not clean" in log:
            raise AssertionError("bot's loop did not close clean")
        st = self.state_file()
        assert_eq(set(st["chats"]), {"team-wecom", "team-ding", "team-slack", "dead"},
                  "chats in the state file")


class ResumeSuite:
    """A bot that resumes in the middle of a failed stage's attempt: its
    last log lines come from WatchRun, not from what the bot saw."""

    def __init__(self, story):
        self.s = story

    def run(self):
        s = self.s
        recv = Receiver("slack")
        bot = None
        try:
            run_id, events = s.run_to_end(FAIL)
            logs = [e for e in events if e.get("kind") == "EVENT_KIND_LOG"]
            cut = int(logs[4]["global_seq"])  # after "line 5": RUNNING is behind
            state = os.path.join(s.tmp, "late.state")
            with open(state, "w") as f:
                json.dump({"global_seq": cut, "chats": {"late": cut}}, f)
            cfg = os.path.join(s.tmp, "late.yaml")
            with open(cfg, "w") as f:
                f.write("server: %s\nstate_file: %s\nchats:\n"
                        "  - {name: late, kind: slack, url: \"%s\", pipelines: [shop]}\n"
                        % (s.daemon.addr, state, recv.url()))
            bot = Bot(s.bot.binary, cfg, os.path.join(s.tmp, "late.log"))
            bot.start()
            want = [body("slack", dict(n, pipeline="shop", run=run_id)) for n in (
                {"kind": "stage_failed", "stage": "compile",
                 "message": "shell script exited with status 3",
                 "log": ["line %d <x&y>" % i for i in range(3, 13)]},
                {"kind": "failed",
                 "message": "stage compile failed: shell script exited with status 3"})]
            try:
                wait_until("the late bot's messages", lambda: len(recv.bodies()) >= 2)
            finally:
                got = recv.bodies()
                if got != want:
                    raise AssertionError("late bot sent:\n  %s\nwanted:\n  %s" % (
                        "\n  ".join(json.dumps(b) for b in got),
                        "\n  ".join(json.dumps(b) for b in want)))
            assert_eq(bot.kill(signal.SIGTERM), 0, "late bot exit status")
            bot = None
            st = json.load(open(state))
            assert_eq(st["chats"]["late"], int(events[-1]["global_seq"]),
                      "late bot's progress")
        finally:
            if bot:
                bot.kill(signal.SIGKILL)
            recv.close()


def main():
    kpld, bot = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp(prefix="kpl-chatbot-")
    s = Suite(kpld, bot, tmp)
    failed = 0
    try:
        for name in sorted(n for n in dir(s) if n.startswith("test_")):
            t0 = time.monotonic()
            try:
                getattr(s, name)()
                print("ok   %s (%.1fs)" % (name, time.monotonic() - t0))
            except Exception:
                failed += 1
                print("FAIL %s" % name)
                traceback.print_exc()
                print("--- bot log ---\n" + s.log_tail())
    finally:
        s.close()
    print("chatbot_test: %s" % ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
