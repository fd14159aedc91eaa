"""End-to-end test of kpld through its gRPC API, with a client that learns
every type by server reflection (tests/lib/kplgrpc.py over Debian's grpcio).

    /usr/bin/python3 tests/e2e/e2e_test.py PATH/TO/kpld

Each test starts from the daemon the suite started (a fresh data directory
on an ephemeral loopback port); the restart tests stop and start it. Waiting
is done on the WatchRun stream, never with sleeps.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

TWO_STAGES = """
name: two-stage
params:
  greeting: { default: "hi" }
stages:
  - name: build
    kind: script
    with: { command: ["sh", "-c", "echo greeting=$KPL_PARAM_GREETING"] }
  - name: test
    kind: script
    needs: [build]
    with: { command: ["true"] }
"""

LONG = """
name: long
stages:
  - name: sleepy
    kind: script
    with:
      shell: |
        sh -c 'sleep 300; :' "kpl-sleeper-$KPL_RUN_ID" &
        echo started
        wait
  - name: after
    kind: script
    needs: [sleepy]
    with: { command: ["true"] }
"""


class Daemon:
    """kpld on 127.0.0.1:0 with a data directory that outlives restarts."""

    def __init__(self, binary, data_dir, extra=()):
        self.binary = binary
        self.data_dir = data_dir
        self.extra = list(extra)
        self.proc = None
        self.addr = None
        self.log = os.path.join(os.path.dirname(data_dir), "kpld.log")

    def start(self):
        ready = os.path.join(self.data_dir + ".ready")
        if os.path.exists(ready):
            os.unlink(ready)
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir,
             "--ready-file", ready] + self.extra,
            stdout=logf, stderr=logf)
        logf.close()
        # kpld writes the ready file (atomically) once it serves.
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise AssertionError("kpld exited with %s before serving; log:\n%s"
                                     % (self.proc.returncode, open(self.log).read()))
            if time.monotonic() > deadline:
                raise AssertionError("kpld did not serve within 30 s")
            time.sleep(0.02)
        # The first line is the gRPC address; with --http-listen a second
        # line says http=HOST:PORT.
        lines = open(ready).read().splitlines()
        self.addr = lines[0].strip()
        self.http = next((ln[5:] for ln in lines[1:] if ln.startswith("http=")), None)
        return Client.connect(self.addr)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc


def submit(c, text, params=None, key=""):
    return c.call(P + "SubmitRun", {"pipeline": text, "params": params or {},
                                    "idempotency_key": key})


def watch(c, run_id, from_seq=0, limit=None):
    """Events of a run as dicts, until the stream ends (or limit events)."""
    out = []
    stream = c.stream(P + "WatchRun", {"id": run_id, "from_seq": from_seq}, timeout=60)
    for ev in stream:
        out.append(Client.to_dict(ev))
        if limit is not None and len(out) >= limit:
            stream.cancel()
            break
    return out


def wait_for_log(c, run_id):
    """Follows the run's events as they come and returns at its first log
    line (the stage is running then)."""
    stream = c.stream(P + "WatchRun", {"id": run_id}, timeout=60)
    for ev in stream:
        ev = Client.to_dict(ev)
        if ev.get("kind") == "EVENT_KIND_LOG":
            stream.cancel()
            return ev
    raise AssertionError("run %s ended without a log line" % run_id)


def seqs(events):
    return [int(e["seq"]) for e in events]


def assert_eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def expect_rpc_error(fn, code, contains=""):
    try:
        fn()
    except grpc.RpcError as e:
        assert_eq(e.code(), code, "status code")
        if contains and contains not in (e.details() or ""):
            raise AssertionError("status message %r lacks %r" % (e.details(), contains))
        return e
    raise AssertionError("expected %s, the call succeeded" % code)


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        # Stages write only their workspace and what kpld is told to bind
        # (docs/security.md): the files the tests share with them go here.
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             ["--sandbox-bind", self.shared])
        self.c = self.daemon.start()
        self.runs = {}

    # -- tests ----------------------------------------------------------

    def test_reflection_and_health(self):
        services = self.c.list_services()
        for s in ("kpl.v1.Pipelines", "grpc.health.v1.Health",
                  "grpc.reflection.v1alpha.ServerReflection"):
            if s not in services:
                raise AssertionError("%s not listed: %r" % (s, services))
        assert_eq(self.c.health_check(""), "SERVING", "health of the server")
        assert_eq(self.c.health_check("kpl.v1.Pipelines"), "SERVING", "health of Pipelines")

    def test_submit_and_watch_to_success(self):
        run = Client.to_dict(submit(self.c, TWO_STAGES, {"greeting": "hello e2e"}))
        assert_eq(run["state"], "RUN_STATE_QUEUED", "state right after submit")
        assert_eq([s["name"] for s in run["stages"]], ["build", "test"], "stages")
        events = watch(self.c, run["id"])
        assert_eq(seqs(events), list(range(1, len(events) + 1)), "event seqs")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["greeting=hello e2e"], "log lines")
        last = events[-1]
        assert_eq((last["kind"], last["run_state"]),
                  ("EVENT_KIND_RUN_STATE", "RUN_STATE_SUCCEEDED"), "last event")
        order = [(e.get("stage"), e.get("stage_state")) for e in events
                 if e.get("kind") == "EVENT_KIND_STAGE_STATE"]
        assert_eq(order, [("build", "STAGE_STATE_RUNNING"), ("build", "STAGE_STATE_SUCCEEDED"),
                          ("test", "STAGE_STATE_RUNNING"), ("test", "STAGE_STATE_SUCCEEDED")],
                  "stage order (test needs build)")
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "GetRun state")
        assert_eq([s["state"] for s in got["stages"]],
                  ["STAGE_STATE_SUCCEEDED"] * 2, "GetRun stage states")
        assert_eq(int(got["last_seq"]), len(events), "last_seq")
        self.runs["ok"] = (run["id"], events)

    def test_params_are_not_shell_text(self):
        evil = "$(echo INJECTED); `echo INJECTED`"
        run = Client.to_dict(submit(self.c, TWO_STAGES, {"greeting": evil}))
        logs = [e["message"] for e in watch(self.c, run["id"])
                if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["greeting=" + evil], "param reached the command verbatim")

    def test_shell_templates_are_not_shell_text(self):
        """A ${{ }} in with.shell reaches the script as a value, never as
        shell text: a webhook branch like release/$(touch pwned) is just
        text, wherever the template stands (security #9 item 8)."""
        text = r"""
name: shell-templates
params:
  b: {}
stages:
  - name: s
    kind: script
    with:
      shell: |
        # it's a comment ${{ params.b }}
        echo plain=${{ params.b }}
        echo "dq=${{ params.b }}"
        echo 'sq=${{ params.b }}'
        cat <<EOF
        here=${{ params.b }}
        EOF
        ls
"""
        for value in ["release/$(touch pwned1)", ";touch pwned2", "`touch pwned3`",
                      "'; touch pwned4; '", "\"; touch pwned5; \"", "x\nEOF\ntouch pwned6"]:
            run = Client.to_dict(submit(self.c, text, {"b": value}))
            events = watch(self.c, run["id"])
            logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
            lines = value.split("\n")
            want = (["plain=" + lines[0]] + lines[1:] + ["dq=" + lines[0]] + lines[1:] +
                    ["sq=" + lines[0]] + lines[1:] + ["here=" + lines[0]] + lines[1:])
            assert_eq(logs, want, "the script's lines for %r (and ls: no file)" % value)
            assert_eq(events[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run state")

    def test_secret_in_argv_refused(self):
        """${{ secrets.X }} in a command line is refused at submit with the
        line and column (security #9 item 7); through env it is accepted."""
        text = ("name: sec\nstages:\n  - name: s\n    kind: script\n"
                "    with: { command: [\"echo\", \"${{ secrets.T }}\"] }\n")
        expect_rpc_error(lambda: submit(self.c, text), grpc.StatusCode.INVALID_ARGUMENT,
                         "pipeline:5:36: stages[0].with.command[1]: secrets.T would be in "
                         "a command line")
        ok = ("name: sec\nstages:\n  - name: s\n    kind: script\n"
              "    env: { T: \"${{ secrets.T }}\" }\n    with: { shell: 'echo \"$T\"' }\n")
        c = Client.to_dict(self.c.call(P + "ValidatePipeline", {"pipeline": ok}))
        assert_eq((c.get("valid"), c.get("diagnostics", [])), (True, []), "env form is valid")

    def test_stage_template_cap(self):
        """A 64 KiB param referenced many times does not grow one stage's
        expansion without bound: the stage fails naming itself and the cap
        (security #9 item 10)."""
        refs = "".join('      V%d: "${{ params.big }}"\n' % i for i in range(40))
        text = ("name: big\nparams:\n  big: {}\nstages:\n  - name: wide\n"
                "    kind: script\n    env:\n" + refs +
                "    with: { command: [\"true\"] }\n")
        run = Client.to_dict(submit(self.c, text, {"big": "x" * 60000}))
        watch(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        msg = got["stages"][0].get("message", "")
        if "stage wide" not in msg or "1048576 bytes" not in msg:
            raise AssertionError("the message does not name the stage and the cap: %r" % msg)

    def test_idempotency_key(self):
        a = Client.to_dict(submit(self.c, TWO_STAGES, key="deploy-42"))
        b = Client.to_dict(submit(self.c, TWO_STAGES, key="deploy-42"))
        assert_eq(b["id"], a["id"], "same key, same run")
        c = Client.to_dict(submit(self.c, TWO_STAGES, key="deploy-43"))
        if c["id"] == a["id"]:
            raise AssertionError("another key gave the same run")
        watch(self.c, a["id"])
        watch(self.c, c["id"])
        # Ten at once with a new key, while the first is still committing:
        # every one answers with the same single run.
        futs = [self.c.call_future(P + "SubmitRun", {"pipeline": TWO_STAGES,
                                                     "idempotency_key": "burst-1"})
                for _ in range(10)]
        ids = {Client.to_dict(f.result())["id"] for f in futs}
        assert_eq(len(ids), 1, "concurrent submits with one key")
        runs = Client.to_dict(self.c.call(P + "ListRuns", {"page_size": 500}))["runs"]
        assert_eq(sum(1 for r in runs if r.get("idempotency_key") == "burst-1"), 1,
                  "one run stored for the key")
        watch(self.c, ids.pop())

    def test_bad_pipeline_names_line_and_field(self):
        bad = "name: bad\nstages:\n  - name: a\n    kind: scirpt\n"
        expect_rpc_error(lambda: submit(self.c, bad), grpc.StatusCode.INVALID_ARGUMENT,
                         "pipeline:4:")
        e = expect_rpc_error(lambda: submit(self.c, bad), grpc.StatusCode.INVALID_ARGUMENT)
        if "kind" not in e.details():
            raise AssertionError("message does not name the field: %r" % e.details())
        expect_rpc_error(lambda: submit(self.c, ""), grpc.StatusCode.INVALID_ARGUMENT,
                         "pipeline")
        expect_rpc_error(lambda: submit(self.c, TWO_STAGES, {"nope": "1"}),
                         grpc.StatusCode.INVALID_ARGUMENT, "nope")

    def test_not_found_and_bad_ids(self):
        expect_rpc_error(lambda: self.c.call(P + "GetRun", {"id": "00000000000000zz"}),
                         grpc.StatusCode.NOT_FOUND, "00000000000000zz")
        expect_rpc_error(lambda: self.c.call(P + "GetRun", {"id": ""}),
                         grpc.StatusCode.INVALID_ARGUMENT, "id")
        expect_rpc_error(lambda: list(self.c.stream(P + "WatchRun", {"id": "nosuchrun"})),
                         grpc.StatusCode.NOT_FOUND)
        expect_rpc_error(lambda: self.c.call(P + "CancelRun", {"id": "nosuchrun"}),
                         grpc.StatusCode.NOT_FOUND)

    def test_oversize_request_refused(self):
        big = "name: big\n# " + "x" * (5 * 1024 * 1024) + "\nstages: []\n"
        expect_rpc_error(lambda: submit(self.c, big), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert_eq(self.c.health_check(""), "SERVING", "still serving after a big request")

    def test_cancel_kills_process_group(self):
        run = Client.to_dict(submit(self.c, LONG))
        wait_for_log(self.c, run["id"])
        # Its pid inside the sandbox means nothing here: found by its argv
        # (once the forked shell has exec'd it: no event says when).
        deadline = time.monotonic() + 10
        while not _pid_by_argv("kpl-sleeper-" + run["id"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = _pid_by_argv("kpl-sleeper-" + run["id"])
        if not child:
            raise AssertionError("the background child of the stage is not running")
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "state after CancelRun")
        assert_eq([s["state"] for s in got["stages"]],
                  ["STAGE_STATE_CANCELLED", "STAGE_STATE_CANCELLED"], "stage states")
        if _alive(child):
            raise AssertionError("background child %d of the cancelled stage survived" % child)
        expect_rpc_error(lambda: self.c.call(P + "CancelRun", {"id": run["id"]}),
                         grpc.StatusCode.FAILED_PRECONDITION, "CANCELLED")
        self.runs["cancelled"] = run["id"]

    def test_timeout_fails_stage(self):
        text = ("name: slow\nstages:\n  - name: s\n    kind: script\n    timeout: 1s\n"
                "    with: { command: [\"sleep\", \"30\"] }\n")
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        assert_eq(events[-1]["run_state"], "RUN_STATE_FAILED", "run state")
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["stages"][0]["message"], "timed out after 1s", "stage message")

    def test_failure_skips_dependents(self):
        text = ("name: failing\nstages:\n"
                "  - { name: a, kind: script, with: { shell: 'echo oops >&2; exit 3' } }\n"
                "  - { name: b, kind: script, needs: [a], with: { command: ['true'] } }\n")
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        errs = [e for e in events if e.get("stream") == "LOG_STREAM_STDERR"]
        assert_eq([e["message"] for e in errs], ["oops"], "stderr line")
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(got["stages"][0]["message"], "shell script exited with status 3", "a's message")
        assert_eq(got["stages"][1]["state"], "STAGE_STATE_SKIPPED", "b skipped")
        if "stage a failed" not in got["message"]:
            raise AssertionError("run message %r" % got["message"])

    def test_watch_resumes_by_seq(self):
        run_id, full = self.runs["ok"]
        first = watch(self.c, run_id, limit=3)
        rest = watch(self.c, run_id, from_seq=int(first[-1]["seq"]) + 1)
        assert_eq(seqs(first + rest), seqs(full), "seqs across a reconnect")
        assert_eq(first + rest, full, "events across a reconnect")
        assert_eq(watch(self.c, run_id, from_seq=len(full) + 1), [],
                  "watch past the end of a finished run")

    def test_list_runs(self):
        # Its own runs, of pipelines no other test uses: what it checks does
        # not depend on which tests ran before it.
        ok_name, cancel_name = "list-ok-%d" % os.getpid(), "list-cancel-%d" % os.getpid()
        ok = []
        for _ in range(3):
            rid = submit(self.c, "name: %s\nstages:\n  - { name: a, kind: noop }\n"
                         % ok_name).id
            watch(self.c, rid)
            ok.append(rid)
        cancel = submit(self.c, "name: %s\nstages:\n  - name: s\n    kind: script\n"
                        "    with: { shell: 'echo up; sleep 300' }\n" % cancel_name).id
        wait_for_log(self.c, cancel)
        self.c.call(P + "CancelRun", {"id": cancel})

        page = Client.to_dict(self.c.call(P + "ListRuns", {"page_size": 2,
                                                           "pipeline_name": ok_name}))
        ids = [r["id"] for r in page["runs"]]
        assert_eq(ids, ok[::-1][:2], "first page: the two newest, newest first")
        nxt = Client.to_dict(self.c.call(P + "ListRuns", {"page_size": 2,
                                                           "pipeline_name": ok_name,
                                                           "page_token": page["next_page_token"]}))
        assert_eq([r["id"] for r in nxt["runs"]], ok[:1], "second page: the rest, no overlap")
        cancelled = Client.to_dict(self.c.call(P + "ListRuns",
                                               {"state": "RUN_STATE_CANCELLED"}))
        got = [r["id"] for r in cancelled["runs"]]
        if cancel not in got or set(ok) & set(got):
            raise AssertionError("filter by state: %r (cancelled %s, others %r)"
                                 % (got, cancel, ok))
        if any(r["state"] != "RUN_STATE_CANCELLED" for r in cancelled["runs"]):
            raise AssertionError("filter by state: %r" % cancelled["runs"])
        named = Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": cancel_name}))
        assert_eq([r["id"] for r in named["runs"]], [cancel], "filter by pipeline name")
        both = Client.to_dict(self.c.call(P + "ListRuns", {"pipeline_name": ok_name,
                                                           "state": "RUN_STATE_CANCELLED"}))
        assert_eq(both.get("runs", []), [], "both filters")

    def test_runs_survive_restart(self):
        before = {rid: Client.to_dict(self.c.call(P + "GetRun", {"id": rid}))
                  for rid in (self.runs["ok"][0], self.runs["cancelled"])}
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")
        self.c = self.daemon.start()
        for rid, run in before.items():
            after = Client.to_dict(self.c.call(P + "GetRun", {"id": rid}))
            assert_eq(after, run, "run %s after restart" % rid)
        assert_eq(watch(self.c, self.runs["ok"][0]), self.runs["ok"][1],
                  "events after restart")

    def _restart_mid_stage(self, sig):
        """A stage keeps running across a kpld restart: it is re-attached,
        ends once, and its log has every line exactly once."""
        go = os.path.join(self.tmp, "go-%d" % sig)
        ledger = os.path.join(self.shared, "ledger-%d" % sig)
        text = ("name: survive\nparams:\n  go: {}\n  ledger: {}\nstages:\n"
                "  - name: work\n    kind: script\n    with:\n      shell: |\n"
                "        echo \"started attempt $KPL_ATTEMPT\"\n"
                "        echo ran >> \"$KPL_PARAM_LEDGER\"\n"
                "        while [ ! -e \"$KPL_PARAM_GO\" ]; do sleep 0.02; done\n"
                "        echo finished\n"
                "  - name: after\n    kind: script\n    needs: [work]\n"
                "    with: { command: [\"true\"] }\n")
        run = Client.to_dict(submit(self.c, text, {"go": go, "ledger": ledger}))
        wait_for_log(self.c, run["id"])
        self.c.close()
        rc = self.daemon.stop(sig)
        if sig == signal.SIGTERM:
            assert_eq(rc, 0, "kpld exit status on SIGTERM")
        self.c = self.daemon.start()
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        assert_eq((got["state"], got["stages"][0]["state"], got["stages"][0]["attempt"]),
                  ("RUN_STATE_RUNNING", "STAGE_STATE_RUNNING", 1),
                  "the stage is still running after the restart")
        open(go, "w").close()
        events = watch(self.c, run["id"])
        assert_eq(seqs(events), list(range(1, len(events) + 1)), "no gap, no duplicate")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["started attempt 1", "finished"], "log lines across the restart")
        assert_eq(events[-1]["run_state"], "RUN_STATE_SUCCEEDED", "final state")
        assert_eq(open(ledger).read(), "ran\n", "the command ran exactly once")

    def test_kill9_mid_stage_reattaches(self):
        self._restart_mid_stage(signal.SIGKILL)

    def test_sigterm_mid_stage_reattaches(self):
        self._restart_mid_stage(signal.SIGTERM)

    def close(self):
        self.c.close()
        if self.daemon.proc:
            assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def _pid_by_argv(arg):
    """The pid of a process with arg in its argv, or None."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                if arg.encode() in f.read().split(b"\0"):
                    return int(d)
        except OSError:
            continue
    return None


def _alive(pid):
    """True if pid runs (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_suite(suite_class, suite):
    """Runs every test_ method of suite in definition order, then its close,
    and prints the closing 'N passed, N failed' line. Returns the exit code."""
    passed = failed = 0
    for name in [n for n in suite_class.__dict__ if n.startswith("test_")]:
        t0 = time.monotonic()
        try:
            getattr(suite, name)()
            passed += 1
            print("PASS %s (%.2fs)" % (name, time.monotonic() - t0), flush=True)
        except Exception:
            failed += 1
            print("FAIL %s" % name, flush=True)
            traceback.print_exc()
    try:
        suite.close()
    except Exception:
        failed += 1
        print("FAIL clean stop", flush=True)
        traceback.print_exc()
    if failed:
        print("kpld log (%s):" % suite.daemon.log)
        print(open(suite.daemon.log).read()[-8000:])
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-e2e-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
