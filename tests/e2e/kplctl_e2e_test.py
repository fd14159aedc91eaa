"""kplctl against the real kpld: secret set/list/rm (the value never printed,
and redacted from the logs of a run that echoes it), logs with and without
--stage and --follow (a running run: only what is stored, at once), releases
of a deployment nothing changed (an empty table, exit 0), and the live stage
table drawn on a terminal, read off a tmux pane of fixed size.

    /usr/bin/python3 tests/e2e/kplctl_e2e_test.py PATH/TO/kpld PATH/TO/kplctl
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, assert_eq, run_suite  # noqa: E402
from ports import readline_within  # noqa: E402

SECRET = "hunter2-e2e-Zq7"

ECHO_SECRET = """
name: echo-secret
stages:
  - name: leak
    kind: script
    env: { PW: "${{ secrets.E2E_PW }}" }
    with: { shell: 'echo "pw=$PW"; echo "again $PW" >&2' }
"""

TWO = """
name: two
stages:
  - name: first
    kind: script
    with: { shell: 'echo a1; echo a2 >&2' }
  - name: second
    kind: script
    needs: [first]
    with: { shell: 'echo b1' }
"""

# Waits for a file (the test's gate) between its two lines.
GATED = """
name: gated-logs
params:
  gate: { required: true }
stages:
  - name: slow
    kind: script
    with:
      shell: |
        echo before
        while [ ! -e "$GATE" ]; do sleep 0.05; done
        echo after
    env: { GATE: "${{ params.gate }}" }
"""

# A live table worth looking at: parallel stages, one slow, one with a line
# far wider than the pane.
LIVE = """
name: live-table
stages:
  - name: build
    kind: script
    with: { shell: 'echo compiling; sleep 0.3' }
  - name: unit-tests
    kind: script
    needs: [build]
    with: { shell: 'for i in 1 2 3 4 5 6; do echo "test $i ok"; sleep 0.25; done' }
  - name: lint
    kind: script
    needs: [build]
    with: { shell: 'printf "%0300d\\n" 7; sleep 0.5' }
  - name: package
    kind: script
    needs: [unit-tests, lint]
    with: { command: ["true"] }
