"""The CLI's plain view of the controller's answers, decoded once from protobuf, and of
what the release manager signed (``upgradectl.signing``).

Rendering and JSON output work on these frozen dataclasses, never on protobuf messages or
TUF metadata, so they are easy to build in tests. States are the enum names without their
prefix (``RUNNING``, ``DOWNLOADING``), which is also what the JSON output shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from hitless.v1 import common_pb2, controller_pb2

JOB_TERMINAL = frozenset({"SUCCEEDED", "PARTIAL", "FAILED", "CANCELLED", "ABORTED"})


class _Timestamp(Protocol):
    """The fields of ``google.protobuf.Timestamp`` we read (protobuf ships no stubs)."""

    seconds: int
    nanos: int


def job_state_name(value: int) -> str:
    """``JOB_STATE_RUNNING`` → ``RUNNING``; an unknown number stays visible as is."""
    try:
        name = common_pb2.JobState.Name(value)
    except ValueError:
        return f"UNKNOWN({value})"
    return str(name).removeprefix("JOB_STATE_")


def gateway_state_name(value: int) -> str:
    """``GATEWAY_JOB_STATE_SWAPPING`` → ``SWAPPING``."""
    try:
        name = common_pb2.GatewayJobState.Name(value)
    except ValueError:
        return f"UNKNOWN({value})"
    return str(name).removeprefix("GATEWAY_JOB_STATE_")


def timestamp(ts: _Timestamp) -> datetime | None:
    """A protobuf Timestamp as an aware UTC datetime; unset (the epoch) is None."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, as the JSON output shows instants."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class GatewayInfo:
    """A gateway the controller knows, as ``gateways list`` shows it."""

    id: str
    version: str
    state: str
    last_seen: datetime | None
    vpn_sessions: int = 0
    ha_peer: str = ""  # the other gateway of its high-availability pair

    @classmethod
    def from_proto(cls, msg: controller_pb2.Gateway) -> GatewayInfo:
        return cls(
            msg.id,
            msg.version,
            msg.state,
            timestamp(msg.last_seen),
            msg.vpn_sessions,
            msg.ha_peer,
        )

    def to_json(self) -> dict[str, Any]:
        """Its JSON; "ha_peer" only for a gateway in a high-availability pair."""
        return {
            "id": self.id,
            "version": self.version,
            "state": self.state,
            "last_seen": iso(self.last_seen),
            "vpn_sessions": self.vpn_sessions,
            **({"ha_peer": self.ha_peer} if self.ha_peer else {}),
        }


@dataclass(frozen=True)
class ReleaseInfo:
    """A published release. ``signing`` is the controller's word on its signed targets:
    SIGNED (the newest list it with this sha256 and size), YANKED (an earlier version did,
    the newest does not), UNSIGNED (never listed); "" from a controller that does not say."""

    version: str
    sha256: str
    size: int
    published_at: datetime | None
    notes: str
    restarts_vpn_service: bool = False
    signing: str = ""
    # The lowest version it upgrades from ("" : any); older gateways go through releases
    # in between.
    min_from: str = ""

    @classmethod
    def from_proto(cls, msg: controller_pb2.Release) -> ReleaseInfo:
        return cls(
            msg.version,
            msg.sha256,
            msg.size,
            timestamp(msg.published_at),
            msg.notes,
            msg.restarts_vpn_service,
            msg.signing,
            msg.min_from,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "published_at": iso(self.published_at),
            "notes": self.notes,
            "restarts_vpn_service": self.restarts_vpn_service,
            "signing": self.signing or None,
            "min_from": self.min_from or None,
        }


