#!/bin/sh
# goals.sh - every goal of issue 12 measured in one command, for one kpld or
# for two (before and after) back to back, ending with one table:
#
#   bazel build -c opt //:kpld //engine:kpl-shim //bench:all //tests/api:echo_server
#   bench/goals.sh [--quick] [--before OLD_KPLD] [--kpld KPLD] [--tmp DIR]
#
# For each kpld: bench/restart_bench.py with 1,000 and 10,000 runs in
# flight, bench/idle_rss.py, then bench/run.sh (the machine's limits, script
# runs, submit_noop against the echo server, stored replay and live following
# against a bare grpc core server, durable transitions, 1,000 and 10,000
# WatchRun streams on one run). Every figure is printed as the
# tools print it ("name=value (details)"), then one line per goal:
#
#   goal NAME: TARGET | before B | after A | met yes|no
#
# --quick: run.sh --quick, 1,000 streams, 1,000 runs in flight, 2,000 idle
# runs (about 3 minutes for one kpld). --before: an older kpld (e.g. built at
# the commit before the work), measured first with the same tools. Figures
# from a shared machine move with its load: the machine line of each run.sh
# says what it was. Exit status 0 if every step ran (not if every goal is met).
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bazel-bin"
kpld="$bin/engine/kpld"
before=
quick=
tmp="${TMPDIR:-/tmp}"
py=/usr/bin/python3
while [ $# -gt 0 ]; do
	case "$1" in
	--kpld) kpld=$2; shift 2 ;;
	--before) before=$2; shift 2 ;;
	--quick) quick=1; shift ;;
	--tmp) tmp=$2; shift 2 ;;
	-h|--help) sed -n '2,21s/^# \{0,1\}//p' "$0"; exit 0 ;;
	*) echo "goals.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
	esac
done
for f in "$kpld" ${before:+"$before"}; do
	if [ ! -x "$f" ]; then
		echo "goals.sh: $f: not built" >&2
		exit 2
	fi
done
dir=$(mktemp -d "$tmp/kpl-goals.XXXXXX") || exit 1
trap 'rm -rf "$dir"' EXIT
trap 'exit 130' INT TERM
status=0

# measure KPLD OUT: every tool, figures appended to OUT.
measure() {
	k=$1
	out=$2
	echo "== $k"
	if [ -n "$quick" ]; then
		runs=1000
		idle=2000
		quick_opt=--quick
	else
		runs=1000,10000
		idle=5000
		quick_opt=
	fi
	# Restarts and idle memory first: run.sh ends with thousands of
	# sandboxes, which the figures after it would pay for.
	for n in $(echo "$runs" | tr , ' '); do
		"$py" "$root/bench/restart_bench.py" "$k" --runs "$n" --tmp "$dir" |
			sed "s/^\(restart_[a-z_]*\|rss_per_run_kib\)=/\1_$n=/" |
			tee -a "$out" || status=1
	done
	"$py" "$root/bench/idle_rss.py" "$k" "$idle" | tee -a "$out" || status=1
	"$root/bench/run.sh" $quick_opt --kpld "$k" --tmp "$dir" | tee -a "$out" || status=1
}

# val NAME FILE [FIELD]: the value of "NAME=value", or of "FIELD=value" on
# NAME's line.
val() {
	if [ $# -gt 2 ]; then
		sed -n "s/^$1=.* $3=\([0-9.]*\).*/\1/p" "$2" | tail -n 1
	else
		sed -n "s/^$1=\([0-9.]*\).*/\1/p" "$2" | tail -n 1
	fi
}

if [ -n "$before" ]; then
	measure "$before" "$dir/before"
fi
measure "$kpld" "$dir/after"

# goal LABEL OP TARGET NAME [FIELD]: one line of the table.
goal() {
	label=$1 op=$2 target=$3 name=$4 field=${5:-}
	a=$(val "$name" "$dir/after" $field)
	b=-
	if [ -n "$before" ]; then
		b=$(val "$name" "$dir/before" $field)
		[ -n "$b" ] || b=-
	fi
	met=no
	if [ -n "$a" ]; then
		met=$(awk -v a="$a" -v t="$target" -v op="$op" 'BEGIN {
			ok = (op == ">=") ? a >= t : a < t; print ok ? "yes" : "no" }')
	else
		a=-
	fi
	printf "goal %s: %s %s | before %s | after %s | met %s\n" "$label" "$op" "$target" \
		"$b" "$a" "$met"
}

echo
goal "script runs, ratio to spawn_limit" ">=" 0.5 script_runs_unsandboxed_per_sec ratio
goal "kpld CPU per script run, ms" "<" 1.001 submit_unsandboxed_per_sec_kpld_cpu_ms_per_run
goal "stored replay, events/s" ">=" 200000 watch_events_per_sec
goal "stored replay, ratio to bare" ">=" 0.5 watch_events_per_sec ratio_to_bare
goal "live following, events/s" ">=" 100000 watch_live_events_per_sec
goal "live following, ratio to bare" ">=" 0.5 watch_live_events_per_sec ratio_to_bare
goal "1,000 watchers, p99 delay ms" "<" 20 watchers1000_delay_ms
[ -n "$quick" ] || goal "10,000 watchers, p99 delay ms" "<" 20 watchers10000_delay_ms
goal "restart, 1,000 runs in flight, s" "<" 1 restart_serving_s_1000
[ -n "$quick" ] || goal "restart, 10,000 runs in flight, s" "<" 1 restart_serving_s_10000
goal "durable stage transitions/s" ">=" 20000 noop_runs_per_sec
goal "idle memory per waiting run, bytes" "<" 8193 idle_run_rss_bytes
goal "submit_noop, ratio to echo unary" ">=" 0.6 submit_noop_per_sec ratio
exit $status
