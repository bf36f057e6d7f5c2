"""Hitless upgrades of a gateway that carries encrypted tunnels, between real processes:
the old version's agent takes the command, downloads and stages a release artifact, and
hands its sockets and tunnel state to the new version (``gateway-daemon run
--handoff-fd`` from that artifact), while the traffic tool plays the sites."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.report import TrafficReport
from gateway_daemon.tunnels.site import Timestamps, UdpSite
from tests.support import releases
from tests.support.gateway_upgrades import GatewayUpgrades, state_name
from tests.support.procs import Procs
from tests.support.rabbit import amqp_url
from tests.support.tunnel_gateway import (
    GATEWAY_ID,
    Traffic,
    holds_socket_of,
    start_gateway,
)
from tests.support.wait import wait_for

DEADLINE = 5.0


def assert_clean(report: TrafficReport) -> None:
    udp, tcp = report.udp, report.tcp
    assert (udp.lost, udp.duplicated, udp.rejected) == (0, 0, 0), report.table()
    assert tcp.byte_exact and tcp.resets == 0, report.table()
    assert udp.received > 0 and tcp.bytes_received > 0, report.table()


def test_three_upgrades_a_b_a_b_under_load_lose_nothing_and_tcp_arrives_byte_exact(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    a = releases.build("1.1.0", tmp_path / "a.pyz")
    b = releases.build("1.2.0", tmp_path / "b.pyz")
    gateway = start_gateway(
        procs,
        tmp_path,
        amqp_url=amqp_url(vhost),
        upgrades=upgrades,
        release=a,
    )
    with Traffic(gateway.sites) as traffic:
        for i, (version, artifact) in enumerate([("1.2.0", b), ("1.1.0", a), ("1.2.0", b)]):
            report = upgrades.upgrade(GATEWAY_ID, version, artifact)
            assert state_name(report) == "SUCCEEDED", report.error
            gateway.wait_serving(count=i + 2)
        wait_for(
            lambda: len(gateway.events("tunnels_cutover")) == 3,
            timeout=DEADLINE,
            what="each new process to forward and log its cutover pause",
        )
        result = traffic.stop()
    assert_clean(result)
    # A long transfer: every TCP tunnel carried bytes through all three handoffs.
    assert result.tcp.bytes_received > 1_000_000, result.table()
    versions = [e["version"] for e in gateway.events("gateway_starting")]
    assert versions == ["1.1.0", "1.2.0", "1.1.0", "1.2.0"]


def test_a_packet_captured_before_the_upgrade_is_rejected_after_it(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    b = releases.build("1.2.0", tmp_path / "b.pyz")
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        udp_tunnels=1, tcp_tunnels=0,
    )  # fmt: skip
    sites = gateway.sites
    spec = sites.sites[0]
    site = UdpSite(
        spec.tunnel,
        X25519PrivateKey.from_private_bytes(spec.private_key),
        X25519PublicKey.from_public_bytes(sites.gateway_public),
        sites.udp_gateway,
    )
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with site.sock, plain:
        plain.bind(spec.plain)
        plain.settimeout(DEADLINE)
        site.handshake(Timestamps(), DEADLINE)
        site.sock.settimeout(DEADLINE)
        assert site.session is not None
        captured = site.session.seal(b"captured")
        site.sock.sendto(captured, sites.udp_gateway)
        assert plain.recv(2048) == b"captured"
        plain.sendto(b"down before", sites.plain_gateway)
        assert site.session.open(site.sock.recv(2048)) == b"down before"

        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", b)
        assert state_name(report) == "SUCCEEDED", report.error

        site.sock.sendto(captured, sites.udp_gateway)
        site.sock.sendto(site.session.seal(b"fresh"), sites.udp_gateway)
        # The fresh packet went after the replay on the same socket: once it is through,
        # the new process has handled the replay, and must not have forwarded it.
        assert plain.recv(2048) == b"fresh"
        # The new process sends on from the old one's counter: the site's replay window
        # would refuse a counter used before.
        plain.sendto(b"down after", sites.plain_gateway)
        assert site.session.open(site.sock.recv(2048)) == b"down after"
    assert gateway.serving_pid() != gateway.proc.popen.pid


def test_broken_new_versions_roll_back_without_loss_and_a_good_one_then_takes_over(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    # Long enough for the crashing version to start and crash on a loaded machine (a
    # shorter one kills it before it can, and its reason is never written); the hanging
    # one is waited for this long.
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        handoff_timeout=10.0,
    )  # fmt: skip
    expected = {
        "crash": "this release is broken: it crashes at start",
        "hang": "timed out waiting for the new process to say ready",
        "unhealthy": "this release's health check fails",
    }
    with Traffic(gateway.sites) as traffic:
        for how, reason in expected.items():
            artifact = releases.build("1.2.0", tmp_path / f"{how}.pyz", broken=how)
            report = upgrades.upgrade(GATEWAY_ID, "1.2.0", artifact)
            assert state_name(report) == "ROLLED_BACK", (how, report.error)
            assert "handoff to 1.2.0 failed" in report.error, report.error
            if how != "crash":  # a crash's reason is in the new process's traceback
                assert reason in report.error, report.error
            assert gateway.new_process() is None, f"the {how} version must be dead"
        good = releases.build("1.2.1", tmp_path / "good.pyz")
        report = upgrades.upgrade(GATEWAY_ID, "1.2.1", good)
        assert state_name(report) == "SUCCEEDED", report.error
        gateway.wait_serving(count=2)
        result = traffic.stop()
    assert_clean(result)
    assert "this release is broken: it crashes at start" in gateway.proc.log()


def test_new_process_killed_in_the_middle_of_the_handoff_rolls_back_without_loss(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    gateway = start_gateway(
        procs,
        tmp_path,
        amqp_url=amqp_url(vhost),
        upgrades=upgrades,
    )
    stuck = releases.build("1.2.0", tmp_path / "stuck.pyz", broken="stuck-in-selfcheck")
    old = gateway.serving_pid()
    udp_port = gateway.sites.udp_gateway[1]
    with Traffic(gateway.sites) as traffic:

        def kill_when_it_holds_the_sockets() -> bool:
            pid = gateway.new_process()
            if pid is None or not holds_socket_of(pid, old, udp_port):
                return False
            os.kill(pid, signal.SIGKILL)
            return True

        killer = threading.Thread(
            target=lambda: wait_for(
                kill_when_it_holds_the_sockets,
                timeout=20,
                what="the new process to hold the gateway's sockets",
                interval=0.01,
            ),
            daemon=True,
        )
        killer.start()
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", stuck, timeout=20)
        killer.join(5)
        assert state_name(report) == "ROLLED_BACK", report.error
        assert "closed the control socket" in report.error, report.error
        result = traffic.stop()
    assert_clean(result)
    assert gateway.serving_pid() == old
