"""server_test.py - api/server.c end to end, through tests/api/echo_server.

Usage: /usr/bin/python3 server_test.py path/to/echo_server

Starts the server on 127.0.0.1:0, reads "PORT=n", and drives it with
tests/lib/kplgrpc.py, which learns every type by server reflection. The last
test sends SIGTERM and expects exit 0 (loop closed clean, no handler left).
"""

import os
import select
import signal
import subprocess
import sys
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import kplgrpc  # noqa: E402

SERVER = None  # path to echo_server, from argv
# Deadlines for conditions awaited from the server; valgrind makes the server
# some 20 times slower, and CI machines are shared.
TIMEOUT = 60.0 if os.environ.get("KPL_TEST_UNDER_VALGRIND") else 10.0

PIPELINES = "kpl.v1.Pipelines"
HEALTH = "grpc.health.v1.Health"
REFL_V1A = "grpc.reflection.v1alpha.ServerReflection"
REFL_V1 = "grpc.reflection.v1.ServerReflection"


def read_line(proc, timeout):
    """One line of proc's stdout, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no line from the server within %.0fs (got %r)" % (timeout, buf))
        r, _, _ = select.select([fd], [], [], left)
        if r:
            ch = os.read(fd, 1)
            if not ch:
                raise AssertionError("server closed stdout (exit %s), got %r" % (proc.poll(), buf))
            buf += ch
    return buf.decode().strip()


def wait_until(pred, timeout=TIMEOUT, what="condition"):
    """Polls pred until true (a condition wait with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


class ServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proc = subprocess.Popen([SERVER, "127.0.0.1:0"], stdout=subprocess.PIPE)
        line = read_line(cls.proc, TIMEOUT)
        assert line.startswith("PORT="), line
        cls.port = int(line[5:])
        assert cls.port > 0, line
        cls.addr = "127.0.0.1:%d" % cls.port
        cls.c = kplgrpc.Client.connect(cls.addr, timeout=TIMEOUT)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        if cls.proc.poll() is None:
            cls.proc.kill()
            cls.proc.wait()

    def stats(self):
        msg = self.c.call(PIPELINES + "/GetRun", {"id": "stats"}).message
        return dict(kv.split("=") for kv in msg.split())

    def assertCode(self, ctx, code, details_has=None):
        e = ctx.exception
        self.assertEqual(e.code(), code, e.details())
        if details_has is not None:
            self.assertIn(details_has, e.details())

    # --- Start-up errors. ---

    def test_00_listen_errors(self):
        """A port in use (even by another kpld) or a bad address fails
        start-up with a message naming the address."""
        for addr in [self.addr, "not an address"]:
            p = subprocess.run([SERVER, addr], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=TIMEOUT)
            self.assertEqual(p.returncode, 1, p.stdout)
            self.assertIn(("listen %s: cannot bind" % addr).encode(), p.stderr)
            self.assertNotIn(b"PORT=", p.stdout)
        self.assertEqual(self.c.health_check(), "SERVING")

    # --- Health. ---

    def test_01_health_check(self):
        for svc in ["", PIPELINES, HEALTH, REFL_V1A, REFL_V1]:
            self.assertEqual(self.c.health_check(svc), "SERVING", svc)
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.health_check("kpl.v1.Nope")
        self.assertCode(ctx, grpc.StatusCode.NOT_FOUND, "kpl.v1.Nope")

    def test_02_health_watch(self):
        w = self.c.health_watch("")
        names = (self.c.health_status_name(r) for r in w)
        self.assertEqual(next(names), "SERVING")
        self.c.call(PIPELINES + "/CancelRun", {"id": "not-serving"})
        self.assertEqual(next(names), "NOT_SERVING")
        self.assertEqual(self.c.health_check(PIPELINES), "NOT_SERVING")
        self.c.call(PIPELINES + "/CancelRun", {"id": "serving"})
        self.assertEqual(next(names), "SERVING")
        w.cancel()
        self.assertEqual(self.c.health_check(""), "SERVING")

        u = self.c.health_watch("kpl.v1.Nope")
        self.assertEqual(self.c.health_status_name(next(iter(u))), "SERVICE_UNKNOWN")
        u.cancel()

    # --- Reflection. ---

    def test_10_list_services(self):
        want = {PIPELINES, HEALTH, REFL_V1A, REFL_V1}
        self.assertEqual(set(self.c.list_services()), want)
        with kplgrpc.Client(self.addr, reflection=kplgrpc.REFLECTION_V1) as v1:
            self.assertEqual(set(v1.list_services()), want)

    def test_11_file_containing_symbol(self):
        files = self.c.file_containing_symbol(PIPELINES)
        self.assertEqual([f.name for f in files], ["api/kpl.proto", "google/protobuf/timestamp.proto"])
        self.assertEqual(files[0].package, "kpl.v1")
        self.assertIn("Pipelines", [s.name for s in files[0].service])
        for sym in ["kpl.v1.Pipelines.GetRun", "kpl.v1.Run", "kpl.v1.Run.ParamsEntry",
                    "kpl.v1.StageStatus.OutputsEntry", "kpl.v1.RunState", ".kpl.v1.RunEvent"]:
            self.assertEqual([f.name for f in self.c.file_containing_symbol(sym)][0],
                             "api/kpl.proto", sym)
        self.assertEqual([f.name for f in self.c.file_containing_symbol("google.protobuf.Timestamp")],
                         ["google/protobuf/timestamp.proto"])
        health = self.c.file_containing_symbol("grpc.health.v1.HealthCheckResponse.ServingStatus")
        self.assertEqual([f.package for f in health], ["grpc.health.v1"])
        for sym in ["kpl.v1.Nope", "kpl.v1.Pipelines.Nope", "kpl", ""]:
            with self.assertRaises(kplgrpc.ReflectionError) as ctx:
                self.c.file_containing_symbol(sym)
            self.assertEqual(ctx.exception.code, 5, sym)

    def test_12_file_by_filename(self):
        names = [f.name for f in self.c.file_by_filename("api/kpl.proto")]
        self.assertEqual(names, ["api/kpl.proto", "google/protobuf/timestamp.proto"])
        self.assertEqual(len(names), len(set(names)))
        with self.assertRaises(kplgrpc.ReflectionError) as ctx:
            self.c.file_by_filename("api/nope.proto")
        self.assertEqual(ctx.exception.code, 5)
        self.assertIn("api/nope.proto", ctx.exception.message)

    def test_13_extensions_unimplemented_and_echoes(self):
        ext = self.c._refl.message_class(kplgrpc.REFLECTION_V1ALPHA + ".ExtensionRequest")
        resps = self.c.reflect([
            {"host": "h1", "file_containing_extension": ext(containing_type="kpl.v1.Run",
                                                            extension_number=100)},
            {"host": "h2", "all_extension_numbers_of_type": "kpl.v1.Run"},
            {"host": "h3", "list_services": "*"},
            {"host": "h4", "file_containing_symbol": "kpl.v1.Run"},
        ])
        self.assertEqual(len(resps), 4)
        self.assertEqual([r.valid_host for r in resps], ["h1", "h2", "h3", "h4"])
        self.assertEqual([r.original_request.host for r in resps], ["h1", "h2", "h3", "h4"])
        self.assertEqual(resps[0].error_response.error_code, 12)
        self.assertEqual(resps[0].original_request.file_containing_extension.extension_number, 100)
        self.assertEqual(resps[1].error_response.error_code, 12)
        self.assertEqual(resps[2].original_request.list_services, "*")
        self.assertEqual(resps[2].WhichOneof("message_response"), "list_services_response")
        self.assertEqual(resps[3].original_request.file_containing_symbol, "kpl.v1.Run")
        self.assertEqual(len(resps[3].file_descriptor_response.file_descriptor_proto), 2)

    def test_14_reflection_v1(self):
        with kplgrpc.Client(self.addr, reflection=kplgrpc.REFLECTION_V1) as v1:
            files = v1.file_containing_symbol(REFL_V1)
            self.assertEqual(files[0].package, "grpc.reflection.v1")
            m = files[0].service[0].method[0]
            self.assertEqual(m.input_type, ".grpc.reflection.v1.ServerReflectionRequest")
            v1.add_files(files)  # a consistent file: it loads
            self.assertEqual(v1.method(REFL_V1 + "/ServerReflectionInfo")[0],
                             "/" + REFL_V1 + "/ServerReflectionInfo")
            self.assertEqual([f.name for f in v1.file_containing_symbol(PIPELINES)][0],
                             "api/kpl.proto")

    def test_15_reflection_stream_cancelled(self):
        """A reflection stream the client abandons midway."""
        req = self.c.reflection_request(list_services="")
        gate = threading.Event()

        def requests():
            yield req
            gate.wait(TIMEOUT)  # keep the stream open, never half-close

        call = self.c._refl_rpc(requests(), timeout=TIMEOUT)
        first = next(call)
        self.assertEqual(first.WhichOneof("message_response"), "list_services_response")
        call.cancel()
        gate.set()
        self.assertEqual(set(self.c.list_services()), {PIPELINES, HEALTH, REFL_V1A, REFL_V1})

    # --- Calls. ---

    def test_20_unary(self):
        run = self.c.call(PIPELINES + "/GetRun", {"id": "r-42"}, metadata=[("x-echo", "hello")])
        self.assertEqual(run.id, "r-42")
        self.assertEqual(run.pipeline_name, "echo")
        self.assertEqual(run.message, "hello")
        self.assertEqual(self.c.to_dict(run)["state"], "RUN_STATE_SUCCEEDED")
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.call(PIPELINES + "/GetRun", {"id": "missing"})
        self.assertCode(ctx, grpc.StatusCode.NOT_FOUND, 'run "missing" not found')

    def test_21_unary_async(self):
        run = self.c.call(PIPELINES + "/GetRun", {"id": "slow-1"})
        self.assertEqual((run.id, run.message), ("slow-1", "slow"))

    def test_22_deadline_before_async_reply(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.call(PIPELINES + "/GetRun", {"id": "slow-late"}, timeout=0.002)
        self.assertCode(ctx, grpc.StatusCode.DEADLINE_EXCEEDED)
        # The handler replies later to a dead call; the server does not mind.
        wait_until(lambda: self.stats()["live"] == "0", what="slow handler to finish")
        self.assertEqual(self.c.call(PIPELINES + "/GetRun", {"id": "after"}).id, "after")

    def test_23_stream(self):
        evs = list(self.c.stream(PIPELINES + "/WatchRun", {"id": "r-7", "from_seq": 7}))
        self.assertEqual([e.seq for e in evs], list(range(1, 8)))
        self.assertTrue(all(e.run_id == "r-7" for e in evs))
        self.assertEqual(list(self.c.stream(PIPELINES + "/WatchRun", {"id": "r-0"})), [])
        call = self.c.stream(PIPELINES + "/WatchRun", {"id": "r-3", "from_seq": 3})
        self.assertEqual(len(list(call)), 3)
        self.assertEqual(call.code(), grpc.StatusCode.OK)

    def test_23b_end_with_send_in_flight(self):
        call = self.c.stream(PIPELINES + "/WatchRun", {"id": "reply-last"})
        self.assertEqual([e.seq for e in call], [1, 2])
        self.assertEqual(call.code(), grpc.StatusCode.OK)
        call = self.c.stream(PIPELINES + "/WatchRun", {"id": "finish-early"})
        self.assertEqual([e.seq for e in call], [1])
        self.assertEqual(call.code(), grpc.StatusCode.OK)
        wait_until(lambda: self.stats()["live"] == "0", what="stream handlers to end")

    def test_20b_fail_err_and_long_message(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.call(PIPELINES + "/GetRun", {"id": "err"})
        self.assertCode(ctx, grpc.StatusCode.FAILED_PRECONDITION, 'run "err" is finished')
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.call(PIPELINES + "/GetRun", {"id": "long"})
        self.assertCode(ctx, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(ctx.exception.details(), "m" * 1024)

    def test_24_unknown_method(self):
        for path in ["/kpl.v1.Pipelines/Nope", "/kpl.v9.Other/Thing"]:
            with self.assertRaises(grpc.RpcError) as ctx:
                self.c.raw_call(path, b"")
            self.assertCode(ctx, grpc.StatusCode.UNIMPLEMENTED, path)

    def test_25_undecodable_request(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.raw_call("/kpl.v1.Pipelines/GetRun", b"\x0a\xff\xff\xff\xff\x0f")
        self.assertCode(ctx, grpc.StatusCode.INVALID_ARGUMENT,
                        "request does not decode as kpl.v1.GetRunRequest")

    def test_26_oversize_request(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.c.call(PIPELINES + "/GetRun", {"id": "x" * (5 * 1024 * 1024)})
        self.assertCode(ctx, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.c.call(PIPELINES + "/GetRun", {"id": "still-here"}).id, "still-here")
        # Just under the limit is served.
        big = "y" * (4 * 1024 * 1024 - 64)
        self.assertEqual(len(self.c.call(PIPELINES + "/GetRun", {"id": big}).id), len(big))

    def test_27_stream_cancelled_by_client(self):
        before = int(self.stats()["cancels"])
        call = self.c.stream(PIPELINES + "/WatchRun", {"id": "forever"})
        seqs = [next(call).seq for _ in range(5)]
        self.assertEqual(seqs, [1, 2, 3, 4, 5])
        call.cancel()
        with self.assertRaises(grpc.RpcError) as ctx:
            for _ in call:
                pass
        self.assertCode(ctx, grpc.StatusCode.CANCELLED)
        # The handler hears of it (api_call_on_cancel, or its next send
        # failing: grpc completes the two in either order) and ends the call.
        # >=: a stream an earlier test left may end (and count) meanwhile.
        wait_until(lambda: int(self.stats()["cancels"]) >= before + 1, what="server-side cancel")
        wait_until(lambda: self.stats()["live"] == "0", what="stream handler to end")
        self.assertEqual(self.c.call(PIPELINES + "/GetRun", {"id": "ok"}).id, "ok")

    def test_28_concurrent_unary(self):
        clients = [kplgrpc.Client.connect(self.addr) for _ in range(4)]
        try:
            ids = ["slow-%d" % i if i % 2 else "fast-%d" % i for i in range(64)]
            futs = [clients[i % 4].call_future(PIPELINES + "/GetRun", {"id": id_})
                    for i, id_ in enumerate(ids)]
            got = [f.result(timeout=TIMEOUT).id for f in futs]
            self.assertEqual(got, ids)
            # Concurrent streams and unary calls on one connection.
            streams = [self.c.stream(PIPELINES + "/WatchRun", {"id": "s%d" % i, "from_seq": 20})
                       for i in range(8)]
            futs = [self.c.call_future(PIPELINES + "/GetRun", {"id": "u%d" % i}) for i in range(32)]
            for i, s in enumerate(streams):
                self.assertEqual([e.seq for e in s], list(range(1, 21)), i)
            self.assertEqual([f.result(timeout=TIMEOUT).id for f in futs],
                             ["u%d" % i for i in range(32)])
        finally:
            for c in clients:
                c.close()

    # --- Shutdown with calls in flight. ---

    def test_99_sigterm(self):
        stream = self.c.stream(PIPELINES + "/WatchRun", {"id": "forever"})
        self.assertEqual(next(stream).seq, 1)
        watch = self.c.health_watch("")
        self.assertEqual(self.c.health_status_name(next(watch)), "SERVING")
        self.proc.send_signal(signal.SIGTERM)
        # Both streams end (the handlers got their cancel and finished).
        for call in (stream, watch):
            with self.assertRaises(grpc.RpcError) as ctx:
                for _ in call:
                    pass
            self.assertIn(ctx.exception.code(),
                          (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE))
        rc = self.proc.wait(timeout=TIMEOUT)
        rest = self.proc.stdout.read().decode()
        self.assertEqual(rc, 0, rest)
        self.assertIn("STOPPED=1 LIVE=0 LOOP_CLOSE=0", rest)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: server_test.py path/to/echo_server")
    SERVER = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
