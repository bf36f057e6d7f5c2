"""The SMTP adapter against aiosmtpd on loopback: STARTTLS with login, and the failures
that are the server's problem (SmtpUnavailable) rather than a recipient's."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hitless.config import HostPort
from notifier.config import SmtpConfig
from notifier.errors import SmtpUnavailable
from notifier.mailer import Outcome, SmtpMailer
from tests.support.procs import free_port


class Handler:
    def __init__(self) -> None:
        self.received: list[tuple[str, bool]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += [(rcpt, bool(session.ssl)) for rcpt in envelope.rcpt_tos]
        return "250 OK"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    return AuthResult(success=isinstance(data, LoginPassword) and data.password == b"pw")


def self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def tls_server(tmp_path: Path, port: int) -> Iterator[tuple[Handler, bytes]]:
    cert, key, pem = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = Handler()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
        authenticator=authenticate, auth_required=True,
    )  # fmt: skip
    controller.start()
    yield handler, pem
    controller.stop()


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "test"
    msg["From"] = "hitless@example.com"
    msg["To"] = "ops@example.com"
    msg.set_content("hello")
    return msg


def test_starttls_then_login_then_send(tls_server: tuple[Handler, bytes], port: int) -> None:
    handler, pem = tls_server
    config = SmtpConfig(HostPort("127.0.0.1", port), starttls=True, user="bot", password="pw")
    mailer = SmtpMailer(config, tls=ssl.create_default_context(cadata=pem.decode()))
    with mailer.session() as session:
        result = session.send(message(), "hitless@example.com", "ops@example.com")
    assert result.outcome is Outcome.SENT
    assert handler.received == [("ops@example.com", True)], "expected one message over TLS"


def test_an_untrusted_certificate_is_refused(tls_server: tuple[Handler, bytes], port: int) -> None:
    config = SmtpConfig(HostPort("127.0.0.1", port), starttls=True, user="bot", password="pw")
    with pytest.raises(SmtpUnavailable, match="cannot open an SMTP session"):  # noqa: SIM117
        with SmtpMailer(config).session():
            pass


def test_starttls_asked_of_a_server_without_it(port: int) -> None:
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        config = SmtpConfig(HostPort("127.0.0.1", port), starttls=True)
        with pytest.raises(SmtpUnavailable, match="does not offer STARTTLS"):  # noqa: SIM117
            with SmtpMailer(config).session():
                pass
    finally:
        controller.stop()


def test_nothing_listening_is_unavailable(port: int) -> None:
    config = SmtpConfig(HostPort("127.0.0.1", port), timeout_s=2)
    with pytest.raises(SmtpUnavailable, match="cannot connect to the SMTP server"):  # noqa: SIM117
        with SmtpMailer(config).session():
            pass


class EnvelopeHandler:
    """Keeps each accepted envelope: MAIL FROM options and recipients."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[list[str], list[str]]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        options = [o for o in envelope.mail_options if not o.startswith("SIZE=")]
        self.envelopes.append((options, list(envelope.rcpt_tos)))
        return "250 OK"


@pytest.mark.parametrize("smtputf8", [False, True])
def test_a_non_ascii_local_part_goes_only_with_smtputf8(port: int, smtputf8: bool) -> None:
    handler = EnvelopeHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        with SmtpMailer(SmtpConfig(HostPort("127.0.0.1", port), timeout_s=5)).session() as session:
            international = session.send(message(), "hitless@example.com", "jörg@exämple.com")
            # The session goes on after the refusal: the next recipient is sent.
            plain = session.send(message(), "hitless@example.com", "a@xn--exmple-cua.com")
    finally:
        controller.stop()
    assert plain.outcome is Outcome.SENT
    if smtputf8:
        assert international.outcome is Outcome.SENT
        assert handler.envelopes[0] == (["SMTPUTF8", "BODY=8BITMIME"], ["jörg@exämple.com"])
        assert handler.envelopes[1][1] == ["a@xn--exmple-cua.com"]
    else:
        assert international.outcome is Outcome.REJECTED
        assert international.code == 0
        assert "does not offer SMTPUTF8, which jörg@exämple.com needs" in international.detail
        assert handler.envelopes == [([], ["a@xn--exmple-cua.com"])]
