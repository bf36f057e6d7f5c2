"""Operators' client certificates against a real controller, through the real
``upgradectl``: issued on a key that never leaves the operator's directory, presented on the
gateway port with a role like a token's, refused when revoked, expired, from another CA or
reused by name; each refusal changes nothing, and the audit log names ``cert:NAME``."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hitless import pki
from hitless.bus.topology import REPORTS
from hitless.v1 import controller_pb2, controller_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc
from tests.support.certificates import certificate_authority
from tests.support.fleet import Fleet
from tests.support.procs import command
from tests.support.stamped import stamped
from tests.support.wait import wait_for

RUN_TIMEOUT_S = 60
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def _issue(fleet: Fleet, name: str, role: str, out: Path, *flags: str) -> dict[str, Any]:
    """``certs issue`` with the fleet's admin token; its JSON."""
    issued: dict[str, Any] = fleet.cli_json(
        "certs", "issue", "--name", name, "--role", role, "--out", str(out), *flags
    )
    return issued


def _with_certificate(
    fleet: Fleet, cert_dir: Path, *args: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``upgradectl`` presenting the certificate in ``cert_dir`` (no token anywhere in its
    environment) to the controller's gateway port, or ``port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HITLESS_TOKEN")}
    env.update(
        HITLESS_CA_CERT=str(fleet.ca_cert),
        HITLESS_CONTROLLER=f"127.0.0.1:{port or fleet.gateway_port}",
        HITLESS_CLIENT_KEY=str(cert_dir / "key.pem"),
    )
    return subprocess.run(
        [command("upgradectl"), "--client-cert", str(cert_dir / "cert.pem"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _refused_by_cli(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    for said in words:
        assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert any(line.startswith("upgradectl: error: ") for line in result.stderr.splitlines())


def _channel(fleet: Fleet, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    """A channel to the gateway port presenting ``cert_pem``."""
    credentials = pki.channel_credentials(fleet.ca_cert.read_bytes(), key_pem, cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{fleet.gateway_port}", credentials)


def _stub_of(fleet: Fleet, cert_dir: Path) -> tuple[grpc.Channel, Any]:
    channel = _channel(
        fleet, (cert_dir / "key.pem").read_bytes(), (cert_dir / "cert.pem").read_bytes()
    )
    return channel, controller_pb2_grpc.ControllerStub(channel)


def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    return caught.value.details() or ""


def _audit(fleet: Fleet, *actions: str) -> list[tuple[str, str, str]]:
    """(action, actor, outcome status) of the audit rows for ``actions``, newest first."""
    events = fleet.stub().ListAudit(controller_pb2.ListAuditRequest(), timeout=30).events
    return [(e.action, e.actor, e.outcome.split(":")[0]) for e in events if e.action in actions]


def _certificates(fleet: Fleet) -> dict[str, Any]:
    reply = fleet.stub().ListCertificates(controller_pb2.ListCertificatesRequest(), timeout=30)
    return {c.name: c for c in reply.certificates}


def _jobs(fleet: Fleet) -> list[Any]:
    return list(fleet.stub().ListJobs(controller_pb2.ListJobsRequest(), timeout=30).jobs)


def _known_gateway_and_release(fleet: Fleet, tmp_path: Path) -> None:
    """gw-1 known on 1.0.0 (a heartbeat from its own broker user) and a signed release
    1.1.0 published: an upgrade then has something to do."""
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    heartbeat = json.dumps({"gateway_id": "gw-1", "version": "1.0.0", "at": at})
    with fleet.as_gateway("gw-1") as publisher:
        publisher.publish(REPORTS, "gateway.gw-1.heartbeat", heartbeat.encode())
    wait_for(lambda: "gw-1" in fleet.gateways(), timeout=15, what="gw-1's heartbeat recorded")
    artifact = tmp_path / "release-1.1.0.pyz"
    artifact.write_bytes(stamped("1.1.0"))
    metadata = controller_pb2.ReleaseMetadata(
        version="1.1.0", targets_metadata=fleet.signed_targets("1.1.0", artifact)
    )
    fleet.stub().PublishRelease(
        iter(
            [
                controller_pb2.PublishReleaseRequest(metadata=metadata),
                controller_pb2.PublishReleaseRequest(chunk=artifact.read_bytes()),
            ]
        ),
        timeout=30,
    )


def test_a_viewer_certificate_reads_on_the_gateway_port_and_starts_nothing(
    fleet: Fleet, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    issued = _issue(fleet, "alice", "viewer", alice)
    assert issued["name"] == "alice" and issued["role"] == "viewer"
    assert issued["key_file"] == str(alice / "key.pem")
    assert (alice / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((alice / "cert.pem").read_bytes())
    key = serialization.load_pem_private_key((alice / "key.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # certified on the key made here
    assert f"{cert.serial_number:x}" == issued["serial"]
    assert [(a.oid, a.value) for a in cert.subject] == [
        (NameOID.ORGANIZATION_NAME, "hitless"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "operator"),
        (NameOID.COMMON_NAME, "alice"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.operator_of((alice / "cert.pem").read_bytes()) == "alice"
    assert pki.gateway_of((alice / "cert.pem").read_bytes()) is None
    _known_gateway_and_release(fleet, tmp_path)

    listed = _with_certificate(fleet, alice, "gateways", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [g["id"] for g in json.loads(listed.stdout)] == ["gw-1"]

    started = _with_certificate(fleet, alice, "upgrade", "--version", "1.1.0", "--yes")
    _refused_by_cli(
        started,
        4,
        "the controller refused the credentials",
        "cert:alice has the role viewer, and StartUpgrade needs operator: ask an admin for a "
        "certificate with that role",
    )
    assert _jobs(fleet) == []

    # The API port asks for no certificate: none is sent there, and no token either.
    on_api_port = _with_certificate(fleet, alice, "gateways", "list", port=fleet.controller_port)
    _refused_by_cli(on_api_port, 4, "this call needs an API token", "gateway port only")

    (alice / "key.pem").chmod(0o640)
    exposed = _with_certificate(fleet, alice, "gateways", "list")
    _refused_by_cli(exposed, 2, f"private key {alice / 'key.pem'} may be read by others")

    assert _audit(fleet, "IssueCertificate", "StartUpgrade") == [
        ("StartUpgrade", "cert:alice", "PERMISSION_DENIED"),
        ("IssueCertificate", "token:bootstrap-admin", "OK"),
    ]


def test_a_revoked_certificate_is_refused_and_a_name_is_never_reused(
    fleet: Fleet, tmp_path: Path
) -> None:
    bob, carol = tmp_path / "bob", tmp_path / "carol"
    _issue(fleet, "bob", "operator", bob)
    _issue(fleet, "carol", "admin", carol, "--expires", "30d")
    assert _with_certificate(fleet, bob, "gateways", "list").returncode == 0

    # An admin's certificate does what an admin token does, and the audit names it.
    revoked = _with_certificate(fleet, carol, "certs", "revoke", "bob")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked certificate bob (role operator" in revoked.stdout
    certificates = _certificates(fleet)
    assert certificates["bob"].HasField("revoked_at")
    assert not certificates["carol"].HasField("revoked_at")
    assert certificates["carol"].created_by == "token:bootstrap-admin"

    refused = _with_certificate(fleet, bob, "gateways", "list")
    _refused_by_cli(refused, 4, "the client certificate cert:bob was revoked at")
    channel, stub = _stub_of(fleet, bob)
    with channel:
        details = _refused(
            lambda: stub.StartUpgrade(
                controller_pb2.StartUpgradeRequest(version="1.1.0"), timeout=10
            ),
            UNAUTHENTICATED,
        )
    assert "cert:bob was revoked at" in details
    assert _jobs(fleet) == []

    # The name bob is spent: issuing it again is refused and leaves no key behind.
    again = tmp_path / "bob-again"
    reused = fleet.cli(
        "certs", "issue", "--name", "bob", "--role", "viewer", "--out", str(again), check=False
    )
    _refused_by_cli(reused, 4, "a certificate named bob was issued already")
    assert not (again / "key.pem").exists() and not (again / "cert.pem").exists()
    assert _certificates(fleet) == certificates

    listed = json.loads(_with_certificate(fleet, carol, "certs", "list", "--json").stdout)
    assert [(c["name"], c["role"], c["revoked_at"] is not None) for c in listed] == [
        ("bob", "operator", True),
        ("carol", "admin", False),
    ]
    assert _audit(fleet, "IssueCertificate", "RevokeCertificate", "StartUpgrade") == [
        ("IssueCertificate", "token:bootstrap-admin", "ALREADY_EXISTS"),
        ("StartUpgrade", "cert:bob", "UNAUTHENTICATED"),
        ("RevokeCertificate", "cert:carol", "OK"),
        ("IssueCertificate", "token:bootstrap-admin", "OK"),
        ("IssueCertificate", "token:bootstrap-admin", "OK"),
    ]


def test_certificates_from_another_ca_or_expired_are_refused_at_the_handshake(
    fleet: Fleet, tmp_path: Path
) -> None:
    _issue(fleet, "alice", "admin", tmp_path / "alice")
    # alice's name in a certificate from a CA of the attacker's own.
    stranger = certificate_authority(tmp_path / "stranger")
    key = pki.new_key()
    forged = stranger.issue_operator(
        pki.certificate_request(key, "alice"), "alice", datetime.now(UTC)
    )
    with _channel(fleet, pki.key_pem(key), forged.pem) as channel:
        _refused(
            lambda: controller_pb2_grpc.ControllerStub(channel).ListCertificates(
                controller_pb2.ListCertificatesRequest(), timeout=10
            ),
            UNAVAILABLE,
        )
    forged_dir = tmp_path / "forged"
    forged_dir.mkdir()
    (forged_dir / "cert.pem").write_bytes(forged.pem)
    (forged_dir / "key.pem").write_bytes(pki.key_pem(key))
    (forged_dir / "key.pem").chmod(0o600)
    _refused_by_cli(
        _with_certificate(fleet, forged_dir, "certs", "list"),
        4,
        "was not issued by the controller's CA",
    )

    # Three seconds: long enough to open a connection while it is valid, which TLS does
    # not check again; the controller does, on every call.
    brief = tmp_path / "brief"
    asked = datetime.now(UTC)
    issued = _issue(fleet, "brief", "admin", brief, "--expires", "3s")
    answered = datetime.now(UTC)
    expires_at = datetime.fromisoformat(issued["expires_at"])
    # Three seconds from when the controller issued it, somewhere between the two.
    assert asked + timedelta(seconds=2) < expires_at < answered + timedelta(seconds=4)
    channel, stub = _stub_of(fleet, brief)
    with channel:
        list_certificates = partial(
            stub.ListCertificates, controller_pb2.ListCertificatesRequest(), timeout=10
        )
        assert "brief" in [c.name for c in list_certificates().certificates]

        def refused() -> str | None:
            try:
                list_certificates()
            except grpc.RpcError as exc:
                return exc.details() if exc.code() == UNAUTHENTICATED else None
            return None

        details = wait_for(refused, timeout=15, what="the certificate to expire", interval=0.2)
    assert "the client certificate cert:brief expired at" in details
    assert datetime.now(UTC) >= expires_at
    # A new connection does not get past the handshake.
    channel, stub = _stub_of(fleet, brief)
    with channel:
        _refused(
            partial(stub.ListCertificates, controller_pb2.ListCertificatesRequest(), timeout=10),
            UNAVAILABLE,
        )
    _refused_by_cli(
        _with_certificate(fleet, brief, "certs", "revoke", "alice"),
        4,
        f"the client certificate {brief / 'cert.pem'} is valid from",
        "not now",
    )
    assert "(expired)" in fleet.cli("certs", "list").stdout
    assert not _certificates(fleet)["alice"].HasField("revoked_at")
    assert _audit(fleet, "RevokeCertificate") == []


def test_a_gateway_certificate_may_not_act_as_an_operator(fleet: Fleet) -> None:
    key = pki.new_key()
    with fleet.channel() as channel:
        enrolled = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(
                gateway_id="gw-1",
                code=fleet.enrollment_code("gw-1"),
                csr_pem=pki.certificate_request(key, "gw-1"),
            ),
            timeout=30,
        )
    with _channel(fleet, pki.key_pem(key), enrolled.certificate_pem) as channel:
        details = _refused(
            lambda: controller_pb2_grpc.ControllerStub(channel).IssueCertificate(
                controller_pb2.IssueCertificateRequest(
                    name="gw-owned", role="admin", csr_pem=pki.certificate_request(key, "x")
                ),
                timeout=10,
            ),
            PERMISSION_DENIED,
        )
    assert "gateway gw-1's certificate may download releases and nothing else" in details
    assert _certificates(fleet) == {}
