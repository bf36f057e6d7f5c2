"""Handing a live TunnelPlane to a new one in-process, the way the handoff does it between
processes: sockets through SCM_RIGHTS, then describe/snapshot, pause, final state, start.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.plane import Handle, Passable, wrap
from gateway_daemon.tunnels.errors import StateError
from gateway_daemon.tunnels.lab import Sites, make_lab
from gateway_daemon.tunnels.plane import RESUME_COUNTER_SKIP, Phase, TunnelPlane, adopt
from gateway_daemon.tunnels.report import TrafficReport
from gateway_daemon.tunnels.site import TcpSite, Timestamps, UdpSite
from gateway_daemon.tunnels.traffic import TrafficConfig, TrafficRun
from tests.support.wait import wait_for

DEADLINE = 5.0


def pass_sockets(
    socks: list[Passable], description: dict[str, object]
) -> tuple[dict[str, object], list[Handle]]:
    """Send the descriptors (the counter table and the sockets) and their description
    over a Unix socketpair, as the handoff does, and return what the receiving side
    gets."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        body = json.dumps(description).encode()
        socket.send_fds(left, [body], [s.fileno() for s in socks])
        data, fds, flags, _ = socket.recv_fds(right, 1 << 20, len(socks))
    assert not flags & socket.MSG_CTRUNC
    return json.loads(data), [wrap(fd) for fd in fds]


def hand_over(old: TunnelPlane) -> TunnelPlane:
    socks = old.sockets()
    description, received = pass_sockets(socks, old.describe())
    try:
        new = adopt(description, received, old.snapshot())
    except Exception:
        for sock in received:
            sock.close()
        raise
    assert new.phase is Phase.LOADED
    old.pause()
    new.start(old.final_state())
    old.close()
    return new


@pytest.fixture
def lab() -> Iterator[tuple[TunnelPlane, Sites]]:
    config, sites = make_lab(2, 1)
    plane = TunnelPlane.from_config(config, name="tunnels-a")
    try:
        yield plane, sites.at(plane.udp_address, plane.plain_address, plane.tcp_address)
    finally:
        plane.close()


def udp_site(sites: Sites, plane: TunnelPlane) -> tuple[UdpSite, socket.socket]:
    spec = sites.sites[0]
    site = UdpSite(
        spec.tunnel,
        X25519PrivateKey.from_private_bytes(spec.private_key),
        X25519PublicKey.from_public_bytes(sites.gateway_public),
        plane.udp_address,
    )
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(spec.plain)
    plain.settimeout(DEADLINE)
    site.handshake(Timestamps(), DEADLINE)
    site.sock.settimeout(DEADLINE)
    return site, plain


def test_handoff_under_traffic_loses_and_duplicates_nothing(
    lab: tuple[TunnelPlane, Sites],
) -> None:
    old, sites = lab
    run = TrafficRun(TrafficConfig(sites, rate=2000, duration=1.2, tcp_rate=1_000_000))
    result: list[TrafficReport] = []
    thread = threading.Thread(target=lambda: result.append(run.run()), name="traffic")
    thread.start()
    try:
        assert run.started.wait(DEADLINE)
        wait_for(lambda: old.stats()["udp_forwarded"] > 300, timeout=DEADLINE, what="traffic")
        new = hand_over(old)
        try:
            forwarded_by_new = lambda: new.stats()["udp_forwarded"] > 300  # noqa: E731
            wait_for(forwarded_by_new, timeout=DEADLINE, what="the new plane forwarding")
        finally:
            thread.join(DEADLINE + 3)
            new.close()
    finally:
        thread.join(DEADLINE + 3)
    assert not thread.is_alive() and result, "the traffic run did not finish"
    report = result[0]
    assert (report.udp.lost, report.udp.duplicated, report.udp.rejected) == (0, 0, 0), (
        report.table()
    )
    assert report.tcp.byte_exact and report.tcp.resets == 0, report.table()
    assert report.tcp.bytes_received > 500_000, report.table()


def test_packet_replayed_after_the_handoff_is_rejected(lab: tuple[TunnelPlane, Sites]) -> None:
    old, sites = lab
    site, plain = udp_site(sites, old)
    with site.sock, plain:
        assert site.session is not None
        captured = site.session.seal(b"captured")
        site.sock.sendto(captured, old.udp_address)
        assert plain.recv(2048) == b"captured"
        new = hand_over(old)
        with new:
            site.sock.sendto(captured, new.udp_address)
            site.sock.sendto(site.session.seal(b"fresh"), new.udp_address)
            # The fresh packet went after the replay on the same socket: once it is
            # through, the replay was handled, and it must not have been forwarded.
            assert plain.recv(2048) == b"fresh"
            assert new.stats()["udp_rejected"] == 1
            # The gateway's send counter continued where the old process stopped.
            plain.sendto(b"down", new.plain_address)
            assert site.session.open(site.sock.recv(2048)) == b"down"


