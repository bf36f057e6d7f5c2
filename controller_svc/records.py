"""What the repository takes and returns: plain frozen values, never ORM objects, and how
they are read from rows.

Callers (gRPC handlers, the job engine, bus consumers) hold these across threads and after
the transaction that produced them has ended, so they carry no session and no lazy loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller_svc.db import Gateway, Job, JobEvent, JobGateway, Release
from controller_svc.states import GatewayState, JobState


@dataclass(frozen=True)
class ReleaseRecord:
    version: str
    sha256: str
    size: int
    notes: str
    published_at: datetime
    restarts_vpn_service: bool = False
    # The lowest version it upgrades from; None: any (``planner.upgrade_path``).
    min_from: str | None = None


@dataclass(frozen=True)
class GatewayRecord:
    id: str
    version: str
    first_seen: datetime
    last_seen: datetime
    # In a job that has not finished, in a state that has not finished.
    busy: bool
    pid: int | None = None
    listen: tuple[str, ...] = ()
    vpn_sessions: int = 0
    # While busy: the version its newest unfinished job takes it to.
    pending_version: str | None = None
    # The heartbeat interval its newest hello announced; None: none announced (a gateway
    # of an earlier release), so the default applies.
    heartbeat_interval: timedelta | None = None
    # The other gateway of its high-availability pair, as its newest hello named it.
    ha_peer: str | None = None
    # Its newest hello said it answers pre-checks.
    prechecks: bool = False
    # Its last message said it stops (a clean stop): OFFLINE until heard from again.
    stopped: bool = False


@dataclass(frozen=True)
class GatewayJobRecord:
    gateway_id: str
    command_id: str
    state: GatewayState
    from_version: str
    to_version: str
    error: str
    bytes_done: int
    bytes_total: int
    updated_at: datetime
    vpn_sessions_dropped: int = 0
    # Its command was confirmed by the broker (rows of jobs from before this was recorded
    # count as not published).
    published: bool = False
    # Its wave in the job's rollout, 0 first.
    wave: int = 0
    # Its path through intermediate releases, the last the job's target (empty: straight
    # to the target), and the index in it of the hop its command is for.
    path: tuple[str, ...] = ()
    hop: int = 0
    # Its data plane's health as its soak last reported it.
    health: str = ""


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: JobState
    target_version: str
    source: str
    request_id: str | None
    created_at: datetime
    updated_at: datetime
    deadline: datetime
    # Sorted by gateway id.
    gateways: tuple[GatewayJobRecord, ...]
    requested_by: str = ""
    allow_downgrade: bool = False
    # The rollout (controller_svc.rollout): "" and 0 are one wave, no cap, no limit.
    waves: str = ""
    max_parallel: int = 0
    max_failures: str = ""
    # Each gateway's soak after its swap, seconds (0: none).
    soak_s: int = 0
    # ABORTED or CANCELLED, decided while gateways in flight finish; None otherwise.
    ending: JobState | None = None
    # Why it was paused, aborted or cancelled.
    stop_reason: str = ""
    # When gateways may start (controller_svc.rollout.starts_at).
    not_before: datetime | None = None
    not_after: datetime | None = None
    window: str = ""
    # The wave in progress (0 first; None when every gateway is final) and how many
    # waves there are, over all the job's gateways (``gateways`` may be one page).
    current_wave: int | None = None
    wave_count: int = 1


@dataclass(frozen=True)
class JobPage:
    """A job with one page of its gateways (``job.gateways``, sorted by gateway id):
    ``gateway_count`` is how many it has over all pages, ``more`` whether pages follow."""

    job: JobRecord
    gateway_count: int
    more: bool


@dataclass(frozen=True)
class EventRecord:
    """One change: of a gateway in the job (gateway_id set) or of the job (job_state set)."""

    seq: int
    job_id: str
    gateway_id: str | None
    gateway_state: GatewayState | None
    job_state: JobState | None
    error: str
    bytes_done: int
    bytes_total: int
    at: datetime


@dataclass(frozen=True)
class ReportIn:
    """A gateway's report, decoded from the bus. ``report_id`` is the message's own id."""

    report_id: str
    job_id: str
    command_id: str
    gateway_id: str
    state: GatewayState
    from_version: str
    to_version: str
    error: str
    bytes_done: int
    bytes_total: int
    at: datetime
    vpn_sessions_dropped: int = 0
    health: str = ""


@dataclass(frozen=True)
class ReportOutcome:
    """What applying a report did.

    ``applied`` False with ``duplicate`` False means the report was refused; ``reason``
    says why (unknown job or command, a transition the state machine forbids).
    ``job_finished`` is set on exactly one report per job: the one that finished it.
    """

    applied: bool
    duplicate: bool
    reason: str
    job_finished: JobState | None
    job: JobRecord | None


def job_record(session: Session, job: Job) -> JobRecord:
    """The job with its gateways sorted by id, as the session sees it now."""
    return job_records(session, [job])[0]


def job_records(session: Session, jobs: Sequence[Job]) -> list[JobRecord]:
    """``job_record`` for many jobs, their gateways read in one query."""
    if not jobs:
        return []
    session.flush()
    # Tuples, not ORM objects: a job of a thousand gateways is read on every GetJob.
    rows = session.execute(
        select(JobGateway.job_id, *JOB_GATEWAY_COLUMNS)
        .where(JobGateway.job_id.in_([job.id for job in jobs]))
        .order_by(JobGateway.job_id, JobGateway.gateway_id)
    ).all()
    by_job: dict[str, list[GatewayJobRecord]] = {job.id: [] for job in jobs}
    for job_id, *values in rows:
        by_job[job_id].append(gatewayjob_record(values))
    return [_job_record(job, by_job[job.id]) for job in jobs]


def job_page_record(job: Job, gateways: Sequence[GatewayJobRecord]) -> JobRecord:
    """The job with only ``gateways`` (one page of them, sorted by id)."""
    return _job_record(job, gateways)


def _job_record(job: Job, gateways: Sequence[GatewayJobRecord]) -> JobRecord:
    return JobRecord(
        id=job.id,
        state=JobState(job.state),
        target_version=job.target_version,
        source=job.source,
        request_id=job.request_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        deadline=job.deadline,
        gateways=tuple(gateways),
        requested_by=job.requested_by,
        allow_downgrade=job.allow_downgrade,
        waves=job.waves or "",
        max_parallel=job.max_parallel or 0,
        max_failures=job.max_failures or "",
        soak_s=job.soak_s or 0,
        ending=JobState(job.ending) if job.ending else None,
        stop_reason=job.stop_reason or "",
        not_before=job.not_before,
        not_after=job.not_after,
        window=job.window or "",
        current_wave=min((g.wave for g in gateways if not g.state.terminal), default=None),
        wave_count=max((g.wave for g in gateways), default=0) + 1,
    )


# A state by its stored name, without Enum's lookup by value (several microseconds a call,
# twice for each of a job's thousand gateways on every GetJob).
_GATEWAY_STATES = {state.value: state for state in GatewayState}


def _gateway_state(value: str) -> GatewayState:
    """The GatewayState stored as ``value``; ValueError for a name it does not have."""
    return _GATEWAY_STATES.get(value) or GatewayState(value)


# The columns ``gatewayjob_record`` and ``gateway_record`` take, in their order. A query
# selects exactly these and each row is unpacked by position: a SQLAlchemy Row looks every
# attribute name up in Python, which cost three times the rest of building a record in a
# reply of a thousand gateways.
JOB_GATEWAY_COLUMNS = (
    JobGateway.gateway_id, JobGateway.command_id, JobGateway.state, JobGateway.from_version,
    JobGateway.to_version, JobGateway.error, JobGateway.bytes_done, JobGateway.bytes_total,
    JobGateway.updated_at, JobGateway.vpn_sessions_dropped, JobGateway.published_at,
    JobGateway.wave, JobGateway.path, JobGateway.hop, JobGateway.health,
)  # fmt: skip
GATEWAY_COLUMNS = (
    Gateway.id, Gateway.version, Gateway.first_seen, Gateway.last_seen, Gateway.pid,
    Gateway.listen, Gateway.vpn_sessions, Gateway.heartbeat_interval_ms, Gateway.ha_peer,
    Gateway.prechecks, Gateway.stopped,
)  # fmt: skip


def gatewayjob_record(values: Sequence[Any]) -> GatewayJobRecord:
    """A job's gateway from the values of ``JOB_GATEWAY_COLUMNS``, in that order."""
    (
        gateway_id, command_id, state, from_version, to_version, error, bytes_done,
        bytes_total, updated_at, vpn_sessions_dropped, published_at, wave, path, hop, health,
    ) = values  # fmt: skip
    return GatewayJobRecord(
        gateway_id=gateway_id,
        command_id=command_id,
        state=_gateway_state(state),
        from_version=from_version,
        to_version=to_version,
        error=error,
        bytes_done=bytes_done,
        bytes_total=bytes_total,
        updated_at=updated_at,
        vpn_sessions_dropped=vpn_sessions_dropped,
        published=published_at is not None,
        wave=wave or 0,
        path=tuple(path.split(",")) if path else (),
        hop=hop or 0,
        health=health or "",
    )


