"""The web console (clients/web, served by kpld at /) in Debian's headless
chromium, end to end.

    /usr/bin/python3 tests/e2e/console_test.py PATH/TO/kpld [PATH/TO/kplctl
        PATH/TO/kube_emulator.py release.kpl.yaml build-and-push.kpl.yaml]

The assets are served with a strict Content-Security-Policy and the other
security headers, by ETag; the page loads with no script error and no CSP
violation. Signed in with a token, the console lists runs live, approves
and rejects a waiting stage, cancels a run and retries a failed one from
the page (each confirmed, the server's answer shown, the result checked
through gRPC), renders hostile log text as text, draws 100,000 log lines
with a few hundred rows in the page, and hides what a read token may not
do. With the release stack (tests/e2e/release/stack.py) it watches the
release example live (nodes turn green in the order of needs, log lines
arrive, the canary's charts fill) and rolls a release back from the page.

KPL_CONSOLE_SCREENSHOTS=DIR writes the run page's and the canary charts'
screenshots there (docs/img/ in the repository; CI leaves it unset).
Waiting is done with WebDriverWait conditions on the page's state, never
with sleeps.
"""

import http.client
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import browser  # noqa: E402
from e2e_test import Daemon, assert_eq, run_suite  # noqa: E402
from kplgrpc import Client  # noqa: E402
from selenium.common.exceptions import (NoAlertPresentException,  # noqa: E402
                                        StaleElementReferenceException)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
WAIT = 60  # a bound on failure, not a synchronization
P = "kpl.v1.Pipelines/"
S = "kpl.v1.Security/"

GATED = """
name: gated
stages:
  - { name: build, kind: script, with: { command: ["echo", "built"] } }
  - name: ok
    kind: approval
    needs: [build]
    timeout: 10m
    with: { message: "ship it?" }
  - { name: ship, kind: script, needs: [ok], with: { command: ["echo", "shipped"] } }
"""

SLOW = """
name: slow
stages:
  - name: wait
    kind: script
    with: { shell: "echo waiting; sleep 600" }
  - { name: after, kind: script, needs: [wait], with: { command: ["true"] } }
"""

# Fails until the file FLAG exists (the test makes it), then succeeds.
FLAKY = """
name: flaky
stages:
  - { name: first, kind: script, with: { command: ["echo", "first"] } }
  - name: second
    kind: script
    needs: [first]
    with: { shell: "test -e %s && echo fixed || { echo 'not yet' >&2; exit 3; }" }
"""

HOSTILE = r"""
name: hostile
stages:
  - name: say
    kind: script
    with:
      shell: |
        echo '<img src=x onerror=alert(1)>'
        echo '<script>alert(2)</script>'
        printf '\033[31mred\033[0m plain \033[1;32mbold green\033[0m\n'
        echo 'to stderr' >&2
"""

# Two verify stages against kpld's own listener: /healthz passes, a missing
# asset fails (404, expect 200).
VERIFY = """
name: checked
stages:
  - name: good
    kind: verify
    with:
      interval: 250ms
      count: 2
      failure_limit: 0
      http: { url: "http://%(http)s/healthz" }
  - name: bad
    kind: verify
    with:
      interval: 250ms
      count: 2
      failure_limit: 0
      http: { url: "http://%(http)s/assets/missing.js" }
"""

