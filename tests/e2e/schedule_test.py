"""Schedules of registered pipelines (issue #13): a fire at its time in its
time zone, no double fire across a restart (kill -9 right after the fire,
SIGTERM after it), a fire missed while kpld was down runs once within
starting_deadline and is skipped (and says so) beyond it, the concurrency
group queues a fire while the last run still runs, registration errors, and
kplctl pipeline register --schedule / show.

    /usr/bin/python3 tests/e2e/schedule_test.py PATH/TO/kpld PATH/TO/kplctl

The clock is the test's: KPL_TEST_SCHEDULE_CLOCK names a file holding the
scheduler's "now" in ms since the epoch; after each change the test waits
for kpld's line "looked at N schedules at clock MS", so it knows the value
was acted on (no sleeps).
"""

import calendar
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import Daemon, assert_eq, expect_rpc_error, run_suite, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

NIGHTLY = """name: nightly
params:
  who: { default: nobody }
stages:
  - name: show
    kind: script
    with: { command: ["sh", "-c", "echo nightly who=$KPL_PARAM_WHO"] }
"""

HOURLY = """name: hourly
stages:
  - name: show
    kind: script
    with: { command: ["echo", "hourly"] }
"""

# Waits for approval, so a run stays active until the test answers.
SLOW = """name: slow
concurrency: "slow-group"
stages:
  - name: gate
    kind: approval
    with: { message: "go?" }
"""


