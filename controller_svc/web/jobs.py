"""Jobs: the history with each job's source (ui, cli, management), the management jobs the
controller rejected and why, and one job live.

A job's page shows its gateways as they are, then follows its events with server-sent
events (GET /jobs/ID/events, ``text/event-stream``, the WHATWG HTML standard §9.2): each
event carries ``id: SEQ`` (the job event's sequence number), so a browser's EventSource
that loses the stream reconnects with ``Last-Event-ID`` and gets what came after, from this
controller or from the next version after an inline upgrade. The stream ends after the
event that finishes the job (``controller_svc.follow``, WatchJob's rule), when the
controller stops, or when the user is removed; a reconnect to a finished job gets 204, which
tells EventSource to stop.

The page also shows how the job rolls out (its waves, the wave in progress, the cap on
gateways in flight, the failure limit) and why it was paused, aborted or cancelled, and
steers it as ``upgradectl jobs pause|resume|cancel`` does: POST /jobs/ID/pause, /resume and
/cancel (with an optional ``reason``), each for the roles the gRPC method of the same name
(PauseJob, ResumeJob, CancelJob) allows, each audited, each answered with the job's page
(303) or the refusal.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from controller_svc import follow
from controller_svc.access import Caller, role_needed
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.records import EventRecord, JobRecord
from controller_svc.rollout import failure_limit
from controller_svc.states import GatewayState, JobState
from controller_svc.users import ACTOR_PREFIX
from controller_svc.web.auth import console_of, guarded
from controller_svc.web.console import Console, detail
from controller_svc.web.pages import message, progress, render
from hitless import names

JOBS_SHOWN = 50
POLL_S = 0.5
# A comment this often keeps an idle stream open through proxies, and finds a gone client.
KEEPALIVE_S = 15.0
# How often an open stream checks that its user still exists.
USER_CHECK_S = 5.0
RETRY_MS = 1000
# The longest reason a cancel keeps, as the gRPC API's CancelJob.
MAX_CANCEL_REASON_CHARS = 500
# The steering forms: the action's path, and the gRPC method whose roles may use it.
STEERING = {"pause": "PauseJob", "resume": "ResumeJob", "cancel": "CancelJob"}
_STEER_ROLES = {a: role_needed(f"/hitless.v1.Controller/{m}") for a, m in STEERING.items()}
# A gateway in one of these has its outcome: the wave in progress is the first with one not.
FINAL_GATEWAY_STATES = " ".join(s.value for s in GatewayState if s.terminal)


@guarded("ListJobs")
def jobs(request: Request, caller: Caller, form: FormData | None) -> Response:
    listed = console_of(request).repo.list_jobs(limit=JOBS_SHOWN)
    return render(request, caller, "jobs.html", jobs=listed)


@guarded("ListRejectedJobs")
def rejected(request: Request, caller: Caller, form: FormData | None) -> Response:
    return render(request, caller, "rejected.html", rejected=console_of(request).rejections.list())


def _job(console: Console, job_id: str) -> JobRecord | None:
    return console.repo.get_job(job_id) if 0 < len(job_id) <= 64 else None


@guarded("GetJob")
def job(request: Request, caller: Caller, form: FormData | None) -> Response:
    console = console_of(request)
    job_id = request.path_params["job_id"]
    record = _job(console, job_id)
    if record is None:
        return message(request, caller, 404, "No such job", f"no job with id {names.shown(job_id)}")
    last_seq = 0
    while batch := console.repo.events_after(record.id, last_seq):
        last_seq = batch[-1].seq
    allowed = {a for a, needed in _STEER_ROLES.items() if needed is None or caller.role >= needed}
    return render(
        request,
        caller,
        "job.html",
        job=record,
        last_seq=last_seq,
        progress={
            g.gateway_id: progress(g.state, g.bytes_done, g.bytes_total) for g in record.gateways
        },
        rollout=rollout_shown(record),
        actions={a: shown for a, shown in steering(record).items() if a in allowed},
        final_states=FINAL_GATEWAY_STATES,
        max_reason=MAX_CANCEL_REASON_CHARS,
    )


def steering(job: JobRecord) -> dict[str, bool]:
    """The steering forms the job's page carries, each with whether it applies now: pause
    to a PENDING or RUNNING job, resume to a PAUSED one, cancel to any; none to a job that
    has ended or is ending (ABORTED or CANCELLED once its gateways in flight finish: no
    gateway of it starts again, so there is nothing left to steer). The page's script
    shows and hides them as the job's state changes."""
    if job.state.terminal or job.ending is not None:
        return {}
    return {
        "pause": job.state in (JobState.PENDING, JobState.RUNNING),
        "resume": job.state is JobState.PAUSED,
        "cancel": True,
    }


def rollout_shown(job: JobRecord) -> dict[str, str] | None:
    """How the job rolls out, in words for its page (waves, the wave in progress, the cap
    on gateways in flight, the failure limit), the numbers upgradectl's ``status`` shows;
    None for a job of one wave with no cap and no limit, as every upgrade was before
    rollouts were staged."""
    if not (job.waves or job.max_parallel or job.max_failures or job.soak_s):
        return None
    total = len(job.gateways)
    if job.wave_count <= 1:
        wave = "one wave"
    elif job.current_wave is None:
        wave = f"no wave in progress ({job.wave_count} waves)"
    else:
        wave = f"wave {job.current_wave + 1} of {job.wave_count}"
    limit = failure_limit(job.max_failures, total)
    if limit is None:
        failures = "no limit"
    else:
        failures = f"ABORTED when more than {_gateways(limit)} fail or roll back"
        if job.max_failures.endswith("%"):
            failures += f" ({job.max_failures} of {total})"
    return {
        "waves": job.waves or "one wave of every gateway",
        "wave": wave,
        "cap": f"at most {_gateways(job.max_parallel)} in flight" if job.max_parallel else "no cap",
        "failures": failures,
        "soak": f"{job.soak_s} s after each swap" if job.soak_s else "no soak",
    }


