"""`kplctl lint` against a real kpld reports every bad pipeline file of the
parser's table precisely.

    /usr/bin/python3 tests/e2e/lint_test.py KPLD KPLCTL PIPELINE_TEST_C FIXTURES_DIR

The expected first diagnostic of each bad fixture is read from the table in
tests/unit/pipeline_test.c (bad_cases), so the unit test and this test can
never disagree about what a file should say. The unit test runs the parser
with two test kinds; kpld knows every real kind, so where a message lists
the known kinds ("... (known: script, noop)") only the text before the list
is compared. Good fixtures must lint clean.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import Daemon  # noqa: E402


def c_strings(text):
    """Concatenated C string literals -> one Python string."""
    out = ""
    for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', text):
        out += bytes(lit, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    return out


def bad_table(path):
    src = open(path, encoding="utf-8").read()
    body = src[src.index("bad_cases[] = {"):]
    body = body[:body.index("\n};")]
    table = {}
    for m in re.finditer(r'\{\s*"([^"]+)",\s*\w+,\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\}', body):
        table[m.group(1)] = c_strings(m.group(2))
    return table


def comparable(msg):
    return msg.split(" (known: ")[0]


def offline_differs(kplctl, cwd, name, env, online):
    """kplctl lint with no kpld must say what the daemon said (the same
    parser and kinds), and say once that it checked offline. 1 if not."""
    r = subprocess.run([kplctl, "lint", name], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=30)
    if (r.returncode, r.stdout) != (online.returncode, online.stdout):
        print("FAIL offline %s: exit %d, want %d\n  got:  %r\n  want: %r"
              % (name, r.returncode, online.returncode, r.stdout, online.stdout))
        return 1
    if r.stderr.count(": checked offline with the same parser; names the daemon config "
                      "declares") != 1:
        print("FAIL offline %s: no note that it checked offline: %r" % (name, r.stderr))
        return 1
    return 0


def main():
    kpld, kplctl, table_src, fixtures = [os.path.abspath(a) for a in sys.argv[1:5]]
    table = bad_table(table_src)
    tmp = tempfile.mkdtemp(prefix="kpl-lint-", dir=os.environ.get("TEST_TMPDIR"))
    # The notifiers good/notify.yaml names and the cluster good/runs_on.yaml
    # runs its pods on: kpld checks the config's names (the kubeconfig is
    # read only when a stage runs).
    config = os.path.join(tmp, "kpld.yaml")
    with open(config, "w") as f:
        f.write("notifiers:\n"
                "  team-chat: { kind: wecom, url: \"http://127.0.0.1:9/a\" }\n"
                "  ops: { kind: wecom, url: \"http://127.0.0.1:9/b\" }\n"
                "kubernetes:\n"
                "  kind: { kubeconfig: %s }\n" % os.path.join(tmp, "kubeconfig"))
    daemon = Daemon(kpld, os.path.join(tmp, "data"), ["--config", config])
    daemon.start().close()
    env = dict(os.environ, KPL_SERVER=daemon.addr)
    env.pop("KPL_TOKEN", None)
    # Offline: a port that refuses connections while this socket lives.
    refuser = socket.socket()
    refuser.bind(("127.0.0.1", 0))
    offline_env = dict(env, KPL_SERVER="127.0.0.1:%d" % refuser.getsockname()[1])
    passed = failed = 0
    bad_dir = os.path.join(fixtures, "bad")
    files = sorted(os.listdir(bad_dir))
    if len(files) < 40 or len(table) < 40:
        print("FAIL: want at least 40 bad fixtures and table rows, have %d and %d"
              % (len(files), len(table)))
        failed += 1
    for name in files:
        r = subprocess.run([kplctl, "lint", name], cwd=bad_dir, env=env,
                           capture_output=True, text=True, timeout=30)
        failed += offline_differs(kplctl, bad_dir, name, offline_env, r)
        first = r.stdout.splitlines()[0] if r.stdout else ""
        want = table.get(name)
        if want is None:
            print("FAIL %s: no row in the table" % name)
            failed += 1
        elif r.returncode != 1 or comparable(first) != comparable(want):
            print("FAIL %s: exit %d\n  got:  %s\n  want: %s\n  stderr: %s"
                  % (name, r.returncode, first, want, r.stderr.strip()))
            failed += 1
        else:
            passed += 1
    good_dir = os.path.join(fixtures, "good")
    for name in sorted(os.listdir(good_dir)):
        r = subprocess.run([kplctl, "lint", name], cwd=good_dir, env=env,
                           capture_output=True, text=True, timeout=30)
        failed += offline_differs(kplctl, good_dir, name, offline_env, r)
        if r.returncode != 0 or r.stdout.strip() != "%s: ok" % name:
            print("FAIL good %s: exit %d: %s %s" % (name, r.returncode, r.stdout, r.stderr))
            failed += 1
        else:
            passed += 1
    rc = daemon.stop(signal.SIGTERM)
    if rc != 0:
        print("FAIL kpld exit status %d on SIGTERM" % rc)
        failed += 1
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
