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
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from controller_svc import follow
from controller_svc.access import Caller
from controller_svc.records import EventRecord, JobRecord
from controller_svc.users import ACTOR_PREFIX
from controller_svc.web.auth import console_of, guarded
from controller_svc.web.console import Console
from controller_svc.web.pages import message, progress, render
from hitless import names

JOBS_SHOWN = 50
POLL_S = 0.5
# A comment this often keeps an idle stream open through proxies, and finds a gone client.
KEEPALIVE_S = 15.0
# How often an open stream checks that its user still exists.
USER_CHECK_S = 5.0
RETRY_MS = 1000


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
    return render(
        request,
        caller,
        "job.html",
        job=record,
        last_seq=last_seq,
        progress={
            g.gateway_id: progress(g.state, g.bytes_done, g.bytes_total) for g in record.gateways
        },
    )


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
    ]
