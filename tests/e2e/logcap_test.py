"""The default log cap (README, "Logs"): each stage attempt keeps at most
16 MiB of events in the store, without any flag; a client sees the log
end with kpl's own note, the command still runs to its end and its exit
status decides; the next attempt has a cap of its own; GetRun and a
second WatchRun see the same log. (datadir_test checks how events count
against a small --log-cap.)

    /usr/bin/python3 tests/e2e/logcap_test.py PATH/TO/kpld
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import P, Client, Daemon, assert_eq, run_suite, submit, watch  # noqa: E402

CAP = 16 * 1024 * 1024
LINE = 4000
N = 4600  # 18.4 MB of 4000-byte lines: past the cap

# Attempt 1 floods past the cap, says where it ends, and fails; attempt 2
# prints two lines and succeeds.
TEXT = """
name: logcap
stages:
  - name: s
    kind: script
    retries: { count: 1, backoff: 250ms }
    with:
      shell: |
        if [ "$KPL_ATTEMPT" = 1 ]; then
          yes "$(head -c %d /dev/zero | tr '\\0' x)" | head -n %d
          echo "flood done"
          exit 3
        fi
        echo "second attempt"
        echo "its own log"
""" % (LINE, N)

NOTE = ("log cut here: this attempt's log reached the cap of %d bytes; "
        "later lines were not kept" % CAP)


class Suite:
    def __init__(self, binary, tmp):
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()

    def test_default_cap_per_attempt(self):
        run = Client.to_dict(submit(self.c, TEXT))
        events = watch(self.c, run["id"])
        logs = [e for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        first = [e for e in logs if e.get("attempt") == 1]
        second = [e for e in logs if e.get("attempt") == 2]
        flood = [e for e in first if e.get("message") == "x" * LINE]
        kept = sum(len(e["message"]) for e in flood)
        # Each line costs its whole event record (a few dozen bytes more
        # than its text): a bit under 16 MiB of text is kept, never more.
        if not CAP - 64 * 1024 - len(flood) * 200 <= kept <= CAP:
            raise AssertionError("attempt 1 kept %d bytes in %d lines under a cap of %d"
                                 % (kept, len(flood), CAP))
        assert_eq(len(flood) < N, True, "some lines were cut")
        assert_eq((first[-1].get("message"), first[-1].get("stream")),
                  (NOTE, "LOG_STREAM_SYSTEM"), "the last line of attempt 1")
        assert_eq(len(first), len(flood) + 1, "attempt 1: the kept lines and the note")
        assert_eq([e.get("message") for e in second], ["second attempt", "its own log"],
                  "attempt 2's log")
        states = [(e.get("attempt"), e.get("stage_state")) for e in events
                  if e.get("kind") == "EVENT_KIND_STAGE_STATE"]
        if (1, "STAGE_STATE_FAILED") not in states and (1, "STAGE_STATE_PENDING") not in states:
            raise AssertionError("attempt 1 did not fail (its exit status): %r" % states)
        assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "the run")

        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq((got["stages"][0]["state"], got["stages"][0]["attempt"]),
                  ("STAGE_STATE_SUCCEEDED", 2), "GetRun's stage")
        assert_eq(int(got["last_seq"]), len(events), "GetRun's last_seq")
        again = watch(self.c, run["id"])
        assert_eq([(e.get("seq"), e.get("message")) for e in again],
                  [(e.get("seq"), e.get("message")) for e in events],
                  "a second WatchRun replays the same log")

    def close(self):
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-logcap-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
