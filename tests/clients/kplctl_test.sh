#!/bin/sh
# kplctl against tests/clients/fake_pipelines.py: real outputs and exit
# codes of submit, watch (live, failed, resumed after a broken stream), get,
# list, cancel, lint, approve (and reject), retry, events (filtered, resumed
# after a broken stream, ended by Ctrl-C), -o json and the error paths.
#
# Usage: kplctl_test.sh [KPLCTL FAKE PROTO]; under bazel test the defaults
# are the runfiles.
set -u

KPLCTL=${1:-clients/kplctl}
FAKE=${2:-tests/clients/fake_pipelines.py}
PROTO=${3:-api/kpl.proto}
PY=/usr/bin/python3
T=${TEST_TMPDIR:-$(mktemp -d)}
failures=0
FAKE_PID=

fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}

cleanup() {
	[ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null
	wait 2>/dev/null
}
trap cleanup EXIT

# --- Start the fake and find its port. ---
"$PY" "$FAKE" --proto "$PROTO" --lifetime 170 --step 0.05 \
	--log "$T/watch.log" >"$T/fake.out" 2>"$T/fake.err" &
FAKE_PID=$!
i=0
while ! grep -q '^PORT=' "$T/fake.out" 2>/dev/null; do
	i=$((i + 1))
	if [ $i -gt 200 ] || ! kill -0 "$FAKE_PID" 2>/dev/null; then
		echo "fake server did not start:" >&2
		cat "$T/fake.err" >&2
		exit 1
	fi
	sleep 0.1
done
PORT=$(sed -n 's/^PORT=//p' "$T/fake.out")
KPL_SERVER=127.0.0.1:$PORT
export KPL_SERVER

# ctl NAME ARGS...: runs kplctl; stdout in $T/NAME.out, stderr in
# $T/NAME.err, exit code in $rc.
ctl() {
	name=$1
	shift
	timeout 60 "$KPLCTL" "$@" >"$T/$name.out" 2>"$T/$name.err" </dev/null
	rc=$?
}

# expect_rc NAME WANT
expect_rc() {
	[ "$rc" -eq "$2" ] || {
		fail "$1: exit $rc, want $2"
		sed 's/^/  stdout: /' "$T/$1.out" >&2
		sed 's/^/  stderr: /' "$T/$1.err" >&2
	}
}

# events NAME: the watch lines of $T/NAME.out without their timestamps,
# after checking every one has a [HH:MM:SS] timestamp.
events() {
	if grep '^\[' "$T/$1.out" | grep -qv '^\[[0-2][0-9]:[0-5][0-9]:[0-6][0-9]\] '; then
		fail "$1: event line without [HH:MM:SS]"
	fi
	grep '^\[' "$T/$1.out" | sed 's/^\[[0-9:]*\] //'
}

# expect_events NAME: compares events NAME with stdin, exactly (order,
# nothing missing, nothing twice).
expect_events() {
	cat >"$T/$1.want"
	events "$1" >"$T/$1.got"
	if ! diff -u "$T/$1.want" "$T/$1.got" >"$T/$1.diff"; then
		fail "$1: watch lines differ"
		cat "$T/$1.diff" >&2
	fi
}

pipeline() { # pipeline NAME MARKERS STAGES...
	name=$1
	markers=$2
	shift 2
	printf 'name: %s\n%s\nstages:\n' "$name" "$markers"
	for s in "$@"; do
		printf '  - name: %s\n    kind: shell\n' "$s"
	done
}

# --- submit prints the run id; watch shows every event once, in order. ---
pipeline demo "" build test >"$T/ok.yaml"
ctl submit submit "$T/ok.yaml" -p version=1.2.3 -p 'note=a=b'
expect_rc submit 0
ID=$(cat "$T/submit.out")
echo "$ID" | grep -Eq '^[A-Za-z0-9_.-]+$' || fail "submit: printed \"$ID\", want one run id"

ctl watch watch "$ID"
expect_rc watch 0
expect_events watch <<'EOF'
== run RUNNING
build      RUNNING
build      | hello from build
build      ! warning from build
build      SUCCEEDED
test       RUNNING
test       | hello from test
test       ! warning from test
test       SUCCEEDED
== run SUCCEEDED: all stages succeeded
EOF
grep -Eq '^build +SUCCEEDED +1 ' "$T/watch.out" || fail "watch: no summary row for build"
grep -qx "run $ID SUCCEEDED: all stages succeeded" "$T/watch.out" ||
	fail "watch: no final run line"

# --- submit --watch, from stdin, on a run that fails: exit 1. ---
pipeline demo "# fake: fail" build test >"$T/fail.yaml"
timeout 60 "$KPLCTL" submit - --watch <"$T/fail.yaml" >"$T/failw.out" 2>"$T/failw.err"
rc=$?
expect_rc failw 1
FID=$(head -n 1 "$T/failw.out")
[ "$FID" != "$ID" ] && [ -n "$FID" ] || fail "submit --watch: first line \"$FID\" is not a new run id"
events failw | tail -n 2 >"$T/failw.tail"
printf '%s\n' 'test       FAILED  exit status 1' '== run FAILED: stage test failed' |
	diff -u - "$T/failw.tail" >&2 || fail "submit --watch: wrong last events"
grep -Eq '^test +FAILED +1 .*exit status 1$' "$T/failw.out" || fail "submit --watch: no FAILED summary row"
grep -qx "run $FID FAILED: stage test failed" "$T/failw.out" || fail "submit --watch: no final FAILED line"

# --- A server error is passed through with its status name: exit 3. ---
pipeline bad "# fake: invalid" build >"$T/bad.yaml"
ctl invalid submit "$T/bad.yaml"
expect_rc invalid 3
grep -qx 'kplctl: submit: INVALID_ARGUMENT: pipeline:3:5: stages\[0\].kind: unknown kind "shel"' \
	"$T/invalid.err" || fail "submit: INVALID_ARGUMENT not passed through: $(cat "$T/invalid.err")"
[ -s "$T/invalid.out" ] && fail "submit: printed something on stdout after an error"

ctl notfound get no-such-run
expect_rc notfound 3
grep -q '^kplctl: get: NOT_FOUND: ' "$T/notfound.err" || fail "get: NOT_FOUND not reported"

# --- A stream broken after 4 events is resumed from seq 5, nothing twice. ---
pipeline brk "# fake: break-after 4" build test >"$T/brk.yaml"
ctl brk submit "$T/brk.yaml" --watch
expect_rc brk 0
BID=$(head -n 1 "$T/brk.out")
expect_events brk <<'EOF'
== run RUNNING
build      RUNNING
build      | hello from build
build      ! warning from build
build      SUCCEEDED
test       RUNNING
test       | hello from test
test       ! warning from test
test       SUCCEEDED
== run SUCCEEDED: all stages succeeded
EOF
grep "^watch $BID " "$T/watch.log" >"$T/brk.watches"
printf 'watch %s 1\nwatch %s 5\n' "$BID" "$BID" | diff -u - "$T/brk.watches" >&2 ||
	fail "broken stream: not resumed with from_seq = last seq + 1"

# --- A server that resends old events: still shown once, from --from-seq. ---
pipeline rs "# fake: resend" build >"$T/rs.yaml"
ctl rs1 submit "$T/rs.yaml"
RID=$(cat "$T/rs1.out")
ctl rs watch "$RID" --from-seq 3
expect_rc rs 0
expect_events rs <<'EOF'
build      | hello from build
build      ! warning from build
build      SUCCEEDED
== run SUCCEEDED: all stages succeeded
EOF

# --- get, text and JSON. ---
ctl get get "$ID"
expect_rc get 0
grep -qx "id:        $ID" "$T/get.out" || fail "get: no id line"
grep -qx 'state:     SUCCEEDED' "$T/get.out" || fail "get: no state line"
grep -qx '  version=1.2.3' "$T/get.out" || fail "get: param version missing"
grep -qx '  note=a=b' "$T/get.out" || fail "get: param note missing"
grep -Eq '^  build +shell +SUCCEEDED +1 ' "$T/get.out" || fail "get: no stage row"
grep -qx '  test.result=ok-test' "$T/get.out" || fail "get: no stage output"

ctl getj get "$ID" -o json
expect_rc getj 0
"$PY" - "$T/getj.out" "$ID" <<'EOF' || fail "get -o json: not the run"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["id"] == sys.argv[2], r["id"]
assert r["state"] == "RUN_STATE_SUCCEEDED", r["state"]
assert r["params"] == {"version": "1.2.3", "note": "a=b"}, r["params"]
assert [s["name"] for s in r["stages"]] == ["build", "test"]
assert r["stages"][1]["outputs"] == {"result": "ok-test"}
assert r["last_seq"] == 10, r["last_seq"]
assert r["finished_at"].endswith("Z"), r["finished_at"]
EOF

ctl subj -o json submit "$T/ok.yaml" --idempotency-key k1
ctl subj2 submit "$T/ok.yaml" --idempotency-key k1
"$PY" - "$T/subj.out" "$(cat "$T/subj2.out")" <<'EOF' || fail "submit -o json / idempotency key"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["idempotency_key"] == "k1"
assert r["id"] == sys.argv[2], (r["id"], sys.argv[2])
EOF

# --- list: newest first, filters, JSON. ---
ctl list list
expect_rc list 0
head -n 1 "$T/list.out" | grep -q '^ID  *PIPELINE  *STATE' || fail "list: no header"
sed -n 2p "$T/list.out" | grep -q "^$(cat "$T/subj2.out") " || fail "list: newest run not first"
ctl listf list --state failed -o json
expect_rc listf 0
"$PY" - "$T/listf.out" "$FID" <<'EOF' || fail "list --state failed -o json"
import json, sys
d = json.load(open(sys.argv[1]))
assert [r["id"] for r in d["runs"]] == [sys.argv[2]], d
EOF
ctl listl list --pipeline demo --limit 2
[ "$(wc -l <"$T/listl.out")" -eq 3 ] || fail "list --limit 2: want a header and 2 rows"
grep -v '^ID' "$T/listl.out" | grep -v ' demo ' && fail "list --pipeline demo: other pipelines shown"

# --- cancel, then watch: exit 1. ---
pipeline long "" s1 s2 s3 s4 s5 s6 s7 s8 s9 s10 s11 s12 s13 s14 s15 >"$T/long.yaml"
ctl long submit "$T/long.yaml"
LID=$(cat "$T/long.out")
ctl cancel cancel "$LID"
expect_rc cancel 0
grep -qx "$LID CANCELLED" "$T/cancel.out" || fail "cancel: printed $(cat "$T/cancel.out")"
ctl cwatch watch "$LID"
expect_rc cwatch 1
events cwatch | tail -n 1 | grep -qx '== run CANCELLED: cancelled by request' || fail "watch: no CANCELLED line"

# --- lint: the user's file names, not the server's "pipeline". ---
printf 'stages:\n  - name: build\n    kind: shel\n' >"$T/lintbad.yaml"
pipeline warn "# fake: lint-warning" build >"$T/warn.yaml"
ctl lint lint "$T/ok.yaml" "$T/lintbad.yaml" "$T/warn.yaml"
expect_rc lint 1
cat >"$T/lint.want" <<EOF
$T/ok.yaml: ok
$T/lintbad.yaml:1:1: missing required key "name"
$T/lintbad.yaml:3:11: stages[0].kind: unknown kind "shel" (did you mean "shell"?)
$T/warn.yaml:2:1: warning: a canned warning
$T/warn.yaml: ok
EOF
diff -u "$T/lint.want" "$T/lint.out" >&2 || fail "lint: wrong output"
ctl lintok lint "$T/ok.yaml" "$T/warn.yaml"
expect_rc lintok 0
ctl lintj lint "$T/ok.yaml" "$T/lintbad.yaml" -o json
expect_rc lintj 1
"$PY" - "$T/lintj.out" "$T/lintbad.yaml" <<'EOF' || fail "lint -o json"
import json, sys
d = json.load(open(sys.argv[1]))
ok, bad = d["files"]
assert ok["valid"] is True and ok["pipeline_name"] == "demo", ok
assert bad["file"] == sys.argv[2] and bad["valid"] is False, bad
assert [(x["line"], x["column"], x["path"], x["severity"])
        for x in bad["diagnostics"]] == [
    (1, 1, "", "SEVERITY_ERROR"), (3, 11, "stages[0].kind", "SEVERITY_ERROR")]
EOF
ctl lintmiss lint "$T/ok.yaml" "$T/does-not-exist.yaml"
expect_rc lintmiss 2
grep -qx "$T/ok.yaml: ok" "$T/lintmiss.out" || fail "lint: stopped at a missing file"
ctl lintdown --server 127.0.0.1:1 lint "$T/ok.yaml" "$T/lintbad.yaml"
expect_rc lintdown 3
grep -q '^kplctl: lint: UNAVAILABLE: ' "$T/lintdown.err" || fail "lint: no UNAVAILABLE"

# wait_for NAME REGEX: waits (at most 10 s) until $T/NAME.out has a line
# matching REGEX.
wait_for() {
	i=0
	while ! grep -Eq "$2" "$T/$1.out" 2>/dev/null; do
		i=$((i + 1))
		[ $i -gt 100 ] && { fail "$1: no line matching $2"; return 1; }
		sleep 0.1
	done
}

# --- approve: watch shows the WAITING stage, then the answer. ---
pipeline appr "# fake: approval deploy" build deploy >"$T/appr.yaml"
ctl appr submit "$T/appr.yaml"
AID=$(cat "$T/appr.out")
timeout 60 "$KPLCTL" watch "$AID" >"$T/aw.out" 2>"$T/aw.err" </dev/null &
AW_PID=$!
wait_for aw ' WAITING '
ctl approve approve "$AID" deploy -m "ship it" --by alice
expect_rc approve 0
grep -qx "$AID RUNNING" "$T/approve.out" || fail "approve: printed $(cat "$T/approve.out")"
wait $AW_PID
rc=$?
expect_rc aw 0
expect_events aw <<'EOF'
== run RUNNING
build      RUNNING
build      | hello from build
build      ! warning from build
build      SUCCEEDED
deploy     WAITING  waiting for approval: release appr
deploy     SUCCEEDED  approved by alice: ship it
== run SUCCEEDED: all stages succeeded
EOF
grep -qx "approve $AID deploy yes alice|ship it" "$T/watch.log" || fail "approve: wrong request"
ctl approve2 approve "$AID" deploy
expect_rc approve2 3
grep -qx 'kplctl: approve: FAILED_PRECONDITION: stage "deploy" is not waiting for approval' \
	"$T/approve2.err" || fail "approve twice: $(cat "$T/approve2.err")"

# --- approve --reject, by $USER@host by default: the run fails. ---
ctl rj submit "$T/appr.yaml"
RJ=$(cat "$T/rj.out")
i=0
until ctl rjget get "$RJ" && grep -Eq '^  deploy +shell +WAITING ' "$T/rjget.out"; do
	i=$((i + 1))
	[ $i -gt 100 ] && { fail "reject: deploy never WAITING"; break; }
	sleep 0.1
done
(USER=tester; export USER; ctl reject approve "$RJ" deploy --reject; exit $rc)
rc=$?
expect_rc reject 0
grep -qx "$RJ FAILED" "$T/reject.out" || fail "reject: printed $(cat "$T/reject.out")"
grep -qx "approve $RJ deploy no tester@$(uname -n)|" "$T/watch.log" ||
	fail "reject: not sent as tester@$(uname -n): $(grep "approve $RJ" "$T/watch.log")"

# --- retry: a new attempt of the failed run, followed to its end. ---
ctl retry retry "$FID" --watch
expect_rc retry 0
head -n 1 "$T/retry.out" | grep -qx "$FID attempt 2" ||
	fail "retry: first line $(head -n 1 "$T/retry.out")"
expect_events retry <<'EOF'
== run RUNNING: attempt 2
test       RUNNING (attempt 2)
test       | hello from test
test       ! warning from test
test       SUCCEEDED (attempt 2)
== run SUCCEEDED: all stages succeeded
EOF
grep -Eq '^build +SUCCEEDED +1 ' "$T/retry.out" || fail "retry: build not kept"
grep -Eq '^test +SUCCEEDED +2 ' "$T/retry.out" || fail "retry: no attempt 2 row"
grep -qx "run $FID SUCCEEDED (attempt 2): all stages succeeded" "$T/retry.out" ||
	fail "retry: no final line with the attempt"
grep -qx "watch $FID 11" "$T/watch.log" || fail "retry --watch: not from the old last seq + 1"
ctl retry2 retry "$FID"
expect_rc retry2 3
grep -q '^kplctl: retry: FAILED_PRECONDITION: ' "$T/retry2.err" || fail "retry of a succeeded run"
ctl retry3 retry "$RJ"
expect_rc retry3 0
grep -qx "$RJ attempt 2" "$T/retry3.out" || fail "retry: printed $(cat "$T/retry3.out")"

# --- events: every run's events with the global seq; a broken stream is
# resumed from the last global seq + 1; Ctrl-C ends it with exit 0. ---
pipeline evt "# fake: break-events" build >"$T/evt.yaml"
ctl evt submit "$T/evt.yaml"
EID=$(cat "$T/evt.out")
timeout --preserve-status -s INT 3 "$KPLCTL" events --from 1 --pipeline evt \
	>"$T/ev.out" 2>"$T/ev.err" </dev/null
rc=$?
expect_rc ev 0
events ev | cut -d' ' -f2- >"$T/ev.got"
sed "s/^/$EID evt /" >"$T/ev.want" <<'EOF'
== run RUNNING
build      RUNNING
build      | hello from build
build      ! warning from build
build      SUCCEEDED
== run SUCCEEDED: all stages succeeded
EOF
diff -u "$T/ev.want" "$T/ev.got" >&2 || fail "events: wrong lines"
events ev | cut -d' ' -f1 | sort -n -c -u || fail "events: global seqs not increasing"
G1=$(events ev | head -n 1 | cut -d' ' -f1)
grep '^watchruns ' "$T/watch.log" >"$T/ev.watches"
printf 'watchruns 1 evt -\nwatchruns %s evt -\n' "$((G1 + 1))" |
	diff -u - "$T/ev.watches" >&2 || fail "events: not resumed from global seq + 1"

timeout --preserve-status -s INT 2 "$KPLCTL" events --from 1 --pipeline evt \
	--kind run --kind log --kind run -o json >"$T/evj.out" 2>"$T/evj.err" </dev/null
rc=$?
expect_rc evj 0
"$PY" - "$T/evj.out" "$EID" <<'EOF' || fail "events --kind -o json"
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
assert [e["kind"] for e in evs] == ["EVENT_KIND_RUN_STATE", "EVENT_KIND_LOG",
                                    "EVENT_KIND_LOG", "EVENT_KIND_RUN_STATE"], evs
assert all(e["run_id"] == sys.argv[2] and e["pipeline_name"] == "evt"
           and e["global_seq"] > 0 for e in evs), evs
EOF
grep -qx 'watchruns 1 evt EVENT_KIND_RUN_STATE,EVENT_KIND_LOG' "$T/watch.log" ||
	fail "events --kind: wrong request"
ctl evbad events --kind build
expect_rc evbad 2
ctl evbad2 events --from x
expect_rc evbad2 2

# --- Connection and usage errors. ---
ctl down --server 127.0.0.1:1 get x
expect_rc down 3
grep -q '^kplctl: get: UNAVAILABLE: ' "$T/down.err" || fail "unreachable server: $(cat "$T/down.err")"
(KPL_SERVER=127.0.0.1:1; export KPL_SERVER; ctl envsrv get "$ID"; exit $rc)
rc=$?
expect_rc envsrv 3
ctl usage1 frobnicate
expect_rc usage1 2
ctl usage2 get
expect_rc usage2 2
ctl usage3 watch "$ID" --limit 3
expect_rc usage3 2
ctl usage4 submit "$T/ok.yaml" -p novalue
expect_rc usage4 2
ctl usage5 submit "$T/does-not-exist.yaml"
expect_rc usage5 2
ctl help --help
expect_rc help 0
grep -q 'exit status' "$T/help.out" || fail "--help: exit codes not documented"

if [ "$failures" -ne 0 ]; then
	echo "$failures check(s) failed" >&2
	exit 1
fi
echo "all kplctl checks passed"
