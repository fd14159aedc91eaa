#!/bin/sh
# interop_js_test: a JavaScript client (@grpc/grpc-js, types learnt by
# server reflection) submits, watches and approves a run of kpld.
#
#   interop_js_test.sh KPLD PACKAGE_JSON PACKAGE_LOCK CLIENT_JS
#
# The Node packages are pinned by package-lock.json and installed with
# `npm ci` into this test's own copy of the directory (so nothing is
# written to the source tree); that needs the npm registry, or an npm cache
# that has them (npm_config_cache, npm_config_offline). Node 18 or newer
# (Debian bookworm's nodejs is 18).
set -eu

kpld=$1
pkg=$2
lock=$3
client=$4
tmp=${TEST_TMPDIR:-$(mktemp -d)}
dir=$tmp/interop
pid=""

fail() {
	echo "interop_js_test: FAIL: $*" >&2
	exit 1
}

cleanup() {
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
	fi
}
trap cleanup EXIT

command -v node >/dev/null || fail "node is not installed (./dev installs nodejs and npm)"
command -v npm >/dev/null || fail "npm is not installed (./dev installs nodejs and npm)"
echo "interop_js_test: node $(node --version), npm $(npm --version 2>/dev/null)"

mkdir -p "$dir"
cp "$pkg" "$dir/package.json"
cp "$lock" "$dir/package-lock.json"
cp "$client" "$dir/client.js"
if [ ! -d "$dir/node_modules" ]; then
	# HOME may be unset or read-only under Bazel: keep npm's cache and
	# logs in the test's directory unless told otherwise.
	: "${npm_config_cache:=$tmp/npm-cache}"
	export npm_config_cache
	(cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) ||
		fail "npm ci failed (is the npm registry reachable?)"
fi

data=$tmp/data
ready=$tmp/kpld.ready
log=$tmp/kpld.log
rm -f "$ready"
"$kpld" --listen 127.0.0.1:0 --data-dir "$data" --ready-file "$ready" 2>"$log" &
pid=$!
i=0
while [ ! -s "$ready" ]; do
	kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "kpld exited before serving"; }
	i=$((i + 1))
	[ "$i" -lt 300 ] || fail "kpld did not serve within 30 s"
	sleep 0.1
done
addr=$(cat "$ready")

rc=0
(cd "$dir" && node client.js "$addr") || rc=$?

kill -TERM "$pid"
krc=0
wait "$pid" || krc=$?
pid=""
if [ "$rc" != 0 ]; then
	echo "--- kpld log ---" >&2
	tail -50 "$log" >&2
	fail "the JavaScript client exited with status $rc"
fi
[ "$krc" = 0 ] || fail "kpld exited with status $krc after SIGTERM"
echo "interop_js_test: passed"
