"""The controller's domain operations on the database, one transaction each.

Every state change is a row (and a ``job_events`` row beside it), so a restarted
controller picks up where it was. Writers that read before they write take the job's row
lock first (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction
starts with ``BEGIN IMMEDIATE``, which serialises writers up front instead of failing
when a reader tries to become one). That lock is what makes "the job finished" happen
exactly once when the last two reports race, across threads and across controllers,
and it keeps a job's event ``seq`` in commit order, so a client resuming after a seq
never misses an event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from controller_svc import rollout as rollouts
from controller_svc.db import (
    Gateway,
    Job,
    JobEvent,
    JobGateway,
    Release,
    SeenMessage,
)
from controller_svc.errors import (
    Conflict,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    StorageError,
)
from controller_svc.outbox import OutboxEntry, stage
from controller_svc.records import (
    GATEWAY_COLUMNS,
    JOB_GATEWAY_COLUMNS,
    EventRecord,
    GatewayJobRecord,
    GatewayRecord,
    JobPage,
    JobRecord,
    ReleaseRecord,
    ReportIn,
    ReportOutcome,
    event_record,
    gateway_record,
    gatewayjob_record,
    job_page_record,
    job_record,
    job_records,
    release_record,
)
from controller_svc.rollout import Rollout
from controller_svc.sessions import Sessions
from controller_svc.states import GatewayState, JobState, can_move, check_job_move
from controller_svc.store import check_digest
from controller_svc.transitions import (
    GatewayRow,
    apply_to_row,
    close_unstarted,
    expire_rows,
    finish_if_done,
    gateway_event,
    next_hop,
    read_rows,
    set_job_state,
    stop,
    write_rows,
)
from hitless import logs, semver
from hitless.errors import ConfigError

__all__ = [
    "EventRecord",
    "GatewayJobRecord",
    "GatewayRecord",
    "JobPage",
    "JobRecord",
    "ReleaseRecord",
    "ReportIn",
    "ReportOutcome",
    "Repository",
]

log = logs.get(__name__)

SOURCES = frozenset({"cli", "management", "ui"})
_ACTIVE_GATEWAY = [s.value for s in GatewayState if not s.terminal]
_ACTIVE_JOB = [s.value for s in JobState if not s.terminal]
# A gateway in one of these never runs its command (``command_withdrawn``).
_WITHDRAWN = frozenset(
    s.value for s in (GatewayState.SKIPPED, GatewayState.CANCELLED, GatewayState.SUPERSEDED)
)

# Builds the event announcing a job that has just ended (``events.Announcer.job_finished``).
Announce = Callable[[JobRecord], OutboxEntry]
# The longest heartbeat interval a hello may announce.
MAX_HEARTBEAT_INTERVAL = timedelta(days=1)


@dataclass(frozen=True)
class GatewaySeen:
    """What one hello or heartbeat says of its gateway (``Repository.record_gateways_seen``).

    A hello gives ``pid``, ``listen``, ``heartbeat_interval`` (zero: none announced) and
    ``ha_peer`` ("": none), a heartbeat ``vpn_sessions``; None, or no addresses, where the
    message says nothing. ``stopping``: the message is a heartbeat marked stopping (the
    gateway stops cleanly); any other message says it runs.
    """

    gateway_id: str
    version: str
    pid: int | None = None
    listen: tuple[str, ...] = ()
    vpn_sessions: int | None = None
    heartbeat_interval: timedelta | None = None
    ha_peer: str | None = None
    prechecks: bool | None = None
    stopping: bool = False

    def then(self, later: GatewaySeen) -> GatewaySeen:
        """What this message and then ``later`` (of the same gateway) record together:
        ``later``'s version, and each other field from ``later`` where it says something,
        else from this one (a heartbeat after a hello keeps the hello's pid, addresses
        and interval)."""
        return GatewaySeen(
            later.gateway_id,
            later.version,
            pid=self.pid if later.pid is None else later.pid,
            listen=later.listen or self.listen,
            vpn_sessions=self.vpn_sessions if later.vpn_sessions is None else later.vpn_sessions,
            heartbeat_interval=(
                self.heartbeat_interval
                if later.heartbeat_interval is None
                else later.heartbeat_interval
            ),
            ha_peer=self.ha_peer if later.ha_peer is None else later.ha_peer,
            prechecks=self.prechecks if later.prechecks is None else later.prechecks,
            stopping=later.stopping,
        )


class Repository:
    """The controller's persistent state. Thread-safe: each call has its own session."""

    def __init__(self, engine: Engine) -> None:
        self.sessions = Sessions(engine)
        self._write = self.sessions.write
        self._read = self.sessions.read
        self._insert = self.sessions.insert

    # Gateways

    def record_gateway_seen(
        self,
        gateway_id: str,
        version: str,
        at: datetime,
        *,
        pid: int | None = None,
        listen: Sequence[str] = (),
        vpn_sessions: int | None = None,
        heartbeat_interval: timedelta | None = None,
    ) -> bool:
        """Note a hello or heartbeat; True when the gateway was not known before.

        A message older than the last one seen changes nothing, so a delayed heartbeat
        cannot roll a gateway's recorded version back. ``heartbeat_interval`` is what a
        hello announces: zero for a hello that announced none (the default then applies),
        None for a message that does not say (a heartbeat: the recorded one stays).
        Raises InvalidRequest for a negative interval or one over a day.
        """
        seen = GatewaySeen(
            gateway_id,
            version,
            pid=pid,
            listen=tuple(listen),
            vpn_sessions=vpn_sessions,
            heartbeat_interval=heartbeat_interval,
        )
        return gateway_id in self.record_gateways_seen([seen], at)

    def record_gateways_seen(self, seen: Sequence[GatewaySeen], at: datetime) -> set[str]:
        """Note hellos and heartbeats, in the order given, in one transaction; return the
        ids of the gateways that were not known before.

        The messages of one gateway are merged first (``GatewaySeen.then``: the last one's
        version, and what a hello said that a later heartbeat does not), then each gateway
        is recorded as ``record_gateway_seen`` records one message at ``at``: one SELECT
        finds those known, the new ones go in one multi-row INSERT, the others in one
        UPDATE per set of columns named (a heartbeat's, a hello's), each left alone when a
        newer message was recorded already. Raises
        InvalidRequest, before anything is written, for an ``at`` that is not tz-aware, a
        missing gateway id, or a heartbeat interval that is negative or over a day;
        StorageError when the database fails (nothing is written).
        """
        _require_aware(at, "at")
        merged: dict[str, GatewaySeen] = {}
        for one in seen:
            if not one.gateway_id:
                raise InvalidRequest("a gateway id is required")
            _interval_ms(one.heartbeat_interval)
            before = merged.get(one.gateway_id)
            merged[one.gateway_id] = one if before is None else before.then(one)
        if not merged:
            return set()
        # One order of row locks for every writer of many gateways: no deadlocks.
        ordered = [merged[gateway_id] for gateway_id in sorted(merged)]
        with self._write() as session:
            connection = session.connection()
            # Known gateways are the usual case: an INSERT that conflicts costs more than
            # this read.
            known = set(
                connection.execute(
                    select(Gateway.id).where(Gateway.id.in_([one.gateway_id for one in ordered]))
                ).scalars()
            )
            new_rows = [
                {
                    "id": one.gateway_id,
                    "version": one.version,
                    "first_seen": at,
                    "last_seen": at,
                    "pid": one.pid,
                    "listen": list(one.listen),
                    "vpn_sessions": one.vpn_sessions or 0,
                    "heartbeat_interval_ms": _interval_ms(one.heartbeat_interval) or None,
                    "ha_peer": one.ha_peer or None,
                    "prechecks": bool(one.prechecks),
                    "stopped": one.stopping,
                }
                for one in ordered
                if one.gateway_id not in known
            ]
            created: set[str] = set()
            if new_rows:
                # RETURNING makes this one multi-row INSERT ("insertmanyvalues") on both
                # databases; a gateway another controller inserted since the read above is
                # not returned, and is updated below.
                created = set(
                    connection.execute(
                        self._insert(Gateway)
                        .on_conflict_do_nothing(index_elements=[Gateway.id])
                        .returning(Gateway.id),
                        new_rows,
                    ).scalars()
                )
            # Column names -> one parameter set per gateway that names exactly those.
            changes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for one in ordered:
                if one.gateway_id in created:
                    continue
                values = _announced(one.pid, one.listen, one.vpn_sessions)
                interval_ms = _interval_ms(one.heartbeat_interval)
                if interval_ms is not None:
                    values["heartbeat_interval_ms"] = interval_ms or None
                if one.ha_peer is not None:
                    values["ha_peer"] = one.ha_peer or None
                if one.prechecks is not None:
                    values["prechecks"] = one.prechecks
                values["version"] = one.version
                values["stopped"] = one.stopping
                columns = tuple(sorted(values))
                params = {f"new_{name}": value for name, value in values.items()}
                changes.setdefault(columns, []).append({"gateway_id": one.gateway_id, **params})
            for columns, params_list in changes.items():
                connection.execute(
                    update(Gateway)
                    .where(Gateway.id == bindparam("gateway_id"), Gateway.last_seen <= at)
                    .values(last_seen=at, **{name: bindparam(f"new_{name}") for name in columns}),
                    params_list,
                )
            return created

    def list_gateways(self) -> list[GatewayRecord]:
        """Every gateway ever seen, sorted by id."""
        with self._read() as session:
            pending = _pending_versions(session)
            rows = self.sessions.rows(session, select(*GATEWAY_COLUMNS), Gateway.id)
            return [gateway_record(row, pending.get(row[0])) for row in rows]

    def gateways_page(self, after: str | None, limit: int) -> tuple[list[GatewayRecord], bool]:
        """Up to ``limit`` gateways whose id sorts after ``after`` (None: from the first),
        sorted by id, and whether more follow: one keyset-paged query on the primary key.
        Raises InvalidRequest when ``limit`` is not positive."""
        if limit <= 0:
            raise InvalidRequest(f"invalid limit {limit}: must be a positive number")
        with self._read() as session:
            # Tuples: no ORM object per gateway on a call a console makes over and over.
            stmt = select(*GATEWAY_COLUMNS).limit(limit + 1)
            if after is not None:
                stmt = stmt.where(Gateway.id > after)
            rows = self.sessions.rows(session, stmt, Gateway.id)
            page = rows[:limit]
            pending = (
                _pending_versions_between(self.sessions, session, page[0][0], page[-1][0])
                if page
                else {}
            )
            return [gateway_record(row, pending.get(row[0])) for row in page], len(rows) > limit

    def get_gateway(self, gateway_id: str) -> GatewayRecord | None:
        """One gateway, or None when it has never been seen."""
        with self._read() as session:
            row = session.execute(
                select(*GATEWAY_COLUMNS).where(Gateway.id == gateway_id)
            ).one_or_none()
            if row is None:
                return None
            return gateway_record(row, _pending_versions(session, gateway_id).get(gateway_id))

    # Releases

    def add_release(
        self,
        version: str,
        sha256: str,
        size: int,
        notes: str,
        published_at: datetime,
        *,
        restarts_vpn_service: bool = False,
        min_from: str | None = None,
    ) -> tuple[ReleaseRecord, bool]:
        """Record a published release; True when it is new. ``min_from`` is the lowest
        version it upgrades from (None: any); it must be a semantic version below
        ``version`` (InvalidRequest otherwise).

        Publishing the same version with the same digest again is a no-op (a retried
        upload); with another digest it is a Conflict, since a version names one build.
        """
        version = _parse_version(version)
        if min_from:
            min_from = _parse_version(min_from)
            if semver.parse(min_from) >= semver.parse(version):
                raise InvalidRequest(
                    f"release {version} cannot upgrade only from {min_from} and later: "
                    "--min-from must name a version below the release's own"
                )
        check_digest(sha256)
        _require_aware(published_at, "published_at")
        if size < 0:
            raise InvalidRequest(f"invalid size {size} for release {version}: must be >= 0")
        with self._write() as session:
            stmt = (
                self._insert(Release)
                .values(
                    version=version,
                    sha256=sha256,
                    size=size,
                    notes=notes,
                    published_at=published_at,
                    restarts_vpn_service=restarts_vpn_service,
                    min_from=min_from or None,
                )
                .on_conflict_do_nothing(index_elements=[Release.version])
                .returning(Release.version)
            )
            created = session.execute(stmt).scalar_one_or_none() is not None
            row = session.get_one(Release, version)
            if row.sha256 != sha256:
                raise Conflict(
                    f"release {version} already exists with sha256 {row.sha256}, not {sha256}: "
                    "a version names one build; publish the new build under a new version"
                )
            return release_record(row), created

    def list_releases(self) -> list[ReleaseRecord]:
        """All releases, newest semantic version first (1.10.0 before 1.9.0)."""
        with self._read() as session:
            rows = session.scalars(select(Release)).all()
            records = [release_record(row) for row in rows]
        return sorted(records, key=lambda r: semver.parse(r.version), reverse=True)

    def get_release(self, version: str) -> ReleaseRecord | None:
        """The release ``version``, or None."""
        with self._read() as session:
            row = session.get(Release, version.strip())
            return release_record(row) if row else None

    def latest_release(self) -> ReleaseRecord | None:
        """The release with the highest semantic version, or None when there is none."""
        releases = self.list_releases()
        return releases[0] if releases else None

    # Jobs

    def create_job(
        self,
        target_version: str,
        targets: Sequence[tuple[str, str]],
        *,
        deadline: datetime,
        source: str = "cli",
        request_id: str | None = None,
        requested_by: str = "",
        allow_downgrade: bool = False,
        rollout: Rollout = rollouts.ONE_WAVE,
        announce: Announce | None = None,
        skipped: Mapping[str, str] | None = None,
        paths: Mapping[str, Sequence[str]] | None = None,
        now: datetime,
    ) -> tuple[JobRecord, bool]:
        """Create a PENDING job with one QUEUED command per ``(gateway_id, from_version)``,
        each in its wave of ``rollout`` in the order given (``rollout.assign_waves``).

        A gateway in ``paths`` (gateway id -> the releases it goes through, in order, the
        last ``target_version``: ``planner.upgrade_path``) gets a command for the first
        hop; each hop that succeeds queues the next (``transitions.next_hop``).

        Commands of older unfinished jobs for these gateways that have not started are
        SUPERSEDED (``_supersede``; ``announce`` as for ``apply_reports``, for an older job
        that this ends). The gateways in ``skipped`` (gateway id -> why: a failed
        pre-check) are in the job SKIPPED with that reason, never sent a command, and
        supersede nothing. With a ``request_id`` already used, returns that job and False,
        creating nothing: a retried request (CLI retry, redelivered management message)
        makes one job.
        The release must exist, or NotFound says to publish it first. Raises
        InvalidRequest for a rollout that does not fit the targets (``rollout.check``).
        """
        target_version = _parse_version(target_version)
        _require_aware(deadline, "deadline")
        _require_aware(now, "now")
        if source not in SOURCES:
            raise InvalidRequest(
                f"invalid job source {source!r}: expected one of {sorted(SOURCES)}"
            )
        gateway_ids = [gateway_id for gateway_id, _ in targets]
        if not gateway_ids:
            raise InvalidRequest("a job needs at least one target gateway")
        if len(set(gateway_ids)) != len(gateway_ids):
            raise InvalidRequest(f"a gateway is named twice in the targets {gateway_ids}")
        rollouts.check(rollout, len(gateway_ids))
        job_id = str(uuid.uuid4())
        with self._write() as session:
            if request_id is not None:
                existing = _job_by_request(session, request_id)
                if existing is not None:
                    return job_record(session, existing), False
            waves = rollouts.assign_waves(rollout.waves, gateway_ids, _peers(session, gateway_ids))
            for version in {target_version}.union(*(paths or {}).values()):
                if session.get(Release, version) is None:
                    raise NotFound(f"no release {version}: publish it before starting a job to it")
            for gateway_id, path in (paths or {}).items():
                if not path or path[-1] != target_version:
                    raise InvalidRequest(
                        f"the path of gateway {gateway_id} ({', '.join(path)}) does not end "
                        f"at the job's target {target_version}"
                    )
            stmt = (
                self._insert(Job)
                .values(
                    id=job_id,
                    target_version=target_version,
                    state=JobState.PENDING.value,
                    source=source,
                    request_id=request_id,
                    requested_by=requested_by[:128],
                    allow_downgrade=allow_downgrade,
                    created_at=now,
                    updated_at=now,
                    deadline=deadline,
                    waves=rollout.waves.replace(" ", ""),
                    max_parallel=rollout.max_parallel,
                    max_failures=rollout.max_failures.strip(),
                    stop_reason="",
                    not_before=rollout.not_before,
                    not_after=rollout.not_after,
                    window=" ".join(rollout.window.split()),
                    soak_s=rollout.soak_s,
                )
                .on_conflict_do_nothing(index_elements=[Job.request_id])
                .returning(Job.id)
            )
            if session.execute(stmt).scalar_one_or_none() is None:
                # Another controller committed the same request_id since we looked; on
                # PostgreSQL the insert waited for it, and this new statement sees it.
                raced = _job_by_request(session, request_id) if request_id else None
                if raced is None:
                    raise StorageError(f"job {job_id} was not created and no job holds its key")
                return job_record(session, raced), False
            session.add(JobEvent(job_id=job_id, job_state=JobState.PENDING.value, at=now))
            for (gateway_id, from_version), wave in zip(targets, waves, strict=True):
                why = (skipped or {}).get(gateway_id)
                path = list((paths or {}).get(gateway_id, ()))
                row = JobGateway(
                    wave=wave,
                    job_id=job_id,
                    gateway_id=gateway_id,
                    command_id=str(uuid.uuid4()),
                    state=(GatewayState.SKIPPED if why else GatewayState.QUEUED).value,
                    from_version=from_version,
                    to_version=path[0] if path else target_version,
                    path=",".join(path) if len(path) > 1 else "",
                    hop=0,
                    error=why or "",
                    bytes_done=0,
                    bytes_total=0,
                    updated_at=now,
                )
                session.add(row)
                session.add(gateway_event(row, now))
            starting = [g for g in gateway_ids if g not in (skipped or {})]
            self._supersede(session, job_id, target_version, starting, now, announce)
            return job_record(session, session.get_one(Job, job_id)), True

    def _supersede(
        self,
        session: Session,
        job_id: str,
        target_version: str,
        gateway_ids: Sequence[str],
        now: datetime,
        announce: Announce | None,
    ) -> None:
        """Withdraw the commands older unfinished jobs have for ``gateway_ids`` that their
        gateways have not started (QUEUED, sent or not): SUPERSEDED by job ``job_id``, so a
        gateway that was away makes one swap, to this job's target, and never runs the
        older command (``command_withdrawn``). An older job left with nothing unfinished
        ends, its event written here (``announce``). Takes those jobs' locks in id order."""
        older = sorted(
            set(
                session.scalars(
                    select(JobGateway.job_id)
                    .join(Job, Job.id == JobGateway.job_id)
                    .where(
                        JobGateway.gateway_id.in_(gateway_ids),
                        JobGateway.state == GatewayState.QUEUED.value,
                        JobGateway.job_id != job_id,
                        Job.state.in_(_ACTIVE_JOB),
                    )
                )
            )
        )
        if not older:
            return
        jobs = session.scalars(
            select(Job).where(Job.id.in_(older)).order_by(Job.id).with_for_update()
        ).all()
        rows = session.scalars(
            select(JobGateway)
            .where(
                JobGateway.job_id.in_(older),
                JobGateway.gateway_id.in_(gateway_ids),
                JobGateway.state == GatewayState.QUEUED.value,
            )
            .order_by(JobGateway.job_id, JobGateway.gateway_id)
        ).all()
        reason = f"superseded by job {job_id} (to {target_version})"
        for row in rows:
            row.state, row.error, row.updated_at = GatewayState.SUPERSEDED.value, reason, now
            session.add(gateway_event(row, now))
        log.info("commands_superseded", job_id=job_id, superseded=len(rows), jobs=older)
        for job in jobs:
            job.updated_at = now
            self._finish(session, job, now, announce)

    def job_by_request(self, request_id: str) -> JobRecord | None:
        """The job a request id created, if any."""
        with self._read() as session:
            job = _job_by_request(session, request_id)
            return job_record(session, job) if job is not None else None

    def mark_running(self, job_id: str, now: datetime) -> JobRecord:
        """Move a PENDING job to RUNNING (its commands are out); otherwise change nothing."""
        _require_aware(now, "now")
        with self._write() as session:
            job = _lock_job(session, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}: list jobs to find its id")
            if job.state == JobState.PENDING.value:
                set_job_state(session, job, JobState.RUNNING, now)
            return job_record(session, job)

    def pause_job(self, job_id: str, reason: str, at: datetime) -> JobRecord:
        """Pause a PENDING or RUNNING job: no gateway of it starts until ``resume_job``;
        those in flight go on. Pausing a paused job changes nothing. Raises NotFound, and
        IllegalJobMove (FailedPrecondition) for a job that has ended or is ending."""
        _require_aware(at, "at")
        with self._write() as session:
            job = self._locked(session, job_id)
            if job.state != JobState.PAUSED.value:
                _check_not_ending(job, "paused")
                set_job_state(session, job, JobState.PAUSED, at)
                job.stop_reason = reason
            return job_record(session, job)

    def resume_job(self, job_id: str, at: datetime) -> JobRecord:
        """Move a PAUSED job back to RUNNING (its next gateways start at the dispatcher's
        next pass); a job not paused is returned unchanged. Raises NotFound, and
        IllegalJobMove for a job that has ended."""
        _require_aware(at, "at")
        with self._write() as session:
            job = self._locked(session, job_id)
            if job.state == JobState.PAUSED.value:
                set_job_state(session, job, JobState.RUNNING, at)
                job.stop_reason = ""
            elif JobState(job.state).terminal:
                check_job_move(job.id, JobState(job.state), JobState.RUNNING)
            return job_record(session, job)

    def stop_job(
        self,
        job_id: str,
        ending: JobState,
        reason: str,
        at: datetime,
        *,
        announce: Announce | None = None,
    ) -> JobRecord:
        """End a job ABORTED or CANCELLED (``transitions.stop``): gateways not started
        are SKIPPED or CANCELLED now, those in flight finish, and the job moves to
        ``ending`` when they have (at once when none is in flight; ``announce`` as for
        ``apply_reports``). A job already ending is returned unchanged. Raises NotFound,
        and IllegalJobMove for a job that has ended."""
        _require_aware(at, "at")
        with self._write() as session:
            job = self._locked(session, job_id)
            if job.ending is None:
                stop(session, job, ending, reason, at)
                self._finish(session, job, at, announce)
            return job_record(session, job)

    def skip_unstarted(
        self, job_id: str, reason: str, at: datetime, *, announce: Announce | None = None
    ) -> JobRecord:
        """SKIP every gateway of the job not started yet (QUEUED, its command sent or not)
        with ``reason``; the job ends when nothing of it is left in flight (``announce``
        as for ``apply_reports``). Raises NotFound."""
        _require_aware(at, "at")
        with self._write() as session:
            job = self._locked(session, job_id)
            if not JobState(job.state).terminal:
                close_unstarted(session, job, GatewayState.SKIPPED, reason, at)
                job.updated_at = at
                self._finish(session, job, at, announce)
            return job_record(session, job)

    def command_withdrawn(self, command_id: str) -> str | None:
        """Why the command may no longer run (its gateway was SKIPPED or CANCELLED, or its
        job ended or is ending), or None while it may, or when no job has it (a command of
        another controller's database is not this one's to refuse)."""
        with self._read() as session:
            found = session.execute(
                select(JobGateway.state, JobGateway.error, Job.state, Job.ending)
                .join(Job, Job.id == JobGateway.job_id)
                .where(JobGateway.command_id == command_id)
            ).first()
        if found is None:
            return None
        row_state, error, job_state, ending = found
        if row_state in _WITHDRAWN:
            return f"its gateway was {row_state} in the job: {error}"
        if row_state == GatewayState.QUEUED.value and (ending or JobState(job_state).terminal):
            return f"its job is {ending or job_state}"
        return None

    def _locked(self, session: Session, job_id: str) -> Job:
        job = _lock_job(session, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}: `upgradectl jobs list` shows the jobs")
        return job

    def _finish(
        self, session: Session, job: Job, at: datetime, announce: Announce | None
    ) -> JobRecord | None:
        """``finish_if_done``, and the ended job's event written to the outbox with it;
        the job's record when it ended."""
        if finish_if_done(session, job, at) is None:
            return None
        record = job_record(session, job)
        if announce is not None:
            stage(session, self._insert, announce(record), _outbox_now())
        return record

    def apply_report(self, report: ReportIn, *, announce: Announce | None = None) -> ReportOutcome:
        """Apply one gateway report; see ReportOutcome for what can come of it (``job`` is
        the job as this report left it) and ``apply_reports`` for ``announce``."""
        return self._apply([report], announce, records=True)[0]

    def apply_reports(
        self, reports: Sequence[ReportIn], *, announce: Announce | None = None
    ) -> list[ReportOutcome]:
        """Apply gateway reports in one transaction, in order: one outcome per report, as
        ``apply_report`` gives, except that ``job`` is set only on the outcome of the
        report that finished its job.

        A report already applied (its id in ``seen_messages``, or earlier in this batch)
        is a duplicate; one for an unknown job or command, or a move the state machine
        forbids, is refused with the reason; neither changes anything. Each job the batch
        touches is locked once (in id order, the order every writer takes job locks in) and
        checked for its end once, by counts of its gateways' states.

        ``announce`` builds the event announcing a job that has ended; it is written to the
        outbox in this same transaction, so the event exists exactly when the end does, and
        the caller publishes it after commit (``Outbox.pending`` finds it if that fails).
        Raises InvalidRequest, before anything is written, for a report whose ``at`` is not
        tz-aware; StorageError when the database fails (nothing of the batch is written).
        """
        return self._apply(list(reports), announce, records=False)

    def _apply(
        self, reports: list[ReportIn], announce: Announce | None, *, records: bool
    ) -> list[ReportOutcome]:
        for report in reports:
            _require_aware(report.at, "report.at")
        if not reports:
            return []
        with self._write() as session:
            jobs = {
                job.id: job
                for job in session.scalars(
                    select(Job)
                    .where(Job.id.in_(sorted({r.job_id for r in reports})))
                    .order_by(Job.id)
                    .with_for_update()
                )
            }
            # Read under the job locks, so two deliveries of one report cannot both pass.
            seen = set(
                session.scalars(
                    select(SeenMessage.message_id).where(
                        SeenMessage.message_id.in_({r.report_id for r in reports})
                    )
                )
            )
            rows = read_rows(session, (r.command_id for r in reports))
            changed: dict[tuple[str, str], GatewayRow] = {}
            outcomes: list[ReportOutcome] = []
            # Job id -> (index of its last report that closed a gateway, that report's time).
            closing: dict[str, tuple[int, datetime]] = {}
            # Rows written in bulk after the loop: far cheaper than one ORM object each.
            seen_rows: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            versions: dict[str, str] = {}
            for report in reports:
                job = jobs.get(report.job_id)
                if report.report_id in seen:
                    outcomes.append(_DUPLICATE)
                    continue
                if job is None:
                    outcomes.append(_refused(f"unknown job {report.job_id}"))
                    continue
                row = rows.get(report.command_id)
                if (
                    row is None
                    or row.job_id != job.id
                    or row.gateway_id != report.gateway_id
                    or row.command_id != report.command_id  # a hop before moved it on
                ):
                    reason = (
                        f"unknown command {report.command_id} for gateway {report.gateway_id} "
                        f"in job {job.id}"
                    )
                    outcomes.append(_refused(reason))
                    continue
                seen.add(report.report_id)
                seen_rows.append({"message_id": report.report_id, "at": report.at})
                current = GatewayState(row.state)
                if not can_move(current, report.state):
                    moves = f"from {current} to {report.state}"
                    outcomes.append(_refused(f"gateway {row.gateway_id} cannot move {moves}"))
                    continue
                if job.state == JobState.PENDING.value:
                    # A report can overtake mark_running; the job is running either way.
                    set_job_state(session, job, JobState.RUNNING, report.at)
                events.append(apply_to_row(row, report))
                changed[row.job_id, row.gateway_id] = row
                if report.state is GatewayState.SUCCEEDED:
                    versions[row.gateway_id] = row.to_version
                    if (queued := next_hop(row, report.at)) is not None:
                        events.append(queued)
                job.updated_at = report.at
                if report.state.terminal:
                    closing[job.id] = (len(outcomes), report.at)
                outcomes.append(ReportOutcome(True, False, "", None, None))
            write_rows(session, changed.values())
            # A job's RUNNING event (flushed here) comes before its gateways' events.
            session.flush()
            self.sessions.insert_rows(session, SeenMessage, seen_rows)
            self.sessions.insert_rows(session, JobEvent, events)
            if versions:
                # Core, not an ORM bulk update: a gateway without a row is no error here.
                session.connection().execute(
                    update(Gateway)
                    .where(Gateway.id == bindparam("gateway_id"))
                    .values(version=bindparam("to_version")),
                    [{"gateway_id": g, "to_version": v} for g, v in versions.items()],
                )
            for job_id, (index, at) in closing.items():
                job = jobs[job_id]
                _abort_past_limit(session, job, at)
                record = self._finish(session, job, at, announce)
                if record is None:
                    continue
                outcomes[index] = replace(outcomes[index], job_finished=record.state, job=record)
            if records:
                known = {job_id: job_record(session, job) for job_id, job in jobs.items()}
                outcomes = [
                    replace(outcome, job=known.get(report.job_id))
                    for report, outcome in zip(reports, outcomes, strict=True)
                ]
            return outcomes

    def get_job(self, job_id: str) -> JobRecord | None:
        """One job with its gateways, or None."""
        with self._read() as session:
            job = session.get(Job, job_id)
            return job_record(session, job) if job else None

    def latest_job(self) -> JobRecord | None:
        """The most recently created job, or None."""
        jobs = self.list_jobs(limit=1)
        return jobs[0] if jobs else None

    def list_jobs(self, limit: int = 50) -> list[JobRecord]:
        """The ``limit`` most recently created jobs, newest first."""
        if limit <= 0:
            raise InvalidRequest(f"invalid limit {limit}: must be a positive number")
        with self._read() as session:
            jobs = session.scalars(
                select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            ).all()
            return job_records(session, jobs)

    def jobs_page(
        self, after: tuple[datetime, str] | None, limit: int
    ) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` jobs, newest first (created_at, then id, both descending), that
        sort after the job keyed ``after`` = (created_at, id) (None: from the newest), with
        their gateways, and whether more follow. Raises InvalidRequest when ``limit`` is
        not positive."""
        if limit <= 0:
            raise InvalidRequest(f"invalid limit {limit}: must be a positive number")
        stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        if after is not None:
            created, job_id = after
            _require_aware(created, "after")
            stmt = stmt.where(
                or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
            )
        with self._read() as session:
            jobs = session.scalars(stmt).all()
            return job_records(session, jobs[:limit]), len(jobs) > limit

    def job_page(self, job_id: str | None, after: str | None, limit: int) -> JobPage | None:
        """The job ``job_id`` (None: the most recently created) with up to ``limit`` of its
        gateways whose id sorts after ``after`` (None: from the first), sorted by gateway
        id; None when there is no such job. Raises InvalidRequest when ``limit`` is not
        positive."""
        if limit <= 0:
            raise InvalidRequest(f"invalid limit {limit}: must be a positive number")
        with self._read() as session:
            if job_id is None:
                job = session.scalars(
                    select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(1)
                ).one_or_none()
            else:
                job = session.get(Job, job_id)
            if job is None:
                return None
            stmt = select(*JOB_GATEWAY_COLUMNS).where(JobGateway.job_id == job.id).limit(limit + 1)
            if after is not None:
                stmt = stmt.where(JobGateway.gateway_id > after)
            rows = self.sessions.rows(session, stmt, JobGateway.gateway_id)
            count, waves, current = session.execute(
                select(
                    func.count(),
                    func.max(JobGateway.wave),
                    func.min(JobGateway.wave).filter(JobGateway.state.in_(_ACTIVE_GATEWAY)),
                ).where(JobGateway.job_id == job.id)
            ).one()
            record = replace(
                job_page_record(job, [gatewayjob_record(row) for row in rows[:limit]]),
                current_wave=current,
                wave_count=(waves or 0) + 1,
            )
            return JobPage(record, int(count or 0), len(rows) > limit)

    def pending_jobs(self) -> list[JobRecord]:
        """The unfinished jobs with a gateway still QUEUED whose command was never confirmed
        published (PENDING jobs, and any a broker outage or a crash left half dispatched),
        newest first."""
        with self._read() as session:
            unpublished = (
                select(JobGateway.job_id)
                .where(
                    JobGateway.state == GatewayState.QUEUED.value,
                    JobGateway.published_at.is_(None),
                )
                .distinct()
            )
            jobs = session.scalars(
                select(Job)
                .where(Job.state.in_(_ACTIVE_JOB), Job.id.in_(unpublished))
                .order_by(Job.created_at.desc(), Job.id.desc())
            ).all()
            return job_records(session, jobs)

    def jobs_waiting(self, job_ids: Iterable[str]) -> list[str]:
        """Those of ``job_ids`` that are unfinished and have a gateway QUEUED whose command
        was never sent (held back by their rollout, or not yet dispatched)."""
        ids = sorted(set(job_ids))
        if not ids:
            return []
        with self._read() as session:
            return _jobs_with_unsent(session, JobGateway.job_id.in_(ids))

    def peers_in_flight(self, gateway_ids: Sequence[str]) -> dict[str, str]:
        """Gateway id -> its high-availability peer, for those of ``gateway_ids`` whose
        peer has a command in flight now (sent and not final) in any unfinished job, this
        one or another: such a gateway waits for its peer, so the two are never upgrading
        at once. A pair counts when either of the two named the other."""
        if not gateway_ids:
            return {}
        with self._read() as session:
            peers = _pairs(session, gateway_ids)
            if not peers:
                return {}
            busy = set(
                session.scalars(
                    select(JobGateway.gateway_id)
                    .join(Job, Job.id == JobGateway.job_id)
                    .where(
                        JobGateway.gateway_id.in_(set(peers.values())),
                        JobGateway.published_at.is_not(None),
                        JobGateway.state.in_(_ACTIVE_GATEWAY),
                        Job.state.in_(_ACTIVE_JOB),
                    )
                )
            )
        return {g: p for g, p in peers.items() if p in busy}

    def jobs_waiting_for_peers_of(self, gateway_ids: Iterable[str]) -> list[str]:
        """The unfinished jobs with a command never sent to a high-availability peer of
        one of ``gateway_ids`` (``jobs_waiting``): those whose gateways' commands ended may
        have held that peer back (``peers_in_flight``)."""
        ids = sorted(set(gateway_ids))
        if not ids:
            return []
        with self._read() as session:
            peers = set(_pairs(session, ids).values())
            if not peers:
                return []
            return _jobs_with_unsent(session, JobGateway.gateway_id.in_(peers))

    def mark_published(self, command_ids: Sequence[str], at: datetime) -> None:
        """Record, in one transaction, that the broker confirmed these commands."""
        _require_aware(at, "at")
        if not command_ids:
            return
        with self._write() as session:
            # Lock the rows in key order first, as report ingestion writes them
            # (``transitions.write_rows``): an UPDATE by command id alone would lock them in
            # the order of their (random) command ids, and two writers taking the same rows
            # in different orders can deadlock.
            session.execute(
                select(JobGateway.job_id)
                .where(JobGateway.command_id.in_(list(command_ids)))
                .order_by(JobGateway.job_id, JobGateway.gateway_id)
                .with_for_update()
            )
            session.execute(
                update(JobGateway)
                .where(JobGateway.command_id.in_(list(command_ids)))
                .values(published_at=at)
            )

    def events_after(self, job_id: str, after_seq: int, limit: int = 500) -> list[EventRecord]:
        """The job's events with ``seq > after_seq``, oldest first (0 for all of them)."""
        if limit <= 0:
            raise InvalidRequest(f"invalid limit {limit}: must be a positive number")
        with self._read() as session:
            rows = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                .order_by(JobEvent.seq)
                .limit(limit)
            ).all()
            return [event_record(row) for row in rows]

    def expire_overdue(
        self, now: datetime, *, grace: timedelta, announce: Announce | None = None
    ) -> list[JobRecord]:
        """Close what the deadline has passed on; return the jobs that finished because of it.

        A command still QUEUED at the deadline was never taken: UNREACHABLE. A gateway
        that took it gets ``grace`` more to report (a swap in progress is not cut short).
        ``announce`` as for ``apply_reports``: each finished job's event is written to the
        outbox in this transaction.
        """
        _require_aware(now, "now")
        with self._write() as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.state.in_(_ACTIVE_JOB), Job.deadline < now)
                .order_by(Job.id)  # one lock order for every sweeper: no deadlocks
                .with_for_update()
            ).all()
            finished: list[Job] = []
            for job in jobs:
                if expire_rows(session, job, now, grace):
                    job.updated_at = now
                if finish_if_done(session, job, now) is not None:
                    finished.append(job)
            records = job_records(session, finished)
            if announce is not None:
                for record in records:
                    stage(session, self._insert, announce(record), _outbox_now())
            return records

    def job_id(self, job_id: str | None) -> str | None:
        """The id of the job ``job_id`` (None: the most recently created), or None when
        there is no such job; reads no gateway."""
        with self._read() as session:
            if job_id is None:
                stmt = select(Job.id).order_by(Job.created_at.desc(), Job.id.desc()).limit(1)
            else:
                stmt = select(Job.id).where(Job.id == job_id)
            return session.scalar(stmt)

    def job_state(self, job_id: str) -> JobState | None:
        """The job's state alone (none of its gateways), or None when there is no such job."""
        with self._read() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            return JobState(state) if state is not None else None

    def prune_seen(self, before: datetime) -> int:
        """Forget de-duplication ids older than ``before`` (no redelivery comes that late)."""
        _require_aware(before, "before")
        with self._write() as session:
            result = session.execute(delete(SeenMessage).where(SeenMessage.at < before))
            return int(result.rowcount)  # type: ignore[attr-defined]


def _outbox_now() -> datetime:
    """When an outbox row is written: the controller's wall clock, which ``Outbox.pending``
    compares with (a report's own time is the gateway's clock)."""
    return datetime.now(UTC)


_DUPLICATE = ReportOutcome(False, True, "report already applied", None, None)


def _refused(reason: str) -> ReportOutcome:
    return ReportOutcome(False, False, reason, None, None)


def _announced(pid: int | None, listen: Sequence[str], vpn: int | None) -> dict[str, Any]:
    """What a hello or heartbeat says beyond the version: a heartbeat leaves the pid and
    addresses that the last hello gave as they are."""
    values: dict[str, Any] = {}
    if pid is not None:
        values["pid"] = pid
    if listen:
        values["listen"] = list(listen)
    if vpn is not None:
        values["vpn_sessions"] = vpn
    return values


def _interval_ms(interval: timedelta | None) -> int | None:
    """A hello's heartbeat interval in whole milliseconds (0: none announced), None when
    the message says nothing of it."""
    if interval is None:
        return None
    if not timedelta(0) <= interval <= MAX_HEARTBEAT_INTERVAL:
        raise InvalidRequest(
            f"heartbeat interval {interval.total_seconds():g} s is outside 0 to "
            f"{MAX_HEARTBEAT_INTERVAL.total_seconds():g} s"
        )
    return round(interval / timedelta(milliseconds=1))


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{name} must be a tz-aware datetime, got naive {value.isoformat()}")


def _parse_version(text: str) -> str:
    try:
        return str(semver.parse(text))
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def _peers(session: Session, gateway_ids: Sequence[str]) -> dict[str, str]:
    """The high-availability peers among ``gateway_ids``, both ways (a pair counts when
    either of the two named the other)."""
    peers: dict[str, str] = {}
    named = session.execute(
        select(Gateway.id, Gateway.ha_peer).where(
            Gateway.id.in_(gateway_ids), Gateway.ha_peer.is_not(None)
        )
    ).all()
    for gateway_id, peer in named:
        if peer:
            peers[gateway_id] = peer
            peers.setdefault(peer, gateway_id)
    return peers


def _pairs(session: Session, gateway_ids: Sequence[str]) -> dict[str, str]:
    """Gateway id -> its high-availability peer, for those of ``gateway_ids`` in a pair
    (a pair counts when either of the two named the other; the peer may be any gateway)."""
    wanted = set(gateway_ids)
    named = session.execute(
        select(Gateway.id, Gateway.ha_peer).where(
            or_(Gateway.id.in_(wanted), Gateway.ha_peer.in_(wanted)),
            Gateway.ha_peer.is_not(None),
            Gateway.ha_peer != "",
        )
    ).all()
    pairs: dict[str, str] = {g: p for g, p in named if g in wanted and p}
    pairs.update({p: g for g, p in named if p and p in wanted and p not in pairs})
    return pairs


def _jobs_with_unsent(session: Session, which: ColumnElement[bool]) -> list[str]:
    """The unfinished, not ending jobs with a row matching ``which`` that is QUEUED and
    was never sent."""
    return list(
        session.scalars(
            select(JobGateway.job_id)
            .join(Job, Job.id == JobGateway.job_id)
            .where(
                which,
                JobGateway.state == GatewayState.QUEUED.value,
                JobGateway.published_at.is_(None),
                Job.state.in_(_ACTIVE_JOB),
                Job.ending.is_(None),
            )
            .distinct()
        )
    )


def _check_not_ending(job: Job, wanted: str) -> None:
    if job.ending:
        raise FailedPrecondition(
            f"job {job.id} cannot be {wanted}: it is ending {job.ending} ({job.stop_reason})"
        )


def _abort_past_limit(session: Session, job: Job, at: datetime) -> None:
    """ABORT the job (``transitions.stop``) when more of its gateways failed or rolled
    back than its ``--max-failures`` allows; the caller holds the job lock."""
    if not job.max_failures or job.ending or JobState(job.state).terminal:
        return
    session.flush()
    counts = dict(
        session.execute(
            select(JobGateway.state, func.count())
            .where(JobGateway.job_id == job.id)
            .group_by(JobGateway.state)
        ).all()
    )
    failed = sum(counts.get(s.value, 0) for s in rollouts.FAILURES)
    why = rollouts.past_limit(job.max_failures, failed, sum(counts.values()))
    if why is None:
        return
    last = session.scalars(
        select(JobGateway)
        .where(
            JobGateway.job_id == job.id,
            JobGateway.state.in_([s.value for s in rollouts.FAILURES]),
        )
        .order_by(JobGateway.updated_at.desc(), JobGateway.gateway_id)
        .limit(1)
    ).one()
    waves = session.scalar(select(func.max(JobGateway.wave)).where(JobGateway.job_id == job.id))
    reason = (
        f"{why}: stopped in wave {last.wave + 1} of {(waves or 0) + 1}; last "
        f"{last.gateway_id}: {last.error}"
    )
    log.warning("job_aborted", job_id=job.id, reason=reason)
    stop(session, job, JobState.ABORTED, reason, at)


def _lock_job(session: Session, job_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()


def _job_by_request(session: Session, request_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.request_id == request_id)).one_or_none()


def _pending_versions(session: Session, gateway_id: str | None = None) -> dict[str, str]:
    """Gateway id -> the target version of its newest unfinished job, for gateways whose
    command in it has not finished either."""
    stmt = (
        select(JobGateway.gateway_id, Job.target_version)
        .join(Job, Job.id == JobGateway.job_id)
        .where(JobGateway.state.in_(_ACTIVE_GATEWAY), Job.state.in_(_ACTIVE_JOB))
        .order_by(Job.created_at)
    )
    if gateway_id is not None:
        stmt = stmt.where(JobGateway.gateway_id == gateway_id)
    return {gid: target for gid, target in session.execute(stmt).all()}


def _pending_versions_between(
    sessions: Sessions, session: Session, first: str, last: str
) -> dict[str, str]:
    """``_pending_versions`` for the gateways whose id is from ``first`` to ``last`` (one
    page of them): a range on the gateway_id index, cheaper than a list of 1000 ids;
    in one step of the database (``Sessions.rows``): during a job, it is one row per
    gateway of the page."""
    stmt = (
        select(JobGateway.gateway_id, Job.target_version)
        .join(Job, Job.id == JobGateway.job_id)
        .where(
            JobGateway.gateway_id.between(first, last),
            JobGateway.state.in_(_ACTIVE_GATEWAY),
            Job.state.in_(_ACTIVE_JOB),
        )
    )
    return {gid: target for gid, target in sessions.rows(session, stmt, Job.created_at)}
