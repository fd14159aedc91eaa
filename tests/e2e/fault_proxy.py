"""A fault-injecting HTTP proxy for kpl's tests: put it in front of any
server kpld talks to (the Jenkins and Kubernetes emulators, Debian's
docker-registry, the real Prometheus) and it forwards every request, except
those a fault rule matches, and counts every request it sees.

Python 3 standard library only; test infrastructure, never part of kpld.

    proxy = FaultProxy("http://127.0.0.1:5000")     # in-process
    proxy.url                                       # http://127.0.0.1:PORT
    proxy.add(method="PATCH", path="/v2/", contains="/blobs/uploads/", cut=0.5)
    proxy.count("PUT", "/v2/app/manifests/1.0")      # requests seen

or as a process: `python3 fault_proxy.py UPSTREAM_URL [--port-file F]
[--lifetime S]`, driven over HTTP: `POST /_faults` (a rule as JSON),
`DELETE /_faults` (clear), `GET /_faults/stats` ({"requests": [...]}).

One request per client connection: the proxy sends the request upstream with
`Connection: close` and gives the reply back with `Connection: close`, so it
sees every request (a client on keep-alive simply reconnects). Streaming
replies (a Kubernetes watch) are piped through as they come.

A rule matches a request by method ("" = any), path prefix (the path
without the query) and an optional substring of the whole target
("contains"); `count` uses (default 1, -1 = until cleared). Its action:

    status: N        answer N without asking upstream; `retry_after` adds a
                     Retry-After header, `body` (text) the body (default: a
                     JSON Status/error naming the fault), `ctype` its type
    reset: true      close the connection with a TCP RST, nothing answered
    delay: S         wait S seconds, then go on (forward, or the other action)
    garbage: true    answer 200 with a body that is not JSON
    truncate: F      forward, then send the reply's head and the first
                     fraction F of its body, and RST (the client sees a
                     reply cut short)
    cut: F           forward the request head and the first fraction F of its
                     body upstream, then RST both sides (an upload
                     interrupted midway; upstream sees a client vanish)
    hold: S          forward, take upstream's whole reply, and give it to the
                     client only S seconds later (the work is done; the client
                     has not heard of it yet)
    after: true      (with status/reset/garbage) forward the request upstream
                     first, and only then answer with the fault: the
                     ambiguous case where the server did the work
Every request is recorded as {method, path, target, fault, status, body}
(fault is the action's name, or ""; status the upstream's HTTP status, 0 if
none; body, with record_bodies, the text of a POST/PUT/PATCH/DELETE body).
"""

import json
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

GARBAGE = b'{"kind": "Status", <html>upstream said something that is not JSON\n'


