"""The stack the Kubernetes-facing e2e tests share (canary_test, verify_test):
the Kubernetes+Istio emulator (tests/emulators/kube), the real Prometheus
(Debian's /usr/bin/prometheus) scraping the emulator's /metrics every
second, the waits until both are usable, their stop, and the runner that
calls a suite's test_* methods in order.

Waiting is bounded: the emulator's port file, then Prometheus's own API
polled until it has the series a test reads.
"""

import json
import os
import signal
import shutil
import subprocess
import tempfile
import time
import traceback
import urllib.parse
import urllib.request

import e2e_test
from e2e_test import assert_eq
from ports import start_on_free_port  # noqa: E402 (tests/lib, on the path e2e_test set)

PY = "/usr/bin/python3"
PROMETHEUS = os.environ.get("PROMETHEUS", "/usr/bin/prometheus")


def start_emulator(emulator, tmp, args, log, stdout_to_log=True):
    """Starts the emulator with args (after --port-file), its stderr (and
    stdout when stdout_to_log, else nothing) in the file log; returns the
    process and its base URL once it listens (30 s at most)."""
    port_file = os.path.join(tmp, "kube.port")
    out = open(log, "w")
    p = subprocess.Popen([PY, emulator, "--port-file", port_file] + list(args),
                         stdout=out if stdout_to_log else subprocess.DEVNULL, stderr=out)
    out.close()
    deadline = time.monotonic() + 30
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError("kube emulator did not start: " + open(log).read())
        time.sleep(0.05)  # waiting for the process to listen
    return p, "http://127.0.0.1:%s" % open(port_file).read().strip()


def start_prometheus(tmp, kube):
    """Starts Prometheus scraping kube's /metrics every second (config, TSDB
    and TMP/prometheus.log in tmp); returns the process and its base URL.
    It listens (on a port that is its own: tests/lib/ports.py); whether it
    has data yet, wait_for_data says."""
    conf = os.path.join(tmp, "prometheus.yml")
    with open(conf, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: kube-emulator\n"
                "    metrics_path: /metrics\n"
                "    static_configs:\n      - targets: ['%s']\n" % kube[len("http://"):])

    def start(port):
        log = open(os.path.join(tmp, "prometheus.log"), "a")
        p = subprocess.Popen([PROMETHEUS, "--config.file", conf,
                              "--storage.tsdb.path", os.path.join(tmp, "tsdb"),
                              "--web.listen-address", "127.0.0.1:%d" % port],
                             stdout=log, stderr=log)
        log.close()
        return p
    p, port = start_on_free_port(start, "prometheus")
    return p, "http://127.0.0.1:%d" % port


def query(prom, q):
    """The result vector of the instant query q."""
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def wait_for_data(prom, proc, tmp, queries, seconds=90):
    """Polls Prometheus (an external readiness) until every query in queries
    has a result; fails with its log when it has not after seconds or when
    proc (Prometheus) has ended."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            if all(query(prom, q) for q in queries):
                return
        except Exception as e:  # not listening yet
            last = e
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError("prometheus has no data after %d s (%s); its log:\n%s"
                         % (seconds, last,
                            open(os.path.join(tmp, "prometheus.log")).read()[-3000:]))


def stop(client, daemon, procs):
    """Closes client, stops daemon (kpld must exit 0 on SIGTERM), then
    terminates procs (SIGKILL after 20 s), whatever happened before."""
    try:
        client.close()
        if daemon.proc:
            assert_eq(daemon.stop(signal.SIGTERM), 0, "kpld exit status on SIGTERM")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def run_suite(suite_class, argv, prefix, only_env=None):
    """main() of a suite: argv is [kpld, kube_emulator]; builds
    suite_class(kpld, emulator, tmp) and runs it with e2e_test.run_suite
    (only the test_ methods the comma-separated environment variable
    only_env names, when it is set); removes tmp when all passed. Returns
    the exit status."""
    kpld = os.path.abspath(argv[0])
    emulator = os.path.abspath(argv[1])
    if not os.access(PROMETHEUS, os.X_OK):
        print("FAIL: %s is missing (apt-get install prometheus; ./dev installs it)" % PROMETHEUS)
        return 1
    tmp = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TEST_TMPDIR"))
    try:
        suite = suite_class(kpld, emulator, tmp)
    except Exception:
        traceback.print_exc()
        return 1
    tests = suite_class
    only = os.environ.get(only_env) if only_env else None
    if only:
        # e2e_test.run_suite runs the test_ methods its class argument lists.
        tests = type(suite_class.__name__, (), {
            n: f for n, f in suite_class.__dict__.items() if n in only.split(",")})
    rc = e2e_test.run_suite(tests, suite)
    if rc == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc
