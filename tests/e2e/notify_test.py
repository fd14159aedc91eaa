"""End-to-end test of pipeline-level `notify:`, sent by kpld itself: kpld
with a config declaring three notifiers (WeCom with its url in the secret
store, DingTalk signed with a secret from the secret store, Slack), and the
local webhook receivers of chatbot_test.py, which record what they accept
and check keys, paths and DingTalk signatures.

    /usr/bin/python3 tests/e2e/notify_test.py PATH/TO/kpld

What it checks:
  1. a notifier the config does not declare is refused at submit, naming
     the entry; no run is made;
  2. a run that succeeds: each notifier gets exactly the events its entry
     asks for, byte for byte the bodies kpl-chatbot sends (docs/chatbot.md);
  3. a stage that fails: stage_failed with its last 10 log lines and the
     run's failure, on DingTalk, every request signed;
  4. an approval: `waiting` arrives while the stage waits, WeCom fails the
     first two tries with 500 and gets it on the third, then `succeeded`
     after the approval, in order; a run is never held up by a notification;
  5. Slack down (503) while a run is cancelled, kpld killed with SIGKILL
     with that message unsent, Slack back, kpld restarted: the message
     arrives exactly once, and nothing delivered before is sent again;
  6. kpld's log never holds a webhook url, key, token, path secret or the
     DingTalk secret; SIGTERM stops kpld with exit status 0.
"""

import os
import re
import signal
import sys
import tempfile

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chatbot_test import (DING_SECRET, DING_TOKEN, SLACK_PATH, WECOM_KEY,  # noqa: E402
                          Receiver, body, wait_until)
from kplgrpc import Client  # noqa: E402
from e2e_test import P, Daemon, assert_eq, expect_rpc_error, run_suite, submit, watch  # noqa: E402

OK = """
name: shop
notify:
  - { notifier: team-wecom, events: [started, succeeded] }
  - { notifier: team-slack }
stages:
  - name: build
    kind: script
    with: { command: ["echo", "built"] }
"""

FAIL = """
name: shop
notify:
  - notifier: team-ding
    events: [stage_failed, failed]
stages:
  - name: compile
    kind: script
    with: { shell: 'for i in $(seq 1 12); do echo "line $i <x&y>"; done; exit 3' }
  - name: never
    kind: noop
    needs: [compile]
"""

APPROVAL = """
name: gate
notify:
  - { notifier: team-wecom, events: [waiting, succeeded] }
stages:
  - name: ask
    kind: approval
    with: { message: "ship it?" }
  - name: after
    kind: noop
    needs: [ask]
"""

CANCEL = """
name: slow
notify:
  - { notifier: team-slack, events: [cancelled] }
  - { notifier: team-ding, events: [started] }
stages:
  - name: sleepy
    kind: script
    with: { shell: 'echo started; sleep 300' }
"""

# A run that makes one notice for one notifier: sent after everything kpld
# queued for that notifier before it (each notifier's outbox goes in order,
# its head retried until it goes), so once it arrives nothing queued earlier
# can still come. That, not a sleep, is how "exactly" is checked.
SENTINEL = """
name: sentinel
notify:
  - { notifier: %s, events: [started] }
stages:
  - { name: a, kind: noop }
"""

NOTIFIER = {"wecom": "team-wecom", "dingtalk": "team-ding", "slack": "team-slack"}

UNKNOWN = """
name: shop
notify:
  - { notifier: team-ding }
  - { notifier: nope, events: [failed] }
stages:
  - { name: a, kind: noop }
"""


def notice(kind, ev, log=None):
    """The notice dict chatbot_test.body() renders, from the event that
    makes it."""
    n = {"kind": kind, "pipeline": ev["pipeline_name"], "run": ev["run_id"],
         "message": ev.get("message") or None, "log": log or []}
    if ev.get("kind") == "EVENT_KIND_STAGE_STATE":
        n["stage"] = ev["stage"]
    return n


def find(events, kind, state, stage=None):
    for ev in events:
        if ev.get("kind") != kind:
            continue
        got = ev.get("stage_state" if kind == "EVENT_KIND_STAGE_STATE" else "run_state")
        if got == state and (stage is None or ev.get("stage") == stage):
            return ev
    raise AssertionError("no %s %s event%s" % (kind, state, " of " + stage if stage else ""))


def events_until(c, run, pred):
    """The run's events as they come, up to the first one pred likes."""
    out = []
    stream = c.stream(P + "WatchRun", {"id": run}, timeout=60)
    for ev in stream:
        out.append(Client.to_dict(ev))
        if pred(out[-1]):
            stream.cancel()
            return out
    raise AssertionError("run %s ended before the event waited for" % run)


