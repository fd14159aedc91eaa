#!/bin/sh
# Runs server_test.py with Debian's python (grpcio, protobuf) against the
# echo_server given as $1. Bazel runs this from the runfiles tree.
set -e
exec /usr/bin/python3 tests/api/server_test.py "$1"
