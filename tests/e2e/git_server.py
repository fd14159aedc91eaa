"""A git smart-HTTP server for tests: Debian's git http-backend (CGI) behind
HTTP basic auth, on 127.0.0.1 and an ephemeral port, in a thread of the
test's process.

Every request is recorded (method, path, whether its credentials were
right), and while it is served every process's command line is scanned
for the password: a client that put it in an argument is caught while it
runs (GitServer.argv_hits).
"""

import base64
import http.server
import os
import subprocess
import threading

BACKEND = "/usr/lib/git-core/git-http-backend"


def cmdlines_holding(text):
    """(pid, cmdline) of every process whose command line holds text."""
    out = []
    needle = text.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in cmd:
            out.append((int(d), cmd.replace(b"\0", b" ").decode(errors="replace")))
    return out


class GitServer:
    def __init__(self, root, user, password):
        self.root = root
        self.user = user
        self.password = password
        self.requests = []
        self.argv_hits = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.handle(self)

            def do_POST(self):
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h):
        want = "Basic " + base64.b64encode(
            ("%s:%s" % (self.user, self.password)).encode()).decode()
        auth = h.headers.get("Authorization")
        ok = auth == want
        path, _, query = h.path.partition("?")
        hits = cmdlines_holding(self.password)
        with self.lock:
            self.requests.append((h.command, path, "ok" if ok else
                                  "none" if auth is None else "wrong"))
            self.argv_hits += hits
        body = b""
        n = int(h.headers.get("Content-Length") or 0)
        if n:
            body = h.rfile.read(n)
        elif h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(h.rfile.readline().strip(), 16)
                chunk = h.rfile.read(size)
                h.rfile.readline()
                if size == 0:
                    break
                body += chunk
        if not ok:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="git"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": h.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": h.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": self.user,
            "REMOTE_ADDR": "127.0.0.1",
        }
        if h.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = h.headers["Content-Encoding"]
        if h.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = h.headers["Git-Protocol"]
        r = subprocess.run([BACKEND], input=body, env=env, capture_output=True, timeout=60)
        head, _, out = r.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, out = r.stdout.partition(b"\n\n")
        status = 200
        headers = []
        for line in head.decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k:
                headers.append((k, v.strip()))
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)
