"""The admins the notifier emails, kept by the controller."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import delete, select

from controller_svc.db import Admin
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.sessions import Sessions

# Deliberately simple: one @, no spaces, a dot in the domain. The SMTP server has the
# final word on whether a mailbox exists.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalise(email: str) -> str:
    """The address as stored (domain lowercased); InvalidRequest when it is not one."""
    text = email.strip()
    if len(text) > 254 or not _EMAIL.match(text):
        raise InvalidRequest(f"invalid email address {email!r}: expected e.g. ops@example.com")
    local, domain = text.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


class Admins:
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def add(self, email: str, now: datetime) -> tuple[str, bool]:
        """Add an admin; True when new (adding one twice changes nothing)."""
        address = normalise(email)
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(Admin)
                .values(email=address, added_at=now)
                .on_conflict_do_nothing(index_elements=[Admin.email])
                .returning(Admin.email)
            )
            created = session.execute(stmt).scalar_one_or_none() is not None
        return address, created

    def remove(self, email: str) -> str:
        address = normalise(email)
        with self._sessions.write() as session:
            removed = session.execute(
                delete(Admin).where(Admin.email == address).returning(Admin.email)
            ).first()
        if removed is None:
            raise NotFound(f"{address} is not an admin; `upgradectl admins list` shows who is")
        return address

    def list(self) -> list[str]:
        with self._sessions.read() as session:
            return list(session.scalars(select(Admin.email).order_by(Admin.email)))
