"""idle_rss.py KPLD - memory per idle in-flight run.

Starts kpld on 127.0.0.1:0 with a fresh data directory, submits WARMUP runs
of a one-stage `approval` pipeline (they wait, idle, holding their in-memory
state), reads kpld's VmRSS, submits N more, reads it again, and prints

    idle_run_rss_bytes=4093 (N=2000, rss 25000 kB -> 33000 kB)

The figure is an upper bound: RSS also counts the LMDB pages the new runs'
records touched. Run with Debian's python3 (it has grpcio):
    /usr/bin/python3 bench/idle_rss.py bazel-bin/engine/kpld [N]
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
from kplgrpc import Client  # noqa: E402

PIPELINE = "name: idle\nstages:\n  - {name: wait, kind: approval, with: {message: hold}}\n"


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def submit(c, n, window=64):
    """n submits, at most window in flight: what stays in kpld afterwards
    is the runs, not thousands of calls' transient buffers."""
    done = 0
    while done < n:
        k = min(window, n - done)
        futs = [c.call_future("kpl.v1.Pipelines/SubmitRun", {"pipeline": PIPELINE})
                for _ in range(k)]
        for f in futs:
            f.result()
        done += k


def main():
    kpld = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    tmp = tempfile.mkdtemp(prefix="kpl-rss-")
    ready = os.path.join(tmp, "ready")
    proc = subprocess.Popen([kpld, "--listen", "127.0.0.1:0", "--data-dir",
                             os.path.join(tmp, "data"), "--ready-file", ready,
                             "--log-level", "warn"])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kpld did not start")
            time.sleep(0.02)
        c = Client.connect(open(ready).read().strip())
        submit(c, 200)  # warm-up: allocator arenas, LMDB's first pages
        before = rss_kb(proc.pid)
        submit(c, n)
        after = rss_kb(proc.pid)
        print("idle_run_rss_bytes=%d (N=%d, rss %d kB -> %d kB)"
              % ((after - before) * 1024 // n, n, before, after))
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