@dataclass(frozen=True)
class GatewayProgress:
    """One gateway within a job."""

    id: str
    state: str
    from_version: str
    to_version: str
    error: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    vpn_sessions_dropped: int = 0
    wave: int = 1  # its wave in the job's rollout, 1 first
    # Its path through intermediate releases (empty: straight to the target) and the hop
    # it is on, 1 first; ``to_version`` is that hop's release.
    path: tuple[str, ...] = ()
    hop: int = 0
    health: str = ""  # its data plane's health as its soak last reported it

    @classmethod
    def from_proto(cls, msg: controller_pb2.GatewayJob) -> GatewayProgress:
        return cls(
            id=msg.gateway_id,
            state=gateway_state_name(msg.state),
            from_version=msg.from_version,
            to_version=msg.to_version,
            error=msg.error,
            bytes_done=msg.bytes_done,
            bytes_total=msg.bytes_total,
            vpn_sessions_dropped=msg.vpn_sessions_dropped,
            wave=msg.wave or 1,
            path=tuple(msg.path),
            hop=msg.hop,
            health=msg.health,
        )

    def to_json(self) -> dict[str, Any]:
        # An absent reason is null rather than "" so scripts can test it plainly.
        return {
            "id": self.id,
            "state": self.state,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "error": self.error or None,
            "vpn_sessions_dropped": self.vpn_sessions_dropped,
            "path": list(self.path) or None,
            "hop": self.hop or None,
            "health": self.health or None,
        }


