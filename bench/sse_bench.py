#!/usr/bin/python3
"""sse_bench.py - many Server-Sent-Events followers of one run over the HTTP
API (GET /v1/runs/{id}/events, docs/http.md): the delay from each log
line's time (kpld stamps it when it makes the event) to its arrival at each
of N followers, like watch_bench does for gRPC WatchRun streams.

    sse_bench.py --ready-file PATH [--followers N] [--lines L]
                 [--interval-ms I] [--kpld-pid PID]

kpld must serve --http-listen (the ready file's http= line), with
--http-max-per-address, --max-streams and --max-streams-per-conn above N
(the HTTP API counts one client address as one connection). One asyncio loop
holds every connection. Prints "sse_delay_ms=p99 (...)" and the client's
own CPU; exit 0 if every follower saw every line and the run's end.
"""

import argparse
import asyncio
import calendar
import json
import os
import resource
import sys
import time
import urllib.request


def ts_ms(s):
    """An RFC 3339 UTC time ("2026-12-05T01:02:03.456789Z") in ms."""
    s = s.rstrip("Z")
    whole, _, frac = s.partition(".")
    t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return t * 1000 + int((frac + "000")[:3])


def call(http, method, path, body=None):
    req = urllib.request.Request("http://%s%s" % (http, path), method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}")


def cpu_s(pid=None):
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Follower:
    def __init__(self):
        self.lines = 0
        self.ended = False
        self.first = asyncio.Event()


async def follow(host, port, run_id, f, delays):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(("GET /v1/runs/%s/events HTTP/1.1\r\nHost: kpl\r\n"
                  "Accept: text/event-stream\r\n\r\n" % run_id).encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        n = int(next((ln.split(b":", 1)[1] for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:")), b"0"))
        body = await reader.readexactly(n) if n else b""
        raise RuntimeError("SSE: %s %s" % (head.split(b"\r\n", 1)[0].decode(), body.decode()))
    while True:
        block = await reader.readuntil(b"\n\n")
        event = data = None
        for ln in block.decode().split("\n"):
            if ln.startswith("event:"):
                event = ln[6:].strip()
            elif ln.startswith("data:"):
                data = ln[5:].strip()
        if event == "end":
            break
        if data is None:
            continue
        f.first.set()
        ev = json.loads(data)
        if ev.get("kind") == "EVENT_KIND_LOG" and ev.get("stream") == "LOG_STREAM_STDOUT":
            delays.append(int(time.time() * 1000) - ts_ms(ev["time"]))
            f.lines += 1
        if ev.get("kind") == "EVENT_KIND_RUN_STATE" and ev.get("runState") in (
                "RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED"):
            f.ended = True
    f.first.set()
    writer.close()


async def main_async(a):
    lines = open(a.ready_file).read().splitlines()
    http = next(ln[5:] for ln in lines[1:] if ln.startswith("http="))
    host, port = http.rsplit(":", 1)
    pipeline = ("name: watchers\nstages:\n"
                "  - {name: go, kind: approval, timeout: 1h, with: {message: start}}\n"
                "  - name: talk\n    kind: script\n    needs: [go]\n"
                "    with: {shell: 'for i in $(seq %d); do echo line $i; sleep %d.%03d; done'}\n"
                % (a.lines, a.interval_ms // 1000, a.interval_ms % 1000))
    run = call(http, "POST", "/v1/runs", {"pipeline": pipeline})
    run_id = run.get("id") or run["run"]["id"]
    delays, fs = [], [Follower() for _ in range(a.followers)]
    tasks = [asyncio.create_task(follow(host, int(port), run_id, f, delays)) for f in fs]
    await asyncio.wait_for(asyncio.gather(*(f.first.wait() for f in fs)), 300)
    me0, kp0, t0 = cpu_s(), cpu_s(a.kpld_pid) if a.kpld_pid else None, time.monotonic()
    call(http, "POST", "/v1/runs/%s/stages/go:approve" % run_id, {"approve": True})
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                     60 + a.lines * a.interval_ms / 1000 * 4)
    me1, t1 = cpu_s(), time.monotonic()
    kp1 = cpu_s(a.kpld_pid) if a.kpld_pid else None
    failed = sum(1 for r in results if isinstance(r, Exception))
    short = sum(1 for f in fs if f.lines != a.lines or not f.ended)
    delays.sort()

    def pct(p):
        return delays[min(len(delays) - 1, int(len(delays) * p))] if delays else -1
    print("sse_delay_ms=%d (p99 of %d deliveries: %d SSE followers x %d log lines %d ms "
          "apart; p50 %d ms, p99.9 %d ms, max %d ms; followers failed %d, missing lines or "
          "the end %d; goal p99 < 20 ms)" % (pct(0.99), len(delays), a.followers, a.lines,
                                             a.interval_ms, pct(0.5), pct(0.999),
                                             delays[-1] if delays else -1, failed, short))
    if kp1 is not None:
        print("sse_kpld_cpu_s=%.2f (from the approval to the last follower's end, %.2f s "
              "wall)" % (kp1 - kp0, t1 - t0))
    print("sse_client_cpu_s=%.2f (this bench, one Python thread, in the same time)"
          % (me1 - me0))
    return 1 if failed or short else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ready-file", required=True)
    p.add_argument("--followers", type=int, default=1000)
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--interval-ms", type=int, default=50)
    p.add_argument("--kpld-pid", type=int)
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