def run_started(events):
    return find(events, "EVENT_KIND_RUN_STATE", "RUN_STATE_RUNNING")


class Suite:
    def __init__(self, kpld, tmp):
        self.tmp = tmp
        self.r = {k: Receiver(k) for k in ("wecom", "dingtalk", "slack")}
        self.cfg = os.path.join(tmp, "kpld.yaml")
        with open(self.cfg, "w") as f:
            f.write("""
notifiers:
  team-wecom: { kind: wecom, url: "${{ secrets.WECOM_URL }}" }
  team-ding:
    kind: dingtalk
    url: "%s"
    secret: "${{ secrets.DING_SECRET }}"
  team-slack: { kind: slack, url: "%s" }
""" % (self.r["dingtalk"].url(), self.r["slack"].url()))
        self.daemon = Daemon(kpld, os.path.join(tmp, "data"),
                             extra=["--config", self.cfg, "--log-level", "debug"])
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "WECOM_URL", "value": self.r["wecom"].url()})
        self.c.call(P + "SetSecret", {"name": "DING_SECRET", "value": DING_SECRET})
        # What every receiver must have got, in order, by the end.
        self.want = {k: [] for k in self.r}

    def expect(self, kind, bodies, what, timeout=60):
        """Waits for receiver kind to hold exactly self.want[kind] + bodies,
        and nothing after: a sentinel notice (SENTINEL) follows them through
        kpld's ordered outbox, so anything extra arrives before it does."""
        evs = watch(self.c, submit(self.c, SENTINEL % NOTIFIER[kind]).id)
        sentinel = body(kind, notice("started", run_started(evs)))
        self.want[kind] += bodies + [sentinel]
        want = self.want[kind]
        recv = self.r[kind]
        wait_until("%s: the sentinel after %d messages (%s)" % (kind, len(want) - 1, what),
                   lambda: sentinel in recv.bodies(), timeout)
        got = recv.bodies()
        if got != want:
            raise AssertionError("%s got:\n  %s\nwanted:\n  %s" % (
                kind, "\n  ".join(map(repr, got)), "\n  ".join(map(repr, want))))
        assert_eq(recv.bad, [], kind + " protocol problems")

    def test_1_unknown_notifier_refused_at_submit(self):
        before = len(self.c.call(P + "ListRuns", {}).runs)
        expect_rpc_error(lambda: submit(self.c, UNKNOWN), grpc.StatusCode.INVALID_ARGUMENT,
                         'pipeline:5:5: notify[1].notifier: no notifier named "nope" in '
                         'the daemon config %s (declared: ' % self.cfg)
        assert_eq(len(self.c.call(P + "ListRuns", {}).runs), before, "runs after a refusal")

    def test_2_success(self):
        run = submit(self.c, OK).id
        evs = watch(self.c, run)
        assert_eq(evs[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run state")
        started = notice("started", run_started(evs))
        done = notice("succeeded", find(evs, "EVENT_KIND_RUN_STATE", "RUN_STATE_SUCCEEDED"))
        self.expect("wecom", [body("wecom", started), body("wecom", done)], "success")
        self.expect("slack", [body("slack", started), body("slack", done)], "success")
        self.expect("dingtalk", [], "success (not asked for)")

    def test_3_stage_failure(self):
        run = submit(self.c, FAIL).id
        evs = watch(self.c, run)
        assert_eq(evs[-1]["run_state"], "RUN_STATE_FAILED", "run state")
        failed = find(evs, "EVENT_KIND_STAGE_STATE", "STAGE_STATE_FAILED", "compile")
        log = [e["message"] for e in evs
               if e.get("kind") == "EVENT_KIND_LOG" and e.get("stage") == "compile"][-10:]
        assert_eq(log[-1], "line 12 <x&y>", "last log line")
        assert_eq(len(log), 10, "log lines quoted")
        self.expect("dingtalk", [
            body("dingtalk", notice("stage_failed", failed, log)),
            body("dingtalk", notice("failed", find(evs, "EVENT_KIND_RUN_STATE",
                                                   "RUN_STATE_FAILED")))], "failure")
        # Every DingTalk request was signed (the receiver checks each one).
        for _, _, _, q in self.r["dingtalk"].accepted:
            assert q.get("sign") and q.get("timestamp"), q

    def test_4_approval_waiting_with_retries(self):
        wecom = self.r["wecom"]
        wecom.fail_next = 2
        refused = wecom.refused
        run = submit(self.c, APPROVAL).id
        evs = events_until(self.c, run, lambda e: e.get("stage_state") == "STAGE_STATE_WAITING")
        waiting = find(evs, "EVENT_KIND_STAGE_STATE", "STAGE_STATE_WAITING", "ask")
        self.expect("wecom", [body("wecom", notice("waiting", waiting))],
                    "waiting after two 500s")
        assert_eq(wecom.refused - refused, 2, "500s given before the message got through")
        # Two backoffs (1 s, then 2 s) before the third try, as kpld planned
        # them (its log; what the schedule is, not how long a busy machine
        # took).
        log = open(self.daemon.log).read()
        for n, ms in ((1, 1000), (2, 2000)):
            if not re.search(r"notifier team-wecom: waiting of run %s \(global seq \d+\): "
                             r"try %d of 6 failed: HTTP 500[^\n]*; again in %d ms"
                             % (run, n, ms), log):
                raise AssertionError("no 'try %d of 6 failed ... again in %d ms' in kpld's log"
                                     % (n, ms))
        # The run went on meanwhile: only the message waited.
        assert_eq(Client.to_dict(self.c.call(P + "GetRun", {"id": run}))["state"],
                  "RUN_STATE_RUNNING", "run state while the message was retried")
        self.c.call(P + "ApproveStage", {"run_id": run, "stage": "ask", "approve": True,
                                        "comment": "go", "by": "alice"})
        evs = watch(self.c, run)
        assert_eq(evs[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run state")
        self.expect("wecom", [body("wecom", notice("succeeded", find(
            evs, "EVENT_KIND_RUN_STATE", "RUN_STATE_SUCCEEDED")))], "approved")

    def test_5_restart_sends_once(self):
        slack = self.r["slack"]
        slack.down = True
        run = submit(self.c, CANCEL).id
        events_until(self.c, run, lambda e: e.get("kind") == "EVENT_KIND_LOG")
        self.c.call(P + "CancelRun", {"id": run})
        evs = watch(self.c, run)
        assert_eq(evs[-1]["run_state"], "RUN_STATE_CANCELLED", "run state")
        # DingTalk took `started`; Slack refuses `cancelled` for now.
        self.expect("dingtalk", [body("dingtalk", notice("started", run_started(evs)))],
                    "started of the cancelled run")
        refused = slack.refused
        wait_until("slack refusing", lambda: slack.refused > refused)
        assert_eq(self.daemon.stop(signal.SIGKILL), -signal.SIGKILL, "kpld killed")
        slack.down = False
        self.c.close()
        self.c = self.daemon.start()
        self.expect("slack", [body("slack", notice("cancelled", find(
            evs, "EVENT_KIND_RUN_STATE", "RUN_STATE_CANCELLED")))], "after the restart")
        # Nothing already delivered came again: each notifier's sentinel,
        # queued after whatever the restart found unsent, came right after
        # what it had before.
        self.expect("wecom", [], "nothing again after the restart")
        self.expect("dingtalk", [], "nothing again after the restart")
        assert "1 notification left unsent by the last kpld: sending" in \
            open(self.daemon.log).read(), "the restart found the one unsent message"

    def test_6_log_clean_and_clean_stop(self):
        # A failed try and a delivery of its own (not test 4's), so that the
        # log holds both whatever ran before.
        self.r["wecom"].fail_next = 1
        self.expect("wecom", [], "a try refused with 500, then delivered")
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")
        log = open(self.daemon.log).read()
        assert "notifier team-wecom: delivered" in log, "delivery is logged"
        assert "try 1 of 6 failed: HTTP 500" in log, "a failed try is logged"
        for secret in (WECOM_KEY, DING_TOKEN, DING_SECRET, SLACK_PATH, "T0KPL",
                       "slacksecretpath99", "127.0.0.1:%d" % self.r["slack"].port,
                       "127.0.0.1:%d" % self.r["dingtalk"].port,
                       "127.0.0.1:%d" % self.r["wecom"].port):
            assert secret not in log, "kpld's log holds %r" % secret

    def close(self):
        if self.daemon.proc:
            self.daemon.stop(signal.SIGTERM)
        for r in self.r.values():
            r.close()


def main():
    tmp = tempfile.mkdtemp(prefix="kpl-notify-")
    s = Suite(sys.argv[1], tmp)
    return run_suite(Suite, s)


if __name__ == "__main__":
    sys.exit(main())