@dataclass(frozen=True)
class JobView:
    """An upgrade job and its gateways."""

    job_id: str
    state: str
    target_version: str
    gateways: tuple[GatewayProgress, ...]
    created_at: datetime | None = None
    source: str = ""  # "cli" or "management"
    requested_by: str = ""  # the publishing user, for a management job
    # The rollout ("" and 0: one wave, no cap, no failure limit).
    waves: str = ""
    max_parallel: int = 0
    max_failures: str = ""
    soak_seconds: int = 0  # each gateway's soak after its swap
    stop_reason: str = ""  # why it was paused, aborted or cancelled
    ending: str = ""  # ABORTED or CANCELLED while gateways in flight finish
    current_wave: int = 0  # 1 first; 0 when every gateway is final
    wave_count: int = 1
    window: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    starts_at: datetime | None = None  # while it waits for its times

    @classmethod
    def from_proto(cls, msg: controller_pb2.Job) -> JobView:
        return cls(
            job_id=msg.job_id,
            state=job_state_name(msg.state),
            target_version=msg.target_version,
            gateways=tuple(GatewayProgress.from_proto(g) for g in msg.gateways),
            created_at=timestamp(msg.created_at),
            source=msg.source,
            requested_by=msg.requested_by,
            waves=msg.waves,
            max_parallel=msg.max_parallel,
            max_failures=msg.max_failures,
            soak_seconds=msg.soak_seconds,
            stop_reason=msg.stop_reason,
            ending=job_state_name(msg.ending) if msg.ending else "",
            current_wave=msg.current_wave,
            wave_count=msg.wave_count or 1,
            window=msg.window,
            not_before=timestamp(msg.not_before) if msg.HasField("not_before") else None,
            not_after=timestamp(msg.not_after) if msg.HasField("not_after") else None,
            starts_at=timestamp(msg.starts_at) if msg.HasField("starts_at") else None,
        )

    @property
    def staged(self) -> bool:
        """Whether the job has a rollout beyond one wave of everything at once (asked
        for, or made by high-availability pairs), or was stopped: its JSON says so."""
        return self.wave_count > 1 or bool(
            self.waves
            or self.max_parallel
            or self.max_failures
            or self.soak_seconds
            or self.stop_reason
            or self.window
            or self.not_before
            or self.not_after
        )

    def rollout_json(self) -> dict[str, Any]:
        """The rollout's keys of the job's JSON (none for a job without one)."""
        if not self.staged:
            return {}
        return {
            "waves": self.waves or None,
            "max_parallel": self.max_parallel or None,
            "max_failures": self.max_failures or None,
            "soak_seconds": self.soak_seconds or None,
            "current_wave": self.current_wave or None,
            "wave_count": self.wave_count,
            "ending": self.ending or None,
            "stop_reason": self.stop_reason or None,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "window": self.window or None,
            "starts_at": iso(self.starts_at),
            "gateway_waves": {g.id: g.wave for g in self.gateways},
        }

    @property
    def finished(self) -> bool:
        return self.state in JOB_TERMINAL

    @property
    def succeeded(self) -> bool:
        """True only when the job and every one of its gateways SUCCEEDED."""
        return self.state == "SUCCEEDED" and all(g.state == "SUCCEEDED" for g in self.gateways)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "target_version": self.target_version,
            "state": self.state,
            "gateways": [g.to_json() for g in self.gateways],
            **self.rollout_json(),
        }

    def to_listing_json(self) -> dict[str, Any]:
        """The shape of one job in ``jobs list``."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "target_version": self.target_version,
            "source": self.source,
            "requested_by": self.requested_by or None,
            "created_at": iso(self.created_at),
            "gateways": [g.to_json() for g in self.gateways],
            **({"stop_reason": self.stop_reason} if self.stop_reason else {}),
        }

    def apply(self, event: JobEvent) -> JobView:
        """This job with ``event`` applied (a copy of every gateway: for many events in a
        row, use LiveJob)."""
        if not event.gateway_id:
            return dataclasses.replace(self, state=event.job_state or self.state)
        gateways = list(self.gateways)
        index = next((i for i, g in enumerate(gateways) if g.id == event.gateway_id), None)
        if index is None:
            gateways.append(GatewayProgress(event.gateway_id, "", "", self.target_version))
            index = len(gateways) - 1
        old = gateways[index]
        gateways[index] = dataclasses.replace(
            old,
            state=event.gateway_state or old.state,
            error=event.error or old.error,
            bytes_done=event.bytes_done or old.bytes_done,
            bytes_total=event.bytes_total or old.bytes_total,
        )
        state = event.job_state or self.state
        return dataclasses.replace(self, state=state, gateways=tuple(gateways))


class LiveJob:
    """A job kept current by its WatchJob events, without asking the controller again.

    Applying an event costs the same for a job of 3 gateways or of 10,000: the gateways
    are held by id (in the controller's order, by id; one an event names first is added
    at the end). ``view`` builds the JobView to show, once per redraw rather than per
    event.
    """

    def __init__(self, job: JobView) -> None:
        self.job_id = job.job_id
        self.state = job.state
        self._job = job
        self._gateways = {g.id: g for g in job.gateways}
        self._view: JobView | None = job

    @property
    def finished(self) -> bool:
        return self.state in JOB_TERMINAL

    @property
    def gateway_count(self) -> int:
        return len(self._gateways)

    def apply(self, event: JobEvent) -> None:
        """Apply ``event``: the job's state, or one gateway's state, reason and bytes."""
        self._view = None
        if event.job_state:
            self.state = event.job_state
        if not event.gateway_id:
            return
        old = self._gateways.get(event.gateway_id)
        if old is None:
            old = GatewayProgress(event.gateway_id, "", "", self._job.target_version)
        self._gateways[event.gateway_id] = dataclasses.replace(
            old,
            state=event.gateway_state or old.state,
            error=event.error or old.error,
            bytes_done=event.bytes_done or old.bytes_done,
            bytes_total=event.bytes_total or old.bytes_total,
        )

    def view(self) -> JobView:
        """The job as the events so far made it."""
        if self._view is None:
            self._view = dataclasses.replace(
                self._job, state=self.state, gateways=tuple(self._gateways.values())
            )
        return self._view


@dataclass(frozen=True)
class JobEvent:
    """One progress event of a job; ``seq`` orders them and resumes a watch."""

    seq: int
    at: datetime | None
    gateway_id: str
    gateway_state: str
    job_state: str
    error: str = ""
    bytes_done: int = 0
    bytes_total: int = 0

    @classmethod
    def from_proto(cls, msg: controller_pb2.JobEvent) -> JobEvent:
        # UNSPECIFIED means "this event does not change that state": keep it empty.
        return cls(
            seq=msg.seq,
            at=timestamp(msg.at),
            gateway_id=msg.gateway_id,
            gateway_state=gateway_state_name(msg.gateway_state) if msg.gateway_state else "",
            job_state=job_state_name(msg.job_state) if msg.job_state else "",
            error=msg.error,
            bytes_done=msg.bytes_done,
            bytes_total=msg.bytes_total,
        )


UPGRADE = "UPGRADE"
DOWNGRADE = "DOWNGRADE"
NOTHING = "NOTHING"


@dataclass(frozen=True)
class PlannedGateway:
    """What an upgrade would do to one gateway: ``action`` is UPGRADE, DOWNGRADE or NOTHING."""

    id: str
    from_version: str
    action: str
    vpn_sessions: int
    # The version an unfinished job is taking it to ("" when none).
    pending_version: str = ""
    # With --dry-run: its pre-check. None: not asked; "" no answer in time (offline, busy,
    # or a release that does not answer pre-checks); else "ok" or its problems.
    precheck: str | None = None
    free_bytes: int = 0
    tunnels: str = ""  # "UP/CONFIGURED"
    # The releases it goes through, the last the target; empty: straight there.
    path: tuple[str, ...] = ()
    # Why it cannot be upgraded (no upgrade path): left out of the job. "" when it can.
    blocked: str = ""
    # ONLINE, OFFLINE or UPGRADING when planned ("" from a controller that does not say).
    state: str = ""

    @classmethod
    def from_proto(cls, msg: controller_pb2.PlannedGateway) -> PlannedGateway:
        check = msg.precheck if msg.HasField("precheck") else None
        said: str | None = None
        if check is not None:
            said = ("; ".join(check.problems) or "ok") if check.answered else ""
        return cls(
            msg.gateway_id,
            msg.from_version,
            msg.action,
            msg.vpn_sessions,
            msg.pending_version,
            precheck=said,
            free_bytes=check.free_bytes if check is not None else 0,
            tunnels=(
                f"{check.tunnels_up}/{check.tunnels_configured}"
                if check is not None and check.answered
                else ""
            ),
            path=tuple(msg.path),
            blocked=msg.blocked,
            state=msg.state,
        )

    @property
    def running(self) -> str:
        """ "1.2.0", or "1.2.0 (7.2.0 once its unfinished job is done)"."""
        if not self.pending_version or self.pending_version == self.from_version:
            return self.from_version
        return f"{self.from_version} ({self.pending_version} once its unfinished job is done)"


@dataclass(frozen=True)
class UpgradePlan:
    """The controller's answer to "what would this upgrade do?", before anything starts."""

    release: ReleaseInfo
    gateways: tuple[PlannedGateway, ...]
    vpn_sessions_affected: int
    # The version the controller runs when it upgrades itself to the release first; ""
    # when it does not.
    controller_from: str = ""

    @classmethod
    def from_proto(cls, msg: controller_pb2.UpgradePlan) -> UpgradePlan:
        return cls(
            ReleaseInfo.from_proto(msg.release),
            tuple(PlannedGateway.from_proto(g) for g in msg.gateways),
            msg.vpn_sessions_affected,
            msg.controller_from,
        )

    @property
    def offline(self) -> tuple[PlannedGateway, ...]:
        """The gateways that would change version and are OFFLINE now."""
        return tuple(g for g in self.changes if g.state == "OFFLINE" and not g.blocked)

    @property
    def changes(self) -> tuple[PlannedGateway, ...]:
        """The gateways that would change version."""
        return tuple(g for g in self.gateways if g.action != NOTHING)

    @property
    def downgrades(self) -> tuple[PlannedGateway, ...]:
        return tuple(g for g in self.gateways if g.action == DOWNGRADE)


