"""restart_bench - how long a kpld killed with SIGKILL takes to serve again,
and to have every unfinished run resumed, with N runs in flight.

    /usr/bin/python3 bench/restart_bench.py PATH/TO/kpld [--runs 1000,10000] [--tmp DIR]
                                            [--perf FILE]

For each N: a fresh kpld (--sandbox none: N/3 sandboxes would measure
bubblewrap) gets N runs, a third of each kind:
  - script: a command running under its shim, blocked on a lock the bench
    holds (`flock -s LOCK sh -c 'echo $KPL_RUN_ID >> LEDGER'`);
  - approval: a stage WAITING for someone;
  - retry: a script that failed its first attempt, its retry scheduled an hour
    later (stage PENDING).
Once all N are in those states (the flock processes counted in /proc, the
WAITING and PENDING events counted on one WatchRuns stream), kpld's RSS is
read, it is killed with SIGKILL and started again on the same data dir:

  restart_serving_s      from exec to the ready file (kpld serves after its
                         recovery has re-attached every run: engine_start
                         recovers before the API starts)
  restart_resumed_s      from kpld's first log line to its "recovered N
                         unfinished runs in X ms" line (the engine's recovery)
  rss_per_run_kib        kpld's VmRSS before the kill / N

Then it checks what "resumed" promises: the lock is released and every
script run SUCCEEDS with its command run exactly once (one ledger line per
run, no run twice), every approval is still WAITING, every retry still
PENDING; kpld then stops with SIGTERM and must exit 0.

Prints "name=value (details)" lines. Needs python3-grpcio, flock(1).
"""

import argparse
import collections
import concurrent.futures
import datetime
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
from kplgrpc import Client  # noqa: E402

P = "kpl.v1.Pipelines/"


def pipelines(lock, ledger):
    script = ("name: rb-script\nstages:\n  - name: s\n    kind: script\n"
              "    with: { command: [\"flock\", \"-s\", \"%s\", \"sh\", \"-c\", "
              "\"echo $KPL_RUN_ID >> %s\"] }\n" % (lock, ledger))
    approval = ("name: rb-approval\nstages:\n  - name: a\n    kind: approval\n"
                "    timeout: 24h\n    with: { message: \"restart bench\" }\n")
    retry = ("name: rb-retry\nstages:\n  - name: r\n    kind: script\n"
             "    retries: { count: 1, backoff: 1h, max_backoff: 1h }\n"
             "    with: { command: [\"false\"] }\n")
    return [script, approval, retry]


class Kpld:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.data = os.path.join(tmp, "data")
        self.ready = os.path.join(tmp, "ready")
        self.log = os.path.join(tmp, "kpld.log")
        self.proc = None

    def start(self, timeout=600, wrapper=()):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        logf = open(self.log, "a")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            list(wrapper) + [self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data,
             "--ready-file", self.ready, "--sandbox", "none", "--log-level", "info",
             "--max-streams-per-conn", "1024"],
            stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise SystemExit("kpld exited %s; see %s" % (self.proc.returncode, self.log))
            if time.monotonic() - t0 > timeout:
                raise SystemExit("kpld did not serve within %d s" % timeout)
            time.sleep(0.01)
        took = time.monotonic() - t0
        with open(self.ready) as f:
            addr = f.readline().strip()
        return Client.connect(addr), took

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def count_flocks(lock):
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd[:3] == [b"flock", b"-s", lock.encode()]:
            n += 1
    return n


PERF = None


