#!/bin/sh
# kplctl against tests/clients/fake_pipelines.py: real outputs and exit
# codes of submit, watch (live, failed, resumed after a broken stream), get,
# list, cancel, lint, approve (and reject), retry, events (filtered, resumed
# after a broken stream, ended by Ctrl-C), -o json and the error paths.
#
# Also logs, watch -o json, secret (the value from stdin, exactly as sent),
# releases, rollback, the live table on a terminal (tmux) with the canary's
# WEIGHT and VERIFY columns, and the bash completion (clients/kplctl.bash).
#
# Usage: kplctl_test.sh [KPLCTL FAKE PROTO COMPLETION]; under bazel test the
# defaults are the runfiles.
set -u

KPLCTL=${1:-clients/kplctl}
FAKE=${2:-tests/clients/fake_pipelines.py}
PROTO=${3:-api/kpl.proto}
COMPLETION=${4:-clients/kplctl.bash}
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
	if [ -n "${TMUX_TMPDIR:-}" ]; then
		tmux -f /dev/null -L kplctl-test kill-server 2>/dev/null
		rm -rf "$TMUX_TMPDIR"
	fi
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
# No kpld: linted offline by kpld's own parser and stage kinds (the fake's
# "shell" kind is unknown there), said once on stderr.
printf 'name: real\nstages:\n  - name: a\n    kind: script\n    with: { command: ["true"] }\n' \
	>"$T/realok.yaml"
ctl lintdown --server 127.0.0.1:1 lint "$T/realok.yaml" "$T/lintbad.yaml"
expect_rc lintdown 1
grep -qx "$T/realok.yaml: ok" "$T/lintdown.out" || fail "lint offline: realok.yaml not ok"
grep -qx "$T/lintbad.yaml:1:1: name: missing required key \"name\"" "$T/lintdown.out" ||
	fail "lint offline: lintbad.yaml's first problem missing"
[ "$(grep -c '^kplctl: lint: no kpld at 127.0.0.1:1: checked offline' "$T/lintdown.err")" = 1 ] ||
	fail "lint offline: the note is not there once"
ctl lintdownok --server 127.0.0.1:1 lint "$T/realok.yaml"
expect_rc lintdownok 0

