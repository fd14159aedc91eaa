"""End-to-end test of the `push` stage kind against Debian's docker-registry
(distribution 2.8), started here on 127.0.0.1 with htpasswd basic auth and,
for one test, token auth with a token server written below (JWTs signed
RS256 with the openssl command).

    /usr/bin/python3 tests/e2e/push_test.py PATH/TO/kpld

The test builds OCI image layouts itself (a gzip tar layer, a config, a
manifest, index.json; every digest computed here), has a script stage copy
one into the run's workspace, and a push stage push it. It then checks what
the registry holds over plain HTTP, independently of kpl.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from kplgrpc import Client  # noqa: E402
from ports import start_on_free_port  # noqa: E402
from e2e_test import P, assert_eq, submit, watch  # noqa: E402

PASS = "s3cret-Registry-pw-4711"
WRONG = "not-the-password-0815"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join([MT_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


def _die_with_parent():
    """Children end when this test ends, however it ends (PR_SET_PDEATHSIG)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def need(tool):
    path = shutil.which(tool)
    if not path:
        raise SystemExit("push_test: %s is missing: install docker-registry and "
                         "apache2-utils (./dev test does)" % tool)
    return path


def make_layout(dirpath, payload):
    """An OCI image layout with one gzip tar layer holding `payload`;
    returns (manifest digest, layer bytes, config digest)."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tf:
        info = tarfile.TarInfo("app/payload.bin")
        info.size = len(payload)
        info.mtime = 0
        tf.addfile(info, io.BytesIO(payload))
    layer = gzip.compress(tar_buf.getvalue(), mtime=0)
    diff_id = sha(tar_buf.getvalue())
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "config": {"Cmd": ["/app/payload.bin"]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer), "size": len(layer)}]}).encode()
    blobs = os.path.join(dirpath, "blobs", "sha256")
    os.makedirs(blobs)
    for b in (layer, config, manifest):
        with open(os.path.join(blobs, sha(b)[7:]), "wb") as f:
            f.write(b)
    with open(os.path.join(dirpath, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(dirpath, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": MT_MANIFEST, "digest": sha(manifest), "size": len(manifest)}]}, f)
    return sha(manifest), layer, sha(config)


# -- the token server ------------------------------------------------------

def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def libtrust_kid(der_pub):
    """The key id distribution computes for a key of the rootcertbundle."""
    s = base64.b32encode(hashlib.sha256(der_pub).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


class TokenServer:
    def __init__(self, tmp, issuer, service):
        self.key = os.path.join(tmp, "token.key")
        self.cert = os.path.join(tmp, "token.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", self.key, "-out", self.cert, "-days", "2",
                        "-subj", "/CN=kpl-test-token"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pub = subprocess.run("openssl x509 -in '%s' -pubkey -noout | openssl pkey -pubin "
                             "-outform DER" % self.cert, shell=True, check=True,
                             stdout=subprocess.PIPE).stdout
        self.kid = libtrust_kid(pub)
        self.issuer = issuer
        self.service = service
        self.requests = []  # (scopes, user) of each token request
        self.tokens = []
        server = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlparse
                q = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                want = "Basic " + base64.b64encode(("kpl:" + PASS).encode()).decode()
                if auth != want:
                    body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                                   "message": "bad credentials"}]}).encode()
                    self.send_response(401)
                else:
                    scopes = q.get("scope", [])
                    server.requests.append((scopes, q.get("service", [""])[0]))
                    tok = server.sign(scopes)
                    server.tokens.append(tok)
                    body = json.dumps({"token": tok, "expires_in": 300}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, scopes):
        access = []
        for s in scopes:
            typ, name, actions = s.split(":")[0], ":".join(s.split(":")[1:-1]), s.split(":")[-1]
            access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {"iss": self.issuer, "sub": "kpl", "aud": self.service, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = (b64url(json.dumps(header).encode()) + "." +
                         b64url(json.dumps(claims).encode())).encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key],
                             input=signing_input, stdout=subprocess.PIPE, check=True).stdout
        return signing_input.decode() + "." + b64url(sig)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the registry ----------------------------------------------------------

class Registry:
    def __init__(self, tmp, name, auth_yaml):
        self.dir = os.path.join(tmp, name)
        os.makedirs(os.path.join(self.dir, "storage"))
        cfg = os.path.join(self.dir, "config.yml")
        self.log = os.path.join(self.dir, "registry.log")

        def start(port):
            with open(cfg, "w") as f:
                f.write("version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
                        "storage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n"
                        "    enabled: true\nhttp:\n  addr: 127.0.0.1:%d\n%s"
                        % (os.path.join(self.dir, "storage"), port, auth_yaml))
            logf = open(self.log, "a")
            p = subprocess.Popen([need("docker-registry"), "serve", cfg],
                                 stdout=logf, stderr=logf, preexec_fn=_die_with_parent)
            logf.close()
            return p
        # A port that is surely its own (tests/lib/ports.py), then it serves.
        self.proc, self.port = start_on_free_port(start, "docker-registry")
        self.url = "http://127.0.0.1:%d" % self.port
        self.host = "127.0.0.1:%d" % self.port
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401: it serves
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("docker-registry did not start:\n" +
                                         open(self.log).read())
                time.sleep(0.05)

    def get(self, path, accept=None, token=None, method="GET"):
        req = urllib.request.Request(self.url + path, method=method)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        else:
            req.add_header("Authorization", "Basic " +
                           base64.b64encode(("kpl:" + PASS).encode()).decode())
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the suite -------------------------------------------------------------

def pipeline(name, push_with, layout=None):
    """A copy stage (layout into the workspace) then the push stage."""
    stages = []
    if layout:
        stages.append({"name": "build", "kind": "script",
                       "with": {"command": ["cp", "-r", layout, "out"]}})
    stage = {"name": "push", "kind": "push", "with": push_with}
    if layout:
        stage["needs"] = ["build"]
    stages.append(stage)
    return json.dumps({"name": name, "stages": stages})


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        htpasswd = os.path.join(tmp, "htpasswd")
        with open(htpasswd, "w") as f:
            f.write(subprocess.run([need("htpasswd"), "-Bbn", "kpl", PASS], check=True,
                                   stdout=subprocess.PIPE, text=True).stdout)
        self.reg = Registry(tmp, "reg-basic", "auth:\n  htpasswd:\n    realm: basic-realm\n"
                            "    path: %s\n" % htpasswd)
        self.tok = TokenServer(tmp, "kpl-test-issuer", "kpl-test-registry")
        self.treg = Registry(tmp, "reg-token", "auth:\n  token:\n    realm: "
                             "http://127.0.0.1:%d/token\n    service: kpl-test-registry\n"
                             "    issuer: kpl-test-issuer\n    rootcertbundle: %s\n"
                             % (self.tok.port, self.tok.cert))
        # A "registry" that takes connections and never answers.
        self.hang = socket.socket()
        self.hang.bind(("127.0.0.1", 0))
        self.hang.listen(16)
        cfg = os.path.join(tmp, "kpld.yaml")
        with open(cfg, "w") as f:
            f.write("registries:\n"
                    "  local: { url: %s, username: kpl, password: \"${{ secrets.REG_PASS }}\" }\n"
                    "  badpw: { url: %s, username: kpl, password: \"${{ secrets.REG_WRONG }}\" }\n"
                    "  tokreg: { url: %s, username: kpl, password: \"${{ secrets.REG_PASS }}\" }\n"
                    "  hang: { url: http://127.0.0.1:%d, username: kpl, password: x }\n"
                    % (self.reg.url, self.reg.url, self.treg.url, self.hang.getsockname()[1]))
        self.data = os.path.join(tmp, "data")
        self.log = os.path.join(tmp, "kpld.log")
        ready = os.path.join(tmp, "ready")
        logf = open(self.log, "w")
        self.kpld = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir",
                                      self.data, "--ready-file", ready, "--config", cfg],
                                     stdout=logf, stderr=logf, preexec_fn=_die_with_parent)
        logf.close()
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.kpld.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("kpld did not serve:\n" + open(self.log).read())
            time.sleep(0.02)
        self.c = Client.connect(open(ready).read().strip())
        self.c.call(P + "SetSecret", {"name": "REG_PASS", "value": PASS})
        self.c.call(P + "SetSecret", {"name": "REG_WRONG", "value": WRONG})
        self.layout1 = os.path.join(tmp, "layout1")
        self.d1, self.layer1, self.cfg1 = make_layout(self.layout1, os.urandom(3000))
        self.layout2 = os.path.join(tmp, "layout2")
        # about 10 KiB of gzip that does not compress: three 4 KiB chunks
        self.d2, self.layer2, self.cfg2 = make_layout(self.layout2, os.urandom(10000))
        self.all_events = []

    def run(self, text):
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        self.all_events.extend(events)
        got = Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]}))
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        push = [s for s in got["stages"] if s["name"] == "push"][0]
        return got, push, logs

    def ok(self, text):
        got, push, logs = self.run(text)
        if got["state"] != "RUN_STATE_SUCCEEDED":
            raise AssertionError("run %s: %s (%s); logs:\n%s" % (
                got["id"], got["state"], push.get("message"), "\n".join(logs)))
        return push, logs

    def manifest(self, reg, repo, ref, token=None):
        status, headers, body = reg.get("/v2/%s/manifests/%s" % (repo, ref), ACCEPT, token)
        assert_eq(status, 200, "GET manifest status")
        dcd = {k.lower(): v for k, v in headers.items()}.get("docker-content-digest")
        assert_eq(dcd, sha(body), "Docker-Content-Digest of %s:%s" % (repo, ref))
        return sha(body), body

    # -- tests ----------------------------------------------------------

    def test_1_push_monolithic(self):
        push, logs = self.ok(pipeline("push-mono", {
            "registry": "local", "repository": "team/app", "tags": ["v1", "latest"],
            "from": "oci:out"}, self.layout1))
        out = push["outputs"]
        assert_eq(out["digest"], self.d1, "digest output")
        assert_eq(out["image"], "%s/team/app@%s" % (self.reg.host, self.d1), "image output")
        assert_eq(out["tags"], "v1,latest", "tags output")
        uploaded = [line for line in logs if ": uploaded " in line]
        assert_eq(len(uploaded), 2, "two blobs uploaded: %r" % logs)
        if any("chunks" in line for line in uploaded):
            raise AssertionError("a small blob went in chunks: %r" % uploaded)
        for tag in ("v1", "latest"):
            if "manifest pushed: tag %s (%s\u2026)" % (tag, self.d1[:19]) not in logs:
                raise AssertionError("no manifest log for %s: %r" % (tag, logs))
            assert_eq(self.manifest(self.reg, "team/app", tag)[0], self.d1, "pulled " + tag)
        status, _, body = self.reg.get("/v2/team/app/blobs/" + sha(self.layer1))
        assert_eq(body, self.layer1, "the layer as stored")

    def test_2_push_chunked(self):
        push, logs = self.ok(pipeline("push-chunked", {
            "registry": "local", "repository": "team/app", "tags": "v2",
            "from": "oci:out", "chunk_size": "4KiB"}, self.layout2))
        assert_eq(push["outputs"]["digest"], self.d2, "digest output")
        chunks = (len(self.layer2) + 4095) // 4096
        want = "blob %s\u2026: uploaded " % sha(self.layer2)[:19]
        lines = [line for line in logs if line.startswith(want)]
        assert_eq(len(lines), 1, "chunked upload log in %r" % logs)
        if not lines[0].endswith("in %d chunks" % chunks):
            raise AssertionError("%r does not say %d chunks" % (lines[0], chunks))
        status, _, body = self.reg.get("/v2/team/app/blobs/" + sha(self.layer2))
        assert_eq(body, self.layer2, "the chunked layer as stored")
        assert_eq(self.manifest(self.reg, "team/app", "v2")[0], self.d2, "pulled v2")

    def test_3_second_push_skips_existing_blobs(self):
        push, logs = self.ok(pipeline("push-again", {
            "registry": "local", "repository": "team/app", "tags": ["v1-again"],
            "from": "oci:out"}, self.layout1))
        exists = [line for line in logs if line.endswith(" exists")]
        assert_eq(sorted(exists), sorted(["blob %s\u2026 exists" % sha(self.layer1)[:19],
                                          "blob %s\u2026 exists" % self.cfg1[:19]]),
                  "blobs skipped")
        if any(": uploaded " in line for line in logs):
            raise AssertionError("uploaded again: %r" % logs)
        assert_eq(push["outputs"]["digest"], self.d1, "same digest")

    def test_4_promote_same_repository(self):
        push, logs = self.ok(pipeline("promote", {
            "registry": "local", "repository": "team/app", "tags": ["prod"],
            "image": "team/app@" + self.d1}))
        assert_eq(push["outputs"]["digest"], self.d1, "promoted digest")
        assert_eq(push["outputs"]["image"], "%s/team/app@%s" % (self.reg.host, self.d1),
                  "image output")
        if "promoting within team/app: no blob to copy" not in logs:
            raise AssertionError("logs: %r" % logs)
        assert_eq(self.manifest(self.reg, "team/app", "prod")[0], self.d1, "pulled prod")

    def test_5_promote_cross_repository_mounts(self):
        push, logs = self.ok(pipeline("promote-x", {
            "registry": "local", "repository": "prod/app", "tags": ["stable", "v2"],
            "image": "%s/team/app:v2" % self.reg.host}))
        assert_eq(push["outputs"]["digest"], self.d2, "promoted digest")
        assert_eq(push["outputs"]["image"], "%s/prod/app@%s" % (self.reg.host, self.d2),
                  "image output")
        mounted = sorted(line for line in logs if line.endswith("mounted from team/app"))
        assert_eq(mounted, sorted(["blob %s\u2026 mounted from team/app" % d[:19]
                                   for d in (sha(self.layer2), self.cfg2)]), "mounts")
        for tag in ("stable", "v2"):
            assert_eq(self.manifest(self.reg, "prod/app", tag)[0], self.d2, "pulled " + tag)
        status, _, body = self.reg.get("/v2/prod/app/blobs/" + sha(self.layer2))
        assert_eq(body, self.layer2, "mounted layer readable in prod/app")

    def test_6_registry_errors_verbatim(self):
        got, push, logs = self.run(pipeline("promote-missing", {
            "registry": "local", "repository": "prod/app", "tags": ["x"],
            "image": "team/app:no-such-tag"}))
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        want = ("push: GET %s/v2/team/app/manifests/no-such-tag: 404 MANIFEST_UNKNOWN: "
                "manifest unknown" % self.reg.url)
        assert_eq(push["message"], want, "stage message")

    def test_7_wrong_password(self):
        got, push, logs = self.run(pipeline("push-badpw", {
            "registry": "badpw", "repository": "team/app", "tags": ["v1"],
            "from": "oci:out"}, self.layout1))
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        assert_eq(push["message"], "push: GET %s/v2/: 401 UNAUTHORIZED: authentication "
                  "required" % self.reg.url, "stage message")

    def test_8_token_auth(self):
        push, logs = self.ok(pipeline("push-token", {
            "registry": "tokreg", "repository": "team/app", "tags": ["v1"],
            "from": "oci:out", "chunk_size": "4KiB"}, self.layout2))
        assert_eq(push["outputs"]["digest"], self.d2, "digest output")
        assert_eq(push["outputs"]["image"], "%s/team/app@%s" % (self.treg.host, self.d2),
                  "image output")
        if "registry tokreg: token auth (service kpl-test-registry)" not in logs:
            raise AssertionError("logs: %r" % logs)
        assert_eq(self.tok.requests[0], (["repository:team/app:pull,push"],
                                         "kpl-test-registry"), "token request")
        push, logs = self.ok(pipeline("promote-token", {
            "registry": "tokreg", "repository": "prod/app", "tags": ["stable"],
            "image": "team/app:v1"}))
        assert_eq(self.tok.requests[-1][0], ["repository:prod/app:pull,push",
                                             "repository:team/app:pull"], "mount scopes")
        if not any(line.endswith("mounted from team/app") for line in logs):
            raise AssertionError("no mount: %r" % logs)
        tok = self.tok.sign(["repository:prod/app:pull"])
        assert_eq(self.manifest(self.treg, "prod/app", "stable", tok)[0], self.d2,
                  "pulled through token auth")

    def test_8b_cancel_stops_the_request(self):
        text = pipeline("push-hang", {"registry": "hang", "repository": "prod/app",
                                      "tags": ["x"], "image": "team/app:v1"})
        run = Client.to_dict(submit(self.c, text))
        stream = self.c.stream(P + "WatchRun", {"id": run["id"]}, timeout=30)
        for ev in stream:
            ev = Client.to_dict(ev)
            self.all_events.append(ev)
            if ev.get("stage") == "push" and ev.get("stage_state") == "STAGE_STATE_RUNNING":
                stream.cancel()
                break
        # CancelRun answers once the run is CANCELLED. A cancel that did not
        # stop the hanging request would wait for its 60 s timeout: the
        # call's 30 s deadline is a bound below that, not a timing goal.
        got = Client.to_dict(self.c.call(P + "CancelRun", {"id": run["id"]}, timeout=30))
        assert_eq(got["state"], "RUN_STATE_CANCELLED", "run state")
        assert_eq(got["stages"][0]["state"], "STAGE_STATE_CANCELLED", "stage state")
        # the stage timeout goes through the same cancel
        text = json.dumps({"name": "push-hang-timeout", "stages": [
            {"name": "push", "kind": "push", "timeout": "1s", "with": {
                "registry": "hang", "repository": "prod/app", "tags": ["x"],
                "image": "team/app:v1"}}]})
        got, push, logs = self.run(text)
        assert_eq((got["state"], push["state"], push["message"]),
                  ("RUN_STATE_FAILED", "STAGE_STATE_FAILED", "timed out after 1s"), "timeout")

    def test_9_no_secret_in_any_event(self):
        secrets = [PASS, WRONG, base64.b64encode(("kpl:" + PASS).encode()).decode(),
                   base64.b64encode(("kpl:" + WRONG).encode()).decode()] + self.tok.tokens
        if len(self.all_events) < 20:
            raise AssertionError("too few events to search: %d" % len(self.all_events))
        for ev in self.all_events:
            text = json.dumps(ev)
            for s in secrets:
                if s in text:
                    raise AssertionError("a secret reached an event: %s" % text[:300])
        kpld_log = open(self.log).read()
        for s in secrets:
            if s in kpld_log:
                raise AssertionError("a secret reached kpld's log")

    def close(self):
        self.c.close()
        self.kpld.send_signal(signal.SIGTERM)
        assert_eq(self.kpld.wait(timeout=30), 0, "kpld exit status on SIGTERM")
        self.reg.stop()
        self.treg.stop()
        self.tok.stop()
        self.hang.close()


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-push-", dir=os.environ.get("TEST_TMPDIR"))
    suite = Suite(binary, tmp)
    names = sorted(n for n in Suite.__dict__ if n.startswith("test_"))
    passed = failed = 0
    for name in names:
        t0 = time.monotonic()
        try:
            getattr(suite, name)()
            passed += 1
            print("PASS %s (%.2fs)" % (name, time.monotonic() - t0), flush=True)
        except Exception:
            failed += 1
            print("FAIL %s" % name, flush=True)
            traceback.print_exc()
    try:
        suite.close()
    except Exception:
        failed += 1
        print("FAIL clean stop", flush=True)
        traceback.print_exc()
    if failed:
        for what, path in (("kpld", suite.log), ("registry", suite.reg.log),
                           ("token registry", suite.treg.log)):
            print("%s log (%s):" % (what, path))
            print(open(path).read()[-6000:])
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
