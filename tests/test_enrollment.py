"""Gateway enrollment and TLS on every port of the controller, attacked with real
processes: the controller, ``gateway-daemon`` (enrolling and running), ``upgradectl`` and
the broker. Each attack checks that it changed nothing: enrollments, tokens, jobs, audit
rows, files."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller_svc.limits import DEFAULT_LIMITS
from hitless import pki
from hitless.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)
from tests.support.certificates import certificate_authority, gateway_identity
from tests.support.fleet import Fleet
from tests.support.procs import Procs, command
from tests.support.rabbit import Management, amqp_url
from tests.support.tls_clients import gateway_channel, load_identity, served_certificate
from tests.support.wait import wait_for

BASE = "1.0.0"  # the version of the installed package (pyproject.toml)
RUN_TIMEOUT_S = 60
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=os.environ.copy() if env is None else env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _enroll(
    fleet: Fleet, gateway_id: str, code: str, state_dir: Path
) -> subprocess.CompletedProcess[str]:
    """``gateway-daemon enroll``, as an operator runs it on the gateway."""
    return _run(
        [
            command("gateway-daemon"), "enroll",
            "--id", gateway_id,
            "--code", code,
            "--ca-cert", str(fleet.ca_cert),
            "--controller", fleet.controller_address,
            "--state-dir", str(state_dir),
        ]
    )  # fmt: skip


def _cli_as(fleet: Fleet, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``upgradectl`` calling with ``token`` instead of the fleet's admin token."""
    return _run([command("upgradectl"), *args], {**os.environ, **fleet.env, "HITLESS_TOKEN": token})


def _refused(call: Callable[[], Any], code: grpc.StatusCode) -> str:
    """The details of the refusal ``call`` meets, after checking its status is ``code``."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    return caught.value.details() or ""


def _audit(fleet: Fleet, *actions: str) -> list[tuple[str, str, str]]:
    """(action, actor, outcome) of the audit rows for ``actions``, newest first."""
    events = fleet.stub().ListAudit(controller_pb2.ListAuditRequest(), timeout=30).events
    return [(e.action, e.actor, e.outcome) for e in events if e.action in actions]


def _enrollments(fleet: Fleet) -> dict[str, controller_pb2.GatewayEnrollment]:
    reply = fleet.stub().ListEnrollments(controller_pb2.ListEnrollmentsRequest(), timeout=30)
    return {e.gateway_id: e for e in reply.enrollments}


def _token_names(fleet: Fleet) -> list[str]:
    tokens = fleet.stub().ListTokens(controller_pb2.ListTokensRequest(), timeout=30).tokens
    return [t.name for t in tokens]


def _outcomes(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The rows with each outcome cut to its status name."""
    return [(action, actor, outcome.split(":")[0]) for action, actor, outcome in rows]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _fetch_root(channel: grpc.Channel) -> bytes:
    reply = artifacts_pb2_grpc.ArtifactsStub(channel).FetchMetadata(
        artifacts_pb2.MetadataRequest(name="root.json"), timeout=10
    )
    data: bytes = reply.data
    return data


def _download(channel: grpc.Channel, sha256: str) -> bytes:
    chunks = artifacts_pb2_grpc.ArtifactsStub(channel).Download(
        artifacts_pb2.DownloadRequest(sha256=sha256), timeout=30
    )
    return b"".join(chunk.data for chunk in chunks)


