"""``Sessions.rows``: the API's lists read in one step of SQLite, the same rows as a plain
query, in the asked order; on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import event, select

from controller_svc.db import Gateway, make_engine
from controller_svc.records import GATEWAY_COLUMNS
from controller_svc.repository import Repository
from controller_svc.sessions import Sessions


def _fill(sessions: Sessions, count: int) -> None:
    """``count`` gateways inserted in shuffled order, with every kind of value the
    columns hold: NULLs, non-ASCII text, JSON lists, booleans, microseconds, ints beyond 16 bits."""
    at = datetime(2026, 12, 2, 7, 30, 1, 123456, tzinfo=UTC)
    order = list(range(count))
    random.Random(7).shuffle(order)
    with sessions.write() as session:
        for n in order:
            session.add(
                Gateway(
                    id=f"gw-{n:04d}",
                    version=f"1.{n % 7}.0",
                    first_seen=at - timedelta(days=n, microseconds=n),
                    last_seen=at + timedelta(seconds=n),
                    pid=None if n % 3 == 0 else 2**30 + n,
                    listen=[] if n % 2 else [f"udp://10.0.0.{n % 250}:51820", "tcp://é:1"],
                    vpn_sessions=n,
                    heartbeat_interval_ms=None if n % 5 == 0 else 5000,
                    ha_peer=None if n % 4 else f'peer «{n}» "quoted" \\ back',
                    prechecks=bool(n % 2),
                    stopped=n % 11 == 0,
                )
            )


def test_rows_are_those_of_a_plain_query_in_the_asked_order(sessions: Sessions) -> None:
    """Every value comes back as the plain query gives it (types included), in the
    order asked, ascending and descending, with and without a limit."""
    _fill(sessions, 300)
    stmt = select(*GATEWAY_COLUMNS)
    with sessions.read() as session:
        for order in (Gateway.id, Gateway.id.desc(), Gateway.last_seen.desc()):
            plain = [tuple(row) for row in session.execute(stmt.order_by(order)).all()]
            got = sessions.rows(session, stmt, order)
            assert got == plain
            assert [type(v) for row in got for v in row] == [type(v) for row in plain for v in row]
        limited = stmt.where(Gateway.id > "gw-0100").limit(51)
        plain = [tuple(r) for r in session.execute(limited.order_by(Gateway.id)).all()]
        assert sessions.rows(session, limited, Gateway.id) == plain
        assert plain[0][0] == "gw-0101" and len(plain) == 51
        assert sessions.rows(session, stmt.where(Gateway.id == "none"), Gateway.id) == []


def test_a_page_of_gateways_is_one_row_from_sqlite(sessions: Sessions, db_url: str) -> None:
    """On SQLite a page of 1,000 gateways reaches the driver as one row, so the
    controller's thread steps the database once, not once per gateway (each step gives
    up the GIL and waits to win it back); PostgreSQL's driver gets its rows whole."""
    _fill(sessions, 1000)
    engine = make_engine(db_url)
    statements: list[tuple[str, object]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "FROM gateways" in statement:
            statements.append((statement, parameters))

    repo = Repository(engine)
    try:
        page, more = repo.gateways_page(None, 1000)
        assert [g.id for g in page] == [f"gw-{n:04d}" for n in range(1000)]
        assert not more
        assert len(statements) == 1
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(*statements[0]).all()  # type: ignore[arg-type]
        assert len(rows) == (1 if engine.dialect.name == "sqlite" else 1000)
    finally:
        engine.dispose()
