"""End-to-end test of the `build` kind's jenkins driver: kpld (with a daemon
config naming the Jenkins emulator) drives builds of tests/emulators/jenkins
through its gRPC API.

    /usr/bin/python3 tests/e2e/jenkins_build_test.py PATH/TO/kpld PATH/TO/jenkins_emulator.py

Checks: console lines arrive as log events in order, outputs (build_number,
build_url, image, digest); FAILURE and ABORTED builds; the strict crumb mode;
a 401 with a wrong token (its message, and no token in any event); cancel
(the emulator shows the build ABORTED); a trigger answered 500 after it was
queued (found again by its KPL_RUN_ID marker, not repeated); and kill -9 of
kpld while the build runs and while it is still queued: the run ends
SUCCEEDED with every console line exactly once and exactly ONE build.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402
from ports import readline_within  # noqa: E402

P = "kpl.v1.Pipelines/"
USER = "kpl"
TOKEN = "jenkins-token-4b1d7c9e"
BAD_TOKEN = "wrong-token-8f3a2e61"

JOBS = {"jobs": [
    {"name": "team/app",
     "parameters": [{"name": "GIT_SHA", "default": "none"},
                    {"name": "RESULT", "default": "SUCCESS"}, "KPL_RUN_ID"],
     "script": ["Cloning ${GIT_SHA}", {"line": "Compiling", "delay": 0.3},
                {"line": "Testing", "delay": 0.3}, "Packaging ${GIT_SHA}"],
     "line_delay": 0.05,
     "result": "SUCCESS", "result_param": "RESULT",
     "image": "registry.local/team/app:${GIT_SHA}"},
    {"name": "team/slow",
     "parameters": [{"name": "GIT_SHA", "default": "none"}, "KPL_RUN_ID"],
     "script": [{"line": "step %d of 12" % i, "delay": 0.4} for i in range(1, 13)],
     "result": "SUCCESS", "concurrent": True,
     "image": "registry.local/team/slow:${GIT_SHA}"},
]}

PIPELINE = """
name: jenkins-build
params:
  sha: { default: "abc123" }
  result: { default: "SUCCESS" }
  job: { default: "team/app" }
  ci: { default: "ci" }
stages:
  - name: image
    kind: build
    with:
      driver: jenkins
      jenkins: "${{ params.ci }}"
      job: "${{ params.job }}"
      params: { GIT_SHA: "${{ params.sha }}", RESULT: "${{ params.result }}" }
  - name: show
    kind: script
    needs: [image]
    with: { command: ["echo", "built ${{ stages.image.outputs.image }}"] }
"""

SLOW = """
name: jenkins-slow
params:
  sha: { default: "s1" }
stages:
  - name: image
    kind: build
    with: { driver: jenkins, jenkins: ci, job: team/slow,
            params: { GIT_SHA: "${{ params.sha }}" } }
