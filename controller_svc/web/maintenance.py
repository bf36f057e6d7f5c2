"""Settings → Maintenance: the versions the controller and the gateways run, the latest
signed release, and upgrading to it or to a release named by its version, through the
plan the job engine makes (what PlanUpgrade shows) before anything starts.

The plan page carries what it showed into the start form: the release's version (also
when the operator asked for the latest, so a release published meanwhile cannot slip in),
the planned gateways, and a request id, so that a form sent twice starts one job. Starting
goes through ``Engine.start_upgrade``, whose refusals (a downgrade or a VPN restart not
confirmed) are shown above the button with the words the CLI shows.

The start form also says how the job rolls out, as ``upgradectl upgrade`` does with
``--waves``, ``--max-parallel`` and ``--max-failures`` (``controller_svc.rollout``): empty
fields are one wave of every gateway at once, as an upgrade has always been. The plan page
is where they are filled in, beside the gateways whose count a percentage is of; a value
sent to the plan (e.g. by a bookmarked form) fills them in. A value the engine refuses is
shown beside the fields, kept as typed.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from controller_svc.access import Caller, role_needed
from controller_svc.errors import FailedPrecondition, InvalidRequest, NotFound
from controller_svc.liveness import gateway_state
from controller_svc.planner import DOWNGRADE, Plan, check
from controller_svc.rollout import Rollout
from controller_svc.web.auth import console_of, guarded
from controller_svc.web.console import REFUSALS, detail
from controller_svc.web.pages import notes, render
from hitless import semver, version

START = role_needed("/hitless.v1.Controller/StartUpgrade")
# The most digits a max parallel is read from (StartUpgrade's field is a uint32).
_MAX_PARALLEL_DIGITS = 9
# The start form's rollout fields, named as StartUpgrade's.
_ROLLOUT_FIELDS = ("waves", "max_parallel", "max_failures", "soak_seconds")


@dataclass(frozen=True)
class RolloutFields:
    """The start form's rollout fields as typed: kept as text so a refused value is shown
    back as it was."""

    waves: str = ""
    max_parallel: str = ""
    max_failures: str = ""
    soak_seconds: str = ""

    @classmethod
    def from_form(cls, form: FormData) -> RolloutFields:
        return cls(*(str(form.get(name) or "").strip() for name in _ROLLOUT_FIELDS))

    def rollout(self) -> Rollout:
        """The rollout asked for. Raises InvalidRequest for a max parallel or a soak that
        is not a whole number; the engine checks the rest (``rollout.check``)."""
        cap, soak = self.max_parallel, self.soak_seconds
        if cap and not _whole(cap):
            raise InvalidRequest(
                f"--max-parallel {cap!r} is not a whole number: give how many gateways may "
                "be in flight at once, or leave it empty for no cap"
            )
        if soak and not _whole(soak):
            raise InvalidRequest(
                f"--soak {soak!r} is not a whole number of seconds: give how long each "
                "gateway watches its health after its swap, or leave it empty for no soak"
            )
        return Rollout(self.waves, int(cap or 0), self.max_failures, soak_s=int(soak or 0))

    def audited(self) -> dict[str, object]:
        """The fields given, for the audit row (none for the default rollout); a max
        parallel that is a number as a number, as the gRPC API's rows have it."""
        cap, soak = self.max_parallel, self.soak_seconds
        values = (
            self.waves,
            int(cap) if _whole(cap) else cap,
            self.max_failures,
            int(soak) if _whole(soak) else soak,
        )
        return {name: value for name, value in zip(_ROLLOUT_FIELDS, values, strict=True) if value}


def _whole(text: str) -> bool:
    """Whether ``text`` is a whole number of at most ``_MAX_PARALLEL_DIGITS`` ASCII digits."""
    return text.isascii() and text.isdigit() and len(text) <= _MAX_PARALLEL_DIGITS


@guarded("ListGateways")
def maintenance(request: Request, caller: Caller, form: FormData | None) -> Response:
    return maintenance_page(request, caller)


def maintenance_page(
    request: Request,
    caller: Caller,
    status: int = 200,
    *,
    typed: str = "",
    version_error: str = "",
    latest_error: str = "",
) -> Response:
    """The page, with an error beside the form that was sent (status 400 then)."""
    console = console_of(request)
    now = datetime.now(UTC)
    gateways = console.repo.list_gateways()
    counts = Counter(g.version for g in gateways)
    try:
        latest, no_latest = console.engine.resolve_release(None), ""
    except NotFound as exc:
        latest, no_latest = None, str(exc)
    return render(
        request,
        caller,
        "maintenance.html",
        status,
        controller_version=version.current(),
        counts=sorted(counts.items(), key=lambda item: _newest_first(item[0])),
        gateways=[(g, gateway_state(g, now)) for g in gateways],
        latest=latest,
        latest_notes=notes(latest.notes) if latest else "",
        no_latest=no_latest,
        can_upgrade=START is not None and caller.role >= START,
        typed=typed,
        version_error=version_error,
        latest_error=latest_error,
    )


