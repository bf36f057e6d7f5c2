"""Moving a job and its gateways through their state machines, on ORM rows, and on the
plain ``GatewayRow`` values report ingestion works on.

Each function works inside the caller's transaction and expects it to hold the job's row
lock (see repository.py), and each change it makes adds a ``job_events`` row beside it.
The rules themselves (which moves are legal, what a set of final states adds up to) live
in states.py; this module only applies them to rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from controller_svc.db import Job, JobEvent, JobGateway
from controller_svc.records import ReportIn
from controller_svc.states import (
    NEEDS_REASON,
    GatewayState,
    JobState,
    check_job_move,
    job_outcome,
)

NO_REASON = "no reason given by the gateway"
EXPIRED_QUEUED = "the command expired before the gateway took it"
EXPIRED_ACTIVE = "no report from the gateway before the deadline"
UNSENT = "the command could not be sent before the deadline"
HELD_BACK = "the job's deadline came before this gateway's turn in the rollout"


def held_back(job: Job) -> bool:
    """Whether the job may hold gateways back on purpose (waves, a cap on gateways in
    flight, or paused): a command it never sent at the deadline was then not due, and
    its gateway is SKIPPED rather than failed."""
    return (
        bool(job.waves or job.window or job.not_before or job.not_after)
        or (job.max_parallel or 0) > 0
        or job.state == JobState.PAUSED
    )


def close_unstarted(
    session: Session, job: Job, state: GatewayState, reason: str, at: datetime
) -> int:
    """Move every gateway of the job that has not started (QUEUED, its command sent or
    not) to ``state`` (SKIPPED or CANCELLED) with ``reason``; returns how many moved. A
    command sent but not taken is refused by the controller when its gateway asks for
    the release (``Repository.command_withdrawn``)."""
    rows = session.scalars(
        select(JobGateway)
        .where(JobGateway.job_id == job.id, JobGateway.state == GatewayState.QUEUED.value)
        .order_by(JobGateway.gateway_id)
    ).all()
    for row in rows:
        row.state, row.error, row.updated_at = state.value, reason + midway(row), at
        session.add(gateway_event(row, at))
    return len(rows)


def midway(row: JobGateway) -> str:
    """What a gateway stopped midway on its path through intermediate releases runs,
    said after the reason it stopped (" (it stays on 1.2.0: hop 2 of 3 not started)"),
    or "" for one that had not moved."""
    if not row.path or row.hop == 0:
        return ""
    hops = len(row.path.split(","))
    return f" (it stays on {row.from_version}: hop {row.hop + 1} of {hops} not started)"


def stop(session: Session, job: Job, ending: JobState, reason: str, at: datetime) -> None:
    """Decide the job's ending (ABORTED or CANCELLED) with ``reason``: no gateway starts
    from now on, those not started are SKIPPED (aborted) or CANCELLED, and the job moves
    to ``ending`` once the ones in flight are final (``finish_if_done``), at once when
    none is. Raises IllegalJobMove (changing nothing) when the job cannot end so."""
    check_job_move(job.id, JobState(job.state), ending)
    job.ending, job.stop_reason, job.updated_at = ending.value, reason, at
    closed = GatewayState.CANCELLED if ending is JobState.CANCELLED else GatewayState.SKIPPED
    close_unstarted(session, job, closed, reason, at)


@dataclasses.dataclass(slots=True)
class GatewayRow:
    """A job's gateway row as report ingestion reads and changes it: plain values, no ORM
    object (a batch of reports touches hundreds of rows; ``read_rows`` and
    ``write_rows`` move them in one statement each). The fields up to ``health`` are
    ``job_gateways`` columns of the same names; ``hopped`` says ``next_hop`` queued a new
    command on it."""

    job_id: str
    gateway_id: str
    command_id: str
    state: str
    from_version: str
    to_version: str
    error: str
    bytes_done: int
    bytes_total: int
    updated_at: datetime
    vpn_sessions_dropped: int
    path: str
    hop: int
    health: str
    hopped: bool = False


_ROW_COLUMNS = [field.name for field in dataclasses.fields(GatewayRow)][:-1]
# What ``apply_to_row`` and ``next_hop`` change, and nothing else: ``published_at`` is
# written without the job's lock (``Repository.mark_published``, once the broker confirmed
# a command), so it is only ever cleared here, for a row that hopped to a new command,
# never written back as it was read.
_ROW_CHANGES = [name for name in _ROW_COLUMNS if name not in ("job_id", "gateway_id", "path")]


def read_rows(session: Session, command_ids: Iterable[str]) -> dict[str, GatewayRow]:
    """The rows of the gateways whose current command is one of ``command_ids``, by
    command id, in one SELECT (under the job's lock, like every writer of these
    columns)."""
    result = session.execute(
        select(*(getattr(JobGateway, name) for name in _ROW_COLUMNS)).where(
            JobGateway.command_id.in_(set(command_ids))
        )
    )
    return {row.command_id: GatewayRow(*row) for row in result}


def write_rows(session: Session, rows: Iterable[GatewayRow]) -> None:
    """Write the columns ingestion changes back (keyed by job and gateway) in one
    executemany, in key order (the order every writer of many rows locks them in); the
    rows that hopped to a new command also lose their ``published_at``, in one more
    statement."""
    ordered = sorted(rows, key=lambda row: (row.job_id, row.gateway_id))
    if not ordered:
        return
    statement = (
        update(JobGateway)
        .where(
            JobGateway.job_id == bindparam("key_job_id"),
            JobGateway.gateway_id == bindparam("key_gateway_id"),
        )
        .values({name: bindparam(f"new_{name}") for name in _ROW_CHANGES})
    )
    connection = session.connection()
    connection.execute(
        statement,
        [
            {
                "key_job_id": row.job_id,
                "key_gateway_id": row.gateway_id,
                **{f"new_{name}": getattr(row, name) for name in _ROW_CHANGES},
            }
            for row in ordered
        ],
    )
    hopped = [row.command_id for row in ordered if row.hopped]
    if hopped:
        connection.execute(
            update(JobGateway).where(JobGateway.command_id.in_(hopped)).values(published_at=None)
        )


def apply_to_row(row: GatewayRow, report: ReportIn) -> dict[str, Any]:
    """Apply a report the state machine allows to its row; FAILED/ROLLED_BACK always get a
    reason. Returns the values of the ``job_events`` row recording it, for the caller to
    insert with the others of its transaction (and, on SUCCEEDED, the caller records the
    gateway's new version: ``row.to_version``)."""
    row.state = report.state.value
    row.from_version = report.from_version or row.from_version
    row.to_version = report.to_version or row.to_version
    error = report.error
    if report.state in NEEDS_REASON and not error:
        error = NO_REASON
    row.error = error
    # A report without progress (e.g. SWAPPING) keeps the last progress known.
    if report.bytes_total > 0:
        row.bytes_done, row.bytes_total = report.bytes_done, report.bytes_total
    if report.vpn_sessions_dropped:
        row.vpn_sessions_dropped = report.vpn_sessions_dropped
    if report.health:
        row.health = report.health
    row.updated_at = report.at
    return {
        "job_id": row.job_id,
        "gateway_id": row.gateway_id,
        "gateway_state": row.state,
        "job_state": None,
        "error": row.error,
        "bytes_done": row.bytes_done,
        "bytes_total": row.bytes_total,
        "at": report.at,
    }


def next_hop(row: GatewayRow, at: datetime) -> dict[str, Any] | None:
    """After a SUCCEEDED hop of a gateway on a path through intermediate releases (its
    ``path`` has a release after ``hop``): queue its next hop, a new command (new command
    id, not yet published) from the release it now runs to the next one in the path.
    Returns the values of the ``job_events`` row recording it (QUEUED), or None when the
    hop was the last (the row stays SUCCEEDED).

    This is the one move out of SUCCEEDED (``states.py``): the controller makes it, never
    a report, and a late report of the finished hop's command names a command id the row
    no longer has, so it is refused as unknown."""
    path = row.path.split(",") if row.path else []
    if row.hop + 1 >= len(path):
        return None
    row.hop += 1
    row.from_version, row.to_version = row.to_version, path[row.hop]
    row.state, row.error = GatewayState.QUEUED.value, ""
    row.command_id = str(uuid.uuid4())
    row.hopped = True  # its new command is not published yet (``write_rows``)
    row.bytes_done = row.bytes_total = 0
    row.updated_at = at
    return {
        "job_id": row.job_id,
        "gateway_id": row.gateway_id,
        "gateway_state": row.state,
        "job_state": None,
        "error": "",
        "bytes_done": 0,
        "bytes_total": 0,
        "at": at,
    }


def expire_rows(session: Session, job: Job, now: datetime, grace: timedelta) -> bool:
    """Close the job's gateways its deadline (plus ``grace`` once taken) has passed on;
    True when any changed. A command never confirmed published was never the gateway's
    to take: FAILED with UNSENT, not UNREACHABLE (the sweep of the controller that tried
    to send it records the bus error too)."""
    changed = False
    rows = session.scalars(
        select(JobGateway).where(JobGateway.job_id == job.id).order_by(JobGateway.gateway_id)
    ).all()
    for row in rows:
        state = GatewayState(row.state)
        if state is GatewayState.QUEUED and row.published_at is None and held_back(job):
            row.state, row.error = GatewayState.SKIPPED.value, HELD_BACK
        elif state is GatewayState.QUEUED and row.published_at is None:
            row.state, row.error = GatewayState.FAILED.value, UNSENT
        elif state is GatewayState.QUEUED:
            row.state, row.error = GatewayState.UNREACHABLE.value, EXPIRED_QUEUED
        elif not state.terminal and now > job.deadline + grace:
            row.state, row.error = GatewayState.FAILED.value, EXPIRED_ACTIVE
        else:
            continue
        row.updated_at = now
        session.add(gateway_event(row, now))
        changed = True
    return changed


def finish_if_done(session: Session, job: Job, at: datetime) -> JobState | None:
    """Set the job's final state once all its gateways are final: its ``ending`` when one
    was decided (``stop``), else their outcome (``states.job_outcome``). The caller holds
    the job lock, so of two transactions racing here only the first sees a non-final job.

    Reads one count per gateway state (``GROUP BY``), never the job's rows themselves, so
    a job of thousands of gateways costs one small query per call."""
    if JobState(job.state).terminal:
        return None
    session.flush()
    counts = session.execute(
        select(JobGateway.state, func.count())
        .where(JobGateway.job_id == job.id)
        .group_by(JobGateway.state)
    ).all()
    outcome = job_outcome(
        itertools.chain.from_iterable(itertools.repeat(GatewayState(s), n) for s, n in counts)
    )
    if outcome is not None and job.ending:
        outcome = JobState(job.ending)
    if outcome is not None:
        set_job_state(session, job, outcome, at)
    return outcome


def set_job_state(session: Session, job: Job, state: JobState, at: datetime) -> None:
    """Move the job to ``state`` and record the job-level event.

    Raises IllegalJobMove (states.py) for a move ``JOB_MOVES`` does not allow, changing
    nothing: this is the one place a job's state is written after it is created."""
    check_job_move(job.id, JobState(job.state), state)
    job.state = state.value
    job.updated_at = at
    session.add(JobEvent(job_id=job.id, job_state=state.value, at=at))


def gateway_event(row: JobGateway, at: datetime) -> JobEvent:
    """The event recording the row's current state."""
    return JobEvent(
        job_id=row.job_id,
        gateway_id=row.gateway_id,
        gateway_state=row.state,
        error=row.error,
        bytes_done=row.bytes_done,
        bytes_total=row.bytes_total,
        at=at,
    )
