"""The web console over HTTPS, against a real controller process on the real broker: login
and logout, the session cookie's flags, the slow-down of repeated failed logins, CSRF and
role refusals that change nothing, the CLI's messages beside the fields, the plan's
confirmations, a job started from the console and its live event stream, and release notes
and typed text shown as text, never as markup.

The controller serves the console on a free port of the test's own (``Fleet.http_port``);
every request goes through httpx trusting only the controller's CA, as a browser given
``ca.pem`` would. The last test moves the controller to a new release inline with a job's
event stream open. Gateways are the test's own broker users publishing heartbeats and
reports (``Fleet.as_gateway``), so each event of a job is the test's to send.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.signing import Trust
from controller_svc.store import ArtifactStore
from hitless.bus import topology
from hitless.config import BusConfig, ControllerConfig, HostPort
from hitless.v1 import bus_pb2, common_pb2, controller_pb2
from tests.support.fleet import Fleet
from tests.support.procs import Procs
from tests.support.rabbit import Management, amqp_url
from tests.support.stamped import stamped
from tests.support.wait import wait_for
from upgradectl.errors import ExitCode

PASSWORD = "correct horse battery staple"
CSRF_REFUSED = (
    "The form expired or did not come from this console (CSRF check failed); reload and try again."
)
VIEWER_REFUSED = "Your role (viewer) may not start upgrades: ask an admin for the operator role."
WRONG = "wrong user name or password"
GS = common_pb2.GatewayJobState


class _Page(HTMLParser):
    """An HTML page's elements by id: tag, attributes and text (entities decoded)."""

    _VOID = frozenset({"input", "br", "img", "meta", "link", "hr", "source", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: dict[str, tuple[str, dict[str, str], list[str]]] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        element_id = values.get("id")
        if element_id is not None:
            self.elements[element_id] = (tag, values, [])
        if tag not in self._VOID:
            self._open.append((tag, element_id))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id is not None:
                self.elements[element_id][2].append(data)

    def has(self, element_id: str) -> bool:
        return element_id in self.elements

    def text(self, element_id: str) -> str:
        assert element_id in self.elements, f"no #{element_id} in the page"
        return " ".join(" ".join(self.elements[element_id][2]).split())

    def attrs(self, element_id: str) -> dict[str, str]:
        assert element_id in self.elements, f"no #{element_id} in the page"
        return self.elements[element_id][1]


def _csrf(html: str) -> str:
    return _hidden(html, "csrf_token")


@dataclass
class Console:
    """A controller serving its console at ``url``, and what a person does there."""

    fleet: Fleet
    url: str
    verify: ssl.SSLContext
    rabbit: Management
    vhost: str

    def browser(self) -> httpx.Client:
        """A client with a cookie jar of its own: one person's browser."""
        return httpx.Client(base_url=self.url, verify=self.verify, timeout=30)

    def add_user(self, name: str, role: str, password: str = PASSWORD) -> None:
        request = controller_pb2.AddUserRequest(name=name, role=role, password=password)
        self.fleet.stub().AddUser(request, timeout=30)

    @contextlib.contextmanager
    def log_in(self, name: str, password: str = PASSWORD) -> Iterator[httpx.Client]:
        """A browser logged in as ``name``."""
        with self.browser() as client:
            answer = _log_in(client, name, password)
            assert answer.status_code == 303, answer.text
            yield client

    def jobs(self) -> list[Any]:
        return list(self.fleet.stub().ListJobs(controller_pb2.ListJobsRequest(), timeout=30).jobs)

    def audit(self) -> list[Any]:
        request = controller_pb2.ListAuditRequest()
        return list(self.fleet.stub().ListAudit(request, timeout=30).events)

    def publish(
        self, version: str, notes: str = "", *, restarts_vpn: bool = False, min_from: str = ""
    ) -> None:
        """Publish a signed release (a stamped artifact) with ``notes`` (upgrading only
        from ``min_from`` on, when given)."""
        root = self.fleet.root
        artifact, notes_file = root / f"{version}.pyz", root / f"{version}.md"
        artifact.write_bytes(stamped(version))
        notes_file.write_text(notes)
        flags = ["--restarts-vpn-service"] if restarts_vpn else []
        flags += ["--min-from", min_from] if min_from else []
        self.fleet.cli(
            "releases", "publish", "--version", version, "--artifact", str(artifact),
            "--notes", str(notes_file), "--keys", str(self.fleet.keys.dir), *flags,
        )  # fmt: skip

    def gateways(self, running: dict[str, tuple[str, int]]) -> None:
        """Gateways that announce themselves: id -> (version, VPN users connected)."""
        for gateway_id, (version, vpn_users) in running.items():
            beat = bus_pb2.GatewayHeartbeat(
                gateway_id=gateway_id, version=version, vpn_sessions=vpn_users,
                at=datetime.now(UTC),
            )  # fmt: skip
            with self.fleet.as_gateway(gateway_id) as publisher:
                key = topology.report_key(gateway_id, topology.HEARTBEAT)
                publisher.publish(topology.REPORTS, key, beat)
        wait_for(
            lambda: running.keys() <= self.fleet.gateways().keys(),
            timeout=30,
            what=f"gateways {sorted(running)} known",
        )

    def report(self, job_id: str, gateway_id: str, state: int, **fields: Any) -> None:
        """Report ``state`` for ``gateway_id`` in the job, as the gateway does."""
        command_id = self._command_id(job_id, gateway_id)
        report = bus_pb2.StatusReport(
            report_id=str(uuid.uuid4()), command_id=command_id, job_id=job_id,
            gateway_id=gateway_id, state=state, at=datetime.now(UTC), **fields,
        )  # fmt: skip
        with self.fleet.as_gateway(gateway_id) as publisher:
            key = topology.report_key(gateway_id, topology.STATUS)
            publisher.publish(topology.REPORTS, key, report, message_id=report.report_id)

    def _command_id(self, job_id: str, gateway_id: str) -> str:
        queue = topology.gateway_queue(gateway_id).name

        def found() -> str | None:
            for message in self.rabbit.get_messages(self.vhost, queue):
                body = json.loads(message["payload"])
                if body.get("job_id") == job_id:
                    return str(body["command_id"])
            return None

        return wait_for(found, timeout=30, what=f"the command of {job_id} for {gateway_id}")


def _hidden(html: str, name: str) -> str:
    """The value of the hidden input ``name`` (the first one)."""
    found = re.search(rf'type="hidden" name="{name}" value="([^"]*)"', html)
    assert found, f"no hidden input {name} in the page:\n{html[:2000]}"
    return found.group(1)


def _log_in(client: httpx.Client, name: str, password: str, next_path: str = "") -> httpx.Response:
    """Fill in and send the login form (``next_path``: the page asked for before)."""
    page = client.get("/login", params={"next": next_path} if next_path else None)
    assert page.status_code == 200, page.text
    form = {"csrf_token": _csrf(page.text), "username": name, "password": password}
    return client.post("/login", data={**form, "next": _hidden(page.text, "next")})


@contextlib.contextmanager
def _serving(
    vhost: str, tmp_path: Path, procs: Procs, rabbit: Management, *extra: str
) -> Iterator[Console]:
    """A controller with its console on the fleet's free port, its queues bound."""
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        fleet.start_controller(None, *extra)
        for queue in (topology.CONTROLLER_REPORTS, topology.CONTROLLER_JOBS):
            exchange = queue.bindings[0].exchange.name
            wait_for(
                functools.partial(rabbit.bound, vhost, exchange, queue.name),
                timeout=30,
                what=f"the controller's {queue.name} bound to {exchange}",
                describe=procs.dump_logs,
            )
        verify = ssl.create_default_context(cafile=str(fleet.ca_cert))
        result = Console(fleet, fleet.console_url, verify, rabbit, vhost)
        wait_for(
            functools.partial(_answers, result),
            timeout=30,
            what=f"the console on {fleet.console_url}",
            interval=0.1,
            describe=procs.dump_logs,
        )
        yield result
    finally:
        fleet.close()


@pytest.fixture
def console(vhost: str, tmp_path: Path, procs: Procs, rabbit: Management) -> Iterator[Console]:
    """A controller that upgrades the fleet only (the releases are stamped artifacts, not
    runnable controllers)."""
    with _serving(vhost, tmp_path, procs, rabbit, "--no-self-upgrade") as serving:
        yield serving


@pytest.fixture
def upgrading_console(
    vhost: str, tmp_path: Path, procs: Procs, rabbit: Management
) -> Iterator[Console]:
    """A controller that moves itself to a release first (inline upgrade)."""
    with _serving(vhost, tmp_path, procs, rabbit) as serving:
        yield serving


def _answers(console: Console) -> bool:
    try:
        with console.browser() as client:
            return client.get("/login").status_code == 200
    except httpx.ConnectError as exc:
        assert "CERTIFICATE_VERIFY_FAILED" not in str(exc), exc
        return False


# --- Users and logging in ------------------------------------------------------------------


def test_the_first_start_says_how_to_make_the_first_admin(console: Console) -> None:
    assert console.fleet.controller is not None
    log = console.fleet.controller.log()
    assert "upgradectl users add admin --role admin --password-stdin" in log
    assert console.url.removeprefix("https://") in log


def test_users_are_added_listed_and_removed_with_upgradectl(console: Console) -> None:
    cli = console.fleet.cli
    added = cli("users", "add", "olive", "--role", "operator", "--password-stdin", input=PASSWORD)
    assert "added web console user olive (role operator)" in added.stdout

    add_shorty = ("users", "add", "shorty", "--role", "viewer", "--password-stdin")
    short = cli(*add_shorty, input="tiny\n", check=False)
    assert short.returncode == ExitCode.REJECTED, short.stderr
    assert "at least 12 characters" in short.stderr
    empty = cli(*add_shorty, input="", check=False)
    assert empty.returncode == ExitCode.USAGE and "no password on standard input" in empty.stderr
    add_olive = ("users", "add", "olive", "--role", "admin", "--password-stdin")
    again = cli(*add_olive, input=PASSWORD, check=False)
    assert again.returncode == ExitCode.REJECTED and "exists already" in again.stderr

    listed = json.loads(cli("users", "list", "--json").stdout)
    assert [(u["name"], u["role"], u["last_login_at"]) for u in listed] == [
        ("olive", "operator", None)
    ]
    assert listed[0]["created_by"] == "token:bootstrap-admin"
    with console.log_in("olive"):
        pass
    listed = json.loads(cli("users", "list", "--json").stdout)
    assert listed[0]["last_login_at"] is not None

    removed = cli("users", "remove", "olive")
    assert "removed web console user olive" in removed.stdout
    assert json.loads(cli("users", "list", "--json").stdout) == []
    gone = cli("users", "remove", "olive", check=False)
    assert gone.returncode == ExitCode.REJECTED and "no console user named" in gone.stderr

    rows = [e for e in console.audit() if e.action in ("AddUser", "RemoveUser")]
    assert {e.action for e in rows} == {"AddUser", "RemoveUser"}
    for row in rows:
        assert PASSWORD not in row.detail and "tiny" not in row.detail, row


def test_logging_in_and_out_with_a_strict_secure_http_only_cookie(console: Console) -> None:
    console.add_user("olive", "operator")
    with console.browser() as client:
        first = client.get("/jobs?page=2")
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=%2Fjobs%3Fpage%3D2"

        login_page = client.get("/login")
        cookie = login_page.headers["set-cookie"]
        assert cookie.startswith("hitless_session="), cookie
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags, cookie
        assert "max-age=43200" in flags, cookie
        headers = login_page.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"

        answer = _log_in(client, "olive", PASSWORD, next_path="/jobs")
        assert (answer.status_code, answer.headers["location"]) == (303, "/jobs")
        page = client.get("/maintenance")
        assert page.status_code == 200
        nav = page.text[page.text.index("<nav") : page.text.index("</nav>")]
        for link in ("/maintenance", "/jobs", "/releases", "/admins", 'action="/logout"'):
            assert link in nav, nav
        assert client.get("/").headers["location"] == "/maintenance"

        out = client.post("/logout", data={"csrf_token": _csrf(page.text)})
        assert (out.status_code, out.headers["location"]) == (303, "/login")
        assert client.get("/maintenance").status_code == 303
    actions = [(e.actor, e.action, e.outcome) for e in console.audit()]
    assert ("user:olive", "Login", "OK") in actions and ("user:olive", "Logout", "OK") in actions


def test_an_offsite_next_is_never_followed(console: Console) -> None:
    console.add_user("olive", "viewer")
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "jobs"):
        with console.browser() as client:
            page = client.get("/login", params={"next": target})
            form = {"csrf_token": _csrf(page.text), "username": "olive", "password": PASSWORD}
            answer = client.post("/login", data={**form, "next": target})
            assert answer.headers["location"] == "/maintenance", target


def test_a_body_too_large_is_refused_before_it_is_read(console: Console) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    with console.browser() as client:
        declared = client.post("/login", content=b"username=" + b"x" * 5_000_000, headers=form)
        assert declared.status_code == 413

        def chunks() -> Iterator[bytes]:  # no length declared; each field within its limit
            for field in range(6):
                yield f"&f{field}=".encode() + b"x" * 900_000

        streamed = client.post("/login", content=chunks(), headers=form)
        assert streamed.status_code == 413, streamed.text
        assert client.get("/login").status_code == 200


def test_a_wrong_password_is_refused_and_repeated_failures_slow_down(console: Console) -> None:
    console.add_user("olive", "operator")
    with console.browser() as client:
        for attempt in range(1, 6):
            answer = _log_in(client, "olive", f"not the password {attempt}")
            page = _Page(answer.text)
            assert answer.status_code == 403, answer.text
            assert WRONG in page.text("login-error")
            assert page.attrs("username")["value"] == "olive"
            assert page.attrs("password").get("value", "") == ""
        assert "the next try for 'olive' is taken from" in page.text("login-error")

        # Tries are refused while the name waits; wait for a wait long enough that the
        # right password, sent next, comes inside it.
        def throttled() -> httpx.Response | None:
            answer = _log_in(client, "olive", "still not the password")
            if answer.status_code == 429 and int(answer.headers["retry-after"]) >= 3:
                return answer
            return None

        refused = wait_for(throttled, timeout=60, what="a refusal with a wait of 3 s or more")
        said = _Page(refused.text).text("login-error")
        assert "too many failed logins in a row for 'olive': try again after" in said
        right = _log_in(client, "olive", PASSWORD)
        assert right.status_code == 429, "the right password is refused while the name waits"
        assert "too many failed logins" in _Page(right.text).text("login-error")
        assert client.get("/maintenance").status_code == 303, "not logged in"

        # A name that is no user is told the same, and slowed down the same.
        for _ in range(5):
            answer = _log_in(client, "nobody", PASSWORD)
            assert answer.status_code == 403 and WRONG in _Page(answer.text).text("login-error")
        assert "the next try for 'nobody' is taken from" in _Page(answer.text).text("login-error")
    outcomes = [e.outcome for e in console.audit() if e.action == "Login"]
    assert any(o.startswith("RESOURCE_EXHAUSTED: too many failed logins") for o in outcomes)
    assert any(o.startswith("UNAUTHENTICATED: wrong user name") for o in outcomes)


def test_a_removed_users_session_ends_at_once(console: Console) -> None:
    console.add_user("olive", "operator")
    with console.log_in("olive") as client:
        assert client.get("/maintenance").status_code == 200
        cookie = client.cookies["hitless_session"]
        console.fleet.stub().RemoveUser(controller_pb2.RemoveUserRequest(name="olive"), timeout=30)
        answer = client.get("/maintenance")
        assert (answer.status_code, answer.headers["location"]) == (
            303,
            "/login?next=%2Fmaintenance",
        )
    # A user added again under the name is another user: a copy of the old cookie does not
    # log it in.
    console.add_user("olive", "admin")
    with console.browser() as replay:
        replay.cookies.set("hitless_session", cookie, domain=replay.base_url.host)
        assert replay.get("/admins").status_code == 303
    with console.log_in("olive") as client:
        assert client.get("/admins").status_code == 200


# --- Forms: CSRF, roles, errors beside the fields -------------------------------------------


def test_a_form_without_the_csrf_token_or_with_another_is_refused_and_does_nothing(
    console: Console,
) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0)})
    console.add_user("ada", "admin")
    with console.log_in("ada") as client:
        start = {"version": "1.1.0", "accept_vpn_disruption": "on"}
        add = {"email": "ops@example.com"}
        for path, form in (("/upgrade/start", start), ("/admins/add", add), ("/logout", {})):
            for token in (None, "forged", ""):
                sent = form if token is None else {**form, "csrf_token": token}
                answer = client.post(path, data=sent)
                assert answer.status_code == 403, (path, token, answer.text)
                assert CSRF_REFUSED in _Page(answer.text).text("message")
        assert console.jobs() == []
        assert client.get("/admins").status_code == 200, "still logged in"
        assert "ops@example.com" not in client.get("/admins").text
    refused = [e for e in console.audit() if e.outcome.startswith("PERMISSION_DENIED: The form")]
    assert {(e.actor, e.action) for e in refused} == {
        ("user:ada", "StartUpgrade"),
        ("user:ada", "AddAdmin"),
    }
    with console.browser() as stranger:
        stranger.get("/login")
        answer = stranger.post("/login", data={"username": "ada", "password": PASSWORD})
        assert answer.status_code == 403 and CSRF_REFUSED in answer.text


