"""kpld's HTTP API under valgrind memcheck: http_api_test's flows (unary
routes, errors, SSE with resume, heartbeats, the stream cap, TLS) against
`valgrind --leak-check=full --error-exitcode=99 kpld`, so every clean stop
those tests check also says no invalid access and no definite leak in the
HTTP transport, proto3 JSON or TLS code; every valgrind log must be free of
errors too. The slow-reader test is left out (80000 events are slow under
valgrind; its bound does not depend on the build).

    /usr/bin/python3 tests/e2e/http_api_valgrind_test.py PATH/TO/kpld DOCS_ROOT
"""

import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_test  # noqa: E402
import http_api_test  # noqa: E402

SKIP = {"test_slow_reader_holds_kpld_back"}


def main():
    kpld = os.path.abspath(sys.argv[1])
    root = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else "."
    tmp = tempfile.mkdtemp(prefix="kpl-http-valgrind-", dir=os.environ.get("TEST_TMPDIR"))
    wrapper = os.path.join(tmp, "kpld-valgrind")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec valgrind --quiet --leak-check=full "
                "--errors-for-leak-kinds=definite --show-leak-kinds=definite "
                "--error-exitcode=99 --log-file=%s/valgrind.%%p.log %s \"$@\"\n"
                % (tmp, kpld))
    os.chmod(wrapper, 0o755)
    tests = type("ValgrindSuite", (), {
        n: f for n, f in http_api_test.Suite.__dict__.items()
        if n.startswith("test_") and n not in SKIP})
    rc = e2e_test.run_suite(tests, http_api_test.Suite(wrapper, root, tmp))
    logs = sorted(glob.glob(os.path.join(tmp, "valgrind.*.log")))
    if not logs:
        print("FAIL: no valgrind log: kpld did not run under valgrind")
        return 1
    for path in logs:
        text = open(path).read()
        if re.search(r"(Invalid|uninitialised|definitely lost|ERROR SUMMARY: [1-9])", text):
            print("FAIL: valgrind found errors (%s):\n%s" % (path, text[-12000:]))
            rc = 1
    print("%d valgrind logs, no errors" % len(logs))
    return rc


if __name__ == "__main__":
    sys.exit(main())
