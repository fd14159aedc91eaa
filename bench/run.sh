#!/bin/sh
# run.sh - measure kpld against the machine's own limits and print every
# figure as "name=value (details)", with "ratio=" lines for the goals.
# Builds nothing:
#
#   bazel build //:kpld //bench:all && bench/run.sh [--quick] [-- api_bench options]
#
# Steps: a line about the machine; store_bench (LMDB alone); spawn_limit
# (programs spawned and waited per second: /bin/true); a kpld with --sandbox
# none for script stages against that limit; a kpld as it ships for
# submit_noop (against tests/api/echo_server), the stored and live stream and
# the noop transitions; watch_bench (1,000 and 10,000 WatchRun streams on one
# run; --quick: 1,000); last, bwrap's own spawn limit and script stages in
# the sandbox against it; the ratios.
# Each kpld gets a fresh data dir and must exit 0 on SIGTERM.
#
# Usage: bench/run.sh [--quick] [--script-only] [--kpld PATH] [--api-bench PATH]
#                     [--store-bench PATH] [--spawn-limit PATH]
#                     [--tmp DIR] [--keep] [-- API_BENCH_OPTIONS...]
# --quick finishes in under a minute (short phases, small replay).
# --script-only: the plain spawn limit and the unsandboxed script phases
# only (with kpld's spawner and without, KPL_NO_SPAWNER=1, back to back). Paths
# default to bazel-bin/{engine/kpld,bench/...} under the repository. --tmp is
# where the data dirs go (default $TMPDIR or /tmp): pick the file system you
# mean to measure. --keep leaves the data dirs and kpld's logs behind. Exit
# status: 0 if every step succeeded.
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bazel-bin"
kpld="$bin/engine/kpld"
api_bench="$bin/bench/api_bench"
store_bench="$bin/bench/store_bench"
spawn_limit="$bin/bench/spawn_limit"
watch_bench="$bin/bench/watch_bench"
watchers="1000 10000"
watch_lines=100
echo_server="$bin/tests/api/echo_server"
limit_s=5
submit_s=10
quick_opts=
tmp="${TMPDIR:-/tmp}"
keep=
script_only=
while [ $# -gt 0 ]; do
	case "$1" in
	--kpld) kpld=$2; shift 2 ;;
	--api-bench) api_bench=$2; shift 2 ;;
	--store-bench) store_bench=$2; shift 2 ;;
	--tmp) tmp=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--script-only) script_only=1; shift ;;
	--spawn-limit) spawn_limit=$2; shift 2 ;;
	--quick)
		# Under a minute: short phases, one submit phase, a small replay.
		limit_s=2
		submit_s=3
		quick_opts="--duration 3 --conns 64 --lines 10000 --repeat 1 --noop-runs 200"
		watchers=1000
		watch_lines=20
		shift ;;
	--) shift; break ;;
	-h|--help) sed -n '2,23s/^# \{0,1\}//p' "$0"; exit 0 ;;
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

if [ -n "$script_only" ]; then
	:
elif [ -x "$store_bench" ]; then
	"$store_bench" "$dir/lmdb" || status=1
	rm -rf "$dir/lmdb"
else
	echo "run.sh: $store_bench not built; skipping the LMDB figures" >&2
fi

# kpld with a fresh data dir; $pid and $ready say which. Args: its extra
# flags; $kpld_env: NAME=VALUE words for its environment.
kpld_env=
start_kpld() {
	ready="$dir/ready.$1"
	name=$1
	shift
	env $kpld_env "$kpld" --listen 127.0.0.1:0 --data-dir "$dir/data.$name" \
		--ready-file "$ready" \
		--log-level warn "$@" >"$dir/kpld.$name.log" 2>&1 &
	pid=$!
	i=0
	while [ ! -s "$ready" ]; do
		if ! kill -0 "$pid" 2>/dev/null || [ $i -ge 100 ]; then
			echo "run.sh: kpld did not become ready; its log:" >&2
			cat "$dir/kpld.$name.log" >&2
			exit 1
		fi
		sleep 0.1
		i=$((i + 1))
	done
}

stop_kpld() {
	kill -TERM "$pid"
	wait "$pid"
	rc=$?
	pid=
	if [ $rc -ne 0 ]; then
		echo "run.sh: kpld ($1) exited $rc after SIGTERM; its log:" >&2
		tail -n 30 "$dir/kpld.$1.log" >&2
		status=1
	else
		echo "kpld_exit=0 ($1: SIGTERM, clean stop)"
	fi
}

# The value of figure $1 in file $2 ("name=value (...)" lines).
figure() { sed -n "s/^$1=\([0-9.]*\).*/\1/p" "$2" | tail -n 1; }

# The limit: programs spawned and waited per second with nothing of kpl in
# the way (bubblewrap's comes last, see below).
out="$dir/figures"
: >"$out"
if [ -x "$spawn_limit" ]; then
	"$spawn_limit" --seconds "$limit_s" -- /bin/true | tee -a "$out"
else
	echo "run.sh: $spawn_limit not built; no limits, no ratios" >&2
fi

# Script stages without the sandbox, against the plain limit: first with
# each shim started by kpld itself (KPL_NO_SPAWNER=1, posix_spawn), then
# through kpld's spawner (stages/spawner.h), back to back.
kpld_env=KPL_NO_SPAWNER=1
start_kpld nospawner --sandbox none
kpld_env=
"$api_bench" --ready-file "$ready" --kpld-pid "$pid" --only submit --conns 64 \
	--duration "$submit_s" | sed 's/^submit_per_sec/submit_unsandboxed_nospawner_per_sec/' |
	tee -a "$out" || status=1