def test_a_viewer_sees_no_upgrade_or_admin_forms_and_cannot_post_them(console: Console) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0)})
    console.add_user("vera", "viewer")
    console.add_user("otto", "operator")
    with console.log_in("vera") as viewer:
        page = viewer.get("/maintenance")
        parsed = _Page(page.text)
        assert parsed.text("latest-version") == "1.1.0"
        for absent in ("upgrade-latest-form", "upgrade-custom-form", "upgrade-latest"):
            assert not parsed.has(absent), absent
        assert 'action="/upgrade/plan"' not in page.text
        admins = viewer.get("/admins").text
        assert 'id="admins"' in admins
        assert "add-admin-form" not in admins and "remove-admin" not in admins

        token = _csrf(page.text)
        start = {"target": "latest", "accept_vpn_disruption": "on", "csrf_token": token}
        answer = viewer.post("/upgrade/start", data=start)
        assert answer.status_code == 403
        assert _Page(answer.text).text("message") == VIEWER_REFUSED
        answer = viewer.post("/admins/add", data={"email": "a@example.com", "csrf_token": token})
        assert answer.status_code == 403
        assert "Your role (viewer) may not change admins: ask an admin for the admin role." in (
            answer.text
        )
    with console.log_in("otto") as operator:
        token = _csrf(operator.get("/admins").text)
        answer = operator.post("/admins/add", data={"email": "a@example.com", "csrf_token": token})
        assert answer.status_code == 403 and "Your role (operator) may not change admins" in (
            answer.text
        )
    assert console.jobs() == []
    rows = [(e.actor, e.action, e.outcome[:17]) for e in console.audit()]
    assert ("user:vera", "StartUpgrade", "PERMISSION_DENIED") in rows


