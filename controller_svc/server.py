"""The controller's gRPC API: ``hitless.v1.Controller`` and ``hitless.v1.Artifacts``,
plus health checking and reflection. The only module of the controller that imports grpc.

Every call is admitted against the budget of its kind (``controller_svc.limits``), then
its caller is authenticated and authorised (``controller_svc.access``: an API token with a
role; on the gateway port, a gateway's client certificate, or an operator's with a role,
``controller_svc.operator_certs``), and each call that changes something is written to the
audit log with its outcome.

Domain errors become status codes here, in one place; the details carry the full
sentence, which upgradectl shows as it is. Every call is admitted against the budget of
its kind first (``controller_svc.limits``): over budget it is refused with
RESOURCE_EXHAUSTED, and a stream that keeps waiting on its client is cancelled.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller_svc import convert, follow, paging
from controller_svc.access import (
    CHANGES,
    GATEWAY_PREFIXES,
    Audit,
    Caller,
    PermissionDenied,
    Role,
    Tokens,
    Unauthenticated,
    bearer,
    current,
    current_actor,
    role_needed,
)
from controller_svc.admins import Admins
from controller_svc.broker_access import ManagementRefused, ManagementUnavailable
from controller_svc.engine import Engine
from controller_svc.enrollment import Enrollments
from controller_svc.errors import (
    Conflict,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
)
from controller_svc.feed import FeedError, FeedSync
from controller_svc.limits import (
    DEFAULT_LIMITS,
    Admission,
    Kind,
    Limits,
    Refused,
    Slot,
    kind_of,
    peer_host,
)
from controller_svc.liveness import gateway_state
from controller_svc.operator_certs import OperatorCertificates
from controller_svc.publishers import PublisherRecord, Publishers
from controller_svc.records import ReleaseRecord
from controller_svc.rejections import Rejections
from controller_svc.selfupgrade import ControllerUpgrader
from controller_svc.store import ArtifactStore, stamped_as
from controller_svc.users import Users
from hitless import api, logs, names, pki, semver, version
from hitless.config import HostPort
from hitless.errors import BusError, ConfigError, HitlessError
from hitless.pki import CertificateAuthority
from hitless.trust.errors import MetadataNotFound
from hitless.trust.repository import Repository
from hitless.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)

log = logs.get(__name__)

# Bytes of artifact per Download message: fewer, larger messages cost less per byte (each
# is a pass through grpc's Python layer and a thread handoff); a gateway of any release
# accepts up to grpc's default 4 MiB per message.
CHUNK_SIZE = 1024 * 1024
# The most rows one list call returns (ListJobs, ListAudit): a bounded answer per call.
MAX_LIST_LIMIT = 1000
# The rows of a page when the request gives no page_size (AIP-158: the API's default).
DEFAULT_GATEWAYS_PAGE = paging.MAX_PAGE_SIZE
DEFAULT_JOBS_PAGE = 50
# The longest reason CancelJob keeps.
MAX_CANCEL_REASON_CHARS = 500
DEFAULT_JOB_GATEWAYS_PAGE = paging.MAX_PAGE_SIZE
WATCH_POLL_S = 0.5
# Request fields never written to the audit log (AddUser's password).
SECRET_FIELDS = frozenset({"password"})

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (Refused, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ManagementUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ManagementRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FeedError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (BusError, grpc.StatusCode.UNAVAILABLE),
    (HitlessError, grpc.StatusCode.INTERNAL),
]

F = TypeVar("F", bound=Callable[..., Any])


def _status_of(exc: Exception) -> grpc.StatusCode:
    return next(code for kind, code in _CODES if isinstance(exc, kind))


def _translated(method: F) -> F:
    """Abort the call with the status code of a domain error (unary methods)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except HitlessError as exc:
            context.abort(_status_of(exc), str(exc))

    return wrapper  # type: ignore[return-value]


