"""Crash test: 50 concurrent runs while kpld is killed with SIGKILL over and
over, then every run, the ledger its commands keep, and every event stream
are checked for exactly-once and no-gap, no-duplicate.

    /usr/bin/python3 tests/e2e/crash_test.py PATH/TO/kpld

Environment:
    KPL_CRASH_SEED    the seed of the test's random choices (printed at the
                      start; set it to replay the same kill schedule and
                      per-run timings; kpld's own timing still varies)
    KPL_CRASH_KILLS   how many times kpld is killed while serving (default 22)
    KPL_CRASH_RUNS    how many runs (default 50)
    KPL_CRASH_KEEP    if set, the temporary directory is kept and printed

The pipeline: a -> b, a -> c, (b, c) -> d, and a `finally` stage f. Every
stage is a shell script that appends "RUN STAGE ATTEMPT begin" to a ledger
file, prints a stdout line, sleeps, prints a stderr line, sleeps, prints a
last stdout line and appends "RUN STAGE ATTEMPT end ok" (or "end fail" when it
fails on purpose). b always fails its first execution and c does in some runs
(both have `retries: {count: 2, backoff: 100ms}`), so every run should end
SUCCEEDED with some stages on attempt 2 or more.

While the runs go, kpld is killed (SIGKILL) at least KPL_CRASH_KILLS times:
after a random number of new events seen on WatchRuns since it came back, or
a random time, whichever comes first; some restarts are also killed before
kpld serves (in recovery): every second one. Submits that a kill interrupts are retried with
the same idempotency key.

Checks, after the last restart and once every run is final:
  - every key gave one run, the same on every retry and on a final resubmit;
    ListRuns holds exactly one run per key;
  - every run ended SUCCEEDED (and every stage SUCCEEDED);
  - each run's events (WatchRun from 1) have seqs 1..N, no gap, no
    duplicate; one final run event, last; GetRun.last_seq == N;
  - the ledger has no duplicate line; every command that began also ended;
  - every attempt kpld recorded as RUNNING and then "stopped before the
    attempt began" has no ledger line; every attempt kpld ended SUCCEEDED or
    failed on its exit status has the matching ledger lines; no attempt was
    "interrupted by restart";
  - every SUCCEEDED stage: its attempt appears in the ledger exactly once,
    ended ok, and no other attempt of it ended ok; the ledger has no line for
    an attempt kpld never recorded;
  - each attempt's log lines appear once, in order, between its RUNNING
    event and its end;
  - WatchRuns from 1: global seqs strictly increase, no duplicate, no gap,
    and the events are exactly the runs' events;
  - every event a client saw live before a kill is in the final history,
    unchanged (kpld shows nothing that is not durable);
  - no shim process is left; SIGTERM stops kpld with exit status 0.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"

# name, needs, retries?
STAGES = [("a", [], False), ("b", ["a"], True), ("c", ["a"], True), ("d", ["b", "c"], False)]
FINALLY = [("f", [], False)]
ALL_STAGES = [s[0] for s in STAGES + FINALLY]
DELAYS = ["0", "0.02", "0.1", "0.25", "0.5", "0.8", "1.2"]
EVENTS_PER_RUN = 32  # about: 2 run states, 12 stage states, 18 log lines
FINAL_RUN_STATES = ("RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED")
NOT_BEGUN = "restarting: kpld stopped before the attempt began"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)

SCRIPT = r"""L="$KPL_PARAM_LEDGER"
ID="$KPL_RUN_ID $KPL_STAGE $KPL_ATTEMPT"
echo "$ID begin" >> "$L"
echo "out1 $ID"
sleep "$KPL_PARAM_D1_{S}"
echo "err1 $ID" >&2
sleep "$KPL_PARAM_D2_{S}"
if [ "$KPL_PARAM_FAIL_{S}" = 1 ] && [ ! -e "$KPL_WORKSPACE/tried-$KPL_STAGE" ]; then
  : > "$KPL_WORKSPACE/tried-$KPL_STAGE"
  echo "out2 $ID failing"
  echo "$ID end fail" >> "$L"
  exit 3