def test_an_unknown_or_malformed_version_is_shown_beside_the_field_and_kept(
    console: Console,
) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0)})
    console.add_user("otto", "operator")
    cli = console.fleet.cli("upgrade", "--version", "9.9.9", "--yes", check=False)
    assert cli.returncode == ExitCode.REJECTED
    expected = cli.stderr.strip().removeprefix("upgradectl: error: ")
    assert expected == "unknown version 9.9.9; available: 1.1.0"
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        typed_markup = '1.2"><script>alert(1)</script>'
        for typed, message in (
            ("9.9.9", expected),
            (typed_markup, "invalid version '1.2\"><script>alert(1)</script>'"),
            ("", "invalid version ''"),
        ):
            answer = client.post("/upgrade/plan", data={"version": typed, "csrf_token": token})
            assert answer.status_code == 400, answer.text
            page = _Page(answer.text)
            assert message in page.text("version-error")
            assert page.attrs("release-version")["value"] == typed
            assert page.attrs("release-version")["aria-describedby"] == "version-error"
            assert not page.has("plan")
            assert "<script>alert" not in answer.text
        form = answer.text[answer.text.index('id="upgrade-custom-form"') :]
        assert form.index('id="version-error"') < form.index("</form>"), "beside the field"
    assert console.jobs() == []


