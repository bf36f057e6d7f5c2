"""What the controller tells the notifier: one ``hitless.v1.Event`` per happening, with
the admins to tell as they are now, and an id that makes the email go out once. Every
event goes through the outbox, so none is lost while the broker is away; the one announcing
a job's end is written in the transaction that ended it (``job_finished``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from controller_svc import convert
from controller_svc.admins import Admins
from controller_svc.outbox import Outbox, OutboxEntry
from controller_svc.records import JobRecord, ReleaseRecord
from controller_svc.rejections import Rejection
from hitless import logs
from hitless.bus import codec, topology
from hitless.bus.amqp import Publisher
from hitless.errors import BusError
from hitless.v1 import bus_pb2

log = logs.get(__name__)

# Short: the caller (an RPC, the sweeper) must not hang while the broker is away; the
# outbox keeps the event and flush() tries again.
PUBLISH_TIMEOUT_S = 2.0


class Announcer:
    def __init__(self, publisher: Publisher, admins: Admins, outbox: Outbox) -> None:
        self._publisher = publisher
        self._admins = admins
        self._outbox = outbox

    def release_published(self, release: ReleaseRecord) -> None:
        event = self._event(f"release:{release.version}")
        event.release_published.CopyFrom(convert.release(release))
        self._send(topology.RELEASE_PUBLISHED, event)

    def job_finished(self, job: JobRecord) -> OutboxEntry:
        """The event announcing that ``job`` ended, for the caller to write in the
        transaction that ended it (``outbox.stage``) and to ``publish`` once committed."""
        event = self._event(f"job:{job.id}")
        event.job_finished.CopyFrom(convert.job(job))
        return OutboxEntry(event.event_id, topology.JOB_FINISHED, codec.encode(event))

    def keep(self, entries: Sequence[OutboxEntry]) -> None:
        """Write events to the outbox in a transaction of their own, for a change whose
        own transaction did not write them."""
        now = datetime.now(UTC)
        for entry in entries:
            self._outbox.add(entry.event_id, entry.routing_key, entry.body, now)

    def publish(self, entries: Sequence[OutboxEntry]) -> None:
        """Publish events already in the outbox; one the broker does not confirm stays
        there for ``flush``."""
        for entry in entries:
            self._publish(entry.event_id, entry.routing_key, entry.body)

    def job_rejected(self, rejection: Rejection) -> None:
        event = self._event(f"rejected:{rejection.message_id}")
        event.job_rejected.CopyFrom(
            bus_pb2.JobRejected(
                message_id=rejection.message_id,
                reason=rejection.reason,
                body=rejection.body,
                user_id=rejection.user_id,
                at=convert.timestamp(rejection.at),
            )
        )
        self._send(topology.JOB_REJECTED, event)

    def command_refused(self, refused: bus_pb2.CommandRefused) -> None:
        """A gateway refused a command it must not run: a security event for the admins."""
        event = self._event(f"refused:{refused.report_id}")
        event.command_refused.CopyFrom(refused)
        self._send(topology.COMMAND_REFUSED, event)

    def _event(self, event_id: str) -> bus_pb2.Event:
        return bus_pb2.Event(
            event_id=event_id,
            at=convert.timestamp(datetime.now(UTC)),
            admins=self._admins.list(),
        )

    def _send(self, key: str, event: bus_pb2.Event) -> None:
        body = codec.encode(event)
        self._outbox.add(event.event_id, key, body, datetime.now(UTC))
        self._publish(event.event_id, key, body)

    def flush(self) -> None:
        """Publish what the broker did not confirm before (called periodically)."""
        for event_id, key, body in self._outbox.pending(datetime.now(UTC)):
            if not self._publish(event_id, key, body):
                return

    def _publish(self, event_id: str, key: str, body: bytes) -> bool:
        try:
            self._publisher.publish(
                topology.EVENTS, key, body, message_id=event_id, timeout=PUBLISH_TIMEOUT_S
            )
        except BusError as exc:
            # Kept in the outbox: flush() sends it once the broker is back.
            log.warning("event_not_published_yet", key=key, event_id=event_id, error=str(exc))
            return False
        self._outbox.published(event_id, datetime.now(UTC))
        return True
