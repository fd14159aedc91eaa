"""The spawner (stages/spawner.h): one long-lived process that forks every
script attempt's shim for kpld, without an exec.

    /usr/bin/python3 tests/e2e/spawner_test.py PATH/TO/kpld

- a shim is the spawner's child, not kpld's, and shows `kpl-shim __shim DIR`
  as its cmdline (what a restarted kpld and the crash test recognise);
- the spawner killed (-9) is survived: a stage it started goes on and ends
  once, the next attempt starts another spawner;
- a spawner that hangs (SIGSTOP) is killed after kpld's bound: the attempt
  it owed fails without running, the next one gets a new spawner;
- kpld killed (-9) while the spawner has attempts in flight: every command
  ran exactly once, every run succeeds after the restart, and the old
  spawner exits (it saw EOF) while the shims live on;
- KPL_NO_SPAWNER=1: kpld starts each shim itself (posix_spawn), as before.

All of it twice: in bubblewrap, and with --sandbox none (where the spawner
makes each attempt's directory).

Waiting is on events, files and processes, with generous deadlines.
"""

import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon, P, submit, watch, wait_for_log, assert_eq, run_suite  # noqa: E402
from kplgrpc import Client  # noqa: E402

DEADLINE = 60

# A stage that notes its run in a ledger, then waits for a go file.
HELD = """name: held
params:
  go: {}
  ledger: {}
stages:
  - name: work
    kind: script
    with:
      shell: |
        echo "ran $KPL_RUN_ID" >> "$KPL_PARAM_LEDGER"
        echo started
        while [ ! -e "$KPL_PARAM_GO" ]; do sleep 0.02; done
        echo finished
"""

