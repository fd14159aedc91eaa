#!/bin/sh
# bench/fuzz.sh - runs each fuzz target of tests/fuzz for a given time and
# reports what it reached.
#
#   bench/fuzz.sh [-t SECONDS] [-o DIR] [-n] [TARGET...]
#
#   -t SECONDS  per target (default 300)
#   -o DIR      work directory (default /tmp/kpl-fuzz): DIR/bin holds copies
#               of the binaries, DIR/corpus/TARGET the inputs found (kept
#               between runs, so runs add up), DIR/TARGET.log libFuzzer's
#               output, DIR/artifacts/ any crash, leak or timeout input
#   -n          do not build: use the binaries already in DIR/bin
#   TARGET      names as in tests/fuzz/BUILD (pipeline_yaml, prom, ...);
#               default all
#
# Builds the targets with --config=asan --config=ubsan --config=fuzz
# (clang, libFuzzer, ASan+UBSan), runs them one after the other from the
# committed corpus (tests/fuzz/corpus/TARGET, read only) plus DIR/corpus,
# then replays the whole corpus once with -print_coverage=1 and prints one
# line per target:
#
#   TARGET seconds=S runs=N exec_per_sec=E corpus=C edges=X found=F
#       focus=FILE:a/b,...
#
# edges is libFuzzer's count of covered edges in the binary; focus counts
# edges covered over all edges of the source files the target is about,
# every function of them included (their I/O parts, which no fuzz target
# calls, count as uncovered). found is the number of crash/leak/timeout
# inputs written; fix each and add it to tests/fuzz/corpus/TARGET.
# Exits 1 if anything was found.
set -eu
cd "$(dirname "$0")/.."

seconds=300 out=/tmp/kpl-fuzz build=1
while getopts t:o:n opt; do
	case $opt in
	t) seconds=$OPTARG ;;
	o) out=$OPTARG ;;
	n) build= ;;
	*) sed -n '2,20p' "$0" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
all=$(awk '/^kpl_fuzz_test\(/ { t = 1 } t && /^    name = / { gsub(/[",]/, "", $3); print $3; t = 0 }' tests/fuzz/BUILD)
targets=${*:-$all}

# The source files each target is about (for the focus figure).
focus() {
	case $1 in
	pipeline_yaml | pipeline_json) echo pipelines/pipeline.c pipelines/expr.c pipelines/template.c ;;
	expr) echo pipelines/expr.c ;;
	template) echo pipelines/template.c ;;
	prom) echo stages/prom.c ;;
	jenkins) echo stages/jenkins.c ;;
	registry) echo stages/registry.c ;;
	kube) echo stages/kube.c ;;
	istio) echo stages/istio.c ;;
	hooks) echo engine/hooks.c ;;
	httpd) echo engine/httpd.c ;;
	rpc) echo engine/hooks.c pipelines/pipeline.c ;;
	chat) echo clients/chatbot/notice.c ;;
	*) echo "" ;;
	esac
}

mkdir -p "$out/bin" "$out/artifacts"
if [ -n "$build" ]; then
	labels=""
	for t in $targets; do labels="$labels //tests/fuzz:${t}_fuzz"; done
	bazel build --noshow_progress --config=asan --config=ubsan --config=fuzz $labels
	bin=$(bazel info --config=asan --config=ubsan --config=fuzz bazel-bin 2>/dev/null)
	for t in $targets; do cp -f "$bin/tests/fuzz/${t}_fuzz" "$out/bin/"; done
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
found_any=0
for t in $targets; do
	f=$out/bin/${t}_fuzz
	[ -x "$f" ] || { echo "fuzz: no binary $f (build it, or drop -n)" >&2; exit 1; }
	mkdir -p "$out/corpus/$t"
	dict=$(sed -n "/name = \"$t\"/,/^)/s/.*dict = \"\(.*\)\",/tests\/fuzz\/\1/p" tests/fuzz/BUILD)
	set -- -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$out/artifacts/$t-"
	[ -n "$dict" ] && set -- "$@" -dict="$dict"
	before=$(ls "$out/artifacts" | grep -c "^$t-" || true)
	"$f" "$@" "$out/corpus/$t" "tests/fuzz/corpus/$t" >"$out/$t.log" 2>&1 || true
	after=$(ls "$out/artifacts" | grep -c "^$t-" || true)
	found=$((after - before))
	[ "$found" -gt 0 ] && found_any=1
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log" | tail -1)
	eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/$t.log" | tail -1)
	edges=$(grep -o 'cov: [0-9]*' "$out/$t.log" | tail -1 | cut -d' ' -f2)
	# Coverage over the whole corpus, per function, for the focus files.
	"$f" -runs=0 -print_coverage=1 "$out/corpus/$t" "tests/fuzz/corpus/$t" \
		>"$out/$t.cov" 2>&1 || true
	fo=""
	for src in $(focus "$t"); do
		fo="$fo${fo:+,}$src:$(awk -v src="$src" '
			/^(COVERED|UNCOVERED)_FUNC:/ && index($0, src ":") {
				for (i = 1; i <= NF; i++) if ($i == "edges:") { split($(i + 1), e, "/"); c += e[1]; n += e[2] }
			}
			END { printf "%d/%d", c, n }' "$out/$t.cov")"
	done
	echo "$t seconds=$seconds runs=${runs:-?} exec_per_sec=${eps:-?}" \
		"corpus=$(ls "$out/corpus/$t" | wc -l) edges=${edges:-?} found=$found focus=$fo"
done
exit $found_any
