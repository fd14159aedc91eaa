"""kpld itself under valgrind memcheck, through e2e_test's flows: submit
and watch, templates, refusals, idempotency, errors, cancel, failure,
resumed watches, ListRuns, restarts (SIGTERM mid-stage and re-attach).

    /usr/bin/python3 tests/e2e/valgrind_test.py PATH/TO/kpld

kpld runs as `valgrind --leak-check=full --errors-for-leak-kinds=definite
--error-exitcode=99 kpld ...` (its commands' shims run natively: valgrind
does not follow children), so every stop with SIGTERM that e2e_test checks
for exit status 0 also says no invalid access and no definite leak; each
kpld's valgrind log must end up empty of errors as well. The kill -9 test
is left out (a killed process has no leak check) and so is the timeout
test (its deadlines are for a native kpld).
"""

import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_test  # noqa: E402

SKIP = {"test_kill9_mid_stage_reattaches", "test_timeout_fails_stage"}


def main():
    kpld = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-valgrind-", dir=os.environ.get("TEST_TMPDIR"))
    wrapper = os.path.join(tmp, "kpld-valgrind")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec valgrind --quiet --leak-check=full "
                "--errors-for-leak-kinds=definite --show-leak-kinds=definite "
                "--error-exitcode=99 --log-file=%s/valgrind.%%p.log %s \"$@\"\n"
                % (tmp, kpld))
    os.chmod(wrapper, 0o755)
    tests = type("ValgrindSuite", (), {
        n: f for n, f in e2e_test.Suite.__dict__.items()
        if n.startswith("test_") and n not in SKIP})
    suite = e2e_test.Suite(wrapper, tmp)
    rc = e2e_test.run_suite(tests, suite)
    logs = sorted(glob.glob(os.path.join(tmp, "valgrind.*.log")))
    if not logs:
        print("FAIL: no valgrind log: kpld did not run under valgrind")
        return 1
    for path in logs:
        text = open(path).read()
        if re.search(r"(Invalid|uninitialised|definitely lost|ERROR SUMMARY: [1-9])", text):
            print("FAIL: valgrind found errors (%s):\n%s" % (path, text[-12000:]))
            rc = 1
    print("%d valgrind logs (kpld processes and their forks before exec), no errors" % len(logs))
    return rc


if __name__ == "__main__":
    sys.exit(main())
