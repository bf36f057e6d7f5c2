"""The broker users an admin allowed to publish management jobs.

The controller believes who published a job only because the broker vouches for it:
RabbitMQ refuses a message whose ``user_id`` property is not the user of the connection
that publishes it ("Validated User-ID", https://www.rabbitmq.com/docs/validated-user-id),
except from a user tagged ``impersonator``, which no job publisher should be. So a job is
run only when its ``user_id`` is set and names a user on this list
(``controller_svc.jobs``); the list changes through the admin's API
(``upgradectl jobs allow-publisher USER``, ``disallow-publisher``, ``publishers``).

A user name is compared exactly as the broker sends it. RabbitMQ takes any UTF-8 text as a
user name, but a message carries ``user_id`` as an AMQP 0-9-1 short string (at most 255
bytes, spec §4.2.5.3), so no longer name can ever match; control characters and spaces at
either end, and invisible (format) characters, which RabbitMQ allows, are refused as well:
they are typing mistakes far more often than names, and a name that looks like another in
a listing would allow someone other than the user the admin saw.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from controller_svc.db import JobPublisher
from controller_svc.errors import Conflict, InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import names

MAX_USER_BYTES = 255  # AMQP 0-9-1 shortstr, the user_id property's type
# How many allowed users a NotFound names before "and N more".
LISTED = 20


@dataclass(frozen=True)
class PublisherRecord:
    user: str
    allowed_at: datetime
    allowed_by: str  # the actor who allowed it ("token:NAME", ...)


def broker_user(text: str) -> str:
    """Return ``text`` if it can be a publisher's broker user name, else raise
    InvalidRequest saying why: 1 to 255 bytes of UTF-8 (the user_id property is an AMQP
    short string), no control or format characters, no spaces at either end."""
    if not text:
        raise InvalidRequest(
            "no broker user given: name the RabbitMQ user that publishes the jobs "
            "(as `rabbitmqctl list_users` shows it)"
        )
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_USER_BYTES:
        raise InvalidRequest(
            f"invalid broker user {names.shown(text)}: {size} bytes of UTF-8, and a message's "
            f"user_id carries at most {MAX_USER_BYTES}, so no job could ever match it"
        )
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in text):
        raise InvalidRequest(
            f"invalid broker user {names.shown(text)}: it holds control or invisible "
            "characters; type the name as `rabbitmqctl list_users` shows it"
        )
    if text != text.strip():
        raise InvalidRequest(
            f"invalid broker user {names.shown(text)}: it starts or ends with a space; "
            "give the name without them"
        )
    return text


class Publishers:
    """The allowed publishers. Thread-safe: each call has its own session."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def allow(self, user: str, now: datetime, allowed_by: str) -> tuple[PublisherRecord, bool]:
        """Allow ``user`` to publish management jobs; the record and True when new (allowing
        twice changes nothing and keeps the first record). Raises InvalidRequest for a name
        that ``broker_user`` refuses."""
        user = broker_user(user)
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(JobPublisher)
                .values(broker_user=user, allowed_at=now, allowed_by=allowed_by[:128])
                .on_conflict_do_nothing(index_elements=[JobPublisher.broker_user])
                .returning(JobPublisher.broker_user)
            )
            if session.execute(stmt).scalar_one_or_none() is not None:
                return PublisherRecord(user, now, allowed_by[:128]), True
            row = session.get(JobPublisher, user)
        if row is None:
            raise Conflict(
                f"broker user {names.shown(user, 64)} was disallowed while this call allowed "
                "it: allow it again"
            )
        return _record(row), False

    def disallow(self, user: str) -> PublisherRecord:
        """Stop allowing ``user``: its next job is refused. The record removed; NotFound,
        naming the users that are allowed, when it was not."""
        user = broker_user(user)
        with self._sessions.write() as session:
            row = session.get(JobPublisher, user)
            if row is not None:
                session.execute(delete(JobPublisher).where(JobPublisher.broker_user == user))
                return _record(row)
        allowed = [p.user for p in self.list()]
        if not allowed:
            listing = "no broker user is allowed"
        else:
            shown = ", ".join(names.shown(u, 64) for u in allowed[:LISTED])
            more = f" and {len(allowed) - LISTED} more" if len(allowed) > LISTED else ""
            listing = f"the allowed ones are {shown}{more}"
        raise NotFound(
            f"broker user {names.shown(user, 64)} is not an allowed publisher ({listing}); "
            "`upgradectl jobs publishers` lists them"
        )

    def list(self) -> list[PublisherRecord]:
        """Every allowed publisher, by user name."""
        with self._sessions.read() as session:
            rows = session.scalars(select(JobPublisher).order_by(JobPublisher.broker_user))
            return [_record(r) for r in rows.all()]

    def is_allowed(self, user: str | None) -> bool:
        """Whether ``user`` (a message's broker-validated user_id; None when it has none)
        may publish management jobs."""
        if not user:
            return False
        with self._sessions.read() as session:
            return session.get(JobPublisher, user) is not None


def _record(row: JobPublisher) -> PublisherRecord:
    return PublisherRecord(row.broker_user, row.allowed_at, row.allowed_by)
