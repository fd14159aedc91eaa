"""Stage isolation (docs/security.md, "Stage isolation"): what a stage's
command can reach. A `submit` token limited to one pipeline runs a script
that tries to read kpld's secret key, list, copy and write the data
directory, read another run's workspace, reach kpld through /proc, read
the bootstrap token file and kplctl's tokens in kpld's $HOME; every try must
fail, and the files must be as
they were. The run's own workspace still works: a file one stage writes is
read by the next, and $KPL_OUTPUTS still publishes outputs. A kpld whose
sandbox cannot be set up (bwrap missing, or failing) fails the stage with a
message naming the cause, and never runs the command unconfined.

    /usr/bin/python3 tests/e2e/isolation_test.py PATH/TO/kpld
"""

import hashlib
import json
import os
import stat
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from e2e_test import assert_eq, run_suite  # noqa: E402
from kplgrpc import Client  # noqa: E402
from security_test import SCOPE_ENUM, Kpld  # noqa: E402

P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"

# Leaves a secret in its own workspace: what the probe must not read.
VICTIM = """
name: victim
stages:
  - name: keep
    kind: script
    with: { shell: 'echo victim-secret > secret.txt' }
"""

# Every try prints "blocked: WHAT" or "ESCAPED: WHAT". The paths come in as
# params: an attacker knows them (cwd is DATA_DIR/work/RUN) anyway.
PROBE = r"""
name: probe
params:
  data: {}
  other: {}
  token_file: {}
  kpld_pid: {}
stages:
  - name: attack
    kind: script
    with:
      shell: |
        d="$KPL_PARAM_DATA"
        try() {
          what="$1"; shift
          if "$@" >/dev/null 2>&1; then echo "ESCAPED: $what"; else echo "blocked: $what"; fi
        }
        try "cat ../../secret.key" cat ../../secret.key
        try "cat DATA/secret.key" cat "$d/secret.key"
        try "ls DATA shows the store" sh -c 'ls -a "$1" ../.. | grep -qx -e data.mdb -e secret.key -e lock.mdb' _ "$d"
        try "copy data.mdb" cp "$d/data.mdb" ./copy.mdb
        try "write into data.mdb" sh -c 'echo x >> "$1/data.mdb"' _ "$d"
        try "write a file into DATA" sh -c 'echo x > "$1/evil"' _ "$d"
        try "write into DATA/work" sh -c 'echo x > ../evil' _
        try "read another run's workspace" cat "$d/work/$KPL_PARAM_OTHER/secret.txt"
        try "list another run's workspace" sh -c 'ls ../"$1" | grep -q secret' _ "$KPL_PARAM_OTHER"
        try "kpld's /proc" ls "/proc/$KPL_PARAM_KPLD_PID/root$d"
        try "kpld's open files" sh -c 'ls -l /proc/*/fd/ 2>/dev/null | grep -q data.mdb'
        try "the bootstrap token file" sh -c 'grep -q kpl_ "$1"' _ "$KPL_PARAM_TOKEN_FILE"
        try "write outside the workspace" sh -c 'echo x > /etc/kpl-evil'
        try "kplctl's tokens in HOME" grep -q kpl_ "$HOME/.config/kpl/config"
        echo mine > mine.txt
        echo "note=from-the-sandbox" >> "$KPL_OUTPUTS"
        echo done
  - name: next
    kind: script
    needs: [attack]
    with: { shell: 'cat mine.txt; echo "tmp=$(echo t > /tmp/t && cat /tmp/t)"' }
"""

# kpld reads what the command leaves in the workspace (its outputs file, its
# log, an image layout; base/kpl.c kpl_open_ws): a symlink there must not
# make kpld read, for the command, a file the sandbox hides from it.
SYMLINK = r"""
name: symlink
params:
  target: {}
stages:
  - name: s
    kind: script
    with:
      shell: |
        ln -sf "$KPL_PARAM_TARGET" "$KPL_OUTPUTS"
        echo linked
"""

# A stage plants a symlink where a later stage's attempt directory will be:
# kpld and its shim (both unconfined) must not write through it.
PLANT = r"""
name: plant
params:
  victim: {}
stages:
  - name: a
    kind: script
    with:
      shell: |
        mkdir -p .kpl
        ln -s "$KPL_PARAM_VICTIM" .kpl/b.1
        ln -s "$KPL_PARAM_VICTIM" .kpl/zz
        echo planted
  - name: b
    kind: script
    needs: [a]
    with: { shell: 'echo "1 * * * * root touch /tmp/pwned"' }
"""

# The command, when it runs at all, leaves this behind.
MARKER = """
name: marker
params:
  marker: {}
stages:
  - name: s
    kind: script
    with: { shell: 'echo ran > "$KPL_PARAM_MARKER"; echo ran' }
"""


