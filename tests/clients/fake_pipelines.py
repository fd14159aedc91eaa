#!/usr/bin/python3
"""A fake kpl.v1.Pipelines server for testing kplctl without kpld.

Runs live in memory. A submitted run gets canned events, released over time
(one every --step seconds) so that watches see them arrive live:
run RUNNING; per stage: RUNNING, a stdout line, a stderr line, SUCCEEDED;
run SUCCEEDED. The pipeline text steers it (it is not really parsed):

  name: NAME                   the pipeline name (first "name:" line)
  - name: STAGE                a stage (every "- name:" line)
  # fake: fail                 the last stage fails, and the run with it
  # fake: invalid              SubmitRun fails with INVALID_ARGUMENT
  # fake: break-after N        the first WatchRun of the run ends with
                               UNAVAILABLE after N events
  # fake: resend               WatchRun ignores from_seq (sends from 1)
  # fake: approval STAGE       STAGE waits (WAITING) until ApproveStage
  # fake: break-events         the first WatchRuns stream to send an event
                               of this run ends with UNAVAILABLE right after
  # fake: canary STAGE         STAGE also writes SYSTEM lines, as the canary
                               and verify kinds do: "step 1/2: weight 25",
                               "request-success-rate = 99.2 (min 99) pass,
                               round 1/3", "step 2/2: weight 50", then
                               "step 3/3: 75% of traffic to the canary"
  # fake: weight STAGE         STAGE writes the SYSTEM line "weight 40"

RetryRun of a FAILED or CANCELLED run runs its unfinished stages again
(attempt + 1), and they succeed. WatchRuns numbers events globally in the
order they become visible. ValidatePipeline has canned diagnostics: an error
per "kind: K" with K not a known kind, an error when there is no top-level
"name:", a warning per "# fake: lint-warning" line.

Secrets live in memory too (SetSecret refuses values under 4 bytes, as
kpld does). ListReleases of "prod/shop/web" has two canned releases, of any
other deployment none. RollbackRelease starts a run of pipeline
"rollback-NAME" with one stage "rollback".

GetRun of "sleep-..." sleeps 2 s before NOT_FOUND (for deadlines); GetRun of
"whoami" returns a run whose message is the call's authorization metadata.
Appended to --log: "watch ID FROM_SEQ" per WatchRun, "watchruns FROM
PIPELINE KINDS" per WatchRuns, "approve ID STAGE yes|no BY|COMMENT" per
ApproveStage, "secret set NAME REPR(VALUE)" per SetSecret, "releases DEP
LIMIT" per ListReleases, "rollback DEP TO" per RollbackRelease.
Prints PORT=N once serving; stops on SIGTERM or after --lifetime seconds.
Stubs are generated from --proto with grpc_tools.protoc into a temp dir.
"""
import argparse
import difflib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures


