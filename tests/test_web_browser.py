"""The web console in a real browser: Debian's headless Chromium (tests/support/browser.py)
against real processes: a controller serving the console over HTTPS on a port of its own,
the broker, and gateway daemons, one of them with a VPN service and users connected.

Console users are made the documented way (``upgradectl users add NAME --role ROLE
--password-stdin``). The browser trusts exactly the key of the controller's server
certificate; the console's certificate is also checked, with httpx, to chain to the
controller's CA like upgradectl's connections do.

Screenshots of each page are saved on the way (``tests.support.browser.screenshots``):
into docs/screenshots for the README with HITLESS_SCREENSHOTS=docs/screenshots, else into
the test's temporary directory."""

from __future__ import annotations

import functools
import os
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from gateway_daemon.vpn.config import VpnConfig
from hitless import pki
from hitless.config import HostPort
from tests.support.browser import (
    Chromium,
    click_through,
    describe,
    fits,
    labelled,
    leave,
    screenshots,
    wait_dom,
)
from tests.support.fleet import Fleet
from tests.support.procs import free_port
from tests.support.vpn_users import VpnUser, connect_users, service_pid, stop_service
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)
PASSWORD = "a passphrase long enough"
CSRF_REFUSED = "CSRF check failed"
VIEWER_REFUSED = "Your role (viewer) may not start upgrades: ask an admin for the operator role."
# A form made in the page and sent at once: what another page, or a person editing this
# one, can send with the browser's cookies.
FORGE = """
const [action, fields] = arguments;
const form = document.createElement('form');
form.method = 'post';
form.action = action;
for (const [name, value] of Object.entries(fields)) {
  const input = document.createElement('input');
  input.type = 'hidden';
  input.name = name;
  input.value = value;
  form.appendChild(input);
}
document.body.appendChild(form);
form.submit();
"""

# Records each text the job page's "wave in progress" shows, in window.wavesSeen.
WAVES_SEEN = """
const wave = document.getElementById('rollout-wave');
window.wavesSeen = [wave.textContent];
new MutationObserver(() => {
  if (window.wavesSeen.at(-1) !== wave.textContent) {
    window.wavesSeen.push(wave.textContent);
  }
}).observe(wave, {childList: true, characterData: true, subtree: true});
"""


@dataclass
class Console:
    """A fleet's web console at ``url``, and what a person does in it."""

    fleet: Fleet
    url: str
    shots: Path

    @property
    def server_cert(self) -> Path:
        return self.fleet.data_dir / "pki" / "server.pem"

    def add_user(self, name: str, role: str) -> None:
        """``upgradectl users add NAME --role ROLE --password-stdin`` with PASSWORD."""
        self.fleet.cli("users", "add", name, "--role", role, "--password-stdin", input=PASSWORD)

    def log_in(self, driver: Chrome, name: str, password: str = PASSWORD) -> None:
        """Log in as ``name`` from the login page, and wait for the page that follows."""
        driver.get(f"{self.url}/login")
        _type(driver, "username", name)
        _type(driver, "password", password)
        _go(driver, By.ID, "login")
        wait_dom(driver, lambda d: not d.current_url.startswith(f"{self.url}/login"), "login")

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.fleet.cli_json("jobs", "list")
        return jobs

    def shoot(self, driver: Chrome, name: str) -> None:
        """Check the page fits a phone and labels its fields, and save its screenshots."""
        fits(driver)
        labelled(driver)
        screenshots(driver, name, self.shots)


@pytest.fixture
def console(fleet: Fleet, browser: Chromium, tmp_path: Path) -> Console:
    """The fleet's console, once it answers. Asks for ``browser`` after ``fleet``, so that
    the browsers are closed before the controller stops."""
    console = Console(fleet, fleet.console_url, tmp_path / "screenshots")
    # The console's certificate chains to the controller's CA, for the address served.
    trusted = ssl.create_default_context(cafile=str(fleet.ca_cert))
    wait_for(
        lambda: _answers(f"{console.url}/login", trusted),
        timeout=30,
        what=f"the console to answer on {console.url} with a certificate from the CA",
        interval=0.1,
        describe=fleet.procs.dump_logs,
    )
    return console


