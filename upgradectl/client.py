"""The controller's gRPC API as the CLI uses it: the only module that imports grpc.

``ControllerClient`` turns every RPC into plain values (``upgradectl.model``) and every
``grpc.RpcError`` into an ``upgradectl.errors`` error:

| gRPC status                                     | error                                   |
|-------------------------------------------------|-----------------------------------------|
| UNAVAILABLE, DEADLINE_EXCEEDED                  | Unreachable                             |
| RESOURCE_EXHAUSTED (the controller is busy)     | Unreachable, with the server's details  |
|                                                 | (after retries within the budget)       |
| NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS,    | Rejected, with the server's details     |
| FAILED_PRECONDITION                             | verbatim                                |
| UNAUTHENTICATED, PERMISSION_DENIED              | CredentialsRefused (a Rejected), with   |
|                                                 | the server's details verbatim after     |
|                                                 | "the controller refused the credentials"|
| anything else                                   | ControllerFailed                        |

except for ``StartUpgrade``, ``RotateRoot`` and ``CreateToken``: once sent, any failure but
a refusal leaves open whether the job was started (the root taken, the token created), and
is ``Unconfirmed``.

Every call, unary or streaming, carries the caller's API token (``upgradectl.credentials``)
as the metadata ``authorization: Bearer <secret>``, added in one place: the channel's
interceptor. Without a token the calls carry none, and the controller's UNAUTHENTICATED
says what is missing. A refusal of a token sent adds where it came from, so the operator
knows which one to replace. An operator with a client certificate (``ClientCertificate``)
presents it in the TLS handshake instead, on the controller's gateway port (the API port
asks for none); a refusal then names the certificate's file.

The controller upgrades itself by starting a new process on the same port and stopping the
old one, so a client may meet UNAVAILABLE (or CANCELLED, for a call that arrived as the old
one stopped) for a moment, and a busy controller answers RESOURCE_EXHAUSTED when a budget
of concurrent calls is full. Idempotent unary calls are retried
then, with bounded exponential backoff and jitter; ``StartUpgrade`` counts as idempotent
because it carries the caller's request id, and adding an admin, checking the release feed
or publishing the same yanked targets twice changes nothing, and revoking a token twice
leaves it revoked. ``RotateRoot`` is never retried: the controller refuses a root version
it already took, which would hide that the first call worked; nor is ``CreateToken``, whose
secret would be lost with a first answer, the retry then refused as a name already taken.
Refused credentials are never retried. ``watch_job`` resumes after the last sequence number
it saw.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from hitless import api
from hitless.config import ENV_CA_CERT, ENV_CONTROLLER, HostPort
from hitless.digest import file_sha256
from hitless.v1 import controller_pb2, controller_pb2_grpc
from upgradectl.credentials import ClientCertificate, Credentials
from upgradectl.errors import (
    CliError,
    ControllerFailed,
    CredentialsRefused,
    Rejected,
    Unconfirmed,
    Unreachable,
    UsageError,
)
from upgradectl.model import (
    AuditEvent,
    CertificateInfo,
    CreatedToken,
    EnrollmentCode,
    EnrollmentInfo,
    GatewayInfo,
    GatewayProgress,
    IssuedCertificate,
    JobEvent,
    JobView,
    PublisherInfo,
    RejectedJob,
    ReleaseInfo,
    TokenInfo,
    UpgradePlan,
    UserInfo,
)

CHUNK_SIZE = 256 * 1024
# Rows asked for per page of a list (the controller answers at most 1000): a fleet of
# 1,000 gateways comes in two calls of about 50 KiB each.
PAGE_SIZE = 500
# Jobs per page of ListJobs: each job carries all of its gateways.
JOBS_PAGE_SIZE = 20
# A watch stream is reopened at this interval even when quiet, so a half-open connection
# is noticed; reopening is free thanks to after_seq.
WATCH_STREAM_S = 60.0
# Uploads get the unary timeout plus this much per byte (a floor of 1 MiB/s).
UPLOAD_SECONDS_PER_BYTE = 1.0 / (1024 * 1024)

_REFUSED = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# How gRPC words a failed TLS handshake (certificate not trusted, name not covered, a
# plain-text server) in an UNAVAILABLE status's details.
_TLS_FAILURE = re.compile(r"handshake|SSL|certificate|TLS", re.IGNORECASE)
# The part of those that retrying cannot mend: the controller's certificate does not chain
# to the CA given, or does not name the host called.
_TLS_REFUSED = re.compile(r"CERTIFICATE_VERIFY_FAILED|not in peer certificate", re.IGNORECASE)
_CREDENTIALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Worth another try after a pause: a controller handing over (a call that arrived as the
# old one stopped is CANCELLED; we never cancel our own calls), or a busy one.
_RETRIED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying UNAVAILABLE: ``budget_s`` in all, doubling delays."""

    budget_s: float = 10.0
    base_s: float = 0.1
    cap_s: float = 2.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The pause before retry number ``attempt`` (0-based): half fixed, half jitter."""
        ceiling = min(self.cap_s, self.base_s * 2**attempt)
        return float(ceiling / 2 + ceiling / 2 * rand())


@dataclass(frozen=True)
class _CallDetails:
    """A call's details with metadata added (what ``grpc.ClientCallDetails`` holds)."""

    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