def load_stubs(proto):
    out = tempfile.mkdtemp(prefix="kplfake")
    proto = os.path.realpath(proto)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc",
         "-I" + os.path.dirname(proto), "-I/usr/include",
         "--python_out=" + out, os.path.basename(proto)],
        check=True)
    sys.path.insert(0, out)
    import kpl_pb2  # noqa: E402
    return kpl_pb2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=120)
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--log", default=None)
    args = ap.parse_args()

    import grpc
    pb = load_stubs(args.proto)
    from google.protobuf import timestamp_pb2

    lock = threading.Condition()
    runs = {}      # id -> dict
    order = []     # ids, oldest first
    by_key = {}    # idempotency key -> id
    secrets = set()

    def log(line):
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    def ts(t):
        m = timestamp_pb2.Timestamp()
        m.FromNanoseconds(int(t * 1e9))
        return m

    KINDS = ["approval", "noop", "script", "shell", "http"]
    glog = []      # (run, event) in global_seq order
    TERMINAL = (pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED,
                pb.RUN_STATE_CANCELLED)

    def add(run, at, **kw):
        e = dict(at=at, seq=len(run["events"]) + 1, **kw)
        run["events"].append(e)
        return e

    def schedule(run, t, names):
        """Appends the events of stages names from time t on: each runs,
        logs two lines and ends; then the run ends. Stops at a stage waiting
        for approval. Returns the time of the last event."""
        step = args.step
        failed = False
        for i, name in enumerate(names):
            last = name == run["stage_names"][-1]
            t += step
            if name == run["approval"] and not run["answered"]:
                att = run["stage_attempt"][name] = \
                    run["stage_attempt"].get(name, 0) + 1
                add(run, t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                    stage_state=pb.STAGE_STATE_WAITING, attempt=att,
                    message="waiting for approval: release %s" % run["name"])
                return t
            att = run["stage_attempt"][name] = \
                run["stage_attempt"].get(name, 0) + 1
            add(run, t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                stage_state=pb.STAGE_STATE_RUNNING, attempt=att)
            if name == run.get("weight"):
                t += step
                add(run, t, kind=pb.EVENT_KIND_LOG, stage=name, attempt=att,
                    stream=pb.LOG_STREAM_SYSTEM, message="weight 40")
            if name == run.get("canary"):
                for line in ("step 1/2: weight 25",
                             "request-success-rate = 99.2 (min 99) pass, "
                             "round 1/3",
                             "step 2/2: weight 50",
                             "step 3/3: 75% of traffic to the canary"):
                    t += step
                    add(run, t, kind=pb.EVENT_KIND_LOG, stage=name,
                        attempt=att, stream=pb.LOG_STREAM_SYSTEM,
                        message=line)
            t += step
            add(run, t, kind=pb.EVENT_KIND_LOG, stage=name, attempt=att,
                stream=pb.LOG_STREAM_STDOUT, message="hello from " + name)
            t += step
            add(run, t, kind=pb.EVENT_KIND_LOG, stage=name, attempt=att,
                stream=pb.LOG_STREAM_STDERR, message="warning from " + name)
            t += step
            if last and run["fail"] and run["attempt"] == 1:
                failed = True
                add(run, t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                    stage_state=pb.STAGE_STATE_FAILED, attempt=att,
                    message="exit status 1")
            else:
                add(run, t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                    stage_state=pb.STAGE_STATE_SUCCEEDED, attempt=att)
        t += step
        if failed:
            add(run, t, kind=pb.EVENT_KIND_RUN_STATE,
                run_state=pb.RUN_STATE_FAILED,
                message="stage %s failed" % run["stage_names"][-1])
        else:
            add(run, t, kind=pb.EVENT_KIND_RUN_STATE,
                run_state=pb.RUN_STATE_SUCCEEDED,
                message="all stages succeeded")
        return t

    def make_events(run):
        t = run["created"] + args.step
        add(run, t, kind=pb.EVENT_KIND_RUN_STATE,
            run_state=pb.RUN_STATE_RUNNING)
        schedule(run, t, run["stage_names"])

    def visible(run, now):
        return [e for e in run["events"] if e["at"] <= now]

    def publish():
        """Gives every newly visible event its global_seq (lock held)."""
        now = time.time()
        new = [(e["at"], run["order"], e["seq"], run, e)
               for run in runs.values() for e in run["events"]
               if "g" not in e and e["at"] <= now]
        new.sort(key=lambda x: x[:3])
        for _, _, _, run, e in new:
            glog.append((run, e))
            e["g"] = len(glog)

    def event_msg(run, e):
        m = pb.RunEvent(run_id=run["id"], seq=e["seq"], time=ts(e["at"]),
                        stage=e.get("stage", ""), kind=e["kind"],
                        message=e.get("message", ""),
                        global_seq=e.get("g", 0), pipeline_name=run["name"])
        for f in ("run_state", "stage_state", "stream", "attempt"):
            if f in e:
                setattr(m, f, e[f])
        return m

    def snapshot(run):
        now = time.time()
        evs = visible(run, now)
        r = pb.Run(id=run["id"], pipeline_name=run["name"],
                   state=pb.RUN_STATE_QUEUED, created_at=ts(run["created"]),
                   idempotency_key=run["key"], attempt=run["attempt"],
                   last_seq=evs[-1]["seq"] if evs else 0)
        for k, v in run["params"].items():
            r.params[k] = v
        stages = {}
        for name in run["stage_names"]:
            s = r.stages.add(name=name, kind="shell",
                             state=pb.STAGE_STATE_PENDING)
            stages[name] = s
        for e in evs:
            if e["kind"] == pb.EVENT_KIND_RUN_STATE:
                r.state = e["run_state"]
                r.message = e.get("message", "")
                if e["run_state"] == pb.RUN_STATE_RUNNING:
                    r.started_at.CopyFrom(ts(e["at"]))
                    r.ClearField("finished_at")
                elif e["run_state"] != pb.RUN_STATE_QUEUED:
                    r.finished_at.CopyFrom(ts(e["at"]))
            elif e["kind"] == pb.EVENT_KIND_STAGE_STATE:
                s = stages[e["stage"]]
                s.state = e["stage_state"]
                s.attempt = e.get("attempt", 0)
                s.message = e.get("message", "")
                if e["stage_state"] in (pb.STAGE_STATE_RUNNING,
                                        pb.STAGE_STATE_WAITING):
                    s.started_at.CopyFrom(ts(e["at"]))
                    s.ClearField("finished_at")
                else:
                    s.finished_at.CopyFrom(ts(e["at"]))
                if e["stage_state"] == pb.STAGE_STATE_SUCCEEDED:
                    s.outputs["result"] = "ok-" + e["stage"]
        return r

    def done(run):
        """All events sent out and the last one ends the run."""
        evs = run["events"]
        return (visible(run, time.time()) == evs and
                evs[-1]["kind"] == pb.EVENT_KIND_RUN_STATE and
                evs[-1]["run_state"] in TERMINAL)

    def get_run(rid, ctx):
        run = runs.get(rid)
        if not run:
            ctx.abort(grpc.StatusCode.NOT_FOUND, 'run "%s" not found' % rid)
        return run

    class Pipelines:
        def SubmitRun(self, req, ctx):
            text = req.pipeline
            if "# fake: invalid" in text:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          'pipeline:3:5: stages[0].kind: unknown kind "shel"')
            with lock:
                if req.idempotency_key and req.idempotency_key in by_key:
                    return snapshot(runs[by_key[req.idempotency_key]])
                m = re.search(r"^name:\s*(\S+)", text, re.M)
                names = re.findall(r"^\s*-\s*name:\s*(\S+)", text, re.M)
                brk = re.search(r"# fake: break-after (\d+)", text)
                appr = re.search(r"# fake: approval (\S+)", text)
                can = re.search(r"# fake: canary (\S+)", text)
                wgt = re.search(r"# fake: weight (\S+)", text)
                rid = "run-%04d" % (len(order) + 1)
                run = dict(id=rid, name=m.group(1) if m else "unnamed",
                           order=len(order),
                           stage_names=names or ["build"],
                           fail="# fake: fail" in text,
                           resend="# fake: resend" in text,
                           break_after=int(brk.group(1)) if brk else None,
                           break_events="# fake: break-events" in text,
                           approval=appr.group(1) if appr else None,
                           canary=can.group(1) if can else None,
                           weight=wgt.group(1) if wgt else None,
                           answered=False, attempt=1, stage_attempt={},
                           events=[],
                           created=time.time(), key=req.idempotency_key,
                           params=dict(req.params))
                make_events(run)
                runs[rid] = run
                order.append(rid)
                if req.idempotency_key:
                    by_key[req.idempotency_key] = rid
                return snapshot(run)

        def SetSecret(self, req, ctx):
            log("secret set %s %r" % (req.name, req.value))
            if not re.match(r"^[A-Za-z0-9_]{1,64}$", req.name):
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "secret name: letters, digits and _")
            if len(req.value.encode()) < 4:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "secret %s: a value of 4 bytes to 64 KiB"
                          % req.name)
            with lock:
                secrets.add(req.name)
            return pb.Secret(name=req.name)

        def ListSecrets(self, req, ctx):
            with lock:
                return pb.ListSecretsResponse(
                    secrets=[pb.Secret(name=n) for n in sorted(secrets)])

        def DeleteSecret(self, req, ctx):
            with lock:
                if req.name not in secrets:
                    ctx.abort(grpc.StatusCode.NOT_FOUND,
                              'secret "%s" not found' % req.name)
                secrets.discard(req.name)
            return pb.Secret(name=req.name)

        def ListReleases(self, req, ctx):
            log("releases %s %d" % (req.deployment, req.limit))
            if req.deployment.count("/") != 2:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "deployment %s: want cluster/namespace/name"
                          % req.deployment)
            rels = []
            if req.deployment == "prod/shop/web":
                rels = [
                    pb.Release(deployment=req.deployment, seq=2,
                               run_id="run-r2", stage="rollback",
                               kind="rollback", revision="5",
                               image="registry.example/web:1.0",
                               previous_revision="4",
                               previous_image="registry.example/web:1.1",
                               time=ts(1700000100)),
                    pb.Release(deployment=req.deployment, seq=1,
                               run_id="run-r1", stage="deploy",
                               kind="deploy", revision="",
                               image="", previous_revision="3",
                               previous_image="registry.example/web:1.0",
                               time=ts(1700000000)),
                ]
            return pb.ListReleasesResponse(
                releases=rels[:req.limit or 50])

        def RollbackRelease(self, req, ctx):
            log("rollback %s %s" % (req.deployment, req.to_revision or "-"))
            parts = req.deployment.split("/")
            if len(parts) != 3 or not all(parts):
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "deployment %s: want cluster/namespace/name"
                          % req.deployment)
            text = "name: rollback-%s\nstages:\n  - name: rollback\n" % parts[2]
            return self.SubmitRun(pb.SubmitRunRequest(pipeline=text), ctx)

        def GetRun(self, req, ctx):
            if req.id.startswith("sleep-"):
                time.sleep(2)
            if req.id == "whoami":
                md = dict(ctx.invocation_metadata())
                return pb.Run(id="whoami",
                              message=md.get("authorization", ""))
            with lock:
                run = runs.get(req.id)
                if not run:
                    ctx.abort(grpc.StatusCode.NOT_FOUND,
                              'run "%s" not found' % req.id)
                return snapshot(run)

        def ListRuns(self, req, ctx):
            with lock:
                out = []
                for rid in reversed(order):
                    r = snapshot(runs[rid])
                    if req.pipeline_name and r.pipeline_name != req.pipeline_name:
                        continue
                    if req.state and r.state != req.state:
                        continue
                    out.append(r)
            start = int(req.page_token or 0)
            size = req.page_size or 50
            page = out[start:start + size]
            nxt = str(start + size) if start + size < len(out) else ""
            return pb.ListRunsResponse(runs=page, next_page_token=nxt)

        def CancelRun(self, req, ctx):
            with lock:
                run = get_run(req.id, ctx)
                if not done(run):
                    now = time.time()
                    run["events"] = visible(run, now)
                    add(run, now, kind=pb.EVENT_KIND_RUN_STATE,
                        run_state=pb.RUN_STATE_CANCELLED,
                        message="cancelled by request")
                return snapshot(run)

        def WatchRun(self, req, ctx):
            log("watch %s %d" % (req.id, req.from_seq))
            with lock:
                run = get_run(req.id, ctx)
                brk = run["break_after"]
                run["break_after"] = None
            nxt = 1 if run["resend"] else max(req.from_seq, 1)
            sent = 0
            while ctx.is_active():
                with lock:
                    publish()
                    ready = [e for e in visible(run, time.time())
                             if e["seq"] >= nxt]
                    over = done(run)
                for e in ready:
                    if brk is not None and sent >= brk:
                        ctx.abort(grpc.StatusCode.UNAVAILABLE,
                                  "fake: stream broken")
                    yield event_msg(run, e)
                    sent += 1
                    nxt = e["seq"] + 1
                if over and nxt > run["events"][-1]["seq"]:
                    return
                time.sleep(args.step / 2)

        def ValidatePipeline(self, req, ctx):
            diags = []
            lines = req.pipeline.split("\n")
            name = ""
            stage = -1
            for n, line in enumerate(lines, 1):
                m = re.match(r"name:\s*(\S+)", line)
                if m and not name:
                    name = m.group(1)
                if re.match(r"\s*-\s*name:", line):
                    stage += 1
                m = re.search(r"\bkind:\s*(\S+)", line)
                if m and m.group(1) not in KINDS:
                    msg = 'unknown kind "%s"' % m.group(1)
                    near = difflib.get_close_matches(m.group(1), KINDS, 1)
                    if near:
                        msg += ' (did you mean "%s"?)' % near[0]
                    diags.append(pb.Diagnostic(
                        line=n, column=m.start(1) + 1,
                        path="stages[%d].kind" % max(stage, 0), message=msg,
                        severity=pb.SEVERITY_ERROR))
                if "# fake: lint-warning" in line:
                    diags.append(pb.Diagnostic(
                        line=n, column=line.index("#") + 1, path="",
                        message="a canned warning",
                        severity=pb.SEVERITY_WARNING))
            if not name:
                diags.insert(0, pb.Diagnostic(
                    line=1, column=1, path="",
                    message='missing required key "name"',
                    severity=pb.SEVERITY_ERROR))
            return pb.ValidatePipelineResponse(
                valid=not any(d.severity == pb.SEVERITY_ERROR
                              for d in diags),
                diagnostics=diags, pipeline_name=name)

        def ApproveStage(self, req, ctx):
            log("approve %s %s %s %s|%s" % (req.run_id, req.stage,
                                            "yes" if req.approve else "no",
                                            req.by, req.comment))
            with lock:
                run = get_run(req.run_id, ctx)
                if req.stage not in run["stage_names"]:
                    ctx.abort(grpc.StatusCode.NOT_FOUND,
                              'run %s has no stage "%s"' % (run["id"],
                                                            req.stage))
                now = time.time()
                st = {s.name: s.state for s in snapshot(run).stages}
                if st[req.stage] != pb.STAGE_STATE_WAITING:
                    ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              'stage "%s" is not waiting for approval'
                              % req.stage)
                run["answered"] = True
                how = "approved" if req.approve else "rejected"
                msg = "%s by %s" % (how, req.by)
                if req.comment:
                    msg += ": " + req.comment
                att = run["stage_attempt"].get(req.stage, 1)
                run["stage_attempt"][req.stage] = att
                add(run, now, kind=pb.EVENT_KIND_STAGE_STATE,
                    stage=req.stage, attempt=att, message=msg,
                    stage_state=(pb.STAGE_STATE_SUCCEEDED if req.approve
                                 else pb.STAGE_STATE_FAILED))
                if req.approve:
                    names = run["stage_names"]
                    schedule(run, now, names[names.index(req.stage) + 1:])
                else:
                    add(run, now, kind=pb.EVENT_KIND_RUN_STATE,
                        run_state=pb.RUN_STATE_FAILED,
                        message="stage %s was rejected" % req.stage)
                return snapshot(run)

        def RetryRun(self, req, ctx):
            with lock:
                run = get_run(req.id, ctx)
                r = snapshot(run)
                if not done(run) or r.state == pb.RUN_STATE_SUCCEEDED:
                    ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "run %s is %s, not FAILED or CANCELLED"
                              % (run["id"], pb.RunState.Name(r.state)))
                run["attempt"] += 1
                run["answered"] = False
                now = time.time()
                add(run, now, kind=pb.EVENT_KIND_RUN_STATE,
                    run_state=pb.RUN_STATE_RUNNING,
                    message="attempt %d" % run["attempt"])
                schedule(run, now, [s.name for s in r.stages
                                    if s.state != pb.STAGE_STATE_SUCCEEDED])
                return snapshot(run)

        def WatchRuns(self, req, ctx):
            log("watchruns %d %s %s" % (
                req.from_global_seq, req.pipeline_name or "-",
                ",".join(pb.EventKind.Name(k) for k in req.kinds) or "-"))
            with lock:
                publish()
                nxt = req.from_global_seq or len(glog) + 1
            while ctx.is_active():
                with lock:
                    publish()
                    ready = glog[nxt - 1:]
                for run, e in ready:
                    nxt = e["g"] + 1
                    if (req.pipeline_name and
                            run["name"] != req.pipeline_name):
                        continue
                    if req.kinds and e["kind"] not in req.kinds:
                        continue
                    yield event_msg(run, e)
                    if run["break_events"]:
                        run["break_events"] = False
                        ctx.abort(grpc.StatusCode.UNAVAILABLE,
                                  "fake: stream broken")
                time.sleep(args.step / 2)

    svc = Pipelines()

    def unary(fn, req_t, resp_t):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req_t.FromString,
            response_serializer=resp_t.SerializeToString)

    handler = grpc.method_handlers_generic_handler("kpl.v1.Pipelines", {
        "SubmitRun": unary(svc.SubmitRun, pb.SubmitRunRequest, pb.Run),
        "GetRun": unary(svc.GetRun, pb.GetRunRequest, pb.Run),
        "ListRuns": unary(svc.ListRuns, pb.ListRunsRequest,
                          pb.ListRunsResponse),
        "CancelRun": unary(svc.CancelRun, pb.CancelRunRequest, pb.Run),
        "WatchRun": grpc.unary_stream_rpc_method_handler(
            svc.WatchRun, request_deserializer=pb.WatchRunRequest.FromString,
            response_serializer=pb.RunEvent.SerializeToString),
        "ValidatePipeline": unary(svc.ValidatePipeline,
                                  pb.ValidatePipelineRequest,
                                  pb.ValidatePipelineResponse),
        "ApproveStage": unary(svc.ApproveStage, pb.ApproveStageRequest,
                              pb.Run),
        "RetryRun": unary(svc.RetryRun, pb.RetryRunRequest, pb.Run),
        "SetSecret": unary(svc.SetSecret, pb.SetSecretRequest, pb.Secret),
        "ListSecrets": unary(svc.ListSecrets, pb.ListSecretsRequest,
                             pb.ListSecretsResponse),
        "DeleteSecret": unary(svc.DeleteSecret, pb.DeleteSecretRequest,
                              pb.Secret),
        "ListReleases": unary(svc.ListReleases, pb.ListReleasesRequest,
                              pb.ListReleasesResponse),
        "RollbackRelease": unary(svc.RollbackRelease,
                                 pb.RollbackReleaseRequest, pb.Run),
        "WatchRuns": grpc.unary_stream_rpc_method_handler(
            svc.WatchRuns, request_deserializer=pb.WatchRunsRequest.FromString,
            response_serializer=pb.RunEvent.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    print("PORT=%d" % port, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait(args.lifetime)
    server.stop(0.5).wait()


if __name__ == "__main__":
    main()
