"""Database sessions for the controller's stores: one transaction per call, the right
isolation for each database, and SQLAlchemy errors translated at this boundary."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import JSON, ColumnElement, Engine, Select, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import QueryableAttribute, Session

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

    def insert_rows(
        self, session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert ``rows`` (mappings of column name to value, each naming the same columns)
        into ``model``'s table, in ``session``'s transaction, for the hot paths that write
        hundreds of rows at once (a batch of reports).

        On PostgreSQL the rows go in one ``COPY ... FROM STDIN`` (psycopg's
        ``Cursor.copy``, https://www.psycopg.org/psycopg3/docs/basic/copy.html): no SQL
        text per row or per page to build and parse, which an INSERT of many rows costs on
        the client. Elsewhere, one executemany. Either way each value goes through its
        column type's bind processing for this database first (``UTCDateTime`` refuses a
        naive datetime), and columns not named take their server defaults. For plain
        columns only: a JSON column, or one left out that has a Python-side default,
        raises TypeError (COPY would store them otherwise than an INSERT). Raises
        StorageError when the database or a column type refuses a row (a duplicate key, a
        naive datetime); the caller's transaction then rolls back whole.
        """
        if not rows:
            return
        columns = model.__table__.c
        names = list(rows[0])
        for column in columns:
            if column.name in names and isinstance(column.type, JSON):
                raise TypeError(f"insert_rows cannot write the JSON column {column.name}")
            if column.name not in names and column.default is not None:
                raise TypeError(f"insert_rows would leave out the default of {column.name}")
        if self.dialect != "postgresql":
            session.connection().execute(insert(model), list(rows))
            return
        dialect = session.get_bind().dialect
        processors = [
            columns[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        ]
        try:
            values = [
                [
                    value if process is None else process(value)
                    for value, process in zip(
                        (row[name] for name in names), processors, strict=True
                    )
                ]
                for row in rows
            ]
        except (ValueError, TypeError, AttributeError) as exc:
            # A column type refused a value, as SQLAlchemy's StatementError says on the
            # executemany path.
            raise storage_error(exc) from exc
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(model.__tablename__), sql.SQL(", ").join(map(sql.Identifier, names))
        )
        driver = session.connection().connection.driver_connection
        assert driver is not None, "a connection in a transaction has its driver's"
        try:
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                for row_values in values:
                    copy.write_row(row_values)
        except psycopg.Error as exc:
            raise storage_error(exc) from exc

    def rows(
        self,
        session: Session,
        stmt: Select[*tuple[Any, ...]],
        *order_by: ColumnElement[Any] | QueryableAttribute[Any],
    ) -> list[tuple[Any, ...]]:
        """Every row of ``stmt.order_by(*order_by)``, as tuples in that order, for the
        API's lists (a page of up to 1,000 gateways).

        On SQLite the rows come in one step of the database: one row holding them all as
        JSON (``json_group_array``, https://sqlite.org/json1.html), each row numbered by
        ``row_number()`` in the wanted order (SQLite before 3.44 does not keep an order
        inside an aggregate) and each value then taken through its column type's result
        processing, as SQLAlchemy does for a row. Python's sqlite3 releases the GIL for
        every row it steps and must win it back after each: while another thread of the
        controller computes (a batch of reports), every row then waits up to a switch
        interval (5 ms): beside one thread computing in a loop, sqlite3 took 230 ms to
        fetch 1,000 gateway rows, 6 ms to fetch them as one row of JSON. For text,
        integers and NULL (SQLite's JSON writes a REAL with 15 significant digits and
        cannot hold a BLOB). Elsewhere (PostgreSQL's driver receives a result whole) a
        plain query."""
        ordered = stmt.order_by(*order_by)
        if self.dialect != "sqlite":
            return [tuple(row) for row in session.execute(ordered).all()]
        numbered = ordered.add_columns(
            func.row_number().over(order_by=order_by).label("row_number")
        ).subquery()
        *columns, number = numbered.c
        text = session.execute(
            select(func.json_group_array(func.json_array(number, *columns)))
        ).scalar_one()
        dialect = session.get_bind().dialect
        processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in stmt.selected_columns
        ]
        decoded = sorted(json.loads(text), key=itemgetter(0))
        return [
            tuple(
                value if process is None else process(value)
                for value, process in zip(row[1:], processors, strict=True)
            )
            for row in decoded
        ]


def storage_error(exc: Exception) -> StorageError:
    detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return StorageError(
        f"database operation failed: {detail}; "
        "check the database is reachable and not full, then retry"
    )