def _answers(url: str, trusted: ssl.SSLContext) -> bool:
    try:
        return httpx.get(url, verify=trusted, timeout=5).status_code == 200
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise AssertionError(f"{url} does not chain to the controller's CA: {exc}") from exc
        return False
    except httpx.HTTPError:
        return False


@pytest.fixture
def gateways(console: Console) -> list[str]:
    """Two gateways on BASE."""
    ids = ["gw-1", "gw-2"]
    for gateway_id in ids:
        console.fleet.start_gateway(gateway_id)
    console.fleet.wait_gateways(dict.fromkeys(ids, BASE))
    return ids


def _go(driver: Chrome, how: str, which: str) -> None:
    """Click the link or button found ``how`` (a By), and wait for the page it leads to."""
    click_through(driver, driver.find_element(how, which), f"the page after {which}")


def _type(driver: Chrome, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _text(driver: Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def _present(driver: Chrome, css: str) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, css))


def _row_states(driver: Chrome, gateway_ids: list[str]) -> dict[str, str]:
    return {g: _text(driver, f"#job-gw-{g} .state") for g in gateway_ids}


def _job_page(driver: Chrome) -> None:
    """Wait for the job's page that starting an upgrade leads to; fail at once, with what
    the console said, when it answers with an error instead."""

    def arrived(d: Chrome) -> bool:
        if _present(d, "#job-gateways"):
            return True
        said = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".error") if e.text]
        if said:
            raise AssertionError(f"the upgrade did not start: {said}\n{describe(d)}")
        return False

    wait_dom(driver, arrived, "the job's page")


def _job_done(driver: Chrome) -> None:
    """Wait until the job's page says it SUCCEEDED."""
    wait_dom(driver, lambda d: _text(d, "#job-state") == "SUCCEEDED", "the job SUCCEEDED", 60)


def _csrf_token(driver: Chrome) -> str:
    """The session's CSRF token, from the logout form every page has."""
    token = driver.execute_script(
        "return document.querySelector('nav input[name=csrf_token]').value"
    )
    assert token, f"no csrf_token in the page's <nav>:\n{describe(driver)}"
    return str(token)


def _post_form(driver: Chrome, action: str, fields: dict[str, str]) -> None:
    """Post ``fields`` to ``action`` from the current page with a form made in it, as a
    page elsewhere (or a person editing this one) could, and wait for the answer."""
    leave(driver, lambda: driver.execute_script(FORGE, action, fields), f"the answer to {action}")