def test_a_release_that_restarts_the_vpn_service_needs_the_confirmation(
    console: Console,
) -> None:
    console.publish("2.0.0", "Restarts the VPN service.", restarts_vpn=True)
    console.gateways({"gw-1": ("1.0.0", 3), "gw-2": ("1.0.0", 4)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        answer = client.post("/upgrade/plan", data={"version": "2.0.0", "csrf_token": token})
        assert answer.status_code == 200, answer.text
        page = _Page(answer.text)
        assert "7 VPN users connected now will be disconnected" in page.text("vpn-warning")
        accept = page.attrs("accept-vpn")
        assert accept["name"] == "accept_vpn_disruption" and "required" in accept
        assert "checked" not in accept
        assert 'for="accept-vpn"' in answer.text
        for gateway_id in ("gw-1", "gw-2"):
            assert "1.0.0 2.0.0 UPGRADE" in page.text(f"plan-{gateway_id}")
        hidden = {
            name: _hidden(answer.text, name) for name in ("version", "gateways", "request_id")
        }
        assert hidden["version"] == "2.0.0" and hidden["gateways"] == "gw-1,gw-2"

        unconfirmed = client.post("/upgrade/start", data={**hidden, "csrf_token": token})
        assert unconfirmed.status_code == 400
        error = _Page(unconfirmed.text).text("confirm-error")
        assert "release 2.0.0 restarts the VPN service" in error
        assert "7 connected VPN user(s)" in error
        assert console.jobs() == []

        confirmed = {**hidden, "accept_vpn_disruption": "on", "csrf_token": token}
        started = client.post("/upgrade/start", data=confirmed)
        assert started.status_code == 303, started.text
        # The same form sent twice (a double click, a reload) starts one job.
        again = client.post("/upgrade/start", data=confirmed)
        assert again.headers["location"] == started.headers["location"]
    [job] = console.jobs()
    assert started.headers["location"] == f"/jobs/{job.job_id}"
    assert (job.source, job.requested_by, job.target_version) == ("ui", "user:otto", "2.0.0")
    rows = [e for e in console.audit() if e.action == "StartUpgrade"]
    assert [(e.actor, e.outcome.split(":")[0]) for e in reversed(rows)] == [
        ("user:otto", "FAILED_PRECONDITION"),
        ("user:otto", "OK"),
        ("user:otto", "OK"),
    ]


def test_a_downgrade_needs_its_own_confirmation(console: Console) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("2.0.0", 0), "gw-2": ("1.0.0", 0)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        answer = client.post("/upgrade/plan", data={"target": "latest", "csrf_token": token})
        page = _Page(answer.text)
        assert "DOWNGRADE" in page.text("plan-gw-1") and "UPGRADE" in page.text("plan-gw-2")
        assert page.attrs("allow-downgrade")["name"] == "allow_downgrade"
        assert not page.has("vpn-warning") and not page.has("accept-vpn")
        form = {"version": "1.1.0", "csrf_token": token}
        refused = client.post("/upgrade/start", data=form)
        assert refused.status_code == 400
        assert "1.1.0 is older than what gw-1 (2.0.0) run(s)" in refused.text
        assert console.jobs() == []
        started = client.post("/upgrade/start", data={**form, "allow_downgrade": "on"})
        assert started.status_code == 303
    [job] = console.jobs()
    assert {g.gateway_id for g in job.gateways} == {"gw-1", "gw-2"}


def test_a_path_through_a_release_between_is_shown_in_the_plan_and_the_job(
    console: Console,
) -> None:
    console.publish("1.1.0")
    console.publish("1.2.0", min_from="1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0), "gw-2": ("1.1.0", 0)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        answer = client.post("/upgrade/plan", data={"target": "latest", "csrf_token": token})
        page = _Page(answer.text)
        assert "1.0.0 1.2.0 via 1.1.0 UPGRADE" in page.text("plan-gw-1")
        assert "1.1.0 1.2.0 UPGRADE" in page.text("plan-gw-2")
        started = client.post("/upgrade/start", data={"version": "1.2.0", "csrf_token": token})
        assert started.status_code == 303, started.text
        [job] = console.jobs()
        page = _Page(client.get(f"/jobs/{job.job_id}").text)
        assert "1.1.0 (hop 1 of 2)" in page.text("job-gw-gw-1")
        assert "hop" not in page.text("job-gw-gw-2")


def test_admins_are_added_and_removed_with_errors_beside_the_field(console: Console) -> None:
    console.add_user("ada", "admin")
    with console.log_in("ada") as client:
        token = _csrf(client.get("/admins").text)
        typed = "<b>not-an-address"
        bad = client.post("/admins/add", data={"email": typed, "csrf_token": token})
        assert bad.status_code == 400
        page = _Page(bad.text)
        assert page.text("email-error")
        assert page.attrs("admin-email")["value"] == typed
        assert "<b>not" not in bad.text
        added = client.post("/admins/add", data={"email": "Ops@Example.com", "csrf_token": token})
        assert (added.status_code, added.headers["location"]) == (303, "/admins")
        assert "Ops@example.com" in _Page(client.get("/admins").text).text("admins")
        form = {"email": "Ops@example.com", "csrf_token": token}
        assert client.post("/admins/remove", data=form).status_code == 303
        assert "Ops@example.com" not in client.get("/admins").text
    listed = console.fleet.stub().ListAdmins(controller_pb2.ListAdminsRequest(), timeout=30)
    assert list(listed.admins) == []
    rows = [(e.actor, e.action, e.outcome[:2]) for e in console.audit()]
    assert ("user:ada", "AddAdmin", "OK") in rows and ("user:ada", "RemoveAdmin", "OK") in rows


# --- Pages that show text from outside ------------------------------------------------------


def test_release_notes_and_markup_from_outside_are_shown_as_text(console: Console) -> None:
    notes = (
        "# Fixes\n\n"
        "<script>alert('notes')</script>\n\n"
        '<img src=x onerror="alert(1)">\n\n'
        "[a link](javascript:alert(1)) and **bold**\n"
    )
    console.publish("1.1.0", notes, restarts_vpn=True)
    console.gateways({"gw-1": ("1.0.0", 1)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        maintenance = client.get("/maintenance")
        token = _csrf(maintenance.text)
        plan = client.post("/upgrade/plan", data={"target": "latest", "csrf_token": token})
        assert "1 VPN user connected now will be disconnected" in plan.text
        for answer, notes_id in (
            (maintenance, "latest-notes"),
            (client.get("/releases/1.1.0"), "release-notes"),
            (plan, "plan-notes"),
        ):
            assert answer.status_code == 200
            html = answer.text
            assert "<script>alert" not in html and "<img" not in html, html
            assert "javascript:" not in html.split(f'id="{notes_id}"')[1].split('href="')[-1][:12]
            assert "&lt;script&gt;alert('notes')&lt;/script&gt;" in html
            assert "<h1>Fixes</h1>" in html and "<strong>bold</strong>" in html
            assert "alert('notes')" in _Page(html).text(notes_id)
        releases = _Page(client.get("/releases").text)
        assert "1.1.0 SIGNED Notes yes" in releases.text("releases")
        assert client.get("/releases/9.9.9").status_code == 404
        assert client.get("/releases/%3Cb%3E").status_code == 400
        missing = client.get("/jobs/%3Cscript%3Ex")
        assert missing.status_code == 404 and "<script>x" not in missing.text


# --- A job from the console, live --------------------------------------------------------


def _stream_events(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The events (id, data) in the lines of an event stream, as they come."""
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
            continue
        if "data" in fields:
            yield int(fields["id"]), json.loads(fields["data"])
        fields = {}


def _events(lines: Iterator[str], count: int) -> list[tuple[int, dict[str, Any]]]:
    """The next ``count`` events of an event stream."""
    return list(itertools.islice(_stream_events(lines), count))


class _Follower:
    """Follows a job's event stream in a thread the way a browser's EventSource does:
    after the stream ends or breaks it connects again, sending the id of the last event it
    got as Last-Event-ID, until the event that finishes the job (or a 204)."""

    def __init__(self, console: Console, cookies: httpx.Cookies, path: str) -> None:
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.connections = 0
        self.breaks: list[str] = []
        self.finished = False
        self._client = httpx.Client(
            base_url=console.url, verify=console.verify, cookies=cookies, timeout=30
        )
        self._path = path
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.finished and time.monotonic() < deadline:
            last = {"Last-Event-ID": str(self.events[-1][0])} if self.events else {}
            try:
                with self._client.stream("GET", self._path, headers=last) as stream:
                    if stream.status_code == 204:
                        self.finished = True
                        return
                    assert stream.status_code == 200, stream.status_code
                    self.connections += 1
                    for event in _stream_events(stream.iter_lines()):
                        self.events.append(event)
                        self.finished = bool(event[1]["finished"])
            except httpx.HTTPError as exc:
                self.breaks.append(repr(exc))
            if not self.finished:
                time.sleep(0.2)  # EventSource's reconnection delay (retry:), shortened

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._client.close()


def test_a_job_started_in_the_console_streams_its_events_and_resumes_after_a_break(
    console: Console,
) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0), "gw-2": ("1.0.0", 2)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        started = client.post("/upgrade/start", data={"target": "latest", "csrf_token": token})
        assert started.status_code == 303, started.text
        job_id = started.headers["location"].rsplit("/", 1)[1]
        # The start answers once the job is recorded; it is RUNNING once its commands are out.
        page = wait_for(
            lambda: (
                (p := _Page(client.get(f"/jobs/{job_id}").text)).text("job-state") == "RUNNING"
                and p
            ),
            timeout=30,
            what="the job dispatched",
        )
        for gateway_id in ("gw-1", "gw-2"):
            assert "QUEUED" in page.text(f"job-gw-{gateway_id}")
        table = page.attrs("job-gateways")
        assert table["data-events"] == f"/jobs/{job_id}/events"
        after = int(table["data-after"])

        console.report(
            job_id, "gw-1", GS.GATEWAY_JOB_STATE_DOWNLOADING, bytes_done=1, bytes_total=4
        )
        url = f"/jobs/{job_id}/events"
        with client.stream("GET", url, params={"after": after}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            [(seq, first)] = _events(stream.iter_lines(), 1)
        assert seq > after
        assert (first["gateway_id"], first["gateway_state"]) == ("gw-1", "DOWNLOADING")
        assert first["progress"] == "25% of 4 B" and not first["finished"]

        # While nobody listens, gw-1 succeeds; a reconnect with Last-Event-ID gets what came
        # after the last event seen, and nothing twice.
        console.report(job_id, "gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED)
        headers = {"Last-Event-ID": str(seq)}
        with client.stream("GET", url, params={"after": after}, headers=headers) as stream:
            lines = stream.iter_lines()
            [(resumed_seq, resumed)] = _events(lines, 1)
            assert resumed_seq > seq
            assert (resumed["gateway_id"], resumed["gateway_state"]) == ("gw-1", "SUCCEEDED")
            console.report(job_id, "gw-2", GS.GATEWAY_JOB_STATE_SUCCEEDED, vpn_sessions_dropped=2)
            rest = _events(lines, 2)
            assert [e["gateway_id"] for _, e in rest] == ["gw-2", None], rest
            assert rest[0][1]["vpn_sessions_dropped"] == 2
            assert (rest[1][1]["job_state"], rest[1][1]["finished"]) == ("SUCCEEDED", True)
            assert [s for s, _ in rest] == sorted(s for s, _ in rest)
            assert list(lines) == [], "the stream ends with the job"
        finished = client.get(url, headers={"Last-Event-ID": str(rest[-1][0])})
        assert finished.status_code == 204, "a finished job tells EventSource to stop"

        page = _Page(client.get(f"/jobs/{job_id}").text)
        assert page.text("job-state") == "SUCCEEDED"
        assert page.attrs("job-gateways")["data-finished"] == "true"
        jobs = _Page(client.get("/jobs").text).text("jobs")
        assert job_id in jobs and "ui" in jobs and "user:otto" in jobs
        assert client.get("/jobs/rejected").status_code == 200
    [job] = console.jobs()
    assert (job.source, job.requested_by) == ("ui", "user:otto")
    [row] = [e for e in console.audit() if e.action == "StartUpgrade"]
    assert (row.actor, row.outcome) == ("user:otto", "OK")


def test_an_event_stream_resumes_across_the_controllers_inline_upgrade(
    upgrading_console: Console,
) -> None:
    console, fleet = upgrading_console, upgrading_console.fleet
    info = controller_pb2.GetControllerRequest()
    before = fleet.stub().GetController(info, timeout=30)
    fleet.release("1.1.0")  # a real release: the controller moves to it first
    console.gateways({"gw-1": ("1.0.0", 0), "gw-2": ("1.0.0", 0)})
    console.add_user("otto", "operator")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        started = client.post("/upgrade/start", data={"target": "latest", "csrf_token": token})
        assert started.status_code == 303, started.text
        job_id = started.headers["location"].rsplit("/", 1)[1]
        follower = _Follower(console, client.cookies, f"/jobs/{job_id}/events")
        try:
            wait_for(
                lambda: fleet.stub().GetController(info, timeout=30).pid != before.pid,
                timeout=90,
                what="the controller's new version serving",
                describe=fleet.procs.dump_logs,
            )
            for gateway_id in ("gw-1", "gw-2"):
                console.report(job_id, gateway_id, GS.GATEWAY_JOB_STATE_SUCCEEDED)
        finally:
            follower.join(timeout=90)
        # The same session, on the same port, from the new version's own pages.
        page = _Page(client.get("/maintenance").text)
        assert page.text("controller-version") == "1.1.0"
    assert follower.finished, (follower.events, follower.breaks, fleet.procs.dump_logs())
    assert follower.connections >= 2, "the stream was opened again after the hand-over"
    seqs = [seq for seq, _ in follower.events]
    assert seqs == sorted(set(seqs)), "no event twice, none out of order"
    changes = [(e["gateway_id"], e["gateway_state"] or e["job_state"]) for _, e in follower.events]
    assert {("gw-1", "SUCCEEDED"), ("gw-2", "SUCCEEDED")} <= set(changes), changes
    assert changes[-1] == (None, "SUCCEEDED"), changes
    assert fleet.controller is not None
    wait_for(lambda: fleet.controller.popen.poll() == 0, timeout=30, what="the old one gone")


@pytest.mark.parametrize(
    ("http", "passed"), [(HostPort("0.0.0.0", 8443), "0.0.0.0:8443"), (None, "off")]
)
def test_the_next_controller_version_serves_the_console_where_this_one_does(
    tmp_path: Path, http: HostPort | None, passed: str
) -> None:
    config = ControllerConfig(
        listen=HostPort("127.0.0.1", 50051),
        db_url="sqlite:///controller.db",
        bus=BusConfig(),
        data_dir=tmp_path,
    )
    upgrader = ControllerUpgrader(
        config, ArtifactStore(tmp_path / "artifacts"), cast(Trust, None), lambda: None, http=http
    )
    # In the environment, not on the command line: a version from before the console
    # ignores a variable it does not know, where an unknown flag would stop it.
    assert "--http" not in upgrader._argv(tmp_path / "release.pyz")
    assert upgrader._secrets()["HITLESS_HTTP_LISTEN"] == passed


# --- A staged rollout, steered from the console ----------------------------------------------


def _job_page(client: httpx.Client, job_url: str) -> _Page:
    answer = client.get(job_url)
    assert answer.status_code == 200, answer.text
    return _Page(answer.text)


def _job_page_in(client: httpx.Client, job_url: str, state: str) -> _Page:
    """The job's page once it shows the job in ``state``."""

    def shown() -> _Page | None:
        page = _job_page(client, job_url)
        return page if page.text("job-state") == state else None

    return wait_for(shown, timeout=30, what=f"the job's page showing it {state}")


def _row(page: _Page, gateway_id: str) -> list[str]:
    """A gateway's row on the job page: GATEWAY, WAVE (when there are waves), STATE, ..."""
    return page.text(f"job-gw-{gateway_id}").split()


def test_a_staged_rollout_is_shown_and_paused_resumed_and_cancelled_from_its_page(
    console: Console,
) -> None:
    """gw-1 forms the first of two waves and holds the one place in flight (--max-parallel
    1): its command waits in its queue, for the test to report, so nothing moves while the
    operator steers."""
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0), "gw-2": ("1.0.0", 0), "gw-3": ("1.0.0", 0)})
    console.add_user("otto", "operator")
    console.add_user("vera", "viewer")
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        # A rollout sent to the plan fills in the start form's fields.
        plan = client.post(
            "/upgrade/plan", data={"target": "latest", "waves": "1,100%", "csrf_token": token}
        )
        assert plan.status_code == 200, plan.text
        planned = _Page(plan.text)
        assert planned.attrs("rollout-waves")["value"] == "1,100%"
        assert planned.attrs("rollout-max-parallel")["value"] == ""
        assert "3 gateways above" in planned.text("rollout-fields")
        form = {name: _hidden(plan.text, name) for name in ("version", "gateways", "request_id")}
        rollout = {"waves": "1,100%", "max_parallel": "1", "max_failures": "0"}
        started = client.post("/upgrade/start", data={**form, **rollout, "csrf_token": token})
        assert started.status_code == 303, started.text
        job_url = started.headers["location"]
        job_id = job_url.rsplit("/", 1)[1]

        page = _job_page_in(client, job_url, "RUNNING")
        assert page.text("rollout-waves") == "1,100%"
        assert page.text("rollout-wave") == "wave 1 of 2"
        assert page.text("rollout-cap") == "at most 1 gateway in flight"
        assert (
            page.text("rollout-failures") == "ABORTED when more than 0 gateways fail or roll back"
        )
        assert "WAVE STATE" in page.text("job-gateways")
        assert _row(page, "gw-1")[:3] == ["gw-1", "1", "QUEUED"]
        for gateway_id in ("gw-2", "gw-3"):
            assert _row(page, gateway_id)[:3] == [gateway_id, "2", "QUEUED"]
        assert "hidden" not in page.attrs("pause-form")
        assert "hidden" in page.attrs("resume-form")
        assert page.attrs("cancel-reason")["name"] == "reason"
        after = int(page.attrs("job-gateways")["data-after"])

        # A viewer sees the rollout but no steering, and is refused each action.
        with console.log_in("vera") as viewer:
            seen = viewer.get(job_url)
            assert _Page(seen.text).text("rollout-wave") == "wave 1 of 2"
            assert not _Page(seen.text).has("job-actions")
            viewer_token = _csrf(seen.text)
            for action in ("pause", "resume", "cancel"):
                sent = {"csrf_token": viewer_token, "reason": "not mine to say"}
                answer = viewer.post(f"{job_url}/{action}", data=sent)
                assert answer.status_code == 403, (action, answer.text)
                assert _Page(answer.text).text("message") == (
                    f"Your role (viewer) may not {action} jobs: ask an admin for the operator role."
                )
        assert _job_page(client, job_url).text("job-state") == "RUNNING", "nothing changed"

        paused = client.post(f"{job_url}/pause", data={"csrf_token": token})
        assert (paused.status_code, paused.headers["location"]) == (303, job_url)
        page = _job_page(client, job_url)
        assert page.text("job-state") == "PAUSED"
        assert page.text("job-stop-reason") == "paused by user:otto"
        assert "hidden" in page.attrs("pause-form")
        assert "hidden" not in page.attrs("resume-form")
        # The live stream says so too.
        with client.stream("GET", f"{job_url}/events", params={"after": after}) as stream:
            states = (e["job_state"] for _, e in _stream_events(stream.iter_lines()))
            assert "PAUSED" in states

        resumed = client.post(f"{job_url}/resume", data={"csrf_token": token})
        assert (resumed.status_code, resumed.headers["location"]) == (303, job_url)
        page = _job_page(client, job_url)
        assert page.text("job-state") == "RUNNING"
        assert not page.has("job-stop-reason")
        assert "hidden" not in page.attrs("pause-form")

        # gw-1 takes its command: cancelling withdraws the others' and waits for gw-1.
        console.report(
            job_id, "gw-1", GS.GATEWAY_JOB_STATE_DOWNLOADING, bytes_done=1, bytes_total=4
        )
        wait_for(
            lambda: _row(_job_page(client, job_url), "gw-1")[2] == "DOWNLOADING",
            timeout=30,
            what="gw-1 DOWNLOADING on the job's page",
        )
        reason = "maintenance window moved"
        cancelled = client.post(f"{job_url}/cancel", data={"csrf_token": token, "reason": reason})
        assert (cancelled.status_code, cancelled.headers["location"]) == (303, job_url)
        page = _job_page(client, job_url)
        assert page.text("job-state") == "RUNNING"
        assert page.text("job-ending").startswith("Ending CANCELLED once the gateways in flight")
        assert page.text("job-stop-reason") == f"cancelled by user:otto: {reason}"
        assert [_row(page, g)[2] for g in ("gw-1", "gw-2", "gw-3")] == [
            "DOWNLOADING",
            "CANCELLED",
            "CANCELLED",
        ]
        assert not page.has("job-actions"), "an ending job has nothing left to steer"
        assert "RUNNING (ending CANCELLED)" in _Page(client.get("/jobs").text).text(f"job-{job_id}")
        again = client.post(f"{job_url}/pause", data={"csrf_token": token})
        assert again.status_code == 409
        assert f"job {job_id} cannot be paused: it is ending CANCELLED" in (
            _Page(again.text).text("message")
        )

        console.report(job_id, "gw-1", GS.GATEWAY_JOB_STATE_SUCCEEDED)
        page = _job_page_in(client, job_url, "CANCELLED")
        assert not page.has("job-ending") and not page.has("job-actions")
        assert page.attrs("job-gateways")["data-finished"] == "true"
        assert page.text("rollout-wave") == "no wave in progress (2 waves)"
        assert "CANCELLED" in _Page(client.get("/jobs").text).text(f"job-{job_id}")
        late = client.post(f"{job_url}/resume", data={"csrf_token": token})
        assert late.status_code == 409
        assert "cannot move from CANCELLED to RUNNING" in _Page(late.text).text("message")
        missing = client.post("/jobs/no-such-job/cancel", data={"csrf_token": token})
        assert missing.status_code == 404
        assert "no job no-such-job" in _Page(missing.text).text("message")
    [job] = console.jobs()
    assert job.job_id == job_id
    rows = [(e.actor, e.action, e.outcome.split(":")[0]) for e in reversed(console.audit())]
    steering = [r for r in rows if r[1] in ("PauseJob", "ResumeJob", "CancelJob")]
    assert steering == [
        ("user:vera", "PauseJob", "PERMISSION_DENIED"),
        ("user:vera", "ResumeJob", "PERMISSION_DENIED"),
        ("user:vera", "CancelJob", "PERMISSION_DENIED"),
        ("user:otto", "PauseJob", "OK"),
        ("user:otto", "ResumeJob", "OK"),
        ("user:otto", "CancelJob", "OK"),
        ("user:otto", "PauseJob", "FAILED_PRECONDITION"),
        ("user:otto", "ResumeJob", "FAILED_PRECONDITION"),
        ("user:otto", "CancelJob", "NOT_FOUND"),
    ]
    [start] = [e for e in console.audit() if e.action == "StartUpgrade"]
    assert 'waves: "1,100%" max_parallel: 1 max_failures: "0"' in start.detail, start.detail
    [cancel] = [e for e in console.audit() if e.action == "CancelJob" and e.outcome == "OK"]
    assert f'reason: "{reason}"' in cancel.detail


def test_a_rollout_the_engine_refuses_is_shown_beside_its_fields_and_starts_nothing(
    console: Console,
) -> None:
    console.publish("1.1.0")
    console.gateways({"gw-1": ("1.0.0", 0), "gw-2": ("1.0.0", 0)})
    console.add_user("otto", "operator")
    cli = console.fleet.cli("upgrade", "--latest", "--waves", "1,50%", "--yes", check=False)
    assert cli.returncode == ExitCode.REJECTED, cli.stderr
    expected = cli.stderr.strip().removeprefix("upgradectl: error: ")
    assert expected.startswith("--waves ends at 1 of the job's 2 gateways"), expected
    markup = '1,"><b id="injected">'
    with console.log_in("otto") as client:
        token = _csrf(client.get("/maintenance").text)
        plan = client.post("/upgrade/plan", data={"target": "latest", "csrf_token": token})
        form = {name: _hidden(plan.text, name) for name in ("version", "gateways", "request_id")}
        for field, typed, said in (
            ("waves", "1,50%", expected),
            ("waves", markup, "is neither a count nor a percentage"),
            ("max_parallel", "two", "--max-parallel 'two' is not a whole number"),
            ("max_parallel", "²", "--max-parallel '²' is not a whole number"),
            ("max_failures", "lots", "--max-failures 'lots' is neither a count nor a percentage"),
            ("soak_seconds", "ten", "--soak 'ten' is not a whole number of seconds"),
            ("soak_seconds", "4000", "--soak 4000s is out of range: give 0 (no soak) to 3600s"),
        ):
            answer = client.post("/upgrade/start", data={**form, field: typed, "csrf_token": token})
            assert answer.status_code == 400, (field, typed, answer.text)
            page = _Page(answer.text)
            assert said in page.text("rollout-error"), page.text("rollout-error")
            assert not page.has("confirm-error")
            kept = page.attrs(f"rollout-{field.replace('_', '-')}")
            assert kept["value"] == typed, "the field keeps what was typed"
            assert kept["aria-invalid"] == "true"
            assert kept["aria-describedby"] == "rollout-error"
            assert "<b id" not in answer.text and not page.has("injected")
            fieldset = answer.text[answer.text.index('id="rollout-fields"') :]
            assert fieldset.index('id="rollout-error"') < fieldset.index("</fieldset>")
        assert console.jobs() == []
        # The refused page's form, with the rollout fixed, starts the job.
        fixed = {name: _hidden(answer.text, name) for name in ("version", "gateways", "request_id")}
        started = client.post(
            "/upgrade/start",
            data={**fixed, "waves": "50%,100%", "soak_seconds": "30", "csrf_token": token},
        )
        assert started.status_code == 303, started.text
        page = _job_page(client, started.headers["location"])
        assert page.text("rollout-waves") == "50%,100%"
        assert page.text("rollout-cap") == "no cap" and page.text("rollout-failures") == "no limit"
        assert page.text("rollout-soak") == "30 s after each swap"
    [job] = console.jobs()
    assert job.source == "ui" and job.soak_seconds == 30
    rows = [e for e in reversed(console.audit()) if e.action == "StartUpgrade"]
    outcomes = [(e.actor, e.outcome.split(":")[0]) for e in rows]
    assert outcomes[1:] == [("user:otto", "INVALID_ARGUMENT")] * 7 + [("user:otto", "OK")]
    assert outcomes[0][1] == "INVALID_ARGUMENT", "the CLI's try"