QUICK = """name: quick
stages:
  - {name: t, kind: script, with: {command: ["sh", "-c", "echo hello"]}}
"""


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def alive(pid):
    """True if pid runs (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def spawners_of(kpld_pid):
    return [p for p in pids() if ppid(p) == kpld_pid and
            cmdline(p)[1:2] == [b"__spawner"]]


def shims_in(data_dir):
    """{pid: DIR} of the shims whose DIR is under data_dir."""
    out = {}
    for p in pids():
        cmd = cmdline(p)
        if len(cmd) > 2 and cmd[1] == b"__shim" and data_dir.encode() in cmd[2]:
            out[p] = cmd[2].decode()
    return out


def await_(what, fn):
    deadline = time.monotonic() + DEADLINE
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("not within %d s: %s" % (DEADLINE, what))
        time.sleep(0.02)


def final(c, rid):
    events = watch(c, rid)
    assert_eq([int(e["seq"]) for e in events], list(range(1, len(events) + 1)),
              "run %s: no gap, no duplicate" % rid)
    return events


class Suite:
    def __init__(self, binary, tmp, extra=()):
        self.binary = binary
        self.tmp = tmp
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             ["--sandbox-bind", self.shared] + list(extra))
        self.c = self.daemon.start()
        self.n = 0

    def held(self, c, daemon_tag=""):
        """Submits a HELD run; returns (run id, go path, ledger path)."""
        self.n += 1
        go = os.path.join(self.shared, "go-%s%d" % (daemon_tag, self.n))
        ledger = os.path.join(self.shared, "ledger-%s%d" % (daemon_tag, self.n))
        run = Client.to_dict(submit(c, HELD, {"go": go, "ledger": ledger}))
        return run["id"], go, ledger

    def check_done(self, c, rid, go, ledger):
        open(go, "w").close()
        events = final(c, rid)
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        # After a kill -9 an attempt kpld claimed before its shim began is
        # started again (and says so): the command's lines come once.
        assert_eq([m for m in logs if m in ("started", "finished")], ["started", "finished"],
                  "run %s: its log lines %r" % (rid, logs))
        assert_eq(events[-1]["run_state"], "RUN_STATE_SUCCEEDED", "run %s: final state" % rid)
        assert_eq(open(ledger).read(), "ran %s\n" % rid, "run %s: ran exactly once" % rid)

    def test_shim_is_the_spawners_child(self):
        kpld = self.daemon.proc.pid
        rid, go, ledger = self.held(self.c)
        wait_for_log(self.c, rid)
        shims = shims_in(self.daemon.data_dir)
        assert_eq(len(shims), 1, "shims running")
        (shim, d), = shims.items()
        assert_eq(os.path.basename(d), "work.1", "the shim's DIR in its cmdline")
        assert_eq(os.path.basename(cmdline(shim)[0].decode()), "kpl-shim", "its program")
        sp = ppid(shim)
        assert_eq(cmdline(sp)[1:2], [b"__spawner"], "the shim's parent is the spawner")
        assert_eq(ppid(sp), kpld, "the spawner is kpld's child")
        self.check_done(self.c, rid, go, ledger)

    def test_spawner_killed_is_survived(self):
        kpld = self.daemon.proc.pid
        # A stage started by the spawner outlives it.
        rid, go, ledger = self.held(self.c)
        wait_for_log(self.c, rid)
        old, = spawners_of(kpld)
        os.kill(old, signal.SIGKILL)
        await_("the spawner gone", lambda: not alive(old))
        self.check_done(self.c, rid, go, ledger)
        # The next attempt starts another spawner and runs.
        run = Client.to_dict(submit(self.c, QUICK))
        events = final(self.c, run["id"])
        assert_eq(events[-1]["run_state"], "RUN_STATE_SUCCEEDED", "a run after the kill")
        new = spawners_of(kpld)
        if len(new) != 1 or old in new:
            raise AssertionError("spawners after the kill: %r (the killed one: %d)"
                                 % (new, old))

    def test_hung_spawner_is_replaced(self):
        kpld = self.daemon.proc.pid
        final(self.c, Client.to_dict(submit(self.c, QUICK))["id"])
        hung, = spawners_of(kpld)
        os.kill(hung, signal.SIGSTOP)
        # No answer within kpld's bound (10 s): the spawner is killed and
        # the attempt fails without its command having run.
        rid, go, ledger = self.held(self.c)
        events = final(self.c, rid)
        assert_eq(events[-1]["run_state"], "RUN_STATE_FAILED", "the run's end")
        said = [e.get("message", "") for e in events]
        if not any("did not answer in time" in m and "did not run" in m for m in said):
            raise AssertionError("no event says why: %r" % said)
        assert_eq(os.path.exists(ledger), False, "the command ran")
        await_("the hung spawner killed", lambda: not alive(hung))
        run = Client.to_dict(submit(self.c, QUICK))
        assert_eq(final(self.c, run["id"])[-1]["run_state"], "RUN_STATE_SUCCEEDED",
                  "a run after it")
        new = spawners_of(kpld)
        if len(new) != 1 or hung in new:
            raise AssertionError("spawners: %r (the hung one: %d)" % (new, hung))

    def test_kpld_kill9_with_attempts_in_flight(self):
        kpld = self.daemon.proc.pid
        final(self.c, Client.to_dict(submit(self.c, QUICK))["id"])
        spawner, = spawners_of(kpld)
        # 32 runs submitted from 4 threads (each with an idempotency key),
        # kpld killed as soon as one command ran: starts are in flight,
        # some attempts forked, some claimed, some not begun.
        keys = ["k%d" % i for i in range(32)]
        go = {k: os.path.join(self.shared, "go-" + k) for k in keys}
        ledger = {k: os.path.join(self.shared, "ledger-" + k) for k in keys}
        addr = self.daemon.addr

        def submitter(mine):
            c = Client.connect(addr)
            try:
                for k in mine:
                    submit(c, HELD, {"go": go[k], "ledger": ledger[k]}, key=k)
            except Exception:
                pass  # kpld killed under it: resubmitted below
            finally:
                c.close()

        threads = [threading.Thread(target=submitter, args=(keys[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        await_("a first command", lambda: any(os.path.exists(p) for p in ledger.values()))
        self.c.close()
        self.daemon.stop(signal.SIGKILL)
        for t in threads:
            t.join()
        # The spawner sees EOF and exits; the shims it forked live on.
        await_("the old spawner exits", lambda: not alive(spawner))
        self.c = self.daemon.start()
        # The same keys: a run that was submitted is that run, not another.
        runs = {k: Client.to_dict(submit(self.c, HELD, {"go": go[k], "ledger": ledger[k]},
                                         key=k))["id"] for k in keys}
        for k in keys:
            await_("run %s's command" % runs[k], lambda: os.path.exists(ledger[k]))
        for k in keys:
            self.check_done(self.c, runs[k], go[k], ledger[k])

    def test_no_spawner_env_starts_shims_directly(self):
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")
        os.environ["KPL_NO_SPAWNER"] = "1"
        try:
            self.c = self.daemon.start()
        finally:
            del os.environ["KPL_NO_SPAWNER"]
        kpld = self.daemon.proc.pid
        rid, go, ledger = self.held(self.c, "n")
        wait_for_log(self.c, rid)
        (shim, _), = shims_in(self.daemon.data_dir).items()
        assert_eq(ppid(shim), kpld, "the shim's parent is kpld")
        assert_eq(spawners_of(kpld), [], "no spawner")
        self.check_done(self.c, rid, go, ledger)

    def close(self):
        self.c.close()
        if self.daemon.proc:
            assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    rc = 0
    # In bubblewrap kpld makes each attempt's directory; unconfined the
    # spawner does (SPAWNER_MKDIR).
    for extra in ([], ["--sandbox", "none"]):
        print("-- kpld %s" % " ".join(extra or ["(sandboxed)"]), flush=True)
        tmp = tempfile.mkdtemp(prefix="kpl-spawner-", dir=os.environ.get("TEST_TMPDIR"))
        rc |= run_suite(Suite, Suite(binary, tmp, extra))
    return rc


if __name__ == "__main__":
    sys.exit(main())
