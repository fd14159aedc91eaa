"""What `./dev demo` runs: pipelines/examples/release.kpl.yaml end to end on
this machine, then a plain summary.

    /usr/bin/python3 tests/e2e/release/demo.py BAZEL_BIN [--bad] [--pods] [--keep]

It makes a git repository of the demo app (tests/e2e/release/app, VERSION
1.1.0; with --bad, 1.2.0-bad: an image tag the cluster emulator answers 30%
of requests with 500 for), starts docker-registry (htpasswd basic auth), the
Kubernetes+Istio emulator holding the app's v1 Deployment and Service, the
real Prometheus scraping it every second, and kpld with a config naming all
three (the registry password a secret, set through the SetSecret RPC). Then
`kplctl submit --watch` shows the run as it happens; the summary says which
run, how each stage ended and how long it took, where the image went, what
the cluster runs, the canary's weights and the verify values. Everything is
stopped at the end (kpld with SIGTERM, which must exit 0). Exit status 0
only if the release did what it should: with --bad, that it failed and was
rolled back. --keep leaves the work directory (logs, data) in place.

With --pods it runs pipelines/examples/release-pods.kpl.yaml instead: the
same release with `compile` (gcc) and `image` (buildah, pushing to the
registry itself) as Kubernetes pods in namespace ci, which the emulator's
kubelet runs as local processes, sharing the run's PersistentVolumeClaim.
The work directory is then under /var/tmp: a pod has a /tmp of its own and
clones the app's repository by its path.

kpld also serves the web console (--http-listen); its URL is printed. With
--console the stack stays up after the summary, the console's URL and an
admin token printed, until Ctrl-C (or SIGTERM).
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
from stack import NAMESPACE, STAGING, Stack  # noqa: E402

PIPELINE = os.path.join(TOP, "pipelines", "examples", "release.kpl.yaml")
PODS_PIPELINE = os.path.join(TOP, "pipelines", "examples", "release-pods.kpl.yaml")
SEED = os.path.join(TOP, "pipelines", "examples", "build-and-push.kpl.yaml")
EMULATOR = os.path.join(TOP, "tests", "emulators", "kube", "kube_emulator.py")


def say(*a):
    print("demo:", *a, flush=True)


def ts(s):
    if not s:
        return None
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def duration(st):
    a, b = ts(st.get("started_at")), ts(st.get("finished_at"))
    if not a or not b:
        return "-"
    return "%.1fs" % (b - a).total_seconds()


def short(msg, n=100):
    """msg without digests' tails, at most n characters."""
    msg = re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]{52}", r"\1...", msg)
    return msg if len(msg) <= n else msg[:n - 3] + "..."


def canary_steps(events):
    """From the canary's log: the weights its steps set, in order, and for
    each verify step {check: {"values": [value, ...], "limit": "min 99"}}
    under the weight it measured."""
    reached, measured, weight = [], [], 0
    for e in events:
        if e.get("kind") != "EVENT_KIND_LOG" or e.get("stage") != "canary":
            continue
        line = e.get("message", "")
        m = re.match(r"step \d+/\d+: (\d+)% of traffic to the canary", line)
        if m:
            weight = int(m.group(1))
            reached.append(weight)
            continue
        if re.match(r"step \d+/\d+: verify \(", line):
            measured.append((weight, {}))
            continue
        m = re.match(r"^([\w.-]+) = (.*?)(?: \(((?:min|max) [^)]*)\))? (pass|fail), round", line)
        if m and measured:
            check = measured[-1][1].setdefault(m.group(1), {"values": [], "limit": ""})
            check["values"].append(m.group(2) + ("" if m.group(4) == "pass" else " FAIL"))
            check["limit"] = m.group(3) or check["limit"]
            continue
        m = re.match(r"^([\w.-]+) = no data", line)
        if m and measured:
            measured[-1][1].setdefault(m.group(1), {"values": [], "limit": ""})["values"].append(
                "no data")
    return reached, measured


