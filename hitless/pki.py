"""The controller's private certificate authority, and the TLS material every gRPC port
and client uses. Keys and certificates are made with ``cryptography``; gRPC does the TLS.

Layout of a CA directory (``<data dir>/pki`` on the controller, 0700)::

    ca.key, ca.pem          the CA (ECDSA P-256, 10 years); ca.pem is what clients trust
    server.key, server.pem  the controller's server certificate (1 year), for its names

A gateway's identity (``<state dir>/identity``, 0700) holds ``key.pem`` (made on the
gateway, never sent), ``cert.pem`` (issued at enrollment from the gateway's CSR) and
``ca.pem``. A gateway certificate names the gateway in its common name and in a URI
subject alternative name ``urn:hitless:gateway:<id>``, and allows only client
authentication (RFC 5280 4.2.1.12, id-kp-clientAuth).

An operator's client certificate (``upgradectl certs issue``: the key is made on the
operator's machine, only its request is sent) is the same kind of certificate, in the
organisational unit ``operator``, naming the operator in its common name and in a URI
``urn:hitless:operator:<name>``.

Keys are written 0600 and refused when others may read them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hitless import names
from hitless.errors import ConfigError, HitlessError, InvalidName

CA_DAYS = 3650
SERVER_DAYS = 365
CLIENT_DAYS = 365
# A server certificate this close to its end is issued again when the controller starts.
RENEW_BEFORE = datetime.timedelta(days=30)
GATEWAY_URI_PREFIX = "urn:hitless:gateway:"
ORGANIZATION = "hitless"
GATEWAY_UNIT = "gateway"
OPERATOR_URI_PREFIX = "urn:hitless:operator:"
OPERATOR_UNIT = "operator"
# An operator certificate's name: the controller's rule for it (and for token names).
OPERATOR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BadCertificateRequest(HitlessError):
    """A certificate signing request that is malformed or not signed by its own key."""


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued: its PEM, serial (hex) and end of validity (UTC)."""

    pem: bytes
    serial: str
    not_after: datetime.datetime


def default_names(listen_host: str) -> list[str]:
    """The names a server certificate covers by default: the listen host (unless it is a
    wildcard address), localhost, the loopback addresses and this machine's host name."""
    found = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if listen_host not in ("", "0.0.0.0", "::", "[::]"):
        found.insert(0, listen_host)
    return list(dict.fromkeys(found))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_private(path: Path) -> bytes:
    """A private key file's bytes. Raises ConfigError when it is missing, or when group or
    others may read it (the same rule as ssh for its keys)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"private key {path} is missing") from None
    if mode & 0o077:
        raise ConfigError(
            f"private key {path} may be read by others (mode {mode & 0o777:o}): chmod 600 {path}"
        )
    return path.read_bytes()


def read_certificate(path: Path, what: str = "certificate") -> bytes:
    """A PEM certificate file's bytes, checked to parse. Raises ConfigError naming the file
    when it is missing or not a PEM certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate ({what})") from None
    return data


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def certificate_request(key: ec.EllipticCurvePrivateKey, gateway_id: str) -> bytes:
    """A PEM PKCS#10 request (RFC 2986) for ``key``, naming the gateway."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _named_by(pem: bytes, prefix: str) -> str | None:
    """What follows ``prefix`` in the first URI subject alternative name of the PEM
    certificate that starts with it; None when it has none."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return None


def gateway_of(pem: bytes) -> str | None:
    """The gateway id a certificate's ``urn:hitless:gateway:`` URI names, or None."""
    return _named_by(pem, GATEWAY_URI_PREFIX)


def operator_of(pem: bytes) -> str | None:
    """The operator name a certificate's ``urn:hitless:operator:`` URI names, or None."""
    return _named_by(pem, OPERATOR_URI_PREFIX)


def _requested_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The ECDSA public key of a PEM PKCS#10 request (RFC 2986) signed by that key.
    Raises BadCertificateRequest otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise BadCertificateRequest(
            "the certificate request is not a PEM PKCS#10 request"
        ) from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise BadCertificateRequest("the certificate request is not signed by its own key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BadCertificateRequest("the certificate request's key must be ECDSA (P-256)")
    return public_key


def serial_of(pem: bytes) -> str:
    """A certificate's serial number in lower-case hex."""
    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}"


