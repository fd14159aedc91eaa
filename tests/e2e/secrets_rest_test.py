"""Secrets sealed at rest (README, "Daemon config and secrets"): no value
is in data.mdb or any other file of the data directory in plain text once
the run that used it has ended, a run still gets the value, and a missing,
wrong, short or world-readable DATA_DIR/secret.key stops kpld at start
with a message that says what to do (and a missing key is never replaced
by a new one while sealed secrets exist).

    /usr/bin/python3 tests/e2e/secrets_rest_test.py PATH/TO/kpld
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import P, Client, Daemon, assert_eq, run_suite, submit, watch  # noqa: E402

# Values no other byte sequence in the store could match by chance.
VALUES = {
    "DB_PASSWORD": "kpl-rest-Pw-7f3a9c1e5b",
    "DEPLOY_KEY": "-----BEGIN KEY-----\nkpl-rest-line-one-4d2e8a\n"
                  "kpl-rest-line-two-91bc07\n-----END KEY-----",
    "LONG_TOKEN": "kpl-rest-long-" + "x9Q" * 2000,
}

# The pipeline text is stored: it checks the value by its hash.
USES = """
name: uses-secret
stages:
  - name: s
    kind: script
    env: { PW: "${{ secrets.DB_PASSWORD }}" }
    with:
      shell: |
        echo "pw=$PW"
        echo "copy=$PW" >> "$KPL_OUTPUTS"
        test "$(printf %%s "$PW" | sha256sum | cut -c1-64)" = %s
""" % hashlib.sha256(VALUES["DB_PASSWORD"].encode()).hexdigest()


def needles(value):
    """What must not be found: the value and each line of a multi-line one
    (redaction works line by line, so would a leak)."""
    out = [value.encode()]
    out += [ln.encode() for ln in value.split("\n") if "kpl-rest" in ln]
    return sorted(set(out))


class Suite:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.tmp = tmp
        self.data = os.path.join(tmp, "data")
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
        self.daemon = Daemon(binary, self.data, ["--sandbox-bind", self.shared])
        self.c = self.daemon.start()

    def key(self):
        return os.path.join(self.data, "secret.key")

    def start_fails(self, want):
        """kpld on the data directory exits 1 at start, its message holding
        every string of want; returns the message."""
        r = subprocess.run([self.binary, "--listen", "127.0.0.1:0", "--data-dir", self.data],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        err = r.stderr.decode()
        assert_eq(r.returncode, 1, "kpld's exit status (stderr %r)" % err)
        for w in want:
            if w not in err:
                raise AssertionError("kpld's message lacks %r: %r" % (w, err))
        return err

    def test_output_cleanup_follows_no_symlink(self):
        # The raw output files go when a run ends; a stage that put a
        # symlink among its attempt directories cannot make kpld delete
        # files elsewhere (kpld deletes what the stages' sandbox hides).
        victim = os.path.join(self.shared, "attempt")
        os.mkdir(victim)
        for fn in ("output", "outputs"):
            with open(os.path.join(victim, fn), "w") as f:
                f.write("keep\n")
        text = ("name: links\nstages:\n  - name: s\n    kind: script\n"
                "    with: { shell: 'ln -s %s \"$KPL_WORKSPACE/.kpl/zz\" && echo linked' }\n"
                % victim)
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED", "the run")
        ws = os.path.join(self.data, "work", run["id"], ".kpl")
        assert_eq(os.path.islink(os.path.join(ws, "zz")), True, "the stage's symlink")
        assert_eq(os.path.exists(os.path.join(ws, "s.1", "output")), False,
                  "the run's own raw output")
        assert_eq(sorted(os.listdir(victim)), ["output", "outputs"],
                  "files behind the symlink")

    def test_values_not_in_data_mdb(self):
        for name, value in VALUES.items():
            self.c.call(P + "SetSecret", {"name": name, "value": value})
        # Set one again: the old blob's pages may stay in the file.
        self.c.call(P + "SetSecret", {"name": "DB_PASSWORD", "value": VALUES["DB_PASSWORD"]})
        run = Client.to_dict(submit(self.c, USES))
        events = watch(self.c, run["id"])
        assert_eq(events[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                  "the stage got the value through its environment")
        logs = [e["message"] for e in events if e.get("kind") == "EVENT_KIND_LOG"]
        assert_eq(logs, ["pw=***"], "the log is redacted")
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld stops clean")  # every commit on disk

        with open(os.path.join(self.data, "data.mdb"), "rb") as f:
            mdb = f.read()
        # The scan reads the real store: the names are keys in plain text.
        for name in VALUES:
            if name.encode() not in mdb:
                raise AssertionError("secret name %s not in data.mdb: wrong file?" % name)
        if b"pw=***" not in mdb:
            raise AssertionError("the run's redacted log line is not in data.mdb")
        for name, value in VALUES.items():
            for n in needles(value):
                if n in mdb:
                    raise AssertionError("data.mdb holds %s's value in plain text (%r at %d)"
                                         % (name, n[:40], mdb.index(n)))
        # Nor any other file: the raw output of the command that printed
        # one, and what it wrote to $KPL_OUTPUTS, go once the run has
        # ended (docs/security.md).
        files = [os.path.join(root, fn) for root, _, fns in os.walk(self.data) for fn in fns]
        if not any(p.endswith("/.kpl/s.1/exit") for p in files):
            raise AssertionError("no attempt directory in the data directory: %r" % files)
        for path in files:
            with open(path, "rb") as f:
                text = f.read()
            hit = [n for v in VALUES.values() for n in needles(v) if n in text]
            if hit:
                raise AssertionError("%s holds a secret value: %r" % (path, hit[0][:40]))
        st = os.stat(self.key())
        assert_eq(st.st_mode & 0o777, 0o600, "secret.key's mode")

    def test_missing_key_fails_and_is_not_replaced(self):
        saved = os.path.join(self.tmp, "secret.key.backup")
        shutil.move(self.key(), saved)
        self.start_fails([self.key() + " is missing", "3 sealed secrets",
                          "put back the secret.key", "backup"])
        assert_eq(os.path.exists(self.key()), False,
                  "a new secret.key made over the missing one")
        shutil.move(saved, self.key())

    def test_wrong_key_fails(self):
        saved = open(self.key(), "rb").read()
        try:
            with open(self.key(), "wb") as f:
                f.write(bytes((b ^ 0x5a) for b in saved))
            self.start_fails(["does not open with " + self.key(),
                              "put back the secret.key", "backup"])
            with open(self.key(), "wb") as f:
                f.write(saved[:16])
            self.start_fails([self.key() + ": 16 bytes, a key is 32",
                              "put back the secret.key"])
            with open(self.key(), "wb") as f:
                f.write(saved)
            os.chmod(self.key(), 0o644)
            self.start_fails(["readable by others", "chmod 600"])
            os.chmod(self.key(), 0o600)
        finally:
            with open(self.key(), "wb") as f:
                f.write(saved)
            os.chmod(self.key(), 0o600)

    def test_right_key_opens_them_again(self):
        self.c = self.daemon.start()
        names = [s["name"] for s in
                 Client.to_dict(self.c.call(P + "ListSecrets", {})).get("secrets", [])]
        assert_eq(sorted(names), sorted(VALUES), "ListSecrets after the restart")
        run = Client.to_dict(submit(self.c, USES))
        assert_eq(watch(self.c, run["id"])[-1].get("run_state"), "RUN_STATE_SUCCEEDED",
                  "a run gets the value after the restart")

    def close(self):
        self.c.close()
        if self.daemon.proc:
            assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-secrets-rest-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