# A Dockerfile's RUN line is code too: it runs under buildah's chroot, and
# with the capabilities buildah gives it, it can climb out of that chroot;
# it must then still be in kpl's sandbox. Static, for an image FROM scratch.
ESCAPE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static void try(const char *what, const char *path)
{
	printf("%s: %s\n", what, open(path, O_RDONLY) >= 0 ? "ESCAPED" : "blocked");
}

int main(int argc, char **argv)
{
	char key[4096], db[4096];

	snprintf(key, sizeof key, "%s/secret.key", argv[1]);
	snprintf(db, sizeof db, "%s/data.mdb", argv[1]);
	try("in the chroot", key);
	mkdir("/x", 0700);
	if (chroot("/x") == 0) {
		for (int i = 0; i < 64; i++)
			chdir("..");
		chroot(".");
	}
	try("out of the chroot", key);
	try("out of the chroot, data.mdb", db);
	fflush(stdout);
	return 0;
}
"""

BUILD = r"""
name: build-probe
params:
  data: {}
stages:
  - name: prepare
    kind: script
    env: { SRC: "%s" }
    with:
      shell: |
        set -e
        printf '%%s' "$SRC" > escape.c
        gcc -static -O2 -o escape escape.c
        printf 'FROM scratch\nCOPY escape /escape\nARG DATA\nRUN ["/escape", "%%s"]\n' "$KPL_PARAM_DATA" > Dockerfile
  - name: image
    kind: build
    needs: [prepare]
    with: { driver: local, output: oci/probe }
