"""Upgrade jobs published by admins to the ``hitless.jobs`` exchange (e.g. from the
RabbitMQ management UI), validated strictly and run exactly like the CLI's.

A job runs only when its ``user_id`` property is set and names a broker user an admin
allowed (``upgradectl jobs allow-publisher USER``; ``controller_svc.publishers``): RabbitMQ
refuses a ``user_id`` that is not the publishing connection's user, so the property says
who published. Who published is checked before anything else, so a user not allowed learns
nothing from the reason but how to be allowed.

The message_id property is the idempotency key: the same job published twice runs once.
A refused job is kept (``upgradectl jobs rejected``), announced to the admins, and
dead-lettered with the reason in a header and its body untouched.
"""

from __future__ import annotations

import hashlib
import shlex
import uuid
from collections.abc import Callable
from datetime import datetime

from controller_svc import convert
from controller_svc.access import Audit
from controller_svc.engine import Engine
from controller_svc.errors import FailedPrecondition, InvalidRequest, NotFound
from controller_svc.publishers import Publishers
from controller_svc.rejections import Rejection, Rejections
from hitless import logs, names, semver
from hitless.bus import codec
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.errors import ConfigError, DecodeError, InvalidName
from hitless.v1 import bus_pb2

log = logs.get(__name__)

ACTIONS = ("upgrade",)
# A refused job's body is kept up to this many bytes (the dead-letter queue has it whole).
MAX_BODY_BYTES = 64 * 1024
# Message ids and user ids are kept in 128-character columns.
_COLUMN_CHARS = 128


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ManagementJobs:
    def __init__(
        self,
        engine: Engine,
        rejections: Rejections,
        clock: Callable[[], datetime],
        audit: Audit | None = None,
        publishers: Publishers | None = None,
    ) -> None:
        self._engine = engine
        self._rejections = rejections
        self._clock = clock
        self._audit = audit
        # The allowed publishers: by default those in the engine's database.
        self._publishers = publishers or Publishers(engine.repo.sessions)

    def handle(self, delivery: Delivery) -> None:
        """Consumer handler for hitless.controller.jobs."""
        try:
            self._run(delivery)
        except _Refused as refused:
            self._reject(delivery, refused.reason)
            raise DeadLetter(refused.reason) from None

    def _run(self, delivery: Delivery) -> None:
        self._check_publisher(delivery.user_id)
        if not delivery.message_id:
            raise _Refused(
                "the message has no message_id property: set one (in the management UI: "
                "Properties, message_id) so that a job published twice runs once"
            )
        try:
            names.message_id(delivery.message_id)
        except InvalidName as exc:
            raise _Refused(str(exc)) from exc
        try:
            job = codec.decode(bus_pb2.ManagementJob, delivery.body)
        except DecodeError as exc:
            raise _Refused(f"not a valid job: {exc}") from exc
        if job.action not in ACTIONS:
            raise _Refused(f'unknown action {job.action!r}: the only action is "upgrade"')
        if job.target and job.version:
            raise _Refused('give either "target": "latest" or a "version", not both')
        if job.target not in ("", "latest"):
            raise _Refused(f'unknown target {job.target!r}: use "latest", or name a "version"')
        if not job.target and not job.version:
            raise _Refused('say which release: "target": "latest" or "version": "X.Y.Z"')
        try:
            version = str(semver.parse(job.version)) if job.version else None
            record = self._engine.start_upgrade(
                version=version,
                gateway_ids=list(job.gateways),
                request_id=f"management:{delivery.message_id}",
                source="management",
                requested_by=delivery.user_id or "",
                allow_downgrade=job.allow_downgrade,
                accept_vpn_disruption=job.accept_vpn_disruption,
                rollout=convert.rollout_of(job),
                precheck=not job.skip_prechecks,
                force=job.force,
            )
        except (ConfigError, NotFound, FailedPrecondition, InvalidRequest) as exc:
            raise _Refused(str(exc)) from exc
        log.info(
            "management_job_accepted",
            job_id=record.id,
            message_id=delivery.message_id,
            user=delivery.user_id,
        )
        self._record(delivery, f"OK: job {record.id}")

    def _check_publisher(self, user_id: str | None) -> None:
        """Refuse a job whose publisher the broker did not vouch for, or one not allowed."""
        if not user_id:
            raise _Refused(
                "the message has no user_id property, so nothing says who published it: "
                "publish as a broker user an admin allowed (`upgradectl jobs allow-publisher "
                "USER`) and set user_id to that user (in the management UI: Properties, "
                "user_id)"
            )
        if not self._publishers.is_allowed(user_id):
            raise _Refused(
                f"broker user {names.shown(user_id, 64)} may not publish management jobs: an "
                "admin allows it with `upgradectl jobs allow-publisher "
                f"{shlex.quote(user_id[:255])}`"
            )

    def _record(self, delivery: Delivery, outcome: str) -> None:
        """The audit row of a management job, accepted or rejected, as its publisher's."""
        if self._audit is None:
            return
        body = delivery.body[:300].decode("utf-8", errors="replace")
        self._audit.record(
            self._clock(), f"broker:{delivery.user_id or 'unknown'}", "ManagementJob",
            f"message_id={(delivery.message_id or '')[:100]!r} {body}", outcome,
        )  # fmt: skip

    def _reject(self, delivery: Delivery, reason: str) -> None:
        rejection = Rejection(
            message_id=_record_key(delivery.message_id),
            reason=reason,
            body=delivery.body[:MAX_BODY_BYTES].decode("utf-8", errors="replace"),
            user_id=(delivery.user_id or "")[:_COLUMN_CHARS],
            at=self._clock(),
        )
        if self._rejections.record(rejection):
            self._engine.announcer.job_rejected(rejection)
            self._record(delivery, f"REJECTED: {reason}")
        log.warning("management_job_rejected", message_id=delivery.message_id, reason=reason)


def _record_key(message_id: str | None) -> str:
    """The key a refused job is recorded under: its message_id, one made up when it has
    none, and for one too long for the column its start and a digest of the whole (AMQP
    allows 255 bytes), so two long ids never share a record."""
    if not message_id:
        return f"no-id:{uuid.uuid4()}"
    if len(message_id) <= _COLUMN_CHARS:
        return message_id
    digest = hashlib.sha256(message_id.encode("utf-8", errors="replace")).hexdigest()
    return f"{message_id[:60]}...sha256:{digest[:32]}"
