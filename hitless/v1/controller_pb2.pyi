import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hitless.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Gateway(_message.Message):
    __slots__ = ("id", "version", "state", "last_seen", "vpn_sessions", "ha_peer")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HA_PEER_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    state: str
    last_seen: _timestamp_pb2.Timestamp
    vpn_sessions: int
    ha_peer: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vpn_sessions: _Optional[int] = ..., ha_peer: _Optional[str] = ...) -> None: ...

class ListGatewaysRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGatewaysResponse(_message.Message):
    __slots__ = ("gateways", "next_page_token")
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gateways: _containers.RepeatedCompositeFieldContainer[Gateway]
    next_page_token: str
    def __init__(self, gateways: _Optional[_Iterable[_Union[Gateway, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("version", "sha256", "size", "published_at", "notes", "restarts_vpn_service", "signing", "min_from")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_VPN_SERVICE_FIELD_NUMBER: _ClassVar[int]
    SIGNING_FIELD_NUMBER: _ClassVar[int]
    MIN_FROM_FIELD_NUMBER: _ClassVar[int]
    version: str
    sha256: str
    size: int
    published_at: _timestamp_pb2.Timestamp
    notes: str
    restarts_vpn_service: bool
    signing: str
    min_from: str
    def __init__(self, version: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., notes: _Optional[str] = ..., restarts_vpn_service: _Optional[bool] = ..., signing: _Optional[str] = ..., min_from: _Optional[str] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[Release]
    def __init__(self, releases: _Optional[_Iterable[_Union[Release, _Mapping]]] = ...) -> None: ...

class ReleaseMetadata(_message.Message):
    __slots__ = ("version", "notes", "sha256", "size", "restarts_vpn_service", "targets_metadata", "min_from")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_VPN_SERVICE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_METADATA_FIELD_NUMBER: _ClassVar[int]
    MIN_FROM_FIELD_NUMBER: _ClassVar[int]
    version: str
    notes: str
    sha256: str
    size: int
    restarts_vpn_service: bool
    targets_metadata: bytes
    min_from: str
    def __init__(self, version: _Optional[str] = ..., notes: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., restarts_vpn_service: _Optional[bool] = ..., targets_metadata: _Optional[bytes] = ..., min_from: _Optional[str] = ...) -> None: ...

class PublishReleaseRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ReleaseMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[ReleaseMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StartUpgradeRequest(_message.Message):
    __slots__ = ("latest", "version", "gateway_ids", "request_id", "deadline_seconds", "allow_downgrade", "accept_vpn_disruption", "waves", "max_parallel", "max_failures", "not_before", "not_after", "window", "dry_run", "force", "skip_prechecks", "soak_seconds")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_VPN_DISRUPTION_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    SKIP_PRECHECKS_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    latest: bool
    version: str
    gateway_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    deadline_seconds: int
    allow_downgrade: bool
    accept_vpn_disruption: bool
    waves: str
    max_parallel: int
    max_failures: str
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    window: str
    dry_run: bool
    force: bool
    skip_prechecks: bool
    soak_seconds: int
    def __init__(self, latest: _Optional[bool] = ..., version: _Optional[str] = ..., gateway_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., deadline_seconds: _Optional[int] = ..., allow_downgrade: _Optional[bool] = ..., accept_vpn_disruption: _Optional[bool] = ..., waves: _Optional[str] = ..., max_parallel: _Optional[int] = ..., max_failures: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[str] = ..., dry_run: _Optional[bool] = ..., force: _Optional[bool] = ..., skip_prechecks: _Optional[bool] = ..., soak_seconds: _Optional[int] = ...) -> None: ...

class PreCheck(_message.Message):
    __slots__ = ("answered", "problems", "free_bytes", "needed_bytes", "controller_reachable", "vpn_sessions", "tunnels_up", "tunnels_configured")
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEEDED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_UP_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    answered: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    free_bytes: int
    needed_bytes: int
    controller_reachable: bool
    vpn_sessions: int
    tunnels_up: int
    tunnels_configured: int
    def __init__(self, answered: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ..., free_bytes: _Optional[int] = ..., needed_bytes: _Optional[int] = ..., controller_reachable: _Optional[bool] = ..., vpn_sessions: _Optional[int] = ..., tunnels_up: _Optional[int] = ..., tunnels_configured: _Optional[int] = ...) -> None: ...

class PlannedGateway(_message.Message):
    __slots__ = ("gateway_id", "from_version", "action", "vpn_sessions", "pending_version", "precheck", "path", "blocked", "state")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECHECK_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    from_version: str
    action: str
    vpn_sessions: int
    pending_version: str
    precheck: PreCheck
    path: _containers.RepeatedScalarFieldContainer[str]
    blocked: str
    state: str
    def __init__(self, gateway_id: _Optional[str] = ..., from_version: _Optional[str] = ..., action: _Optional[str] = ..., vpn_sessions: _Optional[int] = ..., pending_version: _Optional[str] = ..., precheck: _Optional[_Union[PreCheck, _Mapping]] = ..., path: _Optional[_Iterable[str]] = ..., blocked: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class UpgradePlan(_message.Message):
    __slots__ = ("release", "gateways", "vpn_sessions_affected", "controller_from")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FROM_FIELD_NUMBER: _ClassVar[int]
    release: Release
    gateways: _containers.RepeatedCompositeFieldContainer[PlannedGateway]
    vpn_sessions_affected: int
    controller_from: str
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., gateways: _Optional[_Iterable[_Union[PlannedGateway, _Mapping]]] = ..., vpn_sessions_affected: _Optional[int] = ..., controller_from: _Optional[str] = ...) -> None: ...

class GatewayJob(_message.Message):
    __slots__ = ("gateway_id", "state", "from_version", "to_version", "error", "bytes_done", "bytes_total", "updated_at", "vpn_sessions_dropped", "wave", "path", "hop", "health")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    state: _common_pb2.GatewayJobState
    from_version: str
    to_version: str
    error: str
    bytes_done: int
    bytes_total: int
    updated_at: _timestamp_pb2.Timestamp
    vpn_sessions_dropped: int
    wave: int
    path: _containers.RepeatedScalarFieldContainer[str]
    hop: int
    health: str
    def __init__(self, gateway_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.GatewayJobState, str]] = ..., from_version: _Optional[str] = ..., to_version: _Optional[str] = ..., error: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vpn_sessions_dropped: _Optional[int] = ..., wave: _Optional[int] = ..., path: _Optional[_Iterable[str]] = ..., hop: _Optional[int] = ..., health: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "target_version", "created_at", "updated_at", "gateways", "source", "requested_by", "next_page_token", "gateway_count", "waves", "max_parallel", "max_failures", "stop_reason", "ending", "current_wave", "wave_count", "not_before", "not_after", "window", "starts_at", "soak_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_COUNT_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    CURRENT_WAVE_FIELD_NUMBER: _ClassVar[int]
    WAVE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STARTS_AT_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.JobState
    target_version: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    gateways: _containers.RepeatedCompositeFieldContainer[GatewayJob]
    source: str
    requested_by: str
    next_page_token: str
    gateway_count: int
    waves: str
    max_parallel: int
    max_failures: str
    stop_reason: str
    ending: _common_pb2.JobState
    current_wave: int
    wave_count: int
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    window: str
    starts_at: _timestamp_pb2.Timestamp
    soak_seconds: int
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., target_version: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gateways: _Optional[_Iterable[_Union[GatewayJob, _Mapping]]] = ..., source: _Optional[str] = ..., requested_by: _Optional[str] = ..., next_page_token: _Optional[str] = ..., gateway_count: _Optional[int] = ..., waves: _Optional[str] = ..., max_parallel: _Optional[int] = ..., max_failures: _Optional[str] = ..., stop_reason: _Optional[str] = ..., ending: _Optional[_Union[_common_pb2.JobState, str]] = ..., current_wave: _Optional[int] = ..., wave_count: _Optional[int] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[str] = ..., starts_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., soak_seconds: _Optional[int] = ...) -> None: ...

class JobActionRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "at", "gateway_id", "gateway_state", "job_state", "error", "bytes_done", "bytes_total")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    gateway_id: str
    gateway_state: _common_pb2.GatewayJobState
    job_state: _common_pb2.JobState
    error: str
    bytes_done: int
    bytes_total: int
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gateway_id: _Optional[str] = ..., gateway_state: _Optional[_Union[_common_pb2.GatewayJobState, str]] = ..., job_state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "page_size", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_size: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RejectedJob(_message.Message):
    __slots__ = ("message_id", "reason", "body", "user_id", "at")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    reason: str
    body: str
    user_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., reason: _Optional[str] = ..., body: _Optional[str] = ..., user_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRejectedJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRejectedJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[RejectedJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[RejectedJob, _Mapping]]] = ...) -> None: ...

class SyncReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SyncReleasesResponse(_message.Message):
    __slots__ = ("imported",)
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    imported: _containers.RepeatedCompositeFieldContainer[Release]
    def __init__(self, imported: _Optional[_Iterable[_Union[Release, _Mapping]]] = ...) -> None: ...

class Admin(_message.Message):
    __slots__ = ("email",)
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    email: str
    def __init__(self, email: _Optional[str] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("email",)
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    email: str
    def __init__(self, email: _Optional[str] = ...) -> None: ...

class ListAdminsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdminsResponse(_message.Message):
    __slots__ = ("admins",)
    ADMINS_FIELD_NUMBER: _ClassVar[int]
    admins: _containers.RepeatedCompositeFieldContainer[Admin]
    def __init__(self, admins: _Optional[_Iterable[_Union[Admin, _Mapping]]] = ...) -> None: ...

class ControllerInfo(_message.Message):
    __slots__ = ("version", "pid")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class GetControllerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpgradeControllerRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class GetTargetsMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetsMetadata(_message.Message):
    __slots__ = ("data", "version")
    DATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    version: int
    def __init__(self, data: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class YankReleaseRequest(_message.Message):
    __slots__ = ("version", "targets_metadata")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGETS_METADATA_FIELD_NUMBER: _ClassVar[int]
    version: str
    targets_metadata: bytes
    def __init__(self, version: _Optional[str] = ..., targets_metadata: _Optional[bytes] = ...) -> None: ...

class RotateRootRequest(_message.Message):
    __slots__ = ("root", "targets_metadata")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    TARGETS_METADATA_FIELD_NUMBER: _ClassVar[int]
    root: bytes
    targets_metadata: bytes
    def __init__(self, root: _Optional[bytes] = ..., targets_metadata: _Optional[bytes] = ...) -> None: ...

class RotateRootResponse(_message.Message):
    __slots__ = ("root_version",)
    ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    root_version: int
    def __init__(self, root_version: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("name", "role", "created_at", "expires_at", "revoked_at", "created_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    created_by: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("name", "role", "expires_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    expires_seconds: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., expires_seconds: _Optional[int] = ...) -> None: ...

class CreatedToken(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: Token
    secret: str
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "at", "actor", "peer", "action", "detail", "outcome")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    actor: str
    peer: str
    action: str
    detail: str
    outcome: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., peer: _Optional[str] = ..., action: _Optional[str] = ..., detail: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("since", "limit")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class CreateEnrollmentRequest(_message.Message):
    __slots__ = ("gateway_id", "expires_seconds")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    expires_seconds: int
    def __init__(self, gateway_id: _Optional[str] = ..., expires_seconds: _Optional[int] = ...) -> None: ...

class EnrollmentCode(_message.Message):
    __slots__ = ("gateway_id", "code", "expires_at")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    code: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, gateway_id: _Optional[str] = ..., code: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GatewayEnrollment(_message.Message):
    __slots__ = ("gateway_id", "state", "created_at", "code_expires_at", "enrolled_at", "revoked_at", "certificate_serial", "certificate_expires_at", "broker_user", "created_by")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CODE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BROKER_USER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    state: str
    created_at: _timestamp_pb2.Timestamp
    code_expires_at: _timestamp_pb2.Timestamp
    enrolled_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    certificate_serial: str
    certificate_expires_at: _timestamp_pb2.Timestamp
    broker_user: str
    created_by: str
    def __init__(self, gateway_id: _Optional[str] = ..., state: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., code_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., enrolled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., certificate_serial: _Optional[str] = ..., certificate_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., broker_user: _Optional[str] = ..., created_by: _Optional[str] = ...) -> None: ...

class ListEnrollmentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnrollmentsResponse(_message.Message):
    __slots__ = ("enrollments",)
    ENROLLMENTS_FIELD_NUMBER: _ClassVar[int]
    enrollments: _containers.RepeatedCompositeFieldContainer[GatewayEnrollment]
    def __init__(self, enrollments: _Optional[_Iterable[_Union[GatewayEnrollment, _Mapping]]] = ...) -> None: ...

class RevokeGatewayRequest(_message.Message):
    __slots__ = ("gateway_id",)
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    def __init__(self, gateway_id: _Optional[str] = ...) -> None: ...

class PublisherRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class Publisher(_message.Message):
    __slots__ = ("user", "allowed_at", "allowed_by")
    USER_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BY_FIELD_NUMBER: _ClassVar[int]
    user: str
    allowed_at: _timestamp_pb2.Timestamp
    allowed_by: str
    def __init__(self, user: _Optional[str] = ..., allowed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allowed_by: _Optional[str] = ...) -> None: ...

class ListPublishersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPublishersResponse(_message.Message):
    __slots__ = ("publishers",)
    PUBLISHERS_FIELD_NUMBER: _ClassVar[int]
    publishers: _containers.RepeatedCompositeFieldContainer[Publisher]
    def __init__(self, publishers: _Optional[_Iterable[_Union[Publisher, _Mapping]]] = ...) -> None: ...

class IssueCertificateRequest(_message.Message):
    __slots__ = ("name", "role", "csr_pem", "expires_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    csr_pem: bytes
    expires_seconds: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., expires_seconds: _Optional[int] = ...) -> None: ...

class OperatorCertificate(_message.Message):
    __slots__ = ("name", "role", "serial", "created_at", "expires_at", "revoked_at", "created_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    serial: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    created_by: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., serial: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ...) -> None: ...

class IssuedCertificate(_message.Message):
    __slots__ = ("certificate", "certificate_pem", "ca_pem")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate: OperatorCertificate
    certificate_pem: bytes
    ca_pem: bytes
    def __init__(self, certificate: _Optional[_Union[OperatorCertificate, _Mapping]] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class ListCertificatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCertificatesResponse(_message.Message):
    __slots__ = ("certificates",)
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[OperatorCertificate]
    def __init__(self, certificates: _Optional[_Iterable[_Union[OperatorCertificate, _Mapping]]] = ...) -> None: ...

class RevokeCertificateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AddUserRequest(_message.Message):
    __slots__ = ("name", "role", "password")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    password: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class ConsoleUser(_message.Message):
    __slots__ = ("name", "role", "created_at", "created_by", "last_login_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_LOGIN_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    last_login_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., last_login_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListUsersResponse(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[ConsoleUser]
    def __init__(self, users: _Optional[_Iterable[_Union[ConsoleUser, _Mapping]]] = ...) -> None: ...

class RemoveUserRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
