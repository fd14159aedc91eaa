#!/bin/sh
# demo.sh BAZEL_BIN [--bad] [--pods] [--keep] [--console] - what `./dev demo` runs:
# pipelines/examples/release.kpl.yaml end to end on this machine, through
# tests/e2e/release/demo.py (Debian's /usr/bin/python3, which has grpcio):
# the app's git repository, docker-registry with htpasswd, the Kubernetes +
# Istio emulator, the real Prometheus scraping it, kpld configured for all
# three; version 1.0.0 built, pushed and installed first, then the release
# of 1.1.0 submitted with `kplctl submit --watch` and summed up. Everything
# stops at the end; the exit status is 0 only if the release succeeded
# (with --bad: only if the bad release failed and was rolled back). kpld
# serves the web console too; --console leaves it all up, the console's URL
# and an admin token printed, until Ctrl-C. --pods runs release-pods.kpl.yaml:
# compile and image as Kubernetes pods (the emulator's kubelet runs them).
set -eu
bin=$1
shift
exec /usr/bin/python3 "$(dirname "$0")/release/demo.py" "$bin" "$@"
