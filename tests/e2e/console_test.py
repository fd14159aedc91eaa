"""The web console (clients/web, served by kpld at /) in Debian's headless
chromium, end to end.

    /usr/bin/python3 tests/e2e/console_test.py PATH/TO/kpld

The assets are served with a strict Content-Security-Policy and the other
security headers, by ETag; the page loads with no script error and no CSP
violation, and a token signs in. Waiting is done with WebDriverWait
conditions on the page's state, never with sleeps.
"""

import http.client
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import browser  # noqa: E402
from e2e_test import Daemon, assert_eq, run_suite  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
WAIT = 60  # a bound on failure, not a synchronization


def fetch(addr, method, path, headers=None):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


class Suite:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             ["--http-listen", "127.0.0.1:0"])
        self.c = self.daemon.start()
        self.http = self.daemon.http
        self.base = "http://%s" % self.http
        self.drv = browser.start(tmp)

    def assert_security_headers(self, hd, what):
        assert_eq(hd.get("content-security-policy"), CSP, what + ": Content-Security-Policy")
        assert_eq(hd.get("x-content-type-options"), "nosniff", what + ": X-Content-Type-Options")
        assert_eq(hd.get("referrer-policy"), "no-referrer", what + ": Referrer-Policy")

    # -- tests ----------------------------------------------------------

    def test_assets_and_headers(self):
        st, hd, body = fetch(self.http, "GET", "/")
        assert_eq(st, 200, "GET /")
        assert_eq(hd.get("content-type"), "text/html; charset=utf-8", "/ type")
        self.assert_security_headers(hd, "/")
        assert b'<script type="module" src="/assets/app.js">' in body, body[:300]
        # No inline script or style in the page: the CSP would block it.
        low = body.lower()
        assert b"<script>" not in low and b"<style" not in low and b" style=" not in low, body
        etag = hd.get("etag")
        assert etag and len(etag) == 66 and etag[0] == '"' == etag[-1], etag
        st, hd2, body2 = fetch(self.http, "GET", "/", {"If-None-Match": etag})
        assert_eq((st, body2), (304, b""), "GET / with its ETag")
        assert_eq(hd2.get("etag"), etag, "ETag of the 304")
        st, _, _ = fetch(self.http, "GET", "/", {"If-None-Match": '"0000"'})
        assert_eq(st, 200, "GET / with another ETag")
        for path, ctype in (("/assets/app.js", "text/javascript; charset=utf-8"),
                            ("/assets/api.js", "text/javascript; charset=utf-8"),
                            ("/assets/style.css", "text/css; charset=utf-8")):
            st, hd, body = fetch(self.http, "GET", path)
            assert_eq((st, hd.get("content-type")), (200, ctype), path)
            self.assert_security_headers(hd, path)
            assert body, path
        st, hd, _ = fetch(self.http, "GET", "/assets/nope.js")
        assert_eq(st, 404, "an asset that is not there")
        self.assert_security_headers(hd, "404")
        st, _, _ = fetch(self.http, "GET", "/assets/../engine/kpld.c")
        assert st in (400, 404), st
        st, _, _ = fetch(self.http, "POST", "/")
        assert_eq(st, 405, "POST /")

    def test_page_loads_in_chromium(self):
        drv = self.drv
        drv.get(self.base + "/")
        form = WebDriverWait(drv, WAIT).until(
            EC.visibility_of_element_located((By.ID, "signin")))
        assert "Sign in" in form.text, form.text
        # The module scripts ran (they drew the form) with no error and no
        # CSP violation in the browser's console.
        errs = browser.console_errors(drv)
        assert not errs, errs

    def close(self):
        self.drv.quit()
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld's exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="kpl-console-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp))


if __name__ == "__main__":
    sys.exit(main())
