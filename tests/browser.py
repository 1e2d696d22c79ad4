"""A real headless Chromium (Debian's chromium and chromedriver) driven by Selenium, for the pages."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="agentq-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def hold_answers(driver: WebDriver, path: str) -> None:
    """The page's requests for `path` get their responses only at `release_held_answers` (a slow network or a
    loaded server, made as late as the test needs)."""
    driver.execute_script("""
        const [path] = arguments;
        const original = window.fetch;
        let release;
        const released = new Promise((resolve) => { release = resolve; });
        window.releaseHeld = () => release();
        window.fetch = (url, init) => original(url, init).then((response) => {
          if (url !== path) return response;
          const json = response.json.bind(response);
          // Flagged a task after the page read the body: whatever it does with it is done by then.
          response.json = () => json().then((body) => {
            setTimeout(() => { window.heldAnswered = true; }, 0);
            return body;
          });
          return released.then(() => response);
        });
    """, path)


def release_held_answers(driver: WebDriver) -> None:
    """Hand the held responses to the page, and wait until it has done what it does with them."""
    driver.execute_script("window.releaseHeld()")
    wait_for(lambda: driver.execute_script("return window.heldAnswered === true"), timeout=20,
             what="the page to take the held answer")
