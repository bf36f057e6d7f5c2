"""The console's Starlette application: its routes (one module per area), the session
cookie, the headers every answer carries, and the pages for what no route handles."""

from __future__ import annotations

import threading

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller_svc.access import Audit
from controller_svc.admins import Admins
from controller_svc.engine import Engine
from controller_svc.rejections import Rejections
from controller_svc.users import Users
from controller_svc.web import admins as admin_pages
from controller_svc.web import auth, jobs, maintenance, releases, session
from controller_svc.web.console import Console
from controller_svc.web.pages import SECURITY_HEADERS, message, static_file
from hitless import logs

log = logs.get(__name__)

# The largest form: the start form carries every planned gateway's id.
MAX_BODY_BYTES = 4 * 1024 * 1024
_STATIC_TYPES = {
    "console.css": "text/css; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
}


def build_app(
    *,
    engine: Engine,
    admins: Admins,
    rejections: Rejections,
    audit: Audit,
    users: Users,
    secret: str,
    stopping: threading.Event,
) -> Starlette:
    """The console for the controller whose services these are (the objects its gRPC API
    uses); ``secret`` signs the session cookies (``session.load_secret``); ``stopping`` is
    set when the controller stops or hands over, which ends the open event streams."""
    static = {name: static_file(name) for name in _STATIC_TYPES}

    async def static_route(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            raise HTTPException(404)
        return Response(static[name], media_type=_STATIC_TYPES[name])

    app = Starlette(
        routes=[
            *auth.routes(),
            *maintenance.routes(),
            *jobs.routes(),
            *releases.routes(),
            *admin_pages.routes(),
            Route("/static/{name}", static_route, methods=["GET"]),
        ],
        middleware=[
            Middleware(_SecurityHeaders),
            Middleware(_BodyLimit),
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie=session.COOKIE,
                max_age=session.MAX_AGE_S,
                same_site="strict",
                https_only=True,
            ),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _failed},
    )
    app.state.console = Console(engine, admins, rejections, audit, users, stopping)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return message(request, None, exc.status_code, "Not here", str(exc.detail))


async def _failed(request: Request, exc: Exception) -> Response:
    # Served outside the session middleware: a page without a session's CSRF token.
    log.exception("console_failed", path=request.url.path, error=str(exc))
    return PlainTextResponse("The console failed on this page: the controller's log says why.", 500)


class _BodyLimit:
    """Refuses (413) a request body larger than MAX_BODY_BYTES before it is read whole:
    forms are parsed before the session is checked, the login form by anyone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            await _too_large(scope, receive, send)
            return
        seen = 0

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise HTTPException(413, f"a request body is at most {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, receiving, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    text = f"A request body is at most {MAX_BODY_BYTES} bytes here."
    await PlainTextResponse(text, 413)(scope, receive, send)


class _SecurityHeaders:
    """Adds ``pages.SECURITY_HEADERS`` to every answer that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, sending)
