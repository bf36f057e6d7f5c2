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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from upgradectl.errors import CredentialsMissing, UsageError

ENV_TOKEN = "HITLESS_TOKEN"
ENV_CA_CERT = "HITLESS_CA_CERT"
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
