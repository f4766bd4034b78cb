"""A headless Chromium for the tests: playwright's Python package driving Debian's /usr/bin/chromium.

No browser download (``executable_path`` points at the system Chromium, installed by
scripts/install-system-deps.sh). ``Browser`` keeps the small interface the UI tests use
(cookie, open, wait for a JS condition, read, screenshot); ``page`` is the playwright page
for the tests that click and type.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Browser:
    def __init__(self, width: int = 1280, height: int = 720):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            self.context = self.browser.new_context(viewport={"width": width, "height": height})
            self.page = self.context.new_page()
        except BaseException:
            self._playwright.stop()
            raise

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.context.add_cookies([{"name": name, "value": value, "url": url}])

    def login(self, base: str, username: str, password: str) -> None:
        """Sign in through Airflow's own login page, as a person does."""
        self.page.goto(f"{base}/auth/login")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(lambda url: "/auth/login" not in url)

    def open(self, url: str) -> None:
        self.page.goto(url)

    def js(self, expression: str):
        return self.page.evaluate(expression)

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll a JS expression until it is truthy; return its value (or raise with the page text)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return self.page.wait_for_function(expression, timeout=timeout * 1000, polling=500).json_value()
        except PlaywrightTimeout:
            text = self.js("document.body && document.body.innerText")
            raise AssertionError(f"timed out waiting for {expression!r}; page text: {text!r}") from None

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()
