"""The database layer on real SQLite files and real PostgreSQL: engine settings, UTC
timestamps, migrations that match the models, and concurrent migrate running once."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from controller_svc.db import (
    Base,
    Gateway,
    Release,
    SeenMessage,
    alembic_config,
    make_engine,
    migrate,
)
from controller_svc.errors import StorageError
from controller_svc.sessions import Sessions
from tests.support.wait import wait_for

TABLES = {
    "releases",
    "gateways",
    "jobs",
    "job_gateways",
    "job_events",
    "seen_messages",
    "admins",
    "rejected_jobs",
}
HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def test_migrate_creates_the_schema_once(engine: Engine) -> None:
    assert _revision(engine) is None
    assert migrate(engine) is True
    assert set(inspect(engine).get_table_names()) >= TABLES
    assert _revision(engine) == HEAD
    assert migrate(engine) is False
    assert _revision(engine) == HEAD


def test_models_and_migrations_agree(engine: Engine) -> None:
    migrate(engine)
    # Alembic reads SQLite's '' defaults back as text it cannot compare: defaults are
    # checked on PostgreSQL, everything else on both.
    defaults = engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": defaults}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations differ; add a revision for: {diff}"


def test_migrate_leaves_a_newer_schema_alone(engine: Engine) -> None:
    migrate(engine)
    # What a newer controller leaves behind: a revision this code does not know.
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    assert migrate(engine) is False
    assert _revision(engine) == "9999"


def test_timestamps_come_back_tz_aware_utc(engine: Engine) -> None:
    migrate(engine)
    local = datetime(2030, 5, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    with Session(engine) as session, session.begin():
        session.add(Release(version="1.0.0", sha256="a" * 64, size=1, notes="", published_at=local))
    with Session(engine) as session:
        stored = session.scalars(select(Release.published_at)).one()
    assert stored == local
    assert stored.tzinfo is UTC
    assert stored.hour == 12


def test_naive_timestamps_are_refused(engine: Engine) -> None:
    migrate(engine)
    naive = datetime(2030, 5, 1, 14, 30)
    with Session(engine) as session, session.begin(), pytest.raises(Exception, match="naive"):
        session.add(Release(version="1.0.0", sha256="a" * 64, size=1, notes="", published_at=naive))
        session.flush()


def test_rows_inserted_in_bulk_are_stored_as_given_and_bad_ones_write_nothing(
    engine: Engine,
) -> None:
    # Sessions.insert_rows: COPY on PostgreSQL, executemany on SQLite.
    migrate(engine)
    sessions = Sessions(engine)
    local = timezone(timedelta(hours=-5))
    rows = [
        {"message_id": f"m-{n}", "at": datetime(2030, 1, 1, 7, 0, n, tzinfo=local)}
        for n in range(50)
    ]
    with sessions.write() as session:
        sessions.insert_rows(session, SeenMessage, rows)

    def stored() -> dict[str, datetime]:
        with sessions.read() as session:
            result = session.execute(select(SeenMessage.message_id, SeenMessage.at))
            return {message_id: at for message_id, at in result}

    before = stored()
    assert before == {row["message_id"]: row["at"] for row in rows}
    assert {at.tzinfo for at in before.values()} == {UTC}
    naive = datetime(2030, 1, 1, 12, 0)
    refused: list[list[dict[str, object]]] = [
        [{"message_id": "m-new", "at": naive}],
        [{"message_id": "m-new", "at": datetime.now(UTC)}, rows[3]],  # a duplicate key
    ]
    for bad in refused:
        with (
            pytest.raises(StorageError, match="database operation failed"),
            sessions.write() as session,
        ):
            sessions.insert_rows(session, SeenMessage, bad)
        assert stored() == before
    # A JSON column would be stored otherwise by COPY than by an INSERT: refused on both.
    with pytest.raises(TypeError, match="JSON column listen"), sessions.write() as session:
        sessions.insert_rows(
            session, Gateway, [{"id": "gw-1", "version": "1.0.0", "listen": ["127.0.0.1:1"]}]
        )


def test_concurrent_migrate_in_threads_runs_once(db_url: str) -> None:
    engines = [make_engine(db_url), make_engine(db_url)]
    start = threading.Barrier(2, timeout=30)
    results: list[bool | Exception] = []

    def run(engine: Engine) -> None:
        start.wait()
        try:
            results.append(migrate(engine))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(engine,)) for engine in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(results, key=str) == [False, True], f"migrate results: {results}"
        assert _revision(engines[0]) == HEAD
    finally:
        for engine in engines:
            engine.dispose()


_MIGRATE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from controller_svc.db import make_engine, migrate
go, url = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
deadline = time.monotonic() + 30
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.005)
engine = make_engine(url)
try:
    print(migrate(engine), flush=True)
finally:
    engine.dispose()
"""


def test_concurrent_migrate_in_processes_runs_once(db_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_WHEN_TOLD, str(go), db_url],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for (_, err), process in zip(outputs, processes, strict=True):
        assert process.returncode == 0, f"migrate failed in a process: {err}"
    assert sorted(out.strip() for out, _ in outputs) == ["False", "True"], outputs
    engine = make_engine(db_url)
    try:
        assert _revision(engine) == HEAD
    finally:
        engine.dispose()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        wait_for(path.exists, timeout=5, what=f"the database file {path}")
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqlite://", "must be a file"),
        ("sqlite:///:memory:", "must be a file"),
        ("mysql://root@localhost/x", "unsupported database"),
        ("not a url", "invalid database URL"),
    ],
)
def test_make_engine_refuses_what_it_cannot_serve(url: str, complaint: str) -> None:
    with pytest.raises(StorageError, match=complaint):
        make_engine(url)


def test_migrations_ship_as_package_data() -> None:
    root = resources.files("migrations")
    assert root.joinpath("env.py").is_file()
    assert root.joinpath("script.py.mako").is_file()
    assert root.joinpath("versions", "0001_initial.py").is_file()


def test_migrations_are_expand_only(db_url: str) -> None:
    """Code of the first schema keeps working on the newest: writes that name only the
    first revision's columns still succeed."""
    url = db_url
    engine = make_engine(url)
    try:
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        migrate(engine)
        now = datetime.now(UTC)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO releases (version, sha256, size, notes, published_at) "
                    "VALUES ('1.0.0', :sha, 1, '', :now)"
                ),
                {"sha": "a" * 64, "now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO gateways (id, version, first_seen, last_seen, listen) "
                    "VALUES ('gw-1', '1.0.0', :now, :now, '[]')"
                ),
                {"now": now},
            )
        with Session(engine) as session:
            release = session.get(Release, "1.0.0")
            assert release is not None and release.restarts_vpn_service is False
    finally:
        engine.dispose()