def test_an_operator_logs_in_upgrades_to_the_latest_and_watches_it_live(
    console: Console, browser: Chromium, gateways: list[str]
) -> None:
    fleet = console.fleet
    fleet.release("1.1.0")
    console.add_user("olive", "operator")
    driver = browser.open(console.server_cert)

    driver.get(f"{console.url}/login")
    console.shoot(driver, "login")
    _type(driver, "username", "olive")
    _type(driver, "password", "not the password")
    _go(driver, By.ID, "login")
    wait_dom(driver, lambda d: _present(d, "#login-error"), "the login error")
    assert driver.find_element(By.ID, "username").get_attribute("value") == "olive"
    assert driver.find_element(By.ID, "password").get_attribute("value") == ""

    # A page asked for before logging in is where the login leads.
    driver.get(f"{console.url}/jobs")
    wait_dom(driver, lambda d: _present(d, "#login-form"), "the login page")
    assert "/login?next=" in driver.current_url
    _type(driver, "username", "olive")
    _type(driver, "password", PASSWORD)
    _go(driver, By.ID, "login")
    wait_dom(driver, lambda d: d.current_url == f"{console.url}/jobs", "the jobs page")

    session = {c["name"]: c for c in driver.get_cookies()}["hitless_session"]
    assert (session["httpOnly"], session["secure"], session.get("sameSite")) == (
        True,
        True,
        "Strict",
    ), session
    assert "hitless_session" not in driver.execute_script("return document.cookie")

    # Settings -> Maintenance: the versions, and the latest release.
    _go(driver, By.LINK_TEXT, "Maintenance")
    wait_dom(driver, lambda d: _present(d, "#versions"), "the maintenance page")
    assert _text(driver, "#controller-version") == BASE
    for gateway_id in gateways:
        row = _text(driver, f"#gateways #gw-{gateway_id}")
        assert gateway_id in row and BASE in row, row
    assert BASE in _text(driver, "#version-counts")
    assert _text(driver, "#latest-version") == "1.1.0"
    console.shoot(driver, "maintenance")

    _go(driver, By.ID, "upgrade-latest")
    wait_dom(driver, lambda d: _present(d, "#plan"), "the plan")
    for gateway_id in gateways:
        cells = _text(driver, f"#plan-{gateway_id}")
        assert BASE in cells and "1.1.0" in cells, cells
    assert not _present(driver, "#vpn-warning"), "1.1.0 leaves the VPN service alone"
    fits(driver)

    # gw-2 is held (SIGSTOP) until the job's page is open: its SUCCEEDED can only arrive
    # while the page is shown.
    held = next(p for p in fleet.procs.started() if p.name == "gw-2")
    os.killpg(held.pgid, signal.SIGSTOP)
    try:
        _go(driver, By.ID, "start-upgrade")
        _job_page(driver)
        assert _row_states(driver, gateways)["gw-2"] != "SUCCEEDED"
        driver.execute_script("window.notReloaded = true")
    finally:
        os.killpg(held.pgid, signal.SIGCONT)
    wait_dom(
        driver,
        lambda d: set(_row_states(d, gateways).values()) == {"SUCCEEDED"},
        "every gateway SUCCEEDED on the job's page",
        timeout=60,
    )
    _job_done(driver)
    assert driver.execute_script("return window.notReloaded") is True, "the page was reloaded"
    job_id = driver.current_url.rsplit("/", 1)[1]
    console.shoot(driver, "job")

    # The job is the operator's, from the console, in its history and in the audit log.
    [job] = console.jobs()
    assert (job["job_id"], job["source"], job["requested_by"]) == (job_id, "ui", "user:olive")
    _go(driver, By.LINK_TEXT, "Jobs")
    wait_dom(driver, lambda d: _present(d, "#jobs"), "the jobs page")
    row = _text(driver, "#jobs")
    assert job_id in row and "ui" in row and "user:olive" in row, row
    console.shoot(driver, "jobs")
    actors = {event["actor"] for event in fleet.cli_json("audit")}
    assert "user:olive" in actors, actors

    for page, table in (("Releases", "#releases"), ("Admins", "#admins")):
        _go(driver, By.LINK_TEXT, page)
        wait_dom(driver, functools.partial(_present, css=table), f"the {page} page")
        console.shoot(driver, page.lower())

    _go(driver, By.CSS_SELECTOR, "nav form button")  # log out
    wait_dom(driver, lambda d: _present(d, "#login-form"), "the login page after logging out")
    driver.get(f"{console.url}/maintenance")
    wait_dom(driver, lambda d: _present(d, "#login-form"), "logged out for good")


@pytest.fixture
def vpn_gateway(console: Console) -> Iterator[VpnConfig]:
    """gw-1 on BASE with a VPN service, heartbeats every 0.3 s; the service outlives the
    daemon on purpose and is stopped after it."""
    vpn = VpnConfig(HostPort("127.0.0.1", free_port()), console.fleet.root / "gw-1")
    proc = console.fleet.start_gateway(
        "gw-1", None, "--vpn-listen", str(vpn.listen), "--heartbeat-interval", "0.3"
    )
    try:
        console.fleet.wait_gateways({"gw-1": BASE})
        wait_for(lambda: service_pid(vpn.state_dir), timeout=15, what="the VPN service")
        yield vpn
    finally:
        console.fleet.procs.stop(proc)
        stop_service(vpn.state_dir)


