#!/bin/sh
# demo.sh BAZEL_BIN - what `./dev demo` runs: start kpld on a free port with a
# fresh data directory, submit pipelines/examples/build-c.kpl.yaml against a
# small git repository made here, watch it through the gRPC API, and say
# plainly what happened.
set -eu
bin=$1
top=$(pwd)
work=$(mktemp -d /tmp/kpl-demo.XXXXXX)
kpld_pid=""
cleanup() {
	if [ -n "$kpld_pid" ] && kill -0 "$kpld_pid" 2>/dev/null; then
		kill -TERM "$kpld_pid" 2>/dev/null || true
		wait "$kpld_pid" 2>/dev/null || true
	fi
}
trap cleanup EXIT INT TERM

# A real git repository with a small C program and its test.
app=$work/app
mkdir -p "$app"
cat > "$app/hello.c" <<'C'
#include <stdio.h>
int main(int argc, char **argv)
{
	printf("hello, %s\n", argc > 1 ? argv[1] : "world");
	return 0;
}
C
cat > "$app/test.sh" <<'SH'
set -e
out=$(./app kpl)
[ "$out" = "hello, kpl" ] || { echo "unexpected output: $out" >&2; exit 1; }
echo "test passed: $out"
SH
git -C "$app" init --quiet --initial-branch=main
git -C "$app" -c user.name=demo -c user.email=demo@localhost add .
git -C "$app" -c user.name=demo -c user.email=demo@localhost commit --quiet -m "hello program"

# kpld on a free loopback port, data in the demo directory.
"$bin/engine/kpld" --listen 127.0.0.1:0 --data-dir "$work/data" \
	--ready-file "$work/ready" 2> "$work/kpld.log" &
kpld_pid=$!
# kpld writes the ready file once it serves; give up after 30 s.
i=0
while [ ! -s "$work/ready" ]; do
	if ! kill -0 "$kpld_pid" 2>/dev/null; then
		echo "demo: kpld exited before serving:" >&2
		cat "$work/kpld.log" >&2
		exit 1
	fi
	i=$((i + 1))
	[ "$i" -gt 300 ] && { echo "demo: kpld did not start in 30 s" >&2; exit 1; }
	sleep 0.1
done
addr=$(cat "$work/ready")
echo "demo: kpld is serving on $addr (data in $work/data, log in $work/kpld.log)"

kplctl="$bin/clients/kplctl --server $addr"
run_id=$($kplctl submit "$top/pipelines/examples/build-c.kpl.yaml" -p "repo=$app")
echo "demo: submitted run $run_id of pipelines/examples/build-c.kpl.yaml"
status=0
$kplctl watch "$run_id" || status=$?

echo
$kplctl get "$run_id"
artifact=$($kplctl get "$run_id" -o json | /usr/bin/python3 -c '
import json, sys
run = json.load(sys.stdin)
for st in run.get("stages", []):
    if st.get("name") == "package":
        print(st.get("outputs", {}).get("artifact", ""))
')

kill -TERM "$kpld_pid"
kpld_rc=0
wait "$kpld_pid" || kpld_rc=$?
kpld_pid=""

echo
if [ "$status" = 0 ] && [ -n "$artifact" ] && [ -f "$artifact" ]; then
	echo "demo: run $run_id SUCCEEDED: checkout, build, test and lint (in parallel), package."
	echo "demo: the packaged program is at $artifact"
else
	echo "demo: run $run_id did not succeed (kplctl exit $status); kpld log: $work/kpld.log"
	exit 1
fi
if [ "$kpld_rc" != 0 ]; then
	echo "demo: kpld exited with status $kpld_rc on SIGTERM; see $work/kpld.log"
	exit 1
fi
echo "demo: kpld stopped cleanly on SIGTERM."
