"""Web console users: a name, a role (``access.Role``: viewer, operator, admin) and a
password, of which only a slow hash is kept.

The hash is scrypt (RFC 7914) from ``hashlib``, with N=2**14, r=8, p=1 (the interactive
login parameters of RFC 7914 §2 and of OWASP's password storage cheat sheet), a random
16-byte salt and a 32-byte key, stored as ``scrypt$N$r$p$SALT$KEY`` (base64), so stronger
parameters later leave older hashes readable. Keys are compared in constant time, and a
name that is not a user costs the same scrypt as one that is, so the time a refusal takes
does not tell which names exist.

Guessing is slowed down per name: after ``FREE_FAILURES`` failed logins in a row, each
further try waits ``2 ** (failures - FREE_FAILURES)`` seconds (at most ``MAX_WAIT``) after
the last; a try that comes sooner is refused (``LoginThrottled``) without looking at the
password. A try is counted as a failure before its password is checked and cleared when it
is right, so guesses sent in parallel get no more tries than guesses sent one by one. The
count of a known name is a column (shared by the controller versions during an inline
upgrade); that of a name that is not a user is kept in memory, so the refusals do not tell
those apart either.

Errors: InvalidRequest (a bad name, role or password), Conflict (the name is taken),
NotFound (no such user), ``LoginRefused`` and ``LoginThrottled`` (both
``access.Unauthenticated``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from controller_svc.access import Caller, Role, Unauthenticated
from controller_svc.db import ConsoleUser
from controller_svc.errors import Conflict, InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import names

ACTOR_PREFIX = "user:"
MIN_PASSWORD = 12
# Bounds the work one login may ask for (scrypt's PBKDF2 step reads the whole password).
MAX_PASSWORD = 1024
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
# scrypt needs 128 * r * N bytes (16 MiB here); OpenSSL refuses more than maxmem.
_SCRYPT_MAXMEM = 64 * 1024 * 1024
FREE_FAILURES = 5
MAX_WAIT = timedelta(minutes=15)
# Names that are not users whose failures are remembered; the oldest are forgotten first.
MAX_REMEMBERED_STRANGERS = 10_000
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class LoginRefused(Unauthenticated):
    """The name or the password is wrong (which one is not said)."""


class LoginThrottled(Unauthenticated):
    """Too many failed logins in a row for this name: ``retry_at`` is when it may try again."""

    def __init__(self, message: str, retry_at: datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


@dataclass(frozen=True)
class UserRecord:
    name: str
    role: Role
    created_at: datetime
    created_by: str
    last_login_at: datetime | None


@dataclass(frozen=True)
class _Failures:
    """Failed logins in a row for one name, and the time before which no try is taken."""

    count: int = 0
    locked_until: datetime | None = None


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$SALT$KEY``, SALT (16 random bytes
    unless given) and KEY base64."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)])


def password_matches(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (``hash_password``'s form) was made from,
    compared in constant time; False for a stored value that is not of that form."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def check_password(password: str) -> str:
    """Return ``password`` if the console takes it (``MIN_PASSWORD`` to ``MAX_PASSWORD``
    characters), else raise InvalidRequest saying why."""
    if len(password) < MIN_PASSWORD:
        raise InvalidRequest(
            f"a console password needs at least {MIN_PASSWORD} characters, and this one has "
            f"{len(password)}: choose a longer one (a few words make a good one)"
        )
    if len(password) > MAX_PASSWORD:
        raise InvalidRequest(
            f"a console password has at most {MAX_PASSWORD} characters, and this one has "
            f"{len(password)}"
        )
    return password


def wait_after(failures: int) -> timedelta | None:
    """How long a name waits after ``failures`` failed logins in a row: None for fewer
    than FREE_FAILURES, then 1 s, 2 s, 4 s, ... up to MAX_WAIT."""
    if failures < FREE_FAILURES:
        return None
    exponent = failures - FREE_FAILURES
    if exponent >= math.log2(MAX_WAIT.total_seconds()):
        return MAX_WAIT
    return timedelta(seconds=2**exponent)


class Users:
    """The console's users. Thread-safe: each call has its own database session."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self._strangers: OrderedDict[str, _Failures] = OrderedDict()
        self._strangers_lock = threading.Lock()
        # Checked against a name that is not a user, so that refusal costs one scrypt too.
        self._decoy = hash_password(secrets.token_urlsafe(16))

    def add(
        self, name: str, role: Role, password: str, now: datetime, created_by: str
    ) -> UserRecord:
        """Add the user ``name``. Raises InvalidRequest for a bad name or password,
        Conflict when the name is taken."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid user name {names.shown(name)}: use 1-64 ASCII letters, digits, '.', "
                "'_' or '-'"
            )
        stored = hash_password(check_password(password))
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(ConsoleUser)
                .values(
                    name=name, role=str(role), password_hash=stored, created_at=now,
                    created_by=created_by[:128], last_login_at=None, failed_logins=0,
                    locked_until=None,
                )
                .on_conflict_do_nothing(index_elements=[ConsoleUser.name])
                .returning(ConsoleUser.name)
            )  # fmt: skip
            if session.execute(stmt).scalar_one_or_none() is None:
                raise Conflict(
                    f"a console user named {name} exists already: choose another name, or "
                    f"remove it first (upgradectl users remove {name})"
                )
        return UserRecord(name, role, now, created_by[:128], None)

    def get(self, name: str) -> UserRecord | None:
        """The user ``name`` as it is now, or None."""
        with self._sessions.read() as session:
            row = session.get(ConsoleUser, name)
            return _record(row) if row is not None else None

    def list(self) -> list[UserRecord]:
        """Every user, by name."""
        with self._sessions.read() as session:
            rows = session.scalars(select(ConsoleUser).order_by(ConsoleUser.name)).all()
            return [_record(r) for r in rows]

    def remove(self, name: str) -> UserRecord:
        """Remove the user ``name``: its console sessions end with their next request.
        Raises NotFound when there is none."""
        with self._sessions.write() as session:
            row = session.execute(
                delete(ConsoleUser)
                .where(ConsoleUser.name == name)
                .returning(
                    ConsoleUser.name, ConsoleUser.role, ConsoleUser.created_at,
                    ConsoleUser.created_by, ConsoleUser.last_login_at,
                )
            ).one_or_none()  # fmt: skip
        if row is None:
            raise NotFound(
                f"no console user named {names.shown(name)}: `upgradectl users list` shows them"
            )
        return UserRecord(row[0], Role.parse(row[1]), row[2], row[3], row[4])

    def authenticate(self, name: str, password: str, now: datetime) -> Caller:
        """The caller ``name`` logs in as (actor ``user:NAME``) when ``password`` is its.

        Raises LoginThrottled while the name waits after failed logins (the password is
        not looked at), LoginRefused for a wrong name or password, saying when the next try
        is taken once tries are slowed down."""
        known = self._known_try(name, now)
        if known is None:
            failures = self._stranger_try(name, now)
            password_matches(password, self._decoy)
            raise _refused(name, failures)
        stored, role, failures = known
        if len(password) > MAX_PASSWORD or not password_matches(password, stored):
            raise _refused(name, failures)
        with self._sessions.write() as session:
            session.execute(
                update(ConsoleUser)
                .where(ConsoleUser.name == name)
                .values(failed_logins=0, locked_until=None, last_login_at=now)
            )
        return Caller(ACTOR_PREFIX + name, role)

    def _known_try(self, name: str, now: datetime) -> tuple[str, Role, _Failures] | None:
        """Count a try of the user ``name`` as failed until its password proves right:
        its stored hash, role and failures with this try. None when there is no such user.
        Raises LoginThrottled while it waits."""
        with self._sessions.write() as session:
            row = session.scalars(
                select(ConsoleUser).where(ConsoleUser.name == name).with_for_update()
            ).one_or_none()
            if row is None:
                return None
            failures = _counted(_Failures(row.failed_logins, row.locked_until), name, now)
            row.failed_logins, row.locked_until = failures.count, failures.locked_until
            return row.password_hash, Role.parse(row.role), failures

    def _stranger_try(self, name: str, now: datetime) -> _Failures:
        """The same for a name that is not a user, remembered in memory."""
        key = name[:64]
        with self._strangers_lock:
            failures = _counted(self._strangers.get(key, _Failures()), name, now)
            self._strangers[key] = failures
            self._strangers.move_to_end(key)
            while len(self._strangers) > MAX_REMEMBERED_STRANGERS:
                self._strangers.popitem(last=False)
        return failures


def _counted(before: _Failures, name: str, now: datetime) -> _Failures:
    """The failures after one more try of ``name`` at ``now``. Raises LoginThrottled when
    the try comes before the wait after the last failures is over."""
    if before.locked_until is not None and now < before.locked_until:
        seconds = math.ceil((before.locked_until - now).total_seconds())
        raise LoginThrottled(
            f"too many failed logins in a row for {names.shown(name)}: try again after "
            f"{before.locked_until:%H:%M:%S} UTC (in {seconds} s)",
            before.locked_until,
        )
    count = before.count + 1
    wait = wait_after(count)
    return _Failures(count, now + wait if wait is not None else None)


def _refused(name: str, failures: _Failures) -> LoginRefused:
    message = "wrong user name or password: check both and try again"
    if failures.locked_until is not None:
        message += (
            f"; after {failures.count} failed logins in a row, the next try for "
            f"{names.shown(name)} is taken from {failures.locked_until:%H:%M:%S} UTC"
        )
    return LoginRefused(message)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", errors="surrogatepass"),
        salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=KEY_BYTES,
    )  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _record(row: ConsoleUser) -> UserRecord:
    return UserRecord(
        row.name, Role.parse(row.role), row.created_at, row.created_by, row.last_login_at
    )
