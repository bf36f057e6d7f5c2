"""The API token ``upgradectl`` sends to the controller, and where it comes from.

The controller admits a call by the token in its gRPC metadata, ``authorization: Bearer
<secret>`` (``upgradectl.client`` adds it to every call, streams included). The secret
comes from, in this order:

1. ``$HITLESS_TOKEN``;
2. the file named by ``--token-file``, else by ``$HITLESS_TOKEN_FILE``.

No flag holds the secret itself: a command line is visible to every user of the machine
(``ps``, ``/proc/PID/cmdline``), a file only its owner can read is not. Whitespace around
the secret (the newline an editor or ``echo`` adds) is ignored. A named file that cannot
be read, or does not hold a token, is a ``UsageError`` naming the file; no token at all
sends none, and the controller's refusal says what is missing.

The secret is never shown: messages name where it came from, and ``Credentials`` leaves
it out of its repr.

Two more credentials live here: the CA certificate that checks the controller
(``load_ca``: ``--ca-cert``, else ``$HITLESS_CA_CERT``; required), and an operator's client
certificate with its key (``load_client_certificate``: ``--client-cert``/``--client-key``,
else ``$HITLESS_CLIENT_CERT``/``$HITLESS_CLIENT_KEY``), checked before anything is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hitless import pki
from upgradectl.errors import CredentialsMissing, UsageError

ENV_TOKEN = "HITLESS_TOKEN"
ENV_CA_CERT = "HITLESS_CA_CERT"
ENV_CLIENT_CERT = "HITLESS_CLIENT_CERT"
ENV_CLIENT_KEY = "HITLESS_CLIENT_KEY"
MAX_CA_FILE_BYTES = 256 * 1024
ENV_TOKEN_FILE = "HITLESS_TOKEN_FILE"
# A secret is tens of bytes; a file much larger than that is the wrong file.
MAX_TOKEN_FILE_BYTES = 4096
# What a gRPC metadata value may carry in a header (printable ASCII), without spaces: one
# word, so "Bearer <secret>" stays two.
_SECRET = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class Credentials:
    """An API token's ``secret`` and ``source``, the words that say where it came from
    (``HITLESS_TOKEN``, ``the file F (--token-file)``)."""

    secret: str = field(repr=False)
    source: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that carries the token (RFC 6750's bearer scheme)."""
        return (("authorization", f"Bearer {self.secret}"),)


def load(
    *, token: str | None, token_file: str | None, env_token_file: str | None
) -> Credentials | None:
    """The token to send: ``token`` (``$HITLESS_TOKEN``), else the file ``token_file``
    (``--token-file``) names, else the file ``env_token_file`` (``$HITLESS_TOKEN_FILE``)
    names; None when none of them is set (empty counts as not set).

    Raises ``UsageError`` naming the source when the file cannot be read or a source does
    not hold one token (printable ASCII without spaces once surrounding whitespace is
    stripped). The secret is never part of a message.
    """
    if token and token.strip():
        return Credentials(_checked(token.strip(), ENV_TOKEN), ENV_TOKEN)
    if token_file:
        path, named_by = Path(token_file), "--token-file"
    elif env_token_file:
        path, named_by = Path(env_token_file), ENV_TOKEN_FILE
    else:
        return None
    source = f"the file {path} ({named_by})"
    return Credentials(_checked(_read(path, named_by), source), source)


def _read(path: Path, named_by: str) -> str:
    """The text of the token file at ``path`` (named by ``named_by``, a flag or variable),
    surrounding whitespace stripped."""
    try:
        # A pipe works too: --token-file <(a password manager's command).
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(
            f"cannot read the token file {path} ({named_by}): {exc.strerror or exc}"
        ) from exc
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise UsageError(
            f"the token file {path} ({named_by}) is larger than {MAX_TOKEN_FILE_BYTES} bytes: "
            "it should hold only the secret 'upgradectl tokens create' printed"
        )
    return data.decode("ascii", errors="replace").strip()


def _checked(secret: str, source: str) -> str:
    if not secret:
        raise UsageError(
            f"{source} is empty: it should hold the secret 'upgradectl tokens create' printed"
        )
    if not _SECRET.fullmatch(secret):
        raise UsageError(
            f"{source} does not hold a token: a token is one word of printable ASCII "
            "(the secret 'upgradectl tokens create' printed)"
        )
    return secret


def load_ca(*, ca_cert: str | None, env_ca_cert: str | None) -> bytes:
    """The PEM certificate of the CA the controller's TLS certificate must chain to: the
    file ``ca_cert`` (``--ca-cert``) names, else ``env_ca_cert`` (``$HITLESS_CA_CERT``).
    Raises CredentialsMissing when neither is set, UsageError naming the file when it
    cannot be read or holds no PEM certificate."""
    if ca_cert:
        path, named_by = Path(ca_cert), "--ca-cert"
    elif env_ca_cert:
        path, named_by = Path(env_ca_cert), ENV_CA_CERT
    else:
        raise CredentialsMissing(
            "no CA certificate to check the controller with: give --ca-cert FILE or set "
            f"{ENV_CA_CERT} (the controller's <data dir>/pki/ca.pem)"
        )
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(
            f"cannot read the CA certificate {path} ({named_by}): {exc.strerror or exc}"
        ) from exc
    try:
        if len(data) > MAX_CA_FILE_BYTES:
            raise ValueError
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UsageError(
            f"{path} ({named_by}) is not a PEM certificate: give the controller's "
            "<data dir>/pki/ca.pem"
        ) from None
    return data


@dataclass(frozen=True)
class ClientCertificate:
    """An operator's client certificate and its key (PEM), and ``source``, the words that
    say where they came from (``the file F (--client-cert)``). The key is left out of the
    repr."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    source: str


def load_client_certificate(
    cert_file: str | None, key_file: str | None, ca_pem: bytes
) -> ClientCertificate:
    """The client certificate ``cert_file`` and its key ``key_file`` (from
    ``--client-cert``/``--client-key`` or the environment), checked before anything is
    sent: the handshake refuses a bad one by closing the connection, which says nothing.

    Raises UsageError when one of the two is missing or not PEM, or the key is not the
    certificate's; ConfigError (exit 2) when the key file may be read by others (the rule
    ssh has for its keys); CredentialsMissing (exit 4) when the certificate is not from the
    CA of ``ca_pem`` or is outside its validity."""
    if not (cert_file and key_file):
        raise UsageError(
            "a client certificate goes with its key: give both --client-cert FILE and "
            f"--client-key FILE (or {ENV_CLIENT_CERT} and {ENV_CLIENT_KEY})"
        )
    cert_path, key_path = Path(cert_file), Path(key_file)
    cert_pem = pki.read_certificate(cert_path, "client certificate")
    key_pem = pki.read_private(key_path)
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):
        raise UsageError(
            f"{key_path} is not an unencrypted PEM private key (--client-key)"
        ) from None
    if key.public_key() != cert.public_key():
        raise UsageError(
            f"{key_path} is not the key of the certificate {cert_path}: give the key.pem "
            f"that 'certs issue' wrote beside it"
        )
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CredentialsMissing(
            f"the client certificate {cert_path} is valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, not now: ask an admin for a "
            "new one (upgradectl certs issue)"
        )
    if not any(_issued_by(cert, ca) for ca in x509.load_pem_x509_certificates(ca_pem)):
        raise CredentialsMissing(
            f"the client certificate {cert_path} was not issued by the controller's CA (the "
            "--ca-cert given): ask that controller's admin for one (upgradectl certs issue)"
        )
    return ClientCertificate(key_pem, cert_pem, f"the file {cert_path}")


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