# grpc ships no type stubs: its bases are Any to mypy.
class Authorization(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the caller's token to the metadata of every call, of every shape."""

    def __init__(self, credentials: Credentials) -> None:
        self._metadata = credentials.metadata

    def _with_token(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


class ControllerClient:
    """A connection to the controller's ``hitless.v1.Controller`` service over TLS, trusting
    only the CA certificate ``ca_cert`` (PEM), calling as the holder of ``credentials``
    (None: no token is sent) or presenting ``client_certificate`` in the handshake (the
    controller's gateway port takes it; its API port asks for none)."""

    def __init__(
        self,
        target: HostPort,
        timeout: float,
        *,
        ca_cert: bytes,
        credentials: Credentials | None = None,
        client_certificate: ClientCertificate | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        page_size: int = PAGE_SIZE,
    ) -> None:
        if page_size <= 0:
            raise UsageError(f"page size {page_size} must be a positive number of rows")
        self.target = target
        self.timeout = timeout
        self.page_size = page_size
        self._credentials = credentials
        self._client_certificate = client_certificate
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        key, cert = (
            (client_certificate.key_pem, client_certificate.cert_pem)
            if client_certificate is not None
            else (None, None)
        )
        self._channel = grpc.secure_channel(
            str(target), grpc.ssl_channel_credentials(ca_cert, key, cert)
        )
        channel = self._channel
        if credentials is not None:
            channel = grpc.intercept_channel(channel, Authorization(credentials))
        self._stub = controller_pb2_grpc.ControllerStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_gateways(self) -> list[GatewayInfo]:
        """Every gateway the controller knows, sorted by id: every page of ListGateways."""
        request = controller_pb2.ListGatewaysRequest(page_size=self.page_size)
        return [
            GatewayInfo.from_proto(g)
            for page in self._pages("ListGateways", self._stub.ListGateways, request)
            for g in page.gateways
        ]

    def list_releases(self) -> list[ReleaseInfo]:
        """Every published release, newest version first."""
        resp = self._unary(
            "ListReleases", self._stub.ListReleases, controller_pb2.ListReleasesRequest()
        )
        return [ReleaseInfo.from_proto(r) for r in resp.releases]

    def publish_release(
        self,
        version: str,
        path: Path,
        notes: str,
        *,
        restarts_vpn_service: bool = False,
        targets_metadata: bytes = b"",
        min_from: str = "",
    ) -> ReleaseInfo:
        """Upload the artifact at ``path`` as release ``version``, with ``targets_metadata``:
        the signed TUF targets that list it (``upgradectl.signing``; empty: none, and the
        controller refuses the upload with FAILED_PRECONDITION, ``Rejected``). ``min_from``
        is the lowest version the release upgrades from ("": any; the controller refuses
        one not below ``version`` with INVALID_ARGUMENT).

        The digest and size are computed here first and sent as metadata, so the controller
        rejects an upload that arrived damaged. Not retried: the stream is not resumable.
        """
        try:
            sha256, size = file_sha256(path)
        except OSError as exc:
            raise UsageError(f"cannot read the artifact {path}: {exc.strerror or exc}") from exc
        metadata = controller_pb2.ReleaseMetadata(
            version=version,
            notes=notes,
            sha256=sha256,
            size=size,
            restarts_vpn_service=restarts_vpn_service,
            targets_metadata=targets_metadata,
            min_from=min_from,
        )

        def requests() -> Iterator[controller_pb2.PublishReleaseRequest]:
            yield controller_pb2.PublishReleaseRequest(metadata=metadata)
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK_SIZE):
                    yield controller_pb2.PublishReleaseRequest(chunk=chunk)

        timeout = self.timeout + size * UPLOAD_SECONDS_PER_BYTE
        try:
            release = self._stub.PublishRelease(requests(), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._translate("PublishRelease", exc) from exc
        return ReleaseInfo.from_proto(release)

    def get_targets_metadata(self) -> bytes | None:
        """The newest signed targets metadata the controller publishes, as signed (TUF
        targets JSON); None before the first signed release."""
        resp = self._unary(
            "GetTargetsMetadata",
            self._stub.GetTargetsMetadata,
            controller_pb2.GetTargetsMetadataRequest(),
        )
        return bytes(resp.data) or None

    def yank_release(self, version: str, targets_metadata: bytes) -> ReleaseInfo:
        """Publish ``targets_metadata`` (the next targets version, signed without release
        ``version``): the controller and gateways refuse the release from then on. The
        release as the controller now sees it (``signing`` YANKED).

        Raises ``Rejected`` when the controller refuses (no such release, metadata unsigned,
        not newer, or still listing the release).
        """
        request = controller_pb2.YankReleaseRequest(
            version=version, targets_metadata=targets_metadata
        )
        return ReleaseInfo.from_proto(self._unary("YankRelease", self._stub.YankRelease, request))

    def rotate_root(self, root: bytes, targets_metadata: bytes | None = None) -> int:
        """Hand the controller the next root version (a key rotation), with the targets
        re-signed by a new targets key when the rotation replaced it. Returns the root
        version the controller now trusts.

        Sent once, never retried. Raises ``Rejected`` when the controller refuses (root not
        the next version, not signed by old and new root keys, online keys it does not hold,
        targets missing or not newer) and ``Unconfirmed`` when no answer came: the root may
        have been taken.
        """
        request = controller_pb2.RotateRootRequest(
            root=root, targets_metadata=targets_metadata or b""
        )
        resp = self._unary(
            "RotateRoot", self._stub.RotateRoot, request, creates=True, retried=False
        )
        return int(resp.root_version)

    def sync_releases(self) -> list[ReleaseInfo]:
        """Have the controller check its release feed now; the releases it imported."""
        resp = self._unary(
            "SyncReleases", self._stub.SyncReleases, controller_pb2.SyncReleasesRequest()
        )
        return [ReleaseInfo.from_proto(r) for r in resp.imported]

    def plan_upgrade(
        self,
        *,
        latest: bool = False,
        version: str = "",
        gateway_ids: Sequence[str] = (),
        dry_run: bool = False,
    ) -> UpgradePlan:
        """What upgrading ``gateway_ids`` (empty: all) would do, without doing it; with
        ``dry_run``, each gateway's pre-check too (a few seconds)."""
        request = _upgrade_request(latest, version, gateway_ids)
        request.dry_run = dry_run
        return UpgradePlan.from_proto(self._unary("PlanUpgrade", self._stub.PlanUpgrade, request))

    def start_upgrade(
        self,
        *,
        latest: bool = False,
        version: str = "",
        gateway_ids: Sequence[str] = (),
        request_id: str,
        allow_downgrade: bool = False,
        accept_vpn_disruption: bool = False,
        deadline_seconds: int = 0,
        waves: str = "",
        max_parallel: int = 0,
        max_failures: str = "",
        soak_seconds: int = 0,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        window: str = "",
        force: bool = False,
        skip_prechecks: bool = False,
    ) -> JobView:
        """Start a job upgrading ``gateway_ids`` (empty: all) to the latest or a named version.

        ``deadline_seconds`` 0 leaves the command deadline to the controller. ``waves``,
        ``max_parallel``, ``max_failures`` and ``soak_seconds`` (each gateway's soak
        after its swap) stage the rollout, ``not_before``,
        ``not_after`` (tz-aware) and ``window`` say when gateways may start (see
        StartUpgradeRequest in controller.proto); the defaults start every gateway at
        once. Retrying is safe because the controller answers a repeated ``request_id``
        with the job it already started. Raises ``Rejected`` when the controller refuses
        (nothing started) and ``Unconfirmed`` when no answer came: the job may exist,
        under ``request_id``.
        """
        request = _upgrade_request(latest, version, gateway_ids)
        request.request_id = request_id
        request.allow_downgrade = allow_downgrade
        request.accept_vpn_disruption = accept_vpn_disruption
        request.deadline_seconds = deadline_seconds
        request.waves = waves
        request.max_parallel = max_parallel
        request.max_failures = max_failures
        request.soak_seconds = soak_seconds
        if not_before is not None:
            request.not_before.FromDatetime(not_before.astimezone(UTC))
        if not_after is not None:
            request.not_after.FromDatetime(not_after.astimezone(UTC))
        request.window = window
        request.force = force
        request.skip_prechecks = skip_prechecks
        answer = self._unary("StartUpgrade", self._stub.StartUpgrade, request, creates=True)
        return JobView.from_proto(answer)

    def steer_job(self, action: str, job_id: str, reason: str = "") -> JobView:
        """``action`` ("pause", "resume" or "cancel") the job ``job_id``, and return it as
        it is then. Each is safe to repeat: pausing a paused job, resuming a running one
        or cancelling a cancelled one changes nothing. Raises ``Rejected`` for a job
        that has ended or does not exist."""
        method = {"pause": "PauseJob", "resume": "ResumeJob", "cancel": "CancelJob"}[action]
        request = controller_pb2.JobActionRequest(job_id=job_id, reason=reason)
        answer = self._unary(method, getattr(self._stub, method), request)
        return JobView.from_proto(answer)

    def get_job(self, job_id: str = "") -> JobView:
        """The job ``job_id`` (the most recent job when it is empty) with every one of its
        gateways, sorted by id: every page of GetJob. The job's own fields (its state) are
        those of the last page, the newest. A controller from before paging answers all
        gateways in one page."""
        request = controller_pb2.GetJobRequest(job_id=job_id, page_size=self.page_size)
        last: controller_pb2.Job | None = None
        gateways: list[GatewayProgress] = []
        for page in self._pages("GetJob", self._stub.GetJob, request):
            last = page
            gateways += [GatewayProgress.from_proto(g) for g in page.gateways]
        assert last is not None  # _pages yields at least one page
        return dataclasses.replace(JobView.from_proto(last), gateways=tuple(gateways))

    def list_jobs(self) -> list[JobView]:
        """Every job, newest first, each with its gateways: every page of ListJobs."""
        request = controller_pb2.ListJobsRequest(page_size=JOBS_PAGE_SIZE)
        return [
            JobView.from_proto(j)
            for page in self._pages("ListJobs", self._stub.ListJobs, request)
            for j in page.jobs
        ]

    def _pages(self, method: str, call: Callable[..., T], request: Any) -> Iterator[T]:
        """Each answer to ``request`` and its follow-ups (AIP-158 paging): the request is
        sent again with the previous answer's ``next_page_token`` until that is empty.
        A GetJob follow-up names the job of the first page, so that "the most recent job"
        stays the same job. Raises ControllerFailed when the controller answers the same
        token twice (it would never end)."""
        seen: set[str] = set()
        while True:
            page: Any = self._unary(method, call, request)
            yield page
            token = page.next_page_token
            if not token:
                return
            if token in seen:
                raise ControllerFailed(
                    f"{method} answered the page token {token[:40]!r} twice: the controller "
                    "is not paging as it should; report this with the controller's version"
                )
            seen.add(token)
            request.page_token = token
            if method == "GetJob":
                request.job_id = page.job_id

    def list_rejected_jobs(self) -> list[RejectedJob]:
        """Management jobs the controller refused, newest first."""
        resp = self._unary(
            "ListRejectedJobs",
            self._stub.ListRejectedJobs,
            controller_pb2.ListRejectedJobsRequest(),
        )
        return [RejectedJob.from_proto(j) for j in resp.jobs]

    def add_admin(self, email: str) -> str:
        """Make ``email`` an admin; the address as the controller stores it."""
        request = controller_pb2.AdminRequest(email=email)
        return str(self._unary("AddAdmin", self._stub.AddAdmin, request).email)

    def remove_admin(self, email: str) -> str:
        """Stop emailing ``email``; the address as the controller stored it."""
        request = controller_pb2.AdminRequest(email=email)
        return str(self._unary("RemoveAdmin", self._stub.RemoveAdmin, request).email)

    def list_admins(self) -> list[str]:
        """The admins' addresses, sorted."""
        resp = self._unary("ListAdmins", self._stub.ListAdmins, controller_pb2.ListAdminsRequest())
        return [a.email for a in resp.admins]

    def create_token(self, name: str, role: str, expires_seconds: int = 0) -> CreatedToken:
        """Create the API token ``name`` with ``role`` (viewer, operator, admin), expiring
        ``expires_seconds`` from now (0: never); the token with its secret, shown once.

        Sent once, never retried. Raises ``Rejected`` when the controller refuses (a name
        taken or malformed, an unknown role), ``CredentialsRefused`` when the caller may
        not, and ``Unconfirmed`` when no answer came: the token may exist, its secret lost.
        """
        request = controller_pb2.CreateTokenRequest(
            name=name, role=role, expires_seconds=expires_seconds
        )
        answer = self._unary(
            "CreateToken", self._stub.CreateToken, request, creates=True, retried=False
        )
        return CreatedToken.from_proto(answer)

    def list_tokens(self) -> list[TokenInfo]:
        """Every API token the controller knows, revoked and expired ones included."""
        resp = self._unary("ListTokens", self._stub.ListTokens, controller_pb2.ListTokensRequest())
        return [TokenInfo.from_proto(t) for t in resp.tokens]

    def revoke_token(self, name: str) -> TokenInfo:
        """Revoke the API token ``name``: the controller refuses it from now on. The token
        as the controller now describes it. Raises ``Rejected`` for an unknown name."""
        request = controller_pb2.RevokeTokenRequest(name=name)
        return TokenInfo.from_proto(self._unary("RevokeToken", self._stub.RevokeToken, request))

    def add_user(self, name: str, role: str, password: str) -> UserInfo:
        """Add the web console user ``name`` with ``role`` (viewer, operator, admin) and
        ``password`` (the controller keeps only its scrypt hash).

        Sent once, never retried: a retry of a call whose answer was lost would be refused
        as a name already taken. Raises ``Rejected`` when the controller refuses (a name
        taken or malformed, a password too short), ``CredentialsRefused`` when the caller
        may not, and ``Unconfirmed`` when no answer came: the user may exist.
        """
        request = controller_pb2.AddUserRequest(name=name, role=role, password=password)
        answer = self._unary("AddUser", self._stub.AddUser, request, creates=True, retried=False)
        return UserInfo.from_proto(answer)

    def list_users(self) -> list[UserInfo]:
        """Every web console user, by name."""
        resp = self._unary("ListUsers", self._stub.ListUsers, controller_pb2.ListUsersRequest())
        return [UserInfo.from_proto(u) for u in resp.users]

    def remove_user(self, name: str) -> UserInfo:
        """Remove the web console user ``name``; its sessions end with their next request.
        Never retried: a retry after a lost answer would be refused as an unknown name.
        Raises ``Rejected`` for an unknown name."""
        request = controller_pb2.RemoveUserRequest(name=name)
        answer = self._unary("RemoveUser", self._stub.RemoveUser, request, retried=False)
        return UserInfo.from_proto(answer)

    def issue_certificate(
        self, name: str, role: str, csr_pem: bytes, expires_seconds: int = 0
    ) -> IssuedCertificate:
        """Have the controller's CA issue the operator certificate ``name`` with ``role``
        (viewer, operator, admin) on the key of ``csr_pem`` (a PEM PKCS#10 request; the key
        stays here), valid ``expires_seconds`` (0: the controller's default, 365 days).

        Sent once, never retried: names are never reused, so a retry would be refused.
        Raises ``Rejected`` when the controller refuses (a name taken or malformed, a bad
        request or role), ``CredentialsRefused`` when the caller may not, and
        ``Unconfirmed`` when no answer came: the certificate may exist, lost with the answer.
        """
        request = controller_pb2.IssueCertificateRequest(
            name=name, role=role, csr_pem=csr_pem, expires_seconds=expires_seconds
        )
        answer = self._unary(
            "IssueCertificate", self._stub.IssueCertificate, request, creates=True, retried=False
        )
        return IssuedCertificate.from_proto(answer)

    def list_certificates(self) -> list[CertificateInfo]:
        """Every operator certificate the controller issued, revoked and expired included."""
        resp = self._unary(
            "ListCertificates",
            self._stub.ListCertificates,
            controller_pb2.ListCertificatesRequest(),
        )
        return [CertificateInfo.from_proto(c) for c in resp.certificates]

    def revoke_certificate(self, name: str) -> CertificateInfo:
        """Revoke the operator certificate ``name``: the controller refuses it from now on.
        The certificate as the controller now describes it. Raises ``Rejected`` for an
        unknown name."""
        request = controller_pb2.RevokeCertificateRequest(name=name)
        answer = self._unary("RevokeCertificate", self._stub.RevokeCertificate, request)
        return CertificateInfo.from_proto(answer)

    def create_enrollment(self, gateway_id: str, expires_seconds: int = 0) -> EnrollmentCode:
        """A one-time code with which gateway ``gateway_id`` enrolls (``gateway-daemon
        enroll``), expiring ``expires_seconds`` from now (0: the controller's default, 24
        hours). Sent once, never retried: a new call makes a new code and voids this one.
        Raises ``Rejected`` for a bad id, ``Unconfirmed`` when no answer came."""
        request = controller_pb2.CreateEnrollmentRequest(
            gateway_id=gateway_id, expires_seconds=expires_seconds
        )
        answer = self._unary(
            "CreateEnrollment", self._stub.CreateEnrollment, request, creates=True, retried=False
        )
        return EnrollmentCode.from_proto(answer)

    def list_enrollments(self) -> list[EnrollmentInfo]:
        """Every gateway enrollment the controller knows, by gateway id."""
        resp = self._unary(
            "ListEnrollments", self._stub.ListEnrollments, controller_pb2.ListEnrollmentsRequest()
        )
        return [EnrollmentInfo.from_proto(e) for e in resp.enrollments]

    def revoke_gateway(self, gateway_id: str) -> EnrollmentInfo:
        """Revoke gateway ``gateway_id``'s certificate and broker user. Raises ``Rejected``
        (NOT_FOUND) for a gateway never enrolled."""
        request = controller_pb2.RevokeGatewayRequest(gateway_id=gateway_id)
        return EnrollmentInfo.from_proto(
            self._unary("RevokeGateway", self._stub.RevokeGateway, request)
        )

    def allow_publisher(self, user: str) -> PublisherInfo:
        """Let the broker user ``user`` publish management jobs; the publisher as the
        controller now describes it (allowing twice keeps the first time). Raises
        ``Rejected`` for a name the controller refuses."""
        request = controller_pb2.PublisherRequest(user=user)
        answer = self._unary("AllowPublisher", self._stub.AllowPublisher, request)
        return PublisherInfo.from_proto(answer)

    def disallow_publisher(self, user: str) -> PublisherInfo:
        """Stop running management jobs that ``user`` publishes; the publisher removed.
        Raises ``Rejected``, naming the allowed users, when it was not allowed."""
        request = controller_pb2.PublisherRequest(user=user)
        answer = self._unary("DisallowPublisher", self._stub.DisallowPublisher, request)
        return PublisherInfo.from_proto(answer)

    def list_publishers(self) -> list[PublisherInfo]:
        """The broker users allowed to publish management jobs, by name."""
        resp = self._unary(
            "ListPublishers", self._stub.ListPublishers, controller_pb2.ListPublishersRequest()
        )
        return [PublisherInfo.from_proto(p) for p in resp.publishers]

    def list_audit(self, since: datetime | None = None) -> list[AuditEvent]:
        """The audit log, newest first: events at or after ``since`` (an aware datetime;
        None: from the start), as many as the controller answers by default."""
        request = controller_pb2.ListAuditRequest()
        if since is not None:
            request.since.FromDatetime(since)
        resp = self._unary("ListAudit", self._stub.ListAudit, request)
        return [AuditEvent.from_proto(e) for e in resp.events]

    def watch_job(self, job_id: str, after_seq: int = 0) -> Iterator[JobEvent]:
        """The job's events after ``after_seq``, until the event that finishes the job.

        A stream cut by UNAVAILABLE (or CANCELLED) is reopened after the last event seen.
        The retry budget counts from the first failure in a row. A stream the controller
        took (its initial metadata ``hitless.api.WATCH_OPEN``), an event, or a quiet
        stream reaching its own deadline ends the row. So a long job survives several
        controller restarts, however long it was quiet before each, but a controller that
        stays away for the whole budget ends the watch with ``Unreachable``.
        """
        last = after_seq
        attempt = 0
        give_up_at: float | None = None  # set by the first failure in a row
        while True:
            request = controller_pb2.WatchJobRequest(job_id=job_id, after_seq=last)
            try:
                stream = self._stub.WatchJob(request, timeout=WATCH_STREAM_S)
                if api.WATCH_OPEN in tuple(stream.initial_metadata() or ()):
                    attempt, give_up_at = 0, None
                for msg in stream:
                    attempt, give_up_at = 0, None
                    if msg.seq <= last:
                        continue  # a duplicate from an overlap after resuming
                    last = msg.seq
                    yield JobEvent.from_proto(msg)
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    attempt, give_up_at = 0, None
                    continue  # our own periodic reopen, not a failure
                # A controller that stops mid-stream may end it CANCELLED rather than
                # UNAVAILABLE; we never cancel our own calls, so both mean "it went away".
                if code not in _RETRIED or _tls_refused(exc):
                    raise self._translate("WatchJob", exc) from exc
                if give_up_at is None:
                    give_up_at = self._clock() + self._retry.budget_s
                delay = self._retry.delay(attempt)
                if self._clock() + delay > give_up_at:
                    raise self._translate("WatchJob", exc) from exc
                self._sleep(delay)
                attempt += 1

    def _unary(
        self,
        method: str,
        call: Callable[..., T],
        request: Any,
        *,
        creates: bool = False,
        retried: bool = True,
    ) -> T:
        """Call ``method``, retrying UNAVAILABLE, CANCELLED and RESOURCE_EXHAUSTED within the
        retry budget (unless ``retried`` is False: a call that must not arrive twice).

        ``creates``: the call may create something even when its answer is lost, so such a
        failure is ``Unconfirmed`` rather than ``Unreachable`` or ``ControllerFailed``.
        """
        give_up_at = self._clock() + self._retry.budget_s
        attempt = 0
        while True:
            try:
                return call(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if retried and exc.code() in _RETRIED and not _tls_refused(exc):
                    delay = self._retry.delay(attempt)
                    if self._clock() + delay <= give_up_at:
                        self._sleep(delay)
                        attempt += 1
                        continue
                raise self._translate(method, exc, creates=creates) from exc

    def _translate(self, method: str, exc: grpc.RpcError, *, creates: bool = False) -> CliError:
        code = exc.code()
        details = exc.details() or ""
        if code in _CREDENTIALS:
            # Nothing was done. The controller's words say what is wrong (no token, unknown,
            # expired, revoked; the role needed); which token it was is ours to say.
            message = f"the controller refused the credentials: {details or code.name}"
            if self._client_certificate is not None:
                message += (
                    f"\nthe client certificate offered came from {self._client_certificate.source}"
                )
                if "certificate" not in details:
                    # The controller's words are about tokens: it saw no certificate, as on
                    # its API port, which asks for none.
                    message += (
                        " (the controller takes client certificates on its gateway port only: "
                        "--controller HOST:PORT of controller-svc --gateway-listen)"
                    )
            elif self._credentials is not None:
                message += f"\nthe token sent came from {self._credentials.source}"
            return CredentialsRefused(message)
        # A certificate refused at the handshake: nothing was sent, nothing was created.
        if _tls_refused(exc) or (
            code == grpc.StatusCode.UNAVAILABLE and not creates and _TLS_FAILURE.search(details)
        ):
            return Unreachable(
                f"no TLS connection with the controller at {self.target}: {details}; check "
                f"that --ca-cert (or {ENV_CA_CERT}) is that controller's <data dir>/pki/ca.pem "
                "and that its certificate covers the name used (controller-svc --tls-name)"
            )
        if creates and code not in _REFUSED:
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                what = f"no answer within {self.timeout:g} s"
            else:
                what = f"{code.name}: {details or 'no details'}"
            return Unconfirmed(f"the controller at {self.target} did not answer {method} ({what})")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Unreachable(f"the controller at {self.target} turned the call away: {details}")
        if code in _UNREACHABLE:
            reason = details or code.name
            refused_certificate = (
                f"; or it refused the client certificate from {self._client_certificate.source} "
                "in the handshake, which closes the connection (expired, or not from its CA)"
                if self._client_certificate is not None
                else ""
            )
            return Unreachable(
                f"cannot reach the controller at {self.target}: {reason}; "
                f"is controller-svc running? (set --controller or {ENV_CONTROLLER})"
                + refused_certificate
            )
        if code in _REFUSED:
            # The controller words these for the operator; add nothing.
            return Rejected(details or f"the controller refused {method} ({code.name})")
        return ControllerFailed(
            f"the controller failed on {method} at {self.target}: {code.name}: {details}; "
            "see the controller's log"
        )


def _tls_refused(exc: grpc.RpcError) -> bool:
    """Whether the call failed because the controller's certificate was refused: nothing
    was sent, and trying again with the same CA certificate fails the same way."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and bool(
        _TLS_REFUSED.search(exc.details() or "")
    )


def _upgrade_request(
    latest: bool, version: str, gateway_ids: Sequence[str]
) -> controller_pb2.StartUpgradeRequest:
    """The request naming a target, shared by PlanUpgrade and StartUpgrade."""
    if latest == bool(version):
        raise UsageError("choose exactly one of --latest and --version")
    if latest:
        return controller_pb2.StartUpgradeRequest(latest=True, gateway_ids=list(gateway_ids))
    return controller_pb2.StartUpgradeRequest(version=version, gateway_ids=list(gateway_ids))
