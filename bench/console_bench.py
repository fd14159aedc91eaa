"""The console's first useful paint and a 200-stage run's graph, measured
in Debian's headless chromium with the Performance API (not a test: the
figures go to bench/README.md).

    /usr/bin/python3 bench/console_bench.py BAZEL_BIN [ROUNDS]

kpld on loopback with --http-listen and a bootstrap token; 300 runs
submitted (so the list has a full page); then ROUNDS (10) times each:
- first useful paint: a fresh load of #/runs, signed in (token in the
  tab's sessionStorage), from navigation start to the mark kpl:runs-listed
  (the first page of runs in the table; runs.js), beside Chromium's
  first-contentful-paint;
- a 200-stage run (noop stages in 20 layers of 10, each needing two of the
  layer before): a fresh load of #/runs/RUN, the measure kpl:graph (the
  layout and the SVG built and in the page; run.js) and kpl:graph-painted
  (to the task after the next frame: style, layout and paint done), and
  navigation start to kpl:graph-painted;
- a 100,000-line log: navigation start to the count saying 100000 lines
  (the whole replay through SSE, parsed, held), the rows in the page then,
  and a scroll to the middle until its rows are drawn.
Prints one JSON object with median, min and max of each.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "lib"))
import browser  # noqa: E402
from kplgrpc import Client  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

P = "kpl.v1.Pipelines/"


def wide_pipeline(layers=20, width=10):
    out = ["name: wide", "stages:"]
    for l in range(layers):
        for i in range(width):
            needs = []
            if l:
                needs = ["s%d_%d" % (l - 1, i), "s%d_%d" % (l - 1, (i + 1) % width)]
            out.append("  - { name: s%d_%d, kind: noop%s }"
                       % (l, i, ", needs: [%s]" % ", ".join(needs) if needs else ""))
    return "\n".join(out) + "\n"


def stats(xs):
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1),
            "max": round(max(xs), 1), "n": len(xs)}


def main():
    bazel_bin = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    tmp = tempfile.mkdtemp(prefix="kpl-console-bench-")
    ready, token_file = os.path.join(tmp, "ready"), os.path.join(tmp, "admin.token")
    kpld = subprocess.Popen([os.path.join(bazel_bin, "engine", "kpld"), "--listen", "127.0.0.1:0",
                             "--data-dir", os.path.join(tmp, "data"), "--http-listen",
                             "127.0.0.1:0", "--bootstrap-token-file", token_file,
                             "--ready-file", ready, "--log-level", "warn"],
                            stderr=open(os.path.join(tmp, "kpld.log"), "w"))
    drv = None
    try:
        while not os.path.exists(ready):
            if kpld.poll() is not None:
                raise SystemExit("kpld exited")
            time.sleep(0.05)
        lines = open(ready).read().splitlines()
        base = "http://" + [ln[5:] for ln in lines if ln.startswith("http=")][0]
        token = open(token_file).read().strip()
        c = Client.connect(lines[0], token=token)
        hello = "name: hello\nstages:\n  - { name: a, kind: noop }\n"
        for _ in range(300):
            c.call(P + "SubmitRun", {"pipeline": hello, "params": {}, "idempotency_key": ""})
        wide = Client.to_dict(c.call(P + "SubmitRun", {"pipeline": wide_pipeline(),
                                                       "params": {}, "idempotency_key": ""}))["id"]
        many = Client.to_dict(c.call(P + "SubmitRun", {"pipeline": (
            "name: many\nstages:\n  - name: lines\n    kind: script\n"
            "    with: { shell: \"seq 1 100000 | sed 's/^/line /'\" }\n"),
            "params": {}, "idempotency_key": ""}))["id"]
        for run_id in (wide, many):
            for _ in c.stream(P + "WatchRun", {"id": run_id}, timeout=600):
                pass
        drv = browser.start(tmp)
        drv.get(base + "/")
        drv.execute_script("sessionStorage.setItem('kpl.token', arguments[0])", token)
        wait = WebDriverWait(drv, 120)
        paint, fcp, graph, painted, graph_nav, log_all, log_rows, scroll = ([] for _ in range(8))
        for _ in range(rounds):
            drv.get("about:blank")
            drv.get(base + "/#/runs")
            wait.until(lambda d: d.execute_script(
                "return performance.getEntriesByName('kpl:runs-listed').length"))
            paint.append(drv.execute_script(
                "return performance.getEntriesByName('kpl:runs-listed')[0].startTime"))
            fcp.append(drv.execute_script(
                "const p = performance.getEntriesByName('first-contentful-paint');"
                "return p.length ? p[0].startTime : 0"))
            drv.get("about:blank")
            drv.get(base + "/#/runs/" + wide)
            wait.until(lambda d: d.execute_script(
                "return performance.getEntriesByName('kpl:graph-painted').length"))
            n = drv.execute_script("return document.querySelectorAll('#dag .node').length")
            assert n == 200, n
            graph.append(drv.execute_script(
                "return performance.getEntriesByName('kpl:graph')[0].duration"))
            m = drv.execute_script("const m = performance.getEntriesByName('kpl:graph-painted')[0];"
                                   "return [m.duration, m.startTime + m.duration]")
            painted.append(m[0])
            graph_nav.append(m[1])
            drv.get("about:blank")
            drv.get(base + "/#/runs/%s/lines" % many)
            wait.until(lambda d: d.execute_script(
                "const e = document.getElementById('log-count');"
                "return e && e.textContent === '100000 lines'"))
            log_all.append(drv.execute_script("return performance.now()"))
            log_rows.append(drv.execute_script(
                "return document.querySelectorAll('#log .line').length"))
            scroll.append(drv.execute_script("""
                const box = document.getElementById('log');
                const t0 = performance.now();
                box.scrollTop = box.scrollHeight / 2;
                box.dispatchEvent(new Event('scroll'));
                return new Promise((res) => requestAnimationFrame(() => setTimeout(() => {
                  const n = [...document.querySelectorAll('#log .line')].map((l) => +l.dataset.n);
                  res(n.includes(50000) ? performance.now() - t0 : -1);
                })));
            """))
        c.close()
        print(json.dumps({
            "first_useful_paint_ms": stats(paint), "first_contentful_paint_ms": stats(fcp),
            "graph_200_build_ms": stats(graph), "graph_200_to_painted_ms": stats(painted),
            "graph_200_navigation_to_painted_ms": stats(graph_nav),
            "log_100000_navigation_to_all_ms": stats(log_all), "log_rows_in_page": max(log_rows),
            "log_scroll_to_middle_drawn_ms": stats(scroll),
            "load": os.getloadavg()[0]}, indent=1))
    finally:
        if drv:
            drv.quit()
        kpld.terminate()
        kpld.wait()


if __name__ == "__main__":
    main()
