"""AMQP over TLS (amqps://): the services check the broker's certificate against the CA
given (HITLESS_AMQP_CA_CERT) and its name against the URL's host, through a real TLS
listener in front of the real broker."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hitless import pki
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.bus.amqp.channel import connect
from hitless.config import BusConfig
from tests.support.rabbit import Management
from tests.support.tls_proxy import TlsTerminator

QUEUE = topology.Queue("hitless.test.amqps", (topology.Binding(topology.EVENTS, "#"),))


def _ca(directory: Path, names: list[str]) -> pki.CertificateAuthority:
    ca = pki.CertificateAuthority(directory)
    ca.init(names, datetime.now(UTC))
    return ca


@pytest.fixture
def broker_tls(tmp_path: Path) -> Iterator[tuple[pki.CertificateAuthority, int]]:
    """A TLS listener for the broker whose certificate names only ``localhost``."""
    ca = _ca(tmp_path / "broker-ca", ["localhost"])
    with TlsTerminator(ca.server_cert_path, ca.server_key_path, ("127.0.0.1", 5672)) as proxy:
        yield ca, proxy.port


def test_a_publisher_over_amqps_delivers(
    broker_tls: tuple[pki.CertificateAuthority, int], vhost: str, rabbit: Management
) -> None:
    ca, port = broker_tls
    bus = BusConfig(f"amqps://guest:guest@localhost:{port}/{vhost}", ca_cert=ca.ca_path)
    publisher = Publisher(bus, queues=[QUEUE], name="amqps").start()
    try:
        assert publisher.wait_connected(30)
        publisher.publish(topology.EVENTS, "release.published", b"over TLS", message_id="tls-1")
    finally:
        publisher.close()
    (message,) = rabbit.get_messages(vhost, QUEUE.name)
    assert message["payload"] == "over TLS"
    assert message["properties"]["user_id"] == "guest"


def test_a_broker_certificate_from_another_ca_is_refused(
    broker_tls: tuple[pki.CertificateAuthority, int], vhost: str, tmp_path: Path,
    rabbit: Management,
) -> None:  # fmt: skip
    _, port = broker_tls
    other = _ca(tmp_path / "other-ca", ["localhost"])
    bus = BusConfig(f"amqps://guest:guest@localhost:{port}/{vhost}", ca_cert=other.ca_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        connect(bus, [QUEUE])
    assert QUEUE.name not in {q["name"] for q in rabbit.request("GET", f"/queues/{vhost}")}


def test_a_broker_certificate_for_another_name_is_refused(
    broker_tls: tuple[pki.CertificateAuthority, int], vhost: str
) -> None:
    ca, port = broker_tls
    # The certificate names localhost; 127.0.0.1 is the same host by another name.
    bus = BusConfig(f"amqps://guest:guest@127.0.0.1:{port}/{vhost}", ca_cert=ca.ca_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        connect(bus, [QUEUE])


def test_an_unreadable_broker_ca_is_a_clear_config_error(tmp_path: Path) -> None:
    from hitless.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot read the broker's CA certificate"):
        BusConfig("amqps://guest:guest@localhost:5671/%2F", ca_cert=tmp_path / "missing.pem")
