"""The job engine: turns "upgrade to X" into one command per gateway, and gateway reports
into recorded state changes.

Every change is a database row first and a message second, so a restarted controller
picks up where it was: jobs still PENDING (commands maybe not all published) are
dispatched again on start, and gateways answer a command they already ran from their own
records.

Starting a job only records it: the engine's dispatcher thread publishes its commands
(``start`` / ``stop``), so a caller never waits for a fleet's worth of confirms. Whatever
keeps a command from being sent (the broker away, the controller stopped, the database
failing mid-way) leaves its gateway QUEUED and unpublished in the database, and the
periodic ``sweep`` hands every such job (``Repository.pending_jobs``) to the dispatcher
again, until the deadline: then each command never sent fails its gateway with the last
error that kept it from being sent.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from controller_svc import convert
from controller_svc import prechecks as prechecks_
from controller_svc import rollout as rollouts
from controller_svc.errors import ControllerError, FailedPrecondition, NotFound
from controller_svc.events import Announcer
from controller_svc.follow import JobWatches
from controller_svc.liveness import gateway_state
from controller_svc.outbox import OutboxEntry
from controller_svc.planner import Plan, check, make_plan
from controller_svc.prechecks import Answer, PreChecks
from controller_svc.records import JobRecord, ReleaseRecord, ReportIn
from controller_svc.report_rounds import ReportRounds
from controller_svc.repository import (
    MAX_HEARTBEAT_INTERVAL,
    Announce,
    GatewaySeen,
    Repository,
)
from controller_svc.rollout import Rollout
from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.signing import Signing, Trust
from controller_svc.states import GatewayState, JobState
from controller_svc.transitions import EXPIRED_QUEUED, UNSENT
from hitless import logs, names, semver
from hitless import version as running
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery, Publisher, Requeue
from hitless.bus.amqp.publisher import Confirm
from hitless.errors import BusError, BusUnavailable, DecodeError, InvalidName, PublishFailed
from hitless.v1 import bus_pb2

log = logs.get(__name__)

Clock = Callable[[], datetime]

# A gateway that was sent a command and went silent is failed this long after the
# deadline; one that never took the command is UNREACHABLE at the deadline.
DEADLINE_GRACE = timedelta(seconds=60)
# Confirmed commands are recorded as published this many at a time: one that was sent but
# not yet recorded when the controller stops is sent again by the next one, and a gateway
# answers a command id it already has from its own records. This is also how many
# commands are handed to the publisher at once (it has ``Publisher.lanes`` of them in
# flight).
PUBLISHED_BATCH = 100
# How long one command may wait for the broker's confirm before dispatch stops and leaves
# the rest to the sweep.
CONFIRM_TIMEOUT_S = 30.0
# The reason a command never sent gets at the deadline, before the error that kept it
# (or NO_SEND_ERROR when this controller saw none, e.g. it started after the deadline).
NO_SEND_ERROR = "no controller sent it in time, and none recorded a broker error"


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
        self._watches = JobWatches()
        # Dispatching (all guarded by _changed): the job ids waiting for the dispatcher
        # thread, those queued or being dispatched (each at most once in the queue), those
        # held back while the controller moves to their release first, and the last bus
        # error that kept a job's commands from being sent.
        self.prechecks = PreChecks(publisher)
        self._to_dispatch: queue.Queue[str | None] = queue.Queue()
        self._dispatching: set[str] = set()
        self._again: set[str] = set()
        self._held: set[str] = set()
        self._bus_errors: dict[str, str] = {}
        self._dispatcher: threading.Thread | None = None
        self._stopping = threading.Event()

    # Running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher thread, which publishes the commands of the jobs handed to
        it (by ``start_upgrade``, ``resume_pending`` and ``sweep``), one job at a time."""
        if self._dispatcher is not None:
            return
        self._stopping.clear()
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="dispatcher", daemon=True
        )
        self._dispatcher.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher once the batch of commands it is on is confirmed (within
        ``timeout`` seconds, unless the broker stopped answering: at most
        CONFIRM_TIMEOUT_S more). What was not sent stays unpublished in the database for
        the next controller to send."""
        thread, self._dispatcher = self._dispatcher, None
        if thread is None:
            return
        self._stopping.set()
        self._to_dispatch.put(None)
        thread.join(timeout)

    def _dispatch_loop(self) -> None:
        while (job_id := self._to_dispatch.get()) is not None and not self._stopping.is_set():
            try:
                job = self.repo.get_job(job_id)
                if job is not None and not job.state.terminal:
                    self.dispatch(job)
            except Exception as exc:  # the job stays in the database; the sweep retries it
                log.exception("dispatch_failed", job_id=job_id, error=str(exc))
                with self._changed:
                    self._bus_errors[job_id] = f"dispatching failed: {exc}"
            finally:
                with self._changed:
                    if job_id in self._again:
                        # Asked for while in hand: what it read may be stale; once more.
                        self._again.discard(job_id)
                        self._to_dispatch.put(job_id)
                    else:
                        self._dispatching.discard(job_id)
                    self._changed.notify_all()

    def _enqueue(self, job_id: str) -> bool:
        """Hand a job to the dispatcher, unless it is there already or held back; True
        when handed. A job the dispatcher has in hand is dispatched once more after, since
        what changed (a gateway that ended) may be newer than what it read."""
        with self._changed:
            if job_id in self._held:
                return False
            if job_id in self._dispatching:
                self._again.add(job_id)
                return False
            self._dispatching.add(job_id)
        self._to_dispatch.put(job_id)
        return True

    def wait_dispatched(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the dispatcher to have no job queued or in
        hand; True when it has none (the jobs it had are sent, or left for the sweep)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._dispatching, timeout)

    # Watching ---------------------------------------------------------------------------

    def notify(self, job_ids: Iterable[str] | None = None) -> None:
        """Wake the watchers of ``job_ids`` (None: of every job)."""
        self._watches.notify(job_ids)

    def wait_for_change(self, job_id: str, timeout: float) -> None:
        """Block until ``job_id`` changed here, or ``timeout`` seconds (changes made by
        another controller process are seen by polling)."""
        self._watches.wait(job_id, timeout)

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
        signed = [
            r for r in self.repo.list_releases() if self.trust.signing(r) is Signing.SIGNED
        ]  # fmt: skip
        plan = make_plan(release, known, gateway_ids, signed)
        now = self._clock()
        moving = self._upgrader is not None and self._upgrader.needed(release)
        return replace(
            plan,
            gateways=tuple(
                replace(g, state=gateway_state(known[g.gateway_id], now)) for g in plan.gateways
            ),
            controller_from=running.current() if moving else None,
        )

    def precheck(self, plan: Plan, wait_s: float = prechecks_.WAIT_S) -> dict[str, Answer]:
        """Ask every gateway the plan changes whether anything would stop the upgrade
        (``prechecks.PreChecks.ask``), waiting up to ``wait_s`` seconds: gateway id ->
        Answer. A gateway whose release does not answer pre-checks (its hello did not say
        so) is not asked, and shows as not answered."""
        known = {g.id: g for g in self.repo.list_gateways()}
        asked = [
            g.gateway_id for g in plan.changes
            if (record := known.get(g.gateway_id)) is not None and record.prechecks
            and not g.blocked
        ]  # fmt: skip
        answers = (
            self.prechecks.ask(asked, plan.release.version, plan.release.size, wait_s)
            if asked
            else {}
        )
        return {
            g.gateway_id: answers.get(g.gateway_id, Answer(g.gateway_id, answered=False))
            for g in plan.changes
        }

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
        rollout: Rollout = rollouts.ONE_WAVE,
        precheck: bool = False,
        force: bool = False,
    ) -> JobRecord:
        """Record the job for an upgrade and return it PENDING, at once: the dispatcher
        thread publishes its commands (see ``dispatch``), unless the controller moves to
        that release first (its next version dispatches the job). ``rollout`` says how
        its gateways are staged (waves, a cap in flight, a failure limit; ``rollout.py``).
        With ``precheck``, the gateways are asked first (``precheck``, a few seconds at
        most): one that answers with a problem is left out of the job as SKIPPED with the
        problem, unless ``force``; when every gateway is, nothing starts
        (FailedPrecondition with their problems).

        ``request_id`` is the idempotency key: a request id already used returns that job,
        and hands it to the dispatcher again if commands of it were never sent. Raises
        InvalidName (malformed request id, gateway id or deadline), NotFound and
        FailedPrecondition (see ``planner.check``).
        """
        if request_id is not None:
            names.request_id(request_id)
        if deadline is not None:
            names.deadline(deadline)
        if request_id is not None:
            existing = self.repo.job_by_request(request_id)
            if existing is not None:
                self._dispatch_if_unsent(existing)
                return existing
        plan = self.plan(version, gateway_ids)
        check(plan, allow_downgrade=allow_downgrade, accept_vpn_disruption=accept_vpn_disruption)
        now = self._clock()
        rollouts.check(rollout, len(plan.changes) or 1, now)
        # A gateway no upgrade path reaches the target from is left out, whatever --force.
        left_out = {g.gateway_id: g.blocked for g in plan.changes if g.blocked}
        if precheck and plan.changes:
            if not force:
                left_out |= prechecks_.failing(self.precheck(plan))
            if left_out and len(left_out) == len(plan.changes):
                raise FailedPrecondition(
                    "every gateway failed its pre-check, so nothing was started: "
                    + "; ".join(f"{gid}: {why}" for gid, why in sorted(left_out.items()))
                    + " (fix that, or start with --force)"
                )
            now = self._clock()
        # The deadline runs from when gateways may first start.
        opens = rollouts.starts_at(rollout, now) or now
        moving = self._upgrader is not None and self._upgrader.needed(plan.release)
        if moving:
            assert self._upgrader is not None
            self._upgrader.check_path(plan.release)
        # A job to a release the controller moves to first is held back as it is written:
        # the sweep, which may see it as soon as it is committed, skips it under this lock.
        announce, staged = self._stager()
        with self._changed if moving else contextlib.nullcontext():
            job, created = self.repo.create_job(
                plan.release.version,
                [(g.gateway_id, g.from_version) for g in plan.changes],
                deadline=opens + (deadline or self._deadline),
                source=source,
                request_id=request_id,
                requested_by=requested_by,
                allow_downgrade=allow_downgrade,
                rollout=rollout,
                announce=announce,
                skipped=left_out,
                paths={g.gateway_id: g.path for g in plan.changes if g.path},
                now=now,
            )
            if created and moving:
                self._held.add(job.id)
        # Older jobs this one superseded the last commands of have ended.
        self._after_change(None, staged)
        if not created:
            self._dispatch_if_unsent(job)
            return job
        log.info(
            "job_created",
            job_id=job.id,
            target_version=job.target_version,
            gateways=[g.gateway_id for g in job.gateways],
            source=source,
        )
        if moving:
            # The controller moves first; its new version dispatches the PENDING job.
            threading.Thread(
                target=self._upgrade_controller_then_fleet,
                args=(plan.release, job),
                name="controller-upgrade",
                daemon=True,
            ).start()
            return job
        self._enqueue(job.id)
        return job

    def _dispatch_if_unsent(self, job: JobRecord) -> None:
        """Hand an unfinished job with a command never sent to the dispatcher."""
        if not job.state.terminal and any(
            g.state is GatewayState.QUEUED and not g.published for g in job.gateways
        ):
            self._enqueue(job.id)

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
        """Publish the command of every gateway that may start now (``rollout.to_start``:
        QUEUED, never confirmed, in the current wave, within the cap on gateways in
        flight; none while the job is paused or ending), then mark the job RUNNING; the
        dispatcher thread calls this (callers use ``start_upgrade``), again each time a
        gateway of the job ends, so the rollout moves on.

        The commands go PUBLISHED_BATCH at a time: their queues declared (those this
        process declared before are not declared again), then the commands published with
        ``Publisher.lanes`` confirms in flight, and the batch recorded as published once
        confirmed. A command the broker refuses (its queue
        cannot be declared, the message cannot be published or routed, even after
        declaring its queue again) fails that gateway alone, with the reason, and the
        command goes to the dead-letter queue. When the broker cannot be reached
        (BusUnavailable), the commands not yet confirmed stay QUEUED and unpublished, the
        job stays as it was, and the sweep hands it back until the deadline. From the
        deadline on, no batch is published (``sweep`` fails what was never sent). Only commands
        never confirmed are published, so dispatching a job again sends nothing twice.
        """
        releases = {job.target_version: self.resolve_release(job.target_version)}
        queued = rollouts.to_start(job, self._clock())
        # A gateway whose high-availability peer is upgrading (in this job or another)
        # waits for it: the job is handed back when the peer's command ends.
        waiting_for = self.repo.peers_in_flight([row.gateway_id for row in queued])
        if waiting_for:
            queued = [row for row in queued if row.gateway_id not in waiting_for]
            with self._changed:
                self._bus_errors[job.id] = "held back while its high-availability peer " + (
                    ", ".join(sorted(set(waiting_for.values()))) + " was upgrading"
                )
        if queued and job.deadline <= self._clock():
            return job
        if queued and not self._publisher.connected:
            return self._postpone(job, "the broker is not connected")
        deadline = convert.timestamp(job.deadline)
        commands: list[bus_pb2.UpgradeCommand] = []
        for row in queued:
            # Its hop's release: the job's target, or one on its way there.
            if row.to_version not in releases:
                releases[row.to_version] = self.resolve_release(row.to_version)
            release = releases[row.to_version]
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
            try:
                names.gateway_id(row.gateway_id)
            except InvalidName as exc:
                self._refuse_command(job, row.gateway_id, command, str(exc))
                continue
            commands.append(command)
        try:
            for start in range(0, len(commands), PUBLISHED_BATCH):
                if self._stopping.is_set():
                    return self._postpone(job, "the controller stopped before sending it")
                if job.deadline <= self._clock():
                    log.warning("dispatch_stopped_at_deadline", job_id=job.id)
                    return self.repo.get_job(job.id) or job
                batch = commands[start : start + PUBLISHED_BATCH]
                refused = self._declare_queues(batch)
                for command in batch:
                    if command.gateway_id in refused:
                        why = refused[command.gateway_id]
                        self._refuse_command(job, command.gateway_id, command, why)
                self._publish_batch(job, [c for c in batch if c.gateway_id not in refused])
        except BusUnavailable as exc:
            return self._postpone(job, str(exc))
        if not waiting_for:
            with self._changed:
                self._bus_errors.pop(job.id, None)
        if not commands:
            return job  # nothing may start now (waves, cap, pause, its times): it waits
        updated = self.repo.mark_running(job.id, self._clock())
        self.notify([job.id])
        return updated

    def _declare_queues(self, commands: Sequence[bus_pb2.UpgradeCommand]) -> dict[str, str]:
        """Declare the gateways' command queues (those not declared by this process yet),
        all at once; a refusal sends each again alone to find the ones refused. Returns
        gateway id -> why its queue was refused. Raises BusUnavailable."""
        queues = [topology.gateway_queue(c.gateway_id) for c in commands]
        try:
            self._publisher.declare(queues, CONFIRM_TIMEOUT_S)
            return {}
        except PublishFailed:
            pass
        refused: dict[str, str] = {}
        for command, q in zip(commands, queues, strict=True):
            try:
                self._publisher.declare([q], CONFIRM_TIMEOUT_S)
            except PublishFailed as exc:
                refused[command.gateway_id] = str(exc)
        return refused

    def _publish_batch(self, job: JobRecord, commands: Sequence[bus_pb2.UpgradeCommand]) -> None:
        """Publish ``commands`` together, record the confirmed ones as published, and fail
        alone each gateway whose command the broker refuses twice (the second time after
        declaring its queue again: it may have been deleted since this process declared
        it). Raises BusUnavailable, after recording what was confirmed."""
        ttl_ms = max(1, int((job.deadline - self._clock()).total_seconds() * 1000))
        sent: list[tuple[bus_pb2.UpgradeCommand, Confirm | PublishFailed]] = []
        unavailable: BusUnavailable | None = None
        for command in commands:
            try:
                sent.append((command, self._send(job, command, ttl_ms)))
            except PublishFailed as exc:
                sent.append((command, exc))
            except BusUnavailable as exc:
                unavailable = exc
                break
        published: list[str] = []
        try:
            for command, confirm in sent:
                if unavailable is not None:
                    # Keep what was confirmed meanwhile; drop the rest, never sent late.
                    if isinstance(confirm, Confirm) and _confirmed_now(confirm):
                        published.append(command.command_id)
                    continue
                try:
                    if self._confirmed(job, command, confirm, ttl_ms):
                        published.append(command.command_id)
                except BusUnavailable as exc:
                    unavailable = exc
        finally:
            self.repo.mark_published(published, self._clock())
        if unavailable is not None:
            raise unavailable

    def _confirmed(
        self,
        job: JobRecord,
        command: bus_pb2.UpgradeCommand,
        confirm: Confirm | PublishFailed,
        ttl_ms: int,
    ) -> bool:
        """True once the broker confirmed ``command``; False when it refused it twice (the
        gateway then FAILED alone). Raises BusUnavailable."""
        try:
            if isinstance(confirm, PublishFailed):
                raise confirm
            confirm.wait(CONFIRM_TIMEOUT_S)
            return True
        except PublishFailed:
            pass
        queue_ = topology.gateway_queue(command.gateway_id)
        try:
            self._publisher.declare([queue_], CONFIRM_TIMEOUT_S, again=True)
            self._send(job, command, ttl_ms).wait(CONFIRM_TIMEOUT_S)
        except PublishFailed as exc:
            self._refuse_command(job, command.gateway_id, command, str(exc))
            return False
        return True

    def _send(self, job: JobRecord, command: bus_pb2.UpgradeCommand, ttl_ms: int) -> Confirm:
        return self._publisher.publish_nowait(
            topology.COMMANDS,
            topology.command_key(command.gateway_id),
            command,
            message_id=command.command_id,
            headers=self.trust.command_headers(
                command,
                job.created_at,
                allow_downgrade=job.allow_downgrade,
                soak_seconds=job.soak_s,
            ),
            expiration_ms=ttl_ms,
        )

    def _postpone(self, job: JobRecord, why: str) -> JobRecord:
        """Leave the rest of ``job``'s commands for the sweep to publish; ``why`` is kept
        as the reason its gateways fail if the deadline comes first."""
        log.warning("dispatch_postponed", job_id=job.id, error=why)
        with self._changed:
            self._bus_errors[job.id] = why
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
        """Hand the dispatcher the jobs a previous controller created but did not finish
        dispatching (``Repository.pending_jobs``); those the broker keeps from being sent
        now are handed again by the sweep."""
        for job in self.repo.pending_jobs():
            if self._enqueue(job.id):
                log.info("job_resumed", job_id=job.id)

    def _sweep_unsent(self) -> None:
        """For every unfinished job with a command never sent (read from the database, so
        jobs any controller left behind are found): past its deadline, fail each such
        gateway with UNSENT and the last error that kept it from being sent (a command
        that never left cannot have expired in a queue: not UNREACHABLE); before it, hand
        the job to the dispatcher while the broker answers."""
        now = self._clock()
        for job in self.repo.pending_jobs():
            with self._changed:
                why = self._bus_errors.get(job.id)
            if job.not_after is not None and job.not_after < now:
                self._past_not_after(job)
                continue
            if job.deadline < now:
                if why is None and _holds_back(job):
                    continue  # not due yet, not failed: expire_overdue SKIPs them
                # Even while the dispatcher holds the job: it sends nothing past the
                # deadline (a batch in flight at that moment may still be confirmed).
                self._fail_unsent(job, why)
            elif self._publisher.connected:
                self._enqueue(job.id)

    def _past_not_after(self, job: JobRecord) -> None:
        """SKIP the gateways of ``job`` that had not started by its ``not_after``."""
        assert job.not_after is not None
        reason = f"the job's --not-after {job.not_after.isoformat()} came before its turn"
        announce, staged = self._stager()
        record = self.repo.skip_unstarted(job.id, reason, self._clock(), announce=announce)
        log.warning("job_past_not_after", job_id=job.id, not_after=job.not_after.isoformat())
        self._after_change(record if record.state.terminal else None, staged)
        self.notify([job.id])

    def _fail_unsent(self, job: JobRecord, why: str | None) -> None:
        reason = f"{UNSENT}: {why or NO_SEND_ERROR}"
        for row in job.gateways:
            if row.state is GatewayState.QUEUED and not row.published:
                self._record_verdict(
                    f"unsent:{row.command_id}", job.id, row.command_id, row.gateway_id,
                    GatewayState.FAILED, job.target_version, reason,
                )  # fmt: skip
        log.warning("job_unsent_at_deadline", job_id=job.id, reason=reason)
        with self._changed:
            self._bus_errors.pop(job.id, None)

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
        report of its own, and announce the job if that finished it (the event written
        in the same transaction)."""
        announce, staged = self._stager()
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
            ),
            announce=announce,
        )
        self._after_change(outcome.job if outcome.job_finished else None, staged)
        self.notify([job_id])
        if outcome.applied and not outcome.job_finished:
            self._move_on([job_id])
        if outcome.applied:
            for waiting in self.repo.jobs_waiting_for_peers_of([gateway_id]):
                self._enqueue(waiting)

    # Steering a rollout -----------------------------------------------------------------

    def pause_job(self, job_id: str, actor: str) -> JobRecord:
        """Pause the job: no gateway of it starts until ``resume_job``; those in flight
        go on. Raises NotFound, FailedPrecondition for a job that ended or is ending."""
        job = self.repo.pause_job(job_id, f"paused by {actor}", self._clock())
        log.info("job_paused", job_id=job_id, by=actor)
        self.notify([job_id])
        return job

    def resume_job(self, job_id: str, actor: str) -> JobRecord:
        """Resume a paused job: its next gateways start now. Raises NotFound,
        FailedPrecondition for a job that has ended."""
        job = self.repo.resume_job(job_id, self._clock())
        log.info("job_resumed_by_operator", job_id=job_id, by=actor)
        self.notify([job_id])
        self._enqueue(job_id)
        return job

    def cancel_job(self, job_id: str, actor: str, reason: str = "") -> JobRecord:
        """Cancel the job: commands not yet taken are withdrawn (their gateways
        CANCELLED; a gateway that takes one later is refused its release), gateways in
        flight finish or roll back, and the job ends CANCELLED when they have (the "job
        finished" event then goes out). Raises NotFound, FailedPrecondition for a job
        that has ended."""
        why = f"cancelled by {actor}" + (f": {reason}" if reason else "")
        announce, staged = self._stager()
        job = self.repo.stop_job(job_id, JobState.CANCELLED, why, self._clock(), announce=announce)
        log.info("job_cancelled", job_id=job_id, by=actor, reason=reason)
        self._after_change(job if job.state.terminal else None, staged)
        self.notify([job_id])
        return job

    def withdrawn(self, command_id: str) -> str | None:
        """Why a command may no longer run (``Repository.command_withdrawn``), or None."""
        return self.repo.command_withdrawn(command_id)

    # Reports ---------------------------------------------------------------------------

    def on_reports(self, deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        """Batch handler for the controller's reports queue (``Consumer(batch=...)``):
        one outcome per delivery, in order: None when handled (applied, or ignored as a
        duplicate or an illegal move), DeadLetter or Requeue for that delivery alone.

        Status reports are applied together (``Repository.apply_reports``), and hellos
        and heartbeats together (``Repository.record_gateways_seen``, those of one
        gateway merged into one row change), in rounds that keep each gateway's order
        where it changes what is written (``controller_svc.report_rounds``): usually two
        rounds of two transactions, however many gateways the batch holds. Any other
        kind goes through ``on_report`` in its place, after what came before it. Raises
        whatever else fails (StorageError, ...): the consumer then hands each delivery
        alone.
        """
        outcomes: list[BaseException | None] = [None] * len(deliveries)
        rounds = ReportRounds()
        for index, delivery in enumerate(deliveries):
            kind = delivery.routing_key.rsplit(".", 1)[-1]
            try:
                if kind == topology.STATUS:
                    report = self._status_report(delivery)
                    rounds.add_status(report, _senders(delivery, report.gateway_id))
                elif kind in (topology.HELLO, topology.HEARTBEAT):
                    seen = self._announcement(kind, delivery)
                    rounds.add_announcement(seen, _senders(delivery, seen.gateway_id))
                else:
                    self._apply_rounds(rounds)
                    rounds = ReportRounds()
                    self.on_report(delivery)
            except (DeadLetter, Requeue) as exc:
                outcomes[index] = exc
        self._apply_rounds(rounds)
        return outcomes

    def _apply_rounds(self, rounds: ReportRounds) -> None:
        """Apply each round's status reports, then its announcements (two transactions a
        round, ``controller_svc.report_rounds``)."""
        for round_ in rounds:
            self._apply_statuses(round_.statuses)
            self._record_seen(round_.announcements)

    def on_report(self, delivery: Delivery) -> None:
        """Consumer handler for the controller's reports queue, one delivery at a time."""
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        try:
            if kind == topology.STATUS:
                self._on_status(delivery)
            elif kind in (topology.HELLO, topology.HEARTBEAT):
                self._record_seen([self._announcement(kind, delivery)])
            elif kind == topology.EXPIRED:
                if delivery.headers.get(topology.KIND_HEADER) == topology.PRECHECK:
                    return  # a pre-check an offline gateway never saw: nothing to record
                self._on_expired(codec.decode(bus_pb2.UpgradeCommand, delivery.body))
            elif kind == topology.PRECHECK:
                self._on_precheck(delivery)
            elif kind == topology.REFUSED:
                self._on_refused(delivery)
            else:
                raise DeadLetter(f"unknown report kind {kind!r} in key {delivery.routing_key!r}")
        except DecodeError as exc:
            raise DeadLetter(str(exc)) from exc

    def _announcement(self, kind: str, delivery: Delivery) -> GatewaySeen:
        """The hello or heartbeat ``delivery`` carries (``kind`` says which), checked by
        ``_seen``; DeadLetter saying why it cannot be recorded."""
        try:
            if kind == topology.HELLO:
                hello = codec.decode(bus_pb2.GatewayHello, delivery.body)
                seen = GatewaySeen(
                    hello.gateway_id,
                    hello.version,
                    pid=hello.pid,
                    listen=tuple(hello.listen),
                    heartbeat_interval=hello.heartbeat_interval.ToTimedelta(),
                    ha_peer=hello.ha_peer,
                    prechecks=topology.PRECHECK in hello.features,
                )
            else:
                beat = codec.decode(bus_pb2.GatewayHeartbeat, delivery.body)
                seen = GatewaySeen(
                    beat.gateway_id,
                    beat.version,
                    vpn_sessions=beat.vpn_sessions,
                    stopping=beat.stopping,
                )
        except DecodeError as exc:
            raise DeadLetter(str(exc)) from exc
        self._seen(seen)
        if kind == topology.HELLO:
            log.info("gateway_hello", gateway_id=seen.gateway_id, version=seen.version)
        elif seen.stopping:
            log.info("gateway_stopping", gateway_id=seen.gateway_id, version=seen.version)
        return seen

    def _seen(self, seen: GatewaySeen) -> None:
        """DeadLetter saying why ``seen`` cannot be recorded, if it cannot."""
        gateway_id, version = seen.gateway_id, seen.version
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
        problem = _announcement_problem(seen.pid, seen.listen, seen.vpn_sessions)
        if seen.ha_peer:
            try:
                names.gateway_id(seen.ha_peer)
            except InvalidName as exc:
                problem = f"ha_peer: {exc}"
        interval = seen.heartbeat_interval
        if interval is not None and not timedelta(0) <= interval <= MAX_HEARTBEAT_INTERVAL:
            problem = (
                f"heartbeat interval {interval.total_seconds():g} s is outside 0 to "
                f"{MAX_HEARTBEAT_INTERVAL.total_seconds():g} s"
            )
        if problem:
            raise DeadLetter(f"refused announcement from {gateway_id}: {problem}")

    def _record_seen(self, seen: Sequence[GatewaySeen]) -> None:
        """Record checked hellos and heartbeats, in order, in one transaction."""
        if seen:
            self.repo.record_gateways_seen(seen, self._clock())

    def _on_status(self, delivery: Delivery) -> None:
        self._apply_statuses([self._status_report(delivery)])

    def _status_report(self, delivery: Delivery) -> ReportIn:
        """The status report ``delivery`` carries; DeadLetter saying why it is none."""
        try:
            message = codec.decode(bus_pb2.StatusReport, delivery.body)
        except DecodeError as exc:
            raise DeadLetter(str(exc)) from exc
        if message.state == 0 or not message.job_id or not message.command_id:
            raise DeadLetter("a status report needs job_id, command_id and a state")
        report = convert.report(message, delivery.message_id or message.report_id)
        if report.state in CONTROLLER_ONLY:
            raise DeadLetter(f"a gateway cannot report {report.state}: only the controller sets it")
        return report

    def _apply_statuses(self, reports: Sequence[ReportIn]) -> None:
        """Apply status reports in one transaction, then announce the jobs they finished
        and wake those jobs' watchers."""
        if not reports:
            return
        announce, staged = self._stager()
        outcomes = self.repo.apply_reports(reports, announce=announce)
        closed: set[str] = set()
        ended: set[str] = set()
        for report, outcome in zip(reports, outcomes, strict=True):
            if not outcome.applied and not outcome.duplicate:
                log.info(
                    "report_ignored",
                    job_id=report.job_id,
                    gateway_id=report.gateway_id,
                    reason=outcome.reason,
                )
            if outcome.applied and report.state.terminal:
                closed.add(report.job_id)
                ended.add(report.gateway_id)
            if outcome.job_finished is not None:
                closed.discard(report.job_id)
                self._after_change(outcome.job, ())
        self.announcer.publish(staged)
        self.notify({report.job_id for report in reports})
        self._move_on(closed)
        # Gateways held back while a high-availability peer of theirs upgraded may start.
        for job_id in self.repo.jobs_waiting_for_peers_of(ended):
            self._enqueue(job_id)

    def _move_on(self, job_ids: Iterable[str]) -> None:
        """Hand the dispatcher those of ``job_ids`` that have gateways still to start
        (a gateway of theirs ended: the next one, or the next wave, may start now)."""
        for job_id in self.repo.jobs_waiting(job_ids):
            self._enqueue(job_id)

    def _on_expired(self, command: bus_pb2.UpgradeCommand) -> None:
        """A command's TTL ran out in its gateway's queue: the gateway never took it."""
        log.info("command_expired", job_id=command.job_id, gateway_id=command.gateway_id)
        self._record_verdict(
            f"expired:{command.command_id}", command.job_id, command.command_id,
            command.gateway_id, GatewayState.UNREACHABLE, command.target_version, EXPIRED_QUEUED,
        )  # fmt: skip

    def _on_precheck(self, delivery: Delivery) -> None:
        """A gateway's answer to a pre-check: handed to the question waiting for it (one
        for another gateway than the sender's key is refused)."""
        result = codec.decode(bus_pb2.PreCheckResult, delivery.body)
        sender = topology.reporting_gateway(delivery.routing_key)
        if result.gateway_id != sender:
            raise DeadLetter(
                f"a pre-check answer for gateway {names.shown(result.gateway_id)} came with "
                f"key {delivery.routing_key!r}"
            )
        if not self.prechecks.take(result):
            log.info("precheck_answer_unasked", gateway_id=sender, check_id=result.check_id[:64])

    def _on_refused(self, delivery: Delivery) -> None:
        """A gateway refused a command (``bus_pb2.CommandRefused``): a security event, logged
        and mailed to the admins once per report. When the refused message carried the
        id of a command this controller sent that gateway, not yet taken, and it was
        refused for its signature (REFUSAL_FAILS: altered or re-signed on its way), that
        gateway FAILED in its job with the reason, so ``status`` shows it. Other ids are
        left alone: a refused message may claim any ids (a gateway that refuses a release
        of a real job reports that job FAILED itself; a replay is of a command taken
        already, and an expired one is UNREACHABLE)."""
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
        if refused.kind in REFUSAL_FAILS:
            self._fail_refused(refused)

    def _fail_refused(self, refused: bus_pb2.CommandRefused) -> None:
        """FAIL the gateway's command that ``refused`` names, when it is one this
        controller sent that gateway and the gateway has not started it (QUEUED)."""
        if not refused.job_id or len(refused.job_id) > 64:  # job ids are UUIDs
            return
        job = self.repo.get_job(refused.job_id)
        row = next(
            (g for g in job.gateways if g.command_id == refused.command_id), None
        ) if job is not None else None  # fmt: skip
        if job is None or row is None or row.gateway_id != refused.gateway_id:
            return
        if row.state is not GatewayState.QUEUED:
            return
        self._record_verdict(
            f"refused:{refused.report_id}", job.id, row.command_id, row.gateway_id,
            GatewayState.FAILED, row.to_version,
            f"the gateway refused the command ({refused.kind}): {refused.reason}",
        )  # fmt: skip

    def _stager(self) -> tuple[Announce, list[OutboxEntry]]:
        """An ``announce`` for the repository, and the list of the events it built: the
        repository writes each in its transaction, the caller publishes them after."""
        staged: list[OutboxEntry] = []

        def announce(job: JobRecord) -> OutboxEntry:
            entry = self.announcer.job_finished(job)
            staged.append(entry)
            return entry

        return announce, staged

    def _after_change(
        self, job: JobRecord | None, staged: Sequence[OutboxEntry] | None = None
    ) -> None:
        """Log a job that ended and publish ``staged``, the events already written with
        the change (``_stager``). With ``staged`` None, the event for ``job`` was not
        written with the change: it goes to the outbox now, then out."""
        if job is not None and job.state.terminal:
            log.info("job_finished", job_id=job.id, state=job.state.value)
            if staged is None:
                staged = [self.announcer.job_finished(job)]
                self.announcer.keep(staged)
        self.announcer.publish(staged or ())

    # Deadlines ---------------------------------------------------------------------------

    def sweep(self) -> None:
        """Dispatch again the jobs with commands never sent (or fail those commands at the
        deadline), expire what passed its deadline and send events still waiting; called
        periodically."""
        self._sweep_unsent()
        announce, staged = self._stager()
        expired = self.repo.expire_overdue(self._clock(), grace=DEADLINE_GRACE, announce=announce)
        for job in expired:
            self._after_change(job, ())
        self.announcer.publish(staged)
        self.announcer.flush()
        self.notify()


# The refusals of a command (``bus_pb2.CommandRefused.kind``) that fail it in its job
# when it is one the controller sent and the gateway has not started: its signature did
# not hold on the way (``_on_refused``).
REFUSAL_FAILS = frozenset({"unsigned", "unknown-key", "bad-signature"})
# Gateway states only the controller sets (common.proto): a report of one is refused.
CONTROLLER_ONLY = frozenset({GatewayState.SKIPPED, GatewayState.CANCELLED, GatewayState.SUPERSEDED})
# The longest refusal reason kept from a gateway's report.
MAX_REASON_CHARS = 2000

# What a hello or heartbeat may say about a gateway beyond its id and version.
MAX_VPN_SESSIONS = 1_000_000
MAX_LISTEN_ADDRESSES = 64
MAX_ADDRESS_CHARS = 64


def _holds_back(job: JobRecord) -> bool:
    """Whether the job holds gateways back on purpose (``transitions.held_back``)."""
    return (
        bool(job.waves or job.window or job.not_before or job.not_after)
        or job.max_parallel > 0
        or job.state is JobState.PAUSED
    )


def _confirmed_now(confirm: Confirm) -> bool:
    """Whether the broker has confirmed already; a message not yet sent is dropped."""
    try:
        confirm.wait(0)
    except BusError:
        return False
    return True


def _senders(delivery: Delivery, gateway_id: str) -> set[str]:
    """The gateway a report's routing key names and the one its body names (the same,
    from a well-behaved gateway): whose order of messages the report is part of."""
    return {topology.reporting_gateway(delivery.routing_key), gateway_id} - {""}


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
