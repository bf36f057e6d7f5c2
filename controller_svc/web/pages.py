"""Rendering the console's pages: Jinja2 templates with autoescaping on (every value is
HTML-escaped unless a template marks it safe, which only release notes are, after
markdown-it-py has rendered them with raw HTML disabled), and the few formats the tables
share.

Templates and static files are read with ``importlib.resources``, so the console works
from a release artifact (a zipapp) as from the source tree.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse

from controller_svc.access import Caller
from controller_svc.users import ACTOR_PREFIX
from controller_svc.web.session import csrf_token

_PACKAGE = "controller_svc.web"
# Every page's headers: nothing but this origin's own files runs or loads (a script that
# got into a page anyway could not run), no framing, no caching of pages for others.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# CommonMark with raw HTML off: tags in the notes come out as text. markdown-it-py also
# refuses javascript:, vbscript:, file: and data: links (its validateLink).
_MARKDOWN = MarkdownIt("commonmark", {"html": False})
# The navigation entry a page belongs to, by the first part of its path.
_SECTIONS = {"upgrade": "maintenance"}


def notes(text: str) -> Markup:
    """Release notes, Markdown rendered to HTML with raw HTML shown as text."""
    return Markup(_MARKDOWN.render(text))


def when(value: datetime | None) -> str:
    """``2025-03-01 12:00:07 UTC``, or ``-``."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def size(count: int) -> str:
    """``1536`` → ``1.5 KiB``; below 1 KiB the exact bytes."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def progress(state: str, done: int, total: int) -> str:
    """A gateway's download progress while it downloads or verifies (``45% of 2.0 MiB``),
    else nothing: the rule upgradectl's tables follow."""
    if total <= 0 or state not in ("DOWNLOADING", "VERIFYING"):
        return ""
    return f"{min(100, done * 100 // total)}% of {size(total)}"


def _template(name: str) -> str:
    return resources.files(_PACKAGE).joinpath("templates", name).read_text(encoding="utf-8")


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, size=size)
    return env


def static_file(name: str) -> bytes:
    """The bytes of ``static/NAME``."""
    return resources.files(_PACKAGE).joinpath("static", name).read_bytes()


def render(
    request: Request,
    caller: Caller | None,
    template: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """The page ``template`` for ``caller`` (None: nobody is logged in), with this
    session's CSRF token for its forms."""
    first = request.url.path.split("/")[1]
    shared = {
        "caller": caller,
        "user": caller.actor.removeprefix(ACTOR_PREFIX) if caller else "",
        "role": str(caller.role) if caller else "",
        "csrf_token": csrf_token(request),
        "section": _SECTIONS.get(first, first),
    }
    page = environment().get_template(template).render(**shared, **context)
    return HTMLResponse(page, status_code=status, headers=headers)


def message(
    request: Request, caller: Caller | None, status: int, title: str, text: str
) -> HTMLResponse:
    """A page that says one thing: a refusal, or what went wrong."""
    return render(request, caller, "message.html", status, title=title, text=text)