def _broker_user_exists(rabbit: Management, name: str) -> bool:
    try:
        rabbit.request("GET", f"/users/{quote(name, safe='')}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise
    return True


def test_plain_text_and_untrusting_clients_are_refused_on_both_ports(
    fleet: Fleet, tmp_path: Path
) -> None:
    tokens, audit = _token_names(fleet), _audit(fleet, "CreateToken", "Enroll")
    code = fleet.enrollment_code("gw-1")
    enrollments = _enrollments(fleet)
    stranger = certificate_authority(tmp_path / "stranger").ca_path.read_bytes()
    admin = (("authorization", f"Bearer {fleet.token}"),)

    def attempts(channel: grpc.Channel) -> list[Callable[[], Any]]:
        controller = controller_pb2_grpc.ControllerStub(channel)
        enrollment = enrollment_pb2_grpc.EnrollmentStub(channel)
        request = enrollment_pb2.EnrollRequest(
            gateway_id="gw-1", code=code, csr_pem=pki.certificate_request(pki.new_key(), "gw-1")
        )
        return [
            lambda: controller.CreateToken(
                controller_pb2.CreateTokenRequest(name="sneaky", role="admin"),
                metadata=admin,
                timeout=10,
            ),
            lambda: enrollment.Enroll(request, timeout=10),
            lambda: _fetch_root(channel),
        ]

    for address in (fleet.controller_address, f"127.0.0.1:{fleet.gateway_port}"):
        plain = grpc.insecure_channel(address)
        untrusting = grpc.secure_channel(address, pki.channel_credentials(stranger))
        for channel in (plain, untrusting):
            with channel:
                for attempt in attempts(channel):
                    _refused(attempt, UNAVAILABLE)

    # Nothing reached a handler: the code is still unused, no token, no audit row.
    assert _token_names(fleet) == tokens == ["bootstrap-admin"]
    assert _enrollments(fleet) == enrollments
    assert enrollments["gw-1"].state == "PENDING"
    assert _audit(fleet, "CreateToken", "Enroll") == audit == []
    assert _enroll(fleet, "gw-1", code, tmp_path / "gw-1").returncode == 0


def test_upgradectl_names_a_missing_or_wrong_ca_certificate(fleet: Fleet, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HITLESS_CA_CERT"}
    env.update(HITLESS_CONTROLLER=fleet.controller_address, HITLESS_TOKEN=fleet.token)
    upgradectl = command("upgradectl")
    enroll, listing = ["gateways", "enroll", "gw-1"], ["gateways", "list"]

    missing = _run([upgradectl, *enroll], env)
    assert missing.returncode == 4, missing.stderr
    assert "no CA certificate to check the controller with" in missing.stderr
    assert "--ca-cert FILE" in missing.stderr and "HITLESS_CA_CERT" in missing.stderr

    # A CA that did not sign the controller's certificate: nothing is sent, so a change
    # (a new code) is not "unconfirmed" but surely not made, and a read is not retried.
    stranger = certificate_authority(tmp_path / "stranger").ca_path
    wrong = [
        _run([upgradectl, "--ca-cert", str(stranger), *args], env) for args in (enroll, listing)
    ]
    for result in wrong:
        assert result.returncode == 3, result.stderr
        assert (
            f"no TLS connection with the controller at {fleet.controller_address}" in result.stderr
        )
        assert "check that --ca-cert (or HITLESS_CA_CERT) is that controller's" in result.stderr

    not_pem = _run([upgradectl, "--ca-cert", str(fleet.data_dir / "admin.token"), *enroll], env)
    assert not_pem.returncode == 2, not_pem.stderr
    assert "is not a PEM certificate" in not_pem.stderr

    for result in (missing, *wrong, not_pem):
        assert "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith("upgradectl: error: ")
        assert result.stdout == ""
    assert _enrollments(fleet) == {}
    assert _audit(fleet, "CreateEnrollment") == []


def test_a_gateway_enrolls_once_with_its_code(
    fleet: Fleet, tmp_path: Path, rabbit: Management
) -> None:
    asked = datetime.now(UTC)
    made = fleet.cli_json("gateways", "enroll", "gw-1")
    assert set(made) == {"gateway_id", "code", "expires_at"}
    assert made["gateway_id"] == "gw-1" and made["code"].startswith("hge_")
    lifetime = datetime.fromisoformat(made["expires_at"]) - asked
    assert timedelta(hours=23, minutes=59) < lifetime <= timedelta(hours=24, minutes=1)
    assert _enrollments(fleet)["gw-1"].state == "PENDING"

    state_dir = tmp_path / "gw-1"
    enrolled = _enroll(fleet, "gw-1", made["code"], state_dir)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "gateway-daemon: enrolled gw-1" in enrolled.stderr
    where = state_dir / "identity"
    assert _mode(where) == 0o700
    assert {p.name: _mode(p) for p in where.iterdir()} == {
        "key.pem": 0o600, "cert.pem": 0o600, "ca.pem": 0o600, "identity.json": 0o600,
    }  # fmt: skip
    assert (where / "ca.pem").read_bytes() == fleet.ca_cert.read_bytes()
    assert (state_dir / "trust" / "root.json").read_bytes() == fleet.keys.root_json.read_bytes()
    gateway = load_identity(state_dir)
    assert gateway.gateway_port == fleet.gateway_port
    cert = x509.load_pem_x509_certificate(gateway.cert_pem)
    assert pki.gateway_of(gateway.cert_pem) == "gw-1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (
        cert.public_key() == serialization.load_pem_private_key(gateway.key_pem, None).public_key()
    )
    recorded = _enrollments(fleet)["gw-1"]
    assert recorded.state == "ENROLLED"
    assert recorded.certificate_serial == pki.serial_of(gateway.cert_pem)
    # Its own broker user, made by the controller for it.
    assert gateway.broker_user == recorded.broker_user != ""
    assert _broker_user_exists(rabbit, gateway.broker_user)
    with gateway_channel(f"127.0.0.1:{fleet.gateway_port}", gateway) as channel:
        assert _fetch_root(channel) == fleet.keys.root_json.read_bytes()

    # The same code again, from another machine: refused, and nothing issued.
    thief = tmp_path / "thief"
    again = _enroll(fleet, "gw-1", made["code"], thief)
    assert again.returncode == 1, again.stderr
    assert "UNAUTHENTICATED" in again.stderr and "(it was used already)" in again.stderr
    assert "Traceback" not in again.stderr
    assert not (thief / "identity").exists()
    assert _enrollments(fleet)["gw-1"] == recorded

    assert _outcomes(_audit(fleet, "CreateEnrollment", "Enroll")) == [
        ("Enroll", "gateway:gw-1", "UNAUTHENTICATED"),
        ("Enroll", "gateway:gw-1", "OK"),
        ("CreateEnrollment", "token:bootstrap-admin", "OK"),
    ]


def test_an_expired_code_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    made = fleet.cli_json("gateways", "enroll", "gw-1", "--expires", "1s")
    wait_for(
        lambda: _enrollments(fleet)["gw-1"].state == "EXPIRED",
        timeout=10,
        what="the code to expire",
        interval=0.2,
    )
    refused = _enroll(fleet, "gw-1", made["code"], tmp_path / "gw-1")
    assert refused.returncode == 1, refused.stderr
    assert "UNAUTHENTICATED" in refused.stderr
    assert "the enrollment code for gateway gw-1 expired at" in refused.stderr
    assert not (tmp_path / "gw-1" / "identity").exists()
    recorded = _enrollments(fleet)["gw-1"]
    assert recorded.state == "EXPIRED" and recorded.certificate_serial == ""
    ((action, actor, outcome),) = _audit(fleet, "Enroll")
    assert (action, actor) == ("Enroll", "gateway:gw-1")
    assert outcome.startswith("UNAUTHENTICATED: the enrollment code for gateway gw-1 expired")


def test_a_code_made_for_one_gateway_is_refused_for_another(fleet: Fleet, tmp_path: Path) -> None:
    codes = {gid: fleet.enrollment_code(gid) for gid in ("gw-1", "gw-2")}
    for pretender, code in (("gw-2", codes["gw-1"]), ("gw-3", codes["gw-1"])):
        refused = _enroll(fleet, pretender, code, tmp_path / pretender)
        assert refused.returncode == 1, refused.stderr
        assert "UNAUTHENTICATED" in refused.stderr
        assert f"the enrollment code is not valid for gateway {pretender}" in refused.stderr
        assert not (tmp_path / pretender / "identity").exists()
    enrollments = _enrollments(fleet)
    assert {gid: e.state for gid, e in enrollments.items()} == {
        "gw-1": "PENDING",
        "gw-2": "PENDING",
    }

    # Neither code was spent by the attempts: each still enrolls its own gateway.
    for gid, code in codes.items():
        assert _enroll(fleet, gid, code, tmp_path / gid).returncode == 0
        assert pki.gateway_of(load_identity(tmp_path / gid).cert_pem) == gid
    assert _outcomes(_audit(fleet, "Enroll")) == [
        ("Enroll", "gateway:gw-2", "OK"),
        ("Enroll", "gateway:gw-1", "OK"),
        ("Enroll", "gateway:gw-3", "UNAUTHENTICATED"),
        ("Enroll", "gateway:gw-2", "UNAUTHENTICATED"),
    ]


def _tampered(csr_pem: bytes) -> bytes:
    """``csr_pem`` with the last byte of its signature changed: it still parses."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_a_malformed_certificate_request_is_refused_and_the_code_stays_usable(
    fleet: Fleet,
) -> None:
    code = fleet.enrollment_code("gw-1")
    key = pki.new_key()
    # A request that claims to be gw-2 in every name it can carry.
    pretending = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-2")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.GATEWAY_URI_PREFIX + "gw-2")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with fleet.channel() as channel:
        enroll = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll

        def attempt(csr_pem: bytes) -> Any:
            request = enrollment_pb2.EnrollRequest(gateway_id="gw-1", code=code, csr_pem=csr_pem)
            return enroll(request, timeout=10)

        for csr_pem, why in (
            (b"not a certificate request", "is not a PEM PKCS#10 request"),
            (_tampered(pretending), "is not signed by its own key"),
            (b"x" * (64 * 1024), "over 16384 bytes"),
        ):
            details = _refused(partial(attempt, csr_pem), grpc.StatusCode.INVALID_ARGUMENT)
            assert why in details
            assert _enrollments(fleet)["gw-1"].state == "PENDING"
        reply = attempt(pretending)

    # Only the key comes from the request: the names are the CA's.
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert pki.gateway_of(reply.certificate_pem) == "gw-1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    assert cert.public_key() == key.public_key()
    assert _enrollments(fleet)["gw-1"].certificate_serial == pki.serial_of(reply.certificate_pem)
    assert _outcomes(_audit(fleet, "Enroll")) == [
        ("Enroll", "gateway:gw-1", "OK"),
        *[("Enroll", "gateway:gw-1", "INVALID_ARGUMENT")] * 3,
    ]


def test_viewers_and_operators_cannot_make_codes_or_revoke(fleet: Fleet) -> None:
    fleet.enrollment_code("gw-1")
    secrets = {
        role: fleet.stub()
        .CreateToken(controller_pb2.CreateTokenRequest(name=f"{role}-1", role=role), timeout=30)
        .secret
        for role in ("viewer", "operator")
    }
    pending = _enrollments(fleet)

    made = _cli_as(fleet, secrets["viewer"], "gateways", "enroll", "gw-2")
    assert made.returncode == 4, made.stderr
    assert "the controller refused the credentials" in made.stderr
    assert "token:viewer-1 has the role viewer, and CreateEnrollment needs admin" in made.stderr
    revoked = _cli_as(fleet, secrets["viewer"], "gateways", "revoke", "gw-1")
    assert revoked.returncode == 4, revoked.stderr
    assert "RevokeGateway needs admin" in revoked.stderr

    with fleet.channel() as channel:
        operator = controller_pb2_grpc.ControllerStub(channel)
        metadata = (("authorization", f"Bearer {secrets['operator']}"),)
        details = _refused(
            lambda: operator.CreateEnrollment(
                controller_pb2.CreateEnrollmentRequest(gateway_id="gw-2"),
                metadata=metadata,
                timeout=10,
            ),
            PERMISSION_DENIED,
        )
        assert "token:operator-1 has the role operator, and CreateEnrollment needs admin" in details
        _refused(
            lambda: operator.RevokeGateway(
                controller_pb2.RevokeGatewayRequest(gateway_id="gw-1"),
                metadata=metadata,
                timeout=10,
            ),
            PERMISSION_DENIED,
        )

    assert _enrollments(fleet) == pending
    assert _outcomes(_audit(fleet, "CreateEnrollment", "RevokeGateway")) == [
        ("RevokeGateway", "token:operator-1", "PERMISSION_DENIED"),
        ("CreateEnrollment", "token:operator-1", "PERMISSION_DENIED"),
        ("RevokeGateway", "token:viewer-1", "PERMISSION_DENIED"),
        ("CreateEnrollment", "token:viewer-1", "PERMISSION_DENIED"),
        ("CreateEnrollment", "token:bootstrap-admin", "OK"),
    ]


def test_a_gateway_certificate_may_download_and_nothing_else(fleet: Fleet, tmp_path: Path) -> None:
    state_dir = tmp_path / "gw-1"
    assert _enroll(fleet, "gw-1", fleet.enrollment_code("gw-1"), state_dir).returncode == 0
    gateway = load_identity(state_dir)
    gateway_address = f"127.0.0.1:{fleet.gateway_port}"
    enrollments = _enrollments(fleet)
    admin = (("authorization", f"Bearer {fleet.token}"),)

    with gateway_channel(gateway_address, gateway) as channel:
        assert _fetch_root(channel)  # what the certificate is for
        controller = controller_pb2_grpc.ControllerStub(channel)
        calls: dict[str, Callable[[], Any]] = {
            "ListGateways": lambda: controller.ListGateways(
                controller_pb2.ListGatewaysRequest(), timeout=10
            ),
            "StartUpgrade": lambda: controller.StartUpgrade(
                controller_pb2.StartUpgradeRequest(latest=True), timeout=10
            ),
            "CreateToken": lambda: controller.CreateToken(
                controller_pb2.CreateTokenRequest(name="gw-owned", role="admin"), timeout=10
            ),
            # An admin token beside the certificate changes nothing: the certificate says who.
            "CreateToken with a token": lambda: controller.CreateToken(
                controller_pb2.CreateTokenRequest(name="gw-owned", role="admin"),
                metadata=admin,
                timeout=10,
            ),
            "CreateEnrollment": lambda: controller.CreateEnrollment(
                controller_pb2.CreateEnrollmentRequest(gateway_id="gw-2"), timeout=10
            ),
        }
        for name, call in calls.items():
            details = _refused(call, PERMISSION_DENIED)
            assert "gateway gw-1's certificate may download releases and nothing else" in details, (
                name
            )

    jobs = fleet.stub().ListJobs(controller_pb2.ListJobsRequest(), timeout=30).jobs
    assert list(jobs) == []
    assert _token_names(fleet) == ["bootstrap-admin"]
    assert _enrollments(fleet) == enrollments
    assert _outcomes(_audit(fleet, "StartUpgrade", "CreateToken", "CreateEnrollment")) == [
        ("CreateEnrollment", "gateway:gw-1", "PERMISSION_DENIED"),
        ("CreateToken", "gateway:gw-1", "PERMISSION_DENIED"),
        ("CreateToken", "gateway:gw-1", "PERMISSION_DENIED"),
        ("StartUpgrade", "gateway:gw-1", "PERMISSION_DENIED"),
        ("CreateEnrollment", "token:bootstrap-admin", "OK"),
    ]

    # A certificate for gw-1 from another CA, and none at all: the handshake refuses both.
    forged = gateway_identity(certificate_authority(tmp_path / "stranger"), "gw-1", 0)
    ca_pem = fleet.ca_cert.read_bytes()
    for credentials in (
        pki.channel_credentials(ca_pem, forged.key_pem, forged.cert_pem),
        pki.channel_credentials(ca_pem),
    ):
        with grpc.secure_channel(gateway_address, credentials) as channel:
            _refused(partial(_fetch_root, channel), UNAVAILABLE)


def test_a_revoked_gateway_is_refused_and_the_others_still_download(
    fleet: Fleet, rabbit: Management
) -> None:
    gateways = {gid: fleet.start_gateway(gid) for gid in ("gw-1", "gw-2")}
    fleet.wait_gateways(dict.fromkeys(gateways, BASE))
    fleet.release("1.1.0")
    (release,) = fleet.cli_json("releases", "list")
    gateway_address = f"127.0.0.1:{fleet.gateway_port}"
    old = load_identity(fleet.root / "gw-1")
    assert old.broker_user and _broker_user_exists(rabbit, old.broker_user)
    with gateway_channel(gateway_address, old) as channel:
        assert len(_download(channel, release["sha256"])) == release["size"]

    revoked = fleet.cli("gateways", "revoke", "gw-1")
    assert "gw-1" in revoked.stdout
    assert _enrollments(fleet)["gw-1"].state == "REVOKED"

    def refused_to(gateway: Any, why: str) -> None:
        with gateway_channel(gateway_address, gateway) as channel:
            for call in (
                lambda: _fetch_root(channel),
                lambda: _download(channel, release["sha256"]),
            ):
                assert why in _refused(call, UNAUTHENTICATED)

    refused_to(old, "gateway gw-1 was revoked at")
    assert not _broker_user_exists(rabbit, old.broker_user)
    # gw-2 is untouched: it downloads, verifies and swaps as before.
    job = fleet.cli_json("upgrade", "--latest", "--gateways", "gw-2", "--wait", "--yes")
    assert job["state"] == "SUCCEEDED", job
    assert fleet.greeting("gw-2").endswith("1.1.0")

    # A new code does not bring the revoked certificate back; using it replaces it.
    code = fleet.cli_json("gateways", "enroll", "gw-1")["code"]
    assert _enrollments(fleet)["gw-1"].state == "PENDING"
    refused_to(old, "gateway gw-1 was revoked at")
    fleet.procs.stop(gateways["gw-1"])
    enrolled = _enroll(fleet, "gw-1", code, fleet.root / "gw-1")
    assert enrolled.returncode == 0, enrolled.stderr
    new = load_identity(fleet.root / "gw-1")
    assert pki.serial_of(new.cert_pem) != pki.serial_of(old.cert_pem)
    assert _enrollments(fleet)["gw-1"].state == "ENROLLED"
    refused_to(old, "this certificate of gateway gw-1 was replaced by a later enrollment")
    assert _broker_user_exists(rabbit, new.broker_user)
    # The re-enrolled gateway is whole again: commands, download, swap, reports.
    fleet.start_gateway("gw-1")
    job = fleet.cli_json("upgrade", "--latest", "--gateways", "gw-1", "--wait", "--yes")
    assert job["state"] == "SUCCEEDED", job
    assert fleet.greeting("gw-1").endswith("1.1.0")
    assert _outcomes(_audit(fleet, "RevokeGateway")) == [
        ("RevokeGateway", "token:bootstrap-admin", "OK")
    ]


def test_idle_watch_streams_do_not_starve_a_gateways_download(fleet: Fleet) -> None:
    # The controller stays where it is: moving itself to the release first would end the
    # watches (they are resumed by clients, not kept, across a hand-over).
    assert fleet.controller is not None
    fleet.procs.stop(fleet.controller)
    fleet.start_controller(None, "--no-self-upgrade")
    gateway = fleet.start_gateway("gw-1")
    fleet.wait_gateways({"gw-1": BASE})
    fleet.release("1.1.0")
    # The gateway is stopped while the job starts: its command waits in its queue until
    # every watch is open.
    fleet.procs.stop(gateway)
    job = fleet.stub().StartUpgrade(
        controller_pb2.StartUpgradeRequest(
            version="1.1.0", gateway_ids=["gw-1"], request_id=uuid.uuid4().hex
        ),
        timeout=30,
    )
    credentials = grpc.ssl_channel_credentials(fleet.ca_cert.read_bytes())
    metadata = (("authorization", f"Bearer {fleet.token}"),)
    # Each stream on a connection of its own (channels share connections by default).
    channels = [
        grpc.secure_channel(
            fleet.controller_address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(200)
    ]
    try:
        watches = [
            controller_pb2_grpc.ControllerStub(channel).WatchJob(
                controller_pb2.WatchJobRequest(job_id=job.job_id), metadata=metadata, timeout=120
            )
            for channel in channels
        ]
        held_at_most = DEFAULT_LIMITS.watch.per_peer  # all come from one host, 127.0.0.1
        assert held_at_most is not None

        def turned_away() -> list[Any] | None:
            ended = [w for w in watches if w.done()]
            return ended if len(ended) >= len(watches) - held_at_most else None

        refused = wait_for(
            turned_away,
            timeout=60,
            what=f"all but {held_at_most} of {len(watches)} watches to be turned away",
            interval=0.2,
        )
        held = [w for w in watches if not w.done()]
        assert len(held) == held_at_most
        assert {w.code() for w in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(f"already has {held_at_most} watch streams" in w.details() for w in refused)

        fleet.start_gateway("gw-1")

        def finished() -> Any:
            found = fleet.stub().GetJob(controller_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
            return (
                found
                if found.state not in (common_pb2.JOB_STATE_PENDING, common_pb2.JOB_STATE_RUNNING)
                else None
            )

        done = wait_for(
            finished,
            timeout=60,
            what="the upgrade to finish",
            interval=0.2,
            describe=fleet.procs.dump_logs,
        )
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done
        assert fleet.greeting("gw-1").endswith("1.1.0")
        # The held watches were open all along: they saw the download, the rest, the end.
        for watch in held:
            events = list(watch)
            assert events[-1].job_state == common_pb2.JOB_STATE_SUCCEEDED
            states = list(dict.fromkeys(e.gateway_state for e in events if e.gateway_id))
            assert states[-4:] == [
                common_pb2.GATEWAY_JOB_STATE_DOWNLOADING,
                common_pb2.GATEWAY_JOB_STATE_VERIFYING,
                common_pb2.GATEWAY_JOB_STATE_SWAPPING,
                common_pb2.GATEWAY_JOB_STATE_SUCCEEDED,
            ], events
    finally:
        for channel in channels:
            channel.close()


def test_pki_init_makes_the_ca_once_and_the_controller_serves_with_it(
    vhost: str, tmp_path: Path, procs: Procs
) -> None:
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    pki_dir = fleet.data_dir / "pki"
    init = [
        command("controller-svc"), "pki", "init",
        "--data-dir", str(fleet.data_dir),
        "--tls-name", "controller.hitless.test",
    ]  # fmt: skip
    first = _run(init)
    assert first.returncode == 0, first.stderr
    files = {p.name: p for p in pki_dir.iterdir()}
    assert set(files) == {"ca.key", "ca.pem", "server.key", "server.pem"}
    assert all(f"wrote {path}" in first.stdout for path in files.values())
    assert _mode(pki_dir) == 0o700
    assert _mode(files["ca.key"]) == _mode(files["server.key"]) == 0o600
    made = {name: path.read_bytes() for name, path in files.items()}

    again = _run(init)
    assert again.returncode == 0, again.stderr
    assert "is complete already; nothing written" in again.stdout
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == made

    ca = x509.load_pem_x509_certificate(made["ca.pem"])
    server = x509.load_pem_x509_certificate(made["server.pem"])
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "controller.hitless.test" in names.get_values_for_type(x509.DNSName)

    try:
        fleet.start_controller()
        assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == made
        served = served_certificate(fleet.controller_port, fleet.ca_cert, "controller.hitless.test")
        assert served == server
        # gRPC checks the name too: the one --tls-name added, and no other.
        credentials = grpc.ssl_channel_credentials(made["ca.pem"])

        def health_check(name: str) -> None:
            options = [("grpc.ssl_target_name_override", name)]
            with grpc.secure_channel(fleet.controller_address, credentials, options) as channel:
                channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)

        health_check("controller.hitless.test")
        _refused(partial(health_check, "elsewhere.hitless.test"), UNAVAILABLE)
    finally:
        fleet.close()
