"""Between the repository's records and the API's protobuf messages, in one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from controller_svc import rollout
from controller_svc.access import AuditRecord, TokenRecord
from controller_svc.enrollment import EnrollmentRecord
from controller_svc.operator_certs import CertificateRecord
from controller_svc.prechecks import Answer
from controller_svc.records import (
    EventRecord,
    GatewayJobRecord,
    GatewayRecord,
    JobRecord,
    ReleaseRecord,
    ReportIn,
)
from controller_svc.states import GatewayState, JobState
from controller_svc.users import UserRecord
from hitless.v1 import bus_pb2, common_pb2, controller_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    """``value`` as a protobuf Timestamp (a naive one read as UTC), as
    ``Timestamp.FromDatetime`` gives it, by integer arithmetic on the time since the
    epoch: FromDatetime goes through ``calendar.timegm`` and costs several times more,
    which counts in a reply of a thousand gateways."""
    since = (value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def job_state(state: JobState) -> common_pb2.JobState:
    return cast(common_pb2.JobState, common_pb2.JobState.Value(f"JOB_STATE_{state.value}"))


def gateway_state(state: GatewayState) -> common_pb2.GatewayJobState:
    value = common_pb2.GatewayJobState.Value(f"GATEWAY_JOB_STATE_{state.value}")
    return cast(common_pb2.GatewayJobState, value)


def gateway_state_from(value: common_pb2.GatewayJobState) -> GatewayState:
    name = common_pb2.GatewayJobState.Name(value)
    return GatewayState(name.removeprefix("GATEWAY_JOB_STATE_"))


def release(record: ReleaseRecord, signing: str = "") -> controller_pb2.Release:
    return controller_pb2.Release(
        version=record.version,
        sha256=record.sha256,
        size=record.size,
        published_at=timestamp(record.published_at),
        notes=record.notes,
        restarts_vpn_service=record.restarts_vpn_service,
        signing=signing,
        min_from=record.min_from or "",
    )


def gateway(record: GatewayRecord, state: str) -> controller_pb2.Gateway:
    return controller_pb2.Gateway(
        id=record.id,
        version=record.version,
        state=state,
        last_seen=timestamp(record.last_seen),
        vpn_sessions=record.vpn_sessions,
        ha_peer=record.ha_peer or "",
    )


def gateway_job(record: GatewayJobRecord) -> controller_pb2.GatewayJob:
    return controller_pb2.GatewayJob(
        gateway_id=record.gateway_id,
        state=gateway_state(record.state),
        from_version=record.from_version,
        to_version=record.to_version,
        error=record.error,
        bytes_done=record.bytes_done,
        bytes_total=record.bytes_total,
        updated_at=timestamp(record.updated_at),
        vpn_sessions_dropped=record.vpn_sessions_dropped,
        wave=record.wave + 1,
        path=record.path,
        hop=record.hop + 1 if record.path else 0,
        health=record.health,
    )


def job(
    record: JobRecord, *, gateway_count: int | None = None, next_page_token: str = ""
) -> controller_pb2.Job:
    """The job with the gateways ``record`` carries: all of them, or one page of
    ``gateway_count`` (None: the record carries all) followed by ``next_page_token``."""
    return controller_pb2.Job(
        job_id=record.id,
        state=job_state(record.state),
        target_version=record.target_version,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        gateways=[gateway_job(g) for g in record.gateways],
        source=record.source,
        requested_by=record.requested_by,
        next_page_token=next_page_token,
        gateway_count=len(record.gateways) if gateway_count is None else gateway_count,
        waves=record.waves,
        max_parallel=record.max_parallel,
        soak_seconds=record.soak_s,
        max_failures=record.max_failures,
        stop_reason=record.stop_reason,
        ending=job_state(record.ending) if record.ending else None,
        current_wave=0 if record.current_wave is None else record.current_wave + 1,
        wave_count=record.wave_count,
        not_before=timestamp(record.not_before) if record.not_before else None,
        not_after=timestamp(record.not_after) if record.not_after else None,
        window=record.window,
        starts_at=_starts_at(record),
    )


def _starts_at(record: JobRecord) -> Timestamp | None:
    """When an unfinished job waiting for its times may next start a gateway; None when
    it need not wait (or never will again: past its not_after)."""
    if record.state.terminal or not (record.not_before or record.not_after or record.window):
        return None
    now = datetime.now(UTC)
    when = rollout.starts_at(rollout.rollout_of(record), now)
    return timestamp(when) if when is not None and when > now else None


def precheck(answer: Answer) -> controller_pb2.PreCheck:
    return controller_pb2.PreCheck(
        answered=answer.answered,
        problems=list(answer.problems),
        free_bytes=answer.free_bytes,
        needed_bytes=answer.needed_bytes,
        controller_reachable=answer.controller_reachable,
        vpn_sessions=answer.vpn_sessions,
        tunnels_up=answer.tunnels_up,
        tunnels_configured=answer.tunnels_configured,
    )


def rollout_of(
    request: controller_pb2.StartUpgradeRequest | bus_pb2.ManagementJob,
) -> rollout.Rollout:
    """The rollout a StartUpgradeRequest or a management job asks for (they carry the
    same fields)."""
    return rollout.Rollout(
        request.waves,
        request.max_parallel,
        request.max_failures,
        time_of(request.not_before, request.HasField("not_before")),
        time_of(request.not_after, request.HasField("not_after")),
        request.window,
        request.soak_seconds,
    )


def time_of(message: Timestamp, present: bool) -> datetime | None:
    """A request's Timestamp field as a tz-aware time; None when it was not set."""
    return message.ToDatetime(tzinfo=UTC) if present else None