"""

FINAL = ("RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED")


def assert_eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def assert_true(cond, what):
    if not cond:
        raise AssertionError(what)


class Emulator:
    def __init__(self, script, tmp):
        jobs = os.path.join(tmp, "jobs.json")
        with open(jobs, "w") as f:
            json.dump(JOBS, f)
        self.log = open(os.path.join(tmp, "emulator.log"), "w")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", script, "--jobs", jobs, "--user", "%s:%s" % (USER, TOKEN),
             "--lifetime", "900"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = readline_within(self.proc.stdout, 60, "jenkins emulator's PORT= line").strip()
        assert_true(line.startswith("PORT="), "emulator said %r" % line)
        self.url = "http://127.0.0.1:%s" % line[5:]

    def get(self, path, auth=False):
        req = urllib.request.Request(self.url + path)
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(
                ("%s:%s" % (USER, TOKEN)).encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return body

    def json(self, path):
        return json.loads(self.get(path))

    def post(self, path, obj):
        req = urllib.request.Request(self.url + path, data=json.dumps(obj).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def triggers_of(self, run_id):
        return [t for t in self.json("/emulator/triggers")
                if t["params"].get("KPL_RUN_ID", "").startswith(run_id + "/")]

    def builds_of(self, run_id):
        return [b for b in self.json("/emulator/builds")
                if b["params"].get("KPL_RUN_ID", "").startswith(run_id + "/")]

    def console(self, job_path, number):
        text = self.get("/%s%d/consoleText" % (job_path, number), auth=True).decode()
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.log.close()


class Daemon:
    def __init__(self, binary, tmp, config):
        self.binary = binary
        self.data_dir = os.path.join(tmp, "data")
        self.config = config
        self.log = os.path.join(tmp, "kpld.log")
        self.proc = None

    def start(self):
        ready = self.data_dir + ".ready"
        if os.path.exists(ready):
            os.unlink(ready)
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir,
             "--ready-file", ready, "--config", self.config, "--log-level", "debug"],
            stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise AssertionError("kpld exited with %s; log:\n%s"
                                     % (self.proc.returncode, open(self.log).read()[-3000:]))
            assert_true(time.monotonic() < deadline, "kpld did not serve within 30 s")
            time.sleep(0.02)
        self.c = Client.connect(open(ready).read().strip())
        return self.c

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc


def submit(c, text, params=None):
    return Client.to_dict(c.call(P + "SubmitRun", {"pipeline": text, "params": params or {}}))


def watch(c, run_id, until=None):
    """Events of the run until it ends (or until(ev) is true)."""
    out = []
    stream = c.stream(P + "WatchRun", {"id": run_id}, timeout=120)
    for ev in stream:
        ev = Client.to_dict(ev)
        out.append(ev)
        if until and until(ev):
            stream.cancel()
            break
        if ev.get("kind") == "EVENT_KIND_RUN_STATE" and ev.get("run_state") in FINAL:
            stream.cancel()
            break
    return out


def console_lines(events, stage="image"):
    return [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"
            and e.get("stage") == stage and e.get("stream") == "LOG_STREAM_STDOUT"]


def notes(events, stage="image"):
    return [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"
            and e.get("stage") == stage and e.get("stream") == "LOG_STREAM_SYSTEM"]


def stage_of(c, run_id, name="image"):
    run = Client.to_dict(c.call(P + "GetRun", {"id": run_id}))
    for s in run["stages"]:
        if s["name"] == name:
            return run, s
    raise AssertionError("no stage %s" % name)


def outputs(stage):
    out = stage.get("outputs") or {}
    if isinstance(out, list):  # map fields as entries, whichever way to_dict gives them
        out = {o["key"]: o["value"] for o in out}
    return out


def last_state(events):
    """The run's final state, with the stage messages and notes when it is
    not SUCCEEDED (what an assertion message should show)."""
    state = [e for e in events if e.get("kind") == "EVENT_KIND_RUN_STATE"][-1]["run_state"]
    if state != "RUN_STATE_SUCCEEDED":
        why = [(e.get("stage"), e.get("message")) for e in events
               if e.get("kind") == "EVENT_KIND_STAGE_STATE" or
               e.get("stream") == "LOG_STREAM_SYSTEM"]
        return (state, why)[0] if os.environ.get("KPL_QUIET") else _Why(state, why)
    return state


class _Why(str):
    """A state that prints with the reasons for it."""

    def __new__(cls, state, why):
        s = str.__new__(cls, state)
        s.why = why
        return s

    def __repr__(self):
        return "%s (%r)" % (str.__repr__(self), self.why)


class Suite:
    def __init__(self, kpld, emulator, tmp):
        self.tmp = tmp
        self.emu = Emulator(emulator, tmp)
        config = os.path.join(tmp, "kpld.yaml")
        with open(config, "w") as f:
            f.write("jenkins:\n"
                    "  ci: { url: \"%s\", username: %s, token: \"${{ secrets.JENKINS_TOKEN }}\" }\n"
                    "  bad: { url: \"%s/\", username: %s, token: \"${{ secrets.BAD_TOKEN }}\" }\n"
                    % (self.emu.url, USER, self.emu.url, USER))
        self.daemon = Daemon(kpld, tmp, config)
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "JENKINS_TOKEN", "value": TOKEN})
        self.c.call(P + "SetSecret", {"name": "BAD_TOKEN", "value": BAD_TOKEN})
        self.all_events = []

    def run(self, text, params=None):
        run = submit(self.c, text, params)
        events = watch(self.c, run["id"])
        self.all_events += events
        return run["id"], events

    def check_one_build(self, run_id, job="team/app"):
        builds = self.emu.builds_of(run_id)
        assert_eq(len(builds), 1, "Jenkins builds for run %s (%r)" % (run_id, builds))
        # Jenkins folds a repeated trigger with equal parameters into the
        # queued item, so one build alone would not show that kpl triggered
        # once (after a restart, say): count the trigger POSTs too.
        triggers = self.emu.triggers_of(run_id)
        assert_eq(len(triggers), 1, "trigger POSTs for run %s (%r)" % (run_id, triggers))
        assert_eq(builds[0]["job"], job, "job built")
        return builds[0]

    def check_console(self, events, build, job_path):
        # Every console line exactly once, in order, as Jenkins has it.
        want = self.emu.console(job_path, build["number"])
        assert_eq(console_lines(events), want, "console lines")

    # -- tests ----------------------------------------------------------

    def test_success_lines_and_outputs(self):
        run_id, events = self.run(PIPELINE, {"sha": "f00d42"})
        assert_eq(last_state(events), "RUN_STATE_SUCCEEDED", "run state")
        b = self.check_one_build(run_id)
        assert_eq(b["params"]["GIT_SHA"], "f00d42", "GIT_SHA reached Jenkins")
        assert_eq(b["params"]["KPL_RUN_ID"], "%s/image/1" % run_id, "marker")
        assert_eq(b["result"], "SUCCESS", "emulator result")
        lines = console_lines(events)
        assert_true("Cloning f00d42" in lines and "Packaging f00d42" in lines,
                    "script lines in the log: %r" % lines)
        assert_true(lines.index("Compiling") < lines.index("Testing"), "order")
        self.check_console(events, b, "job/team/job/app/")
        _, st = stage_of(self.c, run_id)
        out = outputs(st)
        assert_eq(out.get("build_number"), str(b["number"]), "build_number")
        assert_eq(out.get("build_url"), b["url"], "build_url")
        assert_eq(out.get("image"), b["image"], "image (KPL_IMAGE / kpl-image.json)")
        assert_true(b["image"].startswith("registry.local/team/app@sha256:"),
                    "image is the digest reference: %r" % b["image"])
        assert_eq(out.get("digest"), b["image"].split("@", 1)[1], "digest")
        fetched = [r for r in self.emu.json("/emulator/requests")
                   if r["path"].endswith("/%d/artifact/kpl-image.json" % b["number"])]
        assert_eq([r["status"] for r in fetched], [200], "kpl-image.json read once")
        assert_eq(console_lines(events, "show"), ["built " + b["image"]],
                  "a later stage reads the output")

    def test_failure(self):
        run_id, events = self.run(PIPELINE, {"result": "FAILURE"})
        assert_eq(last_state(events), "RUN_STATE_FAILED", "run state")
        b = self.check_one_build(run_id)
        _, st = stage_of(self.c, run_id)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        assert_eq(st.get("message"), "Jenkins build #%d FAILURE" % b["number"], "message")
        assert_true("image" not in outputs(st), "no image from a failed build")

    def test_unstable_succeed_and_fail(self):
        # The same UNSTABLE build counts as a success by default (like
        # Jenkins's "last successful build") and fails with unstable: fail;
        # a failed stage publishes no image and the next stage never runs.
        text = PIPELINE.replace('RESULT: "${{ params.result }}" }',
                                'RESULT: "${{ params.result }}" }\n'
                                '      unstable: "${{ params.unstable }}"')
        text = text.replace('  ci: { default: "ci" }',
                            '  ci: { default: "ci" }\n  unstable: { default: succeed }')
        assert_true(text.count("unstable") == 3, "the pipeline names unstable")
        run_id, events = self.run(text, {"result": "UNSTABLE", "sha": "u1"})
        assert_eq(last_state(events), "RUN_STATE_SUCCEEDED", "run state, unstable: succeed")
        b = self.check_one_build(run_id)
        assert_eq(b["result"], "UNSTABLE", "emulator result")
        _, st = stage_of(self.c, run_id)
        assert_eq((st["state"], st.get("message")),
                  ("STAGE_STATE_SUCCEEDED", "Jenkins build #%d UNSTABLE" % b["number"]),
                  "stage, unstable: succeed")
        assert_eq(outputs(st).get("image"), b["image"], "image of an unstable build")
        assert_eq(console_lines(events, "show"), ["built " + b["image"]], "the next stage ran")

        run_id, events = self.run(text, {"result": "UNSTABLE", "sha": "u2", "unstable": "fail"})
        assert_eq(last_state(events), "RUN_STATE_FAILED", "run state, unstable: fail")
        b = self.check_one_build(run_id)
        assert_eq(b["result"], "UNSTABLE", "emulator result")
        run, st = stage_of(self.c, run_id)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage, unstable: fail")
        if not st.get("message", "").startswith("Jenkins build #%d UNSTABLE" % b["number"]):
            raise AssertionError("message: %r" % st.get("message"))
        assert_true("image" not in outputs(st), "no image from a build counted as failed")
        show = [s for s in run["stages"] if s["name"] == "show"][0]
        assert_eq(show["state"], "STAGE_STATE_SKIPPED", "the next stage")
        self.check_console(events, b, "job/team/job/app/")

    def test_aborted_in_jenkins(self):
        run_id, events = self.run(PIPELINE, {"result": "ABORTED"})
        assert_eq(last_state(events), "RUN_STATE_FAILED", "run state")
        b = self.check_one_build(run_id)
        _, st = stage_of(self.c, run_id)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        assert_eq(st.get("message"), "Jenkins build #%d aborted in Jenkins" % b["number"],
                  "message")

    def test_unknown_job(self):
        run_id, events = self.run(PIPELINE, {"job": "team/nope"})
        _, st = stage_of(self.c, run_id)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        assert_true("no job \"team/nope\"" in st.get("message", ""), st.get("message"))
        assert_eq(self.emu.builds_of(run_id), [], "no build")

    def test_crumb_required(self):
        self.emu.post("/emulator/config", {"csrf": "strict"})
        try:
            run_id, events = self.run(PIPELINE, {"sha": "crumb1"})
        finally:
            self.emu.post("/emulator/config", {"csrf": "on"})
        assert_eq(last_state(events), "RUN_STATE_SUCCEEDED", "run state with strict CSRF")
        self.check_one_build(run_id)
        reqs = self.emu.json("/emulator/requests")
        posts = [r for r in reqs if r["method"] == "POST" and "buildWithParameters" in r["path"]]
        assert_eq(posts[-1]["status"], 201, "the POST with crumb and cookie")

    def test_wrong_token(self):
        run_id, events = self.run(PIPELINE, {"ci": "bad"})
        assert_eq(last_state(events), "RUN_STATE_FAILED", "run state")
        _, st = stage_of(self.c, run_id)
        assert_eq(st.get("message"), "jenkins bad: 401 Unauthorized (check the token)",
                  "message")
        assert_eq(self.emu.builds_of(run_id), [], "no build")

    def test_trigger_500_after_queue(self):
        # Jenkins queued it but answered 500: found by the marker, not repeated.
        self.emu.post("/emulator/fault", {"fault": "trigger500", "count": 1,
                                          "after_queue": True, "job": "team/app"})
        run_id, events = self.run(PIPELINE, {"sha": "amb1"})
        assert_eq(last_state(events), "RUN_STATE_SUCCEEDED", "run state")
        b = self.check_one_build(run_id)
        self.check_console(events, b, "job/team/job/app/")
        assert_true(any("with KPL_RUN_ID=" in n for n in notes(events)),
                    "found again by its marker: %r" % notes(events))

    def test_cancel_running_build(self):
        run = submit(self.c, SLOW, {"sha": "cancel1"})
        events = watch(self.c, run["id"], until=lambda e: e.get("message") == "step 2 of 12")
        self.c.call(P + "CancelRun", {"id": run["id"]})
        events = watch(self.c, run["id"])
        self.all_events += events
        assert_eq(last_state(events), "RUN_STATE_CANCELLED", "run state")
        _, st = stage_of(self.c, run["id"])
        assert_eq(st["state"], "STAGE_STATE_CANCELLED", "stage state")
        b = self.check_one_build(run["id"], "team/slow")
        assert_eq(b["result"], "ABORTED", "the emulator's build")
        assert_true("step 12 of 12" not in console_lines(events), "it stopped early")

    def crash_and_finish(self, until):
        run = submit(self.c, SLOW, {"sha": "crash%d" % time.monotonic_ns()})
        seen = watch(self.c, run["id"], until=until)
        assert_true(until(seen[-1]), "the run reached the point to kill at")
        self.daemon.kill9()
        self.c = self.daemon.start()
        events = watch(self.c, run["id"])
        self.all_events += events
        assert_eq(last_state(events), "RUN_STATE_SUCCEEDED", "run state after kill -9")
        b = self.check_one_build(run["id"], "team/slow")
        # events hold the whole history (WatchRun from the start)
        self.check_console(events, b, "job/team/job/slow/")
        _, st = stage_of(self.c, run["id"])
        assert_eq(outputs(st).get("build_number"), str(b["number"]), "build_number")
        assert_eq(outputs(st).get("image"), b["image"], "image")
        return events

    def test_kill9_while_building(self):
        self.crash_and_finish(lambda e: e.get("message") == "step 3 of 12")

    def test_kill9_while_queued(self):
        self.emu.post("/emulator/config", {"queue_delay": 4.0})
        try:
            self.crash_and_finish(
                lambda e: (e.get("message") or "").startswith("queued in Jenkins as item"))
        finally:
            self.emu.post("/emulator/config", {"queue_delay": 1.0})

    def test_no_token_in_events(self):
        for e in self.all_events:
            for v in e.values():
                if isinstance(v, str) and (TOKEN in v or BAD_TOKEN in v):
                    raise AssertionError("a token in event %r" % e)
        assert_true(len(self.all_events) > 50, "events were checked")
        log = open(self.daemon.log).read()
        assert_true("jenkins" in log, "kpld's own log was read")
        assert_true(TOKEN not in log and BAD_TOKEN not in log, "a token in kpld's log")

    def close(self):
        if self.daemon.proc:
            assert_eq(self.daemon.stop(), 0, "kpld exit status after SIGTERM")
        self.emu.stop()


ORDER = ["test_success_lines_and_outputs", "test_failure", "test_unstable_succeed_and_fail",
         "test_aborted_in_jenkins",
         "test_unknown_job", "test_crumb_required", "test_wrong_token",
         "test_trigger_500_after_queue", "test_cancel_running_build",
         "test_kill9_while_building", "test_kill9_while_queued", "test_no_token_in_events"]


def main():
    kpld = os.path.abspath(sys.argv[1])
    emulator = os.path.abspath(sys.argv[2])
    only = sys.argv[3:]
    tmp = tempfile.mkdtemp(prefix="kpl-jenkins-")
    suite = Suite(kpld, emulator, tmp)
    failed = 0
    try:
        for name in ORDER:
            if only and name not in only:
                continue
            t0 = time.monotonic()
            try:
                getattr(suite, name)()
                print("PASS %s (%.1fs)" % (name, time.monotonic() - t0), flush=True)
            except Exception:
                failed += 1
                print("FAIL %s" % name, flush=True)
                traceback.print_exc()
    finally:
        try:
            suite.close()
        except Exception:
            failed += 1
            traceback.print_exc()
    if failed:
        print("kpld log tail:\n" + open(suite.daemon.log).read()[-6000:])
    print("%d failed" % failed)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
