"""A TunnelPlane on real loopback sockets, driven by the traffic tool and by hand."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.config import Forward, TunnelsConfig, TunnelSpec
from gateway_daemon.tunnels.errors import HandshakeError
from gateway_daemon.tunnels.handshake import public_bytes
from gateway_daemon.tunnels.lab import Sites, make_lab
from gateway_daemon.tunnels.loop import EVENT_READ, SLOW_ROUND_S, Reactor
from gateway_daemon.tunnels.plane import TunnelPlane
from gateway_daemon.tunnels.site import Timestamps, UdpSite
from gateway_daemon.tunnels.traffic import TrafficConfig, main, run_traffic
from tests.support.wait import wait_for


@pytest.fixture
def lab() -> Iterator[tuple[TunnelPlane, Sites]]:
    config, sites = make_lab(3, 1)
    with TunnelPlane.from_config(config) as plane:
        yield plane, sites.at(plane.udp_address, plane.plain_address, plane.tcp_address)


def test_udp_forwarding_loses_and_duplicates_nothing(lab: tuple[TunnelPlane, Sites]) -> None:
    plane, sites = lab
    udp_only = Sites(
        sites.gateway_public,
        sites.udp_gateway,
        sites.plain_gateway,
        sites.tcp_gateway,
        tuple(s for s in sites.sites if s.protocol == "udp"),
    )
    report = run_traffic(TrafficConfig(udp_only, rate=3000, duration=0.7, size=200))
    assert report.udp.sent >= 2000, report.table()
    assert (report.udp.lost, report.udp.duplicated, report.udp.rejected) == (0, 0, 0), (
        report.table()
    )
    assert report.udp.streams == 6
    stats = plane.stats()
    assert stats["udp_rejected"] == 0 and stats["udp_dropped"] == 0, stats


def test_tcp_tunnel_relays_megabytes_byte_exact(lab: tuple[TunnelPlane, Sites]) -> None:
    _, sites = lab
    tcp_only = Sites(
        sites.gateway_public,
        sites.udp_gateway,
        sites.plain_gateway,
        sites.tcp_gateway,
        tuple(s for s in sites.sites if s.protocol == "tcp"),
    )
    report = run_traffic(TrafficConfig(tcp_only, duration=0.5, tcp_rate=8_000_000))
    assert report.tcp.bytes_sent >= 6_000_000, report.table()  # 3+ MB each way
    assert report.tcp.byte_exact and report.tcp.resets == 0, report.table()
    assert report.tcp.bytes_received == report.tcp.bytes_sent


def test_udp_tunnel_to_tunnel_reencrypts_under_the_other_key() -> None:
    gateway, a_key, b_key = (X25519PrivateKey.generate() for _ in range(3))
    config = TunnelsConfig(
        gateway.private_bytes_raw(),
        ("127.0.0.1", 0),
        ("127.0.0.1", 0),
        ("127.0.0.1", 0),
        (
            TunnelSpec(1, "udp", public_bytes(a_key), Forward("tunnel", tunnel=2)),
            TunnelSpec(2, "udp", public_bytes(b_key), Forward("tunnel", tunnel=1)),
        ),
    )
    stamps = Timestamps()
    with TunnelPlane.from_config(config) as plane:
        a = UdpSite(1, a_key, gateway.public_key(), plane.udp_address)
        b = UdpSite(2, b_key, gateway.public_key(), plane.udp_address)
        try:
            a_session = a.handshake(stamps, timeout=5)
            b_session = b.handshake(stamps, timeout=5)
            b.sock.settimeout(5)
            a.sock.settimeout(5)
            a.sock.sendto(a_session.seal(b"from a"), plane.udp_address)
            assert b_session.open(b.sock.recv(2048)) == b"from a"
            b.sock.sendto(b_session.seal(b"from b"), plane.udp_address)
            assert a_session.open(a.sock.recv(2048)) == b"from b"
        finally:
            a.close()
            b.close()


def test_traffic_tool_cli_writes_a_lab_and_reports_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path
    assert main(["--write-lab", str(directory), "--udp-tunnels", "1", "--tcp-tunnels", "1"]) == 0
    config = TunnelsConfig.load(directory / "tunnels.json")
    assert len(config.tunnels) == 2
    sites = Sites.load(directory / "sites.json")
    with TunnelPlane.from_config(
        TunnelsConfig(
            config.private_key, ("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0), config.tunnels
        )
    ) as plane:
        bound = sites.at(plane.udp_address, plane.plain_address, plane.tcp_address)
        (directory / "bound.json").write_text(json.dumps(bound.to_dict()))
        started = time.monotonic()
        code = main(
            ["--sites", str(directory / "bound.json"), "--rate", "500", "--duration", "0.3",
             "--tcp-rate", "100000", "--json"]
        )  # fmt: skip
        assert time.monotonic() - started < 5
    out = capsys.readouterr().out
    assert code == 0, out
    assert '"clean": true' in out


def test_a_site_with_the_wrong_key_gets_no_session(lab: tuple[TunnelPlane, Sites]) -> None:
    plane, sites = lab
    intruder = UdpSite(
        sites.sites[0].tunnel,
        X25519PrivateKey.generate(),
        X25519PublicKey.from_public_bytes(sites.gateway_public),
        plane.udp_address,
    )
    try:
        with pytest.raises(HandshakeError, match="no handshake response"):
            intruder.handshake(Timestamps(), timeout=0.3)
    finally:
        intruder.close()
    assert plane.stats()["udp_handshake_failures"] >= 1


def test_a_slow_round_of_events_is_counted() -> None:
    """A handler that holds the loop longer than SLOW_ROUND_S: the loop counts the round
    (operators see it in the plane's stats and a warning), and a quick one is not."""
    reactor = Reactor("slow-test")
    left, right = socket.socketpair()
    held = threading.Event()
    handled: list[bytes] = []

    def handle(_mask: int) -> None:
        data = left.recv(16)
        if data == b"slow":
            held.wait(SLOW_ROUND_S * 3)  # the slowness under test, not synchronisation
        handled.append(data)

    try:
        reactor.register(left, EVENT_READ, handle)
        reactor.start()
        right.send(b"quick")
        wait_for(lambda: handled == [b"quick"], timeout=5, what="the quick message")
        assert reactor.slow_rounds == 0
        right.send(b"slow")
        wait_for(lambda: reactor.slow_rounds == 1, timeout=5, what="the slow round counted")
        assert reactor.slowest_round_ms >= SLOW_ROUND_S * 1000
    finally:
        reactor.stop(5)
        left.close()
        right.close()


def test_a_call_that_raises_fails_its_caller_and_not_the_loop() -> None:
    """A function run on the loop thread raises: the caller gets the error, the next
    queued call still runs, and the loop goes on handling its sockets."""
    reactor = Reactor("call-test")
    left, right = socket.socketpair()
    handled: list[bytes] = []
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("broken on purpose")

    try:
        reactor.register(left, EVENT_READ, lambda _mask: handled.append(left.recv(16)))
        reactor.start()
        with pytest.raises(ValueError, match="broken on purpose"):
            reactor.call(broken, timeout=5)
        reactor.call(lambda: ran.append("next"), timeout=5)
        assert ran == ["next"]
        right.send(b"still serving")
        wait_for(lambda: handled == [b"still serving"], timeout=5, what="the loop serving")
    finally:
        reactor.stop(5)
        left.close()
        right.close()
