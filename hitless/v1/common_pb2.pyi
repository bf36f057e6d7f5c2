from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_PARTIAL: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_PAUSED: _ClassVar[JobState]
    JOB_STATE_ABORTED: _ClassVar[JobState]

class GatewayJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATEWAY_JOB_STATE_UNSPECIFIED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_QUEUED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_DOWNLOADING: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_VERIFYING: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_SWAPPING: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_SUCCEEDED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_FAILED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_ROLLED_BACK: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_UNREACHABLE: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_SKIPPED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_CANCELLED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_SUPERSEDED: _ClassVar[GatewayJobState]
    GATEWAY_JOB_STATE_SOAKING: _ClassVar[GatewayJobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_PARTIAL: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_PAUSED: JobState
JOB_STATE_ABORTED: JobState
GATEWAY_JOB_STATE_UNSPECIFIED: GatewayJobState
GATEWAY_JOB_STATE_QUEUED: GatewayJobState
GATEWAY_JOB_STATE_DOWNLOADING: GatewayJobState
GATEWAY_JOB_STATE_VERIFYING: GatewayJobState
GATEWAY_JOB_STATE_SWAPPING: GatewayJobState
GATEWAY_JOB_STATE_SUCCEEDED: GatewayJobState
GATEWAY_JOB_STATE_FAILED: GatewayJobState
GATEWAY_JOB_STATE_ROLLED_BACK: GatewayJobState
GATEWAY_JOB_STATE_UNREACHABLE: GatewayJobState
GATEWAY_JOB_STATE_SKIPPED: GatewayJobState
GATEWAY_JOB_STATE_CANCELLED: GatewayJobState
GATEWAY_JOB_STATE_SUPERSEDED: GatewayJobState
GATEWAY_JOB_STATE_SOAKING: GatewayJobState