def test_a_release_restarting_the_vpn_service_asks_first_and_counts_the_users(
    console: Console, browser: Chromium, vpn_gateway: VpnConfig
) -> None:
    fleet = console.fleet
    users: list[VpnUser] = connect_users(2, vpn_gateway.listen.port, vpn_gateway.cert)
    try:
        wait_for(
            lambda: fleet.gateways()["gw-1"]["vpn_sessions"] == 2,
            timeout=15,
            what="a heartbeat reporting 2 VPN sessions",
            describe=lambda: str(fleet.gateways()),
        )
        fleet.release("1.1.0")
        fleet.release("2.0.0", restarts_vpn_service=True)
        console.add_user("olive", "operator")
        driver = browser.open(console.server_cert)
        console.log_in(driver, "olive")

        vpn_users = _text(driver, "#gw-gw-1 > :nth-child(4)")
        assert vpn_users == "2", f"gw-1's VPN USERS cell: {vpn_users!r}"
        _type(driver, "release-version", "2.0.0")
        _go(driver, By.ID, "upgrade-custom")
        wait_dom(driver, lambda d: _present(d, "#plan"), "the plan")
        warning = _text(driver, "#vpn-warning")
        assert "2 VPN users connected now will be disconnected" in warning, warning
        accept = driver.find_element(By.ID, "accept-vpn")
        assert accept.get_attribute("required") is not None, "the confirmation is required"
        assert not accept.is_selected()
        console.shoot(driver, "plan-vpn")

        # The browser will not send the form unconfirmed; without the browser's check the
        # console refuses it, with the CLI's reason, and starts nothing.
        driver.execute_script("document.getElementById('accept-vpn').required = false")
        _go(driver, By.ID, "start-upgrade")
        wait_dom(driver, lambda d: _present(d, "#confirm-error"), "the confirmation error")
        error = _text(driver, "#confirm-error")
        assert "restarts the VPN service" in error and "2 connected VPN user" in error, error
        assert console.jobs() == []

        driver.find_element(By.ID, "accept-vpn").click()
        _go(driver, By.ID, "start-upgrade")
        _job_page(driver)
        _job_done(driver)
        assert _text(driver, "#job-gw-gw-1 .vpn-dropped") == "2"
        wait_for(lambda: not any(u.connected for u in users), timeout=5, what="the users dropped")
    finally:
        for user in users:
            user.close()


def test_an_unknown_or_malformed_version_is_shown_next_to_the_field_and_kept(
    console: Console, browser: Chromium, gateways: list[str]
) -> None:
    console.fleet.release("1.1.0")
    console.add_user("olive", "operator")
    driver = browser.open(console.server_cert)
    console.log_in(driver, "olive")

    for typed, expected in (
        ('1.2"><b id="injected">x</b>', "invalid version"),
        ("9.9.9", "unknown version 9.9.9; available: 1.1.0"),
    ):
        _type(driver, "release-version", typed)
        _go(driver, By.ID, "upgrade-custom")
        wait_dom(driver, lambda d: _present(d, "#version-error"), f"the error for {typed!r}")
        error = driver.find_element(By.CSS_SELECTOR, "#upgrade-custom-form #version-error")
        assert expected in error.text, error.text
        field = driver.find_element(By.ID, "release-version")
        assert field.get_attribute("value") == typed, "the field keeps what was typed"
        assert not _present(driver, "#injected"), "typed text reached the page as HTML"
        assert not _present(driver, "#plan")
    console.shoot(driver, "version-error")
    assert console.jobs() == []


