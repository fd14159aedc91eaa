"""WatchRun and WatchRuns send events in batches (api/rpc_pipelines.c reads
up to 256 events or 32 KiB in one read transaction and flushes them as one
chain of sends, api/server.c): a replay of 20,000 events, followed live and
replayed, arrives complete, in order, without gap or repeat, and a resume
from any seq (the middle of a batch, a batch's edge, after a cancel in the
middle of one) goes on exactly where it should.

    /usr/bin/python3 tests/e2e/stream_test.py PATH/TO/kpld
"""

import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import (P, Client, Daemon, assert_eq, run_suite, submit,  # noqa: E402
                      seqs, watch)

LINES = 20000

MANY = """
name: many
stages:
  - {name: s, kind: script, with: {command: [seq, "1", "%d"]}}
""" % LINES


def check_whole(events, what):
    """1..N without gap or repeat, every line in order, the run's end last."""
    n = len(events)
    assert_eq(seqs(events), list(range(1, n + 1)), what + ": seqs 1..N")
    lines = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
    assert_eq(lines, [str(i) for i in range(1, LINES + 1)], what + ": log lines in order")
    last = events[-1]
    assert_eq((last.get("kind"), last.get("run_state")),
              ("EVENT_KIND_RUN_STATE", "RUN_STATE_SUCCEEDED"), what + ": the last event")


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.run_id = None
        self.full = None

    # -- tests ----------------------------------------------------------

    def test_live_then_replay_complete(self):
        # Followed from the submit: live batches as the lines are committed.
        run = Client.to_dict(submit(self.c, MANY))
        live = watch(self.c, run["id"])
        check_whole(live, "live")
        replay = watch(self.c, run["id"])
        check_whole(replay, "replay")
        assert_eq(replay, live, "replay equals what was followed live")
        last = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(int(last["last_seq"]), len(replay), "GetRun's last_seq")
        self.run_id, self.full = run["id"], replay

    def test_resume_from_any_seq(self):
        n = len(self.full)
        # Inside the first batch, on batch edges (256 events a batch while
        # 32 KiB are not reached), inside later ones, the last event.
        for from_seq in (2, 255, 256, 257, 258, 300, 513, 10001, n - 1, n):
            got = watch(self.c, self.run_id, from_seq=from_seq)
            assert_eq(seqs(got), list(range(from_seq, n + 1)),
                      "seqs from %d" % from_seq)
            assert_eq(got, self.full[from_seq - 1:], "events from %d" % from_seq)
        assert_eq(watch(self.c, self.run_id, from_seq=n + 1), [], "from past the end")

    def test_cancel_mid_batch_then_resume(self):
        # The client goes away while a batch is being sent, several times;
        # each resume from the last event it saw goes on without gap or
        # repeat.
        got, at = [], 1
        for limit in (1, 100, 1000, 777, 3):
            part = watch(self.c, self.run_id, from_seq=at, limit=limit)
            assert_eq(len(part), limit, "events before the cancel")
            got += part
            at = int(part[-1]["seq"]) + 1
        got += watch(self.c, self.run_id, from_seq=at)
        assert_eq(got, self.full, "events across five cancels and resumes")

    def test_many_cancelled_streams_leave_kpld_serving(self):
        # Streams cancelled right after their first event, with batches in
        # flight, all at once: kpld frees each and keeps serving.
        streams = [self.c.stream(P + "WatchRun", {"id": self.run_id}, timeout=60)
                   for _ in range(16)]
        for s in streams:
            first = Client.to_dict(next(iter(s)))
            assert_eq(int(first["seq"]), 1, "first event of a fresh stream")
            s.cancel()
        assert_eq(watch(self.c, self.run_id, from_seq=LINES), self.full[LINES - 1:],
                  "a stream after the cancelled ones")

    def test_watch_runs_global_batched(self):
        # The same run's events through WatchRuns from its first global seq:
        # global seqs contiguous (one run only wrote then), the same events.
        first_g = int(self.full[0]["global_seq"])
        got = []
        done = threading.Event()
        stream = self.c.stream(P + "WatchRuns", {"from_global_seq": first_g,
                                                "pipeline_name": "many"}, timeout=60)

        def follow():
            for ev in stream:
                got.append(Client.to_dict(ev))
                if len(got) == len(self.full):
                    break
            done.set()
        t = threading.Thread(target=follow)
        t.start()
        done.wait(60)
        stream.cancel()
        t.join()
        assert_eq(len(got), len(self.full), "events through WatchRuns")
        assert_eq([int(e["global_seq"]) for e in got],
                  list(range(first_g, first_g + len(self.full))), "global seqs contiguous")
        assert_eq([(e["run_id"], int(e["seq"])) for e in got],
                  [(self.run_id, i) for i in range(1, len(self.full) + 1)],
                  "run and seq of each")

    def close(self):
        self.c.close()
        import signal
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-stream-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