@dataclass(frozen=True)
class RejectedJob:
    """A management job the controller refused, and why."""

    message_id: str
    reason: str
    body: str
    user_id: str
    at: datetime | None

    @classmethod
    def from_proto(cls, msg: controller_pb2.RejectedJob) -> RejectedJob:
        return cls(msg.message_id, msg.reason, msg.body, msg.user_id, timestamp(msg.at))

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "body": self.body,
            "user_id": self.user_id or None,
            "at": iso(self.at),
        }


@dataclass(frozen=True)
class PublisherInfo:
    """A broker user allowed to publish management jobs: since when, and by whom
    (``token:NAME``; "" when the controller does not say)."""

    user: str
    allowed_at: datetime | None
    allowed_by: str

    @classmethod
    def from_proto(cls, msg: controller_pb2.Publisher) -> PublisherInfo:
        return cls(msg.user, timestamp(msg.allowed_at), msg.allowed_by)

    def to_json(self) -> dict[str, Any]:
        """The shape of one publisher in ``jobs publishers --json``."""
        return {
            "user": self.user,
            "allowed_at": iso(self.allowed_at),
            "allowed_by": self.allowed_by or None,
        }


@dataclass(frozen=True)
class RoleKey:
    """One key of a key directory: its ``role`` (root, targets, snapshot, timestamp,
    command), TUF key id (hex) and private key file."""

    role: str
    keyid: str
    path: Path


