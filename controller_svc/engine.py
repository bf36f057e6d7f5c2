"""The job engine: turns "upgrade to X" into one command per gateway, and gateway reports
into recorded state changes.

Every change is a database row first and a message second, so a restarted controller
picks up where it was: jobs still PENDING (commands maybe not all published) are
dispatched again on start, and gateways answer a command they already ran from their own
records.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from controller_svc import convert
from controller_svc.errors import ControllerError, NotFound
from controller_svc.events import Announcer
from controller_svc.planner import Plan, check, make_plan
from controller_svc.records import JobRecord, ReleaseRecord, ReportIn
from controller_svc.repository import Repository
from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.signing import Signing, Trust
from controller_svc.states import GatewayState
from controller_svc.transitions import EXPIRED_QUEUED
from hitless import logs, names, semver
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery, Publisher
from hitless.errors import BusError, BusUnavailable, DecodeError, InvalidName, PublishFailed
from hitless.v1 import bus_pb2

log = logs.get(__name__)

Clock = Callable[[], datetime]

# A gateway that was sent a command and went silent is failed this long after the
# deadline; one that never took the command is UNREACHABLE at the deadline.
DEADLINE_GRACE = timedelta(seconds=60)
# Confirmed commands are recorded as published this many at a time: one that was sent but
# not yet recorded when the controller stops is sent again by the next one, and a gateway
# answers a command id it already has from its own records.
PUBLISHED_BATCH = 100


def utc_now() -> datetime:
    return datetime.now(UTC)


class Engine:
    def __init__(
        self,
        repo: Repository,
        publisher: Publisher,
        announcer: Announcer,
        trust: Trust,
        *,
        command_deadline: timedelta,
        clock: Clock = utc_now,
        upgrader: ControllerUpgrader | None = None,
    ) -> None:
        self.repo = repo
        self._publisher = publisher
        self.announcer = announcer
        self.trust = trust
        self._deadline = command_deadline
        self._clock = clock
        self._upgrader = upgrader
        self._changed = threading.Condition()
        # Jobs left PENDING because the broker could not be reached (guarded by _changed).
        self._undispatched: set[str] = set()

    # Watching ---------------------------------------------------------------------------

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until something changed here, or ``timeout`` (changes made by another
        controller process are seen by polling)."""
        with self._changed:
            self._changed.wait(timeout)

    # Starting jobs ---------------------------------------------------------------------

    def resolve_release(self, version: str | None) -> ReleaseRecord:
        """The release named, or the latest signed one for None; NotFound lists what
        exists. The release named may be unsigned or yanked: ``Trust.require_signed``
        says whether it may run."""
        if version is None:
            signed = [
                r for r in self.repo.list_releases()
                if self.trust.signing(r) is Signing.SIGNED
            ]  # fmt: skip
            if signed:
                return signed[0]
            raise NotFound(
                "no signed release has been published yet: publish one with "
                "`upgradectl releases publish --version V --artifact FILE --keys DIR`"
            )
        release = self.repo.get_release(version)
        if release is not None:
            return release
        available = ", ".join(r.version for r in self.repo.list_releases()) or "none"
        raise NotFound(f"unknown version {version}; available: {available}")

    def plan(self, version: str | None, gateway_ids: Sequence[str] = ()) -> Plan:
        """What an upgrade to ``version`` (None: the latest) would do.

        Raises InvalidName for a malformed gateway id that is not known (one recorded
        before ids were checked can still be named: its command fails alone), NotFound for
        an unknown release or gateway."""
        release = self.resolve_release(version)
        self.trust.require_signed(release)
        known = {g.id: g for g in self.repo.list_gateways()}
        for gateway_id in gateway_ids:
            if gateway_id not in known:
                names.gateway_id(gateway_id)
        return make_plan(release, known, gateway_ids)

    def start_upgrade(
        self,
        *,
        version: str | None,
        gateway_ids: Sequence[str] = (),
        request_id: str | None = None,
        source: str = "cli",
        requested_by: str = "",
        deadline: timedelta | None = None,
        allow_downgrade: bool = False,
        accept_vpn_disruption: bool = False,
    ) -> JobRecord:
        """Create the job for an upgrade and dispatch it (or leave it PENDING for the
        controller's own upgrade, or for the broker to come back).

        ``request_id`` is the idempotency key: a request id already used returns that job.
        Raises InvalidName (malformed request id, gateway id or deadline), NotFound and
        FailedPrecondition (see ``planner.check``).
        """
        if request_id is not None:
            names.request_id(request_id)
        if deadline is not None:
            names.deadline(deadline)
        if request_id is not None:
            existing = self.repo.job_by_request(request_id)
            if existing is not None:
                return existing
        plan = self.plan(version, gateway_ids)
        check(plan, allow_downgrade=allow_downgrade, accept_vpn_disruption=accept_vpn_disruption)
        now = self._clock()
        job, created = self.repo.create_job(
            plan.release.version,
            [(g.gateway_id, g.from_version) for g in plan.changes],
            deadline=now + (deadline or self._deadline),
            source=source,
            request_id=request_id,
            requested_by=requested_by,
            allow_downgrade=allow_downgrade,
            now=now,
        )
        if not created:
            return job
        log.info(
            "job_created",
            job_id=job.id,
            target_version=job.target_version,
            gateways=[g.gateway_id for g in job.gateways],
            source=source,
        )
        if self._upgrader is not None and self._upgrader.needed(plan.release):
            # The controller moves first; its new version dispatches the PENDING job.
            threading.Thread(
                target=self._upgrade_controller_then_fleet,
                args=(plan.release, job),
                name="controller-upgrade",
                daemon=True,
            ).start()
            return job
        return self.dispatch(job)

    def _upgrade_controller_then_fleet(self, release: ReleaseRecord, job: JobRecord) -> None:
        assert self._upgrader is not None
        try:
            self._upgrader.upgrade_to(release)
        except ControllerError as exc:
            log.error("controller_upgrade_failed", job_id=job.id, error=str(exc))
            for row in job.gateways:
                self._record_local_failure(
                    job,
                    row.gateway_id,
                    row.command_id,
                    f"the controller could not move to {release.version}, so the fleet was "
                    f"not upgraded: {exc}",
                )

    def dispatch(self, job: JobRecord) -> JobRecord:
        """Publish the command of every gateway still QUEUED, then mark the job RUNNING.

        A command the broker refuses (its queue cannot be declared, the message cannot be
        published) fails that gateway alone, with the reason, and the command goes to the
        dead-letter queue. When the broker cannot be reached, the commands not yet confirmed
        wait (their gateways stay QUEUED) and the sweep publishes them once it can be; so
        does the next controller to start. Only commands never confirmed are published, so
        dispatching a job again sends nothing twice.
        """
        release = self.resolve_release(job.target_version)
        queued = [g for g in job.gateways if g.state is GatewayState.QUEUED and not g.published]
        if queued and not self._publisher.connected:
            return self._postpone(job, "the broker is not connected")
        deadline = convert.timestamp(job.deadline)
        published: list[str] = []
        for row in queued:
            command = bus_pb2.UpgradeCommand(
                command_id=row.command_id,
                job_id=job.id,
                gateway_id=row.gateway_id,
                target_version=release.version,
                artifact_sha256=release.sha256,
                artifact_size=release.size,
                restarts_vpn_service=release.restarts_vpn_service,
                deadline=deadline,
            )
            ttl_ms = max(1, int((job.deadline - self._clock()).total_seconds() * 1000))
            try:
                names.gateway_id(row.gateway_id)
                self._publisher.declare([topology.gateway_queue(row.gateway_id)])
                self._publisher.publish(
                    topology.COMMANDS,
                    topology.command_key(row.gateway_id),
                    command,
                    message_id=row.command_id,
                    headers=self.trust.command_headers(
                        command, job.created_at, allow_downgrade=job.allow_downgrade
                    ),
                    expiration_ms=ttl_ms,
                )
            except BusUnavailable as exc:
                self.repo.mark_published(published, self._clock())
                return self._postpone(job, str(exc))
            except (PublishFailed, InvalidName) as exc:
                self._refuse_command(job, row.gateway_id, command, str(exc))
                continue
            published.append(row.command_id)
            if len(published) >= PUBLISHED_BATCH:
                self.repo.mark_published(published, self._clock())
                published = []
        self.repo.mark_published(published, self._clock())
        with self._changed:
            self._undispatched.discard(job.id)
        updated = self.repo.mark_running(job.id, self._clock())
        self.notify()
        return updated

    def _postpone(self, job: JobRecord, why: str) -> JobRecord:
        """Leave the rest of ``job``'s commands for the sweep to publish."""
        log.warning("dispatch_postponed", job_id=job.id, error=why)
        with self._changed:
            self._undispatched.add(job.id)
        return self.repo.get_job(job.id) or job

    def _refuse_command(
        self, job: JobRecord, gateway_id: str, command: bus_pb2.UpgradeCommand, reason: str
    ) -> None:
        """A command that cannot be sent: its gateway FAILED with the reason, the command
        itself kept in the dead-letter queue for a person to look at."""
        log.error("command_refused", job_id=job.id, gateway_id=gateway_id[:80], reason=reason)
        self._record_local_failure(
            job, gateway_id, command.command_id, f"could not send the command: {reason}"
        )
        try:
            self._publisher.dead_letter(
                codec.encode(command),
                reason,
                source=topology.gateway_queue(gateway_id).name,
                message_id=command.command_id,
            )
        except BusError as exc:
            log.error("command_not_dead_lettered", job_id=job.id, error=str(exc))

    def resume_pending(self) -> None:
        """Dispatch jobs a previous controller created but did not finish dispatching
        (``Repository.pending_jobs``): now if the broker answers, else from the sweep once
        it does."""
        pending = [job.id for job in self.repo.pending_jobs()]
        for job_id in pending:
            log.info("job_resumed", job_id=job_id)
        with self._changed:
            self._undispatched.update(pending)
        self._retry_undispatched()

    def _retry_undispatched(self) -> None:
        """Dispatch the jobs waiting for the broker, while it answers."""
        if not self._publisher.connected:
            return
        with self._changed:
            waiting = sorted(self._undispatched)
        for job_id in waiting:
            job = self.repo.get_job(job_id)
            if job is None or job.state.terminal:
                with self._changed:
                    self._undispatched.discard(job_id)
                continue
            self.dispatch(job)
            with self._changed:
                if job_id in self._undispatched:
                    return  # the broker went away again

    def _record_local_failure(
        self, job: JobRecord, gateway_id: str, command_id: str, error: str
    ) -> None:
        self._record_verdict(
            f"controller-{uuid.uuid4()}", job.id, command_id, gateway_id,
            GatewayState.FAILED, job.target_version, error,
        )  # fmt: skip

    def _record_verdict(
        self,
        report_id: str,
        job_id: str,
        command_id: str,
        gateway_id: str,
        state: GatewayState,
        to_version: str,
        error: str,
    ) -> None:
        """Record what the controller itself concluded about a gateway in a job, as a
        report of its own, and announce the job if that finished it."""
        outcome = self.repo.apply_report(
            ReportIn(
                report_id=report_id,
                job_id=job_id,
                command_id=command_id,
                gateway_id=gateway_id,
                state=state,
                from_version="",
                to_version=to_version,
                error=error,
                bytes_done=0,
                bytes_total=0,
                at=self._clock(),
            )
        )
        if outcome.job_finished is not None:
            self._after_change(outcome.job)

    # Reports ---------------------------------------------------------------------------

    def on_report(self, delivery: Delivery) -> None:
        """Consumer handler for the controller's reports queue."""
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        try:
            if kind == topology.STATUS:
                self._on_status(delivery)
            elif kind == topology.HELLO:
                hello = codec.decode(bus_pb2.GatewayHello, delivery.body)
                self._seen(hello.gateway_id, hello.version, pid=hello.pid, listen=hello.listen)
                log.info("gateway_hello", gateway_id=hello.gateway_id, version=hello.version)
            elif kind == topology.HEARTBEAT:
                beat = codec.decode(bus_pb2.GatewayHeartbeat, delivery.body)
                self._seen(beat.gateway_id, beat.version, vpn_sessions=beat.vpn_sessions)
            elif kind == topology.EXPIRED:
                self._on_expired(codec.decode(bus_pb2.UpgradeCommand, delivery.body))
            elif kind == topology.REFUSED:
                self._on_refused(delivery)
            else:
                raise DeadLetter(f"unknown report kind {kind!r} in key {delivery.routing_key!r}")
        except DecodeError as exc:
            raise DeadLetter(str(exc)) from exc
        if kind in (topology.STATUS, topology.EXPIRED, topology.REFUSED):
            self.notify()  # job events may have changed; hellos and heartbeats make none

    def _seen(
        self,
        gateway_id: str,
        version: str,
        *,
        pid: int | None = None,
        listen: Sequence[str] = (),
        vpn_sessions: int | None = None,
    ) -> None:
        if not gateway_id or not version:
            raise DeadLetter("a gateway announcement needs gateway_id and version")
        try:
            names.gateway_id(gateway_id)
        except InvalidName as exc:
            raise DeadLetter(f"refused announcement: {exc}") from exc
        if len(version) > semver.MAX_LENGTH or not semver.is_valid(version):
            raise DeadLetter(
                f"refused announcement from {gateway_id}: version "
                f"{names.shown(version)} is not MAJOR.MINOR.PATCH"
            )
        problem = _announcement_problem(pid, listen, vpn_sessions)
        if problem:
            raise DeadLetter(f"refused announcement from {gateway_id}: {problem}")
        self.repo.record_gateway_seen(
            gateway_id, version, self._clock(), pid=pid, listen=listen, vpn_sessions=vpn_sessions
        )

    def _on_status(self, delivery: Delivery) -> None:
        message = codec.decode(bus_pb2.StatusReport, delivery.body)
        if message.state == 0 or not message.job_id or not message.command_id:
            raise DeadLetter("a status report needs job_id, command_id and a state")
        report_id = delivery.message_id or message.report_id
        outcome = self.repo.apply_report(convert.report(message, report_id))
        if not outcome.applied and not outcome.duplicate:
            log.info(
                "report_ignored",
                job_id=message.job_id,
                gateway_id=message.gateway_id,
                reason=outcome.reason,
            )
        if outcome.job_finished is not None:
            self._after_change(outcome.job)

    def _on_expired(self, command: bus_pb2.UpgradeCommand) -> None:
        """A command's TTL ran out in its gateway's queue: the gateway never took it."""
        log.info("command_expired", job_id=command.job_id, gateway_id=command.gateway_id)
        self._record_verdict(
            f"expired:{command.command_id}", command.job_id, command.command_id,
            command.gateway_id, GatewayState.UNREACHABLE, command.target_version, EXPIRED_QUEUED,
        )  # fmt: skip

    def _on_refused(self, delivery: Delivery) -> None:
        """A gateway refused a command (``bus_pb2.CommandRefused``): a security event, logged
        and mailed to the admins once per report. No job changes: the ids a refused
        message claims may be forged (a gateway that refuses a release of a real job
        reports that job FAILED itself)."""
        refused = codec.decode(bus_pb2.CommandRefused, delivery.body)
        sender = topology.reporting_gateway(delivery.routing_key)
        try:
            names.gateway_id(refused.gateway_id)
            names.message_id(refused.report_id)
        except InvalidName as exc:
            raise DeadLetter(f"refused command report: {exc}") from exc
        if refused.gateway_id != sender:
            raise DeadLetter(
                f"a refusal for gateway {refused.gateway_id!r} came with key "
                f"{delivery.routing_key!r}"
            )
        refused.reason = refused.reason[:MAX_REASON_CHARS]
        log.warning(
            "command_refused_by_gateway",
            gateway_id=refused.gateway_id,
            kind=refused.kind[:40],
            command_id=refused.command_id[:80],
            reason=refused.reason,
        )
        self.announcer.command_refused(refused)

    def _after_change(self, job: JobRecord | None) -> None:
        if job is not None and job.state.terminal:
            log.info("job_finished", job_id=job.id, state=job.state.value)
            self.announcer.job_finished(job)

    # Deadlines ---------------------------------------------------------------------------

    def sweep(self) -> None:
        """Expire what passed its deadline and send events still waiting; called
        periodically."""
        self._retry_undispatched()
        for job in self.repo.expire_overdue(self._clock(), grace=DEADLINE_GRACE):
            self._after_change(job)
        self.announcer.flush()
        self.notify()


# The longest refusal reason kept from a gateway's report.
MAX_REASON_CHARS = 2000

# What a hello or heartbeat may say about a gateway beyond its id and version.
MAX_VPN_SESSIONS = 1_000_000
MAX_LISTEN_ADDRESSES = 64
MAX_ADDRESS_CHARS = 64


def _announcement_problem(pid: int | None, listen: Sequence[str], vpn_sessions: int | None) -> str:
    """Why a hello's or heartbeat's numbers cannot be recorded, or "" when they can."""
    if pid is not None and pid < 0:
        return f"pid {pid} is negative"
    if vpn_sessions is not None and not 0 <= vpn_sessions <= MAX_VPN_SESSIONS:
        return f"{vpn_sessions} VPN sessions is outside 0 to {MAX_VPN_SESSIONS}"
    if len(listen) > MAX_LISTEN_ADDRESSES:
        return f"{len(listen)} listen addresses, more than {MAX_LISTEN_ADDRESSES}"
    long = next((a for a in listen if len(a) > MAX_ADDRESS_CHARS), None)
    if long is not None:
        return f"listen address {names.shown(long)} is longer than {MAX_ADDRESS_CHARS} characters"
    return ""
