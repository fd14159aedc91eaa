"""The verify stage kind end to end: the Kubernetes+Istio emulator makes
traffic for two Deployments (pods labelled version v1 and v2; v2's image tag
says `bad`, so 30% of its requests fail), the real Prometheus (Debian's
/usr/bin/prometheus) scrapes the emulator's /metrics every second, and kpld
(--config naming that Prometheus) runs verify stages through its gRPC API.

    /usr/bin/python3 tests/e2e/verify_test.py PATH/TO/kpld PATH/TO/kube_emulator.py

Waiting is on WatchRun streams and on Prometheus's own API (polled, bounded,
until it has the series the checks read); no sleep stands for a condition.
"""

import json
import os
import re
import signal
import sys
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kube_stack  # noqa: E402
from e2e_test import P, Client, Daemon, assert_eq, submit, watch  # noqa: E402

NS = "default"

SUCCESS_RATE = (
    'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="%s",'
    'destination_workload=~"web-.*",destination_version="${{ canary.version }}",'
    'response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter="destination",'
    'destination_workload_namespace="%s",destination_workload=~"web-.*",'
    'destination_version="${{ canary.version }}"}[1m])) * 100' % (NS, NS))
DURATION = (
    'histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{'
    'reporter="destination",destination_workload_namespace="%s",destination_workload=~"web-.*",'
    'destination_version="${{ canary.version }}"}[1m])) by (le))' % NS)


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def deployment(name, version, image):
    labels = {"app": "web", "version": version}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "web", "image": image}]}},
        },
    }


def yaml_str(s):
    """s as a double-quoted YAML scalar (JSON string syntax is valid YAML)."""
    return json.dumps(s)


def verify_pipeline(name, with_lines, params=""):
    return "name: %s\n%sstages:\n  - name: check\n    kind: verify\n    with:\n%s" % (
        name, params, "".join("      %s\n" % l for l in with_lines))