def _rst(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _read_head(f):
    """Reads an HTTP head (request or status line and headers) from the
    buffered reader f: (first line, [(name, value)]) or None at EOF."""
    line = f.readline(65537)
    if not line:
        return None
    first = line.decode("latin-1").rstrip("\r\n")
    headers = []
    while True:
        h = f.readline(65537)
        if not h or h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return first, headers


def _get(headers, name):
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


def _read_body(f, headers):
    """The request body as raw bytes (chunked bodies are de-chunked)."""
    if (_get(headers, "Transfer-Encoding") or "").lower() == "chunked":
        out = b""
        while True:
            size = int(f.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += f.read(size)
            f.readline()
    n = int(_get(headers, "Content-Length") or 0)
    return f.read(n) if n else b""


def _head_bytes(first, headers):
    return (first + "\r\n" + "".join("%s: %s\r\n" % kv for kv in headers) + "\r\n").encode("latin-1")


class FaultProxy:
    def __init__(self, upstream, record_bodies=False):
        u = urllib.parse.urlsplit(upstream)
        self.record_bodies = record_bodies
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.lock = threading.Lock()
        self.rules = []
        self.requests = []   # {method, path, target, fault, t}
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                proxy._handle(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- rules and counts ------------------------------------------------

    def add(self, method="", path="/", contains=None, count=1, **action):
        rule = {"method": method.upper(), "path": path, "contains": contains,
                "count": int(count)}
        rule.update(action)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self):
        with self.lock:
            self.rules = []

    def forget(self):
        """Drops the requests recorded so far (counts start again at 0)."""
        with self.lock:
            self.requests = []

    def active(self):
        with self.lock:
            return [dict(r) for r in self.rules]

    def seen(self, method=None, path=None, contains=None, fault=None):
        """Requests recorded so far that match (None = any)."""
        with self.lock:
            reqs = list(self.requests)
        return [r for r in reqs
                if (method is None or r["method"] == method)
                and (path is None or r["path"] == path)
                and (contains is None or contains in r["target"])
                and (fault is None or r["fault"] == fault)]

    def count(self, method=None, path=None, contains=None, fault=None):
        return len(self.seen(method, path, contains, fault))

    def _take(self, method, path, target):
        with self.lock:
            for r in self.rules:
                if r["method"] in ("", method) and path.startswith(r["path"]) and \
                        (not r["contains"] or r["contains"] in target) and r["count"] != 0:
                    if r["count"] > 0:
                        r["count"] -= 1
                        if r["count"] == 0:
                            self.rules.remove(r)
                    return dict(r)
        return None

    def _record(self, method, path, target, fault):
        rec = {"method": method, "path": path, "target": target, "fault": fault,
               "t": time.time(), "status": 0, "body": None}
        with self.lock:
            self.requests.append(rec)
        return rec

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # -- one connection --------------------------------------------------

    def _handle(self, conn, rfile):
        head = _read_head(rfile)
        if head is None:
            return
        first, headers = head
        try:
            method, target, _ = first.split(" ", 2)
        except ValueError:
            return _rst(conn)
        path = urllib.parse.urlsplit(target).path
        if path.startswith("/_faults"):
            return self._control(conn, rfile, method, path, headers)
        rule = self._take(method, path, target)
        name = ""
        if rule:
            for k in ("cut", "truncate", "garbage", "reset", "status", "hold", "delay"):
                if rule.get(k):
                    name = k
                    break
        rec = self._record(method, path, target, name)
        if rule and rule.get("delay"):
            time.sleep(float(rule["delay"]))
        if rule and rule.get("cut"):
            return self._cut(conn, rfile, first, headers, float(rule["cut"]))
        body = _read_body(rfile, headers)
        if self.record_bodies and method in ("POST", "PUT", "PATCH", "DELETE"):
            rec["body"] = body[:65536].decode("utf-8", "replace")
        if rule and (rule.get("status") or rule.get("reset") or rule.get("garbage")):
            if rule.get("after"):
                try:
                    up = self._send_up(first, headers, body)
                    up.settimeout(30)
                    while up.recv(65536):
                        pass
                    up.close()
                except OSError:
                    pass
            if rule.get("reset"):
                return _rst(conn)
            if rule.get("garbage"):
                return self._answer(conn, 200, GARBAGE, "application/json")
            status = int(rule["status"])
            extra = []
            if rule.get("retry_after") is not None:
                extra.append(("Retry-After", str(rule["retry_after"])))
            text = rule.get("body")
            if text is None:
                text = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "message": "injected fault: %d" % status,
                                   "reason": "InjectedFault", "code": status,
                                   "errors": [{"code": "INJECTED",
                                               "message": "injected fault: %d" % status}],
                                   "error": "injected fault: %d" % status}) + "\n"
            return self._answer(conn, status, text.encode(),
                                rule.get("ctype", "application/json"), extra)
        try:
            up = self._send_up(first, headers, body)
        except OSError:
            return self._answer(conn, 502, b"fault proxy: upstream unreachable\n", "text/plain")
        if rule and rule.get("hold"):
            reply = b""
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                reply += chunk
            up.close()
            try:
                rec["status"] = int(reply.split(b" ", 2)[1])
            except (IndexError, ValueError):
                pass
            time.sleep(float(rule["hold"]))
            try:
                conn.sendall(reply)
            except OSError:
                pass
            return
        self._pipe_back(conn, up, rule.get("truncate") if rule else None, rec)

    def _send_up(self, first, headers, body):
        up = socket.create_connection((self.up_host, self.up_port), timeout=10)
        up.settimeout(None)
        hs = [(k, v) for k, v in headers
              if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                   "keep-alive", "proxy-connection")]
        if body or first.split(" ", 1)[0] in ("POST", "PUT", "PATCH"):
            hs.append(("Content-Length", str(len(body))))
        hs.append(("Connection", "close"))
        up.sendall(_head_bytes(first, hs) + body)
        return up

    def _pipe_back(self, conn, up, truncate, rec):
        uf = up.makefile("rb")
        try:
            head = _read_head(uf)
            if head is None:
                return _rst(conn)
            status, headers = head
            try:
                rec["status"] = int(status.split(" ")[1])
            except (IndexError, ValueError):
                pass
            headers = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
            headers.append(("Connection", "close"))
            conn.sendall(_head_bytes(status, headers))
            if truncate:
                n = _get(headers, "Content-Length")
                body = uf.read(int(n)) if n is not None else uf.read()
                conn.sendall(body[:int(len(body) * float(truncate))])
                return _rst(conn)
            while True:
                chunk = uf.read1(65536)
                if not chunk:
                    break
                conn.sendall(chunk)
        except OSError:
            _rst(conn)
        finally:
            uf.close()
            up.close()

    def _cut(self, conn, rfile, first, headers, fraction):
        """Forwards the head and the first fraction of the body, then drops
        both connections: an upload cut midway."""
        n = int(_get(headers, "Content-Length") or 0)
        part = rfile.read(int(n * fraction)) if n else b""
        try:
            up = socket.create_connection((self.up_host, self.up_port), timeout=10)
            hs = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
            hs.append(("Connection", "close"))
            up.sendall(_head_bytes(first, hs) + part)
            time.sleep(0.2)  # let upstream read what came before the cut
            _rst(up)
        except OSError:
            pass
        _rst(conn)

    def _answer(self, conn, status, body, ctype, extra=()):
        head = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Fault")),
                "Content-Type: " + ctype, "Content-Length: %d" % len(body),
                "Connection: close"] + ["%s: %s" % kv for kv in extra]
        try:
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        except OSError:
            pass

    def _control(self, conn, rfile, method, path, headers):
        body = _read_body(rfile, headers)
        if method == "POST":
            spec = json.loads(body or b"{}")
            self.add(**spec)
            out = {"faults": self.active()}
        elif method == "DELETE":
            self.clear()
            out = {"faults": []}
        else:
            with self.lock:
                out = {"faults": [dict(r) for r in self.rules], "requests": list(self.requests)}
        self._answer(conn, 200, (json.dumps(out) + "\n").encode(), "application/json")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict", 410: "Gone",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream")
    ap.add_argument("--port-file")
    ap.add_argument("--lifetime", type=float, default=3600)
    a = ap.parse_args(argv)
    p = FaultProxy(a.upstream)
    print("PORT=%d" % p.port, flush=True)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write("%d\n" % p.port)
        import os
        os.rename(a.port_file + ".tmp", a.port_file)
    time.sleep(a.lifetime)


if __name__ == "__main__":
    main(sys.argv[1:])
