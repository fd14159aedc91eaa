"""Resource limits of kpld (docs/security.md, "Limits"), end to end: the
caps on open streaming calls per connection and in all (health Watch, which
needs no token, counts; the last one past a cap gets RESOURCE_EXHAUSTED and
closing one frees its slot), the token checked before a request is read
(an undecodable request without a token is UNAUTHENTICATED, not
INVALID_ARGUMENT), and the HTTP listener's deadline for a whole request (a
client sending a byte now and then gets 408 and is closed) and its cap on
connections from one address.

    /usr/bin/python3 tests/e2e/limits_test.py PATH/TO/kpld
"""

import os
import socket
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import LONG, P, Client, assert_eq, run_suite  # noqa: E402
from hooks_test import HookDaemon  # noqa: E402

PER_CONN, TOTAL, PER_ADDR = 3, 5, 4
HEALTH_WATCH = "grpc.health.v1.Health/Watch"


def first(stream):
    """The first message of a stream; raises grpc.RpcError if it failed."""
    return next(iter(stream))


def exhausted(open_stream):
    """True if the stream opened by open_stream() fails RESOURCE_EXHAUSTED
    (it is cancelled either way)."""
    s = open_stream()
    try:
        first(s)
        return False
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        if "too many open streams" not in (e.details() or ""):
            raise AssertionError("RESOURCE_EXHAUSTED without a reason: %r" % e.details())
        return True
    finally:
        s.cancel()


def await_admitted(open_stream, what):
    """Opens streams until one is admitted (the server frees a slot when it
    has seen the cancel); returns it."""
    deadline = time.monotonic() + 20
    while True:
        s = open_stream()
        try:
            first(s)
            return s
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("%s: no slot freed within 20 s" % what)
        time.sleep(0.05)


def await_closed(sock, limit=30):
    """Reads until the peer closes; returns what it sent. Fails if the
    socket stays open past limit seconds (the slow client was never cut)."""
    sock.settimeout(limit)
    got = b""
    try:
        while True:
            b = sock.recv(4096)
            if not b:
                return got
            got += b
    except socket.timeout:
        raise AssertionError("the connection is still open after %d s; got %r" % (limit, got))
    except ConnectionResetError:
        return got


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        token_file = os.path.join(tmp, "admin.token")
        self.daemon = HookDaemon(binary, os.path.join(tmp, "data"), [
            "--http-listen", "127.0.0.1:0", "--bootstrap-token-file", token_file,
            "--max-streams-per-conn", str(PER_CONN), "--max-streams", str(TOTAL),
            "--http-request-timeout", "1", "--http-max-per-address", str(PER_ADDR)])
        self.daemon.start().close()
        self.token = open(token_file).read().strip()
        self.c = self.connect()
        host, port = self.daemon.http.rsplit(":", 1)
        self.http = (host, int(port))

    def connect(self):
        # A connection of its own (grpc shares one between channels to the
        # same address unless told not to).
        return Client.connect(self.daemon.addr, token=self.token,
                              options=[("grpc.use_local_subchannel_pool", 1)])

    # -- tests ----------------------------------------------------------

    def test_stream_caps(self):
        a, b = self.c, self.connect()
        run = Client.to_dict(a.call(P + "SubmitRun", {"pipeline": LONG}))
        # Types first: reflection is a stream too.
        for c in (a, b):
            c.method(HEALTH_WATCH)
            c.method(P + "WatchRun")
        opened = []
        try:
            # Health Watch needs no token, and counts.
            for _ in range(PER_CONN):
                s = a.stream(HEALTH_WATCH, {"service": ""}, timeout=60)
                first(s)
                opened.append(s)
            if not exhausted(lambda: a.stream(HEALTH_WATCH, {"service": ""}, timeout=60)):
                raise AssertionError("stream %d on one connection was let through" % (PER_CONN + 1))
            if not exhausted(lambda: a.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)):
                raise AssertionError("a WatchRun past the cap was let through")
            # Closing one frees its slot.
            opened.pop(0).cancel()
            opened.append(await_admitted(
                lambda: a.stream(P + "WatchRun", {"id": run["id"]}, timeout=60),
                "per connection"))
            # Another connection has its own count, up to the total.
            for _ in range(TOTAL - PER_CONN):
                s = b.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
                first(s)
                opened.append(s)
            if not exhausted(lambda: b.stream(HEALTH_WATCH, {"service": ""}, timeout=60)):
                raise AssertionError("stream %d in all was let through" % (TOTAL + 1))
            # Unary calls are not streams: still answered.
            assert_eq(a.health_check(), "SERVING", "health Check at the cap")
            opened.pop().cancel()
            opened.append(await_admitted(
                lambda: b.stream(HEALTH_WATCH, {"service": ""}, timeout=60), "in all"))
        finally:
            for s in opened:
                s.cancel()
            a.call(P + "CancelRun", {"id": run["id"]}, timeout=60)
            b.close()

    def test_token_checked_before_the_request_is_read(self):
        # Not a GetRunRequest: without a token, this used to be decoded
        # first (INVALID_ARGUMENT); now the token is what is checked.
        bad = b"\xff\xff\xff\xff"
        anon = Client.connect(self.daemon.addr)
        try:
            anon.raw_call("/kpl.v1.Pipelines/GetRun", bad)
            raise AssertionError("a call without a token went through")
        except grpc.RpcError as e:
            assert_eq(e.code(), grpc.StatusCode.UNAUTHENTICATED, "status without a token")
        finally:
            anon.close()
        try:
            self.c.raw_call("/kpl.v1.Pipelines/GetRun", bad)
            raise AssertionError("an undecodable request went through")
        except grpc.RpcError as e:
            assert_eq(e.code(), grpc.StatusCode.INVALID_ARGUMENT, "status with a token")

    def test_http_slow_request_gets_408(self):
        s = socket.create_connection(self.http)
        try:
            # One byte at a time, each well within the idle timeout (10 s):
            # only the request's own deadline (1 s here) can end this.
            s.sendall(b"G")
            s.settimeout(0.3)
            got = b""
            for ch in b"ET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                try:
                    s.send(bytes([ch]))
                    got = s.recv(4096)
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if got:
                    break
            got += await_closed(s)
            if not got.startswith(b"HTTP/1.1 408 "):
                raise AssertionError("the slow request got %r, want a 408" % got[:80])
        finally:
            s.close()

    def test_http_connections_per_address(self):
        held = [socket.create_connection(self.http) for _ in range(PER_ADDR)]
        try:
            # One more from the same address is closed unanswered.
            extra = socket.create_connection(self.http)
            try:
                try:
                    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                got = await_closed(extra)
                assert_eq(got, b"", "what the connection past the cap got")
            finally:
                extra.close()
            # The ones held are still served.
            s = held[0]
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            resp = s.recv(4096)
            if not resp.startswith(b"HTTP/1.1 200 "):
                raise AssertionError("a held connection got %r" % resp[:80])
            # One closed: a new one is served again.
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:
                n = socket.create_connection(self.http)
                n.settimeout(10)
                try:
                    n.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    resp = n.recv(4096)
                except ConnectionResetError:
                    resp = b""
                n.close()
                if resp.startswith(b"HTTP/1.1 200 "):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("no slot freed after a close: %r" % resp[:80])
                time.sleep(0.05)
        finally:
            for s in held:
                s.close()

    def close(self):
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-limits-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
