"""TLS for test servers that stand in for the controller: a CA of their own (the product's
``hitless.pki``, as ``controller-svc`` makes on first start) with a server certificate for
the loopback names, and gateway identities issued by it as enrollment would issue them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from gateway_daemon.identity import Identity
from hitless import pki

LOOPBACK_NAMES = ["127.0.0.1", "localhost"]


def certificate_authority(directory: Path) -> pki.CertificateAuthority:
    """A CA in ``directory`` (made there unless it is already) whose server certificate
    covers 127.0.0.1 and localhost; its ``ca_path`` is what clients pass as --ca-cert."""
    ca = pki.CertificateAuthority(directory)
    ca.init(LOOPBACK_NAMES, datetime.now(UTC))
    return ca


def gateway_identity(ca: pki.CertificateAuthority, gateway_id: str, gateway_port: int) -> Identity:
    """What enrollment gives ``gateway_id``: a fresh key, a client certificate for it from
    ``ca``, the CA and the port to download from (``gateway_port``); no broker user."""
    key = pki.new_key()
    issued = ca.issue_gateway(
        pki.certificate_request(key, gateway_id), gateway_id, datetime.now(UTC)
    )
    return Identity(
        gateway_id=gateway_id,
        key_pem=pki.key_pem(key),
        cert_pem=issued.pem,
        ca_pem=ca.ca_path.read_bytes(),
        gateway_port=gateway_port,
    )
