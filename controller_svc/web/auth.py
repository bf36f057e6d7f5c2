"""Logging in and out, and who may open a page or post a form.

Every page but the login page is ``guarded``: it needs a logged-in user (else it sends the
browser to /login, and back afterwards), a form it receives must carry the session's CSRF
token (else 403, nothing done), and the user's role must be the one the gRPC method the
page stands for needs (``access.role_needed``: the same rule for both ways in). The role
is read from the database on every request.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from controller_svc.access import Caller, PermissionDenied, Role, Unauthenticated, role_needed
from controller_svc.users import ACTOR_PREFIX, LoginThrottled
from controller_svc.web import session
from controller_svc.web.console import Console, status_of
from controller_svc.web.pages import message, render
from hitless import logs
from hitless.errors import HitlessError

log = logs.get(__name__)

CSRF_REFUSED = (
    "The form expired or did not come from this console (CSRF check failed); reload and try again."
)
HOME = "/maintenance"
_CONTROLLER = "/hitless.v1.Controller/"
# What one form may hold (the start form carries every planned gateway's id in one field).
_FORM_LIMITS = {"max_files": 0, "max_fields": 50, "max_part_size": 1024 * 1024}

Handler = Callable[[Request, Caller, FormData | None], Response]
Endpoint = Callable[[Request], Awaitable[Response]]


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def caller_of(request: Request) -> Caller | None:
    """The user logged in on ``request``'s session, with the role it has now; None when
    nobody is, or the user was removed since (also when a user of that name was added
    again: that is another user)."""
    found = session.logged_in(request)
    if found is None:
        return None
    name, since = found
    user = console_of(request).users.get(name)
    if user is None or user.created_at.timestamp() > since:
        session.log_out(request)
        return None
    return Caller(
        ACTOR_PREFIX + user.name, user.role, request.client.host if request.client else ""
    )


def guarded(method: str, doing: str = "") -> Callable[[Handler], Endpoint]:
    """Make ``handler`` an endpoint for users whose role may call the gRPC method
    ``method`` (e.g. "StartUpgrade"); ``doing`` says what it does, for the refusal ("start
    upgrades"). The handler runs in a worker thread (the domain services block) and gets
    the form of a POST, its CSRF token checked."""
    needed = role_needed(_CONTROLLER + method)
    assert needed is not None, method

    def wrap(handler: Handler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            form = await request.form(**_FORM_LIMITS) if request.method == "POST" else None
            return await run_in_threadpool(_admitted, request, form, handler, method, needed, doing)

        return endpoint

    return wrap


def _admitted(
    request: Request,
    form: FormData | None,
    handler: Handler,
    method: str,
    needed: Role,
    doing: str,
) -> Response:
    console = console_of(request)
    caller = caller_of(request)
    if caller is None:
        return to_login(request)
    if form is not None and not session.csrf_matches(request, form):
        console.refused(request, caller, method, PermissionDenied(CSRF_REFUSED))
        return message(request, caller, 403, "Refused", CSRF_REFUSED)
    if caller.role < needed:
        refusal = PermissionDenied(
            f"Your role ({caller.role}) may not {doing or 'do this'}: ask an admin for the "
            f"{needed} role."
        )
        if form is not None:
            console.refused(request, caller, method, refusal)
        return message(request, caller, 403, "Refused", str(refusal))
    try:
        return handler(request, caller, form)
    except HitlessError as exc:
        code, _ = status_of(exc)
        log.warning("console_refused", path=request.url.path, status=code, reason=str(exc))
        return message(request, caller, code, "Not done", str(exc))


def to_login(request: Request) -> RedirectResponse:
    """To the login page, which leads back to this page (of a GET) afterwards."""
    if request.method != "GET":
        return RedirectResponse("/login", 303)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(here, safe='')}", 303)


def local_path(target: str | None) -> str:
    """``target`` when it is a path on this console (never another site: no scheme, no
    host, no ``//`` or backslash), else the home page."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or any(ord(c) < 32 for c in target):
        return HOME
    return target


async def login_page(request: Request) -> Response:
    return _login_form(request, 200, next_path=local_path(request.query_params.get("next")))


async def login(request: Request) -> Response:
    form = await request.form(**_FORM_LIMITS)
    return await run_in_threadpool(_login, request, form)


def _login(request: Request, form: FormData) -> Response:
    console = console_of(request)
    name, password = str(form.get("username") or ""), str(form.get("password") or "")
    next_path = local_path(str(form.get("next") or ""))
    if not session.csrf_matches(request, form):
        return message(request, None, 403, "Refused", CSRF_REFUSED)
    actor = ACTOR_PREFIX + name[:64]
    try:
        caller = console.users.authenticate(name, password, datetime.now(UTC))
    except Unauthenticated as exc:
        console.record(request, actor, "Login", "", f"{status_of(exc)[1]}: {exc}")
        if isinstance(exc, LoginThrottled):
            wait_s = max(1, math.ceil((exc.retry_at - datetime.now(UTC)).total_seconds()))
            headers = {"Retry-After": str(wait_s)}
            return _login_form(request, 429, next_path, name, str(exc), headers)
        return _login_form(request, 403, next_path, name, str(exc))
    session.log_in(request, name)
    console.record(request, caller.actor, "Login", "", "OK")
    return RedirectResponse(next_path, 303)


def _login_form(
    request: Request,
    status: int,
    next_path: str,
    name: str = "",
    error: str = "",
    headers: dict[str, str] | None = None,
) -> Response:
    return render(
        request, None, "login.html", status, headers, name=name, error=error, next=next_path
    )


async def logout(request: Request) -> Response:
    form = await request.form(**_FORM_LIMITS)
    return await run_in_threadpool(_logout, request, form)


def _logout(request: Request, form: FormData) -> Response:
    caller = caller_of(request)
    if caller is None:
        return RedirectResponse("/login", 303)
    if not session.csrf_matches(request, form):
        return message(request, caller, 403, "Refused", CSRF_REFUSED)
    console_of(request).record(request, caller.actor, "Logout", "", "OK")
    session.log_out(request)
    return RedirectResponse("/login", 303)


def routes() -> list[Route]:
    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
