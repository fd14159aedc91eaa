#!/usr/bin/python3
"""Test server for tests/unit/http_test.c (base/http.c).

Makes a throwaway CA with the openssl command (a server certificate for
127.0.0.1/localhost and a client certificate, both signed by it) in --certdir,
then serves the same handler on three ports of 127.0.0.1:
  PORT       plain HTTP (also answers absolute-form requests, as a proxy)
  TLS_PORT   HTTPS
  MTLS_PORT  HTTPS that requires a client certificate signed by the CA
and prints one line "PORT=n TLS_PORT=n MTLS_PORT=n". It exits when its stdin
closes (the test process went away) or on SIGTERM.

Endpoints (query parameters in brackets):
  /hello                  200 "hello world", X-Test: yes, X-Dup: a, X-Dup: b
  /echo                   200, the request body back, X-Method, X-Content-Type
  /headers                200, the Authorization header received or "none"
  /auth [kind user pass token]  200 "ok" if Authorization matches, else 401
  /chunks                 chunked body whose chunks split lines
  /big [n chunked]        n bytes of "x" (Content-Length, or chunked)
  /longline [n]           chunked: one line of n bytes
  /stall                  never answers (until the client goes)
  /flaky [id fail code ra]  the first `fail` requests for id get `code`
                          (with Retry-After: ra if given), then 200;
                          X-Attempt says which request this was
  /reset [id fail]        the first `fail` requests for id get a TCP reset
  /stream [n per]         chunked: "line i\\n" n times (default 10000), `per`
                          lines a chunk, 10 ms apart; stops when the client
                          goes
  /redirect [to code]     `code` (302) with Location: to
"""
import argparse
import http.server
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

COUNTS = {}
COUNTS_LOCK = threading.Lock()


def bump(key):
    with COUNTS_LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + 1
        return COUNTS[key]


def make_certs(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kpl test ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (
            ("server", "127.0.0.1",
             "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "kpl test client", "extendedKeyUsage=clientAuth\n")):
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext)
        run("req", "-new", *ec, "-keyout", name + ".key", "-out", name + ".csr",
            "-subj", "/CN=" + cn)
        run("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", name + ".pem",
            "-extfile", name + ".ext")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.tls_failed = True
        super().setup()

    def handle(self):
        if self.tls_failed:
            self.close_connection = True
            return
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True

    # --- helpers ---
    def reply(self, code, body=b"", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def start_chunked(self, code=200):
        self.send_response(code)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Content-Type", "text/plain")
        self.end_headers()

    def chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # --- dispatch ---
    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def dispatch(self):
        body = self.read_body()
        if self.path.startswith("http://") or self.path.startswith("https://"):
            return self.reply(200, "proxied " + self.path)
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        name = "ep_" + u.path.strip("/").replace("-", "_")
        fn = getattr(self, name, None)
        if not fn:
            return self.reply(404, "no such endpoint " + u.path)
        fn(q, body)

    def ep_hello(self, q, body):
        self.reply(200, "hello world",
                   [("X-Test", "yes"), ("X-Dup", "a"), ("X-Dup", "b")])

    def ep_echo(self, q, body):
        self.reply(200, body, [("X-Method", self.command),
                               ("X-Content-Type", self.headers.get("Content-Type", "none"))])

    def ep_headers(self, q, body):
        self.reply(200, self.headers.get("Authorization", "none"))

    def ep_auth(self, q, body):
        import base64
        got = self.headers.get("Authorization", "")
        if q.get("kind") == "basic":
            cred = (q.get("user", "") + ":" + q.get("pass", "")).encode()
            want = "Basic " + base64.b64encode(cred).decode()
        else:
            want = "Bearer " + q.get("token", "")
        if got == want:
            self.reply(200, "ok")
        else:
            self.reply(401, "want %r got %r" % (want, got),
                       [("WWW-Authenticate", 'Basic realm="test"')])

    def ep_chunks(self, q, body):
        self.start_chunked()
        for piece in ("li", "ne1\nli", "ne2\n", "\n", "line4\r", "\nla", "st"):
            self.chunk(piece)
            time.sleep(0.005)  # so the pieces tend to arrive apart
        self.end_chunked()

    def ep_big(self, q, body):
        n = int(q.get("n", "1000"))
        if q.get("chunked"):
            self.start_chunked()
            left = n
            while left:
                k = min(left, 4096)
                self.chunk(b"x" * k)
                left -= k
            self.end_chunked()
        else:
            self.reply(200, b"x" * n)

    def ep_longline(self, q, body):
        self.start_chunked()
        self.chunk("short\n")
        self.chunk("y" * int(q.get("n", "100")) + "\n")
        self.end_chunked()

    def ep_stall(self, q, body):
        # Waits for the client to go (or 20 s); then the connection closes.
        self.request.settimeout(20)
        try:
            self.request.recv(1)
        except OSError:
            pass
        self.close_connection = True

    def ep_flaky(self, q, body):
        n = bump("flaky/" + q.get("id", ""))
        if n <= int(q.get("fail", "1")):
            h = [("X-Attempt", str(n))]
            if "ra" in q:
                h.append(("Retry-After", q["ra"]))
            return self.reply(int(q.get("code", "503")), "try again", h)
        self.reply(200, "ok after %d" % n, [("X-Attempt", str(n))])

    def ep_reset(self, q, body):
        n = bump("reset/" + q.get("id", ""))
        if n <= int(q.get("fail", "1")):
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.reply(200, "ok after %d" % n)

    def ep_stream(self, q, body):
        self.start_chunked()
        per = int(q.get("per", "1"))
        for i in range(0, int(q.get("n", "10000")), per):
            self.chunk("".join("line %d\n" % j for j in range(i, i + per)))
            time.sleep(0.01)
        self.end_chunked()

    def ep_redirect(self, q, body):
        self.reply(int(q.get("code", "302")), "moved", [("Location", q.get("to", "/hello"))])


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, ctx):
        self.ctx = ctx
        super().__init__(("127.0.0.1", 0), Handler)

    def get_request(self):
        conn, addr = self.socket.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx:
            # The handshake happens in the handler's thread (setup()).
            conn = self.ctx.wrap_socket(conn, server_side=True,
                                        do_handshake_on_connect=False)
        return conn, addr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--certdir", required=True)
    a = ap.parse_args()
    make_certs(a.certdir)
    c = lambda n: os.path.join(a.certdir, n)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(c("server.pem"), c("server.key"))
    mtls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    mtls.load_cert_chain(c("server.pem"), c("server.key"))
    mtls.verify_mode = ssl.CERT_REQUIRED
    mtls.load_verify_locations(c("ca.pem"))

    servers = [Server(None), Server(tls), Server(mtls)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("PORT=%d TLS_PORT=%d MTLS_PORT=%d" % tuple(s.server_address[1] for s in servers),
          flush=True)
    sys.stdin.read()  # returns when the test closes our stdin or exits


if __name__ == "__main__":
    main()