def _translated_stream(method: F) -> F:
    """The same for server-streaming methods."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except HitlessError as exc:
            context.abort(_status_of(exc), str(exc))

    return wrapper  # type: ignore[return-value]


class ControllerService(controller_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        admins: Admins,
        rejections: Rejections,
        stopping: threading.Event,
        feed: FeedSync | None = None,
        upgrader: ControllerUpgrader | None = None,
        *,
        tokens: Tokens,
        audit: Audit,
        enrollments: Enrollments | None = None,
        publishers: Publishers | None = None,
        operator_certificates: OperatorCertificates | None = None,
        users: Users | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._tokens = tokens
        self._users = users
        self._operator_certificates = operator_certificates
        self._audit = audit
        self._enrollment = enrollments
        # The allowed publishers of management jobs: by default those in the engine's database.
        self._publishers = publishers or Publishers(engine.repo.sessions)
        self._engine = engine
        self._repo = engine.repo
        self._store = store
        self._admins = admins
        self._rejections = rejections
        self._stopping = stopping
        self._feed = feed
        self._upgrader = upgrader
        self._trust = engine.trust
        self._watch_lifetime_s = limits.watch.lifetime_s

    @_translated
    def ListGateways(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A page of gateways sorted by id (AIP-158 paging; see ``controller_svc.paging``)."""
        size = paging.page_size(request.page_size, DEFAULT_GATEWAYS_PAGE)
        cursor = paging.decode(request.page_token, "gateways")
        records, more = self._repo.gateways_page(cursor.after[0] if cursor else None, size)
        now = datetime.now(UTC)
        token = ""
        if more:
            token = paging.encode(paging.Cursor("gateways", "", (records[-1].id,)))
        return controller_pb2.ListGatewaysResponse(
            gateways=[convert.gateway(r, gateway_state(r, now)) for r in records],
            next_page_token=token,
        )

    @_translated
    def ListReleases(self, request: Any, context: grpc.ServicerContext) -> Any:
        releases = [self._release(r) for r in self._repo.list_releases()]
        return controller_pb2.ListReleasesResponse(releases=releases)

    def _release(self, record: ReleaseRecord) -> Any:
        return convert.release(record, self._trust.signing(record).value)

    @_translated
    def PublishRelease(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """Store the artifact and publish its signed targets metadata, then record the
        release. The metadata is checked first and the upload held to the length and
        sha256 it signs: an artifact no valid targets metadata lists is never stored."""
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidRequest("the first message of PublishRelease must carry the metadata")
        meta = first.metadata
        version = str(semver.parse(meta.version))
        signed_sha, signed_size = self._trust.signed_target(version, meta.targets_metadata)
        self._trust.check_release(version, signed_sha, signed_size, meta.targets_metadata)
        for claimed, signed, what in ((meta.sha256, signed_sha, "sha256"),
                                      (meta.size, signed_size, "size")):  # fmt: skip
            if claimed and claimed != signed:
                raise InvalidRequest(
                    f"the upload says {what} {claimed}, the signed targets metadata {signed}: "
                    "publish the artifact the metadata was signed for"
                )

        def chunks() -> Iterator[bytes]:
            for part in request_iterator:
                if part.WhichOneof("part") != "chunk":
                    raise InvalidRequest("after the metadata, PublishRelease takes only chunks")
                yield part.chunk

        stored = self._store.put(
            chunks(),
            expected_sha256=signed_sha,
            expected_size=signed_size,
            check=stamped_as(version),
        )
        known = self._repo.get_release(version)
        if known is not None and known.sha256 != stored.sha256:
            raise Conflict(
                f"release {version} already exists with sha256 {known.sha256}, not "
                f"{stored.sha256}: a version names one build; publish the new build under a "
                "new version"
            )
        self._trust.take_release(version, stored.sha256, stored.size, meta.targets_metadata)
        record, created = self._repo.add_release(
            version,
            stored.sha256,
            stored.size,
            meta.notes,
            datetime.now(UTC),
            restarts_vpn_service=meta.restarts_vpn_service,
            min_from=meta.min_from or None,
        )
        if created:
            log.info("release_published", version=version, sha256=stored.sha256, size=stored.size)
            self._engine.announcer.release_published(record)
        return self._release(record)

    @_translated
    def GetTargetsMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        data, targets_version = self._trust.targets()
        return controller_pb2.TargetsMetadata(data=data, version=targets_version)

    @_translated
    def YankRelease(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Publish the release manager's next targets version, which must leave the
        release out; from then on gateways and the controller refuse it."""
        version = str(semver.parse(request.version))
        release = self._repo.get_release(version)
        if release is None:
            raise NotFound(f"no release {version} to yank")
        try:
            self._trust.signed_target(version, request.targets_metadata)
        except FailedPrecondition as exc:
            if not request.targets_metadata or "does not list" not in str(exc):
                raise
        else:
            raise FailedPrecondition(
                f"the targets metadata given still lists release {version}: sign the next "
                "version without it (upgradectl releases yank V --keys DIR)"
            )
        self._trust.accept(request.targets_metadata)
        log.warning("release_yanked", version=version)
        return self._release(release)

    @_translated
    def RotateRoot(self, request: Any, context: grpc.ServicerContext) -> Any:
        root_version = self._trust.accept_root(request.root, request.targets_metadata or None)
        log.warning("root_rotated", root_version=root_version)
        return controller_pb2.RotateRootResponse(root_version=root_version)

    @_translated
    def StartUpgrade(self, request: Any, context: grpc.ServicerContext) -> Any:
        deadline = (
            timedelta(seconds=request.deadline_seconds) if request.deadline_seconds > 0 else None
        )
        job = self._engine.start_upgrade(
            version=_target_version(request),
            gateway_ids=list(request.gateway_ids),
            request_id=request.request_id or None,
            source="cli",
            requested_by=current_actor(),
            deadline=deadline,
            allow_downgrade=request.allow_downgrade,
            accept_vpn_disruption=request.accept_vpn_disruption,
            rollout=convert.rollout_of(request),
            precheck=not request.skip_prechecks,
            force=request.force,
        )
        return convert.job(job)

    @_translated
    def PauseJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        return convert.job(self._engine.pause_job(_job_id(request.job_id), current_actor()))

    @_translated
    def ResumeJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        return convert.job(self._engine.resume_job(_job_id(request.job_id), current_actor()))

    @_translated
    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        reason = request.reason.strip()
        if len(reason) > MAX_CANCEL_REASON_CHARS:
            raise InvalidRequest(
                f"the reason is {len(reason)} characters; keep it to {MAX_CANCEL_REASON_CHARS}"
            )
        job = self._engine.cancel_job(_job_id(request.job_id), current_actor(), reason)
        return convert.job(job)

    @_translated
    def PlanUpgrade(self, request: Any, context: grpc.ServicerContext) -> Any:
        plan = self._engine.plan(_target_version(request), list(request.gateway_ids))
        answers = self._engine.precheck(plan) if request.dry_run else {}
        return controller_pb2.UpgradePlan(
            release=convert.release(plan.release),
            gateways=[
                controller_pb2.PlannedGateway(
                    gateway_id=g.gateway_id,
                    from_version=g.from_version,
                    action=g.action,
                    vpn_sessions=g.vpn_sessions,
                    pending_version=g.pending_version or "",
                    path=g.path,
                    blocked=g.blocked,
                    state=g.state,
                    precheck=convert.precheck(answers[g.gateway_id])
                    if g.gateway_id in answers
                    else None,
                )
                for g in plan.gateways
            ],
            vpn_sessions_affected=plan.vpn_sessions_affected,
            controller_from=plan.controller_from or "",
        )

    @_translated
    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A page of jobs, newest first: ``page_size`` rows (AIP-158), or ``limit`` as
        before paging (1 to MAX_LIST_LIMIT), or DEFAULT_JOBS_PAGE."""
        if request.page_size and request.limit:
            raise InvalidRequest(
                f"page_size {request.page_size} and limit {request.limit} both given: limit "
                "is the older name of page_size; give one"
            )
        if request.page_size:
            size = paging.page_size(request.page_size, DEFAULT_JOBS_PAGE)
        else:
            size = _list_limit(request.limit, DEFAULT_JOBS_PAGE, "jobs")
        cursor = paging.decode(request.page_token, "jobs", key_length=2)
        jobs, more = self._repo.jobs_page(_job_key(cursor) if cursor else None, size)
        token = ""
        if more:
            last = jobs[-1]
            key = (last.created_at.isoformat(), last.id)
            token = paging.encode(paging.Cursor("jobs", "", key))
        return controller_pb2.ListJobsResponse(
            jobs=[convert.job(j) for j in jobs], next_page_token=token
        )

    @_translated
    def ListRejectedJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        return controller_pb2.ListRejectedJobsResponse(
            jobs=[
                controller_pb2.RejectedJob(
                    message_id=r.message_id,
                    reason=r.reason,
                    body=r.body,
                    user_id=r.user_id,
                    at=convert.timestamp(r.at),
                )
                for r in self._rejections.list()
            ]
        )

    @_translated
    def SyncReleases(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._feed is None:
            raise FailedPrecondition(
                "this controller has no release feed to check: start it with --release-feed"
            )
        imported = self._feed.sync()
        return controller_pb2.SyncReleasesResponse(imported=[self._release(r) for r in imported])

    @_translated
    def GetController(self, request: Any, context: grpc.ServicerContext) -> Any:
        return controller_pb2.ControllerInfo(version=version.current(), pid=os.getpid())

    @_translated
    def UpgradeController(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._upgrader is None:
            raise FailedPrecondition("this controller runs with --no-self-upgrade")
        release = self._engine.resolve_release(str(semver.parse(request.version)))
        self._trust.require_signed(release)
        if not self._upgrader.needed(release):
            raise FailedPrecondition(
                f"nothing to do: the controller already runs {release.version}"
            )
        successor = self._upgrader.upgrade_to(release)
        return controller_pb2.ControllerInfo(version=successor.version, pid=successor.pid)

    @_translated
    def CreateToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        expires = timedelta(seconds=request.expires_seconds) if request.expires_seconds else None
        if request.expires_seconds < 0:
            raise InvalidRequest("expires_seconds must be 0 (never) or a positive number")
        record, secret = self._tokens.create(
            request.name, Role.parse(request.role), now=datetime.now(UTC),
            expires_in=expires, created_by=current_actor(),
        )  # fmt: skip
        log.info("token_created", name=record.name, role=str(record.role), by=current_actor())
        return controller_pb2.CreatedToken(token=convert.token(record), secret=secret)

    @_translated
    def ListTokens(self, request: Any, context: grpc.ServicerContext) -> Any:
        tokens = [convert.token(t) for t in self._tokens.list()]
        return controller_pb2.ListTokensResponse(tokens=tokens)

    @_translated
    def RevokeToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._tokens.revoke(request.name, datetime.now(UTC))
        log.warning("token_revoked", name=record.name, by=current_actor())
        return convert.token(record)

    @_translated
    def AddUser(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._console_users().add(
            request.name, Role.parse(request.role), request.password, datetime.now(UTC),
            created_by=current_actor(),
        )  # fmt: skip
        log.info("console_user_added", name=record.name, role=str(record.role), by=current_actor())
        return convert.user(record)

    @_translated
    def ListUsers(self, request: Any, context: grpc.ServicerContext) -> Any:
        users = [convert.user(u) for u in self._console_users().list()]
        return controller_pb2.ListUsersResponse(users=users)

    @_translated
    def RemoveUser(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._console_users().remove(request.name)
        log.warning("console_user_removed", name=record.name, by=current_actor())
        return convert.user(record)

    def _console_users(self) -> Users:
        if self._users is None:
            raise FailedPrecondition("this controller has no web console users")
        return self._users

    @_translated
    def IssueCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.expires_seconds < 0:
            raise InvalidRequest("expires_seconds must be 0 (the default) or a positive number")
        lifetime = timedelta(seconds=request.expires_seconds) if request.expires_seconds else None
        issued = self._certificates().issue(
            request.name, Role.parse(request.role), request.csr_pem, now=datetime.now(UTC),
            lifetime=lifetime, created_by=current_actor(),
        )  # fmt: skip
        return controller_pb2.IssuedCertificate(
            certificate=convert.operator_certificate(issued.record),
            certificate_pem=issued.certificate_pem,
            ca_pem=issued.ca_pem,
        )

    @_translated
    def ListCertificates(self, request: Any, context: grpc.ServicerContext) -> Any:
        certificates = [convert.operator_certificate(c) for c in self._certificates().list()]
        return controller_pb2.ListCertificatesResponse(certificates=certificates)

    @_translated
    def RevokeCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._certificates().revoke(request.name, datetime.now(UTC))
        return convert.operator_certificate(record)

    def _certificates(self) -> OperatorCertificates:
        if self._operator_certificates is None:
            raise FailedPrecondition("this controller does not issue operator certificates")
        return self._operator_certificates

    @_translated
    def AllowPublisher(self, request: Any, context: grpc.ServicerContext) -> Any:
        record, created = self._publishers.allow(
            request.user, datetime.now(UTC), allowed_by=current_actor()
        )
        if created:
            log.info("publisher_allowed", user=record.user, by=current_actor())
        return self._publisher(record)

    @_translated
    def DisallowPublisher(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._publishers.disallow(request.user)
        log.warning("publisher_disallowed", user=record.user, by=current_actor())
        return self._publisher(record)

    @_translated
    def ListPublishers(self, request: Any, context: grpc.ServicerContext) -> Any:
        publishers = [self._publisher(p) for p in self._publishers.list()]
        return controller_pb2.ListPublishersResponse(publishers=publishers)

    @staticmethod
    def _publisher(record: PublisherRecord) -> Any:
        return controller_pb2.Publisher(
            user=record.user,
            allowed_at=convert.timestamp(record.allowed_at),
            allowed_by=record.allowed_by,
        )

    @_translated
    def ListAudit(self, request: Any, context: grpc.ServicerContext) -> Any:
        since = request.since.ToDatetime(UTC) if request.HasField("since") else None
        events = self._audit.list(since, _list_limit(request.limit, 200, "audit events"))
        return controller_pb2.ListAuditResponse(events=[convert.audit(e) for e in events])

    @_translated
    def CreateEnrollment(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.expires_seconds < 0:
            raise InvalidRequest("expires_seconds must be 0 (the default) or a positive number")
        lifetime = timedelta(seconds=request.expires_seconds) if request.expires_seconds else None
        code, record = self._enrollments().create(
            request.gateway_id, now=datetime.now(UTC), lifetime=lifetime,
            created_by=current_actor(),
        )  # fmt: skip
        log.info("enrollment_created", gateway=record.gateway_id, by=current_actor())
        return controller_pb2.EnrollmentCode(
            gateway_id=record.gateway_id, code=code,
            expires_at=convert.timestamp(record.code_expires_at),
        )  # fmt: skip

    @_translated
    def ListEnrollments(self, request: Any, context: grpc.ServicerContext) -> Any:
        records = self._enrollments().list(datetime.now(UTC))
        return controller_pb2.ListEnrollmentsResponse(
            enrollments=[convert.enrollment(r) for r in records]
        )

    @_translated
    def RevokeGateway(self, request: Any, context: grpc.ServicerContext) -> Any:
        record = self._enrollments().revoke(request.gateway_id, datetime.now(UTC))
        return convert.enrollment(record)

    def _enrollments(self) -> Enrollments:
        if self._enrollment is None:
            raise FailedPrecondition("this controller does not enroll gateways")
        return self._enrollment

    @_translated
    def AddAdmin(self, request: Any, context: grpc.ServicerContext) -> Any:
        address, _ = self._admins.add(request.email, datetime.now(UTC))
        return controller_pb2.Admin(email=address)

    @_translated
    def RemoveAdmin(self, request: Any, context: grpc.ServicerContext) -> Any:
        return controller_pb2.Admin(email=self._admins.remove(request.email))

    @_translated
    def ListAdmins(self, request: Any, context: grpc.ServicerContext) -> Any:
        admins = [controller_pb2.Admin(email=a) for a in self._admins.list()]
        return controller_pb2.ListAdminsResponse(admins=admins)

    @_translated
    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The job with every gateway; with a page_size or page_token, with one page of
        them sorted by gateway id and the token of the next (AIP-158)."""
        if not request.page_size and not request.page_token:
            return convert.job(self._job(request.job_id))
        size = paging.page_size(request.page_size, DEFAULT_JOB_GATEWAYS_PAGE)
        cursor = paging.decode(request.page_token, "job-gateways", request.job_id or None)
        job_id = cursor.scope if cursor else request.job_id or None
        page = self._repo.job_page(job_id, cursor.after[0] if cursor else None, size)
        if page is None:
            raise _no_such_job(job_id)
        token = ""
        if page.more:
            last = page.job.gateways[-1].gateway_id
            token = paging.encode(paging.Cursor("job-gateways", page.job.id, (last,)))
        return convert.job(page.job, gateway_count=page.gateway_count, next_page_token=token)

    def _job_id(self, job_id: str) -> str:
        """The id of the job ``job_id`` ("": the latest), without reading its gateways;
        NotFound when there is none."""
        found = self._repo.job_id(job_id or None)
        if found is None:
            raise _no_such_job(job_id)
        return found

    def _job(self, job_id: str) -> Any:
        """The job ``job_id`` ("": the latest) with every gateway; NotFound when there is
        none."""
        job = self._repo.get_job(job_id) if job_id else self._repo.latest_job()
        if job is None:
            raise _no_such_job(job_id)
        return job

    @_translated_stream
    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """The job's events after ``after_seq``, until the one that finishes the job. Ends
        UNAVAILABLE, naming the last event sent, when the controller stops or the stream
        reaches its lifetime (``Limits.watch``): the client watches again from there.
        Starts with the initial metadata ``hitless.api.WATCH_OPEN`` unless the controller
        is stopping."""
        job_id = self._job_id(request.job_id)
        if not self._stopping.is_set():
            context.send_initial_metadata((api.WATCH_OPEN,))
        seq = request.after_seq
        lifetime = self._watch_lifetime_s
        ends_at = None if lifetime is None else time.monotonic() + lifetime
        while context.is_active() and not self._stopping.is_set():
            batch = follow.next_events(self._repo, job_id, seq)
            for event in batch.events:
                yield convert.event(event)
                seq = event.seq
            if batch.finished:
                return
            if ends_at is not None and time.monotonic() >= ends_at:
                break
            if not batch.events:
                self._engine.wait_for_change(job_id, WATCH_POLL_S)
        if self._stopping.is_set():
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the controller is stopping or handing over; resume after event {seq}",
            )
        if context.is_active():
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"this watch reached its lifetime of {lifetime:g} s; resume after event {seq}",
            )


def _target_version(request: Any) -> str | None:
    """The version a StartUpgradeRequest names; None for the latest."""
    target = request.WhichOneof("target")
    if target is None:
        raise InvalidRequest("say which release: latest, or a version")
    if target == "latest":
        if not request.latest:
            raise InvalidRequest("latest must be true when given")
        return None
    return str(semver.parse(request.version))


def _job_id(text: str) -> str:
    """A job id as a request gives it; InvalidRequest when there is none."""
    if not text:
        raise InvalidRequest("give the job's id: `upgradectl jobs list` shows them")
    if len(text) > 64:
        raise InvalidRequest(f"no job has an id like {names.shown(text)}")
    return text


class ArtifactsService(artifacts_pb2_grpc.ArtifactsServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: ArtifactStore,
        metadata: Repository,
        *,
        limits: Limits = DEFAULT_LIMITS,
        withdrawn: Callable[[str], str | None] | None = None,
    ) -> None:
        """``withdrawn(command_id)`` says why a command may no longer run (``Engine.
        withdrawn``), or None; a download naming such a command is FAILED_PRECONDITION."""
        self._store = store
        self._metadata = metadata
        self._limits = limits
        self._withdrawn = withdrawn

    @_translated
    def FetchMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        """One file of the TUF repository (``hitless.trust.repository.metadata_path``
        names what is served); NOT_FOUND for any other name or one not published."""
        try:
            data = self._metadata.metadata(request.name)
        except MetadataNotFound as exc:
            raise NotFound(str(exc)) from exc
        return artifacts_pb2.MetadataFile(data=data)

    @_translated_stream
    def Download(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The artifact's bytes from ``offset``, in chunks of CHUNK_SIZE, each already in
        its wire encoding (``chunk_bytes``: serve this with ``add_artifacts``). A download
        slower than ``Limits.download_time_s`` allows ends DEADLINE_EXCEEDED, naming the
        offset to resume from. A download for a command that was withdrawn (its job
        cancelled or aborted before the gateway took it) is FAILED_PRECONDITION, saying
        why, so the gateway never runs it."""
        if request.command_id and self._withdrawn is not None:
            why = self._withdrawn(request.command_id)
            if why is not None:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"command {names.shown(request.command_id)} was withdrawn: {why}",
                )
        total = self._store.size(request.sha256)
        offset = request.offset
        if offset < 0 or offset > total:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {offset} is outside the artifact's {total} bytes",
            )
        allowed_s = self._limits.download_time_s(total - offset)
        ends_at = time.monotonic() + allowed_s
        with self._store.open_at(request.sha256, offset) as f:
            while context.is_active():
                # A read this large bypasses the file's buffer: one copy, into ``data``.
                data = f.read(CHUNK_SIZE)
                if not data:
                    return
                if time.monotonic() >= ends_at:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the download of {request.sha256[:12]} from offset {request.offset} "
                        f"took longer than the {allowed_s:.0f} s allowed for its size (at least "
                        f"{self._limits.download_floor_bytes_per_s} bytes/s); "
                        f"resume from offset {offset}",
                    )
                yield chunk_bytes(offset, data, total)
                offset += len(data)


def _no_such_job(job_id: str | None) -> NotFound:
    """NotFound for the job ``job_id`` (empty or None: the latest, when no job has run)."""
    if not job_id:
        return NotFound("no upgrade job has run yet: start one with `upgradectl upgrade`")
    return NotFound(f"no job with id {names.shown(job_id)}")


def chunk_bytes(offset: int, data: bytes, total_size: int) -> bytes:
    """The wire encoding of ``hitless.v1.Chunk(offset=offset, data=data,
    total_size=total_size)``, byte for byte what its ``SerializeToString`` gives (fields in
    number order, zeros left out: https://protobuf.dev/programming-guides/encoding/), made
    with one copy of ``data`` where building the message and serializing it make two and
    take several times as long. Both numbers must not be negative (ValueError)."""
    parts = []
    if offset:
        parts += [b"\x08", _varint(offset)]  # field 1, varint
    if data:
        parts += [b"\x12", _varint(len(data)), data]  # field 2, length-delimited
    if total_size:
        parts += [b"\x18", _varint(total_size)]  # field 3, varint
    return b"".join(parts)


def _varint(value: int) -> bytes:
    """``value`` as a base-128 varint, least significant group first."""
    if value < 0:
        raise ValueError(f"a chunk's offset and size are not negative, not {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def add_artifacts(service: ArtifactsService, server: grpc.Server) -> None:
    """Serve ``service`` on ``server``, as the generated ``add_ArtifactsServicer_to_server``
    does, except that Download's messages go out as the bytes the service made
    (``chunk_bytes``): grpc sends a message the handler gives as bytes when there is no
    serializer."""
    handlers = {
        "Download": grpc.unary_stream_rpc_method_handler(
            service.Download,
            request_deserializer=artifacts_pb2.DownloadRequest.FromString,
            response_serializer=None,
        ),
        "FetchMetadata": grpc.unary_unary_rpc_method_handler(
            service.FetchMetadata,
            request_deserializer=artifacts_pb2.MetadataRequest.FromString,
            response_serializer=artifacts_pb2.MetadataFile.SerializeToString,
        ),
    }
    name = artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class _Budgeted(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admits every call against the budget of its kind before it runs (in a thread of
    the pool, where the peer is known), and tells the watchdog when a stream waits on its
    client. Handlers that hold no thread (``experimental_non_blocking``, e.g. Health/Watch)
    pass untouched."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        streams_in, streams_out = handler.request_streaming, handler.response_streaming
        behavior = (
            handler.stream_stream or handler.unary_stream
            if streams_out
            else handler.stream_unary or handler.unary_unary
        )
        if getattr(behavior, "experimental_non_blocking", False):
            return handler
        method = details.method
        kind = kind_of(method, streaming=streams_in or streams_out)
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if streams_out:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                slot = self._admit(kind, method, context)
                try:
                    if streams_in:
                        request = _watched_requests(request, slot)
                    for response in behavior(request, context):
                        slot.blocked()
                        yield response
                        slot.unblocked()
                finally:
                    slot.release()

            if streams_in:
                return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
            return grpc.unary_stream_rpc_method_handler(streaming, **serializers)

        def single(request: Any, context: grpc.ServicerContext) -> Any:
            slot = self._admit(kind, method, context)
            try:
                if streams_in:
                    request = _watched_requests(request, slot)
                return behavior(request, context)
            finally:
                slot.release()

        if streams_in:
            return grpc.stream_unary_rpc_method_handler(single, **serializers)
        return grpc.unary_unary_rpc_method_handler(single, **serializers)

    def _admit(self, kind: Kind, method: str, context: grpc.ServicerContext) -> Slot:
        peer = peer_host(context.peer())
        try:
            slot = self._admission.admit(kind, peer, method, context.cancel)
        except Refused as exc:
            log.warning("call_refused", method=method, peer=peer, kind=str(kind), reason=str(exc))
            context.abort(_status_of(exc), str(exc))
        # Also when grpc drops the handler's generator without closing it.
        context.add_callback(slot.release)
        return slot


class _Authorised(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates the caller of every call that needs a role (``access.role_needed``),
    refuses one whose role is too low, makes the caller known to the handler
    (``access.current``), and writes each call that changes something to the audit log
    with its outcome, refused ones included."""

    def __init__(
        self,
        tokens: Tokens,
        audit: Audit,
        enrollments: Enrollments,
        *,
        operator_certificates: OperatorCertificates,
    ) -> None:
        self._tokens = tokens
        self._audit = audit
        self._enrollments = enrollments
        self._operator_certificates = operator_certificates

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        method = details.method
        needed = role_needed(method)
        if handler is None or needed is None:
            return handler
        streams_in, streams_out = handler.request_streaming, handler.response_streaming
        behavior = (
            handler.stream_stream or handler.unary_stream
            if streams_out
            else handler.stream_unary or handler.unary_unary
        )
        metadata = details.invocation_metadata
        audited = method in CHANGES
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        if streams_out:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                caller = self._admit(method, needed, metadata, context, request, audited)
                reset = current.set(caller)
                try:
                    yield from behavior(request, context)
                finally:
                    current.reset(reset)

            if streams_in:
                return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
            return grpc.unary_stream_rpc_method_handler(streaming, **serializers)

        def single(request: Any, context: grpc.ServicerContext) -> Any:
            first: list[Any] = []
            if streams_in:
                request = _remembering_first(request, first)
            caller = self._admit(method, needed, metadata, context, request, audited)
            reset = current.set(caller)
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                current.reset(reset)
                if audited:
                    described = _describe(first[0] if first else request)
                    self._record(caller, method, described, context, failed)

        if streams_in:
            return grpc.stream_unary_rpc_method_handler(single, **serializers)
        return grpc.unary_unary_rpc_method_handler(single, **serializers)

    def _admit(
        self,
        method: str,
        needed: Role,
        metadata: Any,
        context: grpc.ServicerContext,
        request: Any,
        audited: bool,
    ) -> Caller:
        peer = peer_host(context.peer())
        caller = Caller("anonymous", Role.VIEWER, peer)
        # Who a refused call was, for the audit: an operator certificate (checked by TLS
        # against the CA) names its holder even when it is refused.
        claimed = "anonymous"
        try:
            certificate = _client_certificate(context)
            operator = None if certificate is None else pki.operator_of(certificate)
            if certificate is not None and operator is not None:
                claimed = f"cert:{operator}"
                caller = self._operator_certificates.authenticate(certificate, datetime.now(UTC))
            elif certificate is not None:
                caller = self._gateway(certificate, peer)
                if not method.startswith(GATEWAY_PREFIXES):
                    raise PermissionDenied(
                        f"gateway {caller.gateway}'s certificate may download releases and "
                        "nothing else: operators call with an API token on the controller's "
                        "API port"
                    )
                return caller
            else:
                caller = self._tokens.authenticate(bearer(metadata), datetime.now(UTC))
            if caller.role < needed:
                credential = "token" if certificate is None else "certificate"
                raise PermissionDenied(
                    f"{caller.actor} has the role {caller.role}, and {method.rsplit('/', 1)[-1]} "
                    f"needs {needed}: ask an admin for a {credential} with that role"
                )
        except (Unauthenticated, PermissionDenied) as exc:
            log.warning("call_unauthorised", method=method, peer=peer, reason=str(exc))
            if audited:
                actor = caller.actor if isinstance(exc, PermissionDenied) else claimed
                described = "" if not isinstance(request, Message) else _describe(request)
                self._audit.record(
                    datetime.now(UTC), actor, method.rsplit("/", 1)[-1], described,
                    f"{_status_of(exc).name}: {exc}", peer,
                )  # fmt: skip
            context.abort(_status_of(exc), str(exc))
        return Caller(caller.actor, caller.role, peer)

    def _gateway(self, certificate: bytes, peer: str) -> Caller:
        """The gateway a client certificate (verified by TLS against the CA) names, while
        that certificate is its current one. Raises Unauthenticated."""
        gateway_id = pki.gateway_of(certificate)
        if gateway_id is None:
            raise Unauthenticated("the client certificate names no gateway")
        refused = self._enrollments.authorise(gateway_id, pki.serial_of(certificate))
        if refused is not None:
            raise Unauthenticated(refused)
        return Caller(f"gateway:{gateway_id}", Role.VIEWER, peer, gateway=gateway_id)

    def _record(
        self, caller: Caller, method: str, detail: str, context: grpc.ServicerContext,
        failed: bool,
    ) -> None:  # fmt: skip
        code = context.code() if failed else None
        text = context.details() if failed else b""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        outcome = "OK" if not failed else f"{code.name if code else 'UNKNOWN'}: {text}"
        try:
            self._audit.record(
                datetime.now(UTC), caller.actor, method.rsplit("/", 1)[-1], detail, outcome,
                caller.peer,
            )  # fmt: skip
        except HitlessError as exc:
            log.error("audit_write_failed", method=method, error=str(exc))


def _job_key(cursor: paging.Cursor) -> tuple[datetime, str]:
    """The (created_at, id) a jobs page token carries; InvalidRequest when it is no such."""
    created, job_id = cursor.after
    try:
        at = datetime.fromisoformat(created)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise InvalidRequest(
            "invalid page_token for jobs: it was not made by this controller; start again "
            "without a page_token"
        )
    return at, job_id


def _list_limit(asked: int, default: int, what: str) -> int:
    """How many rows a list call returns: ``default`` for 0, else ``asked`` up to
    MAX_LIST_LIMIT. Raises InvalidRequest for a negative or larger number."""
    if asked == 0:
        return default
    if not 0 < asked <= MAX_LIST_LIMIT:
        raise InvalidRequest(
            f"limit {asked} is outside 1 to {MAX_LIST_LIMIT} {what}: ask for fewer (0 for the "
            f"default, {default})"
        )
    return asked


def _client_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The caller's verified client certificate (PEM), None when it presented none (the
    API port asks for none; the gateway port requires one)."""
    values = context.auth_context().get("x509_pem_cert")
    return bytes(values[0]) if values else None


def _remembering_first(requests: Iterator[Any], first: list[Any]) -> Iterator[Any]:
    """``requests``, keeping the first in ``first`` (a stream's metadata, for the audit)."""
    for request in requests:
        if not first:
            first.append(request)
        yield request


def _describe(request: Any) -> str:
    """What a request asks, on one line, without its bytes (artifacts, metadata) and its
    secrets (SECRET_FIELDS)."""
    if not isinstance(request, Message):
        return ""
    copy = type(request)()
    copy.CopyFrom(request)
    _drop_bytes(copy)
    return text_format.MessageToString(copy, as_one_line=True)


def _drop_bytes(message: Message) -> None:
    for field, value in message.ListFields():
        if field.type == field.TYPE_BYTES or field.name in SECRET_FIELDS:
            message.ClearField(field.name)
        elif field.type == field.TYPE_MESSAGE and isinstance(value, Message):
            _drop_bytes(value)


def _watched_requests(requests: Iterator[Any], slot: Slot) -> Iterator[Any]:
    """``requests``, telling ``slot`` while the call waits for the client's next one."""
    while True:
        slot.blocked()
        try:
            request = next(requests)
        except StopIteration:
            return
        finally:
            slot.unblocked()
        yield request


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):  # type: ignore[misc]
    """Enrollment.Enroll: open to any caller on the API port, which proves itself with a
    one-time code. Each attempt is an audit row."""

    def __init__(
        self,
        enrollments: Enrollments,
        audit: Audit,
        root_metadata: Callable[[], bytes],
        gateway_port: int,
    ) -> None:
        self._enrollments = enrollments
        self._audit = audit
        self._root_metadata = root_metadata
        self._gateway_port = gateway_port

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        gateway_id = request.gateway_id[:64]
        peer = peer_host(context.peer())
        now = datetime.now(UTC)
        try:
            enrolled = self._enrollments.enroll(
                request.gateway_id, request.code, request.csr_pem, now
            )
            response = enrollment_pb2.EnrollResponse(
                certificate_pem=enrolled.certificate_pem,
                ca_pem=enrolled.ca_pem,
                root_metadata=self._root_metadata(),
                broker_user=enrolled.broker_user,
                broker_password=enrolled.broker_password,
                gateway_port=self._gateway_port,
            )
        except HitlessError as exc:
            log.warning("enrollment_refused", gateway=gateway_id, peer=peer, reason=str(exc))
            self._audit.record(
                now, f"gateway:{gateway_id}", "Enroll", f"gateway_id: {gateway_id!r}",
                f"{_status_of(exc).name}: {exc}", peer,
            )  # fmt: skip
            context.abort(_status_of(exc), str(exc))
        self._audit.record(
            now, f"gateway:{gateway_id}", "Enroll", f"gateway_id: {gateway_id!r}", "OK", peer
        )
        return response


class Server:
    """The controller's gRPC servers (one per port: ``servers[0]`` the API port's,
    ``servers[1]`` the gateway port's) and the watchdog of their streams, started and
    stopped together."""

    def __init__(self, servers: tuple[grpc.Server, ...], admission: Admission) -> None:
        self.servers = servers
        self.admission = admission

    def start(self) -> None:
        self.admission.start()
        for server in self.servers:
            server.start()

    def stop(self, grace_s: float) -> None:
        """Take no new calls, give those running ``grace_s`` seconds, cancel the rest;
        returns once the servers have stopped (or a second after the grace)."""
        stopped = [server.stop(grace_s) for server in self.servers]
        for event in stopped:
            event.wait(grace_s + 1)
        self.admission.stop()


def build_server(
    listen: HostPort,
    gateway_listen: HostPort,
    controller: ControllerService,
    artifacts: ArtifactsService,
    *,
    ca: CertificateAuthority,
    tokens: Tokens,
    audit: Audit,
    enrollments: Enrollments,
    operator_certificates: OperatorCertificates,
    root_metadata: Callable[[], bytes],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Server, int, int]:
    """The controller's gRPC servers on two TLS ports: the API port ``listen`` (operators
    with API tokens, and enrollment) and the gateway port ``gateway_listen`` (mutual TLS: a
    client certificate from ``ca`` is required), where gateways download. Both ports serve
    the same services, each from a server of its own: its own thread pool (a thread for
    each call ``limits`` admit, with some to spare) and its own completion queue, so calls
    on the API port never wait behind the gateways' downloads. The budgets of
    ``limits`` count the calls of both together. SO_REUSEPORT is on, so a new controller
    version can bind the same ports beside this one. Returns it and the two bound ports.
    Raises ConfigError when it cannot listen on either."""
    admission = Admission(limits)
    interceptors = [
        _Budgeted(admission),
        _Authorised(tokens, audit, enrollments, operator_certificates=operator_certificates),
    ]
    health_servicer = health.HealthServicer()
    names = [
        controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name,
        artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].full_name,
        enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    for name in ("", *names[:3]):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def server(port_name: str) -> grpc.Server:
        made = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=limits.workers, thread_name_prefix=f"grpc-{port_name}"
            ),
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 1)],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        controller_pb2_grpc.add_ControllerServicer_to_server(controller, made)
        add_artifacts(artifacts, made)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, made)
        reflection.enable_server_reflection(names, made)
        return made

    api, gateways = server("api"), server("gateway")
    port = _bind(api, listen, ca.server_credentials(require_client_certificate=False))
    gateway_port = _bind(
        gateways, gateway_listen, ca.server_credentials(require_client_certificate=True)
    )
    enrollment = EnrollmentService(enrollments, audit, root_metadata, gateway_port)
    for made in (api, gateways):
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(enrollment, made)
    return Server((api, gateways), admission), port, gateway_port


def _bind(server: grpc.Server, listen: HostPort, credentials: grpc.ServerCredentials) -> int:
    try:
        port = int(server.add_secure_port(str(listen), credentials))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}: the address is not available")
    return port
