"""Database sessions for the controller's stores: one transaction per call, the right
isolation for each database, and SQLAlchemy errors translated at this boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from controller_svc.db import SQLITE_BEGIN, Base
from controller_svc.errors import StorageError


class Sessions:
    """Thread-safe: every ``write()``/``read()`` opens a session of its own."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect.name
        writer, reader = engine, engine
        if self.dialect == "sqlite":
            # Take the write lock at BEGIN: a read-then-write transaction cannot then fail
            # to upgrade its lock when another writer got in between.
            writer = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        elif self.dialect == "postgresql":
            # A record is read in several statements (a job, then its gateways): one snapshot.
            reader = engine.execution_options(isolation_level="REPEATABLE READ")
        self._writer = writer
        self._reader = reader

    @contextmanager
    def write(self) -> Iterator[Session]:
        try:
            with Session(self._writer, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise storage_error(exc) from exc

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with Session(self._reader) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise storage_error(exc) from exc

    def insert(self, model: type[Base]) -> Any:
        """An INSERT that can say ON CONFLICT DO NOTHING, in this database's dialect."""
        if self.dialect == "postgresql":
            return postgresql.insert(model)
        return sqlite.insert(model)


def storage_error(exc: SQLAlchemyError) -> StorageError:
    detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return StorageError(
        f"database operation failed: {detail}; "
        "check the database is reachable and not full, then retry"
    )