class CertificateAuthority:
    """The controller's CA in one directory: made once, then read. Thread-safe for issuing
    (each call only reads the key)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server.key"

    def exists(self) -> bool:
        return (self.directory / "ca.key").exists() and self.ca_path.exists()

    def init(self, server_names: list[str], now: datetime.datetime) -> list[Path]:
        """Make the CA (when there is none) and a server certificate covering
        ``server_names`` (when there is none, it is within RENEW_BEFORE of its end, or it
        does not cover every name). Returns the files written (empty when nothing was)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        written: list[Path] = []
        if not self.exists():
            key = new_key()
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, "hitless controller CA"),
                ]
            )
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .sign(key, hashes.SHA256())
            )
            _write_private(self.directory / "ca.key", key_pem(key))
            _write_public(self.ca_path, cert.public_bytes(serialization.Encoding.PEM))
            written += [self.directory / "ca.key", self.ca_path]
        if self._server_needs_issuing(server_names, now):
            key = new_key()
            issued = self._issue(
                key.public_key(),
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]),
                [_san(n) for n in server_names],
                ExtendedKeyUsageOID.SERVER_AUTH,
                now,
                SERVER_DAYS,
            )
            _write_private(self.server_key_path, key_pem(key))
            _write_public(self.server_cert_path, issued.pem + self.ca_path.read_bytes())
            written += [self.server_key_path, self.server_cert_path]
        return written

    def _server_needs_issuing(self, server_names: list[str], now: datetime.datetime) -> bool:
        if not (self.server_cert_path.exists() and self.server_key_path.exists()):
            return True
        cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
        if cert.not_valid_after_utc - RENEW_BEFORE < now:
            return True
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return True
        covered = set(sans)
        return any(_san(n) not in covered for n in server_names)

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = serialization.load_pem_private_key(read_private(self.directory / "ca.key"), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.directory / 'ca.key'} is not an ECDSA key")
        return key, x509.load_pem_x509_certificate(self.ca_path.read_bytes())

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        now: datetime.datetime,
        days: float,
    ) -> Issued:
        ca_key, ca_cert = self._ca()
        not_after = now + datetime.timedelta(days=days)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            f"{cert.serial_number:x}",
            cert.not_valid_after_utc,
        )

    def issue_gateway(
        self, csr_pem: bytes, gateway_id: str, now: datetime.datetime, days: int = CLIENT_DAYS
    ) -> Issued:
        """A client certificate for ``gateway_id`` on the public key of ``csr_pem``; only the
        key is taken from the request, the names are the CA's. Raises BadCertificateRequest
        when the request does not parse, is not self-signed by its key, or is not ECDSA."""
        names.gateway_id(gateway_id)
        public_key = _requested_key(csr_pem)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, GATEWAY_UNIT),
                x509.NameAttribute(NameOID.COMMON_NAME, gateway_id),
            ]
        )
        return self._issue(
            public_key,
            subject,
            [x509.UniformResourceIdentifier(GATEWAY_URI_PREFIX + gateway_id)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now,
            days,
        )

    def issue_operator(
        self, csr_pem: bytes, name: str, now: datetime.datetime, days: float = CLIENT_DAYS
    ) -> Issued:
        """A client certificate for the operator ``name`` (``OPERATOR_NAME``) on the public
        key of ``csr_pem``, valid for ``days`` (a fraction is kept: 1/86400 is a second).
        Only the key is taken from the request: subject O=hitless, OU=operator, CN=name,
        the URI ``urn:hitless:operator:<name>``, client authentication only (RFC 5280
        4.2.1.12). Raises InvalidName for a bad name, BadCertificateRequest when the request
        does not parse, is not self-signed by its key, or is not ECDSA."""
        if not OPERATOR_NAME.fullmatch(name):
            raise InvalidName(
                f"invalid operator name {names.shown(name)}: use 1-64 ASCII letters, digits, "
                "'.', '_' or '-'"
            )
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_UNIT),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        return self._issue(
            _requested_key(csr_pem),
            subject,
            [x509.UniformResourceIdentifier(OPERATOR_URI_PREFIX + name)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now,
            days,
        )

    def server_credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        """gRPC server credentials from the server certificate. With
        ``require_client_certificate``, a client must present a certificate this CA issued
        (gRPC cannot ask for one optionally: its Python API either requires one or does not
        request one)."""
        return grpc.ssl_server_credentials(
            [(read_private(self.server_key_path), self.server_cert_path.read_bytes())],
            root_certificates=self.ca_path.read_bytes() if require_client_certificate else None,
            require_client_auth=require_client_certificate,
        )


def channel_credentials(
    ca_pem: bytes, key_pem: bytes | None = None, cert_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """gRPC channel credentials that trust ``ca_pem`` only, with a client certificate when
    ``key_pem`` and ``cert_pem`` are given."""
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
