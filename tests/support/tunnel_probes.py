"""One site at a time through a gateway's tunnels, each exchange with a deadline: does
the gateway forward both ways, can a new tunnel connection be set up, and many TCP
tunnel connections held open at once."""

from __future__ import annotations

import contextlib
import socket

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.lab import Sites, SiteSpec
from gateway_daemon.tunnels.site import TcpSite, Timestamps, UdpSite

DEADLINE = 5.0


def _keys(sites: Sites, spec: SiteSpec) -> tuple[X25519PrivateKey, X25519PublicKey]:
    return (
        X25519PrivateKey.from_private_bytes(spec.private_key),
        X25519PublicKey.from_public_bytes(sites.gateway_public),
    )


def udp_round_trip(sites: Sites, payload: bytes = b"probe") -> None:
    """Handshake the first UDP tunnel's site afresh, send ``payload`` up and back down;
    AssertionError (or a timeout) unless both arrive within DEADLINE each."""
    spec = next(s for s in sites.sites if s.protocol == "udp")
    site = UdpSite(spec.tunnel, *_keys(sites, spec), sites.udp_gateway)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with site.sock, plain:
        plain.bind(spec.plain)
        plain.settimeout(DEADLINE)
        site.handshake(Timestamps(), DEADLINE)
        site.sock.settimeout(DEADLINE)
        assert site.session is not None
        site.sock.sendto(site.session.seal(payload), sites.udp_gateway)
        assert plain.recv(2048) == payload, "the gateway forwarded something else up"
        plain.sendto(payload[::-1], sites.plain_gateway)
        assert site.session.open(site.sock.recv(2048)) == payload[::-1]


def tcp_round_trip(sites: Sites, payload: bytes = b"probe") -> None:
    """Open a new connection on the first TCP tunnel, handshake, relay ``payload`` both
    ways: the gateway accepts, sets up and serves a tunnel connection."""
    spec = next(s for s in sites.sites if s.protocol == "tcp")
    with socket.create_server(spec.plain) as service:
        service.settimeout(DEADLINE)
        site = TcpSite(spec.tunnel, *_keys(sites, spec), sites.tcp_gateway)
        with site.sock:
            site.connect(Timestamps(), DEADLINE)
            plain, _ = service.accept()
            with plain:
                plain.settimeout(DEADLINE)
                site.sock.sendall(site.seal_record(payload))
                assert read_exactly(plain, len(payload)) == payload
                plain.sendall(payload[::-1])
                assert read_records(site, len(payload)) == payload[::-1]


def hold_tcp(
    stack: contextlib.ExitStack, sites: Sites, count: int
) -> list[tuple[TcpSite, socket.socket]]:
    """``count`` established connections on the first TCP tunnel, each with its plain
    side accepted, all closed when ``stack`` closes."""
    spec = next(s for s in sites.sites if s.protocol == "tcp")
    static, gateway_key = _keys(sites, spec)
    service = stack.enter_context(socket.create_server(spec.plain, backlog=count))
    service.settimeout(DEADLINE)
    stamps = Timestamps()
    pairs = []
    for _ in range(count):
        site = TcpSite(spec.tunnel, static, gateway_key, sites.tcp_gateway)
        stack.enter_context(site.sock)
        site.connect(stamps, DEADLINE)
        plain, _ = service.accept()
        stack.enter_context(plain)
        plain.settimeout(DEADLINE)
        pairs.append((site, plain))
    return pairs


def relay(pairs: list[tuple[TcpSite, socket.socket]], tag: str) -> None:
    """Every held connection carries one message each way, byte-exact."""
    for i, (site, plain) in enumerate(pairs):
        site.sock.sendall(site.seal_record(f"{tag} up {i}".encode()))
        plain.sendall(f"{tag} down {i}".encode())
    for i, (site, plain) in enumerate(pairs):
        up, down = f"{tag} up {i}".encode(), f"{tag} down {i}".encode()
        assert read_exactly(plain, len(up)) == up, f"connection {i} up"
        assert read_records(site, len(down)) == down, f"connection {i} down"


def read_exactly(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def read_records(site: TcpSite, size: int) -> bytes:
    site.sock.settimeout(DEADLINE)
    got = b""
    while len(got) < size:
        chunk = site.sock.recv(65536)
        assert chunk, f"tunnel connection closed after {got!r}"
        got += site.receive(chunk)
    return got