class Suite:
    def __init__(self, kpld, emulator, tmp):
        self.tmp = tmp
        self.procs = []
        p, self.kube = kube_stack.start_emulator(
            emulator, tmp, ["--lifetime", "600", "--pace", "0.2", "--traffic-interval", "0.5"],
            os.path.join(tmp, "kube.log"))
        self.procs.append(p)
        http("POST", self.kube + "/apis/apps/v1/namespaces/%s/deployments" % NS,
             deployment("web-v1", "v1", "web:1.0"))
        http("POST", self.kube + "/apis/apps/v1/namespaces/%s/deployments" % NS,
             deployment("web-v2", "v2", "web:2.0-bad"))
        prom, self.prom = kube_stack.start_prometheus(tmp, self.kube)
        self.procs.append(prom)
        # Until both versions have a success rate: two scrapes with traffic
        # from both Deployments.
        kube_stack.wait_for_data(self.prom, prom, tmp, [
            SUCCESS_RATE.replace("${{ canary.version }}", v) for v in ("v1", "v2")])
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("prometheus:\n  main: { url: \"%s\" }\n" % self.prom)
        self.daemon = ConfigDaemon(kpld, os.path.join(tmp, "data"), cfg)
        self.c = self.daemon.start()

    def run(self, text, params=None):
        run = Client.to_dict(submit(self.c, text, params))
        events = watch(self.c, run["id"])
        final = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        return final, events

    @staticmethod
    def stage(run):
        return run["stages"][0]

    @staticmethod
    def logs(events):
        return [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"]

    # --- the tests

    def test_healthy_version_passes(self):
        run, events = self.run(verify_pipeline("healthy", [
            "prometheus: main",
            "canary_version: ${{ params.version }}",
            "interval: 1s",
            "count: 3",
            "failure_limit: 0",
            "queries:",
            "  - { name: request-success-rate, min: 99, query: %s }" % yaml_str(SUCCESS_RATE),
            "  - { name: request-duration, max: 500, query: %s }" % yaml_str(DURATION),
        ], params="params:\n  version: { default: v1 }\n"))
        st = self.stage(run)
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "stage state (%s)" % st.get("message"))
        assert_eq(st.get("message"), "verify passed: 3 rounds, 0 failed, 0 inconclusive",
                  "message")
        lines = self.logs(events)
        rate = [l for l in lines if l.startswith("request-success-rate = ")]
        dur = [l for l in lines if l.startswith("request-duration = ")]
        assert_eq(len(rate), 3, "success-rate measurements: %r" % lines)
        assert_eq(len(dur), 3, "duration measurements: %r" % lines)
        for i, l in enumerate(rate):
            assert_eq(l, "request-success-rate = 100 (min 99) pass, round %d/3" % (i + 1), "line")
        for l in dur:
            m = re.match(r"request-duration = ([0-9.]+) \(max 500\) pass, round \d/3$", l)
            assert m and 0 < float(m.group(1)) <= 500, "duration line %r" % l
        outs = st.get("outputs", {})
        assert_eq(outs.get("request-success-rate"), "100", "output")
        assert float(outs.get("request-duration", "nan")) > 0, "duration output %r" % outs

    def test_bad_version_fails_with_measured_rate(self):
        run, events = self.run(verify_pipeline("bad", [
            "prometheus: main",
            "canary_version: v2",
            "interval: 1s",
            "count: 5",
            "failure_limit: 1",
            "queries:",
            "  - { name: request-success-rate, min: 99, query: %s }" % yaml_str(SUCCESS_RATE),
        ]))
        st = self.stage(run)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        m = re.match(r"verify failed: request-success-rate = ([0-9.]+), below min 99 "
                     r"\(2 failed rounds, limit 1\)$", st.get("message", ""))
        assert m, "message %r" % st.get("message")
        assert 55 <= float(m.group(1)) <= 85, "a 30%% error rate measured as %s" % m.group(1)
        fails = [l for l in self.logs(events) if l.startswith("request-success-rate = ")]
        assert_eq(len(fails), 2, "it stops at the second failed round: %r" % fails)
        assert all(re.match(r"request-success-rate = [0-9.]+ \(min 99\) fail, round \d/5$", l)
                   for l in fails), fails

    def test_missing_metric_is_inconclusive(self):
        run, events = self.run(verify_pipeline("nodata", [
            "prometheus: main",
            "interval: 1s",
            "count: 5",
            "failure_limit: 0",
            "inconclusive_limit: 1",
            "queries:",
            "  - { name: missing, min: 1, query: 'sum(rate(no_such_metric_total[1m]))' }",
        ]))
        st = self.stage(run)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        assert_eq(st.get("message"), "inconclusive: no data from missing (empty result); "
                  "2 inconclusive rounds, limit 1", "message")
        lines = [l for l in self.logs(events) if l.startswith("missing = ")]
        assert_eq(lines, ["missing = no data (empty result): inconclusive, round 1/5",
                          "missing = no data (empty result): inconclusive, round 2/5"], "lines")
        assert_eq(st.get("outputs", {}).get("missing"), "no data", "output")

    def test_bad_promql_fails_with_prometheus_message(self):
        run, _ = self.run(verify_pipeline("badql", [
            "prometheus: main",
            "interval: 1s",
            "count: 3",
            "failure_limit: 2",
            "queries:",
            "  - { name: broken, query: 'sum(rate(istio_requests_total[1m]' }",
        ]))
        st = self.stage(run)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        msg = st.get("message", "")
        assert msg.startswith("verify failed: broken: prometheus: bad_data: invalid parameter "
                              "\"query\": "), msg
        assert "parse error" in msg, msg

    def test_http_check(self):
        ok, events = self.run(verify_pipeline("http-ok", [
            "interval: 1s",
            "count: 2",
            "failure_limit: 0",
            "http: { url: '%s/version', expect_status: 200, body_contains: gitVersion }"
            % self.kube,
        ]))
        st = self.stage(ok)
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "stage state (%s)" % st.get("message"))
        assert_eq(self.logs(events)[-1], "http GET %s/version = 200 (expect 200, body contains "
                  "\"gitVersion\") pass, round 2/2" % self.kube, "last line")
        assert_eq(st.get("outputs", {}).get("http"), "200", "output")
        bad, _ = self.run(verify_pipeline("http-bad", [
            "interval: 1s",
            "count: 3",
            "failure_limit: 0",
            "http: { url: '%s/version', expect_status: 201 }" % self.kube,
        ]))
        st = self.stage(bad)
        assert_eq(st["state"], "STAGE_STATE_FAILED", "stage state")
        assert_eq(st.get("message"), "verify failed: http GET %s/version = 200, expected 201 "
                  "(1 failed round, limit 0)" % self.kube, "message")

    def test_canary_root_is_only_for_verify(self):
        text = ("name: misuse\nstages:\n  - name: s\n    kind: script\n"
                "    with: { command: [echo, '${{ canary.version }}'] }\n")
        try:
            submit(self.c, text)
            raise AssertionError("a script stage accepted ${{ canary.version }}")
        except grpc.RpcError as e:
            assert_eq(e.code(), grpc.StatusCode.INVALID_ARGUMENT, "status")
            assert "unknown reference \"canary.version\"" in e.details(), e.details()
        text = verify_pipeline("noversion", [
            "prometheus: main", "interval: 1s", "count: 1", "failure_limit: 0",
            "queries: [ { name: q, query: 'up{v=\"${{ canary.version }}\"}' } ]"])
        try:
            submit(self.c, text)
            raise AssertionError("a verify stage without canary_version was accepted")
        except grpc.RpcError as e:
            assert_eq(e.code(), grpc.StatusCode.INVALID_ARGUMENT, "status")
            assert "set canary_version" in e.details(), e.details()

    def test_cancel_stops_between_rounds(self):
        run = Client.to_dict(submit(self.c, verify_pipeline("cancel", [
            "interval: 1s",
            "count: 1000",
            "failure_limit: 0",
            "http: { url: '%s/version' }" % self.kube,
        ])))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "round 1/1000" in ev.get("message", ""):
                stream.cancel()
                break
        self.c.call(P + "CancelRun", {"id": run["id"]})
        watch(self.c, run["id"])
        st = self.stage(Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})))
        assert_eq(st["state"], "STAGE_STATE_CANCELLED", "stage state (%s)" % st.get("message"))

    def test_restart_carries_on_from_the_recorded_round(self):
        run = Client.to_dict(submit(self.c, verify_pipeline("resume", [
            "prometheus: main",
            "canary_version: v1",
            "interval: 1s",
            "count: 4",
            "failure_limit: 0",
            "queries:",
            "  - { name: request-success-rate, min: 99, query: %s }" % yaml_str(SUCCESS_RATE),
        ])))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=60)
        for ev in stream:
            ev = Client.to_dict(ev)
            if ev.get("kind") == "EVENT_KIND_LOG" and "round 1/4" in ev.get("message", ""):
                stream.cancel()
                break
        self.c.close()
        assert_eq(self.daemon.stop(signal.SIGTERM), 0, "kpld exit status")
        self.c = self.daemon.start()
        events = watch(self.c, run["id"])
        final = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        st = self.stage(final)
        assert_eq(st["state"], "STAGE_STATE_SUCCEEDED", "stage state (%s)" % st.get("message"))
        rounds = [re.search(r"round (\d)/4", l).group(1) for l in self.logs(events)
                  if l.startswith("request-success-rate = ")]
        assert_eq(rounds, ["1", "2", "3", "4"], "each round once, across the restart")

    def close(self):
        kube_stack.stop(self.c, self.daemon, self.procs)


class ConfigDaemon(Daemon):
    """e2e_test's Daemon with --config FILE."""

    def __init__(self, binary, data_dir, config):
        super().__init__(binary, data_dir)
        self.config = config

    def start(self):
        real = self.binary
        wrapper = os.path.join(os.path.dirname(self.data_dir), "kpld-with-config")
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\nexec '%s' --config '%s' \"$@\"\n" % (real, self.config))
        os.chmod(wrapper, 0o755)
        self.binary = wrapper
        try:
            return super().start()
        finally:
            self.binary = real


def main():
    return kube_stack.run_suite(Suite, sys.argv[1:], "kpl-verify-")


if __name__ == "__main__":
    sys.exit(main())