def event(record: EventRecord) -> controller_pb2.JobEvent:
    message = controller_pb2.JobEvent(
        seq=record.seq,
        at=timestamp(record.at),
        gateway_id=record.gateway_id or "",
        error=record.error,
        bytes_done=record.bytes_done,
        bytes_total=record.bytes_total,
    )
    if record.gateway_state is not None:
        message.gateway_state = gateway_state(record.gateway_state)
    if record.job_state is not None:
        message.job_state = job_state(record.job_state)
    return message


def report(message: bus_pb2.StatusReport, report_id: str) -> ReportIn:
    return ReportIn(
        report_id=report_id,
        job_id=message.job_id,
        command_id=message.command_id,
        gateway_id=message.gateway_id,
        state=gateway_state_from(message.state),
        from_version=message.from_version,
        to_version=message.to_version,
        error=message.error,
        bytes_done=message.bytes_done,
        bytes_total=message.bytes_total,
        at=message.at.ToDatetime(tzinfo=UTC),
        vpn_sessions_dropped=message.vpn_sessions_dropped,
        health=message.health,
    )


def token(record: TokenRecord) -> controller_pb2.Token:
    message = controller_pb2.Token(
        name=record.name,
        role=str(record.role),
        created_at=timestamp(record.created_at),
        created_by=record.created_by,
    )
    if record.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(record.expires_at))
    if record.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(record.revoked_at))
    return message


def audit(record: AuditRecord) -> controller_pb2.AuditEvent:
    return controller_pb2.AuditEvent(
        seq=record.seq,
        at=timestamp(record.at),
        actor=record.actor,
        peer=record.peer,
        action=record.action,
        detail=record.detail,
        outcome=record.outcome,
    )


def enrollment(record: EnrollmentRecord) -> controller_pb2.GatewayEnrollment:
    message = controller_pb2.GatewayEnrollment(
        gateway_id=record.gateway_id,
        state=record.state,
        created_at=timestamp(record.created_at),
        code_expires_at=timestamp(record.code_expires_at),
        certificate_serial=record.certificate_serial,
        broker_user=record.broker_user,
        created_by=record.created_by,
    )
    for name in ("enrolled_at", "revoked_at", "certificate_expires_at"):
        value = getattr(record, name)
        if value is not None:
            getattr(message, name).CopyFrom(timestamp(value))
    return message


def operator_certificate(record: CertificateRecord) -> controller_pb2.OperatorCertificate:
    message = controller_pb2.OperatorCertificate(
        name=record.name,
        role=str(record.role),
        serial=record.serial,
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at),
        created_by=record.created_by,
    )
    if record.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(record.revoked_at))
    return message


def user(record: UserRecord) -> controller_pb2.ConsoleUser:
    message = controller_pb2.ConsoleUser(
        name=record.name,
        role=str(record.role),
        created_at=timestamp(record.created_at),
        created_by=record.created_by,
    )
    if record.last_login_at is not None:
        message.last_login_at.CopyFrom(timestamp(record.last_login_at))
    return message