def gateway_record(values: Sequence[Any], pending_version: str | None) -> GatewayRecord:
    """A gateway from the values of ``GATEWAY_COLUMNS``, in that order; ``pending_version``
    is the target of its newest unfinished job (None when it is in none)."""
    (
        gateway_id, version, first_seen, last_seen, pid, listen, vpn_sessions,
        heartbeat_interval_ms, ha_peer, prechecks, stopped,
    ) = values  # fmt: skip
    return GatewayRecord(
        id=gateway_id,
        version=version,
        first_seen=first_seen,
        last_seen=last_seen,
        busy=pending_version is not None,
        pid=pid,
        listen=tuple(listen),
        vpn_sessions=vpn_sessions,
        pending_version=pending_version,
        heartbeat_interval=(
            timedelta(milliseconds=heartbeat_interval_ms) if heartbeat_interval_ms else None
        ),
        ha_peer=ha_peer or None,
        prechecks=bool(prechecks),
        stopped=bool(stopped),
    )


def release_record(row: Release) -> ReleaseRecord:
    """The row as a plain value."""
    return ReleaseRecord(
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        notes=row.notes,
        published_at=row.published_at,
        restarts_vpn_service=row.restarts_vpn_service,
        min_from=row.min_from or None,
    )


def event_record(row: JobEvent) -> EventRecord:
    """The row as a plain value."""
    return EventRecord(
        seq=row.seq,
        job_id=row.job_id,
        gateway_id=row.gateway_id,
        gateway_state=GatewayState(row.gateway_state) if row.gateway_state else None,
        job_state=JobState(row.job_state) if row.job_state else None,
        error=row.error,
        bytes_done=row.bytes_done,
        bytes_total=row.bytes_total,
        at=row.at,
    )
