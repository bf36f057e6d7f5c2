import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hitless.v1 import common_pb2 as _common_pb2
from hitless.v1 import controller_pb2 as _controller_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpgradeCommand(_message.Message):
    __slots__ = ("command_id", "job_id", "gateway_id", "target_version", "artifact_sha256", "artifact_size", "deadline", "restarts_vpn_service", "issued_at", "allow_downgrade", "soak_seconds")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_VPN_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    job_id: str
    gateway_id: str
    target_version: str
    artifact_sha256: str
    artifact_size: int
    deadline: _timestamp_pb2.Timestamp
    restarts_vpn_service: bool
    issued_at: _timestamp_pb2.Timestamp
    allow_downgrade: bool
    soak_seconds: int
    def __init__(self, command_id: _Optional[str] = ..., job_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., target_version: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., artifact_size: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts_vpn_service: _Optional[bool] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allow_downgrade: _Optional[bool] = ..., soak_seconds: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("report_id", "command_id", "job_id", "gateway_id", "state", "from_version", "to_version", "error", "bytes_done", "bytes_total", "at", "vpn_sessions_dropped", "health")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    command_id: str
    job_id: str
    gateway_id: str
    state: _common_pb2.GatewayJobState
    from_version: str
    to_version: str
    error: str
    bytes_done: int
    bytes_total: int
    at: _timestamp_pb2.Timestamp
    vpn_sessions_dropped: int
    health: str
    def __init__(self, report_id: _Optional[str] = ..., command_id: _Optional[str] = ..., job_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.GatewayJobState, str]] = ..., from_version: _Optional[str] = ..., to_version: _Optional[str] = ..., error: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vpn_sessions_dropped: _Optional[int] = ..., health: _Optional[str] = ...) -> None: ...

class CommandRefused(_message.Message):
    __slots__ = ("report_id", "gateway_id", "command_id", "job_id", "kind", "reason", "at", "from_version")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    gateway_id: str
    command_id: str
    job_id: str
    kind: str
    reason: str
    at: _timestamp_pb2.Timestamp
    from_version: str
    def __init__(self, report_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., command_id: _Optional[str] = ..., job_id: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., from_version: _Optional[str] = ...) -> None: ...

class PreCheckRequest(_message.Message):
    __slots__ = ("check_id", "gateway_id", "target_version", "artifact_size", "deadline")
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    check_id: str
    gateway_id: str
    target_version: str
    artifact_size: int
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, check_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., target_version: _Optional[str] = ..., artifact_size: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PreCheckResult(_message.Message):
    __slots__ = ("check_id", "gateway_id", "version", "free_bytes", "needed_bytes", "controller_reachable", "controller_error", "vpn_sessions", "tunnels_up", "tunnels_configured", "problems", "at")
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEEDED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ERROR_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_UP_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    check_id: str
    gateway_id: str
    version: str
    free_bytes: int
    needed_bytes: int
    controller_reachable: bool
    controller_error: str
    vpn_sessions: int
    tunnels_up: int
    tunnels_configured: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    at: _timestamp_pb2.Timestamp
    def __init__(self, check_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., version: _Optional[str] = ..., free_bytes: _Optional[int] = ..., needed_bytes: _Optional[int] = ..., controller_reachable: _Optional[bool] = ..., controller_error: _Optional[str] = ..., vpn_sessions: _Optional[int] = ..., tunnels_up: _Optional[int] = ..., tunnels_configured: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GatewayHello(_message.Message):
    __slots__ = ("gateway_id", "version", "pid", "listen", "at", "heartbeat_interval", "ha_peer", "features")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    HA_PEER_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    version: str
    pid: int
    listen: _containers.RepeatedScalarFieldContainer[str]
    at: _timestamp_pb2.Timestamp
    heartbeat_interval: _duration_pb2.Duration
    ha_peer: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, gateway_id: _Optional[str] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., listen: _Optional[_Iterable[str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ha_peer: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class GatewayHeartbeat(_message.Message):
    __slots__ = ("gateway_id", "version", "at", "vpn_sessions", "stopping")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VPN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    version: str
    at: _timestamp_pb2.Timestamp
    vpn_sessions: int
    stopping: bool
    def __init__(self, gateway_id: _Optional[str] = ..., version: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vpn_sessions: _Optional[int] = ..., stopping: _Optional[bool] = ...) -> None: ...

class ManagementJob(_message.Message):
    __slots__ = ("action", "target", "version", "gateways", "accept_vpn_disruption", "allow_downgrade", "waves", "max_parallel", "max_failures", "not_before", "not_after", "window", "force", "skip_prechecks", "soak_seconds")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_VPN_DISRUPTION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    SKIP_PRECHECKS_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    action: str
    target: str
    version: str
    gateways: _containers.RepeatedScalarFieldContainer[str]
    accept_vpn_disruption: bool
    allow_downgrade: bool
    waves: str
    max_parallel: int
    max_failures: str
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    window: str
    force: bool
    skip_prechecks: bool
    soak_seconds: int
    def __init__(self, action: _Optional[str] = ..., target: _Optional[str] = ..., version: _Optional[str] = ..., gateways: _Optional[_Iterable[str]] = ..., accept_vpn_disruption: _Optional[bool] = ..., allow_downgrade: _Optional[bool] = ..., waves: _Optional[str] = ..., max_parallel: _Optional[int] = ..., max_failures: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[str] = ..., force: _Optional[bool] = ..., skip_prechecks: _Optional[bool] = ..., soak_seconds: _Optional[int] = ...) -> None: ...

class JobRejected(_message.Message):
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

class Event(_message.Message):
    __slots__ = ("event_id", "at", "admins", "release_published", "job_finished", "job_rejected", "command_refused")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ADMINS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    JOB_FINISHED_FIELD_NUMBER: _ClassVar[int]
    JOB_REJECTED_FIELD_NUMBER: _ClassVar[int]
    COMMAND_REFUSED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    at: _timestamp_pb2.Timestamp
    admins: _containers.RepeatedScalarFieldContainer[str]
    release_published: _controller_pb2.Release
    job_finished: _controller_pb2.Job
    job_rejected: JobRejected
    command_refused: CommandRefused
    def __init__(self, event_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., admins: _Optional[_Iterable[str]] = ..., release_published: _Optional[_Union[_controller_pb2.Release, _Mapping]] = ..., job_finished: _Optional[_Union[_controller_pb2.Job, _Mapping]] = ..., job_rejected: _Optional[_Union[JobRejected, _Mapping]] = ..., command_refused: _Optional[_Union[CommandRefused, _Mapping]] = ...) -> None: ...
