#!/bin/sh
# run_fuzz.sh MODE BINARY CORPUS_DIR DICT SECONDS - a fuzz target as a test.
#
#   MODE fuzz    BINARY is a libFuzzer binary (--config=fuzz): fuzz for
#                SECONDS from the committed corpus, with DICT ("-": none).
#                New inputs go to a temporary directory, never to the repo;
#                a crash fails the test and its input is kept in the test's
#                undeclared outputs (bazel-testlogs/.../test.outputs/).
#   MODE replay  BINARY runs each corpus file once (tests/fuzz/replay_main.c).
set -eu
mode=$1 bin=$2 corpus=$3 dict=$4 seconds=$5

[ -d "$corpus" ] || { echo "run_fuzz: no corpus $corpus" >&2; exit 1; }
n=$(find -L "$corpus" -type f | wc -l)
[ "$n" -gt 0 ] || { echo "run_fuzz: corpus $corpus is empty" >&2; exit 1; }

case "$mode" in
replay)
	exec "$bin" "$corpus"
	;;
fuzz)
	tmp=${TEST_TMPDIR:-$(mktemp -d)}/corpus
	out=${TEST_UNDECLARED_OUTPUTS_DIR:-${TEST_TMPDIR:-/tmp}}
	mkdir -p "$tmp" "$out"
	set -- -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$out/"
	[ "$dict" = - ] || set -- "$@" -dict="$dict"
	# Every seed first (a regression over the corpus), then mutations.
	exec "$bin" "$@" "$tmp" "$corpus"
	;;
*)
	echo "run_fuzz: unknown mode $mode" >&2
	exit 2
	;;
esac
