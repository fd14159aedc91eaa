"""Redaction and log text end to end (docs/security.md, "Secrets"): a PEM
key printed line by line, a secret across the 8 KiB cut of a long line, a
secret in a stage output (GetRun shows ***), and a command printing bytes
that are not UTF-8 and a long line of multi-byte characters: every event
still parses in Python grpc (strict about protobuf strings).

    /usr/bin/python3 tests/e2e/redact_test.py PATH/TO/kpld
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import P, Client, Daemon, assert_eq, run_suite, submit, watch  # noqa: E402

PEM = ("-----BEGIN PRIVATE KEY-----\n"
       "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
       "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
       "-----END PRIVATE KEY-----\n")
TOKEN = "tok-Split-Me-9f2Q"


def logs(events, stage_name=None):
    return [e.get("message", "") for e in events if e.get("kind") == "EVENT_KIND_LOG"
            and (stage_name is None or e.get("stage") == stage_name)]


def leaks(text, secret, k=5):
    """The pieces of secret (k bytes or more) found in text."""
    return sorted({secret[i:i + k] for i in range(len(secret) - k + 1)
                   if secret[i:i + k] in text})


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.daemon = Daemon(binary, os.path.join(tmp, "data"))
        self.c = self.daemon.start()
        self.c.call(P + "SetSecret", {"name": "TLS_KEY", "value": PEM})
        self.c.call(P + "SetSecret", {"name": "TOKEN", "value": TOKEN})

    def run_to_end(self, text):
        run = Client.to_dict(submit(self.c, text))
        events = watch(self.c, run["id"])
        return Client.to_dict(self.c.call(P + "GetRun", {"id": run["id"]})), events

    # -- tests ----------------------------------------------------------

    def test_pem_key_line_by_line(self):
        run, events = self.run_to_end("""
name: pem
stages:
  - name: show
    kind: script
    env: { KEY: "${{ secrets.TLS_KEY }}" }
    with: { shell: 'printf "%s" "$KEY"; printf "%s" "$KEY" | sed "s/^/  /" >&2' }
""")
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        out = logs(events, "show")
        assert_eq(out, ["***"] * 4 + ["  ***"] * 4, "the key's lines in the log")

    def test_secret_across_the_8k_cut(self):
        # The shim cuts a line at 8192 bytes: the secret straddles the cut.
        run, events = self.run_to_end("""
name: split
stages:
  - name: long
    kind: script
    env: { TOK: "${{ secrets.TOKEN }}" }
    with: { shell: 'head -c 8185 /dev/zero | tr "\\\\0" x; printf "%s" "$TOK"; head -c 300 /dev/zero | tr "\\\\0" y; echo' }
""")
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        out = logs(events, "long")
        text = "".join(out)
        if len(out) < 2:
            raise AssertionError("the line was not cut: %d events" % len(out))
        assert_eq(leaks("\n".join(out), TOKEN), [], "pieces of the secret in the events")
        if "***" not in text or not text.startswith("x" * 8000) or not text.endswith("y" * 290):
            raise AssertionError("the line around the secret was lost: %r...%r"
                                 % (text[:40], text[-40:]))

    def test_outputs_redacted(self):
        run, events = self.run_to_end("""
name: outs
stages:
  - name: make
    kind: script
    env: { TOK: "${{ secrets.TOKEN }}", KEY: "${{ secrets.TLS_KEY }}" }
    with:
      shell: |
        echo "token=$TOK" >> "$KPL_OUTPUTS"
        echo "url=https://u:$TOK@example.com/x" >> "$KPL_OUTPUTS"
        echo "keyline=$(printf '%s' "$KEY" | sed -n 2p)" >> "$KPL_OUTPUTS"
        echo "plain=hello" >> "$KPL_OUTPUTS"
        printf 'bad\\377key=caf\\303\\251\\376\\n' >> "$KPL_OUTPUTS"
  - name: use
    kind: script
    needs: [make]
    with: { command: ["echo", "${{ stages.make.outputs.url }}"] }
""")
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        outs = [s for s in run["stages"] if s["name"] == "make"][0]["outputs"]
        assert_eq(outs, {"token": "***", "url": "https://u:***@example.com/x",
                         "keyline": "***", "plain": "hello",
                         "bad\ufffdkey": "caf\u00e9\ufffd"}, "GetRun's outputs")
        assert_eq(logs(events, "use"), ["https://u:***@example.com/x"], "the output used")

    def test_bad_utf8_and_long_multibyte_line(self):
        # \xff\xfe is no UTF-8; 5000 euro signs (15000 bytes) are cut by the
        # shim at 8 KiB, which is not a multiple of 3.
        run, events = self.run_to_end("""
name: utf8
stages:
  - name: print
    kind: script
    with:
      shell: |
        printf '\\377\\376 bad\\n'
        python3 -c 'print("\\u20ac" * 5000)'
        printf 'caf\\303\\251 ok\\n'
""")
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run state")
        out = logs(events, "print")
        assert_eq(out[0], "\ufffd\ufffd bad", "bytes that are not UTF-8")
        assert_eq(out[-1], "caf\u00e9 ok", "valid UTF-8 kept")
        middle = out[1:-1]
        if len(middle) < 2:
            raise AssertionError("the long line was not cut: %d events" % len(middle))
        assert_eq("".join(middle), "\u20ac" * 5000, "the long line, cut between characters")
        for m in middle:
            if len(m.encode()) > 8192:
                raise AssertionError("an event of %d bytes" % len(m.encode()))

    def close(self):
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld exit status on SIGTERM")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-redact-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
