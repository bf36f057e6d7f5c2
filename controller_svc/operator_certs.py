"""Operators' client certificates: issued by the controller's CA on the operator's own key
(only its request is sent), each with a role like an API token, and revocation.

A certificate names its operator in the URI ``urn:hitless:operator:<name>``
(``hitless.pki.issue_operator``) and is presented on the controller's gateway port, whose
TLS handshake requires a certificate of this CA and checks its validity period. Past the
handshake, ``authenticate`` accepts it only while its serial is the one stored under its
name, it is not revoked and has not expired; so revocation needs no CRL, and a database
restored from before a name was issued refuses that certificate.

A name is issued once, like a token's (revoked ones included), so the audit's
``cert:NAME`` always means one certificate, one key and one holder.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from controller_svc.access import Caller, Role, Unauthenticated
from controller_svc.db import OperatorCertificate
from controller_svc.errors import Conflict, InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from hitless import logs, pki
from hitless.errors import InvalidName
from hitless.pki import BadCertificateRequest, CertificateAuthority

log = logs.get(__name__)

DEFAULT_LIFETIME = timedelta(days=365)
MAX_LIFETIME = timedelta(days=3650)
MAX_CSR_BYTES = 16 * 1024
ACTOR_PREFIX = "cert:"
# The same rule as a token's name (proto IssueCertificateRequest.name).
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class CertificateRecord:
    name: str
    role: Role
    serial: str  # hex
    created_at: datetime
    created_by: str
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class IssuedOperator:
    """What ``issue`` gives the operator: the record, the certificate and the CA's."""

    record: CertificateRecord
    certificate_pem: bytes
    ca_pem: bytes


def _record(row: OperatorCertificate) -> CertificateRecord:
    return CertificateRecord(
        row.name, Role.parse(row.role), row.serial, row.created_at, row.created_by,
        row.expires_at, row.revoked_at,
    )  # fmt: skip


class OperatorCertificates:
    """Operators' client certificates. Thread-safe: each call has its own session."""

    def __init__(self, sessions: Sessions, ca: CertificateAuthority) -> None:
        self._sessions = sessions
        self._ca = ca

    def issue(
        self, name: str, role: Role, csr_pem: bytes, *, now: datetime,
        lifetime: timedelta | None, created_by: str,
    ) -> IssuedOperator:  # fmt: skip
        """A certificate for ``name`` with ``role`` on the key of ``csr_pem`` (PEM PKCS#10,
        ECDSA), valid for ``lifetime`` (None: 365 days; at most 3650). Raises InvalidRequest
        for a bad name, lifetime or request, Conflict when the name was issued before
        (revoked ones included)."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid certificate name {name[:40]!r}: use 1-64 ASCII letters, digits, "
                "'.', '_' or '-'"
            )
        lifetime = lifetime or DEFAULT_LIFETIME
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            raise InvalidRequest(
                f"a certificate's expiry must be from 1 second to {MAX_LIFETIME.days} days away"
            )
        if len(csr_pem) > MAX_CSR_BYTES:
            raise InvalidRequest(f"the certificate request is over {MAX_CSR_BYTES} bytes")
        self._check_unused(name)
        try:
            issued = self._ca.issue_operator(csr_pem, name, now, lifetime / timedelta(days=1))
        except (BadCertificateRequest, InvalidName) as exc:
            raise InvalidRequest(str(exc)) from exc
        with self._sessions.write() as session:
            stmt = (
                self._sessions.insert(OperatorCertificate)
                .values(
                    name=name, role=str(role), serial=issued.serial, created_at=now,
                    created_by=created_by[:128], expires_at=issued.not_after, revoked_at=None,
                )
                .on_conflict_do_nothing(index_elements=[OperatorCertificate.name])
                .returning(OperatorCertificate.name)
            )  # fmt: skip
            if session.execute(stmt).scalar_one_or_none() is None:
                raise self._taken(name)
        log.info("operator_certificate_issued", name=name, role=str(role), serial=issued.serial)
        record = CertificateRecord(
            name, role, issued.serial, now, created_by[:128], issued.not_after, None
        )
        return IssuedOperator(record, issued.pem, self._ca.ca_path.read_bytes())

    def _check_unused(self, name: str) -> None:
        """Refuse a name issued before without signing anything (the insert decides a race)."""
        with self._sessions.read() as session:
            if session.get(OperatorCertificate, name) is not None:
                raise self._taken(name)

    @staticmethod
    def _taken(name: str) -> Conflict:
        return Conflict(
            f"a certificate named {name} was issued already (names are never reused, revoked "
            "ones included): choose another name"
        )

    def authenticate(self, pem: bytes, now: datetime) -> Caller:
        """The caller a client certificate (PEM, verified by TLS against the CA) names:
        ``cert:NAME`` with the role it was issued with. Raises Unauthenticated saying why
        not: names no operator, unknown, not the one issued under its name, revoked (when),
        expired (when)."""
        name = pki.operator_of(pem)
        if name is None:
            raise Unauthenticated("the client certificate names no operator")
        with self._sessions.read() as session:
            row = session.get(OperatorCertificate, name)
            if row is None:
                raise Unauthenticated(
                    f"the client certificate for {ACTOR_PREFIX}{name} is not one this controller "
                    "issued: ask an admin for a certificate (upgradectl certs issue)"
                )
            if not hmac.compare_digest(row.serial, pki.serial_of(pem)):
                raise Unauthenticated(
                    f"this client certificate for {ACTOR_PREFIX}{name} (serial "
                    f"{pki.serial_of(pem)}) was replaced: the controller accepts only the one "
                    f"it issued under that name (serial {row.serial}); ask an admin for a new one"
                )
            if row.revoked_at is not None:
                raise Unauthenticated(
                    f"the client certificate {ACTOR_PREFIX}{name} was revoked at "
                    f"{row.revoked_at:%Y-%m-%d %H:%M} UTC: ask an admin for a new one"
                )
            if row.expires_at <= now:
                raise Unauthenticated(
                    f"the client certificate {ACTOR_PREFIX}{name} expired at "
                    f"{row.expires_at:%Y-%m-%d %H:%M:%S} UTC: ask an admin for a new one"
                )
            return Caller(ACTOR_PREFIX + name, Role.parse(row.role))

    def revoke(self, name: str, now: datetime) -> CertificateRecord:
        """Revoke the certificate ``name`` (refused from the next call on). NotFound when
        there is none; revoking twice keeps the first time."""
        with self._sessions.write() as session:
            session.execute(
                update(OperatorCertificate)
                .where(OperatorCertificate.name == name, OperatorCertificate.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = session.get(OperatorCertificate, name)
            if row is None:
                raise NotFound(
                    f"no certificate named {name[:64]!r}: `upgradectl certs list` shows them"
                )
            record = _record(row)
        log.warning("operator_certificate_revoked", name=name, serial=record.serial)
        return record

    def list(self) -> list[CertificateRecord]:
        """Every operator certificate, by name."""
        with self._sessions.read() as session:
            rows = session.scalars(
                select(OperatorCertificate).order_by(OperatorCertificate.name)
            ).all()
            return [_record(r) for r in rows]
