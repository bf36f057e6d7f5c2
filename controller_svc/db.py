"""The controller's database: engine setup, the schema as typed models, and migrations.

SQLite (one file, the default on one machine) and PostgreSQL (via psycopg 3) are both
first-class. The schema changes only through Alembic revisions in the top-level
``migrations`` package; :func:`migrate` applies them under a lock so that two controllers
starting together (the controller's own hitless upgrade) migrate exactly once.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import sqlite3
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    false,
    func,
    make_url,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

import migrations
from controller_svc.errors import StorageError

# How long a SQLite writer waits for another one before giving up. Generous: a migration
# or a long sweep may hold the write lock for a while, and giving up means a failed RPC.
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any fixed 64-bit number, shared by every controller version: the advisory lock key.
_PG_MIGRATION_LOCK = 0x6869746C657373  # "hitless"
# Execution option read by the "begin" hook below: which BEGIN a SQLite transaction uses.
SQLITE_BEGIN = "hitless_sqlite_begin"
# Alembic's ``context`` and ``op`` are module-level proxies, so two threads of one process
# must not run it at once, whatever the database lock says.
_ALEMBIC_IN_PROCESS = threading.Lock()


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back tz-aware in UTC.

    SQLite stores no zone, so values are converted to UTC on the way in and labelled UTC
    on the way out; PostgreSQL's ``timestamptz`` gets the same treatment for uniformity.
    Naive datetimes are refused: guessing their zone is how timestamps go wrong silently.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given: pass a tz-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Named constraints, so every database and every Alembic revision agree on the names and a
# later revision can drop or alter them by name.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Release(Base):
    __tablename__ = "releases"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    notes: Mapped[str] = mapped_column(Text, server_default="")
    published_at: Mapped[datetime] = mapped_column(UTCDateTime)
    restarts_vpn_service: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The lowest version it upgrades from; NULL: any (``planner.upgrade_path``).
    min_from: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Gateway(Base):
    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    pid: Mapped[int | None] = mapped_column(Integer)
    listen: Mapped[list[str]] = mapped_column(JSON)
    vpn_sessions: Mapped[int] = mapped_column(Integer, server_default="0")
    # The heartbeat interval its newest hello announced; NULL: none announced (a gateway
    # of an earlier release), so the default applies (``controller_svc.liveness``).
    heartbeat_interval_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The other gateway of its high-availability pair, as its newest hello named it.
    ha_peer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Whether its newest hello said it answers pre-checks (GatewayHello.features).
    prechecks: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Its last message said it stops (a heartbeat marked stopping): OFFLINE until it is
    # heard from again.
    stopped: Mapped[bool] = mapped_column(Boolean, server_default=false())


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    target_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), server_default="cli")
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    requested_by: Mapped[str] = mapped_column(String(128), server_default="")
    allow_downgrade: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The rollout asked for (controller_svc.rollout): "" and 0 are one wave, no cap, no
    # failure limit.
    waves: Mapped[str] = mapped_column(String(200), server_default="")
    max_parallel: Mapped[int] = mapped_column(Integer, server_default="0")
    max_failures: Mapped[str] = mapped_column(String(16), server_default="")
    # ABORTED or CANCELLED once decided, while gateways in flight finish; the job moves
    # to it when they have. NULL: the job ends by its gateways' outcome.
    ending: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Why it was paused, aborted or cancelled, and by whom.
    stop_reason: Mapped[str] = mapped_column(Text, server_default="")
    # When its gateways may start: not before, not after, and a weekly window.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    not_after: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    window: Mapped[str] = mapped_column(String(64), server_default="")
    # Each gateway's soak after its swap, seconds (0: none).
    soak_s: Mapped[int] = mapped_column(Integer, server_default="0")


class JobGateway(Base):
    __tablename__ = "job_gateways"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    gateway_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    command_id: Mapped[str] = mapped_column(String(36), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    from_version: Mapped[str] = mapped_column(String(64))
    to_version: Mapped[str] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(Text, server_default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, server_default="0")
    bytes_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    vpn_sessions_dropped: Mapped[int] = mapped_column(Integer, server_default="0")
    # When its command was confirmed by the broker; NULL until then.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Its wave in the job's rollout, 0 first.
    wave: Mapped[int] = mapped_column(Integer, server_default="0")
    # Its path through intermediate releases, comma-separated, the last the job's target;
    # "" when it goes straight there. ``hop`` indexes the release its command is for.
    path: Mapped[str] = mapped_column(Text, server_default="")
    hop: Mapped[int] = mapped_column(Integer, server_default="0")
    # Its data plane's health as its soak last reported it ("" before any).
    health: Mapped[str] = mapped_column(Text, server_default="")


class JobEvent(Base):
    """One row per change of a job or of a gateway in it; ``seq`` lets a stream resume."""

    __tablename__ = "job_events"
    # AUTOINCREMENT on SQLite so a seq is never reused after the newest row is deleted.
    __table_args__ = (
        Index("ix_job_events_job_id_seq", "job_id", "seq"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    gateway_id: Mapped[str | None] = mapped_column(String(64))
    gateway_state: Mapped[str | None] = mapped_column(String(16))
    job_state: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text, server_default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, server_default="0")
    bytes_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class SeenMessage(Base):
    """Ids of bus messages already applied, so a redelivered report changes nothing."""

    __tablename__ = "seen_messages"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class OutboxEvent(Base):
    """An event for the notifier, kept until the broker confirmed it."""

    __tablename__ = "outbox"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    routing_key: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class Admin(Base):
    """Who gets the notifier's email."""

    __tablename__ = "admins"

    email: Mapped[str] = mapped_column(String(254), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RejectedJob(Base):
    """A management job the controller refused, as published, with the reason."""

    __tablename__ = "rejected_jobs"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(String(128), server_default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ApiToken(Base):
    """An operator's API token: only the sha256 of its secret is kept."""

    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128), server_default="")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class GatewayEnrollment(Base):
    """A gateway's enrollment: the sha256 of its one-time code until it is used, then the
    certificate issued for it; revoked_at ends it."""

    __tablename__ = "gateway_enrollments"

    gateway_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    code_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128), server_default="")
    code_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    enrolled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    certificate_serial: Mapped[str] = mapped_column(String(64), server_default="")
    certificate_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    broker_user: Mapped[str] = mapped_column(String(255), server_default="")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OperatorCertificate(Base):
    """An operator's client certificate: the one serial issued under its name (names are
    never reused), its role and end; revoked_at ends it."""

    __tablename__ = "operator_certificates"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128), server_default="")
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobPublisher(Base):
    """A broker user an admin allowed to publish management jobs."""

    __tablename__ = "job_publishers"

    broker_user: Mapped[str] = mapped_column(String(255), primary_key=True)
    allowed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    allowed_by: Mapped[str] = mapped_column(String(128), server_default="")