fi
echo "out2 $ID"
echo "$ID end ok" >> "$L"
"""


def pipeline_text():
    lines = ["name: crash", "params:", "  ledger: { required: true }"]
    for s in ALL_STAGES:
        lines += ["  d1_%s: { default: \"0\" }" % s, "  d2_%s: { default: \"0\" }" % s,
                  "  fail_%s: { default: \"0\" }" % s]

    def stage(name, needs, retries):
        out = ["  - name: %s" % name, "    kind: script"]
        if needs:
            out.append("    needs: [%s]" % ", ".join(needs))
        if retries:
            out.append("    retries: { count: 2, backoff: 100ms }")
        out += ["    with:", "      shell: |"]
        out += ["        " + ln for ln in SCRIPT.replace("{S}", name.upper()).splitlines()]
        return out

    lines.append("stages:")
    for s in STAGES:
        lines += stage(*s)
    lines.append("finally:")
    for s in FINALLY:
        lines += stage(*s)
    return "\n".join(lines) + "\n"


def expected_logs(run_id, stage, attempt, failed):
    """stdout and stderr lines of an attempt whose command ran to its end."""
    ident = "%s %s %d" % (run_id, stage, attempt)
    return (["out1 " + ident, "out2 " + ident + (" failing" if failed else "")],
            ["err1 " + ident])


def ev_key(ev):
    return (ev["run_id"], int(ev.get("seq", 0)))


class Daemon:
    """kpld on 127.0.0.1:0, one data directory across restarts; the current
    client is shared with the submitting threads."""

    def __init__(self, binary, tmp):
        self.binary = binary
        self.data_dir = os.path.join(tmp, "data")
        self.ready = os.path.join(tmp, "ready")
        self.log = os.path.join(tmp, "kpld.log")
        # Stages write only their workspace and what kpld is told to bind
        # (docs/security.md): the ledger lives here.
        self.shared = os.path.join(tmp, "shared")
        os.makedirs(self.shared, exist_ok=True)
        self.proc = None
        self.client = None
        self.gen = 0
        self.cond = threading.Condition()
        self.live = []           # events seen on WatchRuns: (gen, dict)
        self.since_start = 0     # events seen since the current kpld served
        self.reader = None
        self.died = []           # kpld processes that ended without being killed
        self.kills_serving = 0   # serving kplds that SIGKILL ended (their exit status)
        self.kills_startup = 0   # starting kplds that SIGKILL ended
        self.kills_recovery = 0  # ... of them, while recovering and not yet serving
        self.reader_problems = []  # live WatchRuns streams that ended while kpld served

    def _spawn(self):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        with open(self.log, "a") as logf:
            logf.write("==== kpld start (generation %d) ====\n" % (self.gen + 1))
            logf.flush()
            return subprocess.Popen(
                [self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir,
                 "--ready-file", self.ready, "--sandbox-bind", self.shared],
                stdout=logf, stderr=logf)

    def kill_in_startup(self, delay):
        """Starts kpld and SIGKILLs it delay s after it says it is recovering
        (or serves, or 2 s went by): a kill in the middle of recovery."""
        offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        proc = self._spawn()
        end = time.monotonic() + 2
        saw = "nothing"
        while time.monotonic() < end and proc.poll() is None:
            with open(self.log, errors="replace") as f:
                f.seek(offset)
                text = f.read()
            if "recovering" in text:
                saw = "recovering"
                break
            if os.path.exists(self.ready):
                saw = "serving"
                break
            time.sleep(0.001)
        time.sleep(delay)
        served = os.path.exists(self.ready)
        if proc.poll() is not None:
            self.died.append("kpld exited on its own in start-up with status %s"
                             % proc.returncode)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            self.kills_startup += 1
            if saw == "recovering" and not served:
                self.kills_recovery += 1
        return "%s seen, %s" % (saw, "it served" if served else "not serving yet")

    def start(self):
        proc = self._spawn()
        deadline = time.monotonic() + 30
        # kpld writes the ready file (atomically) once it serves.
        while not os.path.exists(self.ready):
            if proc.poll() is not None:
                raise AssertionError("kpld exited with %s before serving; log tail:\n%s"
                                     % (proc.returncode, tail(self.log)))
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("kpld did not serve within 30 s")
            time.sleep(0.01)
        addr = open(self.ready).read().strip()
        c = Client.connect(addr)
        for m in ("SubmitRun", "GetRun", "ListRuns", "WatchRun", "WatchRuns"):
            c.method(P + m)  # load the types before threads share the client
        stream = c.stream(P + "WatchRuns", {"from_global_seq": 0}, timeout=3600)
        with self.cond:
            self.proc = proc
            self.gen += 1
            self.client = c
            self.since_start = 0
            self.cond.notify_all()
        self.reader = threading.Thread(target=self._read, args=(stream, self.gen), daemon=True)
        self.reader.start()
        return c

    def _read(self, stream, gen):
        why = "the stream ended"
        try:
            for ev in stream:
                d = Client.to_dict(ev)
                with self.cond:
                    self.live.append((gen, d))
                    if gen == self.gen:
                        self.since_start += 1
                    self.cond.notify_all()
        except grpc.RpcError as e:
            why = "%s %s" % (e.code(), e.details())
        except ValueError as e:
            why = "channel closed: %s" % e
        # kill9 and stop take the client away before they signal kpld: an
        # end while this generation still serves is the stream failing.
        with self.cond:
            if gen == self.gen and self.client is not None:
                self.reader_problems.append("kpld %d: WatchRuns ended while it served: %s"
                                            % (gen, why))

    def current(self, deadline):
        """(client, generation) of a serving kpld, waiting for one."""
        with self.cond:
            while self.client is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no kpld serving before the deadline")
                self.cond.wait(left)
            return self.client, self.gen

    def wait_change(self, gen, timeout):
        with self.cond:
            end = time.monotonic() + timeout
            while self.gen == gen and time.monotonic() < end:
                self.cond.wait(end - time.monotonic())

    def kill9(self):
        with self.cond:
            proc, c = self.proc, self.client
            self.client = None
            self.proc = None
        if proc.poll() is not None:
            self.died.append("kpld %d exited on its own with status %s"
                             % (self.gen, proc.returncode))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            self.kills_serving += 1
        c.close()
        if self.reader:
            self.reader.join(10)

    def stop(self):
        with self.cond:
            proc, c = self.proc, self.client
            self.client = None
            self.proc = None
        c.close()
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)


def tail(path, n=8000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return "(%s)" % e


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, problems, limit=15):
        """One assertion group: problems is a list of strings (empty = pass)."""
        if problems:
            self.failed += 1
            print("FAIL %s: %d problem(s)" % (name, len(problems)), flush=True)
            for p in problems[:limit]:
                print("    " + p, flush=True)
            if len(problems) > limit:
                print("    ... and %d more" % (len(problems) - limit), flush=True)
        else:
            self.passed += 1
            print("PASS %s" % name, flush=True)


class CrashTest:
    def __init__(self, binary, tmp, seed, n_runs, n_kills):
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_runs = n_runs
        self.n_kills = n_kills
        self.daemon = Daemon(binary, tmp)
        self.ledger = os.path.join(self.daemon.shared, "ledger")
        open(self.ledger, "w").close()
        self.text = pipeline_text()
        self.checks = Checks()
        self.lock = threading.Lock()
        self.submit_ids = {}    # key -> [run ids answered]
        self.submit_errors = []
        self.params = []
        for i in range(n_runs):
            p = {"ledger": self.ledger}
            for s in ALL_STAGES:
                p["d1_" + s] = self.rng.choice(DELAYS)
                p["d2_" + s] = self.rng.choice(DELAYS)
                p["fail_" + s] = "0"
            p["fail_b"] = "1"
            p["fail_c"] = self.rng.choice(["0", "1"])
            self.params.append(p)
        self.keys = ["crash-%d-%02d" % (seed, i) for i in range(n_runs)]
        self.shim_programs = set()  # argv[0] of shims seen running after a kill

    # -- submitting -------------------------------------------------------

    def submit_one(self, i, deadline):
        key = self.keys[i]
        req = {"pipeline": self.text, "params": self.params[i], "idempotency_key": key}
        tries = 0
        while time.monotonic() < deadline:
            c, gen = self.daemon.current(deadline)
            tries += 1
            try:
                run = c.call(P + "SubmitRun", req, timeout=15)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    with self.lock:
                        self.submit_errors.append("%s: %s %s" % (key, e.code(), e.details()))
                    return
                self.daemon.wait_change(gen, 0.5)
                continue
            except ValueError:  # the channel was closed under us: kpld was killed
                self.daemon.wait_change(gen, 0.5)
                continue
            with self.lock:
                self.submit_ids.setdefault(key, []).append(run.id)
            return
        with self.lock:
            self.submit_errors.append("%s: not submitted before the deadline (%d tries)"
                                      % (key, tries))

    # -- the kill loop ------------------------------------------------------

    def kill_loop(self, submitters):
        # Spread the kills over the events still to come (as far as they are
        # seen: events committed while no client watched are not counted).
        expected = EVENTS_PER_RUN * self.n_runs
        seen_total = kills = startup_kills = 0
        while kills < self.n_kills:
            left = max(self.n_kills - kills, 1)
            remaining = max(expected - seen_total, 0)
            target = self.rng.randint(0, max(2, 2 * remaining // left))
            tcap = self.rng.uniform(0.02, 0.8)
            t0 = time.monotonic()
            with self.daemon.cond:
                while self.daemon.since_start < target and time.monotonic() - t0 < tcap:
                    self.daemon.cond.wait(tcap - (time.monotonic() - t0))
                seen = self.daemon.since_start
            gen = self.daemon.gen
            self.daemon.kill9()
            self.shim_programs.update(name for _, name in self.shims())
            seen_total += seen
            kills += 1
            pending = sum(1 for t in submitters if t.is_alive())
            with open(self.ledger) as f:
                done = sum(1 for ln in f if " f " in ln and ln.endswith(" end ok\n"))
            print("kill %2d/%d: kpld %d after %d/%d events, %.2fs; finally stages done %d/%d; "
                  "submits pending %d" % (kills, self.n_kills, gen, seen, target,
                                          time.monotonic() - t0, done, self.n_runs, pending),
                  flush=True)
            if kills % 2 == 1:  # half the restarts are killed again in start-up
                delay = self.rng.uniform(0.0, 0.008)
                what = self.daemon.kill_in_startup(delay)
                startup_kills += 1
                print("    and once more in start-up, %.3fs after %s" % (delay, what), flush=True)
            self.daemon.start()
        return kills, startup_kills

    def shims(self):
        """(pid, program name) of each shim of this data dir now running."""
        names = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if len(cmd) > 2 and cmd[1] == b"__shim" and \
                    self.daemon.data_dir.encode() in cmd[2]:
                names.append((pid, os.path.basename(cmd[0]).decode()))
        return names

    # -- the final state ----------------------------------------------------

    def wait_all(self, ids, deadline):
        """Every run's events from 1 to its end (WatchRun), or the problem."""
        events, problems = {}, []
        c, _ = self.daemon.current(deadline)
        for rid in ids:
            left = deadline - time.monotonic()
            if left <= 0:
                problems.append("run %s: not final before the deadline" % rid)
                continue
            try:
                evs = [Client.to_dict(e) for e in
                       c.stream(P + "WatchRun", {"id": rid, "from_seq": 1}, timeout=left)]
                events[rid] = evs
            except grpc.RpcError as e:
                problems.append("run %s: WatchRun ended with %s %s" % (rid, e.code(), e.details()))
                try:
                    events[rid] = [Client.to_dict(e) for e in
                                   c.stream(P + "WatchRun", {"id": rid, "from_seq": 1},
                                            timeout=1)]
                except grpc.RpcError:
                    pass
        return events, problems

    def global_events(self, c, total):
        """WatchRuns from 1 until total events came (or nothing more comes)."""
        out = []
        stream = c.stream(P + "WatchRuns", {"from_global_seq": 1}, timeout=30)
        done = threading.Event()

        def stop_later():
            if not done.wait(20):
                stream.cancel()
        threading.Thread(target=stop_later, daemon=True).start()
        try:
            for ev in stream:
                out.append(Client.to_dict(ev))
                if len(out) >= total:
                    break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise
        done.set()
        stream.cancel()
        return out

    def read_ledger(self):
        lines = {}
        problems = []
        with open(self.ledger) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if len(parts) not in (4, 5) or not line.endswith("\n"):
                    problems.append("ledger line %d malformed: %r" % (n, line))
                    continue
                rid, stage, att, what = parts[0], parts[1], int(parts[2]), " ".join(parts[3:])
                lines.setdefault((rid, stage, att), []).append(what)
        return lines, problems

    def run(self):
        ck = self.checks
        print("seed %d (rerun with KPL_CRASH_SEED=%d); %d runs, %d kills; tmp %s"
              % (self.seed, self.seed, self.n_runs, self.n_kills, self.tmp), flush=True)
        t_start = time.monotonic()
        self.daemon.start()
        deadline = time.monotonic() + 150
        submitters = [threading.Thread(target=self.submit_one, args=(i, deadline), daemon=True)
                      for i in range(self.n_runs)]
        for t in submitters:
            t.start()
        kills, startup_kills = self.kill_loop(submitters)
        print("killed kpld %d times while serving and %d times in start-up (%.1fs)"
              % (kills, startup_kills, time.monotonic() - t_start), flush=True)
        for t in submitters:
            t.join(max(0.0, deadline - time.monotonic()))
        d = self.daemon
        ck.check("every one of the %d kill -9 ended a serving kpld" % self.n_kills,
                 [] if d.kills_serving == self.n_kills else
                 ["%d of %d kills ended a running kpld" % (d.kills_serving, self.n_kills)])
        ck.check("half the restarts were killed again in start-up, some during recovery",
                 ([] if d.kills_startup == self.n_kills // 2 else
                  ["%d start-up kills, want %d" % (d.kills_startup, self.n_kills // 2)]) +
                 ([] if d.kills_recovery >= 1 else
                  ["no kill while kpld was recovering and not yet serving"]))
        print("start-up kills: %d, %d of them during recovery"
              % (d.kills_startup, d.kills_recovery), flush=True)
        ck.check("kpld never ended on its own", self.daemon.died)
        # kpld starts kpl-shim from its own directory (libc only, cheap to
        # exec), never itself, when the build put kpl-shim beside it.
        ck.check("the shims that outlived a kill ran as kpl-shim",
                 [] if self.shim_programs == {"kpl-shim"} else
                 ["shim programs seen: %r" % sorted(self.shim_programs)])

        # Submits: one run per key, the same on every answer and on resubmit.
        problems = list(self.submit_errors)
        ids = {}
        for key in self.keys:
            got = set(self.submit_ids.get(key, []))
            if len(got) != 1:
                problems.append("key %s answered with runs %r" % (key, sorted(got)))
            if got:
                ids[key] = sorted(got)[0]
        c, _ = self.daemon.current(deadline)
        for i, key in enumerate(self.keys):
            try:
                again = c.call(P + "SubmitRun", {"pipeline": self.text, "params": self.params[i],
                                                 "idempotency_key": key}, timeout=15)
            except grpc.RpcError as e:
                problems.append("resubmit of %s: %s %s" % (key, e.code(), e.details()))
                continue
            if key in ids and again.id != ids[key]:
                problems.append("resubmit of %s gave run %s, first %s" % (key, again.id, ids[key]))
            ids.setdefault(key, again.id)
        listed, token = [], ""
        while True:
            page = c.call(P + "ListRuns", {"page_size": 500, "page_token": token})
            listed += [Client.to_dict(r) for r in page.runs]
            token = page.next_page_token
            if not token:
                break
        by_key = {}
        for r in listed:
            by_key.setdefault(r.get("idempotency_key", ""), []).append(r["id"])
        for key in self.keys:
            if by_key.get(key) != [ids.get(key)]:
                problems.append("ListRuns: key %s has runs %r, submit gave %s"
                                % (key, by_key.get(key), ids.get(key)))
        extra = set(by_key) - set(self.keys)
        if extra:
            problems.append("ListRuns: runs under unknown keys %r" % sorted(extra))
        if len(set(ids.values())) != len(ids):
            problems.append("two keys share a run")
        ck.check("idempotency keys: one run per key across crashes", problems)
        run_ids = sorted(set(ids.values()))

        # Every run final, and SUCCEEDED.
        events, problems = self.wait_all(run_ids, time.monotonic() + 120)
        print("all runs waited for (%.1fs)" % (time.monotonic() - t_start), flush=True)
        runs = {}
        for rid in run_ids:
            runs[rid] = Client.to_dict(c.call(P + "GetRun", {"id": rid}))
        for rid, r in runs.items():
            if r["state"] not in FINAL_RUN_STATES:
                problems.append("run %s is %s" % (rid, r["state"]))
        ck.check("every run ended in a final state", problems)
        problems = []
        for rid, r in sorted(runs.items()):
            if r["state"] != "RUN_STATE_SUCCEEDED":
                problems.append("run %s ended %s: %s; stages %s" % (
                    rid, r["state"], r.get("message", ""),
                    ", ".join("%s=%s/%s(%s)" % (s["name"], s["state"][12:], s.get("attempt", 0),
                                                s.get("message", "")) for s in r["stages"])))
            else:
                for s in r["stages"]:
                    if s["state"] != "STAGE_STATE_SUCCEEDED":
                        problems.append("run %s stage %s is %s" % (rid, s["name"], s["state"]))
        ck.check("every run SUCCEEDED", problems)

        # Per-run event sequences.
        problems = []
        for rid in run_ids:
            evs = events.get(rid, [])
            got = [int(e.get("seq", 0)) for e in evs]
            if got != list(range(1, len(evs) + 1)):
                dup = sorted({s for s in got if got.count(s) > 1})
                problems.append("run %s: seqs are not 1..%d (duplicates %r, first bad at %r)"
                                % (rid, len(evs), dup,
                                   next((i + 1 for i, s in enumerate(got) if s != i + 1), None)))
            finals = [i for i, e in enumerate(evs) if e.get("kind") == "EVENT_KIND_RUN_STATE"
                      and e.get("run_state") in FINAL_RUN_STATES]
            if finals != [len(evs) - 1]:
                problems.append("run %s: final run events at %r of %d" % (rid, finals, len(evs)))
            if int(runs[rid].get("last_seq", 0)) != len(evs):
                problems.append("run %s: last_seq %s, %d events"
                                % (rid, runs[rid].get("last_seq"), len(evs)))
        ck.check("each run's events: seqs 1..N, no gap, no duplicate", problems)

        self.check_attempts(run_ids, runs, events)

        # Global seqs.
        total = sum(len(v) for v in events.values())
        glob = self.global_events(c, total)
        problems = []
        gseqs = [int(e.get("global_seq", 0)) for e in glob]
        for a, b in zip(gseqs, gseqs[1:]):
            if b <= a:
                problems.append("global_seq %d follows %d" % (b, a))
        if len(set(gseqs)) != len(gseqs):
            problems.append("duplicate global seqs")
        if gseqs != list(range(1, len(gseqs) + 1)):
            problems.append("global seqs are not 1..%d: gaps after %r" % (
                len(gseqs), [a for a, b in zip(gseqs, gseqs[1:]) if b != a + 1][:10]))
        per_run = {ev_key(e): e for evs in events.values() for e in evs}
        seen = set()
        for e in glob:
            k = ev_key(e)
            if k in seen:
                problems.append("WatchRuns sent %r twice" % (k,))
            seen.add(k)
            if per_run.get(k) != e:
                problems.append("WatchRuns event %r differs from WatchRun's: %r vs %r"
                                % (k, e, per_run.get(k)))
        missing = set(per_run) - seen
        if missing:
            problems.append("%d events of WatchRun missing from WatchRuns, e.g. %r"
                            % (len(missing), sorted(missing)[:5]))
        ck.check("WatchRuns from 1: global seqs 1..M strictly increasing, every event once",
                 problems)

        # What was seen live before a kill survives it.
        problems = []
        with self.daemon.cond:
            live = list(self.daemon.live)
        for gen, e in live:
            k = ev_key(e)
            if k[0] not in events:
                problems.append("event %r seen live (kpld %d) of an unknown run" % (k, gen))
            elif per_run.get(k) != e:
                problems.append("event seen live (kpld %d) %r is now %r" % (gen, e, per_run.get(k)))
        print("%d events were seen live across %d kpld generations"
              % (len(live), self.daemon.gen), flush=True)
        if len(live) < self.n_runs:
            problems.append("only %d events seen live for %d runs" % (len(live), self.n_runs))
        problems += self.daemon.reader_problems
        ck.check("every event seen live before a kill is in the final history, unchanged",
                 problems)

        # Nothing left behind, clean stop. kpld reaps every shim it started
        # (it posix_spawns them and follows a pidfd: nothing else waits).
        kpld_pid = self.daemon.proc.pid
        zombies = []
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "Z" and int(fields[1]) == kpld_pid:
                zombies.append(pid)
        ck.check("kpld left no zombie child", ["zombie pids %s" % zombies] if zombies else [])
        rc = self.daemon.stop()
        ck.check("SIGTERM stops kpld with exit status 0",
                 [] if rc == 0 else ["exit status %s" % rc])
        ck.check("no shim process left",
                 ["shim pid %s still runs: %s" % (pid, name) for pid, name in self.shims()])
        print("total %.1fs" % (time.monotonic() - t_start), flush=True)

    def check_attempts(self, run_ids, runs, events):
        ck = self.checks
        ledger, lproblems = self.read_ledger()
        dup, unended, outcome = [], [], []
        exactly_once, unrecorded, logs = [], [], []
        interrupted = []
        recorded = set()
        n_not_begun = n_retried = 0
        for rid in run_ids:
            evs = events.get(rid, [])
            final_stage = {s["name"]: s for s in runs[rid]["stages"]}
            for stage in ALL_STAGES:
                # Attempts from the stage's state events: RUNNING, then its end.
                atts = {}      # attempt -> {"start": idx, "end": idx, "end_ev": ev}
                order = []
                cur = None
                for i, e in enumerate(evs):
                    if e.get("stage") != stage or e.get("kind") != "EVENT_KIND_STAGE_STATE":
                        continue
                    a = int(e.get("attempt", 0))
                    st = e.get("stage_state")
                    if st == "STAGE_STATE_RUNNING":
                        if a in atts:
                            dup.append("run %s stage %s: attempt %d RUNNING twice" % (rid, stage, a))
                        if order and a <= order[-1]:
                            dup.append("run %s stage %s: attempt %d after %d"
                                       % (rid, stage, a, order[-1]))
                        atts[a] = {"start": i, "end": None, "end_ev": None}
                        order.append(a)
                        cur = a
                    elif cur is not None and atts[cur]["end"] is None:
                        if a != cur:
                            outcome.append("run %s stage %s: attempt %d ended by an event of "
                                           "attempt %d" % (rid, stage, cur, a))
                        atts[cur]["end"] = i
                        atts[cur]["end_ev"] = e
                        cur = None
                ok_attempts = []
                for a in order:
                    recorded.add((rid, stage, a))
                    end = atts[a]["end_ev"] or {}
                    est, msg = end.get("stage_state"), end.get("message", "")
                    lines = ledger.get((rid, stage, a), [])
                    tag = "run %s stage %s attempt %d" % (rid, stage, a)
                    if lines.count("begin") > 1:
                        dup.append("%s: the command began %d times" % (tag, lines.count("begin")))
                    if "begin" in lines and not ({"end ok", "end fail"} & set(lines)):
                        unended.append("%s: the command began but never ended (%r)"
                                       % (tag, lines))
                    if len([x for x in lines if x.startswith("end")]) > 1:
                        dup.append("%s: the command ended %r" % (tag, lines))
                    if "interrupted by restart" in msg:
                        interrupted.append("%s: %s (ledger %r)" % (tag, msg, lines))
                    if est == "STAGE_STATE_PENDING" and msg.startswith(NOT_BEGUN):
                        n_not_begun += 1
                        if lines:
                            outcome.append("%s: kpld says it never began, the ledger has %r"
                                           % (tag, lines))
                    elif est == "STAGE_STATE_SUCCEEDED":
                        if lines != ["begin", "end ok"]:
                            outcome.append("%s: SUCCEEDED, the ledger has %r" % (tag, lines))
                    elif est in ("STAGE_STATE_PENDING", "STAGE_STATE_FAILED") and \
                            "exited with status 3" in msg:
                        n_retried += 1
                        if lines != ["begin", "end fail"]:
                            outcome.append("%s: failed with %r, the ledger has %r"
                                           % (tag, msg, lines))
                    elif "interrupted by restart" not in msg:
                        outcome.append("%s: ended %s %r (ledger %r)" % (tag, est, msg, lines))
                    if "end ok" in lines:
                        ok_attempts.append(a)
                    # Logs of the attempt: once, in order, inside the attempt.
                    lo = [(i, e) for i, e in enumerate(evs)
                          if e.get("kind") == "EVENT_KIND_LOG" and e.get("stage") == stage
                          and int(e.get("attempt", 0)) == a
                          and e.get("stream") in ("LOG_STREAM_STDOUT", "LOG_STREAM_STDERR")]
                    out = [e.get("message", "") for _, e in lo
                           if e.get("stream") == "LOG_STREAM_STDOUT"]
                    err = [e.get("message", "") for _, e in lo
                           if e.get("stream") == "LOG_STREAM_STDERR"]
                    if "end ok" in lines or "end fail" in lines:
                        want = expected_logs(rid, stage, a, "end fail" in lines)
                        if (out, err) != want:
                            logs.append("%s: stdout %r stderr %r, want %r %r"
                                        % (tag, out, err, want[0], want[1]))
                    elif not lines and lo:
                        logs.append("%s: no command ran, logs %r" % (tag, out + err))
                    endi = atts[a]["end"] if atts[a]["end"] is not None else len(evs)
                    for i, e in lo:
                        if not atts[a]["start"] < i < endi:
                            logs.append("%s: log line %r at event %d, outside the attempt "
                                        "(%d..%d)" % (tag, e.get("message"), i + 1,
                                                      atts[a]["start"] + 1, endi + 1))
                fs = final_stage.get(stage, {})
                if fs.get("state") == "STAGE_STATE_SUCCEEDED":
                    a = int(fs.get("attempt", 0))
                    lines = ledger.get((rid, stage, a), [])
                    if lines != ["begin", "end ok"]:
                        exactly_once.append("run %s stage %s SUCCEEDED on attempt %d; ledger %r"
                                            % (rid, stage, a, lines))
                    if ok_attempts != [a]:
                        exactly_once.append("run %s stage %s SUCCEEDED on attempt %d; attempts "
                                            "that ended ok in the ledger: %r"
                                            % (rid, stage, a, ok_attempts))
                    if order and order[-1] != a:
                        exactly_once.append("run %s stage %s: GetRun attempt %d, last RUNNING "
                                            "event attempt %d" % (rid, stage, a, order[-1]))
        for (rid, stage, a), lines in sorted(ledger.items()):
            if (rid, stage, a) not in recorded:
                unrecorded.append("ledger has %r for run %s stage %s attempt %d, which kpld "
                                  "never recorded as RUNNING" % (lines, rid, stage, a))
        print("attempts: %d never began (restarted afresh), %d failed on purpose and retried; "
              "%d ledger entries" % (n_not_begun, n_retried, len(ledger)), flush=True)
        ck.check("ledger well formed, no command began or ended twice", lproblems + dup)
        ck.check("every command that began also ended (none killed by a restart)", unended)
        ck.check("no attempt was 'interrupted by restart'", interrupted)
        ck.check("every attempt's recorded end matches the ledger", outcome)
        ck.check("every SUCCEEDED stage ran its command exactly once, only that attempt ok",
                 exactly_once)
        ck.check("the ledger has no line for an attempt kpld never recorded", unrecorded)
        ck.check("each attempt's log lines appear once, in order, within the attempt", logs)


def main():
    binary = os.path.abspath(sys.argv[1])
    seed = int(os.environ.get("KPL_CRASH_SEED") or random.SystemRandom().randrange(1, 10**9))
    n_kills = int(os.environ.get("KPL_CRASH_KILLS") or 22)
    n_runs = int(os.environ.get("KPL_CRASH_RUNS") or 50)
    tmp = tempfile.mkdtemp(prefix="kpl-crash-", dir=os.environ.get("TEST_TMPDIR"))
    t = CrashTest(binary, tmp, seed, n_runs, n_kills)
    try:
        t.run()
    except Exception:
        t.checks.failed += 1
        print("FAIL the test could not complete:", flush=True)
        traceback.print_exc()
        if t.daemon.proc:
            try:
                t.daemon.proc.kill()
                t.daemon.proc.wait()
            except Exception:
                pass
    if t.checks.failed:
        print("seed %d; kpld log (%s), tail:" % (seed, t.daemon.log))
        print(tail(t.daemon.log))
    print("%d passed, %d failed" % (t.checks.passed, t.checks.failed))
    return 1 if t.checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