# wait_for NAME REGEX: waits (at most 60 s: a bound for a hang, not a
# timing goal) until $T/NAME.out has a line matching REGEX.
wait_for() {
	i=0
	while ! grep -Eq "$2" "$T/$1.out" 2>/dev/null; do
		i=$((i + 1))
		[ $i -gt 600 ] && { fail "$1: no line matching $2"; return 1; }
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

# --- watch -o json: one RunEvent a line; submit -o json --watch: the run on
# its first line, then the events (all of it JSON Lines). ---
ctl watchj watch "$ID" -o json
expect_rc watchj 0
"$PY" - "$T/watchj.out" "$ID" <<'EOF' || fail "watch -o json"
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
assert [e["seq"] for e in evs] == list(range(1, 11)), evs
assert all(e["run_id"] == sys.argv[2] for e in evs)
assert evs[-1]["run_state"] == "RUN_STATE_SUCCEEDED", evs[-1]
assert evs[2]["kind"] == "EVENT_KIND_LOG" and evs[2]["message"] == "hello from build"
EOF
ctl subjw submit "$T/fail.yaml" -o json --watch
expect_rc subjw 1
"$PY" - "$T/subjw.out" <<'EOF' || fail "submit -o json --watch"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
run, evs = lines[0], lines[1:]
assert run["pipeline_name"] == "demo" and "stages" in run, run
assert [e["seq"] for e in evs] == list(range(1, 11)), evs
assert evs[-1]["run_state"] == "RUN_STATE_FAILED", evs[-1]
EOF

# --- logs: every stage's lines, or one stage's bare lines; -o json. ---
ctl logs logs "$ID"
expect_rc logs 0
printf '%s\n' 'build | hello from build' 'build ! warning from build' \
	'test  | hello from test' 'test  ! warning from test' |
	diff -u - "$T/logs.out" >&2 || fail "logs: wrong lines"
ctl logss logs "$ID" --stage test
expect_rc logss 0
printf '%s\n' 'hello from test' 'warning from test' |
	diff -u - "$T/logss.out" >&2 || fail "logs --stage: wrong lines"
ctl logsj logs "$ID" --stage build -o json
expect_rc logsj 0
"$PY" - "$T/logsj.out" <<'EOF' || fail "logs -o json"
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
assert [(e["stage"], e["stream"], e["message"]) for e in evs] == [
    ("build", "LOG_STREAM_STDOUT", "hello from build"),
    ("build", "LOG_STREAM_STDERR", "warning from build")], evs
EOF
ctl logsbad logs "$ID" --stage nope
expect_rc logsbad 3
grep -qx "kplctl: logs: NOT_FOUND: run $ID has no stage \"nope\"" "$T/logsbad.err" ||
	fail "logs --stage nope: $(cat "$T/logsbad.err")"
ctl logsusage logs "$ID" --follow=yes
expect_rc logsusage 2

# A running run: without --follow, what is stored now (up to GetRun's
# last_seq), at once; with --follow, every line to the run's end. The run
# is held at s3, waiting for approval, so "running" is a condition the test
# awaits, not a time window it must hit (under load it used to miss it).
pipeline long2 "# fake: approval s3" s1 s2 s3 s4 s5 s6 s7 s8 s9 s10 s11 s12 s13 s14 s15 \
	>"$T/long2.yaml"
ctl l2 submit "$T/long2.yaml"
L2=$(cat "$T/l2.out")
wait_for_get() { # wait_for_get ID REGEX: polls kplctl get (60 s)
	i=0
	until ctl wfg get "$1" && grep -Eq "$2" "$T/wfg.out"; do
		i=$((i + 1))
		[ $i -gt 600 ] && { fail "get $1: no line matching $2"; return 1; }
		sleep 0.1
	done
}
wait_for_get "$L2" '^  s3 +shell +WAITING '
ctl l2now logs "$L2"
expect_rc l2now 0
ctl l2state get "$L2"
grep -qx 'state:     RUNNING' "$T/l2state.out" || fail "logs without --follow: waited for the run's end"
n=$(wc -l <"$T/l2now.out")
[ "$n" -eq 4 ] || fail "logs without --follow: $n lines, want the 4 stored ones (s1, s2)"
ctl l2approve approve "$L2" s3
expect_rc l2approve 0
ctl l2follow logs "$L2" -f
expect_rc l2follow 0
[ "$(wc -l <"$T/l2follow.out")" -eq 28 ] || fail "logs --follow: $(wc -l <"$T/l2follow.out") lines, want 28"
head -n "$n" "$T/l2follow.out" | diff -u - "$T/l2now.out" >&2 || fail "logs: the stored lines differ from --follow's"

# --- secret: the value from stdin, less one trailing newline, never printed. ---
printf 's3cret-value\n' >"$T/sec.in"
timeout 60 "$KPLCTL" secret set DB_PASS <"$T/sec.in" >"$T/sset.out" 2>"$T/sset.err"
rc=$?
expect_rc sset 0
grep -qx 'secret DB_PASS set' "$T/sset.out" || fail "secret set: printed $(cat "$T/sset.out")"
grep -q 's3cret' "$T/sset.out" "$T/sset.err" && fail "secret set: the value was printed"
grep -qx "secret set DB_PASS 's3cret-value'" "$T/watch.log" || fail "secret set: wrong value sent"
printf 'line1\nline2\r\n' | timeout 60 "$KPLCTL" secret set MULTI >"$T/smulti.out" 2>&1
grep -qx "secret set MULTI 'line1\\\\nline2'" "$T/watch.log" || fail "secret set: multi-line value not sent whole"
printf 'ab\n' | timeout 60 "$KPLCTL" secret set SHORT >"$T/sshort.out" 2>"$T/sshort.err"
rc=$?
expect_rc sshort 3
grep -q '^kplctl: secret: INVALID_ARGUMENT: ' "$T/sshort.err" || fail "secret set short: $(cat "$T/sshort.err")"
printf 'ab\000cdef' | timeout 60 "$KPLCTL" secret set NUL >"$T/snul.out" 2>"$T/snul.err"
rc=$?
expect_rc snul 2
grep -q 'NUL' "$T/snul.err" || fail "secret set with a NUL byte: $(cat "$T/snul.err")"
grep -q 'secret set NUL' "$T/watch.log" && fail "secret set: a value with a NUL byte was sent"
ctl slist secret list
expect_rc slist 0
printf 'DB_PASS\nMULTI\n' | diff -u - "$T/slist.out" >&2 || fail "secret list"
ctl slistj secret list -o json
"$PY" - "$T/slistj.out" <<'EOF' || fail "secret list -o json"
import json, sys
assert json.load(open(sys.argv[1])) == {"secrets": [{"name": "DB_PASS", "pipelines": []},
                                                   {"name": "MULTI", "pipelines": []}]}
EOF
ctl srm secret rm MULTI
expect_rc srm 0
grep -qx 'secret MULTI deleted' "$T/srm.out" || fail "secret rm: printed $(cat "$T/srm.out")"
ctl srm2 secret rm MULTI
expect_rc srm2 3
grep -q '^kplctl: secret: NOT_FOUND: ' "$T/srm2.err" || fail "secret rm twice: $(cat "$T/srm2.err")"
ctl sbad1 secret frob
expect_rc sbad1 2
ctl sbad2 secret rm
expect_rc sbad2 2
ctl sbad3 secret list X
expect_rc sbad3 2

# --- releases: a table of what changed a deployment; -o json; --limit. ---
ctl rel releases prod/shop/web
expect_rc rel 0
head -n 1 "$T/rel.out" | grep -Eq '^SEQ +KIND +REVISION +IMAGE +PREVIOUS +RUN +TIME$' ||
	fail "releases: header $(head -n 1 "$T/rel.out")"
sed -n 2p "$T/rel.out" | grep -Eq '^2 +rollback +5 +registry.example/web:1.0 +4 +run-r2 +[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8}$' ||
	fail "releases: row 1 $(sed -n 2p "$T/rel.out")"
sed -n 3p "$T/rel.out" | grep -Eq '^1 +deploy +- +- +3 +run-r1 +' || fail "releases: row 2 $(sed -n 3p "$T/rel.out")"
[ "$(wc -l <"$T/rel.out")" -eq 3 ] || fail "releases: want a header and 2 rows"
ctl rel1 releases prod/shop/web --limit 1 -o json
expect_rc rel1 0
grep -qx 'releases prod/shop/web 1' "$T/watch.log" || fail "releases --limit: not sent"
"$PY" - "$T/rel1.out" <<'EOF' || fail "releases -o json"
import json, sys
d = json.load(open(sys.argv[1]))
assert [(r["seq"], r["kind"], r["revision"], r["previous_image"]) for r in d["releases"]] == [
    (2, "rollback", "5", "registry.example/web:1.1")], d
EOF
ctl rel0 releases prod/shop/none
expect_rc rel0 0
[ "$(wc -l <"$T/rel0.out")" -eq 1 ] || fail "releases of an empty deployment: want the header alone"
ctl relbad releases web
expect_rc relbad 3
grep -q '^kplctl: releases: INVALID_ARGUMENT: ' "$T/relbad.err" || fail "releases web: $(cat "$T/relbad.err")"
ctl rellim releases prod/shop/web --limit 0
expect_rc rellim 2

# --- rollback: a run, followed with --watch. ---
ctl rb rollback prod/shop/web --to 4 --watch
expect_rc rb 0
grep -qx 'rollback prod/shop/web 4' "$T/watch.log" || fail "rollback: wrong request"
grep -Eq '^\[[0-9:]+\] rollback +SUCCEEDED$' "$T/rb.out" || fail "rollback --watch: no stage line"
ctl rbj rollback prod/shop/web -o json
expect_rc rbj 0
"$PY" - "$T/rbj.out" <<'EOF' || fail "rollback -o json"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["pipeline_name"] == "rollback-web", r
EOF
grep -qx 'rollback prod/shop/web -' "$T/watch.log" || fail "rollback without --to: wrong request"

# --- The live table on a terminal (tmux), with the canary's columns. ---
# The socket's path must stay short (sun_path): not under TEST_TMPDIR.
TMUX_TMPDIR=$(mktemp -d /tmp/kplctl-tmux.XXXXXX)
export TMUX_TMPDIR
tm() { tmux -f /dev/null -L kplctl-test "$@"; }
# tscreen NAME COLS ROWS CMD...: runs CMD in a fresh tmux window of that
# size; then waits (60 s at most: a guard, not a goal) for "EXIT=N" and puts the screen in
# $T/NAME.screen.
tscreen() {
	name=$1 cols=$2 rows=$3
	shift 3
	# If new-session fails, say why and try again.
	tries=0
	until tm new-session -d -s "$name" -x "$cols" -y "$rows" \
		"env LANG=C.UTF-8 TERM=xterm-256color KPL_SERVER=$KPL_SERVER $*; echo EXIT=\$?; sleep 600" \
		2>"$T/$name.tmux-err"; do
		tries=$((tries + 1))
		echo "tmux new-session $name failed: $(cat "$T/$name.tmux-err")" >&2
		[ $tries -ge 3 ] && break
	done
	# A deadline by the clock, not a count of polls: under load each tmux
	# call is slow, and the window (and tmux) must outlive the wait.
	deadline=$(($(date +%s) + 60))
	while :; do
		tm capture-pane -p -t "$name" >"$T/$name.screen"
		grep -q '^EXIT=' "$T/$name.screen" && break
		[ "$(date +%s)" -gt "$deadline" ] && { fail "$name: no EXIT= on the screen"; cat "$T/$name.screen" >&2; break; }
		sleep 0.1
	done
	tm kill-session -t "$name"
}
pipeline canary "# fake: canary web
# fake: weight api" build web api >"$T/canary.yaml"
before=$failures
tscreen live 72 20 "$KPLCTL" submit "$T/canary.yaml" --watch
grep -qx 'EXIT=0' "$T/live.screen" || fail "live: exit status"
grep -Eq '^STAGE +STATE +ATTEMPT +ELAPSED +WEIGHT +VERIFY +MESSAGE$' "$T/live.screen" ||
	fail "live: no header with WEIGHT and VERIFY"
grep -Eq '^build +SUCCEEDED +1 +[0-9.]+s +- +-$' "$T/live.screen" || fail "live: build row"
grep -Eq '^web +SUCCEEDED +1 +[0-9.]+s +75% +99\.2$' "$T/live.screen" || fail "live: web row"
grep -Eq '^api +SUCCEEDED +1 +[0-9.]+s +40% +-$' "$T/live.screen" || fail "live: api row"
grep -Eq '^run run-[0-9]+ SUCCEEDED: all stages succeeded$' "$T/live.screen" || fail "live: footer"
grep -q '^\[' "$T/live.screen" && fail "live: plain event lines on a terminal"
grep -q "$(printf '\342\240')" "$T/live.screen" && fail "live: a spinner frame is left"
[ -s "$T/live.screen" ] || fail "live: empty screen"
[ "$failures" -ne "$before" ] && sed 's/^/  screen: /' "$T/live.screen" >&2
tscreen plain 72 20 "$KPLCTL" submit "$T/canary.yaml" --watch --plain
grep -Eq '^\[[0-9:]+\] web +\* step 2/2: weight 50$' "$T/plain.screen" || fail "--plain: no event lines"
tscreen dumb 72 20 env TERM=dumb "$KPLCTL" submit "$T/canary.yaml" --watch
grep -Eq '^\[[0-9:]+\] == run SUCCEEDED' "$T/dumb.screen" || fail "TERM=dumb: no event lines"
tm kill-server 2>/dev/null

# --- Bash completion. ---
"$PY" - "$COMPLETION" "$KPLCTL" "$T" "$ID" <<'EOF' || fail "bash completion"
import os, subprocess, sys
comp, kplctl, tmp, run_id = sys.argv[1:]
comp, kplctl = os.path.abspath(comp), os.path.abspath(kplctl)
kdir = os.path.join(tmp, "kbin")
os.makedirs(kdir, exist_ok=True)
if not os.path.exists(os.path.join(kdir, "kplctl")):
    os.symlink(os.path.abspath(kplctl), os.path.join(kdir, "kplctl"))
open(os.path.join(tmp, "pipe-a.yaml"), "w").close()
def complete(line):
    """The completions bash offers for line (the cursor at its end)."""
    script = r'''
source "$1"
complete -p kplctl >/dev/null || exit 9
line=$2
read -ra COMP_WORDS <<<"$line"
[[ $line == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE=$line COMP_POINT=${#line}
_kplctl
printf '%s\n' "${COMPREPLY[@]}"
'''
    env = dict(os.environ, PATH=kdir + ":" + os.environ["PATH"])
    out = subprocess.run(["bash", "-c", script, "x", comp, line], cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, (line, out.returncode, out.stderr)
    return sorted(w for w in out.stdout.split("\n") if w)
def want(line, expected):
    got = complete(line)
    assert got == sorted(expected), (line, got, sorted(expected))
cmds = ("submit get list watch logs cancel retry approve lint events token audit secret releases "
        "rollback pipeline diff").split()
want("kplctl ", cmds)
want("kplctl lo", ["logs"])
want("kplctl re", ["releases", "retry"])
want("kplctl secret ", ["set", "list", "rm"])
want("kplctl token re", ["revoke"])
want("kplctl pipeline ", ["register", "list", "show", "delete", "run"])
want("kplctl pipeline run --sh", ["--sha"])
want("kplctl list --state f", ["failed"])
want("kplctl watch x -o ", ["json", "text"])
want("kplctl events --kind ", ["audit", "log", "run", "stage"])
want("kplctl submit pipe-", ["pipe-a.yaml"])
want("kplctl secret rm D", ["DB_PASS"])
got = complete("kplctl get ")
assert run_id in got, (run_id, got)
want("kplctl logs %s --stage " % run_id, ["build", "test"])
# The options offered per command are those kplctl --help lists for it.
help = subprocess.run([kplctl, "--help"], capture_output=True, text=True).stdout
opts, cmd = {}, None
for l in help.split("\n"):
    if l.startswith("  ") and not l.startswith("   ") and l.split()[0] in cmds:
        cmd = l.split()[0]
        opts[cmd] = set()
    elif cmd and l.strip().startswith("--"):
        opts[cmd].add(l.split()[0])
    elif not l.strip():
        cmd = None
assert set(opts) == set(cmds), opts
glob = {"--server", "--ca", "--cert", "--key", "--token", "--help"}
for c in cmds:
    got = {w for w in complete("kplctl %s --" % c)}
    assert got == opts[c] | glob, (c, got ^ (opts[c] | glob))
EOF

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
