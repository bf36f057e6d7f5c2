"""The controller's errors, below ``hitless.errors.HitlessError``.

    ControllerError              anything the controller refuses or fails to do
    ├── NotFound                 no such release, job, gateway or artifact
    ├── Conflict                 the request contradicts what is stored
    │                            (e.g. a release version re-published with another digest)
    ├── InvalidRequest           the request itself is malformed (bad version, digest, offset)
    ├── FailedPrecondition       valid, but not possible in the present state (no gateways)
    ├── StorageError             the database or the artifact store failed underneath us
    ├── access.Unauthenticated   no credential, or one refused (enrollment.EnrollmentRefused)
    ├── access.PermissionDenied  the caller's role or certificate may not make this call
    ├── broker_access.BrokerAccessError   RabbitMQ's management API failed (Unavailable)
    │                            or refused (ManagementRefused) a broker user change
    └── limits.Refused           a budget of concurrent calls is full; retry later

The API layer maps these to status codes in one place; every message says what failed,
on what, and what to do.
"""

from __future__ import annotations

from hitless.errors import HitlessError


class ControllerError(HitlessError):
    """Base of the controller's errors."""


class NotFound(ControllerError):
    """The named release, job, gateway or artifact does not exist."""


class Conflict(ControllerError):
    """The request contradicts stored state; repeating it will not help."""


class InvalidRequest(ControllerError):
    """The request is malformed; fix it and send it again."""


class StorageError(ControllerError):
    """The database or the artifact store failed; often transient (disk, connection)."""


class FailedPrecondition(ControllerError):
    """The request is valid but cannot be done in the present state (e.g. no gateways)."""
