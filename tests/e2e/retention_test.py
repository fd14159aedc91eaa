"""Retention (README, "Retention"): finished runs older than --retain-days
are deleted with their events and workspaces, at start and hourly; a run
that has not finished and the newest run are kept; --retain-days 0 keeps
runs of any age.

The clock is the test's: KPL_TEST_RETENTION_CLOCK names a file holding
the sweep's "now" (ms since the epoch), which kpld reads every 50 ms; a
sweep is due at start and once that clock has passed the last sweep plus
an hour. Each sweep logs "retention: sweep N done: K deleted", which the
test waits for; nothing sleeps for time to pass.

    /usr/bin/python3 tests/e2e/retention_test.py PATH/TO/kpld
"""

import os
import re
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import (P, Client, Daemon, assert_eq, expect_rpc_error,  # noqa: E402
                      run_suite, submit, watch)

HOUR = 3600 * 1000
DAY = 24 * HOUR

OK = "name: keep-%s\nstages:\n  - name: a\n    kind: script\n" \
     "    with: { command: [\"echo\", \"hi\"] }\n"
FAILS = "name: fails\nstages:\n  - name: a\n    kind: script\n" \
        "    with: { command: [\"false\"] }\n"
WAITS = "name: waits\nstages:\n  - name: a\n    kind: approval\n"


def await_true(fn, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class Suite:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.tmp = tmp
        self.t0 = int(time.time() * 1000)
        self.clock = os.path.join(tmp, "clock")
        self.set_clock(0)
        os.environ["KPL_TEST_RETENTION_CLOCK"] = self.clock
        self.data = os.path.join(tmp, "data")
        self.daemon = Daemon(binary, self.data)
        self.c = self.daemon.start()
        self.seen = 0  # sweep lines of the current log read so far
        self.runs = {}

    def set_clock(self, offset_ms):
        tmp = self.clock + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % (self.t0 + offset_ms))
        os.rename(tmp, self.clock)

    def sweep(self):
        """Waits for the next sweep's line; returns how many it deleted."""
        def lines():
            with open(self.daemon.log) as f:
                return re.findall(r"retention: sweep (\d+) done: (\d+) deleted", f.read())
        await_true(lambda: len(lines()) > self.seen, "sweep %d" % (self.seen + 1))
        n, deleted = lines()[self.seen]
        self.seen += 1
        return int(deleted)

    def ids(self):
        return sorted(r["id"] for r in
                      Client.to_dict(self.c.call(P + "ListRuns", {})).get("runs", []))

    def workspace(self, run_id):
        return os.path.join(self.data, "work", run_id)

    def restart(self, extra, clock):
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")
        self.set_clock(clock)
        self.daemon.extra = extra
        self.daemon.log = os.path.join(self.tmp, "kpld-%d.log" % len(extra))
        self.seen = 0
        self.c = self.daemon.start()

    def test_sweep_by_age_at_start_and_hourly(self):
        assert_eq(self.sweep(), 0, "the sweep at start")
        r = self.runs
        r["ok"] = Client.to_dict(submit(self.c, OK % "a"))["id"]
        assert_eq(watch(self.c, r["ok"])[-1]["run_state"], "RUN_STATE_SUCCEEDED", "ok")
        r["fails"] = Client.to_dict(submit(self.c, FAILS))["id"]
        assert_eq(watch(self.c, r["fails"])[-1]["run_state"], "RUN_STATE_FAILED", "fails")
        r["waits"] = Client.to_dict(submit(self.c, WAITS))["id"]
        r["newest"] = Client.to_dict(submit(self.c, OK % "b"))["id"]
        watch(self.c, r["newest"])
        for k in ("ok", "fails", "newest"):
            if not os.path.isdir(self.workspace(r[k])):
                raise AssertionError("no workspace for run %s" % k)

        # An hour less than 30 days later: due (an hour has passed since
        # the last sweep), and nothing is old enough.
        self.set_clock(30 * DAY - HOUR)
        assert_eq(self.sweep(), 0, "runs 30 days less an hour old deleted")
        assert_eq(self.ids(), sorted(r.values()), "runs after the second sweep")

        # Two hours later the finished runs are past 30 days: deleted with
        # their events and workspaces. The waiting run and the newest stay.
        self.set_clock(30 * DAY + HOUR)
        assert_eq(self.sweep(), 2, "runs the hourly sweep deleted")
        await_true(lambda: self.ids() == sorted([r["waits"], r["newest"]]),
                   "ListRuns without the old runs")
        for k in ("ok", "fails"):
            expect_rpc_error(lambda: self.c.call(P + "GetRun", {"id": r[k]}),
                             grpc.StatusCode.NOT_FOUND)
            expect_rpc_error(lambda: watch(self.c, r[k]), grpc.StatusCode.NOT_FOUND)
            await_true(lambda: not os.path.exists(self.workspace(r[k])),
                       "run %s's workspace to go" % k)
        if not os.path.isdir(self.workspace(r["newest"])):
            raise AssertionError("the newest run's workspace went too")

        # Once the waiting run ends it goes at the next hourly sweep.
        self.c.call(P + "CancelRun", {"id": r["waits"]})
        self.set_clock(30 * DAY + 2 * HOUR + 1000)
        assert_eq(self.sweep(), 1, "the cancelled run, an hour later")
        await_true(lambda: self.ids() == [r["newest"]], "ListRuns with the newest run only")

    def test_retain_days_zero_keeps_any_age(self):
        r = self.runs
        r["later"] = Client.to_dict(submit(self.c, OK % "c"))["id"]
        watch(self.c, r["later"])
        self.restart(["--retain-days", "0"], 1000 * DAY)
        assert_eq(self.sweep(), 0, "runs --retain-days 0 deleted at start")
        assert_eq(self.ids(), sorted([r["newest"], r["later"]]), "runs kept")

    def test_sweep_at_start(self):
        self.restart(["--retain-days", "30", "--retain-runs", "0"], 1000 * DAY)
        assert_eq(self.sweep(), 1, "runs deleted by the sweep at start")
        await_true(lambda: self.ids() == [self.runs["later"]], "only the newest run left")

    def close(self):
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-retention-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