def test_a_viewer_sees_no_upgrade_forms_and_a_forged_post_starts_nothing(
    console: Console, browser: Chromium, gateways: list[str]
) -> None:
    console.fleet.release("1.1.0")
    console.add_user("vera", "viewer")
    console.add_user("olive", "operator")
    viewer = browser.open(console.server_cert)
    console.log_in(viewer, "vera")

    wait_dom(viewer, lambda d: _present(d, "#gateways"), "the maintenance page")
    assert _text(viewer, "#latest-version") == "1.1.0"
    for absent in (
        "#upgrade-latest-form",
        "#upgrade-custom-form",
        "#upgrade-latest",
        "form[action='/upgrade/plan']",
    ):
        assert not _present(viewer, absent), f"a viewer's page has {absent}"
    viewer.get(f"{console.url}/admins")
    wait_dom(viewer, lambda d: _present(d, "#admins"), "the admins page")
    assert not _present(viewer, "#add-admin-form") and not _present(viewer, ".remove-admin")

    # The viewer's own valid session and CSRF token: refused for the role.
    start = {"target": "latest", "accept_vpn_disruption": "on"}
    _post_form(viewer, "/upgrade/start", {**start, "csrf_token": _csrf_token(viewer)})
    assert VIEWER_REFUSED in _text(viewer, "main"), describe(viewer)
    assert console.jobs() == []

    # The same form from an operator starts the job: the refusal was the role's.
    operator = browser.open(console.server_cert)
    console.log_in(operator, "olive")
    _post_form(operator, "/upgrade/start", {**start, "csrf_token": _csrf_token(operator)})
    _job_page(operator)
    [job] = console.jobs()
    assert job["requested_by"] == "user:olive"
    _job_done(operator)


def test_a_form_without_the_csrf_token_or_with_another_is_refused(
    console: Console, browser: Chromium, gateways: list[str]
) -> None:
    console.fleet.release("1.1.0")
    console.add_user("olive", "operator")
    driver = browser.open(console.server_cert)
    console.log_in(driver, "olive")

    for tamper in ("token.remove()", "token.value = 'forged'"):
        driver.get(f"{console.url}/maintenance")
        _go(driver, By.ID, "upgrade-latest")
        wait_dom(driver, lambda d: _present(d, "#start-upgrade"), "the plan")
        driver.execute_script(
            "const token = document.getElementById('start-upgrade').form.elements.csrf_token;"
            + tamper
        )
        _go(driver, By.ID, "start-upgrade")
        assert CSRF_REFUSED in _text(driver, "main"), describe(driver)
        assert console.jobs() == [], f"a job started after: {tamper}"

    # Untampered, the same form starts the job: the refusals were the token's.
    driver.get(f"{console.url}/maintenance")
    _go(driver, By.ID, "upgrade-latest")
    wait_dom(driver, lambda d: _present(d, "#start-upgrade"), "the plan")
    _go(driver, By.ID, "start-upgrade")
    _job_page(driver)
    assert len(console.jobs()) == 1
    _job_done(driver)


def test_the_browser_trusts_the_controllers_key_and_no_other(
    console: Console, browser: Chromium, tmp_path: Path
) -> None:
    """The harness's own check: a browser told to trust another key refuses the console,
    so the tests above do talk to the controller's certificate."""
    other = pki.CertificateAuthority(tmp_path / "other-ca")
    other.init(pki.default_names("127.0.0.1"), datetime.now(UTC))
    stranger = browser.open(other.server_cert_path)
    stranger.get(f"{console.url}/login")
    assert not _present(stranger, "#login-form"), describe(stranger)
    trusting = browser.open(console.server_cert)
    trusting.get(f"{console.url}/login")
    wait_dom(trusting, lambda d: _present(d, "#login-form"), "the login page")


