#!/bin/sh
# run.sh - start a fresh kpld, measure it with api_bench (and LMDB alone with
# store_bench, if built), print the figures and one line about the machine,
# stop kpld with SIGTERM and check that it exits 0. Builds nothing:
#
#   bazel build //:kpld //bench:all && bench/run.sh [-- api_bench options]
#
# Usage: bench/run.sh [--kpld PATH] [--api-bench PATH] [--store-bench PATH]
#                     [--tmp DIR] [--keep] [-- API_BENCH_OPTIONS...]
# Paths default to bazel-bin/{engine/kpld,bench/api_bench,bench/store_bench}
# under the repository. --tmp is where the data dir goes (default $TMPDIR or
# /tmp): pick the file system you mean to measure. --keep leaves the data dir
# and kpld's log behind. Exit status: 0 if every step succeeded.
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bazel-bin"
kpld="$bin/engine/kpld"
api_bench="$bin/bench/api_bench"
store_bench="$bin/bench/store_bench"
tmp="${TMPDIR:-/tmp}"
keep=
while [ $# -gt 0 ]; do
	case "$1" in
	--kpld) kpld=$2; shift 2 ;;
	--api-bench) api_bench=$2; shift 2 ;;
	--store-bench) store_bench=$2; shift 2 ;;
	--tmp) tmp=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--) shift; break ;;
	-h|--help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
	*) echo "run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
	esac
done
for f in "$kpld" "$api_bench"; do
	if [ ! -x "$f" ]; then
		echo "run.sh: $f: not built (bazel build //:kpld //bench:all)" >&2
		exit 2
	fi
done

dir=$(mktemp -d "$tmp/kpl-bench.XXXXXX") || exit 1
pid=
status=0
cleanup() {
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null
	fi
	if [ -z "$keep" ]; then
		rm -rf "$dir"
	else
		echo "run.sh: kept $dir" >&2
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
fs=$(df -PT "$dir" 2>/dev/null | awk 'NR == 2 { print $2 " (" $1 ")" }')
echo "machine: nproc=$(nproc), cpu=${cpu:-unknown}, kernel=$(uname -sr)," \
	"fs of $dir=${fs:-unknown}, loadavg=$(cut -d' ' -f1-3 /proc/loadavg)," \
	"date=$(date -u +%Y-%m-%dT%H:%MZ)"

if [ -x "$store_bench" ]; then
	"$store_bench" "$dir/lmdb" || status=1
	rm -rf "$dir/lmdb"
else
	echo "run.sh: $store_bench not built; skipping the LMDB figures" >&2
fi

"$kpld" --listen 127.0.0.1:0 --data-dir "$dir/data" --ready-file "$dir/ready" \
	--log-level warn >"$dir/kpld.log" 2>&1 &
pid=$!
i=0
while [ ! -s "$dir/ready" ]; do
	if ! kill -0 "$pid" 2>/dev/null || [ $i -ge 100 ]; then
		echo "run.sh: kpld did not become ready; its log:" >&2
		cat "$dir/kpld.log" >&2
		exit 1
	fi
	sleep 0.1
	i=$((i + 1))
done

"$api_bench" --ready-file "$dir/ready" "$@" || status=1

kill -TERM "$pid"
wait "$pid"
rc=$?
pid=
if [ $rc -ne 0 ]; then
	echo "run.sh: kpld exited $rc after SIGTERM; its log:" >&2
	tail -n 30 "$dir/kpld.log" >&2
	status=1
else
	echo "kpld_exit=0 (SIGTERM, clean stop)"
fi
exit $status
