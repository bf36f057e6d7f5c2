"""A real browser for tests of the web console: Debian's headless Chromium driven by
Selenium through Debian's chromedriver.

Nothing is downloaded at run time: the driver's path is given to ``Service``, so Selenium
Manager is never asked for one (``selenium.webdriver.common.driver_finder`` skips it when
a path is given; the fixture fails a test that asks it anyway), and the browser's path is
given too. Each browser gets a fresh profile
and trusts exactly the public key of the server certificate the test names
(``--ignore-certificate-errors-spki-list``, which Chromium honours only beside
``--user-data-dir``): any other certificate is refused as usual.

The ``browser`` fixture skips the test when Chromium or its driver is absent, and fails it
in CI (environment variable CI set), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver import Chrome, ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
INSTALL: Final = "apt-get install -y chromium chromium-driver"
# Headless, and quiet on the network: no updates, sync or background fetches, and no QUIC
# (the console speaks HTTP/1.1 over TLS). No sandbox: CI runs the tests as root, where
# Chromium refuses to start sandboxed. Shared memory in /tmp: a container's /dev/shm is
# often too small for it.
FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
DESKTOP: Final = (1280, 900)
PHONE: Final = (390, 844)
NARROWEST: Final = 375  # the console's pages must fit a screen this wide (CSS pixels)
# Where screenshots go: the directory named by this variable (docs/screenshots for the
# README's), else the test's own temporary directory, so an ordinary test run leaves the
# repository alone.
ENV_SCREENSHOTS: Final = "HITLESS_SCREENSHOTS"
WAIT_S: Final = 30.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def spki_pin(cert_pem: bytes) -> str:
    """The base64 SHA-256 of the first certificate's SubjectPublicKeyInfo (DER) in
    ``cert_pem``: the form ``--ignore-certificate-errors-spki-list`` takes (the HPKP pin
    format of RFC 7469, section 2.4)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Chromium:
    """Launches headless Chromium sessions, each on a fresh profile under ``root``, and
    quits every one of them at the end of the test."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._drivers: list[Chrome] = []

    def open(self, trust: Path) -> Chrome:
        """A new browser trusting the key of the server certificate in ``trust`` (PEM,
        leaf first), with a 1280x900 window. Raises WebDriverException when Chromium does
        not start (chromedriver.log in the profile's directory says why)."""
        home = self._root / f"chromium-{len(self._drivers)}"
        home.mkdir(parents=True)
        options = ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={home / 'profile'}")
        options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
        options.add_argument(
            f"--ignore-certificate-errors-spki-list={spki_pin(trust.read_bytes())}"
        )
        service = Service(str(CHROMEDRIVER), log_output=str(home / "chromedriver.log"))
        driver = Chrome(service=service, options=options)
        self._drivers.append(driver)
        return driver

    def close(self) -> None:
        for driver in self._drivers:
            with contextlib.suppress(WebDriverException):
                driver.quit()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Chromium]:
    """Headless Chromium sessions for this test (``browser.open(server_cert)``)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        reason = f"{' and '.join(missing)} not installed: {INSTALL}"
        if in_ci():
            pytest.fail(f"the browser tests are required in CI, and {reason}")
        pytest.skip(reason)
    # Selenium Manager would look for (and download) a driver and a browser: both paths are
    # given, so it must never be asked. Asked anyway, it fails the test.
    monkeypatch.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
    chromium = Chromium(tmp_path / "browsers")
    try:
        yield chromium
    finally:
        chromium.close()


def _no_selenium_manager(*args: object) -> dict[str, str]:
    raise AssertionError(
        f"Selenium Manager was asked for a driver {args}: give {CHROMEDRIVER} to Service"
    )


def wait_dom(
    driver: Chrome, condition: Callable[[Chrome], T], what: str, timeout: float = WAIT_S
) -> T:
    """Wait until ``condition(driver)`` is truthy, and return it; fail saying ``what`` was
    awaited and what the page showed (its address and text)."""
    try:
        # A page replaced while the condition reads it is read again on the next poll.
        wait = WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )
        return wait.until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; the page was:\n{describe(driver)}"
        ) from None


def click_through(driver: Chrome, element: WebElement, what: str) -> None:
    """Click ``element`` (a link or a form's button) and wait for the page it leads to."""
    leave(driver, element.click, what)


def leave(driver: Chrome, action: Callable[[], object], what: str) -> None:
    """Do ``action`` (a click, a script sending a form) and wait until the page it leads
    to has replaced this one and been read to its end: until then, the old page (or half
    of the new one) answers queries. The old page is known by a mark left on its window."""
    driver.execute_script("window.hitlessLeft = true")
    action()
    wait_dom(driver, _arrived, what)


def _arrived(driver: Chrome) -> bool:
    try:
        return bool(
            driver.execute_script("return !window.hitlessLeft && document.readyState !== 'loading'")
        )
    except WebDriverException:
        # Asked while the old document goes away (chromedriver answers "no such execution
        # context", "Node ... does not belong to the document"...): ask again.
        return False


def describe(driver: Chrome) -> str:
    """The page's address and visible text, for failure messages."""
    try:
        text = driver.execute_script("return document.body ? document.body.innerText : ''")
    except WebDriverException as exc:
        text = f"<cannot read the page: {exc.msg}>"
    return f"{driver.current_url}\n{text}"


def fits(driver: Chrome, width: int = NARROWEST) -> None:
    """Check the current page needs no sideways scrolling on a phone ``width`` CSS pixels
    wide. Raises AssertionError naming the page and how wide it is."""
    _emulate(driver, width, PHONE[1])
    try:
        scroll = driver.execute_script("return document.documentElement.scrollWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert scroll <= width, (
        f"{driver.current_url} is {scroll} px wide on a {width} px screen: it must fit"
    )


def labelled(driver: Chrome) -> None:
    """Check every field of the current page a person fills in (input, select, textarea;
    not hidden ones or buttons) has a label: a <label for=ID> or one around it (WCAG 2.2,
    success criterion 1.3.1). Raises AssertionError listing the fields without one."""
    unlabelled = driver.execute_script(
        """
        return [...document.querySelectorAll('input, select, textarea')]
          .filter(f => !['hidden', 'submit', 'button'].includes(f.type))
          .filter(f => !f.closest('label') && !(f.id && document.querySelector(
              `label[for="${CSS.escape(f.id)}"]`)))
          .map(f => f.outerHTML);
        """
    )
    assert not unlabelled, f"{driver.current_url} has fields without a label: {unlabelled}"


def screenshots(driver: Chrome, name: str, fallback: Path) -> list[Path]:
    """Save the current page as NAME-desktop.png (1280x900) and NAME-phone.png (390x844,
    emulated as a phone: mobile viewport) in the directory ENV_SCREENSHOTS names,
    else in ``fallback``. Returns the files written."""
    directory = Path(os.environ.get(ENV_SCREENSHOTS) or fallback)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for variant, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        _emulate(driver, width, height, mobile=variant == "phone")
        try:
            path = directory / f"{name}-{variant}.png"
            if not driver.save_screenshot(str(path)):
                raise AssertionError(f"the browser could not save the screenshot {path}")
            written.append(path)
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return written


def _emulate(driver: Chrome, width: int, height: int, *, mobile: bool = True) -> None:
    """Give the page a ``width`` x ``height`` viewport (Chrome DevTools Protocol,
    Emulation.setDeviceMetricsOverride); ``mobile`` honours the page's viewport meta
    tag as a phone does."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