""" % ESCAPE_C.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def events_of(c, run_id, md=None):
    return [Client.to_dict(e) for e in
            c.stream(P + "WatchRun", {"id": run_id}, timeout=60, metadata=md)]


def logs(events, stage):
    return [e["message"] for e in events
            if e.get("kind") == "EVENT_KIND_LOG" and e.get("stage") == stage]


def run(c, text, params, md=None):
    r = Client.to_dict(c.call(P + "SubmitRun", {"pipeline": text, "params": params},
                              metadata=md))
    events = events_of(c, r["id"], md)
    return Client.to_dict(c.call(P + "GetRun", {"id": r["id"]}, metadata=md)), events


class Suite:
    def __init__(self, kpld, tmp):
        self.kpld_bin = kpld
        self.tmp = tmp
        self.token_file = os.path.join(tmp, "admin.token")
        # kpld's user also uses kplctl, whose config holds a token.
        home = os.path.join(tmp, "home")
        os.makedirs(os.path.join(home, ".config", "kpl"))
        with open(os.path.join(home, ".config", "kpl", "config"), "w") as f:
            f.write("token = kpl_0123456789abcdef\n")
        os.environ["HOME"] = home
        self.d = Kpld(kpld, tmp, "main", "--bootstrap-token-file", self.token_file).start()
        self.daemon = self.d  # run_suite prints its log on failure
        self.data = os.path.join(self.d.dir, "data")
        self.admin = open(self.token_file).read().strip()
        self.c = self.d.client()
        self.others = []

    def md(self, token=None):
        return [("authorization", "Bearer " + (token or self.admin))]

    def close(self):
        self.c.close()
        self.d.stop()
        for d in self.others:
            d.stop()

    # -- tests ----------------------------------------------------------

    def test_stage_cannot_reach_the_data_dir(self):
        resp = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": SCOPE_ENUM["submit"], "pipeline": "probe", "description": "ci"},
            metadata=self.md()))
        ci = resp["token"]
        victim, _ = run(self.c, VICTIM, {}, self.md())
        assert_eq(victim["state"], "RUN_STATE_SUCCEEDED", "the victim run")
        other = victim["id"]
        secret_file = os.path.join(self.data, "work", other, "secret.txt")
        assert_eq(open(secret_file).read(), "victim-secret\n", "the victim's file")
        key = os.path.join(self.data, "secret.key")
        before = digest(key)
        names_before = sorted(os.listdir(self.data))

        got, events = run(self.c, PROBE, {"data": self.data, "other": other,
                                          "token_file": self.token_file,
                                          "kpld_pid": str(self.d.proc.pid)}, self.md(ci))
        lines = logs(events, "attack")
        escaped = [l for l in lines if l.startswith("ESCAPED")]
        if escaped:
            raise AssertionError("the stage reached what it must not: %r" % escaped)
        blocked = [l for l in lines if l.startswith("blocked")]
        assert_eq(len(blocked), 14, "tries that were blocked (%r)" % lines)
        assert_eq(lines[-1], "done", "the script ran to its end")
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "the probe run (%r)" % got.get("message"))
        # Its own workspace works: a file for the next stage, outputs, /tmp.
        assert_eq(logs(events, "next"), ["mine", "tmp=t"], "the next stage's view")
        attack = [s for s in got["stages"] if s["name"] == "attack"][0]
        assert_eq(attack.get("outputs", {}).get("note"), "from-the-sandbox", "$KPL_OUTPUTS")
        # Nothing changed where it tried.
        assert_eq(digest(key), before, "secret.key")
        assert_eq(sorted(os.listdir(self.data)), names_before, "the data directory's files")
        assert_eq(os.path.exists(os.path.join(self.data, "work", "evil")), False,
                  "a file written into DATA/work")
        assert_eq(os.path.exists(os.path.join(self.data, "work", got["id"], "copy.mdb")),
                  False, "a copy of data.mdb")
        assert_eq(open(secret_file).read(), "victim-secret\n", "the victim's file after")
        assert_eq(os.path.exists("/etc/kpl-evil"), False, "a file written into /etc")

    def test_dockerfile_run_stays_in_the_sandbox(self):
        got, events = run(self.c, BUILD, {"data": self.data}, self.md())
        lines = [l for l in logs(events, "image") if ": blocked" in l or ": ESCAPED" in l]
        assert_eq(lines, ["in the chroot: blocked", "out of the chroot: blocked",
                          "out of the chroot, data.mdb: blocked"],
                  "the RUN line's tries (run %s: %r)" % (got["state"], got.get("message")))
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "the build (%r)" % got.get("message"))

    def test_symlinks_do_not_make_kpld_read_for_the_stage(self):
        target = os.path.join(self.data, "probe-secret")
        with open(target, "w") as f:
            f.write("leak=the-hidden-value\n")
        got, events = run(self.c, SYMLINK, {"target": target},
                          self.md())
        assert_eq(logs(events, "s"), ["linked"], "the script ran")
        outs = got["stages"][0].get("outputs", {})
        assert_eq(outs, {}, "outputs read through a symlink to a hidden file")
        if any("the-hidden-value" in json.dumps(e) for e in events):
            raise AssertionError("the hidden file's text is in the run's events")

    def test_planted_attempt_dir_symlink_is_not_followed(self):
        victim = os.path.join(self.tmp, "victim")
        os.mkdir(victim)
        # kpld deletes the runs' raw output files once a run is final.
        with open(os.path.join(victim, "output"), "w") as f:
            f.write("keep me\n")
        got, events = run(self.c, PLANT, {"victim": victim}, self.md())
        assert_eq(logs(events, "a"), ["planted"], "stage a")
        b = [s for s in got["stages"] if s["name"] == "b"][0]
        assert_eq(b["state"], "STAGE_STATE_FAILED", "stage b (%r)" % b.get("message"))
        if "symlink" not in b.get("message", ""):
            raise AssertionError("stage b's message does not say why: %r" % b.get("message"))
        assert_eq(os.listdir(victim), ["output"], "files written or deleted through the symlink")

    def _marker_run(self, name, *flags):
        d = Kpld(self.kpld_bin, self.tmp, name, *flags).start()
        self.others.append(d)
        c = d.client()
        marker = os.path.join(self.tmp, name + ".ran")
        got, events = run(c, MARKER, {"marker": marker})
        c.close()
        return d, got, marker

    def test_missing_bwrap_fails_the_stage(self):
        missing = os.path.join(self.tmp, "no-such-dir", "bwrap")
        d, got, marker = self._marker_run("nobwrap", "--sandbox-bwrap", missing)
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        msg = got["stages"][0].get("message", "")
        for want in ("stage isolation: cannot run " + missing, "No such file or directory",
                     "--sandbox none"):
            if want not in msg:
                raise AssertionError("stage message %r lacks %r" % (msg, want))
        assert_eq(os.path.exists(marker), False, "the command ran unconfined")
        if "stage isolation: cannot run " + missing not in d.log_text():
            raise AssertionError("kpld did not warn at start about the missing bwrap")

    def test_failing_sandbox_fails_the_stage(self):
        # A bwrap that cannot set up namespaces says so and exits 1.
        fake = os.path.join(self.tmp, "fake-bwrap")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'bwrap: Creating new namespace failed: "
                    "Operation not permitted' >&2\nexit 1\n")
        os.chmod(fake, stat.S_IRWXU)
        d, got, marker = self._marker_run("badbwrap", "--sandbox-bwrap", fake)
        assert_eq(got["state"], "RUN_STATE_FAILED", "run state")
        msg = got["stages"][0].get("message", "")
        for want in ("stage isolation:", fake, "did not start the sandbox",
                     "bwrap: Creating new namespace failed"):
            if want not in msg:
                raise AssertionError("stage message %r lacks %r" % (msg, want))
        assert_eq(os.path.exists(marker), False, "the command ran unconfined")

    def test_sandbox_none_is_explicit_and_logged(self):
        d, got, marker = self._marker_run("none", "--sandbox", "none")
        assert_eq(got["state"], "RUN_STATE_SUCCEEDED", "run state")
        assert_eq(open(marker).read(), "ran\n", "the command ran, unconfined")
        if "--sandbox none: stage commands run as kpld's user, unconfined" not in d.log_text():
            raise AssertionError("kpld did not log the unconfined choice")


def main():
    kpld = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-iso-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(kpld, tmp))


if __name__ == "__main__":
    sys.exit(main())