def test_an_operator_pauses_resumes_and_cancels_a_rollout_from_its_page(
    console: Console, browser: Chromium
) -> None:
    """gw-away is offline, so its command waits in its queue and, as the first wave of
    two with Max parallel 1, holds the one place in flight: nothing else moves while the
    operator steers."""
    fleet = console.fleet
    away = fleet.start_gateway("gw-away")
    fleet.start_gateway("gw-b")
    fleet.wait_gateways({"gw-away": BASE, "gw-b": BASE})
    fleet.procs.stop(away)
    fleet.release("1.1.0")
    console.add_user("olive", "operator")
    driver = browser.open(console.server_cert)
    console.log_in(driver, "olive")

    _go(driver, By.ID, "upgrade-latest")
    wait_dom(driver, lambda d: _present(d, "#rollout-fields"), "the plan's rollout fields")
    _type(driver, "rollout-waves", "1,100%")
    _type(driver, "rollout-max-parallel", "1")
    console.shoot(driver, "plan-rollout")
    _go(driver, By.ID, "start-upgrade")
    _job_page(driver)
    job_id = driver.current_url.rsplit("/", 1)[1]
    assert _text(driver, "#rollout-wave") == "wave 1 of 2"
    assert _text(driver, "#rollout-cap") == "at most 1 gateway in flight"
    assert (
        _text(driver, "#job-gw-gw-away .wave") == "1" and _text(driver, "#job-gw-gw-b .wave") == "2"
    )
    wait_dom(driver, lambda d: _text(d, "#job-state") == "RUNNING", "the job RUNNING")

    _go(driver, By.ID, "pause-job")
    wait_dom(driver, lambda d: _text(d, "#job-state") == "PAUSED", "the job PAUSED")
    assert _text(driver, "#job-stop-reason") == "paused by user:olive"
    assert not driver.find_element(By.ID, "pause-job").is_displayed()
    assert driver.find_element(By.ID, "resume-job").is_displayed()
    assert fleet.cli_json("status", job_id)["state"] == "PAUSED"
    console.shoot(driver, "job-paused")

    # Resumed from upgradectl, the open page follows live: its state and its buttons.
    driver.execute_script("window.notReloaded = true")
    fleet.cli("jobs", "resume", job_id)
    wait_dom(
        driver,
        lambda d: (
            _text(d, "#job-state") == "RUNNING"
            and d.find_element(By.ID, "pause-job").is_displayed()
            and not d.find_element(By.ID, "resume-job").is_displayed()
        ),
        "the page following the resume",
    )
    assert driver.execute_script("return window.notReloaded") is True, "the page was reloaded"

    _type(driver, "cancel-reason", "maintenance moved")
    _go(driver, By.ID, "cancel-job")
    wait_dom(driver, lambda d: _text(d, "#job-state") == "CANCELLED", "the job CANCELLED")
    assert _text(driver, "#job-stop-reason") == "cancelled by user:olive: maintenance moved"
    assert _row_states(driver, ["gw-away", "gw-b"]) == {
        "gw-away": "CANCELLED",
        "gw-b": "CANCELLED",
    }
    assert not _present(driver, "#job-actions")
    assert fleet.cli_json("status", job_id)["state"] == "CANCELLED"

    # A second rollout in two waves, followed live: gw-away comes back and takes its
    # command, and the open page moves to the second wave, then to the end.
    driver.get(f"{console.url}/maintenance")
    _go(driver, By.ID, "upgrade-latest")
    wait_dom(driver, lambda d: _present(d, "#rollout-fields"), "the plan's rollout fields")
    _type(driver, "rollout-waves", "1,100%")
    _go(driver, By.ID, "start-upgrade")
    _job_page(driver)
    assert _text(driver, "#rollout-wave") == "wave 1 of 2"
    driver.execute_script(WAVES_SEEN)
    fleet.start_gateway("gw-away")
    _job_done(driver)
    seen = driver.execute_script("return window.wavesSeen")
    assert seen == ["wave 1 of 2", "wave 2 of 2", "no wave in progress (2 waves)"], seen
    assert not driver.find_element(By.ID, "cancel-job").is_displayed()
    assert _text(driver, "#job-state") == "SUCCEEDED"
