"""The engine's semantics, end to end through the gRPC API (types learnt by
reflection): parallel branches, retries and backoff, when, finally after a
failure and after a cancel, outputs flowing between stages, approval,
concurrency groups, RetryRun, WatchRuns, ValidatePipeline.

    /usr/bin/python3 tests/e2e/engine_test.py PATH/TO/kpld

Waiting is on WatchRun streams; the stages themselves coordinate through
files (a stage that must overlap another waits for the other's marker), so
no test depends on timing luck.
"""

import os
import re
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import (P, Client, Daemon, assert_eq, expect_rpc_error,  # noqa: E402
                      _pid_by_argv, run_suite, submit, wait_for_log, watch)


def ts(t):
    """A Timestamp from to_dict ("2026-11-25T01:19:56.287Z") in seconds."""
    import datetime
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


def get(c, run_id):
    return Client.to_dict(c.call(P + "GetRun", {"id": run_id}))


def stage(run, name):
    for s in run["stages"]:
        if s["name"] == name:
            return s
    raise AssertionError("no stage %s in %r" % (name, [s["name"] for s in run["stages"]]))


def logs(events, stage_name=None):
    return [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"
            and (stage_name is None or e.get("stage") == stage_name)]


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

    def path(self, name):
        return os.path.join(self.shared, name)

    def run_to_end(self, text, params=None):
        run = Client.to_dict(submit(self.c, text, params))
        events = watch(self.c, run["id"])
        return get(self.c, run["id"]), events

    # -- tests ----------------------------------------------------------

    def test_parallel_branches_overlap(self):
        # b and c each wait for the other's marker: they can only finish if
        # they run at the same time.
        text = """
name: par
params: { dir: {} }
stages:
  - { name: a, kind: script, with: { command: ["true"] } }
  - name: b
    kind: script
    needs: [a]
    timeout: 20s
    with:
      shell: touch "$KPL_PARAM_DIR/b"; while [ ! -e "$KPL_PARAM_DIR/c" ]; do sleep 0.01; done
  - name: c
    kind: script
    needs: [a]
    timeout: 20s
    with:
      shell: touch "$KPL_PARAM_DIR/c"; while [ ! -e "$KPL_PARAM_DIR/b" ]; do sleep 0.01; done
  - { name: d, kind: script, needs: [b, c], with: { command: ["true"] } }
"""
        d = self.path("par")
        os.mkdir(d)
        run, _ = self.run_to_end(text, {"dir": d})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        b, c, dd = stage(run, "b"), stage(run, "c"), stage(run, "d")
        if not (ts(b["started_at"]) < ts(c["finished_at"]) and
                ts(c["started_at"]) < ts(b["finished_at"])):
            raise AssertionError("b and c did not overlap: %r %r" % (b, c))
        if ts(dd["started_at"]) < max(ts(b["finished_at"]), ts(c["finished_at"])):
            raise AssertionError("d started before its needs finished")

    def test_retries_with_backoff(self):
        text = """
name: flaky
params: { counter: {} }
stages:
  - name: s
    kind: script
    retries: { count: 3, backoff: 200ms, max_backoff: 1s }
    with:
      shell: |
        n=$(cat "$KPL_PARAM_COUNTER" 2>/dev/null || echo 0); n=$((n+1))
        echo $n > "$KPL_PARAM_COUNTER"
        echo "attempt $KPL_ATTEMPT"
        [ $n -ge 3 ]
"""
        run, events = self.run_to_end(text, {"counter": self.path("counter")})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(stage(run, "s")["attempt"], 3, "attempts")
        assert_eq(logs(events), ["attempt 1", "attempt 2", "attempt 3"], "logs")
        pend = [e for e in events if e.get("stage_state") == "STAGE_STATE_PENDING"
                and e.get("kind") == "EVENT_KIND_STAGE_STATE"]
        assert_eq(len(pend), 2, "retry waits")
        if "retrying in" not in pend[0]["message"]:
            raise AssertionError("retry message %r" % pend[0]["message"])
        # Backoff is exponential with equal jitter: the planned waits (the
        # PENDING messages) are within [d/2, d] for d = 200ms, then 400ms,
        # and no retry started before its planned time (kpld's own event
        # times; a lower bound only, which load cannot break).
        planned = []
        for e, d in zip(pend, (200, 400)):
            m = re.search(r"retrying in (\d+)(ms|s)\b", e["message"])
            if not m:
                raise AssertionError("no planned wait in %r" % e["message"])
            ms = int(m.group(1)) * (1 if m.group(2) == "ms" else 1000)
            if not d // 2 <= ms <= d:
                raise AssertionError("planned wait %d ms, want %d..%d: %r"
                                     % (ms, d // 2, d, e["message"]))
            planned.append(ms / 1000.0)
        starts = [ts(e["time"]) for e in events if e.get("stage_state") == "STAGE_STATE_RUNNING"
                  and e.get("kind") == "EVENT_KIND_STAGE_STATE"]
        fails = [ts(e["time"]) for e in pend]
        for i in (0, 1):
            # Timestamps have millisecond precision.
            if starts[i + 1] - fails[i] < planned[i] - 0.002:
                raise AssertionError("retry %d started %.3f s after the failure, planned %.3f"
                                     % (i + 1, starts[i + 1] - fails[i], planned[i]))

    def test_retries_exhausted(self):
        text = ("name: broken\nstages:\n  - name: s\n    kind: script\n"
                "    retries: { count: 1, backoff: 100ms }\n"
                "    with: { shell: 'exit 4' }\n")
        run, _ = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        assert_eq((stage(run, "s")["attempt"], stage(run, "s")["message"]),
                  (2, "shell script exited with status 4"), "last attempt")

    def test_when(self):
        text = """
name: cond
params:
  env: { default: staging, enum: [staging, prod] }
stages:
  - { name: build, kind: script, with: { command: ["true"] } }
  - name: prod-only
    kind: script
    needs: [build]
    when: params.env == 'prod'
    with: { command: ["true"] }
  - name: after
    kind: script
    needs: [prod-only]
    when: stages.prod-only.state == 'skipped' && stages.build.state == 'succeeded'
    with: { command: ["echo", "ran after a skip"] }
"""
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(stage(run, "prod-only")["state"], "STAGE_STATE_SKIPPED", "when false")
        assert_eq(logs(events, "after"), ["ran after a skip"], "dependent of a skipped stage")
        run = Client.to_dict(submit(self.c, text, {"env": "prod"}))
        watch(self.c, run["id"])
        run = get(self.c, run["id"])
        assert_eq([s["state"] for s in run["stages"]],
                  ["STAGE_STATE_SUCCEEDED", "STAGE_STATE_SUCCEEDED", "STAGE_STATE_SKIPPED"],
                  "with env=prod")

    def test_finally_after_failure(self):
        text = """
name: fin
stages:
  - { name: a, kind: script, with: { shell: "exit 1" } }
  - { name: b, kind: script, needs: [a], with: { command: ["true"] } }
finally:
  - { name: cleanup, kind: script, with: { command: ["echo", "cleaning up"] } }
"""
        run, events = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        assert_eq([s["state"] for s in run["stages"]],
                  ["STAGE_STATE_FAILED", "STAGE_STATE_SKIPPED", "STAGE_STATE_SUCCEEDED"],
                  "states")
        assert_eq(logs(events, "cleanup"), ["cleaning up"], "finally ran")

    def test_finally_after_cancel(self):
        text = """
name: fincancel
stages:
  - { name: long, kind: script, with: { shell: "echo up; sleep 60" } }
finally:
  - { name: cleanup, kind: script, with: { command: ["echo", "cleaning up"] } }
"""
        run = Client.to_dict(submit(self.c, text))
        wait_for_log(self.c, run["id"])
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "run state")
        assert_eq([s["state"] for s in got["stages"]],
                  ["STAGE_STATE_CANCELLED", "STAGE_STATE_SUCCEEDED"], "states")
        assert_eq(logs(watch(self.c, run["id"]), "cleanup"), ["cleaning up"], "finally ran")

    def test_outputs_flow(self):
        text = """
name: outs
params: { who: { default: world } }
stages:
  - name: make
    kind: script
    with: { shell: 'echo "greeting=hello ${KPL_PARAM_WHO}" >> "$KPL_OUTPUTS"' }
  - name: use
    kind: script
    needs: [make]
    env: { RUN: "${{ run.id }}" }
    with:
      command: ["echo", "${{ stages.make.outputs.greeting }} from ${{ params.who }}"]
"""
        run, events = self.run_to_end(text, {"who": "kpl"})
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(stage(run, "make")["outputs"], {"greeting": "hello kpl"}, "outputs")
        assert_eq(logs(events, "use"), ["hello kpl from kpl"], "templated command")

    def test_missing_output_fails_clearly(self):
        text = """
name: noout
stages:
  - { name: make, kind: script, with: { command: ["true"] } }
  - name: use
    kind: script
    needs: [make]
    with: { command: ["echo", "${{ stages.make.outputs.image }}"] }
"""
        run, _ = self.run_to_end(text)
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        msg = stage(run, "use")["message"]
        if "stages.make.outputs.image" not in msg or "with.command[1]" not in msg:
            raise AssertionError("message does not name the reference and key: %r" % msg)

    APPROVAL = """
name: gate
stages:
  - { name: build, kind: script, with: { command: ["true"] } }
  - name: ok
    kind: approval
    needs: [build]
    timeout: 30s
    with: { message: "ship it?" }
  - { name: ship, kind: script, needs: [ok], with: { command: ["echo", "shipped"] } }
"""

    def _wait_waiting(self, run_id):
        stream = self.c.stream(P + "WatchRun", {"id": run_id}, timeout=30)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("stage_state") == "STAGE_STATE_WAITING":
                stream.cancel()
                return ev
        raise AssertionError("never waited")

    def test_approval_approve(self):
        run = Client.to_dict(submit(self.c, self.APPROVAL))
        ev = self._wait_waiting(run["id"])
        assert_eq(ev["message"], "waiting for approval: ship it?", "waiting message")
        expect_rpc_error(lambda: self.c.call(P + "ApproveStage", {
            "run_id": run["id"], "stage": "build", "approve": True}),
            grpc.StatusCode.FAILED_PRECONDITION, "not waiting")
        got = Client.to_dict(self.c.call(P + "ApproveStage", {
            "run_id": run["id"], "stage": "ok", "approve": True, "comment": "lgtm",
            "by": "alice"}))
        assert_eq(stage(got, "ok")["message"], "approved by alice: lgtm", "audit message")
        events = watch(self.c, run["id"])
        assert_eq(events[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(logs(events, "ship"), ["shipped"], "shipped after approval")

    def test_approval_reject(self):
        run = Client.to_dict(submit(self.c, self.APPROVAL))
        self._wait_waiting(run["id"])
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "ok",
                                         "approve": False, "by": "bob"})
        watch(self.c, run["id"])
        got = get(self.c, run["id"])
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(stage(got, "ok")["message"], "rejected by bob", "message")
        assert_eq(stage(got, "ship")["state"], "STAGE_STATE_SKIPPED", "not shipped")

    def test_approval_timeout(self):
        run, _ = self.run_to_end(self.APPROVAL.replace("timeout: 30s", "timeout: 300ms"))
        assert_eq(run["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(stage(run, "ok")["message"], "timed out after 300ms", "message")

    def test_approval_survives_restart(self):
        run = Client.to_dict(submit(self.c, self.APPROVAL))
        self._wait_waiting(run["id"])
        self.c.close()
        import signal
        self.daemon.stop(signal.SIGKILL)
        self.c = self.daemon.start()
        assert_eq(stage(get(self.c, run["id"]), "ok")["state"], "STAGE_STATE_WAITING",
                  "still waiting after kill -9")
        self.c.call(P + "ApproveStage", {"run_id": run["id"], "stage": "ok",
                                         "approve": True, "by": "carol"})
        assert_eq(watch(self.c, run["id"])[-1]["run_state"], "RUN_STATE_SUCCEEDED",
                  "run state")

    def test_retry_backoff_survives_restart(self):
        # The retry's time is stored with the PENDING state in one commit:
        # a kill -9 after the failure must not bring the retry forward.
        text = ("name: later\nstages:\n  - name: s\n    kind: script\n"
                "    retries: { count: 1, backoff: 1h, max_backoff: 1h }\n"
                "    with: { command: [\"false\"] }\n")
        run = Client.to_dict(submit(self.c, text))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=30)
        for ev in stream:
            ev = Client.to_dict(ev)
            if "retrying in" in ev.get("message", ""):
                stream.cancel()
                break
        else:
            raise AssertionError("the first attempt never failed into a retry")
        self.c.close()
        import signal
        self.daemon.stop(signal.SIGKILL)
        self.c = self.daemon.start()
        # kpld recovers every run before it serves; a run that ends after
        # the restart shows the loop has gone round since.
        _, events = self.run_to_end("name: after\nstages:\n  - {name: n, kind: noop}\n")
        got = stage(get(self.c, run["id"]), "s")
        assert_eq((got["state"], got.get("attempt")), ("STAGE_STATE_PENDING", 1),
                  "retry still an hour away after kill -9")
        if "retrying in" not in got.get("message", ""):
            raise AssertionError("stage message %r" % got.get("message"))
        self.c.call(P + "CancelRun", {"id": run["id"]})

    def test_concurrency_group_in_order(self):
        text = """
name: deploy
params:
  app: {}
  dir: {}
concurrency: "deploy-${{ params.app }}-prod"
stages:
  - name: d
    kind: script
    with:
      shell: |
        set -C
        : > "$KPL_PARAM_DIR/lock" || { echo "overlap"; exit 1; }
        echo "$KPL_RUN_ID" >> "$KPL_PARAM_DIR/order"
        sleep 0.1
        rm -f "$KPL_PARAM_DIR/lock"
"""
        d = self.path("group")
        os.mkdir(d)
        ids = [Client.to_dict(submit(self.c, text, {"app": "shop", "dir": d}))["id"]
               for _ in range(3)]
        other = Client.to_dict(submit(self.c, text, {"app": "blog", "dir": self.path("g2")}))
        os.mkdir(self.path("g2"))
        q = get(self.c, ids[2])
        assert_eq((q["state"], q["concurrency_group"]),
                  ("RUN_STATE_QUEUED", "deploy-shop-prod"), "third run waits")
        for i in ids:
            assert_eq(watch(self.c, i)[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run " + i)
        watch(self.c, other["id"])
        assert_eq(open(os.path.join(d, "order")).read().split(), ids, "one at a time, in order")

    def test_concurrency_cancel_in_progress(self):
        text = """
name: preview
concurrency: { group: preview, cancel_in_progress: true }
stages:
  - { name: s, kind: script, with: { shell: "echo up; sleep 60" } }
"""
        first = Client.to_dict(submit(self.c, text))
        wait_for_log(self.c, first["id"])
        second = Client.to_dict(submit(self.c, text))
        assert_eq(watch(self.c, first["id"])[-1]["run_state"], "RUN_STATE_CANCELLED",
                  "older run cancelled")
        wait_for_log(self.c, second["id"])
        self.c.call(P + "CancelRun", {"id": second["id"]})

    def test_retry_run_keeps_succeeded(self):
        text = """
name: again
params: { flag: {}, ledger: {} }
stages:
  - name: a
    kind: script
    with: { shell: 'echo a >> "$KPL_PARAM_LEDGER"; echo "v=1" >> "$KPL_OUTPUTS"' }
  - name: b
    kind: script
    needs: [a]
    with:
      shell: 'echo "b sees ${{ stages.a.outputs.v }}"; [ -e "$KPL_PARAM_FLAG" ]'
"""
        flag, ledger = self.path("flag"), self.path("ledger")
        run, _ = self.run_to_end(text, {"flag": flag, "ledger": ledger})
        assert_eq(run["state"], "RUN_STATE_FAILED", "first attempt")
        expect_rpc_error(lambda: self.c.call(P + "RetryRun", {"id": "nosuchrun"}),
                         grpc.StatusCode.NOT_FOUND)
        open(flag, "w").close()
        got = Client.to_dict(self.c.call(P + "RetryRun", {"id": run["id"]}))
        assert_eq((got["id"], got["attempt"], got["state"]),
                  (run["id"], 2, "RUN_STATE_QUEUED"), "retry answer")
        events = watch(self.c, run["id"], from_seq=int(got["last_seq"]))
        final = get(self.c, run["id"])
        assert_eq(final["state"], "RUN_STATE_SUCCEEDED", "second attempt")
        assert_eq((stage(final, "a")["attempt"], stage(final, "b")["attempt"]), (1, 2),
                  "a kept, b ran again")
        assert_eq(open(ledger).read(), "a\n", "a ran once")
        assert_eq(logs(events, "b"), ["b sees 1"], "b read a's kept output")
        expect_rpc_error(lambda: self.c.call(P + "RetryRun", {"id": run["id"]}),
                         grpc.StatusCode.FAILED_PRECONDITION, "SUCCEEDED")

    def test_watch_runs_global(self):
        got = []
        done = threading.Event()
        # From global seq 1: the pipeline name is this test's own, so only
        # its runs' log lines match, whenever the server sees the call.
        stream = self.c.stream(P + "WatchRuns", {"from_global_seq": 1, "pipeline_name": "globe",
                                                "kinds": ["EVENT_KIND_LOG"]}, timeout=30)

        def follow():
            for ev in stream:
                got.append(Client.to_dict(ev))
                if len(got) == 2:
                    break
            done.set()
        t = threading.Thread(target=follow)
        t.start()
        text = "name: globe\nstages:\n  - {name: s, kind: script, with: {command: [echo, hi]}}\n"
        a = Client.to_dict(submit(self.c, text))
        b = Client.to_dict(submit(self.c, text))
        done.wait(30)
        stream.cancel()
        t.join()
        assert_eq(sorted(e["run_id"] for e in got), sorted([a["id"], b["id"]]),
                  "log events of both runs, nothing else")
        gs = [int(e["global_seq"]) for e in got]
        if gs != sorted(set(gs)):
            raise AssertionError("global seqs not increasing: %r" % gs)
        # Resume from the first one's global seq: it comes again, then the next.
        again = []
        s2 = self.c.stream(P + "WatchRuns", {"from_global_seq": gs[0], "pipeline_name": "globe",
                                            "kinds": ["EVENT_KIND_LOG"]}, timeout=30)
        for ev in s2:
            again.append(Client.to_dict(ev))
            if len(again) == 2:
                s2.cancel()
                break
        assert_eq([int(e["global_seq"]) for e in again], gs, "resume by global seq")

    def test_validate_pipeline(self):
        bad = ("name: v\nstages:\n  - {name: a, kind: script, needs: [zz], with: {command: [x]}}\n"
               "  - {name: a, kind: noop}\n")
        resp = Client.to_dict(self.c.call(P + "ValidatePipeline", {"pipeline": bad}))
        assert_eq(resp.get("valid", False), False, "invalid")
        msgs = [(d["line"], d["path"]) for d in resp["diagnostics"]]
        if len(msgs) < 2:
            raise AssertionError("want every problem, got %r" % resp["diagnostics"])
        good = Client.to_dict(self.c.call(P + "ValidatePipeline", {
            "pipeline": "name: ok\nstages:\n  - {name: a, kind: noop}\n"}))
        assert_eq((good.get("valid"), good.get("pipeline_name")), (True, "ok"), "valid")

    def test_script_with_env_and_timeout(self):
        # The script kind's first format: env and timeout under `with`.
        text = ("name: firstformat\nstages:\n  - name: s\n    kind: script\n"
                "    env: { A: stage }\n"
                "    with: { command: [sh, -c, 'echo $A $B; sleep 30'], env: { B: with },"
                " timeout: 300ms }\n")
        run, events = self.run_to_end(text)
        assert_eq(logs(events), ["stage with"], "with.env after the stage env")
        assert_eq(stage(run, "s")["message"], "timed out after 300ms", "with.timeout")

    def test_same_text_runs_apart(self):
        # kpld parses a pipeline text once and its runs share the parse:
        # each run still gets its own params, and a run that ends (and
        # drops its share) leaves the others whole.
        text = ("name: shared\nparams:\n  who: { default: nobody }\n"
                "stages:\n  - name: s\n    kind: script\n"
                "    env: { WHO: '${{ params.who }}' }\n"
                "    with: { shell: 'echo hello $WHO' }\n")
        for who in ["one", "two", None, "three"]:
            run, events = self.run_to_end(text, {"who": who} if who else None)
            assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run for %s" % who)
            assert_eq(logs(events), ["hello %s" % (who or "nobody")], "its own params")
        bad = text.replace("echo hello", "echo ${{ secrets.nope }}")
        for _ in range(2):
            expect_rpc_error(lambda: submit(self.c, bad), grpc.StatusCode.INVALID_ARGUMENT,
                             "nope")

    def test_unrecoverable_run_ends_failed(self):
        """A run whose stored pipeline no longer parses (as after an upgrade
        with stricter rules) is not left RUNNING: it ends FAILED with the
        reason, and the command it had started is stopped."""
        import signal
        import subprocess
        data = self.path("unrec-data")
        d = Daemon(self.daemon.binary, data)
        c = d.start()
        text = ("name: unrec\nstages:\n  - name: s\n    kind: script\n    with:\n"
                "      shell: 'echo up; exec sh -c \"sleep 60\" kpl-unrec-$KPL_RUN_ID'\n")
        run = Client.to_dict(submit(c, text))
        wait_for_log(c, run["id"])
        # Its pid inside the sandbox means nothing here: found by its argv.
        deadline = time.monotonic() + 10
        while not _pid_by_argv("kpl-unrec-" + run["id"]) and time.monotonic() < deadline:
            time.sleep(0.05)  # after "up": no event to wait on
        pid = _pid_by_argv("kpl-unrec-" + run["id"])
        if not pid:
            raise AssertionError("the stage's command is not running")
        c.close()
        d.stop(signal.SIGKILL)
        # Change the stored pipeline text with LMDB's own tools.
        dump = subprocess.run(["mdb_dump", "-s", "pipelines", "-p", data], check=True,
                              capture_output=True, text=True).stdout
        assert_eq("kind: script" in dump, True, "the stored pipeline text")
        subprocess.run(["mdb_load", "-s", "pipelines", data], check=True,
                       input=dump.replace("kind: script", "kind: scrypt"),
                       capture_output=True, text=True)
        c = d.start()
        try:
            # kpld may serve before the commit of the FAILED state lands
            # (a loaded host): the run's events say when it has.
            events = watch(c, run["id"])
            assert_eq(events[-1]["run_state"], "RUN_STATE_FAILED", "final event")
            got = get(c, run["id"])
            assert_eq((got["state"], stage(got, "s")["state"]),
                      ("RUN_STATE_FAILED", "STAGE_STATE_FAILED"), "states")
            if "no longer parses" not in got["message"]:
                raise AssertionError("message %r" % got["message"])
            assert_eq([int(e["seq"]) for e in events], list(range(1, len(events) + 1)),
                      "seqs without a gap")
            deadline = time.monotonic() + 10
            while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
                time.sleep(0.05)  # the shim forwards the stop: no event to wait on
            state = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] \
                if os.path.exists("/proc/%d" % pid) else "gone"
            assert_eq(state in ("gone", "Z"), True, "the command was stopped")
        finally:
            c.close()
            d.stop(signal.SIGTERM)

    def test_retention_by_count(self):
        import signal
        d = Daemon(self.daemon.binary, self.path("ret-data"), ["--retain-runs", "3"])
        c = d.start()
        try:
            text = "name: keep\nstages:\n  - {name: s, kind: script, with: {command: [echo, x]}}\n"
            ids = []
            for _ in range(6):
                run = Client.to_dict(submit(c, text))
                watch(c, run["id"])
                ids.append(run["id"])
            c.close()
            assert_eq(d.stop(signal.SIGTERM), 0, "clean stop")
            c = d.start()  # the sweep runs at start
            deadline = time.monotonic() + 20
            while True:
                runs = Client.to_dict(c.call(P + "ListRuns", {})).get("runs", [])
                if len(runs) <= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # the sweep has no event to wait on
            assert_eq([r["id"] for r in runs], ids[3:][::-1], "the newest 3 kept")
            expect_rpc_error(lambda: c.call(P + "GetRun", {"id": ids[0]}),
                             grpc.StatusCode.NOT_FOUND)
            expect_rpc_error(lambda: list(c.stream(P + "WatchRun", {"id": ids[0]})),
                             grpc.StatusCode.NOT_FOUND)
            assert_eq(len(watch(c, ids[5])) > 0, True, "kept runs keep their events")
            gone = os.path.join(self.path("ret-data"), "work", ids[0])
            deadline = time.monotonic() + 20
            while os.path.exists(gone) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert_eq(os.path.exists(gone), False, "workspace removed")
        finally:
            c.close()
            d.stop(signal.SIGTERM)

    def close(self):
        self.c.close()
        import signal
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-engine-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
