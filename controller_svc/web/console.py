"""The domain services the console's pages work with (the objects the gRPC API is given),
and how a page's action becomes an audit row and a refusal an HTTP status."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from starlette.requests import Request

from controller_svc.access import Audit, Caller, PermissionDenied, Unauthenticated
from controller_svc.admins import Admins
from controller_svc.engine import Engine
from controller_svc.errors import Conflict, FailedPrecondition, InvalidRequest, NotFound
from controller_svc.rejections import Rejections
from controller_svc.repository import Repository
from controller_svc.signing import Trust
from controller_svc.users import LoginThrottled, Users
from hitless import logs
from hitless.errors import BusError, ConfigError, HitlessError, InvalidName

log = logs.get(__name__)

T = TypeVar("T")

# Refusals an operator fixes by changing what was typed or chosen: shown beside the field.
REFUSALS = (ConfigError, InvalidName, InvalidRequest, NotFound, FailedPrecondition, Conflict)
# A refusal's HTTP status, and the word the audit log uses for it (the gRPC API's status
# names, so rows read alike whichever way the change came).
_STATUS: list[tuple[type[Exception], int, str]] = [
    (LoginThrottled, 429, "RESOURCE_EXHAUSTED"),
    (Unauthenticated, 403, "UNAUTHENTICATED"),
    (PermissionDenied, 403, "PERMISSION_DENIED"),
    (NotFound, 404, "NOT_FOUND"),
    (Conflict, 409, "ALREADY_EXISTS"),
    (FailedPrecondition, 409, "FAILED_PRECONDITION"),
    (InvalidRequest, 400, "INVALID_ARGUMENT"),
    (ConfigError, 400, "INVALID_ARGUMENT"),
    (InvalidName, 400, "INVALID_ARGUMENT"),
    (BusError, 503, "UNAVAILABLE"),
    (HitlessError, 503, "INTERNAL"),
]


def status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and the audit log's word for a refusal or failure."""
    return next(((code, name) for kind, code, name in _STATUS if isinstance(exc, kind)), (500, ""))


def detail(**fields: object) -> str:
    """An audit row's detail, ``name: value`` pairs in the gRPC API's text form."""
    return " ".join(f"{name}: {json.dumps(value)}" for name, value in fields.items())


@dataclass(frozen=True)
class Console:
    """The controller's services, shared with its gRPC API; ``stopping`` is set when the
    controller stops or hands over to a new version."""

    engine: Engine
    admins: Admins
    rejections: Rejections
    audit: Audit
    users: Users
    stopping: threading.Event

    @property
    def repo(self) -> Repository:
        return self.engine.repo

    @property
    def trust(self) -> Trust:
        return self.engine.trust

    def record(self, request: Request, actor: str, action: str, what: str, outcome: str) -> None:
        """One audit row for an action taken from ``request``'s client."""
        peer = request.client.host if request.client else ""
        try:
            self.audit.record(datetime.now(UTC), actor, action, what, outcome, peer)
        except HitlessError as exc:
            log.error("audit_write_failed", action=action, error=str(exc))

    def refused(self, request: Request, caller: Caller, action: str, exc: Exception) -> None:
        """The audit row of an action refused before it was tried."""
        self.record(request, caller.actor, action, "", f"{status_of(exc)[1]}: {exc}")

    def act(
        self, request: Request, caller: Caller, action: str, what: str, change: Callable[[], T]
    ) -> T:
        """Do ``change`` for ``caller`` and write its audit row, with the outcome: "OK", or
        the refusal (raised again)."""
        try:
            result = change()
        except HitlessError as exc:
            self.record(request, caller.actor, action, what, f"{status_of(exc)[1]}: {exc}")
            raise
        self.record(request, caller.actor, action, what, "OK")
        return result