def utc_ms(text):
    """'2026-01-10T18:00:00' (UTC) in ms since the epoch."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")) * 1000


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          capture_output=True, text=True).stdout.strip()


def await_true(fn, what, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class Suite:
    def __init__(self, binary, kplctl, tmp):
        self.tmp = tmp
        self.kplctl = kplctl
        self.clock = os.path.join(tmp, "clock")
        os.environ["KPL_TEST_SCHEDULE_CLOCK"] = self.clock
        self.set_clock("2026-01-10T17:59:00", wait=False)
        self.repo = os.path.join(tmp, "app")
        os.makedirs(self.repo)
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "t@example.com")
        git(self.repo, "config", "user.name", "t")
        for path, text in (("nightly.yaml", NIGHTLY), ("hourly.yaml", HOURLY),
                           ("slow.yaml", SLOW)):
            with open(os.path.join(self.repo, path), "w") as f:
                f.write(text)
            git(self.repo, "add", path)
        git(self.repo, "commit", "-q", "-m", "pipelines")
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "HOOK_KEY", "value": "hook-key-1234"})

    # -- helpers ------------------------------------------------------------

    def set_clock(self, text, wait=True):
        """Sets the scheduler's clock and waits until kpld has looked at
        its schedules with it."""
        self.now_ms = utc_ms(text)
        tmp = self.clock + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % self.now_ms)
        os.rename(tmp, self.clock)
        if wait:
            self.await_look()

    def await_look(self):
        pat = re.compile(r"sched: looked at \d+ schedules? at clock %d\b" % self.now_ms)
        start = getattr(self, "log_mark", 0)
        await_true(lambda: pat.search(self.log()[start:]), "a look at clock %d" % self.now_ms)

    def log(self):
        with open(self.daemon.log) as f:
            return f.read()

    def mark(self):
        """Later await_look calls only count lines written from now on."""
        self.log_mark = len(self.log())

    def restart(self, sig=signal.SIGTERM):
        self.daemon.stop(sig)
        self.mark()
        self.c = self.daemon.start()

    def runs(self, name):
        return Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": name})).get("runs", [])

    def registered(self, name):
        l = Client.to_dict(self.c.call(P + "ListPipelines", {})).get("pipelines", [])
        return next(p for p in l if p["name"] == name)

    def schedule(self, name, i=0):
        return self.registered(name)["schedules"][i]

    def ctl(self, *args, ok=True):
        r = subprocess.run([self.kplctl, "--server", self.daemon.addr] + list(args),
                           capture_output=True, text=True, timeout=120)
        if ok and r.returncode != 0:
            raise AssertionError("kplctl %s: exit %d\nstdout:\n%s\nstderr:\n%s"
                                 % (" ".join(args), r.returncode, r.stdout, r.stderr))
        return r

    # -- tests --------------------------------------------------------------

    def test_register_errors(self):
        base = {"name": "nightly", "repo": self.repo, "path": "nightly.yaml",
                "secret": "HOOK_KEY"}
        expect_rpc_error(lambda: self.c.call(P + "RegisterPipeline", dict(
            base, schedules=[{"cron": "0 24 * * *"}])), grpc.StatusCode.INVALID_ARGUMENT,
            "schedules[0].cron: field 2 (hour), column 3: 24 is above the maximum 23")
        expect_rpc_error(lambda: self.c.call(P + "RegisterPipeline", dict(
            base, schedules=[{"cron": "0 2 * * *"}, {"cron": "0 2 * * *",
                                                     "timezone": "Mars/Base"}])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "schedules[1].timezone: time zone \"Mars/Base\": unknown")
        expect_rpc_error(lambda: self.c.call(P + "RegisterPipeline", dict(
            base, schedules=[{"cron": "0 0 30 2 *"}])), grpc.StatusCode.INVALID_ARGUMENT,
            "never fires")
        expect_rpc_error(lambda: self.c.call(P + "RegisterPipeline", dict(
            base, branches=["release/*"], schedules=[{"cron": "@daily"}])),
            grpc.StatusCode.INVALID_ARGUMENT, "schedules[0].branch: required")
        r = self.ctl("pipeline", "register", "nightly", "--repo", self.repo, "--secret",
                     "HOOK_KEY", "--schedule", "0 2 * * *; when=later", ok=False)
        assert_eq(r.returncode, 2, "kplctl exit for an unknown --schedule key")
        if "unknown key \"when\"" not in r.stderr:
            raise AssertionError("kplctl stderr: %r" % r.stderr)
        # The schedules' idempotency keys are kpld's own.
        expect_rpc_error(lambda: self.c.call(P + "SubmitRun", {
            "pipeline": HOURLY, "idempotency_key": "sched:hourly:0:1"}),
            grpc.StatusCode.INVALID_ARGUMENT, "kpld's own")
        assert_eq(Client.to_dict(self.c.call(P + "ListPipelines", {})).get("pipelines", []),
                  [], "nothing registered by the refused calls")

    def test_fires_at_its_time_in_its_zone(self):
        # 17:59 UTC is 01:59 in Shanghai (+08:00): the 02:00 fire is a
        # minute away; in UTC it would be eight hours away.
        self.mark()
        self.ctl("pipeline", "register", "nightly", "--repo", self.repo, "--path",
                 "nightly.yaml", "--secret", "HOOK_KEY", "--schedule",
                 "0 2 * * *; timezone=Asia/Shanghai; branch=main; param.who=cron")
        self.set_clock("2026-01-10T17:59:01")
        await_true(lambda: self.schedule("nightly")["next_fire"] == "2026-01-10T18:00:00Z",
                   "the next fire after registering")
        out = self.ctl("pipeline", "show", "nightly").stdout
        for want in ("schedule:  0 2 * * * (Asia/Shanghai), branch main, params who=cron",
                     "next:    2026-01-11 02:00:00 +0800"):
            if want not in out:
                raise AssertionError("pipeline show lacks %r:\n%s" % (want, out))
        self.set_clock("2026-01-10T17:59:59")
        assert_eq(self.runs("nightly"), [], "runs a second before the fire")
        self.set_clock("2026-01-10T18:00:00")
        run = await_true(lambda: self.runs("nightly"), "the 02:00 fire's run")[0]
        events = watch(self.c, run["id"])
        logs = [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if "nightly who=cron" not in logs:
            raise AssertionError("the schedule's params did not reach the run: %r" % logs)
        assert_eq(run["source"]["ref"], "refs/heads/main", "the fire ran the branch head")
        sc = await_true(lambda: self.schedule("nightly").get("last_run_id") and
                        self.schedule("nightly"), "the fire's record")
        assert_eq((sc["last_run_id"], sc["last_fire"], sc["next_fire"]),
                  (run["id"], "2026-01-10T18:00:00Z", "2026-01-11T18:00:00Z"),
                  "last and next fire")
        self.fired = run["id"]

    def crash_and_restart(self, where, clock):
        """Starts kpld with KPL_TEST_SCHEDULE_CRASH=where, moves the clock to
        a fire time and waits for kpld to die there; starts it again (no
        crash point) and waits for a look."""
        self.daemon.stop()
        os.environ["KPL_TEST_SCHEDULE_CRASH"] = where
        try:
            self.mark()
            self.c = self.daemon.start()
        finally:
            del os.environ["KPL_TEST_SCHEDULE_CRASH"]
        self.set_clock(clock, wait=False)
        rc = self.daemon.proc.wait(timeout=90)
        assert_eq(rc, 9, "kpld's exit at the crash point %s" % where)
        self.daemon.proc = None
        if "KPL_TEST_SCHEDULE_CRASH=%s: exiting" % where not in self.log()[self.log_mark:]:
            raise AssertionError("kpld did not die at the crash point " + where)
        self.mark()
        self.c = self.daemon.start()
        self.await_look()

    def test_restart_right_after_a_fire_does_not_double_it(self):
        # Killed once the claim of the 2026-01-11 fire is stored, before its
        # run is submitted: the restart submits it.
        self.crash_and_restart("claim", "2026-01-11T18:00:00")
        runs = [r["id"] for r in self.runs("nightly") if r["id"] != self.fired]
        assert_eq(len(runs), 1, "runs of the fire claimed before the crash")
        sc = self.schedule("nightly")
        assert_eq((sc["last_run_id"], sc["last_fire"], sc["next_fire"]),
                  (runs[0], "2026-01-11T18:00:00Z", "2026-01-12T18:00:00Z"),
                  "the claimed fire's record after the restart")
        # Killed once the 2026-01-12 fire's run is stored, before the fire's
        # record is: the restart submits it again under the same key, which
        # finds that run.
        self.crash_and_restart("submit", "2026-01-12T18:00:00")
        third = [r["id"] for r in self.runs("nightly") if r["id"] not in [self.fired] + runs]
        assert_eq(len(third), 1, "runs of the fire submitted before the crash")
        sc = self.schedule("nightly")
        assert_eq((sc["last_run_id"], sc["last_fire"]), (third[0], "2026-01-12T18:00:00Z"),
                  "the submitted fire's record after the restart")
        for r in [self.fired] + runs + third:
            watch(self.c, r)
        # A clean restart after the fire: nothing fires again.
        self.restart()
        self.set_clock("2026-01-12T18:01:00")
        assert_eq(len(self.runs("nightly")), 3, "runs after a clean restart")

    def test_missed_fire_within_the_deadline_runs_once(self):
        self.mark()
        self.set_clock("2026-02-01T09:30:00", wait=False)
        self.ctl("pipeline", "register", "hourly", "--repo", self.repo, "--path",
                 "hourly.yaml", "--secret", "HOOK_KEY", "--schedule",
                 "0 * * * *; starting_deadline=10m")
        self.set_clock("2026-02-01T09:30:01")
        await_true(lambda: self.schedule("hourly")["next_fire"] == "2026-02-01T10:00:00Z",
                   "hourly's next fire")
        # Down over 10:00, 11:00 and 12:00; back at 12:05: the latest
        # missed fire (12:00) is 5 minutes late, within 10: it runs, once.
        self.daemon.stop()
        self.mark()
        self.set_clock("2026-02-01T12:05:00", wait=False)
        self.c = self.daemon.start()
        self.await_look()
        runs = await_true(lambda: self.runs("hourly"), "the missed fire's run")
        sc = await_true(lambda: self.schedule("hourly").get("last_run_id") and
                        self.schedule("hourly"), "the missed fire's record")
        assert_eq((sc["last_fire"], sc["next_fire"]),
                  ("2026-02-01T12:00:00Z", "2026-02-01T13:00:00Z"), "the fire that ran")
        self.set_clock("2026-02-01T12:06:00")
        assert_eq([r["id"] for r in self.runs("hourly")], [runs[0]["id"]],
                  "one run for three missed fires")
        watch(self.c, runs[0]["id"])

    def test_missed_fire_beyond_the_deadline_is_skipped(self):
        # Back at 14:30: the latest missed fire (14:00) is 30 minutes late.
        self.daemon.stop()
        self.mark()
        self.set_clock("2026-02-01T14:30:00", wait=False)
        self.c = self.daemon.start()
        self.await_look()
        want = ("missed the fire at 2026-02-01T14:00:00+00:00: 1800 s late, past its "
                "starting_deadline of 600 s: skipped")
        sc = await_true(lambda: self.schedule("hourly").get("last_message") and
                        self.schedule("hourly"), "the skip's record")
        assert_eq((sc["last_message"], sc["next_fire"]), (want, "2026-02-01T15:00:00Z"),
                  "the skipped fire")
        if want not in self.log():
            raise AssertionError("the log does not say the fire was skipped")
        self.set_clock("2026-02-01T14:31:00")
        assert_eq(len(self.runs("hourly")), 1, "runs after a skipped fire")
        out = self.ctl("pipeline", "show", "hourly").stdout
        if "note:    " + want not in out:
            raise AssertionError("pipeline show lacks the note:\n" + out)

    def test_concurrency_group_queues_the_next_fire(self):
        self.mark()
        self.set_clock("2026-03-01T08:01:00", wait=False)
        self.c.call(P + "RegisterPipeline", {
            "name": "slow", "repo": self.repo, "path": "slow.yaml", "secret": "HOOK_KEY",
            "schedules": [{"cron": "*/5 * * * *"}]})
        self.set_clock("2026-03-01T08:01:01")
        await_true(lambda: self.schedule("slow")["next_fire"] == "2026-03-01T08:05:00Z",
                   "slow's next fire")
        self.set_clock("2026-03-01T08:05:00")
        first = await_true(lambda: [r for r in self.runs("slow")
                                    if r["state"] == "RUN_STATE_RUNNING"], "the first run")[0]
        self.set_clock("2026-03-01T08:10:00")
        runs = await_true(lambda: len(self.runs("slow")) == 2 and self.runs("slow"),
                          "the second fire's run")
        second = [r for r in runs if r["id"] != first["id"]][0]
        assert_eq(second["state"], "RUN_STATE_QUEUED", "the second fire waits for the first")
        self.c.call(P + "ApproveStage", {"run_id": first["id"], "stage": "gate",
                                         "approve": True})
        watch(self.c, first["id"])
        await_true(lambda: Client.to_dict(self.c.call(P + "GetRun", {"id": second["id"]}))
                   ["state"] == "RUN_STATE_RUNNING", "the second run to start")
        self.c.call(P + "CancelRun", {"id": second["id"]})
        watch(self.c, second["id"])

    def test_real_clock_fires_the_first_minute_after_registering(self):
        # A kpld on the real clock: a registration is looked at at once, so
        # the first minute after it fires (its run's fire time is that
        # minute, not a later one found "missed"). Waits up to a minute.
        saved = os.environ.pop("KPL_TEST_SCHEDULE_CLOCK")
        try:
            d = Daemon(self.daemon.binary, os.path.join(self.tmp, "data-real"))
            c = d.start()
        finally:
            os.environ["KPL_TEST_SCHEDULE_CLOCK"] = saved
        try:
            c.call(P + "SetSecret", {"name": "HOOK_KEY", "value": "hook-key-1234"})
            c.call(P + "RegisterPipeline", {
                "name": "hourly", "repo": self.repo, "path": "hourly.yaml",
                "secret": "HOOK_KEY", "schedules": [{"cron": "* * * * *"}]})
            reg = next(p for p in Client.to_dict(c.call(P + "ListPipelines", {}))
                       ["pipelines"] if p["name"] == "hourly")
            created = calendar.timegm(time.strptime(reg["created_at"][:19],
                                                    "%Y-%m-%dT%H:%M:%S"))
            want = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(created // 60 * 60 + 60))

            def fired():
                l = Client.to_dict(c.call(P + "ListPipelines", {}))["pipelines"]
                sc = next(p for p in l if p["name"] == "hourly")["schedules"][0]
                return sc.get("last_run_id") and sc
            sc = await_true(fired, "the first fire on the real clock", timeout=150)
            assert_eq(sc["last_fire"], want, "the first fire after registering")
            watch(c, sc["last_run_id"])
        finally:
            assert_eq(d.stop(), 0, "the real-clock kpld's exit status")

    def close(self):
        rc = self.daemon.stop()
        assert_eq(rc, 0, "kpld exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    kplctl = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-sched-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, kplctl, tmp))


if __name__ == "__main__":
    sys.exit(main())
