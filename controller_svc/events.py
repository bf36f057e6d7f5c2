"""What the controller tells the notifier: one ``hitless.v1.Event`` per happening, with
the admins to tell as they are now, and an id that makes the email go out once."""

from __future__ import annotations

from datetime import UTC, datetime

from controller_svc import convert
from controller_svc.admins import Admins
from controller_svc.records import JobRecord, ReleaseRecord
from controller_svc.rejections import Rejection
from hitless import logs
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.errors import BusError
from hitless.v1 import bus_pb2

log = logs.get(__name__)


class Announcer:
    def __init__(self, publisher: Publisher, admins: Admins) -> None:
        self._publisher = publisher
        self._admins = admins

    def release_published(self, release: ReleaseRecord) -> None:
        event = self._event(f"release:{release.version}")
        event.release_published.CopyFrom(convert.release(release))
        self._send(topology.RELEASE_PUBLISHED, event)

    def job_finished(self, job: JobRecord) -> None:
        event = self._event(f"job:{job.id}")
        event.job_finished.CopyFrom(convert.job(job))
        self._send(topology.JOB_FINISHED, event)

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

    def _event(self, event_id: str) -> bus_pb2.Event:
        return bus_pb2.Event(
            event_id=event_id,
            at=convert.timestamp(datetime.now(UTC)),
            admins=self._admins.list(),
        )

    def _send(self, key: str, event: bus_pb2.Event) -> None:
        # Best effort after the state is committed: the state stays right if this fails,
        # and the log says which event the admins missed.
        try:
            self._publisher.publish(topology.EVENTS, key, event, message_id=event.event_id)
        except BusError as exc:
            log.warning("event_not_published", key=key, event_id=event.event_id, error=str(exc))
