"""The run-level `timeout:` of a pipeline (issue #13): past it the running
stages are stopped, the rest do not start, `finally` still runs (a rollback
is what a timed-out release most needs), and the run ends FAILED with a
message naming the timeout; the deadline (the stored start plus the
timeout) holds across a kill -9 of kpld; lint names the line and column of
a bad one.

    /usr/bin/python3 tests/e2e/run_timeout_test.py PATH/TO/kpld
"""

import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import Daemon, assert_eq, run_suite, submit, wait_for_log, watch  # noqa: E402
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

TIMED = """name: timed
timeout: %s
stages:
  - name: sleepy
    kind: script
    with: { shell: "echo started; sleep 120" }
  - name: after
    kind: script
    needs: [sleepy]
    with: { command: ["echo", "after"] }
finally:
  - name: rollback
    kind: script
    with: { command: ["echo", "rolling back"] }
"""


class Suite:
    def __init__(self, binary, tmp):
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()

    def check_timed_out(self, run_id, timeout_text):
        events = watch(self.c, run_id)
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run_id}))
        assert_eq((got["state"], got.get("message")),
                  ("RUN_STATE_FAILED",
                   "the run exceeded its timeout of %s (the pipeline's timeout:)" % timeout_text),
                  "the timed-out run")
        states = {s["name"]: s["state"] for s in got["stages"]}
        assert_eq(states["rollback"], "STAGE_STATE_SUCCEEDED", "finally after a timeout")
        if states["sleepy"] not in ("STAGE_STATE_CANCELLED", "STAGE_STATE_FAILED"):
            raise AssertionError("the running stage was not stopped: %r" % states)
        if states["after"] == "STAGE_STATE_SUCCEEDED":
            raise AssertionError("a stage started after the timeout: %r" % states)
        logs = [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        if "rolling back" not in logs or "after" in logs:
            raise AssertionError("logs: %r" % logs)

    def test_timeout_stops_the_run_and_finally_runs(self):
        run = Client.to_dict(submit(self.c, TIMED % "2s"))
        self.check_timed_out(run["id"], "2s")

    def test_timeout_holds_across_a_restart(self):
        # Killed while the stage sleeps: the restarted kpld arms the timer
        # again to the stored start plus 5s (without it the run would go
        # on for two minutes and succeed).
        run = Client.to_dict(submit(self.c, TIMED % "5s"))
        wait_for_log(self.c, run["id"])
        self.daemon.stop(signal.SIGKILL)
        self.c = self.daemon.start()
        self.check_timed_out(run["id"], "5s")

    def test_lint_names_line_and_column(self):
        resp = Client.to_dict(self.c.call(P + "ValidatePipeline", {
            "pipeline": "name: p\ntimeout: 0s\nstages:\n  - { name: a, kind: noop }\n"}))
        d = resp["diagnostics"][0]
        assert_eq((d["line"], d["column"], d["path"], d["message"]),
                  (2, 10, "timeout",
                   "a timeout of 0 would fail the run at once: leave timeout out for none"),
                  "lint of timeout: 0s")

    def close(self):
        rc = self.daemon.stop()
        assert_eq(rc, 0, "kpld exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-timeout-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
