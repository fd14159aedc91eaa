"""kpld and its data directory (security issue #9): one kpld per directory
(a second exits 1 naming the holder's pid; --standby waits and takes over
when the holder dies), a full store (the run fails, kpld stays up and a
restart serves), and reads that never hold the loop for long.

    /usr/bin/python3 tests/e2e/datadir_test.py PATH/TO/kpld

Waiting is on log lines, ready files and WatchRun streams; the stages
coordinate with the test through files.
"""

import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import (P, Client, Daemon, assert_eq, expect_rpc_error,  # noqa: E402
                      run_suite, submit, wait_for_log, watch)


def await_true(fn, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


FLOOD = """
name: flood
stages:
  - name: s
    kind: script
    with: { shell: "yes '' | head -n %d; echo end" }
  - name: after
    kind: script
    needs: [s]
    with: { command: ["true"] }
"""


class HttpDaemon(Daemon):
    """kpld with --http-listen 127.0.0.1:0 (the ready file's second line is
    http=HOST:PORT), for /metrics."""

    def metric(self, name, labels=""):
        host, port = self.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        m = re.search(r"^%s%s (\d+)$" % (re.escape(name), re.escape(labels)), text, re.M)
        return int(m.group(1)) if m else None


class Suite:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.tmp = tmp
        # Stages write only their workspace and what kpld is told to bind
        # (docs/security.md): the files the tests share with them go here.
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
        self.bind = ["--sandbox-bind", self.shared]
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()

    def path(self, name):
        return os.path.join(self.tmp, name)

    # -- one kpld per data directory -------------------------------------

    def test_second_kpld_refused_standby_takes_over(self):
        data = self.path("lock-data")
        os.makedirs(self.path("lock"), exist_ok=True)
        go, marker = self.path("lock/go"), self.path("lock/marker")
        text = """
name: once
stages:
  - name: s
    kind: script
    with:
      shell: |
        echo started
        while [ ! -e %s ]; do sleep 0.05; done
        echo ran >> %s
        echo done
""" % (go, marker)
        # The command writes the marker: kpld lets stages write there.
        a = Daemon(self.binary, data, ["--sandbox-bind", self.path("lock")])
        a.log = self.path("lock/a.log")
        ca = a.start()
        b = None
        try:
            run = Client.to_dict(submit(ca, text))
            wait_for_log(ca, run["id"])

            # A second kpld on the same directory refuses, naming A's pid.
            r = subprocess.run([self.binary, "--listen", "127.0.0.1:0", "--data-dir", data],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            assert_eq(r.returncode, 1, "exit status of a second kpld")
            err = r.stderr.decode()
            if "pid %d" % a.proc.pid not in err or "--standby" not in err:
                raise AssertionError("the refusal does not name pid %d and --standby: %r"
                                     % (a.proc.pid, err))

            want = "standby: waiting for the lock on %s held by pid %d" % (data, a.proc.pid)
            # A standby told to stop while it waits exits 0.
            slog = self.path("lock/s.log")
            logf = open(slog, "w")
            sb = subprocess.Popen([self.binary, "--listen", "127.0.0.1:0", "--data-dir", data,
                                   "--standby"], stdout=logf, stderr=logf)
            logf.close()
            await_true(lambda: want in read(slog) or sb.poll() is not None,
                       "the first standby's waiting line")
            sb.send_signal(signal.SIGTERM)
            assert_eq(sb.wait(timeout=30), 0, "a waiting standby's exit status on SIGTERM")

            # --standby waits: it does not serve while A holds the lock.
            blog, bready = self.path("lock/b.log"), self.path("lock/b.ready")
            logf = open(blog, "w")
            b = subprocess.Popen([self.binary, "--listen", "127.0.0.1:0", "--data-dir", data,
                                  "--ready-file", bready, "--standby"],
                                 stdout=logf, stderr=logf)
            logf.close()
            want = "standby: waiting for the lock on %s held by pid %d" % (data, a.proc.pid)
            await_true(lambda: want in read(blog) or b.poll() is not None,
                       "the standby's waiting line")
            assert_eq(b.poll(), None, "the standby is still running")
            if want not in read(blog):
                raise AssertionError("standby log lacks %r:\n%s" % (want, read(blog)))
            assert_eq(os.path.exists(bready), False, "the standby serves before the lock")
            # A still serves, alone, and its run still runs.
            got = Client.to_dict(ca.call(P + "GetRun", {"id": run["id"]}))
            assert_eq(got["state"], "RUN_STATE_RUNNING", "run state in A")

            # kill -9 A: the standby takes over at once (the shim, still
            # running the command, does not hold the lock) and resumes the run.
            ca.close()
            a.stop(signal.SIGKILL)
            await_true(lambda: os.path.exists(bready) or b.poll() is not None,
                       "the standby to serve")
            assert_eq(b.poll(), None, "the standby is running")
            cb = Client.connect(open(bready).read().strip())
            try:
                open(go, "w").close()
                events = watch(cb, run["id"])
                assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "run end")
                lines = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
                assert_eq(lines, ["started", "done"], "log lines, each once")
                assert_eq(read(marker), "ran\n", "the command ran exactly once")
            finally:
                cb.close()
            b.send_signal(signal.SIGTERM)
            assert_eq(b.wait(timeout=30), 0, "the standby's exit status on SIGTERM")
            b = None
        finally:
            if a.proc:
                a.stop(signal.SIGKILL)
            if b:
                b.kill()
                b.wait()

    # -- a full store ------------------------------------------------------

    def shared_path(self, name):
        return os.path.join(self.shared, name)

    def _daemon(self, name, extra):
        d = Daemon(self.binary, self.path(name + "-data"), extra + self.bind)
        d.log = self.path(name + ".log")
        return d

    def test_log_cap_counts_each_events_bytes(self):
        # 100000 empty lines against a 64 KiB cap: each costs its event
        # record in the store (~100+ bytes), not 1 byte, so only a few
        # hundred are kept before the cut note (the old count kept 65535).
        d = self._daemon("cap", ["--log-cap", "64K"])
        c = d.start()
        try:
            run = Client.to_dict(submit(c, FLOOD % 100000))
            events = watch(c, run["id"])
            logs = [e for e in events if e.get("kind") == "EVENT_KIND_LOG"]
            empty = [e for e in logs if not e.get("message")]
            if not 100 <= len(empty) <= 65536 // 80:
                raise AssertionError("%d empty lines kept under a 64 KiB cap" % len(empty))
            assert_eq(logs[-1].get("message"),
                      "log cut here: this attempt's log reached the cap of 65536 bytes; "
                      "later lines were not kept", "the cut note")
            assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                      "a cut log does not fail the run")
        finally:
            c.close()
            d.stop()

    def test_full_store_fails_the_run_not_kpld(self):
        # A 4 MiB store (512 KiB of it the reserve) and runs of at most
        # 2 MiB of events: the first flood stops at its budget, the
        # second at the store's limit; then submits are refused, reads
        # work, and a restart serves; retention frees room.
        d = self._daemon("full", ["--map-size", "4M", "--run-budget", "2M"])
        c = d.start()
        try:
            a1 = Client.to_dict(submit(c, FLOOD % 1000000))
            ev1 = watch(c, a1["id"])
            got = Client.to_dict(c.call(P + "GetRun", {"id": a1["id"]}))
            budget = "the run's events reached its budget of 2097152 bytes in the store"
            assert_eq((got["state"], got.get("message")), ("RUN_STATE_FAILED", budget),
                      "run over its budget")
            assert_eq([(s["name"], s["state"], s.get("message")) for s in got["stages"]],
                      [("s", "STAGE_STATE_FAILED", budget),
                       ("after", "STAGE_STATE_CANCELLED", budget)], "its stages")
            if ev1[-1].get("run_state") != "RUN_STATE_FAILED":
                raise AssertionError("last event: %r" % ev1[-1])

            a2 = Client.to_dict(submit(c, FLOOD % 1000000))
            watch(c, a2["id"])
            got = Client.to_dict(c.call(P + "GetRun", {"id": a2["id"]}))
            assert_eq(got["state"], "RUN_STATE_FAILED", "second flood")
            if not got.get("message", "").startswith("the store is full: "):
                raise AssertionError("second flood's message: %r" % got.get("message"))
            if "--map-size" not in got["message"]:
                raise AssertionError("the message does not say what to do: %r"
                                     % got["message"])

            # New runs are refused; reads, watches and health go on.
            expect_rpc_error(lambda: submit(c, "name: small\nstages:\n  - name: a\n"
                                            "    kind: noop\n"),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, "the store is full")
            # So are other writes that grow the store (a secret may be 64 KiB).
            expect_rpc_error(lambda: c.call(P + "SetSecret", {"name": "BIG",
                                                              "value": "x" * 4000}),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, "the store is full")
            runs = Client.to_dict(c.call(P + "ListRuns", {})).get("runs", [])
            assert_eq(sorted(r["id"] for r in runs), sorted([a1["id"], a2["id"]]), "ListRuns")
            assert_eq(len(watch(c, a1["id"])), len(ev1), "WatchRun of the first flood")
            assert_eq(c.health_check(""), "SERVING", "health")
            c.close()
            assert_eq(d.stop(), 0, "kpld stops clean on a full store")

            # A restart on the full store serves; retention (keep 1 run)
            # deletes the first flood and makes room for new runs.
            d.extra += ["--retain-runs", "1"]
            c = d.start()
            await_true(lambda: len(Client.to_dict(c.call(P + "ListRuns", {}))
                                   .get("runs", [])) == 1, "retention to delete a run")
            ok = Client.to_dict(submit(c, "name: small\nstages:\n  - name: a\n"
                                          "    kind: script\n"
                                          "    with: { command: [\"echo\", \"hi\"] }\n"))
            events = watch(c, ok["id"])
            assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "a run after the sweep")
            if "full" in read(d.log) and "Aborted" in read(d.log):
                raise AssertionError("kpld aborted")
        finally:
            c.close()
            if d.proc:
                d.stop()

    def _fill_map(self, data):
        """Fills the LMDB map under kpld's feet (another process, as LMDB
        allows: mdb_load into a database of its own) until not even a
        512-byte record fits: kpld's next commit gets MDB_MAP_FULL whatever
        its own accounting said."""
        n = 0
        for size in (65536, 8192, 1024, 512):
            while True:
                dump = ("VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\n"
                        " %s\n %s\nDATA=END\n" % (("k%06d" % n).encode().hex(),
                                                    ("v" * size).encode().hex()))
                r = subprocess.run(["mdb_load", "-s", "filler", data], input=dump,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    if "MDB_MAP_FULL" not in r.stderr:
                        raise AssertionError("mdb_load: %s" % r.stderr)
                    break
                n += 1
        return n

    def test_map_full_commit_fails_the_run_not_kpld(self):
        # A commit that LMDB refuses (the map filled by another process)
        # used to abort() kpld. Now the run's commit failure is logged, the
        # run stops, kpld serves on; restarted with a larger --map-size, it
        # resumes the run from what the store has (the command had ended:
        # its exit is read back) and runs the rest, each command once.
        data = self.path("mapfull-data")
        go, marker = self.shared_path("mapfull-go"), self.shared_path("mapfull-marker")
        text = """
name: waits
stages:
  - name: s
    kind: script
    with:
      shell: |
        echo up
        while [ ! -e %s ]; do sleep 0.05; done
        echo ran >> %s
  - name: t
    kind: script
    needs: [s]
    with: { command: ["echo", "t"] }
""" % (go, marker)
        d = Daemon(self.binary, data, ["--map-size", "1M"] + self.bind)
        d.log = self.path("mapfull.log")
        c = d.start()
        try:
            run = Client.to_dict(submit(c, text))
            wait_for_log(c, run["id"])
            if self._fill_map(data) < 1:
                raise AssertionError("the filler took nothing")
            # A change that could not be stored is not reported stored (its
            # write went in the audit entry's commit, which failed).
            value = "\n".join(["v" * 4000] * 15)
            expect_rpc_error(lambda: c.call(P + "SetSecret", {"name": "LOST", "value": value}),
                             grpc.StatusCode.INTERNAL, "could not be stored")
            names = [x["name"] for x in Client.to_dict(c.call(P + "ListSecrets", {}))
                     .get("secrets", [])]
            assert_eq("LOST" in names, False, "a secret that was not stored is listed")
            open(go, "w").close()
            want = "run %s: commit failed: the store is full" % run["id"]
            await_true(lambda: want in read(d.log) or d.proc.poll() is not None,
                       "the commit failure in kpld's log")
            assert_eq(d.proc.poll(), None, "kpld is running")
            assert_eq(c.health_check(""), "SERVING", "health")
            got = Client.to_dict(c.call(P + "GetRun", {"id": run["id"]}))
            assert_eq(got["id"], run["id"], "GetRun")
            c.close()
            assert_eq(d.stop(), 0, "exit status on SIGTERM")

            d.extra = ["--map-size", "8M"] + self.bind
            c = d.start()
            events = watch(c, run["id"])
            assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "run end")
            assert_eq([int(e["seq"]) for e in events], list(range(1, len(events) + 1)),
                      "seqs without a gap")
            lines = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
            assert_eq(lines, ["up", "t"], "the log, each line once")
            assert_eq(read(marker), "ran\n", "the command ran once")
            if "Aborted" in read(d.log) or "BUG" in read(d.log):
                raise AssertionError("kpld aborted:\n" + read(d.log)[-3000:])
        finally:
            c.close()
            if d.proc:
                d.stop()

    # -- reads that never hold the loop ---------------------------------

    def test_reads_do_bounded_work_per_loop_turn(self):
        # A running run with 20000 log lines written after its run record:
        # GetRun seeks to its last event instead of decoding each, and a
        # WatchRuns whose filter matches none of them reads the global log
        # a batch per loop turn (kpl_watch_runs_scan_max <= 512).
        d = HttpDaemon(self.binary, self.path("reads-data"),
                       ["--http-listen", "127.0.0.1:0"] + self.bind)
        d.log = self.path("reads.log")
        c = d.start()
        go = self.shared_path("reads-go")
        n = 20000
        text = """
name: lines
stages:
  - name: s
    kind: script
    with:
      shell: |
        seq %d
        while [ ! -e %s ]; do sleep 0.05; done
""" % (n, go)
        stream = None
        try:
            run = Client.to_dict(submit(c, text))
            last = None
            s = c.stream(P + "WatchRun", {"id": run["id"]}, timeout=120)
            for ev in s:
                ev = Client.to_dict(ev)
                if ev.get("message") == str(n):
                    last = int(ev["seq"])
                    s.cancel()
                    break
            before = d.metric("kpl_api_events_read_total", '{method="GetRun"}') or 0
            got = Client.to_dict(c.call(P + "GetRun", {"id": run["id"]}))
            assert_eq(got["state"], "RUN_STATE_RUNNING", "run state")
            assert_eq(int(got["last_seq"]), last, "GetRun last_seq")
            assert_eq(d.metric("kpl_api_events_read_total", '{method="GetRun"}'), before,
                      "events GetRun decoded")

            stream = c.stream(P + "WatchRuns", {"from_global_seq": 1,
                                                "pipeline_name": "nomatch"}, timeout=120)
            # The stream sends nothing; the scan shows in the metrics.
            await_true(lambda: (d.metric("kpl_api_events_read_total",
                                         '{method="WatchRuns"}') or 0) >= last,
                       "WatchRuns to read the whole global log", timeout=60)
            scan_max = d.metric("kpl_watch_runs_scan_max")
            if not 0 < scan_max <= 512:
                raise AssertionError("a WatchRuns stream read %d records in one loop turn"
                                     % scan_max)
            assert_eq(c.health_check(""), "SERVING", "health while it scans")
            stream.cancel()
            stream = None
            open(go, "w").close()
            assert_eq(watch(c, run["id"])[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                      "the run ends")
        finally:
            if stream:
                stream.cancel()
            c.close()
            d.stop()

    def close(self):
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-datadir-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
