"""pods_bench - pod stages (runs_on) through one kpld against the Kubernetes
emulator: how many one-pod-stage runs per second kpld carries, how long from
a stage's start to its pod's first line, and kpld's CPU
per pod stage.

    /usr/bin/python3 bench/pods_bench.py PATH/TO/kpld PATH/TO/kube_emulator.py \
        [--runs 200] [--callers 32] [--pace 0.05]

Each run is one stage `echo hi` in a pod (busybox image, recorded not
pulled: the emulator's kubelet runs the command as a local process, --pace
seconds per pod step). Prints "name=value (details)" lines:

  pod_runs_per_sec            runs submitted and finished, over the wall time
  pod_start_ms                p50 (p99, max) from the run's QUEUED event to
                              its stage's RUNNING
  pod_first_line_ms           p50 (p99, max) from RUNNING to the command's
                              first line as an event (Tekton's anchor is
                              "TaskRun to pod")
  pod_kpld_cpu_ms_per_run     kpld's own CPU (user + system) per run

The emulator (Python, one process) runs every pod; it, not kpld, is the
ceiling here: its own CPU per run is printed beside kpld's.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "lib"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
from kplgrpc import Client  # noqa: E402
from kube_stack import start_emulator  # noqa: E402

P = "kpl.v1.Pipelines/"
NS = "bench"
PIPELINE = ("name: podbench\nstages:\n  - name: hi\n    kind: script\n"
            "    runs_on: { cluster: emu, namespace: %s, image: \"busybox:1.36\" }\n"
            "    with: { command: [\"echo\", \"hi\"] }\n" % NS)


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kpld")
    ap.add_argument("emulator")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--pace", type=float, default=0.05)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kpl-podbench.")
    emu = kpld = None
    try:
        emu, base = start_emulator(a.emulator, tmp, [
            "--pace", str(a.pace), "--lifetime", "1800", "--namespace", NS,
            "--pod-root", os.path.join(tmp, "pods")], os.path.join(tmp, "emulator.log"))
        kc = os.path.join(tmp, "kubeconfig")
        with open(kc, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "ctx",
                       "clusters": [{"name": "c", "cluster": {"server": base}}],
                       "users": [{"name": "u", "user": {"token": "t"}}],
                       "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u",
                                                                "namespace": NS}}]}, f)
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("kubernetes:\n  emu: { kubeconfig: %s }\n" % kc)
        ready = os.path.join(tmp, "ready")
        kpld = __import__("subprocess").Popen(
            [os.path.abspath(a.kpld), "--listen", "127.0.0.1:0", "--data-dir",
             os.path.join(tmp, "data"), "--ready-file", ready, "--config", cfg,
             "--log-level", "warn"], stdout=open(os.path.join(tmp, "kpld.log"), "w"),
            stderr=__import__("subprocess").STDOUT)
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if kpld.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kpld did not start: " + open(os.path.join(tmp, "kpld.log")).read())
            time.sleep(0.05)
        c = Client.connect(open(ready).readline().strip())

        submitted = {}
        k0, e0, t0 = cpu_s(kpld.pid), cpu_s(emu.pid), time.monotonic()

        def submit(i):
            r = c.call(P + "SubmitRun", {"pipeline": PIPELINE}, timeout=300)
            return r.id, time.time()

        with concurrent.futures.ThreadPoolExecutor(a.callers) as ex:
            for rid, at in ex.map(submit, range(a.runs)):
                submitted[rid] = at
        states, to_running, to_line = {}, [], []

        def ms(ev):
            return datetime.datetime.fromisoformat(ev["time"].replace("Z", "+00:00")).timestamp() * 1000

        for rid in submitted:
            queued = running = None
            stream = c.stream(P + "WatchRun", {"id": rid}, timeout=600)
            for ev in stream:
                ev = Client.to_dict(ev)
                if ev.get("run_state") == "RUN_STATE_QUEUED" and queued is None:
                    queued = ms(ev)
                if ev.get("stage_state") == "STAGE_STATE_RUNNING" and running is None:
                    running = ms(ev)
                    to_running.append(running - queued)
                if ev.get("kind") == "EVENT_KIND_LOG" and ev.get("stream") == "LOG_STREAM_STDOUT" \
                        and running is not None and len(to_line) < len(to_running):
                    to_line.append(ms(ev) - running)
                if ev.get("kind") == "EVENT_KIND_RUN_STATE" and ev.get("run_state") in (
                        "RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED"):
                    states[rid] = ev["run_state"]
                    stream.cancel()  # kpld caps the streams of a connection
                    break
        wall = time.monotonic() - t0
        k1, e1 = cpu_s(kpld.pid), cpu_s(emu.pid)
        to_running.sort()
        to_line.sort()
        ok = sum(1 for s in states.values() if s == "RUN_STATE_SUCCEEDED")
        print("pod_runs_per_sec=%.1f (%d runs of one pod stage, %d SUCCEEDED, in %.1f s, %d "
              "callers; emulator --pace %.2f s per pod step)" % (a.runs / wall, a.runs, ok, wall,
                                                                   a.callers, a.pace), flush=True)
        for name, v, what in (("pod_start_ms", to_running, "from the run's QUEUED event to its "
                               "stage's RUNNING (kpld's event times)"),
                              ("pod_first_line_ms", to_line, "from the stage's RUNNING to the "
                               "command's first line as an event: the Pod's create, the "
                               "emulator's scheduling steps, the kubelet and the log follow")):
            if v:
                print("%s=%.0f (p50 %s; p99 %.0f, max %.0f, %d runs)"
                      % (name, v[len(v) // 2], what, v[len(v) * 99 // 100], v[-1], len(v)),
                      flush=True)
        print("pod_kpld_cpu_ms_per_run=%.2f (kpld %.2f s of CPU for %d runs; the emulator %.2f "
              "ms per run)" % ((k1 - k0) * 1000 / a.runs, k1 - k0, a.runs,
                               (e1 - e0) * 1000 / a.runs), flush=True)
        c.close()
        kpld.send_signal(signal.SIGTERM)
        if kpld.wait(60) != 0:
            print("pods_bench: kpld exited %s on SIGTERM" % kpld.returncode)
            return 1
        return 0 if ok == a.runs else 1
    finally:
        for p in (kpld, emu):
            if p and p.poll() is None:
                p.kill()
        if not os.environ.get("PB_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