stop_kpld nospawner
start_kpld none --sandbox none
"$api_bench" --ready-file "$ready" --kpld-pid "$pid" --only submit --conns 64 \
	--duration "$submit_s" | sed 's/^submit_per_sec/submit_unsandboxed_per_sec/' |
	tee -a "$out" || status=1
stop_kpld none

if [ -z "$script_only" ]; then
	# The API alone (api/server.c with canned answers), the limit submit_noop
	# is measured against.
	echo_opts=
	echo_pid=
	if [ -x "$echo_server" ]; then
		"$echo_server" >"$dir/echo.out" 2>"$dir/echo.log" &
		echo_pid=$!
		i=0
		while ! grep -q '^PORT=' "$dir/echo.out" 2>/dev/null && [ $i -lt 100 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		port=$(sed -n 's/^PORT=//p' "$dir/echo.out")
		[ -n "$port" ] && echo_opts="--echo-target 127.0.0.1:$port"
	else
		echo "run.sh: $echo_server not built; no echo limit for submit_noop" >&2
	fi

	# Everything else on kpld as it ships (the sandbox on), but for the cap on
	# streams per connection: the noop phase's 64 followers share one TCP
	# connection (grpc pools subchannels of equal channels).
	start_kpld default --max-streams-per-conn 256
	"$api_bench" --ready-file "$ready" --kpld-pid "$pid" $echo_opts $quick_opts \
		--only submit_noop,watch,noop "$@" | tee -a "$out" || status=1
	stop_kpld default
	if [ -n "$echo_pid" ]; then
		kill -TERM "$echo_pid"
		wait "$echo_pid"
	fi

	# Many followers of one run (bench/watch_bench): the delay from an
	# event's commit to its arrival at each of N WatchRun streams, against
	# the 20 ms goal; --quick: 1,000 streams only, 20 lines.
	if [ -x "$watch_bench" ]; then
		for n in $watchers; do
			start_kpld "watch$n" --sandbox none --max-streams $((n + 64)) \
				--max-streams-per-conn $((n / 32 + 64))
			"$watch_bench" --ready-file "$ready" --kpld-pid "$pid" --watchers "$n" \
				--conns 32 --lines "$watch_lines" --interval-ms 50 |
				sed "s/^watchers_/watchers${n}_/" | tee -a "$out" || status=1
			stop_kpld "watch$n"
		done
	else
		echo "run.sh: $watch_bench not built; no watchers figures" >&2
	fi

	# Last, the sandbox: bubblewrap's own limit (set up like a script
	# stage's), then script stages on kpld as it ships. Thousands of
	# sandboxes leave the kernel tearing down their namespaces for a while
	# (load averages in the hundreds here), which slowed every figure
	# measured after them by up to a third.
	if [ -x "$spawn_limit" ] && command -v bwrap >/dev/null 2>&1; then
		mkdir -p "$dir/ws"
		# bwrap waits on the kernel (namespaces) more than it computes:
		# 16 loops reach its limit where one per core does not.
		"$spawn_limit" --name spawn_bwrap_limit_per_sec --loops 16 --seconds "$limit_s" -- \
			bwrap --die-with-parent --new-session --unshare-pid --unshare-ipc \
			--unshare-uts --unshare-cgroup-try --ro-bind / / --dev /dev --proc /proc \
			--tmpfs /tmp --tmpfs /run --tmpfs /var/tmp --bind "$dir/ws" "$dir/ws" \
			--chdir "$dir/ws" -- /bin/true | tee -a "$out"
	fi
	start_kpld sandboxed
	"$api_bench" --ready-file "$ready" --kpld-pid "$pid" $quick_opts --only submit \
		--conns 64 "$@" | tee -a "$out" || status=1
	stop_kpld sandboxed
fi

# Ratios against the limits (issue 12's goals: script runs end to end at
# >= 50% of the spawn loop; kpld's CPU per script run <= 1 ms).
e2e() { sed -n "s/^$1=.* so \([0-9.]*\) runs\/s end to end.*/\1/p" "$out" | sort -n | tail -n 1; }
ratio() { # name value limit_name
	lim=$(figure "$3" "$out")
	if [ -n "$2" ] && [ -n "$lim" ]; then
		awk -v n="$1" -v v="$2" -v l="$lim" -v ln="$3" \
			'BEGIN { printf "%s=%.0f ratio=%.2f of %s=%.0f\n", n, v, v / l, ln, l }'
	fi
}
ratio script_runs_unsandboxed_nospawner_per_sec "$(e2e submit_unsandboxed_nospawner_per_sec)" \
	spawn_limit_per_sec
ratio script_runs_unsandboxed_per_sec "$(e2e submit_unsandboxed_per_sec)" spawn_limit_per_sec
ratio script_runs_per_sec "$(e2e submit_per_sec)" spawn_bwrap_limit_per_sec
for f in submit_unsandboxed_nospawner_per_sec_kpld_cpu_ms_per_run \
	submit_unsandboxed_per_sec_kpld_cpu_ms_per_run submit_per_sec_kpld_cpu_ms_per_run; do
	v=$(figure "$f" "$out")
	[ -n "$v" ] && awk -v n="$f" -v v="$v" 'BEGIN { printf "%s=%s ratio=%.2f of the 1 ms goal\n", n, v, v / 1 }'
done
for n in $watchers; do
	v=$(figure "watchers${n}_delay_ms" "$out")
	[ -n "$v" ] && awk -v n="watchers${n}_delay_ms" -v v="$v" \
		'BEGIN { printf "%s=%s ratio=%.2f of the 20 ms goal (p99; under 1 meets it)\n", n, v, v / 20 }'
done
exit $status
