"""Many WatchRun streams on one run share one read and one encoding of each
committed event (api/fanout.c): every stream still gets every event exactly
once and in order, a stream that stops reading while the run goes on (it
falls behind the shared window and reads the store itself) catches up
without gap or repeat, streams cancelled mid-run leave the others alone,
every stream ends with OK after the run's end, and kpld reads the events
from the store about once, not once per stream. And --http-max-connections
(SSE followers each hold an HTTP connection) caps the listener.

    /usr/bin/python3 tests/e2e/fanout_test.py PATH/TO/kpld
"""

import http.client
import os
import re
import signal
import socket
import sys
import tempfile
import threading

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import P, Client, Daemon, assert_eq, run_suite, submit  # noqa: E402

# About 100 bytes a line, 6,000 lines: some 700 KiB of events, more than
# the shared window (256 KiB) plus what flow control lets a stalled stream
# hold, so a stream that stops reading falls behind the window.
LINES = 6000
FOLLOWERS = 8
STALLED = 2
CANCELLED = 2

GATED = """
name: fan
stages:
  - {name: go, kind: approval, timeout: 1h, with: {message: start}}
  - name: talk
    kind: script
    needs: [go]
    with: {command: [seq, "-f", "line %%06g %s", "1", "%d"]}
""" % ("x" * 80, LINES)


def line(i):
    return "line %06d %s" % (i, "x" * 80)


def check_whole(events, what):
    """Seqs 1..N without gap or repeat, every line in order, the run's end
    last. events are (seq, kind, message, run_state) tuples."""
    n = len(events)
    assert_eq([e[0] for e in events], list(range(1, n + 1)), what + ": seqs 1..N")
    lines = [e[2] for e in events if e[1] == "EVENT_KIND_LOG"]
    if lines != [line(i) for i in range(1, LINES + 1)]:
        raise AssertionError("%s: %d log lines, not the %d in order" % (what, len(lines), LINES))
    assert_eq((events[-1][1], events[-1][3]), ("EVENT_KIND_RUN_STATE", "RUN_STATE_SUCCEEDED"),
              what + ": the last event")


