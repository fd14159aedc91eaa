"""A newcomer's first mistakes get answers that say what happened and what to
do (issue #14), against a real kpld:

- no kpld listening: "no kpld at ADDR (where ADDR came from): start one with
  kpld, or pass --server / KPL_SERVER", grpc's words after it;
- a host that does not resolve;
- plain text to a kpld serving TLS, and TLS (--ca) to a plain one;
- a token kpld does not know, or one revoked, naming where it came from;
- `kplctl lint` with no kpld: the same diagnostics from the same parser,
  and a note that the daemon config's names were not checked; with a kpld,
  an undeclared notifier or registry is reported by name;
- a param passed but not declared: the message names the declared ones;
- a when wrapped whole in ${{ }} runs as the expression inside.

    /usr/bin/python3 tests/e2e/first_mistakes_test.py KPLD KPLCTL
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon  # noqa: E402

KPLD = KPLCTL = None
TMP = None


def closed_port():
    """A port nothing listens on for as long as the socket lives: bound but
    not listening, so a connect is refused and no other test can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def ctl(*args, env=None, stdin=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("KPL_") and k != "XDG_CONFIG_HOME"}
    e["HOME"] = TMP  # no config file of the user's
    e.update(env or {})
    return subprocess.run([KPLCTL] + list(args), env=e, capture_output=True, text=True,
                          timeout=60, input=stdin)


def start_kpld(name, extra=()):
    """A kpld (maybe TLS, which Daemon's client cannot reach): returns
    (proc, addr). Waits for the ready file, not a time."""
    data = os.path.join(TMP, name)
    ready = data + ".ready"
    log = open(data + ".log", "w")
    proc = subprocess.Popen([KPLD, "--listen", "127.0.0.1:0", "--data-dir", data,
                             "--ready-file", ready, "--sandbox", "none"] + list(extra),
                            stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kpld %s did not serve:\n%s"
                                 % (name, open(data + ".log").read()))
        time.sleep(0.02)
    return proc, open(ready).read().strip()


BAD = """name: p
stages:
  - name: a
    kind: script
    with:
      comand: ["true"]
"""

NAMES = """name: names
notify:
  - notifier: team
stages:
  - name: a
    kind: push
    with: { registry: local, repository: x, image: y, tags: ["1"] }
"""


class NoKpld(unittest.TestCase):
    def test_no_kpld(self):
        s = closed_port()
        addr = "127.0.0.1:%d" % s.getsockname()[1]
        for args, env, source in ((["--server", addr], None, "--server"),
                                  ([], {"KPL_SERVER": addr}, "$KPL_SERVER")):
            r = ctl(*(args + ["list"]), env=env)
            self.assertEqual(r.returncode, 3, r.stderr)
            self.assertIn("kplctl: list: UNAVAILABLE: no kpld at %s (%s): start one with "
                          "kpld, or pass --server / KPL_SERVER\n" % (addr, source), r.stderr)
            self.assertIn("(grpc: ", r.stderr)
        s.close()

    def test_unresolvable_host(self):
        r = ctl("--server", "no-such-host.invalid:7070", "get", "run-0001")
        self.assertEqual(r.returncode, 3)
        self.assertIn("cannot resolve the host of no-such-host.invalid:7070 (--server)",
                      r.stderr)

    def test_lint_offline(self):
        s = closed_port()
        addr = "127.0.0.1:%d" % s.getsockname()[1]
        d = tempfile.mkdtemp(dir=TMP)
        for name, text in (("bad.yaml", BAD), ("names.yaml", NAMES)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        r = subprocess.run([KPLCTL, "--server", addr, "lint", "bad.yaml", "names.yaml"],
                           cwd=d, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, HOME=TMP))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stdout,
                         'bad.yaml:6:7: stages[0].with.comand: unknown key "comand": did you '
                         'mean "command"? (allowed: command, shell, workdir, env, timeout)\n'
                         "names.yaml: ok\n")
        # Said once, with what was not checked.
        self.assertEqual(r.stderr.count("no kpld at %s: checked offline" % addr), 1, r.stderr)
        self.assertIn("notifiers, registries", r.stderr)
        s.close()


