"""A real headless browser for the dashboard's tests and benchmark: Debian's chromium, driven by
selenium through Debian's chromedriver (``make browser`` installs both; nothing is downloaded).

Selenium is given both paths, so Selenium Manager (which would fetch a browser and a driver
from the internet) never runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

BROWSER_NAMES = ("chromium", "chromium-browser")
MISSING = "the dashboard's browser test needs Debian's chromium and chromium-driver: run `make browser`"


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) as found on PATH, or None when either is missing."""
    browser = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(width: int = 1360, height: int = 1000) -> Iterator[WebDriver]:
    """A headless chromium window, quit on exit (its processes with it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError(MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if os.geteuid() == 0:  # chromium refuses to run as root inside its sandbox (CI containers run as root)
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    try:
        yield driver
    finally:
        driver.quit()
