"""Gateway enrollment: a one-time code an admin makes, which a gateway trades once for its
client certificate, its broker credentials and the trust anchors; and revocation.

A code is 160 random bits (``hge_`` + base32), kept as its sha256 only, valid for one
use until its expiry. The code is claimed before anything is issued (one UPDATE that
matches the code's digest, the gateway and an expiry still ahead), so two gateways racing
with one code get one certificate. A new code for an enrolled gateway re-enrolls it: the
certificate issued then replaces the old one, which is refused from then on. A revoked
gateway stays revoked until a new code is used: making the code brings back nothing.

The gateway port accepts a certificate only while its serial is the enrollment's current
one and the enrollment is not revoked (``authorise``), so revocation needs no CRL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import or_, select, update

from controller_svc.access import Unauthenticated
from controller_svc.db import GatewayEnrollment
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import logs, names
from hitless.errors import HitlessError
from hitless.pki import BadCertificateRequest, CertificateAuthority

log = logs.get(__name__)

CODE_PREFIX = "hge_"
DEFAULT_CODE_LIFETIME = timedelta(hours=24)
MAX_CODE_LIFETIME = timedelta(days=30)
MAX_CODE_CHARS = 128
MAX_CSR_BYTES = 16 * 1024


class EnrollmentRefused(Unauthenticated):
    """A code that is unknown, used, expired, revoked or made for another gateway
    (gRPC UNAUTHENTICATED)."""


class BrokerUsers(Protocol):
    """The broker side of enrollment (``controller_svc.broker_access``)."""

    def enroll_gateway(self, gateway_id: str) -> tuple[str, str]:
        """Make (or give a new password to) the gateway's broker user: (user, password)."""
        ...

    def revoke_gateway(self, gateway_id: str) -> None:
        """Delete the gateway's broker user and close its connections."""
        ...


@dataclass(frozen=True)
class EnrollmentRecord:
    gateway_id: str
    state: str  # PENDING, ENROLLED, EXPIRED or REVOKED
    created_at: datetime
    created_by: str
    code_expires_at: datetime
    enrolled_at: datetime | None
    revoked_at: datetime | None
    certificate_serial: str
    certificate_expires_at: datetime | None
    broker_user: str


@dataclass(frozen=True)
class Enrolled:
    """What a gateway takes away from enrollment."""

    certificate_pem: bytes
    ca_pem: bytes
    broker_user: str
    broker_password: str


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _record(row: GatewayEnrollment, now: datetime) -> EnrollmentRecord:
    if row.code_sha256 is not None and row.code_expires_at > now:
        state = "PENDING"
    elif row.revoked_at is not None:
        state = "REVOKED"
    elif row.enrolled_at is not None:
        state = "ENROLLED"
    else:
        state = "EXPIRED"
    return EnrollmentRecord(
        row.gateway_id, state, row.created_at, row.created_by, row.code_expires_at,
        row.enrolled_at, row.revoked_at, row.certificate_serial, row.certificate_expires_at,
        row.broker_user,
    )  # fmt: skip


