"""The admins the notifier emails, kept by the controller.

An address is checked by ``hitless.addresses`` (the rule the notifier applies too) and stored
in its canonical form, so an address is refused here, with the reason, rather than failing
later at every email.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select

from controller_svc.db import Admin
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import addresses


def normalise(email: str) -> str:
    """The address as stored (``hitless.addresses.Address.text``); InvalidRequest, with
    the reason, when it is not one the notifier can mail."""
    try:
        return addresses.parse(email).text
    except addresses.InvalidAddress as exc:
        raise InvalidRequest(str(exc)) from exc


def _as_stored_before(email: str) -> str:
    """How an address was stored under the looser rule of earlier versions (trimmed, domain
    in lower case): such a row may fail the rule now and must still be removable."""
    local, _, domain = email.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


class Admins:
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def add(self, email: str, now: datetime) -> tuple[str, bool]:
        """Add an admin; True when new (adding one twice changes nothing). Raises
        InvalidRequest with the reason for an address the notifier could not mail."""
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
        """Remove an admin by any spelling of its address, or by the text of a row an earlier
        version stored under its looser rule; NotFound when there is none."""
        if "@" not in email:
            normalise(email)  # raises, saying why it is no address
        stored_before = _as_stored_before(email)
        try:
            address = normalise(email)
        except InvalidRequest:
            address = stored_before
        with self._sessions.write() as session:
            removed = session.scalars(
                delete(Admin)
                .where(Admin.email.in_({address, stored_before}))
                .returning(Admin.email)
            ).all()
        if not removed:
            raise NotFound(
                f"{address[:254]} is not an admin; `upgradectl admins list` shows who is"
            )
        return address

    def list(self) -> list[str]:
        with self._sessions.read() as session:
            return list(session.scalars(select(Admin.email).order_by(Admin.email)))