def _newest_first(text: str) -> tuple[int, int, int, str]:
    if semver.is_valid(text):
        major, minor, patch = semver.parse(text)
        return (-major, -minor, -patch, text)
    return (1, 0, 0, text)


def _target(form: FormData) -> tuple[bool, str]:
    """Whether the form asks for the latest release, and the version typed otherwise."""
    return form.get("target") == "latest", str(form.get("version") or "")


@guarded("PlanUpgrade")
def plan(request: Request, caller: Caller, form: FormData | None) -> Response:
    assert form is not None
    latest, typed = _target(form)
    try:
        planned = console_of(request).engine.plan(None if latest else str(semver.parse(typed)))
    except REFUSALS as exc:
        return _refused(request, caller, latest, typed, str(exc))
    return plan_page(
        request, caller, planned, str(uuid.uuid4()), rollout=RolloutFields.from_form(form)
    )


def _refused(request: Request, caller: Caller, latest: bool, typed: str, error: str) -> Response:
    if latest:
        return maintenance_page(request, caller, 400, latest_error=error)
    return maintenance_page(request, caller, 400, typed=typed, version_error=error)


def plan_page(
    request: Request,
    caller: Caller,
    planned: Plan,
    request_id: str,
    status: int = 200,
    *,
    confirm_error: str = "",
    checked: frozenset[str] = frozenset(),
    rollout: RolloutFields = RolloutFields(),
    rollout_error: str = "",
) -> Response:
    """The plan: each gateway's change, the release notes, the confirmations it needs,
    and the start form (for operators) with its rollout fields, or why there is nothing
    to do."""
    try:
        check(planned, allow_downgrade=True, accept_vpn_disruption=True)
        nothing_to_do = ""
    except FailedPrecondition as exc:
        nothing_to_do = str(exc)
    return render(
        request,
        caller,
        "plan.html",
        status,
        plan=planned,
        release_notes=notes(planned.release.notes),
        downgrades=any(g.action == DOWNGRADE for g in planned.changes),
        vpn_users=planned.vpn_sessions_affected,
        nothing_to_do=nothing_to_do,
        can_start=START is not None and caller.role >= START,
        gateway_ids=",".join(g.gateway_id for g in planned.gateways),
        request_id=request_id,
        confirm_error=confirm_error,
        checked=checked,
        rollout=rollout,
        rollout_error=rollout_error,
    )


@guarded("StartUpgrade", doing="start upgrades")
def start(request: Request, caller: Caller, form: FormData | None) -> Response:
    assert form is not None
    console = console_of(request)
    latest, typed = _target(form)
    gateway_ids = [g for g in str(form.get("gateways") or "").split(",") if g]
    request_id = str(form.get("request_id") or "") or None
    checked = frozenset(k for k in ("allow_downgrade", "accept_vpn_disruption") if k in form)
    rollout = RolloutFields.from_form(form)
    what = detail(
        version="latest" if latest else typed,
        gateway_ids=gateway_ids,
        request_id=request_id or "",
        allow_downgrade="allow_downgrade" in checked,
        accept_vpn_disruption="accept_vpn_disruption" in checked,
        **rollout.audited(),
    )
    try:
        target = None if latest else str(semver.parse(typed))
        job = console.act(
            request,
            caller,
            "StartUpgrade",
            what,
            lambda: console.engine.start_upgrade(
                version=target,
                gateway_ids=gateway_ids,
                request_id=request_id,
                source="ui",
                requested_by=caller.actor,
                allow_downgrade="allow_downgrade" in checked,
                accept_vpn_disruption="accept_vpn_disruption" in checked,
                rollout=rollout.rollout(),
                precheck=True,
            ),
        )
    except REFUSALS as exc:
        try:
            planned = console.engine.plan(None if latest else str(semver.parse(typed)), gateway_ids)
        except REFUSALS:
            return _refused(request, caller, latest, typed, str(exc))
        # Nothing started: the next try is a request of its own. A malformed request is
        # the rollout's (the other fields come from the plan), said beside its fields.
        fresh = str(uuid.uuid4())
        bad_rollout = isinstance(exc, InvalidRequest)
        return plan_page(
            request,
            caller,
            planned,
            fresh,
            400,
            confirm_error="" if bad_rollout else str(exc),
            checked=checked,
            rollout=rollout,
            rollout_error=str(exc) if bad_rollout else "",
        )
    return RedirectResponse(f"/jobs/{quote(job.id, safe='')}", 303)


async def home(request: Request) -> Response:
    return RedirectResponse("/maintenance", 303)


def routes() -> list[Route]:
    return [
        Route("/", home, methods=["GET"]),
        Route("/maintenance", maintenance, methods=["GET"]),
        Route("/upgrade/plan", plan, methods=["POST"]),
        Route("/upgrade/start", start, methods=["POST"]),
    ]