def short_state(s):
    return s.split("_STATE_", 1)[-1] if s else "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bazel_bin")
    ap.add_argument("--bad", action="store_true", help="release a version the canary rejects")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--pods", action="store_true",
                    help="compile and build the image in Kubernetes pods (release-pods.kpl.yaml)")
    ap.add_argument("--console", action="store_true",
                    help="leave the stack up, browsable in the web console, until Ctrl-C")
    opt = ap.parse_args()
    kpld = os.path.join(opt.bazel_bin, "engine", "kpld")
    kplctl = os.path.join(opt.bazel_bin, "clients", "kplctl")
    version = "1.2.0-bad" if opt.bad else "1.1.0"

    # A pod's /tmp is its own: with --pods the app's repository must be
    # where the pods can clone it.
    work = tempfile.mkdtemp(prefix="kpl-demo-", dir="/var/tmp" if opt.pods else None)
    pipeline = PODS_PIPELINE if opt.pods else PIPELINE
    t0 = time.monotonic()
    stack = Stack(work, kpld, emulator=EMULATOR, kplctl=kplctl, console=True,
                  lifetime=24 * 3600 if opt.console else 900)
    ok = False
    try:
        stack.start_registry()
        say("docker-registry on %s (htpasswd basic auth, user kpl)" % stack.registry)
        stack.start_kube()
        say("kube emulator (Kubernetes + Istio API) on %s: namespaces %s and %s"
            % (stack.kube, NAMESPACE, STAGING))
        stack.start_prometheus()
        say("prometheus on %s, scraping the emulator's Istio metrics every 1s" % stack.prom)
        stack.start_kpld()
        say("kpld on %s, data and logs in %s; the registry password is secret REG_PASS "
            "(kplctl secret set)" % (stack.addr, work))
        say("web console on http://%s/ (sign in with the admin token in %s)"
            % (stack.http, stack.path("admin.token")))
        seed_run, v1 = stack.seed(SEED)
        say("version 1.0.0 built and pushed by run %s (build-and-push.kpl.yaml) and installed:"
            % seed_run)
        say("  deployment web in %s (2 replicas) and in %s (1 replica) runs %s"
            % (NAMESPACE, STAGING, v1))
        _, sha = stack.commit(version)
        say("app repository %s: commit %s sets VERSION %s" % (stack.repo, sha[:12], version))
        params = ["repo=" + stack.repo]
        if opt.pods:
            params.append("registry=" + stack.registry_host)
        say("kplctl submit pipelines/examples/%s %s --watch" % (
            os.path.basename(pipeline), " ".join("-p " + p for p in params)))
        print(flush=True)
        run_id, _ = submit_watch(stack, pipeline, params)
        print(flush=True)
        ok = summary(stack, run_id, version, v1, opt.bad)
        if opt.console:
            browse(stack, run_id)
    except Exception as e:
        say("failed: %s" % e)
    finally:
        kpld_rc = stack.stop()
    if kpld_rc != 0:
        say("kpld did not stop cleanly on SIGTERM (%s); its log: %s"
            % (kpld_rc, stack.path("kpld.log")))
        ok = False
    else:
        say("kpld stopped cleanly on SIGTERM (exit 0); registry, emulator and prometheus stopped")
    say("took %.0f s" % (time.monotonic() - t0))
    if ok and not opt.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say("work directory kept: %s" % work)
    return 0 if ok else 1


def submit_watch(stack, pipeline, params):
    """kplctl submit --watch, its output passed through; the run id is the
    first line it prints."""
    p = subprocess.Popen([stack.kplctl_bin, "--server", stack.addr, "submit", pipeline] +
                         [a for kv in params for a in ("-p", kv)] + ["--watch"],
                         stdout=subprocess.PIPE, text=True, bufsize=1, env=stack.env())
    run_id = None
    for line in p.stdout:
        if run_id is None:
            run_id = line.strip()
        sys.stdout.write(line)
        sys.stdout.flush()
    return run_id, p.wait()


def browse(stack, run_id):
    """--console: the stack stays up until Ctrl-C or SIGTERM."""
    print(flush=True)
    say("the web console:  http://%s/#/runs/%s" % (stack.http, run_id))
    say("sign in with this admin token (kept in the tab's sessionStorage only):")
    print(stack.token, flush=True)
    say("everything keeps running until Ctrl-C")
    def on_term(*_):
        raise KeyboardInterrupt
    # Also SIGINT: a shell that started the demo in the background set it
    # to be ignored, which Python keeps.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print(flush=True)
        say("Ctrl-C: stopping")


