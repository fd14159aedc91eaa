"""Headless Debian chromium under selenium, for the console's tests, the
demo and bench/console_bench.py.

    drv = browser.start(tmp)        # a fresh profile under tmp
    ...
    drv.quit()

Debian's chromium, chromium-driver and python3-selenium (./dev installs
them); run with /usr/bin/python3, which has selenium.
"""

import os
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def start(tmp, width=1280, height=900):
    for p, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(p):
            raise RuntimeError("%s is missing: install %s (./dev does)" % (p, pkg))
    profile = os.path.join(tmp, "chromium-profile")
    shutil.rmtree(profile, ignore_errors=True)
    os.makedirs(profile)
    opts = Options()
    opts.binary_location = CHROMIUM
    opts.add_argument("--headless=new")
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # chromium refuses to run as root otherwise
    opts.add_argument("--disable-dev-shm-usage")
    opts.add_argument("--disable-gpu")
    opts.add_argument("--no-first-run")
    opts.add_argument("--user-data-dir=" + profile)
    opts.add_argument("--window-size=%d,%d" % (width, height))
    # The browser's console (CSP violations, script errors) for the tests.
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = os.path.join(tmp, "chromedriver.log")
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER, log_path=log), options=opts)
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    return drv


def console_errors(drv):
    """The browser console's SEVERE entries since the last call (script
    errors, CSP violations, failed loads)."""
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