class Follower:
    """A WatchRun stream read on its own thread. wait_first: set once its
    first event came (it is open on kpld then). gate: if set, the thread
    stops reading after the first event until the gate opens. cancel_at:
    cancel the stream after that many events."""

    def __init__(self, c, run_id, gate=None, cancel_at=None):
        self.stream = c.stream(P + "WatchRun", {"id": run_id}, timeout=300)
        self.events = []
        self.first = threading.Event()
        self.error = None
        self.gate = gate
        self.cancel_at = cancel_at
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        kinds = None
        try:
            for ev in self.stream:
                if kinds is None:
                    kinds = type(ev).DESCRIPTOR.fields_by_name["kind"].enum_type
                    states = type(ev).DESCRIPTOR.fields_by_name["run_state"].enum_type
                self.events.append((ev.seq, kinds.values_by_number[ev.kind].name, ev.message,
                                    states.values_by_number[ev.run_state].name))
                if len(self.events) == 1:
                    self.first.set()
                    if self.gate is not None:
                        self.gate.wait(300)
                if self.cancel_at is not None and len(self.events) >= self.cancel_at:
                    self.stream.cancel()
                    return
        except grpc.RpcError as e:
            if self.cancel_at is None:
                self.error = e
        finally:
            self.first.set()

    def join(self):
        self.thread.join(300)
        assert not self.thread.is_alive(), "a follower did not end"
        if self.error is not None:
            raise AssertionError("stream failed: %s %s" % (self.error.code(),
                                                           self.error.details()))


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             extra=["--http-listen", "127.0.0.1:0"])
        self.c = self.daemon.start()
        # The stalled streams on a connection of their own, without BDP
        # probing: flow control then stops kpld's sends to them at the
        # default 64 KiB window instead of a window grown to megabytes.
        self.slow = Client.connect(self.daemon.addr, options=[("grpc.http2.bdp_probe", 0)])

    def events_read(self):
        """kpld's count of events decoded from the store for WatchRun."""
        host, port = self.daemon.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        m = re.search(r'^kpl_api_events_read_total\{method="WatchRun"\} (\d+)$', text, re.M)
        return int(m.group(1)) if m else 0

    # -- tests ----------------------------------------------------------

    def test_many_streams_one_run(self):
        run = Client.to_dict(submit(self.c, GATED))
        gate = threading.Event()
        followers = [Follower(self.c, run["id"]) for _ in range(FOLLOWERS)]
        stalled = [Follower(self.slow, run["id"], gate=gate) for _ in range(STALLED)]
        cancelled = [Follower(self.c, run["id"], cancel_at=n) for n in (2, LINES // 2)]
        assert len(cancelled) == CANCELLED
        everyone = followers + stalled + cancelled
        for f in everyone:
            assert f.first.wait(120), "a stream's first event"
        read0 = self.events_read()
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "go", "approve": True})
        for i, f in enumerate(followers):
            f.join()
            check_whole(f.events, "follower %d" % i)
        # The run is over and the stalled streams are far behind: now they
        # read on, from the store, then from the window, to the end.
        gate.set()
        for i, f in enumerate(stalled):
            f.join()
            check_whole(f.events, "stalled stream %d" % i)
        for f, n in zip(cancelled, (2, LINES // 2)):
            f.join()
            assert_eq([e[0] for e in f.events], list(range(1, n + 1)),
                      "a cancelled stream's events")
        n = len(followers[0].events)
        for f in followers + stalled:
            assert_eq(f.events, followers[0].events, "every stream got the same events")
        # Read once for all the caught-up streams, plus the stalled ones'
        # own reads: far under one read per stream (12 here).
        read = self.events_read() - read0
        print("events decoded for %d streams of %d events: %d" % (len(everyone), n, read))
        assert read < 5 * n, "events decoded from the store: %d for %d events" % (read, n)
        self.run_id, self.full = run["id"], followers[0].events

    def test_replay_after_equals_live(self):
        # A stream on the finished run (the window is at the run's end by
        # now: it reads the store) gets the same.
        f = Follower(self.c, self.run_id)
        f.join()
        assert_eq(f.events, self.full, "replay equals what was followed live")
        # And from inside the window's last chunk, and past the end.
        for from_seq in (len(self.full) - 1, len(self.full), len(self.full) + 1):
            got = [ev.seq for ev in self.c.stream(P + "WatchRun",
                                                  {"id": self.run_id, "from_seq": from_seq},
                                                  timeout=60)]
            assert_eq(got, list(range(from_seq, len(self.full) + 1)), "from %d" % from_seq)

    def test_http_max_connections(self):
        # --http-max-connections raises (here: lowers) the HTTP listener's
        # cap on connections in all (256 by default, too few for 1,000 SSE
        # followers): with 3, a fourth open connection is closed at once.
        d = Daemon(self.daemon.binary, os.path.join(self.tmp, "capped"),
                   extra=["--http-listen", "127.0.0.1:0", "--http-max-connections", "3",
                          "--http-max-per-address", "16"])
        c = d.start()
        try:
            host, port = d.http.rsplit(":", 1)
            held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(3)]
            for s in held:  # each is served (the cap counts it)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: kpl\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200"), "a connection under the cap"
            extra = socket.create_connection((host, int(port)), timeout=30)
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: kpl\r\n\r\n")
            try:
                got = extra.recv(65536)
            except ConnectionResetError:
                got = b""
            assert_eq(got, b"", "the connection over the cap: closed without an answer")
            for s in held + [extra]:
                s.close()
        finally:
            c.close()
            assert_eq(d.stop(signal.SIGTERM), 0, "capped kpld's exit status")

    def close(self):
        self.slow.close()
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-fanout-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