def one(binary, n, tmp_root):
    tmp = tempfile.mkdtemp(prefix="kpl-restart-%d." % n, dir=tmp_root)
    lock = os.path.join(tmp, "lock")
    ledger = os.path.join(tmp, "ledger")
    open(ledger, "w").close()
    held = open(lock, "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    kinds = pipelines(lock, ledger)
    k = Kpld(binary, tmp)
    c, _ = k.start()

    # One stream counts the WAITING and PENDING stages as they happen.
    seen = collections.Counter()
    cond = threading.Condition()
    stream = c.stream(P + "WatchRuns", {}, timeout=3600)

    def follow():
        try:
            for ev in stream:
                ev = Client.to_dict(ev)
                st = ev.get("stage_state")
                if ev.get("kind") == "EVENT_KIND_STAGE_STATE" and st in (
                        "STAGE_STATE_WAITING", "STAGE_STATE_PENDING"):
                    with cond:
                        seen[st] += 1
                        cond.notify_all()
        except Exception:  # cancelled at the kill
            pass

    threading.Thread(target=follow, daemon=True).start()
    ids = {0: [], 1: [], 2: []}
    t0 = time.monotonic()

    def submit(i):
        r = c.call(P + "SubmitRun", {"pipeline": kinds[i % 3],
                                      "idempotency_key": "rb-%d" % i}, timeout=600)
        return i % 3, r.id

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        for kind, rid in ex.map(submit, range(n)):
            ids[kind].append(rid)
    want = {0: len(ids[0]), 1: len(ids[1]), 2: len(ids[2])}
    deadline = time.monotonic() + 1800
    while True:
        flocks = count_flocks(lock)
        with cond:
            waiting = seen["STAGE_STATE_WAITING"]
        if flocks == want[0] and waiting >= want[1] and all_retries_pending(c, ids[2]):
            break
        if time.monotonic() > deadline:
            raise SystemExit("runs never reached their states: %d flocks of %d, %d waiting "
                             "of %d" % (flocks, want[0], waiting, want[1]))
        time.sleep(0.5)
    setup = time.monotonic() - t0
    rss = k.rss_kib()
    stream.cancel()
    c.close()

    with open(k.log, "a") as f:
        f.write("==== restart_bench: SIGKILL ====\n")
    k.proc.send_signal(signal.SIGKILL)
    k.proc.wait()
    mark = os.path.getsize(k.log)
    # --perf: the restart under perf record (software clock, call graphs).
    c, serving = k.start(wrapper=["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g",
                                  "-o", PERF] if PERF else ())
    resumed = last_recovered(k.log, mark)
    print("restart_serving_s=%.3f (%d runs in flight: %d scripts under their shims, "
          "%d approvals waiting, %d retries scheduled; kpld from exec to its ready file)"
          % (serving, n, want[0], want[1], want[2]), flush=True)
    if resumed is not None:
        print("restart_resumed_s=%.3f (from kpld's first log line after exec to its line "
              "'recovered %d unfinished runs')" % (resumed[0], resumed[1]), flush=True)
    print("rss_per_run_kib=%.2f (kpld VmRSS %d KiB with %d runs in flight, before the kill; "
          "setup took %.0f s)" % (rss / n, rss, n, setup), flush=True)

    # What "resumed" promises.
    problems = []
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    deadline = time.monotonic() + 1800
    pending = set(ids[0])
    while pending and time.monotonic() < deadline:
        for rid in list(pending)[:500]:
            st = Client.to_dict(c.call(P + "GetRun", {"id": rid}))["state"]
            if st != "RUN_STATE_RUNNING" and st != "RUN_STATE_QUEUED":
                pending.discard(rid)
                if st != "RUN_STATE_SUCCEEDED":
                    problems.append("script run %s ended %s" % (rid, st))
        if pending:
            time.sleep(0.2)
    if pending:
        problems.append("%d script runs never ended" % len(pending))
    with open(ledger) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    dup = [r for r, m in collections.Counter(lines).items() if m > 1]
    missing = set(ids[0]) - set(lines)
    if dup:
        problems.append("commands run twice: %s" % dup[:5])
    if missing:
        problems.append("%d commands never ran, e.g. %s" % (len(missing), sorted(missing)[:3]))
    for rid in ids[1][:200]:
        run = Client.to_dict(c.call(P + "GetRun", {"id": rid}))
        if run["stages"][0].get("state") != "STAGE_STATE_WAITING":
            problems.append("approval run %s: stage %s" % (rid, run["stages"][0].get("state")))
    for rid in ids[2][:200]:
        if not retry_pending(c, rid):
            s = Client.to_dict(c.call(P + "GetRun", {"id": rid}))["stages"][0]
            evs = [Client.to_dict(e) for e in c.stream(P + "WatchRun", {"id": rid}, timeout=10)]
            problems.append("retry run %s no longer scheduled: %s %r; events %s"
                            % (rid, s.get("state"), s.get("message"),
                               [(e.get("seq"), e.get("stage_state") or e.get("run_state"),
                                 e.get("message"), e.get("time")) for e in evs]))
    c.close()
    k.proc.send_signal(signal.SIGTERM)
    rc = k.proc.wait()
    if rc != 0:
        problems.append("kpld exited %d after SIGTERM" % rc)
    print("restart_check_%d=%s (%s)" % (n, "ok" if not problems else "FAILED",
                                         "; ".join(problems[:8]) or
                                         "every script run SUCCEEDED with its command run once, "
                                         "approvals WAITING, retries PENDING, kpld exit 0"),
          flush=True)
    if not os.environ.get("RB_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)
    return not problems


def retry_pending(c, rid):
    run = Client.to_dict(c.call(P + "GetRun", {"id": rid}))
    s = run["stages"][0]
    return s.get("state") == "STAGE_STATE_PENDING" and "retrying in" in s.get("message", "")


def all_retries_pending(c, rids):
    return all(retry_pending(c, rid) for rid in rids)


def last_recovered(log, mark):
    """(seconds from kpld's first log line after mark to its line "recovered N
    unfinished runs in X ms", N), from kpld's own timestamps."""
    with open(log, errors="replace") as f:
        f.seek(mark)
        text = f.read()
    stamps = re.findall(r"^(\S+) .*$", text, re.M)
    done = re.search(r"^(\S+) .*recovered (\d+) unfinished runs? in \d+ ms", text, re.M)
    if not stamps or not done:
        return None

    def t(s):
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    try:
        return t(done.group(1)) - t(stamps[0]), int(done.group(2))
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kpld")
    ap.add_argument("--runs", default="1000,10000")
    ap.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--perf", help="record the restart with perf into this file")
    a = ap.parse_args()
    global PERF
    PERF = os.path.abspath(a.perf) if a.perf else None
    if not shutil.which("flock"):
        raise SystemExit("restart_bench needs flock(1) (util-linux)")
    ok = True
    for n in [int(x) for x in a.runs.split(",")]:
        ok = one(os.path.abspath(a.kpld), n, a.tmp) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
