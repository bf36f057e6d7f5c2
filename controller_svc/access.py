"""Who may call what on the controller's API: operators' API tokens, their roles, and the
audit log of every change.

A token is a random secret (``hlt_`` and 43 characters of base64url: 256 bits) sent as gRPC
metadata ``authorization: Bearer <secret>`` (RFC 6750 §2.1's header form). The controller
keeps only its sha256: a secret that strong needs no slow hash, and a stolen database
yields no usable token. A token has a role, and a call needs the role ``ROLES`` names for
its method:

    viewer     reads: gateways, releases, jobs, plans, admins, the controller
    operator   viewer, and starting upgrades
    admin      everything: releases (publish, yank, sync), keys, admins, tokens, the
               controller's own upgrade, the audit log

A call without a token, or with one unknown, expired or revoked, is UNAUTHENTICATED; one
whose role is too low is PERMISSION_DENIED, naming the role it needs. Every call that
changes something is an audit row (who, from where, what, outcome), refused ones included.

The first start of a controller without tokens makes one admin token and writes it to
``<data dir>/admin.token`` (0600), so there is always a way in.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update

from controller_svc.db import ApiToken, AuditEvent
from controller_svc.errors import Conflict, ControllerError, InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import logs

log = logs.get(__name__)

BOOTSTRAP_FILE = "admin.token"
BOOTSTRAP_NAME = "bootstrap-admin"
SECRET_PREFIX = "hlt_"
MAX_DETAIL_CHARS = 500
MAX_EXPIRY = timedelta(days=3650)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Role(enum.IntEnum):
    """An operator's role; a higher one may do all a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        """The role named ``text`` (viewer, operator, admin); InvalidRequest otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise InvalidRequest(
                f"unknown role {text[:40]!r}: choose viewer, operator or admin"
            ) from None

    def __str__(self) -> str:
        return self.name.lower()


_CONTROLLER = "/hitless.v1.Controller/"
# The role each method needs. A method not named here (a newer one) needs admin.
_READS = (
    "ListGateways", "ListReleases", "GetJob", "WatchJob", "PlanUpgrade", "ListJobs",
    "ListRejectedJobs", "ListAdmins", "GetController", "GetTargetsMetadata",
)  # fmt: skip
_STEERING = ("PauseJob", "ResumeJob", "CancelJob")
ROLES: dict[str, Role] = {
    **{_CONTROLLER + m: Role.VIEWER for m in _READS},
    **{_CONTROLLER + m: Role.OPERATOR for m in ("StartUpgrade", *_STEERING)},
    # Gateways download with their certificates; an operator's token may too.
    "/hitless.v1.Artifacts/Download": Role.VIEWER,
    "/hitless.v1.Artifacts/FetchMetadata": Role.VIEWER,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.VIEWER,
}
# Methods that change something: each call is an audit row.
CHANGES = frozenset(
    _CONTROLLER + m
    for m in (
        "PublishRelease", "StartUpgrade", "SyncReleases", "AddAdmin", "RemoveAdmin",
        "UpgradeController", "YankRelease", "RotateRoot", "CreateToken", "RevokeToken",
        "CreateEnrollment", "RevokeGateway", "AllowPublisher", "DisallowPublisher",
        "IssueCertificate", "RevokeCertificate", "AddUser", "RemoveUser", *_STEERING,
    )
)  # fmt: skip
# Reached without a token: health checks, and enrollment (the caller holds a one-time code).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/hitless.v1.Enrollment/")
# All that a gateway's client certificate may call: downloads and release metadata.
GATEWAY_PREFIXES = ("/hitless.v1.Artifacts/", "/grpc.health.v1.Health/")