def test_a_site_that_handshakes_between_snapshot_and_cutover_keeps_its_new_session(
    lab: tuple[TunnelPlane, Sites],
) -> None:
    """The snapshot carries the first session; the site handshakes again before the
    pause: the final state brings the new session (keys and counter-table slot), the new
    process serves with it, and the first session's slot is free for reuse."""
    old, sites = lab
    site, plain = udp_site(sites, old)
    with site.sock, plain:
        socks = old.sockets()
        description, received = pass_sockets(socks, old.describe())
        new = adopt(description, received, old.snapshot())
        with new:
            first = old.udp.tunnels[site.tunnel_id].session
            assert first is not None
            site.handshake(Timestamps(), DEADLINE)  # again, after the snapshot
            site.sock.settimeout(DEADLINE)
            second = old.udp.tunnels[site.tunnel_id].session
            assert second is not None and second is not first and second.slot != first.slot
            assert site.session is not None
            site.sock.sendto(site.session.seal(b"before"), old.udp_address)
            assert plain.recv(2048) == b"before"
            old.pause()
            new.start(old.final_state())
            old.close()
            served = new.udp.tunnels[site.tunnel_id].session
            assert served is not None and served.send_key == second.send_key
            assert served.slot == second.slot
            site.sock.sendto(site.session.seal(b"after"), new.udp_address)
            assert plain.recv(2048) == b"after"
            plain.sendto(b"down", new.plain_address)
            assert site.session.open(site.sock.recv(2048)) == b"down"
            # The first session's slot is free again in the new process.
            live = {t.session.slot for t in new.udp.tunnels.values() if t.session}
            assert first.slot not in live and new.table.in_use == len(live) + len(new.tcp.conns)


def test_tcp_record_split_across_the_handoff_arrives_whole(
    lab: tuple[TunnelPlane, Sites],
) -> None:
    old, sites = lab
    spec = next(s for s in sites.sites if s.protocol == "tcp")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    site = TcpSite(
        spec.tunnel,
        X25519PrivateKey.from_private_bytes(spec.private_key),
        X25519PublicKey.from_public_bytes(sites.gateway_public),
        old.tcp_address,
    )
    with listener, site.sock:
        listener.bind(spec.plain)
        listener.listen(1)
        listener.settimeout(DEADLINE)
        site.connect(Timestamps(), DEADLINE)
        service, _ = listener.accept()
        with service:
            service.settimeout(DEADLINE)
            payload = bytes(range(256)) * 40
            record = site.seal_record(payload)
            half = len(record) // 2
            site.sock.sendall(record[:half])
            wait_for(
                lambda: any(len(c.t_in) == half for c in old.tcp.conns.values()),
                timeout=DEADLINE,
                what="the old plane holding half a record",
            )
            new = hand_over(old)
            with new:
                site.sock.sendall(record[half:] + site.seal_record(b"after"))
                got = bytearray()
                while len(got) < len(payload) + 5:
                    chunk = service.recv(65536)
                    assert chunk, "the plain connection closed"
                    got += chunk
                assert bytes(got) == payload + b"after"
                service.sendall(b"reply")
                site.sock.setblocking(True)
                site.sock.settimeout(DEADLINE)
                reply = b""
                while not reply:
                    reply = site.receive(site.sock.recv(65536))
                assert reply == b"reply"


def test_resume_after_pause_goes_on_serving(lab: tuple[TunnelPlane, Sites]) -> None:
    old, sites = lab
    site, plain = udp_site(sites, old)
    with site.sock, plain:
        assert site.session is not None
        old.sockets()
        old.describe()
        old.snapshot()
        old.pause()
        site.sock.sendto(site.session.seal(b"while paused"), old.udp_address)
        old.final_state()  # the new process "failed" after receiving this
        old.resume()
        assert old.phase is Phase.SERVING
        assert plain.recv(2048) == b"while paused"  # waited in the kernel, not lost
        plain.sendto(b"after rollback", old.plain_address)
        packet = site.sock.recv(2048)
        assert site.session.open(packet) == b"after rollback"
        counter = int.from_bytes(packet[8:16], "big")
        assert counter >= RESUME_COUNTER_SKIP  # never reuses what the new side may have used


def test_adopt_refuses_pieces_that_do_not_fit(lab: tuple[TunnelPlane, Sites]) -> None:
    old, _ = lab
    description, received = pass_sockets(old.sockets(), old.describe())
    try:
        with pytest.raises(StateError, match="4 descriptors, 2 arrived"):
            adopt(description, received[:2], old.snapshot())
        with pytest.raises(StateError, match="counter table must come first"):
            adopt(description, [received[1], received[0], *received[2:]], old.snapshot())
        with pytest.raises(StateError, match="version"):
            adopt({**description, "version": 99}, received, old.snapshot())
        with pytest.raises(StateError, match="snapshot"):
            adopt(description, received, b"{}")
        swapped = [received[0], received[2], received[1], received[3]]
        with pytest.raises(StateError, match="bound to"):
            adopt(description, swapped, old.snapshot())
    finally:
        for sock in received:
            sock.close()
    old.resume()  # the handoff was abandoned before pause(): the freeze is lifted
    assert old.phase is Phase.SERVING and not old.tcp.frozen
