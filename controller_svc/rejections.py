"""Management jobs the controller refused, kept for `upgradectl jobs rejected`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from controller_svc.db import RejectedJob
from controller_svc.sessions import Sessions


@dataclass(frozen=True)
class Rejection:
    message_id: str
    reason: str
    body: str
    user_id: str
    at: datetime


class Rejections:
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def record(self, rejection: Rejection) -> bool:
        """Keep a rejection; True when new (a redelivered message is kept once)."""
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(RejectedJob)
                .values(**rejection.__dict__)
                .on_conflict_do_nothing(index_elements=[RejectedJob.message_id])
                .returning(RejectedJob.message_id)
            )
            return session.execute(stmt).scalar_one_or_none() is not None

    def list(self, limit: int = 100) -> list[Rejection]:
        """Newest first."""
        with self._sessions.read() as session:
            rows = session.scalars(
                select(RejectedJob).order_by(RejectedJob.at.desc()).limit(limit)
            ).all()
            return [Rejection(r.message_id, r.reason, r.body, r.user_id, r.at) for r in rows]