class ConsoleUser(Base):
    """A web console user: a role and the scrypt hash of the password
    (``controller_svc.users``); failed_logins and locked_until slow down guessing."""

    __tablename__ = "console_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128), server_default="")
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_logins: Mapped[int] = mapped_column(Integer, server_default="0")
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One change and who asked for it."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    peer: Mapped[str] = mapped_column(String(200), server_default="")
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, server_default="")
    outcome: Mapped[str] = mapped_column(Text)


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...``, safe across threads.

    SQLite gets WAL (readers never block the writer), foreign keys, a busy timeout, and
    explicit BEGINs so a transaction can ask for ``BEGIN IMMEDIATE`` (see ``SQLITE_BEGIN``).
    """
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise StorageError(
            f"invalid database URL {url!r}: expected sqlite:///path/controller.db or "
            "postgresql+psycopg://user@host/db"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database)
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    raise StorageError(
        f"unsupported database {parsed.get_backend_name()!r} in {url!r}: use sqlite or postgresql"
    )


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if not database or database == ":memory:":
        raise StorageError(
            f"the SQLite database in {url!r} must be a file: an in-memory one is private to "
            "one connection and lost on exit; use sqlite:///path/controller.db"
        )
    path = Path(database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the database directory {path.parent}: {exc.strerror}; "
            "check the data directory's permissions"
        ) from exc
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" hook: pysqlite's own implicit
        # BEGIN is always DEFERRED, which turns read-then-write into SQLITE_BUSY under load.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch the database to WAL (a no-op once it is: the mode is stored in the file).

    The switch needs an exclusive lock and SQLite reports "locked" at once instead of
    calling the busy handler, so two controllers creating the database together retry.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def alembic_config(url: str) -> Config:
    """Alembic's configuration for the database at ``url``, built in code (no alembic.ini):
    for migrate() and for making new revisions (see migrations/README.md)."""
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    # ConfigParser interpolation would choke on '%' in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@functools.cache
def _migrations_dir() -> Path:
    """Where Alembic finds the revisions. Alembic reads a directory; a controller running
    from a release artifact (a zipapp) has its migrations inside the zip, so they are
    copied out once per process."""
    source = Path(migrations.__file__).parent
    if source.is_dir():
        return source
    target = Path(tempfile.mkdtemp(prefix="hitless-migrations-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    _copy_tree(resources.files("migrations"), target)
    return target


def _copy_tree(node: Traversable, target: Path) -> None:
    for child in node.iterdir():
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            (target / child.name).mkdir()
            _copy_tree(child, target / child.name)
        else:
            (target / child.name).write_bytes(child.read_bytes())


def _is_newer(scripts: ScriptDirectory, revision: str | None) -> bool:
    """Whether the database carries a revision this code does not know: a newer
    controller migrated it. Expand-only migrations make that schema safe to run on."""
    if revision is None:
        return False
    try:
        scripts.get_revision(revision)
    except CommandError:
        return True
    return False


def migrate(engine: Engine) -> bool:
    """Bring the schema to the newest revision; True when this call changed it.

    Safe to call from several controllers at once: the first takes a database-wide lock
    (a PostgreSQL advisory lock, SQLite's write lock) and migrates; the others wait, then
    find the schema current and return False.
    """
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    scripts = ScriptDirectory.from_config(config)
    head = scripts.get_current_head()
    locking = engine
    if engine.dialect.name == "sqlite":
        locking = engine.execution_options(**{SQLITE_BEGIN: "EXCLUSIVE"})
    try:
        with _ALEMBIC_IN_PROCESS, locking.begin() as connection:
            if engine.dialect.name == "postgresql":
                # Transaction-scoped, so a crash mid-migration cannot leave it held.
                connection.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
            current = MigrationContext.configure(connection).get_current_revision()
            if current == head or _is_newer(scripts, current):
                return False
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            return True
    except SQLAlchemyError as exc:
        raise StorageError(
            f"migrating the database {engine.url.render_as_string()} to {head} failed: {exc}; "
            "check the database is reachable and writable, then restart the controller"
        ) from exc