MANY = """
name: many
stages:
  - name: lines
    kind: script
    with: { shell: "seq 1 100000 | sed 's/^/line /'" }
"""


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
    def __init__(self, binary, tmp, release=None):
        self.tmp = tmp
        self.shared = os.path.join(tmp, "shared")
        os.mkdir(self.shared)
        token_file = os.path.join(tmp, "admin.token")
        self.daemon = Daemon(binary, os.path.join(tmp, "data"),
                             ["--http-listen", "127.0.0.1:0", "--bootstrap-token-file", token_file,
                              "--sandbox-bind", self.shared])
        self.daemon.start().close()
        self.admin = open(token_file).read().strip()
        self.c = Client.connect(self.daemon.addr, token=self.admin)
        self.http = self.daemon.http
        self.base = "http://%s" % self.http
        self.release = release  # (kplctl, emulator, release.yaml, seed.yaml) or None
        self.shots = os.environ.get("KPL_CONSOLE_SCREENSHOTS")
        self.drv = browser.start(tmp)

    # -- helpers --------------------------------------------------------

    def assert_security_headers(self, hd, what):
        assert_eq(hd.get("content-security-policy"), CSP, what + ": Content-Security-Policy")
        assert_eq(hd.get("x-content-type-options"), "nosniff", what + ": X-Content-Type-Options")
        assert_eq(hd.get("referrer-policy"), "no-referrer", what + ": Referrer-Policy")

    def wait(self, cond, timeout=WAIT):
        # The page redraws parts of itself as events come: an element found
        # a moment ago may be gone; the condition is then asked again.
        return WebDriverWait(self.drv, timeout, ignored_exceptions=(
            StaleElementReferenceException,)).until(cond)

    def css(self, sel, timeout=WAIT):
        """The element sel names, once it is visible."""
        return self.wait(EC.visibility_of_element_located((By.CSS_SELECTOR, sel)), timeout)

    def js(self, script, *args):
        return self.drv.execute_script(script, *args)

    def sign_in(self, token, base=None):
        drv = self.drv
        drv.get((base or self.base) + "/")
        self.js("sessionStorage.clear()")
        drv.get((base or self.base) + "/#/runs")
        drv.refresh()
        field = self.css("#token")
        field.send_keys(token)
        field.send_keys(Keys.ENTER)
        self.css("#signout")

    def open(self, frag, base=None):
        """A page of the console, by its fragment, without signing in again
        (the token is in the tab's sessionStorage); the same URL again is
        reloaded."""
        url = (base or self.base) + "/#" + frag
        same = self.drv.current_url == url
        self.drv.get(url)
        if same:
            self.drv.refresh()

    def confirm(self, comment=None):
        """Answers the confirmation dialog an action opened."""
        self.css("dialog#confirm")
        if comment is not None:
            self.css("#confirm-comment").send_keys(comment)
        self.css("#confirm-ok").click()
        self.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, "dialog#confirm"))

    def node_state(self, stage):
        return self.js("const n = document.querySelector('#dag .node[data-stage=\"' + arguments[0] + '\"]');"
                       "return n ? n.dataset.state : null;", stage)

    def wait_node(self, stage, state, timeout=WAIT):
        self.wait(lambda d: self.node_state(stage) == state, timeout)

    def run_state(self):
        return self.js("const e = document.getElementById('run-state'); return e ? e.dataset.state : null;")

    def submit(self, text, client=None):
        run = (client or self.c).call(P + "SubmitRun", {"pipeline": text, "params": {},
                                                        "idempotency_key": ""})
        return Client.to_dict(run)["id"]

    def get_run(self, run_id, client=None):
        return Client.to_dict((client or self.c).call(P + "GetRun", {"id": run_id}))

    def no_alert(self):
        try:
            text = self.drv.switch_to.alert.text
        except NoAlertPresentException:
            return
        raise AssertionError("an alert opened: %r" % text)

    def screenshot(self, name, el=None):
        if not self.shots:
            return
        os.makedirs(self.shots, exist_ok=True)
        path = os.path.join(self.shots, name)
        if el is not None:
            el.screenshot(path)
        else:
            self.drv.save_screenshot(path)
        print("screenshot %s" % path, flush=True)

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
        st, hd, body = fetch(self.http, "GET", "/assets/style.css")
        assert_eq((st, hd.get("content-type")), (200, "text/css; charset=utf-8"), "style.css")
        self.assert_security_headers(hd, "style.css")
        # Every module app.js imports, and theirs: served as JavaScript, and
        # none writes into the page as HTML.
        todo, seen = ["app.js"], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            path = "/assets/" + name
            st, hd, body = fetch(self.http, "GET", path)
            assert_eq((st, hd.get("content-type")), (200, "text/javascript; charset=utf-8"), path)
            self.assert_security_headers(hd, path)
            for bad in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write",
                        b"eval(", b"new Function"):
                assert bad not in body, "%s uses %s" % (path, bad.decode())
            todo += re.findall(r'from "\./([a-z]+\.js)"', body.decode())
        assert len(seen) >= 10, seen
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
        form = self.css("#signin")
        assert "Sign in" in form.text, form.text
        # The module scripts ran (they drew the form) with no error and no
        # CSP violation in the browser's console.
        errs = browser.console_errors(drv)
        assert not errs, errs

    def test_wrong_token_is_refused(self):
        self.drv.get(self.base + "/")
        self.js("sessionStorage.clear()")
        self.drv.refresh()
        field = self.css("#token")
        field.send_keys("kpl_not-a-token")
        field.send_keys(Keys.ENTER)
        self.wait(lambda d: "refused" in d.find_element(By.ID, "signin-error").text)
        assert_eq(self.js("return sessionStorage.getItem('kpl.token')"), None, "token kept")
        # No cookie, ever.
        assert_eq(self.drv.get_cookies(), [], "cookies")

    def test_runs_list_is_live(self):
        self.sign_in(self.admin)
        self.css("#runs-live")
        self.wait(lambda d: "live" in d.find_element(By.ID, "runs-live").text
                  and "not" not in d.find_element(By.ID, "runs-live").text)
        run_id = self.submit(GATED)
        # The new run appears without a reload, and goes on to wait.
        row = "#runs-body tr[data-run='%s']" % run_id
        self.css(row)
        self.wait(lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state")
                  == "running")
        badge = self.drv.find_element(By.CSS_SELECTOR, row + " .badge")
        assert "running" in badge.text, badge.text  # in words, not only colour
        assert badge.find_elements(By.CSS_SELECTOR, "svg .glyph-ring"), "no state glyph"
        self.gated = run_id
        # Filter by state and pipeline; search by id.
        self.open("/runs?state=succeeded")
        self.css("#runs-info")
        self.wait(lambda d: "loading" not in d.find_element(By.ID, "runs-info").text)
        assert not self.drv.find_elements(By.CSS_SELECTOR, row), "a running run under succeeded"
        self.open("/runs?pipeline=gated")
        self.css(row)
        self.open("/runs")
        f = self.css("#f-id")
        f.send_keys(run_id)
        f.send_keys(Keys.ENTER)
        self.wait(lambda d: d.current_url.endswith("#/runs/" + run_id))

    def test_approve_from_the_page(self):
        run_id = self.gated
        self.open("/runs/" + run_id)
        self.css("#dag .node[data-stage='ok']")
        self.wait_node("ok", "waiting")
        # The waiting node says so in words and by shape.
        label = self.js("return document.querySelector('#dag .node[data-stage=\"ok\"]')"
                        ".getAttribute('aria-label')")
        assert "waiting" in label, label
        self.css("#approve-ok").click()
        self.confirm("looks good from the console")
        answer = self.css("#answer.ok")
        assert "ok is succeeded" in answer.text, answer.text
        self.wait_node("ship", "succeeded")
        self.wait(lambda d: self.run_state() == "succeeded")
        run = self.get_run(run_id)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run after approval")
        # Who did it is on the page, as the audit entry says, and the
        # comment is the stage's message.
        self.wait(lambda d: "approved stage ok" in d.find_element(By.ID, "run-audit").text)
        self.drv.find_element(By.CSS_SELECTOR, "#dag .node[data-stage='ok']").click()
        self.wait(lambda d: "looks good from the console" in
                  d.find_element(By.ID, "stage-message").text)

    def test_reject_from_the_page(self):
        run_id = self.submit(GATED)
        self.open("/runs/" + run_id)
        self.wait_node("ok", "waiting")
        self.css("#reject-ok").click()
        # Cancelling the dialog does nothing.
        self.css("#confirm-cancel").click()
        self.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, "dialog#confirm"))
        assert_eq(self.get_run(run_id)["state"], "RUN_STATE_RUNNING", "after a cancelled dialog")
        self.css("#reject-ok").click()
        self.confirm("not today")
        self.wait_node("ok", "failed")
        self.wait(lambda d: self.run_state() == "failed")
        assert_eq(self.node_state("ship"), "skipped", "ship after a rejection")

    def test_a_refusal_is_shown(self):
        run_id = self.submit(GATED)
        self.open("/runs/" + run_id)
        self.wait_node("ok", "waiting")
        self.css("#approve-ok").click()
        self.css("dialog#confirm")
        # Someone else answers first, while the dialog is open.
        self.c.call(P + "ApproveStage", {"run_id": run_id, "stage": "ok", "approve": True,
                                         "comment": "elsewhere"})
        self.css("#confirm-ok").click()
        answer = self.css("#answer.error")
        # ("stage ok is SUCCEEDED, not waiting for approval", or once the
        # run is over "run ... has ended; nothing waits for approval")
        assert "refused" in answer.text and "for approval" in answer.text, answer.text
        assert "400" in answer.text, answer.text  # FAILED_PRECONDITION's HTTP status
        self.wait(lambda d: self.run_state() == "succeeded")

    def test_cancel_from_the_page(self):
        run_id = self.submit(SLOW)
        self.open("/runs/" + run_id)
        self.wait_node("wait", "running")
        self.css("#btn-cancel").click()
        self.confirm()
        answer = self.css("#answer.ok")
        assert "Cancel" in answer.text, answer.text
        self.wait(lambda d: self.run_state() == "cancelled")
        assert_eq(self.get_run(run_id)["state"], "RUN_STATE_CANCELLED", "run after cancel")
        self.wait_node("wait", "cancelled")

    def test_retry_a_failed_run(self):
        flag = os.path.join(self.shared, "fixed")
        run_id = self.submit(FLAKY % flag)
        self.open("/runs/" + run_id)
        self.wait(lambda d: self.run_state() == "failed")
        assert_eq(self.node_state("second"), "failed", "second")
        self.css("#btn-retry")
        open(flag, "w").close()
        self.css("#btn-retry").click()
        self.confirm()
        self.css("#answer.ok")
        self.wait(lambda d: self.run_state() == "succeeded")
        self.wait_node("second", "succeeded")
        run = self.get_run(run_id)
        assert_eq(run["state"], "RUN_STATE_SUCCEEDED", "run after retry")
        assert_eq(self.node_state("first"), "succeeded", "first kept")

    def test_log_text_is_text(self):
        browser.console_errors(self.drv)  # what earlier tests left (a 401 on purpose)
        run_id = self.submit(HOSTILE)
        self.open("/runs/%s/say" % run_id)
        self.wait(lambda d: self.run_state() == "succeeded")
        self.wait(lambda d: "<script>alert(2)</script>" in d.find_element(By.ID, "log").text)
        text = self.css("#log").text
        assert "<img src=x onerror=alert(1)>" in text, text
        # Rendered as text: no element was made of it, no script ran.
        assert_eq(self.js("return document.querySelectorAll('#log img, #log script').length"), 0,
                  "elements made from log text")
        assert_eq(self.js("return document.images.length"), 0, "images in the page")
        self.no_alert()
        # ANSI colours become classes, the escape bytes are gone.
        red = self.css("#log .ansi-fg-1")
        assert_eq(red.text, "red", "the red span")
        bold = self.css("#log .ansi-fg-2.ansi-b")
        assert_eq(bold.text, "bold green", "the bold green span")
        assert "\x1b" not in text and "[31m" not in text, text
        # stderr is told apart (class and marker).
        err = self.css("#log .line.s-err")
        assert "to stderr" in err.text and err.get_attribute("data-stream") == "err", err.text
        # A line link names the line, and opening it marks that line.
        link = self.css("#log .line[data-n='2'] a.ln")
        href = link.get_attribute("href")
        assert href.endswith("#/runs/%s/say/L2" % run_id), href
        self.open("/runs/%s/say/L3" % run_id)
        marked = self.css("#log .line.marked")
        assert_eq(marked.get_attribute("data-n"), "3", "the marked line")
        errs = browser.console_errors(self.drv)
        assert not errs, errs

    def test_verify_rounds_marked(self):
        run_id = self.submit(VERIFY % {"http": self.http})
        self.open("/runs/" + run_id)
        self.wait(lambda d: self.run_state() == "failed")
        marks = lambda stage: self.js(  # noqa: E731
            "return [...document.querySelectorAll('#canary section.canary[data-stage=\"' +"
            " arguments[0] + '\"] .chart.rounds .mark')].map((m) => m.dataset.verdict)", stage)
        self.wait(lambda d: marks("good") == ["pass", "pass"] and marks("bad") == ["fail"])
        # Told by shape too: a filled circle for a pass, a cross for a fail.
        assert self.drv.find_elements(By.CSS_SELECTOR,
                                      "section.canary[data-stage='good'] .mark.v-pass circle")
        assert self.drv.find_elements(By.CSS_SELECTOR,
                                      "section.canary[data-stage='bad'] .mark.v-fail path")
        bad = self.css("section.canary[data-stage='bad'] .verify-table").text
        assert "404" in bad and "expect 200" in bad and "fail" in bad, bad

    def test_100000_lines(self):
        run_id = self.submit(MANY)
        self.open("/runs/%s/lines" % run_id)
        self.wait(lambda d: d.find_element(By.ID, "log-count").text == "100000 lines", 300)
        # Only the rows in view exist in the page, whatever the log's size.
        rows = self.js("return document.querySelectorAll('#log .line').length")
        assert 0 < rows < 300, rows
        # Following: the last line is in view.
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .line[data-n='100000']"))
        # Search jumps to a match far up.
        q = self.css("#log-search")
        q.send_keys("line 1234")
        q.send_keys(Keys.ENTER)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .line.hit"))
        hit = self.drv.find_element(By.CSS_SELECTOR, "#log .line.hit")
        assert "line 1234" in hit.text, hit.text
        assert "of 11" in self.css("#log-hits").text  # 1234, 12340-12349
        assert_eq(self.css("#log-follow").text, "Follow", "search pauses following")

    def test_read_token_sees_no_buttons(self):
        tok = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_READ", "description": "console read"}))["token"]
        run_id = self.submit(SLOW)
        self.sign_in(tok)
        nav = self.css("#nav").text
        assert "Runs" in nav and "Tokens" not in nav and "Secrets" not in nav, nav
        self.open("/runs/" + run_id)
        self.wait_node("wait", "running")
        assert not self.drv.find_elements(By.ID, "btn-cancel"), "a read token sees Cancel"
        self.c.call(P + "CancelRun", {"id": run_id})
        self.wait(lambda d: self.run_state() == "cancelled")
        assert not self.drv.find_elements(By.ID, "btn-retry"), "a read token sees Retry"
        self.sign_in(self.admin)
        nav = self.css("#nav").text
        assert "Tokens" in nav and "Audit" in nav, nav

    def test_token_limited_to_one_pipeline(self):
        tok = Client.to_dict(self.c.call(S + "CreateToken", {
            "scope": "TOKEN_SCOPE_SUBMIT", "pipeline": "slow",
            "description": "console slow only"}))["token"]
        mine, other = self.submit(SLOW), self.submit(GATED)
        self.sign_in(tok)
        nav = self.css("#nav").text
        assert "Runs" in nav and "Releases" not in nav and "Pipelines" not in nav, nav
        # Its runs list is its pipeline's (kpld refuses a limited token's
        # unfiltered list), live.
        self.css("#runs-body tr[data-run='%s']" % mine)
        assert not self.drv.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-run='%s']" % other)
        assert_eq(self.css("#f-pipeline").get_attribute("value"), "slow", "the filter")
        self.wait(lambda d: "● live" in d.find_element(By.ID, "runs-live").text)
        # It may cancel its pipeline's run.
        self.open("/runs/" + mine)
        self.wait_node("wait", "running")
        self.css("#btn-cancel").click()
        self.confirm()
        self.wait(lambda d: self.run_state() == "cancelled")
        self.c.call(P + "CancelRun", {"id": other})
        self.sign_in(self.admin)

    def test_paging_keyboard_and_phone_width(self):
        self.sign_in(self.admin)
        noop = "name: paged\nstages:\n  - { name: a, kind: noop }\n"
        ids = [self.submit(noop) for _ in range(60)]
        self.open("/runs?pipeline=paged")
        self.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-body tr")) == 50)
        first = [tr.get_attribute("data-run")
                 for tr in self.drv.find_elements(By.CSS_SELECTOR, "#runs-body tr")]
        assert_eq(first, ids[::-1][:50], "the first page, newest first")
        self.css("#page-next").click()
        self.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-body tr")) == 10)
        second = [tr.get_attribute("data-run")
                  for tr in self.drv.find_elements(By.CSS_SELECTOR, "#runs-body tr")]
        assert_eq(second, ids[::-1][50:], "the second page")
        assert not self.drv.find_elements(By.ID, "page-next"), "a third page"
        self.css("#page-prev").click()
        self.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-body tr")) == 50)
        # By keyboard: a graph node takes focus and Enter chooses it.
        self.open("/runs/" + ids[0])
        node = self.css("#dag .node[data-stage='a']")
        assert_eq(node.get_attribute("tabindex"), "0", "a node's tabindex")
        self.js("arguments[0].focus()", node)
        assert_eq(self.js("return document.activeElement.dataset.stage"), "a", "focus")
        node.send_keys(Keys.ENTER)
        self.wait(lambda d: d.current_url.endswith("/runs/%s/a" % ids[0]))
        self.css("#stage-card")
        # At a phone's width nothing runs off the side of the page (wide
        # tables and the graph scroll inside their own boxes).
        self.drv.set_window_size(390, 844)
        try:
            for frag in ("/runs", "/runs/" + ids[0] + "/a", "/tokens"):
                self.open(frag)
                self.css("#main h1")
                self.wait(lambda d: d.execute_script(
                    "return document.documentElement.scrollWidth <= window.innerWidth + 1"))
        finally:
            self.drv.set_window_size(1280, 900)

    def test_secrets_tokens_audit_pages(self):
        self.sign_in(self.admin)
        self.open("/secrets")
        self.css("#s-name").send_keys("CONSOLE_SECRET")
        self.css("#s-value").send_keys("v3ry-s3cret-value")
        self.css("#s-pipelines").send_keys("gated, flaky")
        self.css("#secret-form button[type=submit]").click()
        self.confirm()
        row = self.css("#secrets-table tr[data-name='CONSOLE_SECRET']")
        assert "gated, flaky" in row.text, row.text
        listed = Client.to_dict(self.c.call(P + "ListSecrets", {}))["secrets"]
        assert any(x["name"] == "CONSOLE_SECRET" for x in listed), listed
        assert "v3ry-s3cret-value" not in self.drv.page_source, "a secret value in the page"
        row.find_element(By.TAG_NAME, "button").click()
        self.confirm()
        self.wait(lambda d: not d.find_elements(By.CSS_SELECTOR,
                                                "#secrets-table tr[data-name='CONSOLE_SECRET']"))
        # A token made on the page is shown once and works.
        self.open("/tokens")
        self.css("#t-desc").send_keys("made in the console")
        self.css("#token-form button[type=submit]").click()
        self.confirm()
        made = self.css("#t-secret").text
        assert made.startswith("kpl_"), made
        who = Client.connect(self.daemon.addr, token=made)
        try:
            who.call(P + "ListRuns", {"page_size": 1})
        finally:
            who.close()
        self.wait(lambda d: "made in the console" in d.find_element(By.ID, "tokens-table").text)
        # The audit log names those changes and who made them.
        self.open("/audit")
        text = self.css("#audit-log").text
        assert "CONSOLE_SECRET" in text and "created token" in text, text

    def test_release_live_and_rollback(self):
        if not self.release:
            print("no release stack given: skipped", flush=True)
            return
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "release"))
        from stack import STAGING, Stack
        kplctl, emulator, release_yaml, seed_yaml = self.release
        stack = Stack(os.path.join(self.tmp, "release"), self.daemon.binary, emulator=emulator,
                      kplctl=kplctl, console=True)
        os.makedirs(stack.tmp)
        self.stack = stack
        stack.start()
        base = "http://%s" % stack.http
        _, v1 = stack.seed(seed_yaml, "1.0.0")
        stack.commit("1.1.0")
        self.sign_in(stack.token, base)
        with open(release_yaml) as f:
            text = f.read()
        run = Client.to_dict(stack.client.call(P + "SubmitRun", {
            "pipeline": text, "params": {"repo": stack.repo}, "idempotency_key": ""}))
        run_id = run["id"]
        self.open("/runs/" + run_id, base)
        self.css("#dag .node[data-stage='canary']")
        # Record every node's state changes in the page as they happen.
        self.js("""
            window.__greens = [];
            const seen = new Set();
            const note = () => document.querySelectorAll('#dag .node').forEach((n) => {
              if (n.dataset.state === 'succeeded' && !seen.has(n.dataset.stage)) {
                seen.add(n.dataset.stage); window.__greens.push(n.dataset.stage);
              }
            });
            note();
            new MutationObserver(note).observe(document.getElementById('dag'),
              {subtree: true, attributes: true, attributeFilter: ['data-state']});
        """)
        # Log lines arrive while it runs.
        self.wait(lambda d: int(d.find_element(By.ID, "log-count").text.split()[0]) > 0, 120)
        self.wait_node("canary", "running", 300)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#canary .chart.weights .wpt"), 300)
        self.wait(lambda d: self.run_state() in ("succeeded", "failed"), 600)
        assert_eq(self.run_state(), "succeeded", "the release run on the page")
        greens = self.js("return window.__greens")
        stages = {st["name"]: st for st in self.get_run(run_id, stack.client)["stages"]}
        done = [n for n, st in stages.items() if st["state"] == "STAGE_STATE_SUCCEEDED"]
        assert_eq(sorted(greens), sorted(done), "stages that turned green")
        for i, name in enumerate(greens):
            for need in stages[name].get("needs", []):
                if need in done:
                    assert greens.index(need) < i, "%s green before its need %s: %s" % (
                        name, need, greens)
        # The canary's charts: weights 10, 50, 100 then 0; every verify
        # round's value with its verdict.
        self.open("/runs/%s/canary" % run_id, base)
        self.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#canary .chart.weights .wpt")) >= 4)
        verdicts = self.js("return [...document.querySelectorAll('#canary .chart.rounds .mark')]"
                           ".map((m) => m.dataset.verdict)")
        assert verdicts and set(verdicts) <= {"pass", "inconclusive"}, verdicts
        assert "pass" in verdicts, verdicts
        rows = self.js("return document.querySelectorAll('#canary .verify-table tbody tr').length")
        assert_eq(rows, len(verdicts), "verify rounds in the table")
        self.open("/runs/%s/canary" % run_id, base)
        self.css("#dag")
        self.js("window.scrollTo(0, 0)")
        self.drv.set_window_size(1280, 1600)
        self.wait(lambda d: d.execute_script("return window.innerHeight") > 1000)
        self.screenshot("console-run.png")
        self.drv.set_window_size(1280, 900)
        self.screenshot("console-canary.png", self.css("#canary"))
        # Roll staging back to 1.0.0's revision from the releases page: the
        # release's deploy is the one entry, 1.0.0's revision the one before.
        dep = "local/%s/web" % STAGING
        self.open("/releases?deployment=" + dep, base)
        self.css("#releases-table")
        n_before = len(self.drv.find_elements(By.CSS_SELECTOR, "#releases-table tbody tr"))
        before = self.js("return [...document.querySelectorAll('#rollback-to option')]"
                         ".map((o) => o.value)")
        assert before, "no revision to roll back to"
        self.css("#rollback-btn").click()
        self.confirm()
        answer = self.css("#answer.ok")
        rb = self.js("return document.getElementById('answer').dataset.run")
        assert rb, answer.text
        for _ in stack.client.stream(P + "WatchRun", {"id": rb}, timeout=300):
            pass
        rb_run = self.get_run(rb, stack.client)
        assert_eq(rb_run["state"], "RUN_STATE_SUCCEEDED", "rollback run: %s" % rb_run.get("message"))
        stack.wait_rollout("web", v1, ns=STAGING)
        self.open("/releases?deployment=" + dep, base)
        # The rollback is the newest entry now (kpld records an action's
        # intent, then its result: two entries).
        self.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#releases-table tbody tr"))
                  > n_before)
        top = self.css("#releases-table tbody tr").text
        assert "rollback" in top and rb in top and v1 in top, top
        print("rolled %s back to revision %s (%s)" % (dep, before[0], v1), flush=True)

    def close(self):
        self.drv.quit()
        if getattr(self, "stack", None):
            rc = self.stack.stop()
            assert_eq(rc, 0, "the release stack's kpld exit status")
        self.c.close()
        assert_eq(self.daemon.stop(), 0, "kpld's exit status")


def main():
    binary = os.path.abspath(sys.argv[1])
    release = tuple(os.path.abspath(a) for a in sys.argv[2:6]) if len(sys.argv) >= 6 else None
    tmp = tempfile.mkdtemp(prefix="kpl-console-", dir=os.environ.get("TEST_TMPDIR"))
    return run_suite(Suite, Suite(binary, tmp, release))


if __name__ == "__main__":
    sys.exit(main())
