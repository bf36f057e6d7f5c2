"""Releases: every published release with its signing state (SIGNED, UNSIGNED, YANKED, as
``Trust.signing`` judges it for the API too), whether it restarts the VPN service, and
its notes, rendered from Markdown with raw HTML shown as text."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from controller_svc.access import Caller
from controller_svc.web.auth import console_of, guarded
from controller_svc.web.pages import notes, render
from hitless import semver


@guarded("ListReleases")
def releases(request: Request, caller: Caller, form: FormData | None) -> Response:
    console = console_of(request)
    listed = [(r, console.trust.signing(r).value) for r in console.repo.list_releases()]
    return render(request, caller, "releases.html", releases=listed)


@guarded("ListReleases")
def release(request: Request, caller: Caller, form: FormData | None) -> Response:
    """One release's notes; the CLI's NotFound ("unknown version V; available: ...") for
    one that does not exist."""
    console = console_of(request)
    record = console.engine.resolve_release(str(semver.parse(request.path_params["version"])))
    signing = console.trust.signing(record).value
    return render(
        request, caller, "release.html", release=record, signing=signing,
        release_notes=notes(record.notes),
    )  # fmt: skip


def routes() -> list[Route]:
    return [
        Route("/releases", releases, methods=["GET"]),
        Route("/releases/{version}", release, methods=["GET"]),
    ]