@dataclass(frozen=True)
class KeyDirectory:
    """A key directory as ``keys init`` made it: ``root_json`` (the trust anchor) at root
    ``root_version`` until ``expires``; ``offline`` holds the root and targets keys,
    ``online`` the snapshot, timestamp and command keys."""

    dir: Path
    root_json: Path
    root_version: int
    expires: datetime
    offline: Path
    online: Path
    keys: tuple[RoleKey, ...]


@dataclass(frozen=True)
class TargetsChange:
    """Targets metadata signed by the release manager: ``data`` as signed, its
    ``version`` (after ``previous_version``, 0 for none), and the target it adds or
    removes: ``name`` listed as ``length`` bytes with ``sha256``."""

    data: bytes
    version: int
    previous_version: int
    name: str
    length: int
    sha256: str


@dataclass(frozen=True)
class Rotation:
    """A root rotation the controller took: ``root_version`` it trusts now, the ``roles``
    whose keys changed from the previous version, and ``targets_version``, the targets
    re-signed with a new targets key and taken with it (None when none were needed)."""

    root_version: int
    roles: tuple[str, ...]
    targets_version: int | None


@dataclass(frozen=True)
class TokenInfo:
    """An operator's API token as the controller describes it, without its secret.

    ``role`` is viewer, operator or admin; ``expires_at`` None never expires, ``revoked_at``
    None is not revoked; ``created_by`` names the caller that created it (``token:NAME``,
    "" when the controller does not say).
    """

    name: str
    role: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str

    @classmethod
    def from_proto(cls, msg: controller_pb2.Token) -> TokenInfo:
        return cls(
            msg.name,
            msg.role,
            timestamp(msg.created_at),
            timestamp(msg.expires_at),
            timestamp(msg.revoked_at),
            msg.created_by,
        )

    def to_json(self) -> dict[str, Any]:
        """The shape of one token in ``tokens list``: times ISO 8601 in UTC or null."""
        return {
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class UserInfo:
    """A web console user as the controller describes it (never its password).

    ``role`` is viewer, operator or admin; ``created_by`` names the caller that added it
    (``token:NAME``, ...); ``last_login_at`` None: never logged in.
    """

    name: str
    role: str
    created_at: datetime | None
    created_by: str
    last_login_at: datetime | None

    @classmethod
    def from_proto(cls, msg: controller_pb2.ConsoleUser) -> UserInfo:
        return cls(
            msg.name,
            msg.role,
            timestamp(msg.created_at),
            msg.created_by,
            timestamp(msg.last_login_at),
        )

    def to_json(self) -> dict[str, Any]:
        """The shape of one user in ``users list``: times ISO 8601 in UTC or null."""
        return {
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "last_login_at": iso(self.last_login_at),
        }


@dataclass(frozen=True)
class CreatedToken:
    """A token just created, with its ``secret``: the controller keeps only its sha256,
    so this is the one time anyone sees it. Left out of the repr."""

    token: TokenInfo
    secret: str = dataclasses.field(repr=False)

    @classmethod
    def from_proto(cls, msg: controller_pb2.CreatedToken) -> CreatedToken:
        return cls(TokenInfo.from_proto(msg.token), msg.secret)

    def to_json(self) -> dict[str, Any]:
        """The shape ``tokens create --json`` prints; ``token`` is the secret."""
        return {
            "name": self.token.name,
            "role": self.token.role,
            "token": self.secret,
            "expires_at": iso(self.token.expires_at),
        }


@dataclass(frozen=True)
class CertificateInfo:
    """An operator's client certificate as the controller describes it, without the key
    (which never left the operator's machine).

    ``role`` is viewer, operator or admin; ``serial`` hex; ``revoked_at`` None is not
    revoked; ``created_by`` names the caller that had it issued (``token:NAME``,
    ``cert:NAME``).
    """

    name: str
    role: str
    serial: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str

    @classmethod
    def from_proto(cls, msg: controller_pb2.OperatorCertificate) -> CertificateInfo:
        return cls(
            msg.name, msg.role, msg.serial, timestamp(msg.created_at), timestamp(msg.expires_at),
            timestamp(msg.revoked_at), msg.created_by,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The shape of one certificate in ``certs list --json``: times ISO 8601 or null."""
        return {
            "name": self.name,
            "role": self.role,
            "serial": self.serial,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate just issued: its description, its PEM and the CA's PEM."""

    certificate: CertificateInfo
    certificate_pem: bytes
    ca_pem: bytes

    @classmethod
    def from_proto(cls, msg: controller_pb2.IssuedCertificate) -> IssuedCertificate:
        return cls(
            CertificateInfo.from_proto(msg.certificate), bytes(msg.certificate_pem),
            bytes(msg.ca_pem),
        )  # fmt: skip


@dataclass(frozen=True)
class AuditEvent:
    """One change the controller recorded, and who asked for it.

    ``seq`` orders events; ``actor`` is ``token:NAME``, ``broker:USER`` or ``controller``;
    ``peer`` is where the call came from; ``action`` the method (``StartUpgrade``);
    ``detail`` what was asked (ids, versions); ``outcome`` ``OK`` or the status code and
    its message. Every text field comes from outside and may carry anything.
    """

    seq: int
    at: datetime | None
    actor: str
    peer: str
    action: str
    detail: str
    outcome: str

    @classmethod
    def from_proto(cls, msg: controller_pb2.AuditEvent) -> AuditEvent:
        return cls(
            msg.seq,
            timestamp(msg.at),
            msg.actor,
            msg.peer,
            msg.action,
            msg.detail,
            msg.outcome,
        )

    def to_json(self) -> dict[str, Any]:
        """The shape of one event in ``audit``: ``at`` ISO 8601 in UTC."""
        return {
            "seq": self.seq,
            "at": iso(self.at),
            "actor": self.actor,
            "peer": self.peer,
            "action": self.action,
            "detail": self.detail,
            "outcome": self.outcome,
        }


@dataclass(frozen=True)
class EnrollmentInfo:
    """A gateway's enrollment as the controller describes it: ``state`` PENDING (a code
    not used yet), ENROLLED, EXPIRED or REVOKED; ``certificate_serial`` hex, "" before
    enrollment; ``broker_user`` "" when the controller makes no broker users."""

    gateway_id: str
    state: str
    created_at: datetime | None
    code_expires_at: datetime | None
    enrolled_at: datetime | None
    revoked_at: datetime | None
    certificate_serial: str
    certificate_expires_at: datetime | None
    broker_user: str
    created_by: str

    @classmethod
    def from_proto(cls, msg: controller_pb2.GatewayEnrollment) -> EnrollmentInfo:
        return cls(
            msg.gateway_id, msg.state, timestamp(msg.created_at), timestamp(msg.code_expires_at),
            timestamp(msg.enrolled_at), timestamp(msg.revoked_at), msg.certificate_serial,
            timestamp(msg.certificate_expires_at), msg.broker_user, msg.created_by,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The shape of one enrollment in ``gateways enrollments --json``."""
        return {
            "gateway_id": self.gateway_id,
            "state": self.state,
            "created_at": iso(self.created_at),
            "code_expires_at": iso(self.code_expires_at),
            "enrolled_at": iso(self.enrolled_at),
            "revoked_at": iso(self.revoked_at),
            "certificate_serial": self.certificate_serial,
            "certificate_expires_at": iso(self.certificate_expires_at),
            "broker_user": self.broker_user,
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class EnrollmentCode:
    """A one-time enrollment code, shown once: the controller keeps only its sha256."""

    gateway_id: str
    code: str = dataclasses.field(repr=False)
    expires_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: controller_pb2.EnrollmentCode) -> EnrollmentCode:
        return cls(msg.gateway_id, msg.code, timestamp(msg.expires_at))

    def to_json(self) -> dict[str, Any]:
        """The shape ``gateways enroll --json`` prints (the issue's contract)."""
        return {
            "gateway_id": self.gateway_id,
            "code": self.code,
            "expires_at": iso(self.expires_at),
        }
