"""Enrollment's rules on each database the controller runs on, with the real CA: one use
per code, a revocation that beats an enrollment under way, re-enrollment replacing the
certificate. (The attacks against a running controller are in test_enrollment.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller_svc.db import make_engine, migrate
from controller_svc.enrollment import EnrollmentRefused, Enrollments
from controller_svc.sessions import Sessions
from hitless import pki

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Broker:
    """Records the broker-user calls; ``during_enroll`` runs inside enroll_gateway (the
    moment between the code's claim and the certificate's record)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.during_enroll: list[object] = []

    def enroll_gateway(self, gateway_id: str) -> tuple[str, str]:
        self.calls.append(("enroll", gateway_id))
        for action in self.during_enroll:
            action()  # type: ignore[operator]
        return f"t-gateway-{gateway_id}", "pw"

    def revoke_gateway(self, gateway_id: str) -> None:
        self.calls.append(("revoke", gateway_id))


@pytest.fixture
def setup(db_url: str, tmp_path: Path) -> Iterator[tuple[Enrollments, Broker]]:
    engine = make_engine(db_url)
    migrate(engine)
    ca = pki.CertificateAuthority(tmp_path / "pki")
    ca.init(["localhost"], T0)
    broker = Broker()
    try:
        yield Enrollments(Sessions(engine), ca, broker), broker
    finally:
        engine.dispose()


def _csr() -> bytes:
    return pki.certificate_request(pki.new_key(), "gw-1")


def test_a_revocation_during_enrollment_wins(setup: tuple[Enrollments, Broker]) -> None:
    enrollments, broker = setup
    code, _ = enrollments.create("gw-1", now=T0, lifetime=None, created_by="token:a")
    broker.during_enroll.append(lambda: enrollments.revoke("gw-1", T0 + timedelta(seconds=2)))
    with pytest.raises(EnrollmentRefused, match="revoked while it enrolled"):
        enrollments.enroll("gw-1", code, _csr(), T0 + timedelta(seconds=1))
    (record,) = enrollments.list(T0 + timedelta(seconds=3))
    assert record.state == "REVOKED" and record.certificate_serial == ""
    assert broker.calls == [("enroll", "gw-1"), ("revoke", "gw-1"), ("revoke", "gw-1")]


def test_a_new_code_after_revocation_enrolls_and_replaces_the_certificate(
    setup: tuple[Enrollments, Broker],
) -> None:
    enrollments, _ = setup
    code, _ = enrollments.create("gw-1", now=T0, lifetime=None, created_by="token:a")
    first = enrollments.enroll("gw-1", code, _csr(), T0)
    old_serial = pki.serial_of(first.certificate_pem)
    enrollments.revoke("gw-1", T0 + timedelta(minutes=1))
    assert enrollments.authorise("gw-1", old_serial) is not None
    code, record = enrollments.create(
        "gw-1", now=T0 + timedelta(minutes=2), lifetime=None, created_by="token:a"
    )
    assert record.state == "PENDING"
    # A new code alone does not bring the revoked certificate back.
    assert "revoked" in (enrollments.authorise("gw-1", old_serial) or "")
    second = enrollments.enroll("gw-1", code, _csr(), T0 + timedelta(minutes=3))
    new_serial = pki.serial_of(second.certificate_pem)
    assert enrollments.authorise("gw-1", new_serial) is None
    assert "replaced" in (enrollments.authorise("gw-1", old_serial) or "")
    with pytest.raises(EnrollmentRefused, match="used already"):
        enrollments.enroll("gw-1", code, _csr(), T0 + timedelta(minutes=4))
