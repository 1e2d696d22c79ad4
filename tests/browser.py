"""A real headless Chromium (Debian's chromium and chromedriver) driven by Selenium, for the pages."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

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


def answer_late(driver: WebDriver, path: str, seconds: float) -> None:
    """The page's requests for `path` get their responses `seconds` late (a slow network or a loaded server),
    and `window.lateAnswered` is set once one was handed over."""
    driver.execute_script("""
        const [path, delay] = arguments;
        const original = window.fetch;
        window.fetch = (url, init) => original(url, init).then((response) => url !== path ? response
            : new Promise((resolve) => setTimeout(() => { resolve(response); window.lateAnswered = true; }, delay)));
    """, path, int(seconds * 1000))