def role_needed(method: str) -> Role | None:
    """The role a call of ``method`` (``/package.Service/Method``) needs with an API token;
    None when it is open to anyone (health, and enrollment, which checks its code)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return ROLES.get(method, Role.ADMIN)


class Unauthenticated(ControllerError):
    """No usable credentials: the message says what is missing or refused."""


class PermissionDenied(ControllerError):
    """The caller's role may not make this call: the message names the role needed."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``actor`` is "token:NAME", "cert:NAME" (an operator's client
    certificate, ``controller_svc.operator_certs``), "gateway:ID" (a gateway's client
    certificate) or "broker:USER" (a management job)."""

    actor: str
    role: Role
    peer: str = ""
    gateway: str = ""  # the gateway its client certificate names ("" for operators)


# The caller of the call this thread serves (set by the server's interceptor).
current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_actor() -> str:
    """The actor of the call being served, or "controller" outside one."""
    caller = current.get()
    return caller.actor if caller is not None else "controller"


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: Role
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: datetime
    actor: str
    peer: str
    action: str
    detail: str
    outcome: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", errors="replace")).hexdigest()


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The secret of an ``authorization: Bearer <secret>`` entry in gRPC ``metadata``,
    None when there is none. Raises Unauthenticated for one that is not a bearer token."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        scheme, _, secret = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated(
                "the authorization metadata is not 'Bearer <token>': give the API token "
                "in HITLESS_TOKEN or a --token-file"
            )
        return secret.strip()
    return None


class Tokens:
    """The controller's API tokens. Thread-safe: each call has its own session."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def create(
        self, name: str, role: Role, *, now: datetime, expires_in: timedelta | None,
        created_by: str,
    ) -> tuple[TokenRecord, str]:  # fmt: skip
        """A new token and its secret (returned only here). Raises InvalidRequest for a
        bad name or expiry, Conflict when the name is taken (revoked ones included)."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid token name {name[:40]!r}: use 1-64 ASCII letters, digits, '.', '_' or '-'"
            )
        if expires_in is not None and not timedelta(0) < expires_in <= MAX_EXPIRY:
            raise InvalidRequest(
                f"a token's expiry must be from 1 second to {MAX_EXPIRY.days} days away"
            )
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        expires_at = now + expires_in if expires_in is not None else None
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(ApiToken)
                .values(
                    name=name, role=str(role), secret_sha256=digest(secret), created_at=now,
                    created_by=created_by[:128], expires_at=expires_at, revoked_at=None,
                )
                .on_conflict_do_nothing(index_elements=[ApiToken.name])
                .returning(ApiToken.name)
            )  # fmt: skip
            if session.execute(stmt).scalar_one_or_none() is None:
                raise Conflict(
                    f"a token named {name} exists already (names are never reused, revoked "
                    "ones included): choose another name"
                )
        return TokenRecord(name, role, now, created_by[:128], expires_at, None), secret

    def authenticate(self, secret: str | None, now: datetime) -> Caller:
        """The caller ``secret`` identifies. Raises Unauthenticated saying why not: none
        given, unknown, expired (when), revoked (when)."""
        if secret is None:
            raise Unauthenticated(
                "this call needs an API token: give it in HITLESS_TOKEN or a --token-file "
                f"(the first one is in the controller's <data dir>/{BOOTSTRAP_FILE})"
            )
        with self._sessions.read() as session:
            row = session.scalars(
                select(ApiToken).where(ApiToken.secret_sha256 == digest(secret))
            ).one_or_none()
            if row is None:
                raise Unauthenticated(
                    "the API token given is not one this controller issued (mistyped, or "
                    "from another controller): ask an admin for a token"
                )
            if row.revoked_at is not None:
                raise Unauthenticated(
                    f"the API token {row.name} was revoked at {row.revoked_at:%Y-%m-%d %H:%M} "
                    "UTC: ask an admin for a new one"
                )
            if row.expires_at is not None and row.expires_at <= now:
                raise Unauthenticated(
                    f"the API token {row.name} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC: "
                    "ask an admin for a new one"
                )
            return Caller(f"token:{row.name}", Role.parse(row.role))

    def revoke(self, name: str, now: datetime) -> TokenRecord:
        """Revoke the token ``name`` (at once, for every later call). NotFound when there
        is none; revoking twice keeps the first time."""
        with self._sessions.write() as session:
            session.execute(
                update(ApiToken)
                .where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = session.get(ApiToken, name)
            if row is None:
                raise NotFound(f"no token named {name[:64]!r}: `upgradectl tokens list` shows them")
            return _token_record(row)

    def list(self) -> list[TokenRecord]:
        """Every token, by name."""
        with self._sessions.read() as session:
            rows = session.scalars(select(ApiToken).order_by(ApiToken.name)).all()
            return [_token_record(r) for r in rows]

    def bootstrap(self, data_dir: Path, now: datetime) -> Path | None:
        """With no token at all, make an admin token and write its secret to
        ``data_dir/admin.token`` (0600); return that path, or None when tokens exist."""
        with self._sessions.read() as session:
            if session.scalars(select(ApiToken.name).limit(1)).first() is not None:
                return None
        path = data_dir / BOOTSTRAP_FILE
        name = BOOTSTRAP_NAME
        if path.exists():  # from a start that did not finish: never overwrite a secret
            name = f"{BOOTSTRAP_NAME}-{secrets.token_hex(3)}"
            path = data_dir / f"{BOOTSTRAP_FILE}.{name}"
        _, secret = self.create(name, Role.ADMIN, now=now, expires_in=None, created_by="controller")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return path


class Audit:
    """The audit log: append-only rows, read newest first."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def record(
        self, at: datetime, actor: str, action: str, detail: str, outcome: str, peer: str = ""
    ) -> None:
        """Append one row (fields cut to their bounds)."""
        with self._sessions.write() as session:
            session.add(
                AuditEvent(
                    at=at, actor=actor[:200], peer=peer[:200], action=action[:64],
                    detail=detail[:MAX_DETAIL_CHARS], outcome=outcome[:MAX_DETAIL_CHARS],
                )
            )  # fmt: skip

    def list(self, since: datetime | None = None, limit: int = 200) -> list[AuditRecord]:
        """The newest ``limit`` rows at or after ``since``, newest first."""
        if not 0 < limit <= 10_000:
            raise InvalidRequest(f"invalid limit {limit}: give 1 to 10000")
        with self._sessions.read() as session:
            stmt = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
            if since is not None:
                stmt = stmt.where(AuditEvent.at >= since)
            return [
                AuditRecord(r.seq, r.at, r.actor, r.peer, r.action, r.detail, r.outcome)
                for r in session.scalars(stmt).all()
            ]


def _token_record(row: ApiToken) -> TokenRecord:
    return TokenRecord(
        row.name, Role.parse(row.role), row.created_at, row.created_by, row.expires_at,
        row.revoked_at,
    )  # fmt: skip