def summary(stack, run_id, version, previous, bad):
    run = stack.get_run(run_id)
    stages = {s["name"]: s for s in run["stages"]}
    state = short_state(run["state"])
    say("run %s of pipeline %s: %s in %s%s" % (
        run_id, run["pipeline_name"], state, duration(run),
        ": " + short(run["message"], 200) if run.get("message") else ""))
    width = max(len(n) for n in stages)
    for s in run["stages"]:
        say("  %-*s %-8s %-9s %6s  %s" % (width, s["name"], s.get("kind", ""),
                                          short_state(s["state"]), duration(s),
                                          short(s.get("message", ""))))
    problems = []

    # release-pods.kpl.yaml's image stage pushes, with push's outputs.
    push = stages.get("push", stages.get("image", {})).get("outputs", {})
    image = push.get("image")
    released = stages.get("ref", {}).get("outputs", {}).get("image")
    if image:
        repo = image.split("/", 1)[1].split("@")[0]
        say("image %s" % image)
        tags = stack.tags(repo)
        say("  tags of %s in the registry: %s" % (repo, ", ".join(
            t + ("" if stack.manifest(repo, t)[0] == push["digest"] else " (an earlier image)")
            for t in tags)))
        say("  released (deployed) as %s" % released)
    else:
        problems.append("no image was pushed")

    events = stack.watch(run_id)
    reached, measured = canary_steps(events)
    canary = stages.get("canary", {})
    say("canary: weights %s; %s" % (" -> ".join("%d%%" % w for w in reached) or "none",
                                    short(canary.get("message", "did not run"))))
    for weight, values in measured:
        say("  verify at %3d%%: %s" % (weight, "; ".join(
            "%s %s%s" % (name, ", ".join(c["values"]), " (%s)" % c["limit"] if c["limit"] else "")
            for name, c in values.items())))

    prod, staging = stack.deployment("web"), stack.deployment("web", STAGING)
    for name, dep in ((NAMESPACE, prod), (STAGING, staging)):
        st = dep.get("status", {})
        say("cluster: %s/web runs %s (%s/%s available, revision %s)" % (
            name, stack.image_of(dep), st.get("availableReplicas", 0), dep["spec"].get("replicas"),
            dep["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision", "?")))
    weights = stack.vs_weights("web")
    canary_dep = stack.deployment("web-canary")
    say("mesh: virtualservice %s/web routes %s; deployment web-canary %s" % (
        NAMESPACE, ", ".join("%s %d%%" % kv for kv in sorted(weights.items()))
        if weights else "(none)", "still there" if canary_dep else "deleted"))
    rollback = stages.get("rollback")
    if rollback:
        say("rollback (finally, staging): %s%s" % (
            short_state(rollback["state"]),
            ": " + short(rollback["message"]) if rollback.get("message") else ""))

    if weights is None or weights.get("stable") != 100 or any(
            w for k, w in weights.items() if k != "stable"):
        problems.append("the stable subset does not have all the traffic: %s" % weights)
    if canary_dep:
        problems.append("the canary deployment is still there")
    if not bad:
        if state != "SUCCEEDED":
            problems.append("the run %s" % state)
        if stack.image_of(prod) != released or stack.image_of(staging) != released:
            problems.append("the cluster does not run %s" % released)
        if reached != [10, 50, 100] or len(measured) != 3:
            problems.append("the canary's weights were %s" % reached)
        verdict = "release %s succeeded: %s is live in %s and %s" % (
            version, released, NAMESPACE, STAGING)
    else:
        if state != "FAILED":
            problems.append("the bad release did not fail (%s)" % state)
        if stack.image_of(prod) != previous or stack.image_of(staging) != previous:
            problems.append("the cluster does not run the previous %s" % previous)
        verdict = ("release %s failed its canary analysis and was undone: %s runs %s again"
                   % (version, STAGING, previous))
    if problems:
        for p in problems:
            say("PROBLEM: %s" % p)
        return False
    say(verdict)
    return True


if __name__ == "__main__":
    sys.exit(main())