"""

BRAILLE = re.compile("[\u2800-\u28ff]")
PANE_COLS, PANE_ROWS = 78, 24


class Suite:
    def __init__(self, kpld, kplctl, tmp):
        self.tmp = tmp
        self.kplctl = kplctl
        self.daemon = Daemon(kpld, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        # No config file of the user's: one in tmp that does not exist.
        self.env = dict(os.environ, KPL_SERVER=self.daemon.addr, XDG_CONFIG_HOME=tmp)
        self.env.pop("KPL_CONFIG", None)
        self.env.pop("KPL_TOKEN", None)
        self.env.pop("KPL_CA", None)
        self.tmux_sock = "kplctl-e2e-%d" % os.getpid()

    def ctl(self, *args, stdin=None, want=0, timeout=60):
        """Runs kplctl; returns (stdout, stderr), checking the exit status."""
        p = subprocess.run([self.kplctl] + list(args), input=stdin, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if want is not None and p.returncode != want:
            raise AssertionError("kplctl %s: exit %d, want %d\nstdout: %s\nstderr: %s"
                                 % (" ".join(args), p.returncode, want, p.stdout, p.stderr))
        return p.stdout, p.stderr

    def submit(self, path, *args):
        out, _ = self.ctl("submit", path, *args)
        return out.strip()

    def file(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- tests ----------------------------------------------------------

    def test_secret_set_list_rm_and_redaction(self):
        out, err = self.ctl("secret", "set", "E2E_PW", stdin=SECRET + "\n")
        assert_eq(out, "secret E2E_PW set\n", "secret set output")
        if SECRET in out + err:
            raise AssertionError("secret set printed the value")
        out, _ = self.ctl("secret", "list")
        assert_eq(out.split(), ["E2E_PW"], "secret list")
        out, _ = self.ctl("secret", "list", "-o", "json")
        assert_eq(json.loads(out), {"secrets": [{"name": "E2E_PW", "pipelines": []}]}, "secret list -o json")

        # The stage echoes the value; the log kpl stores has *** instead,
        # so kplctl logs never shows it. The trailing newline was not part
        # of the value: "pw=***" with nothing after.
        path = self.file("echo-secret.yaml", ECHO_SECRET)
        rid = self.submit(path, "--watch", "--plain")
        rid = rid.split("\n")[0]
        out, err = self.ctl("logs", rid)
        assert_eq(out, "leak | pw=***\nleak ! again ***\n", "logs of a run that echoes a secret")
        out, _ = self.ctl("logs", rid, "-o", "json")
        if SECRET in out:
            raise AssertionError("logs -o json shows the secret")
        out, _ = self.ctl("watch", rid, "--plain")
        if SECRET in out:
            raise AssertionError("watch shows the secret")
        if SECRET in open(self.daemon.log).read():
            raise AssertionError("kpld's log holds the secret")

        out, _ = self.ctl("secret", "rm", "E2E_PW")
        assert_eq(out, "secret E2E_PW deleted\n", "secret rm output")
        out, _ = self.ctl("secret", "list")
        assert_eq(out, "", "secret list after rm")
        _, err = self.ctl("secret", "rm", "E2E_PW", want=3)
        if not err.startswith("kplctl: secret: NOT_FOUND: "):
            raise AssertionError("secret rm of a missing secret: %r" % err)
        _, err = self.ctl("secret", "set", "E2E_SHORT", stdin="ab\n", want=3)
        if not err.startswith("kplctl: secret: INVALID_ARGUMENT: "):
            raise AssertionError("secret set of 2 bytes: %r" % err)

    def test_logs_of_a_finished_run(self):
        path = self.file("two.yaml", TWO)
        rid = self.submit(path)
        out, _ = self.ctl("logs", rid, "--follow")
        assert_eq(out, "first  | a1\nfirst  ! a2\nsecond | b1\n", "logs --follow")
        out, _ = self.ctl("logs", rid)
        assert_eq(out, "first  | a1\nfirst  ! a2\nsecond | b1\n", "logs of a finished run")
        out, _ = self.ctl("logs", rid, "--stage", "first")
        assert_eq(out, "a1\na2\n", "logs --stage first")
        out, _ = self.ctl("logs", rid, "--stage", "second", "-o", "json")
        evs = [json.loads(line) for line in out.splitlines()]
        assert_eq([(e["run_id"], e["stage"], e["kind"], e["stream"], e["message"]) for e in evs],
                  [(rid, "second", "EVENT_KIND_LOG", "LOG_STREAM_STDOUT", "b1")],
                  "logs -o json")
        _, err = self.ctl("logs", rid, "--stage", "third", want=3)
        assert_eq(err, 'kplctl: logs: NOT_FOUND: run %s has no stage "third"\n' % rid,
                  "logs of a stage the run lacks")
        _, err = self.ctl("logs", "nosuchrun", want=3)
        if not err.startswith("kplctl: logs: NOT_FOUND: "):
            raise AssertionError("logs of a missing run: %r" % err)

    def test_logs_of_a_running_run(self):
        gate = os.path.join(self.tmp, "gate")
        path = self.file("gated.yaml", GATED)
        rid = self.submit(path, "-p", "gate=" + gate)
        deadline = time.monotonic() + 30
        while True:
            out, _ = self.ctl("logs", rid, "--stage", "slow", timeout=10)
            if out:
                break
            if time.monotonic() > deadline:
                raise AssertionError("no log line within 30 s")
            time.sleep(0.05)
        # Without --follow: what is stored, and it returns though the run
        # goes on (the subprocess timeout would fail it otherwise).
        assert_eq(out, "before\n", "logs --stage of a running run")
        out, _ = self.ctl("get", rid, "-o", "json")
        assert_eq(json.loads(out)["state"], "RUN_STATE_RUNNING", "the run goes on")

        follower = subprocess.Popen([self.kplctl, "logs", rid, "-f"], env=self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = readline_within(follower.stdout, 60, "logs -f")
            assert_eq(first, "slow | before\n", "logs -f: the stored line first")
            # The gate opens only now: "after" in what follows proves -f
            # was still following (no sleep needed to see it had not ended).
            open(gate, "w").close()
            rest, err = follower.communicate(timeout=30)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert_eq(follower.returncode, 0, "logs -f exit status (stderr %r)" % err)
        assert_eq(rest, "slow | after\n", "logs -f: the line that came later")

    def test_releases_of_an_untouched_deployment(self):
        out, err = self.ctl("releases", "local/default/web")
        assert_eq(out, "SEQ  KIND  REVISION  IMAGE  PREVIOUS  RUN  TIME\n",
                  "releases of a deployment without releases")
        assert_eq(err, "", "releases stderr")
        out, _ = self.ctl("releases", "local/default/web", "-o", "json")
        assert_eq(json.loads(out), {"releases": []}, "releases -o json")
        _, err = self.ctl("releases", "web", want=3)
        if not err.startswith("kplctl: releases: INVALID_ARGUMENT: "):
            raise AssertionError("releases of a bad deployment name: %r" % err)

    def test_live_table_in_tmux(self):
        if not shutil.which("tmux"):
            raise AssertionError("tmux is not installed (./dev installs it)")
        path = self.file("live.yaml", LIVE)
        tmux = ["tmux", "-f", "/dev/null", "-L", self.tmux_sock]
        # The socket's path must stay short (sun_path): not under TEST_TMPDIR.
        sockdir = tempfile.mkdtemp(prefix="kplctl-tmux-")
        env = dict(self.env, TMUX_TMPDIR=sockdir)
        env.pop("TMUX", None)
        cmd = ("env LANG=C.UTF-8 TERM=xterm-256color %s submit %s --watch; echo EXIT=$?; "
               "sleep 120" % (self.kplctl, path))
        subprocess.run(tmux + ["new-session", "-d", "-s", "live", "-x", str(PANE_COLS),
                               "-y", str(PANE_ROWS), cmd], env=env, check=True)
        try:
            screens = []
            deadline = time.monotonic() + 60
            while True:
                # -J joins lines the terminal wrapped: a drawn line that was
                # too wide would come back longer than the pane.
                screen = subprocess.run(tmux + ["capture-pane", "-p", "-J", "-t", "live"],
                                        env=env, capture_output=True, text=True,
                                        check=True).stdout
                screens.append(screen)
                if re.search(r"^EXIT=\d+$", screen, re.M):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("no EXIT= within 60 s; screen:\n" + screen)
                time.sleep(0.05)
        finally:
            subprocess.run(tmux + ["kill-server"], env=env, capture_output=True)
            shutil.rmtree(sockdir, ignore_errors=True)

        lines = screen.rstrip("\n").split("\n")
        show = "\nscreen:\n" + screen
        if "EXIT=0" not in lines:
            raise AssertionError("kplctl did not exit 0" + show)
        rid = lines[0].strip()
        if not re.match(r"^[A-Za-z0-9]+$", rid):
            raise AssertionError("first line is not the run id" + show)
        # While it ran, some frame had a spinner by a RUNNING stage and a
        # ticking elapsed time.
        if not any(re.search("^unit-tests +[\u2800-\u28ff] RUNNING +1 +\\d+\\.\\ds", s, re.M)
                   for s in screens):
            raise AssertionError("no frame showed unit-tests RUNNING with a spinner")
        header = [i for i, l in enumerate(lines) if l.startswith("STAGE ")]
        assert_eq(len(header), 1, "one table header (redrawn in place, not repeated)" + show)
        h = header[0]
        if not re.match(r"^STAGE +STATE +ATTEMPT +ELAPSED +MESSAGE$", lines[h]):
            raise AssertionError("table header: %r" % lines[h])
        for i, name in enumerate(["build", "unit-tests", "lint", "package"]):
            if not re.match(r"^%s +SUCCEEDED +1 +\d+\.\ds" % name, lines[h + 1 + i]):
                raise AssertionError("row of %s: %r%s" % (name, lines[h + 1 + i], show))
        if not any(re.match(r"^run %s SUCCEEDED: " % rid, l) for l in lines):
            raise AssertionError("no final run line" + show)
        if BRAILLE.search(screen):
            raise AssertionError("a spinner frame is left on the screen" + show)
        if any(re.match(r"^\[\d\d:\d\d:\d\d\] ", l) for l in lines):
            raise AssertionError("plain event lines on a terminal" + show)
        too_wide = [l for l in lines if len(l) >= PANE_COLS]
        if too_wide:
            raise AssertionError("lines as wide as the pane (wrapped): %r" % too_wide)
        # The last log lines under the table: the 300-column line cut.
        if not any(re.match(r"^lint +\| 0{20,}$", l) for s in screens
                   for l in s.split("\n")):
            raise AssertionError("lint's wide line never shown (cut to the pane)")

    def close(self):
        self.c.close()
        if self.daemon.proc:
            assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    kpld = os.path.abspath(sys.argv[1])
    kplctl = os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kpl-ctl-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, kplctl, tmp))


if __name__ == "__main__":
    sys.exit(main())