class WithKpld(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(KPLD, os.path.join(TMP, "plain", "data"),
                       ["--sandbox", "none", "--bootstrap-token-file",
                        os.path.join(TMP, "plain", "admin.token")])
        os.makedirs(os.path.join(TMP, "plain"), exist_ok=True)
        cls.d.start().close()
        cls.token = open(os.path.join(TMP, "plain", "admin.token")).read().strip()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def env(self, **kw):
        e = {"KPL_SERVER": self.d.addr, "KPL_TOKEN": self.token}
        e.update(kw)
        return e

    def test_unknown_token(self):
        r = ctl("list", env=self.env(KPL_TOKEN="kpl_nosuchtoken"))
        self.assertEqual(r.returncode, 3)
        self.assertIn("kplctl: list: UNAUTHENTICATED: kpld at %s does not accept the token "
                      "from $KPL_TOKEN: ask an admin for one (kplctl token create)"
                      % self.d.addr, r.stderr)
        r = ctl("list", "--token", "kpl_nosuchtoken", env=self.env(KPL_TOKEN=""))
        self.assertIn("does not accept the token from --token", r.stderr)

    def test_revoked_token(self):
        r = ctl("token", "create", "--scope", "read", env=self.env())
        self.assertEqual(r.returncode, 0, r.stderr)
        tok = r.stdout.strip()
        tid = re.search(r"token (\S+) \(scope", r.stderr).group(1)
        self.assertEqual(ctl("list", env=self.env(KPL_TOKEN=tok)).returncode, 0)
        r = ctl("token", "revoke", tid, env=self.env())
        self.assertEqual(r.returncode, 0, r.stderr)
        r = ctl("list", env=self.env(KPL_TOKEN=tok))
        self.assertEqual(r.returncode, 3)
        self.assertIn("kplctl: list: UNAUTHENTICATED: kpld at %s does not accept the token "
                      "from $KPL_TOKEN: ask an admin for one" % self.d.addr, r.stderr)
        self.assertIn("(grpc: token %s was revoked)" % tid, r.stderr)

    def test_tls_to_plain(self):
        ca = os.path.join(TMP, "tls", "cert.pem")
        r = ctl("--ca", ca, "list", env=self.env())
        self.assertEqual(r.returncode, 3)
        self.assertIn("kplctl: list: UNAVAILABLE: %s does not speak TLS: drop --ca"
                      % self.d.addr, r.stderr)

    def test_lint_online_checks_config_names(self):
        d = tempfile.mkdtemp(dir=TMP)
        with open(os.path.join(d, "names.yaml"), "w") as f:
            f.write(NAMES)
        r = subprocess.run([KPLCTL, "lint", "names.yaml"], cwd=d, capture_output=True,
                           text=True, timeout=60,
                           env=dict(os.environ, HOME=TMP, **self.env()))
        self.assertEqual(r.returncode, 1, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(len(lines), 2, r.stdout)
        self.assertRegex(lines[0], r'^names\.yaml:3:5: notify\[0\]\.notifier: no notifier '
                         r'named "team" in the daemon config \(none\) \(declared: none\)$')
        self.assertRegex(lines[1], r'^names\.yaml:7:23: stages\[0\]\.with\.registry: no '
                         r'registries\.local in the daemon config \(none\) '
                         r'\(declared: none\)$')
        self.assertNotIn("offline", r.stderr)

    def test_undeclared_param_names_declared(self):
        d = tempfile.mkdtemp(dir=TMP)
        path = os.path.join(d, "p.yaml")
        with open(path, "w") as f:
            f.write("name: params\nparams:\n  target: { default: prod }\n"
                    "  version: { default: '1' }\nstages:\n  - name: a\n    kind: noop\n")
        r = ctl("submit", path, "-p", "tagret=qa", env=self.env())
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn('params.tagret: the pipeline declares no such param: did you mean '
                      '"target"? (declared: target, version)', r.stderr)

    def test_when_wrapped(self):
        d = tempfile.mkdtemp(dir=TMP)
        path = os.path.join(d, "w.yaml")
        with open(path, "w") as f:
            f.write("name: wrapped\nstages:\n"
                    "  - name: a\n    kind: script\n"
                    "    with: { shell: 'echo ver=7 >> \"$KPL_OUTPUTS\"' }\n"
                    "  - name: taken\n    kind: script\n    needs: [a]\n"
                    "    when: ${{ stages.a.outputs.ver == '7' }}\n"
                    "    with: { shell: 'true' }\n"
                    "  - name: passed\n    kind: script\n    needs: [a]\n"
                    "    when: ${{ stages.a.outputs.ver == '8' }}\n"
                    "    with: { shell: 'true' }\n")
        r = ctl("submit", path, env=self.env())
        self.assertEqual(r.returncode, 0, r.stderr)
        run_id = r.stdout.strip()
        r = ctl("watch", run_id, "--plain", env=self.env())
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        out = ctl("get", run_id, env=self.env()).stdout
        self.assertRegex(out, r"(?m)^  taken +script +SUCCEEDED")
        self.assertRegex(out, r"(?m)^  passed +script +SKIPPED")


class Tls(unittest.TestCase):
    def test_plain_to_tls(self):
        proc, addr = start_kpld("tls-kpld", ["--tls-cert", os.path.join(TMP, "tls", "cert.pem"),
                                             "--tls-key", os.path.join(TMP, "tls", "key.pem")])
        try:
            r = ctl("--server", addr, "list")
            self.assertEqual(r.returncode, 3)
            self.assertIn("kplctl: list: UNAVAILABLE: %s closed the connection: if kpld "
                          "serves TLS (--tls-cert), pass --ca FILE (or KPL_CA)" % addr,
                          r.stderr)
            # And with --ca it works: the hint pointed the right way.
            r = ctl("--server", addr, "--ca", os.path.join(TMP, "tls", "cert.pem"), "list")
            self.assertEqual(r.returncode, 0, r.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main():
    global KPLD, KPLCTL, TMP
    KPLD, KPLCTL = [os.path.abspath(a) for a in sys.argv[1:3]]
    TMP = tempfile.mkdtemp(prefix="kpl-mistakes-", dir=os.environ.get("TEST_TMPDIR"))
    tls = os.path.join(TMP, "tls")
    os.makedirs(tls)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", os.path.join(tls, "key.pem"),
                    "-out", os.path.join(tls, "cert.pem")],
                   check=True, capture_output=True)
    prog = unittest.main(argv=[sys.argv[0], "-v"], exit=False)
    return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
