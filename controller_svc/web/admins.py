"""The admins the notifier emails: listed for everyone, added and removed by admins, with
the controller's own rule for an address (``controller_svc.admins``)."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from controller_svc.access import Caller, role_needed
from controller_svc.web.auth import console_of, guarded
from controller_svc.web.console import REFUSALS, detail
from controller_svc.web.pages import render

CHANGE = role_needed("/hitless.v1.Controller/AddAdmin")


def admins_page(
    request: Request,
    caller: Caller,
    status: int = 200,
    *,
    typed: str = "",
    email_error: str = "",
    remove_error: str = "",
) -> Response:
    return render(
        request,
        caller,
        "admins.html",
        status,
        admins=console_of(request).admins.list(),
        can_change=CHANGE is not None and caller.role >= CHANGE,
        typed=typed,
        email_error=email_error,
        remove_error=remove_error,
    )


@guarded("ListAdmins")
def admins(request: Request, caller: Caller, form: FormData | None) -> Response:
    return admins_page(request, caller)


@guarded("AddAdmin", doing="change admins")
def add(request: Request, caller: Caller, form: FormData | None) -> Response:
    assert form is not None
    console = console_of(request)
    email = str(form.get("email") or "")
    try:
        console.act(
            request, caller, "AddAdmin", detail(email=email),
            lambda: console.admins.add(email, datetime.now(UTC)),
        )  # fmt: skip
    except REFUSALS as exc:
        return admins_page(request, caller, 400, typed=email, email_error=str(exc))
    return RedirectResponse("/admins", 303)


@guarded("RemoveAdmin", doing="change admins")
def remove(request: Request, caller: Caller, form: FormData | None) -> Response:
    assert form is not None
    console = console_of(request)
    email = str(form.get("email") or "")
    try:
        console.act(
            request, caller, "RemoveAdmin", detail(email=email),
            lambda: console.admins.remove(email),
        )  # fmt: skip
    except REFUSALS as exc:
        return admins_page(request, caller, 400, remove_error=str(exc))
    return RedirectResponse("/admins", 303)


def routes() -> list[Route]:
    return [
        Route("/admins", admins, methods=["GET"]),
        Route("/admins/add", add, methods=["POST"]),
        Route("/admins/remove", remove, methods=["POST"]),
    ]