class Enrollments:
    """Enrollment codes, the certificates issued for them, and revocation. Thread-safe:
    each call has its own session."""

    def __init__(
        self,
        sessions: Sessions,
        ca: CertificateAuthority,
        broker: BrokerUsers | None = None,
    ) -> None:
        self._sessions = sessions
        self._ca = ca
        self._broker = broker

    def create(
        self, gateway_id: str, *, now: datetime, lifetime: timedelta | None, created_by: str
    ) -> tuple[str, EnrollmentRecord]:
        """A new one-time code for ``gateway_id`` (returned only here) and its record. It
        replaces an unused code; for an enrolled gateway it allows re-enrolling, and a
        revoked one stays revoked until the code is used. Raises InvalidRequest for a bad id
        or lifetime (1 second to 30 days)."""
        names.gateway_id(gateway_id)
        lifetime = lifetime or DEFAULT_CODE_LIFETIME
        if not timedelta(0) < lifetime <= MAX_CODE_LIFETIME:
            raise InvalidRequest(
                f"an enrollment code's expiry must be from 1 second to {MAX_CODE_LIFETIME.days} "
                "days away"
            )
        code = CODE_PREFIX + base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
        expires_at = now + lifetime
        with self._sessions.write() as session:
            row = session.get(GatewayEnrollment, gateway_id)
            if row is None:
                row = GatewayEnrollment(
                    gateway_id=gateway_id, certificate_serial="", broker_user="",
                    enrolled_at=None, certificate_expires_at=None,
                )  # fmt: skip
                session.add(row)
            row.code_sha256 = _digest(code)
            row.created_at = now
            row.created_by = created_by[:128]
            row.code_expires_at = expires_at
            # Not un-revoked here: the revoked certificate would be accepted again until the
            # code is used (``authorise`` matches its serial).
            session.flush()
            return code, _record(row, now)

    def enroll(self, gateway_id: str, code: str, csr_pem: bytes, now: datetime) -> Enrolled:
        """Trade ``code`` for a certificate on the key of ``csr_pem`` and broker
        credentials. Raises EnrollmentRefused for a code that is not valid for this gateway
        now (the message says which of unknown/used/expired), InvalidRequest for a malformed
        request; the code stays usable when the failure was the request's or the broker's."""
        names.gateway_id(gateway_id)
        if not code or len(code) > MAX_CODE_CHARS:
            raise EnrollmentRefused(
                "no enrollment code given: ask an admin for one (upgradectl gateways enroll ID)"
            )
        if len(csr_pem) > MAX_CSR_BYTES:
            raise InvalidRequest(f"the certificate request is over {MAX_CSR_BYTES} bytes")
        digest = _digest(code)
        with self._sessions.write() as session:
            row = session.get(GatewayEnrollment, gateway_id)
            if (
                row is None
                or row.code_sha256 is None
                or not hmac.compare_digest(row.code_sha256, digest)
            ):
                used = row is not None and row.enrolled_at is not None and row.code_sha256 is None
                raise EnrollmentRefused(
                    f"the enrollment code is not valid for gateway {gateway_id}"
                    + (" (it was used already)" if used else "")
                    + ": ask an admin for a new one (upgradectl gateways enroll "
                    f"{gateway_id})"
                )
            if row.code_expires_at <= now:
                raise EnrollmentRefused(
                    f"the enrollment code for gateway {gateway_id} expired at "
                    f"{row.code_expires_at:%Y-%m-%d %H:%M} UTC: ask an admin for a new one"
                )
            claimed = session.execute(
                update(GatewayEnrollment)
                .where(
                    GatewayEnrollment.gateway_id == gateway_id,
                    GatewayEnrollment.code_sha256 == digest,
                )
                .values(code_sha256=None)
            ).rowcount  # type: ignore[attr-defined]
        if claimed != 1:
            raise EnrollmentRefused(
                f"the enrollment code for gateway {gateway_id} was used already: ask an admin "
                "for a new one"
            )
        try:
            issued = self._ca.issue_gateway(csr_pem, gateway_id, now)
            user, password = self._broker.enroll_gateway(gateway_id) if self._broker else ("", "")
        except (BadCertificateRequest, HitlessError) as exc:
            self._restore(gateway_id, digest)
            if isinstance(exc, BadCertificateRequest):
                raise InvalidRequest(str(exc)) from exc
            raise
        with self._sessions.write() as session:
            stored = session.execute(
                update(GatewayEnrollment)
                .where(
                    GatewayEnrollment.gateway_id == gateway_id,
                    # A revocation since this enrollment began wins over it.
                    or_(
                        GatewayEnrollment.revoked_at.is_(None),
                        GatewayEnrollment.revoked_at < now,
                    ),
                )
                .values(
                    enrolled_at=now,
                    revoked_at=None,
                    certificate_serial=issued.serial,
                    certificate_expires_at=issued.not_after,
                    broker_user=user,
                )
            ).rowcount  # type: ignore[attr-defined]
        if stored != 1:
            if self._broker is not None:
                self._broker.revoke_gateway(gateway_id)
            raise EnrollmentRefused(
                f"gateway {gateway_id} was revoked while it enrolled: ask an admin for a new "
                "code if it should enroll"
            )
        log.info("gateway_enrolled", gateway=gateway_id, serial=issued.serial, broker_user=user)
        return Enrolled(issued.pem, self._ca.ca_path.read_bytes(), user, password)

    def _restore(self, gateway_id: str, digest: str) -> None:
        with self._sessions.write() as session:
            session.execute(
                update(GatewayEnrollment)
                .where(
                    GatewayEnrollment.gateway_id == gateway_id,
                    GatewayEnrollment.code_sha256.is_(None),
                )
                .values(code_sha256=digest)
            )

    def authorise(self, gateway_id: str, serial: str) -> str | None:
        """None when a certificate with ``serial`` for ``gateway_id`` is the gateway's
        current one and not revoked; else why not (for the caller's error)."""
        with self._sessions.read() as session:
            row = session.get(GatewayEnrollment, gateway_id)
            if row is None or row.enrolled_at is None:
                return f"gateway {gateway_id} is not enrolled"
            if row.revoked_at is not None:
                return (
                    f"gateway {gateway_id} was revoked at {row.revoked_at:%Y-%m-%d %H:%M} UTC: "
                    "enroll it again (upgradectl gateways enroll)"
                )
            if not hmac.compare_digest(row.certificate_serial, serial):
                return (
                    f"this certificate of gateway {gateway_id} was replaced by a later enrollment"
                )
        return None

    def revoke(self, gateway_id: str, now: datetime) -> EnrollmentRecord:
        """Revoke the gateway's certificate (refused from the next call on), its unused
        code and its broker user. NotFound when it was never enrolled or given a code."""
        with self._sessions.write() as session:
            row = session.get(GatewayEnrollment, gateway_id)
            if row is None:
                raise NotFound(
                    f"no enrollment for gateway {gateway_id[:64]!r}: `upgradectl gateways "
                    "enrollments` lists them"
                )
            # The latest revocation counts: it also beats an enrollment under way
            # (``enroll`` stores its certificate only if no revocation came after it began).
            row.revoked_at = now
            row.code_sha256 = None
            session.flush()
            record = _record(row, now)
        if self._broker is not None:
            self._broker.revoke_gateway(gateway_id)
        log.warning("gateway_revoked", gateway=gateway_id, serial=record.certificate_serial)
        return record

    def list(self, now: datetime) -> list[EnrollmentRecord]:
        """Every enrollment, by gateway id."""
        with self._sessions.read() as session:
            rows = session.scalars(
                select(GatewayEnrollment).order_by(GatewayEnrollment.gateway_id)
            ).all()
            return [_record(row, now) for row in rows]