def _gateways(count: int) -> str:
    return f"{count} gateway" if count == 1 else f"{count} gateways"


@guarded("PauseJob", doing="pause jobs")
def pause(request: Request, caller: Caller, form: FormData | None) -> Response:
    engine = console_of(request).engine
    return _steer(
        request, caller, "PauseJob", lambda job_id: engine.pause_job(job_id, caller.actor)
    )


@guarded("ResumeJob", doing="resume jobs")
def resume(request: Request, caller: Caller, form: FormData | None) -> Response:
    engine = console_of(request).engine
    return _steer(
        request, caller, "ResumeJob", lambda job_id: engine.resume_job(job_id, caller.actor)
    )


@guarded("CancelJob", doing="cancel jobs")
def cancel(request: Request, caller: Caller, form: FormData | None) -> Response:
    assert form is not None
    engine = console_of(request).engine
    reason = str(form.get("reason") or "").strip()

    def change(job_id: str) -> JobRecord:
        if len(reason) > MAX_CANCEL_REASON_CHARS:
            raise InvalidRequest(
                f"the reason is {len(reason)} characters; keep it to {MAX_CANCEL_REASON_CHARS}"
            )
        return engine.cancel_job(job_id, caller.actor, reason)

    return _steer(request, caller, "CancelJob", change, reason=reason)


def _steer(
    request: Request,
    caller: Caller,
    method: str,
    change: Callable[[str], JobRecord],
    **fields: str,
) -> Response:
    """Do ``change`` to the job the path names, with its audit row (``method``, the job
    id and ``fields`` given), and send the browser back to the job's page. The engine's
    refusals (NotFound; FailedPrecondition for a job that has ended) are raised, for the
    message page ``guarded`` shows."""
    console = console_of(request)
    job_id = request.path_params["job_id"]

    def checked() -> JobRecord:
        if not 0 < len(job_id) <= 64:
            raise NotFound(f"no job with id {names.shown(job_id)}")
        return change(job_id)

    what = detail(job_id=job_id, **{k: v for k, v in fields.items() if v})
    console.act(request, caller, method, what, checked)
    return RedirectResponse(f"/jobs/{quote(job_id, safe='')}", 303)


@guarded("WatchJob")
def events(request: Request, caller: Caller, form: FormData | None) -> Response:
    console = console_of(request)
    job_id = request.path_params["job_id"]
    if _job(console, job_id) is None:
        return message(request, caller, 404, "No such job", f"no job with id {names.shown(job_id)}")
    resumed = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not resumed.isdigit() or len(resumed) > 18:
        text = f"not an event id: {names.shown(resumed)}"
        return message(request, caller, 400, "Bad request", text)
    after = int(resumed)
    first = follow.next_events(console.repo, job_id, after)
    if first.finished and not first.events:
        return Response(status_code=204)
    stream = _stream(console, caller, job_id, after, first)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
    )


async def _stream(
    console: Console, caller: Caller, job_id: str, seq: int, batch: follow.Batch
) -> AsyncIterator[str]:
    """The events of ``job_id`` after ``seq``, starting with ``batch``, until the job
    ends, the controller stops or the user is removed."""
    yield f"retry: {RETRY_MS}\n\n"
    quiet_since = checked_at = time.monotonic()
    name = caller.actor.removeprefix(ACTOR_PREFIX)
    while True:
        if batch.events:
            record = await run_in_threadpool(console.repo.get_job, job_id)
            dropped = (
                {g.gateway_id: g.vpn_sessions_dropped for g in record.gateways} if record else {}
            )
            for event in batch.events:
                yield _sse(event, dropped)
            seq = batch.events[-1].seq
            quiet_since = time.monotonic()
        if batch.finished or console.stopping.is_set():
            return
        if not batch.events:
            await anyio.sleep(POLL_S)
        now = time.monotonic()
        if now - quiet_since >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            quiet_since = now
        if now - checked_at >= USER_CHECK_S:
            checked_at = now
            if await run_in_threadpool(console.users.get, name) is None:
                return
        batch = await run_in_threadpool(follow.next_events, console.repo, job_id, seq)


def _sse(event: EventRecord, dropped: dict[str, int]) -> str:
    """One job event as a server-sent event: its seq as the id, the change as JSON."""
    gateway_state = event.gateway_state.value if event.gateway_state else None
    data = {
        "seq": event.seq,
        "gateway_id": event.gateway_id,
        "gateway_state": gateway_state,
        "progress": progress(gateway_state or "", event.bytes_done, event.bytes_total),
        "error": event.error,
        "vpn_sessions_dropped": dropped.get(event.gateway_id or "", 0),
        "job_state": event.job_state.value if event.job_state else None,
        "finished": bool(event.job_state and event.job_state.terminal),
    }
    return f"id: {event.seq}\ndata: {json.dumps(data)}\n\n"


def routes() -> list[Route]:
    return [
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/rejected", rejected, methods=["GET"]),
        Route("/jobs/{job_id}", job, methods=["GET"]),
        Route("/jobs/{job_id}/events", events, methods=["GET"]),
        Route("/jobs/{job_id}/pause", pause, methods=["POST"]),
        Route("/jobs/{job_id}/resume", resume, methods=["POST"]),
        Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
    ]
