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

GetRun of "sleep-..." sleeps 2 s before NOT_FOUND (for deadlines); GetRun of
"whoami" returns a run whose message is the call's authorization metadata.
Every WatchRun request is appended to --log as "watch ID FROM_SEQ".
Prints PORT=N once serving; stops on SIGTERM or after --lifetime seconds.
Stubs are generated from --proto with grpc_tools.protoc into a temp dir.
"""
import argparse
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

    def log(line):
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    def ts(t):
        m = timestamp_pb2.Timestamp()
        m.FromNanoseconds(int(t * 1e9))
        return m

    def make_events(run):
        evs = []

        def ev(at, **kw):
            evs.append(dict(at=at, **kw))

        t = run["created"]
        step = args.step
        t += step
        ev(t, kind=pb.EVENT_KIND_RUN_STATE, run_state=pb.RUN_STATE_RUNNING)
        failed = False
        for i, name in enumerate(run["stage_names"]):
            last = i == len(run["stage_names"]) - 1
            t += step
            ev(t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
               stage_state=pb.STAGE_STATE_RUNNING, attempt=1)
            t += step
            ev(t, kind=pb.EVENT_KIND_LOG, stage=name,
               stream=pb.LOG_STREAM_STDOUT, message="hello from " + name)
            t += step
            ev(t, kind=pb.EVENT_KIND_LOG, stage=name,
               stream=pb.LOG_STREAM_STDERR, message="warning from " + name)
            t += step
            if last and run["fail"]:
                failed = True
                ev(t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                   stage_state=pb.STAGE_STATE_FAILED, attempt=1,
                   message="exit status 1")
            else:
                ev(t, kind=pb.EVENT_KIND_STAGE_STATE, stage=name,
                   stage_state=pb.STAGE_STATE_SUCCEEDED, attempt=1)
        t += step
        if failed:
            ev(t, kind=pb.EVENT_KIND_RUN_STATE, run_state=pb.RUN_STATE_FAILED,
               message="stage %s failed" % run["stage_names"][-1])
        else:
            ev(t, kind=pb.EVENT_KIND_RUN_STATE,
               run_state=pb.RUN_STATE_SUCCEEDED, message="all stages succeeded")
        for seq, e in enumerate(evs, 1):
            e["seq"] = seq
        return evs

    def visible(run, now):
        return [e for e in run["events"] if e["at"] <= now]

    def event_msg(run, e):
        m = pb.RunEvent(run_id=run["id"], seq=e["seq"], time=ts(e["at"]),
                        stage=e.get("stage", ""), kind=e["kind"],
                        message=e.get("message", ""))
        for f in ("run_state", "stage_state", "stream", "attempt"):
            if f in e:
                setattr(m, f, e[f])
        return m

    def snapshot(run):
        now = time.time()
        evs = visible(run, now)
        r = pb.Run(id=run["id"], pipeline_name=run["name"],
                   state=pb.RUN_STATE_QUEUED, created_at=ts(run["created"]),
                   idempotency_key=run["key"],
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
                elif e["run_state"] != pb.RUN_STATE_QUEUED:
                    r.finished_at.CopyFrom(ts(e["at"]))
            elif e["kind"] == pb.EVENT_KIND_STAGE_STATE:
                s = stages[e["stage"]]
                s.state = e["stage_state"]
                s.attempt = e.get("attempt", 0)
                s.message = e.get("message", "")
                if e["stage_state"] == pb.STAGE_STATE_RUNNING:
                    s.started_at.CopyFrom(ts(e["at"]))
                else:
                    s.finished_at.CopyFrom(ts(e["at"]))
                if e["stage_state"] == pb.STAGE_STATE_SUCCEEDED:
                    s.outputs["result"] = "ok-" + e["stage"]
        return r

    def terminal(run):
        evs = run["events"]
        return visible(run, time.time()) == evs

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
                rid = "run-%04d" % (len(order) + 1)
                run = dict(id=rid, name=m.group(1) if m else "unnamed",
                           stage_names=names or ["build"],
                           fail="# fake: fail" in text,
                           resend="# fake: resend" in text,
                           break_after=int(brk.group(1)) if brk else None,
                           created=time.time(), key=req.idempotency_key,
                           params=dict(req.params))
                run["events"] = make_events(run)
                runs[rid] = run
                order.append(rid)
                if req.idempotency_key:
                    by_key[req.idempotency_key] = rid
                return snapshot(run)

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
                run = runs.get(req.id)
                if not run:
                    ctx.abort(grpc.StatusCode.NOT_FOUND,
                              'run "%s" not found' % req.id)
                if not terminal(run):
                    now = time.time()
                    evs = visible(run, now)
                    evs.append(dict(at=now, kind=pb.EVENT_KIND_RUN_STATE,
                                    run_state=pb.RUN_STATE_CANCELLED,
                                    message="cancelled by request"))
                    for seq, e in enumerate(evs, 1):
                        e["seq"] = seq
                    run["events"] = evs
                return snapshot(run)

        def WatchRun(self, req, ctx):
            log("watch %s %d" % (req.id, req.from_seq))
            with lock:
                run = runs.get(req.id)
                if not run:
                    ctx.abort(grpc.StatusCode.NOT_FOUND,
                              'run "%s" not found' % req.id)
                brk = run["break_after"]
                run["break_after"] = None
            nxt = 1 if run["resend"] else max(req.from_seq, 1)
            sent = 0
            while ctx.is_active():
                with lock:
                    evs = run["events"]
                    ready = [e for e in visible(run, time.time())
                             if e["seq"] >= nxt]
                for e in ready:
                    if brk is not None and sent >= brk:
                        ctx.abort(grpc.StatusCode.UNAVAILABLE,
                                  "fake: stream broken")
                    yield event_msg(run, e)
                    sent += 1
                    nxt = e["seq"] + 1
                if evs and nxt > evs[-1]["seq"]:
                    return
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
