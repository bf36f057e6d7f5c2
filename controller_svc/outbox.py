"""Events for the notifier are written here first and published from here, so an event
raised while the broker is away goes out once it is back. An event announcing a state
change (a job finished) is written by ``stage`` in the same transaction as the change, so
a crash between the commit and the publish cannot lose it: ``pending`` finds it. Publishing
an event twice is harmless: the notifier mails once per (event id, admin)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller_svc.db import OutboxEvent
from controller_svc.sessions import Sessions

# Events this fresh are still being published by the call that wrote them.
SETTLE = timedelta(seconds=5)


@dataclass(frozen=True)
class OutboxEntry:
    """One event as it is kept: its id (the notifier's de-duplication key), the routing key
    on the events exchange, and the encoded ``hitless.v1.Event``."""

    event_id: str
    routing_key: str
    body: bytes


def stage(session: Session, insert: Any, entry: OutboxEntry, now: datetime) -> None:
    """Write ``entry`` in the caller's transaction, so it commits (or not) with the change
    it announces. ``insert`` is ``Sessions.insert`` (the dialect's ON CONFLICT); the same
    event id twice is kept once."""
    session.execute(
        insert(OutboxEvent)
        .values(
            event_id=entry.event_id, routing_key=entry.routing_key, body=entry.body, created_at=now
        )
        .on_conflict_do_nothing(index_elements=[OutboxEvent.event_id])
    )


class Outbox:
    def __init__(self, sessions: Sessions, settle: timedelta = SETTLE) -> None:
        self._sessions = sessions
        self._settle = settle

    def add(self, event_id: str, routing_key: str, body: bytes, now: datetime) -> None:
        """Keep an event until it is published (the same event id twice is kept once)."""
        with self._sessions.write() as session:
            stage(session, self._sessions.insert, OutboxEntry(event_id, routing_key, body), now)

    def published(self, event_id: str, now: datetime) -> None:
        with self._sessions.write() as session:
            session.execute(
                update(OutboxEvent).where(OutboxEvent.event_id == event_id).values(published_at=now)
            )

    def pending(self, now: datetime, limit: int = 100) -> list[tuple[str, str, bytes]]:
        """Events not yet published, oldest first, as (event id, routing key, body)."""
        with self._sessions.read() as session:
            rows = session.execute(
                select(OutboxEvent.event_id, OutboxEvent.routing_key, OutboxEvent.body)
                .where(
                    OutboxEvent.published_at.is_(None), OutboxEvent.created_at <= now - self._settle
                )
                .order_by(OutboxEvent.created_at)
                .limit(limit)
            ).all()
        return [(r.event_id, r.routing_key, r.body) for r in rows]
