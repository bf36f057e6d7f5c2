"""TLS clients of a real controller, for tests that attack its ports: channels with an
enrolled gateway's certificate, and the certificate a port actually serves."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509

from gateway_daemon import identity


def gateway_channel(address: str, gateway: identity.Identity) -> grpc.Channel:
    """A channel to the controller's gateway port ``address`` (HOST:PORT) presenting the
    client certificate of ``gateway`` and trusting the CA it holds."""
    return grpc.secure_channel(address, gateway.channel_credentials())


def load_identity(state_dir: Path) -> identity.Identity:
    """The identity ``gateway-daemon enroll`` kept in ``state_dir``; AssertionError when
    there is none."""
    found = identity.load(state_dir)
    assert found is not None, f"no gateway identity in {state_dir}"
    return found


def served_certificate(port: int, ca_file: Path, server_name: str) -> x509.Certificate:
    """The certificate the TLS port 127.0.0.1:``port`` presents, once Python's ssl module
    has checked it against ``ca_file`` and ``server_name`` (ssl.SSLCertVerificationError
    when either check fails). Offers ALPN h2, as gRPC clients do."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None, f"127.0.0.1:{port} presented no certificate"
    return x509.load_der_x509_certificate(der)
