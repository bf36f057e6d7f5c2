"""Tunnel crypto without sockets: handshake, sealing, the replay window, state encoding."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway_daemon.tunnels import state as st
from gateway_daemon.tunnels.config import Forward, TunnelsConfig, TunnelSpec
from gateway_daemon.tunnels.counters import CounterTable, SlotsExhausted
from gateway_daemon.tunnels.errors import HandshakeError, StateError, TunnelConfigError
from gateway_daemon.tunnels.handshake import finish, initiate, public_bytes, respond
from gateway_daemon.tunnels.replay import WINDOW_BITS, ReplayWindow
from gateway_daemon.tunnels.session import Session
from gateway_daemon.tunnels.wire import OVERHEAD

GATEWAY = X25519PrivateKey.generate()
SITE = X25519PrivateKey.generate()


def pair(tunnel_id: int = 7) -> tuple[Session, Session]:
    """(site session, gateway session) from a real handshake."""
    init = initiate(tunnel_id, SITE, GATEWAY.public_key(), timestamp=1000)
    accepted = respond(init.message, GATEWAY, SITE.public_key(), last_timestamp=0)
    return finish(init, accepted.response), accepted.session


def test_handshake_gives_matching_keys_both_ways() -> None:
    site, gateway = pair()
    assert site.send_key == gateway.recv_key and site.recv_key == gateway.send_key
    assert site.send_key != site.recv_key
    assert gateway.open(site.seal(b"up")) == b"up"
    assert site.open(gateway.seal(b"down")) == b"down"


def test_sealed_packet_has_header_and_tag_only_as_overhead() -> None:
    site, _ = pair()
    assert len(site.seal(b"x" * 100)) == 100 + OVERHEAD


def test_tampered_packet_is_rejected_and_does_not_move_the_window() -> None:
    site, gateway = pair()
    packet = bytearray(site.seal(b"payload"))
    for index in (2, 10, len(packet) - 1):  # header (AAD), counter, tag
        bad = bytearray(packet)
        bad[index] ^= 1
        assert gateway.open(bytes(bad)) is None
    assert gateway.open(bytes(packet)) == b"payload"


def test_replayed_packet_is_rejected() -> None:
    site, gateway = pair()
    packet = site.seal(b"once")
    assert gateway.open(packet) == b"once"
    assert gateway.open(packet) is None


def test_out_of_order_within_the_window_is_accepted_once() -> None:
    site, gateway = pair()
    packets = [site.seal(bytes([i])) for i in range(100)]
    for i in reversed(range(100)):
        assert gateway.open(packets[i]) == bytes([i])
    assert all(gateway.open(p) is None for p in packets)


def test_window_rejects_counters_older_than_the_window() -> None:
    window = ReplayWindow()
    assert window.mark(WINDOW_BITS + 10)
    assert not window.check(9)
    assert window.check(11) and window.mark(11)
    assert not window.mark(11)
    assert window.mark(5 * WINDOW_BITS)  # a jump clears what slid out
    assert not window.check(WINDOW_BITS + 10)
    assert window.check(5 * WINDOW_BITS - 1)


def test_window_survives_encoding() -> None:
    window = ReplayWindow()
    for counter in (0, 3, 64, 2000, 2100):
        window.mark(counter)
    copy = ReplayWindow.from_bytes(window.to_bytes())
    assert [copy.check(c) for c in (0, 3, 64, 2000, 2100, 2099, 1000)] == [
        False, False, False, False, False, True, True
    ]  # fmt: skip
    with pytest.raises(StateError, match="replay window"):
        ReplayWindow.from_bytes(b"short")


def test_forged_and_replayed_initiations_are_refused() -> None:
    init = initiate(7, SITE, GATEWAY.public_key(), timestamp=1000)
    intruder = X25519PrivateKey.generate()
    with pytest.raises(HandshakeError, match="does not authenticate"):
        respond(init.message, GATEWAY, intruder.public_key(), last_timestamp=0)
    with pytest.raises(HandshakeError, match="replay"):
        respond(init.message, GATEWAY, SITE.public_key(), last_timestamp=1000)


def test_response_from_a_wrong_gateway_is_refused() -> None:
    impostor = X25519PrivateKey.generate()
    init = initiate(7, SITE, GATEWAY.public_key(), timestamp=1000)
    # The impostor cannot even read the initiation's tag, let alone answer it.
    with pytest.raises(HandshakeError):
        respond(init.message, impostor, SITE.public_key(), last_timestamp=0)


def _config() -> TunnelsConfig:
    return TunnelsConfig(
        GATEWAY.private_bytes_raw(),
        ("127.0.0.1", 0),
        ("127.0.0.1", 0),
        ("127.0.0.1", 0),
        (
            TunnelSpec(1, "udp", public_bytes(SITE), Forward("udp", addr=("127.0.0.1", 9))),
            TunnelSpec(2, "udp", public_bytes(SITE), Forward("tunnel", tunnel=1)),
        ),
    )


def test_config_round_trips_and_rejects_mistakes() -> None:
    config = _config()
    assert TunnelsConfig.from_dict(config.to_dict()) == config
    raw = config.to_dict()
    raw["tunnels"][1]["forward"] = {"tunnel": 9}
    with pytest.raises(TunnelConfigError, match="tunnel 2: forwards to tunnel 9"):
        TunnelsConfig.from_dict(raw)
    raw = config.to_dict()
    raw["tunnels"][0]["peer_public"] = "not base64!"
    with pytest.raises(TunnelConfigError, match=r"tunnels\[0\].peer_public"):
        TunnelsConfig.from_dict(raw)


def test_counters_live_in_a_table_the_next_process_maps() -> None:
    """A session installed in a shared table: another mapping of the same memfd (the
    next process) sees its counters and window as they move, and writes nothing when it
    binds a session to the slot."""
    table = CounterTable.create(4)
    site, session = pair()
    session.send_counter = 41
    session.window.mark(17)
    session.install(table)
    assert session.slot >= 0 and session.send_counter == 41 and not session.window.check(17)
    adopted = CounterTable.adopt(os.dup(table.fileno()))
    try:
        again = Session(session.tunnel_id, session.send_key, session.recv_key,
                        table=adopted, slot=session.slot)  # fmt: skip
        assert again.send_counter == 41 and not again.window.check(17)
        packet = site.seal(b"moved")
        assert session.open(packet) == b"moved"  # the old process accepts it ...
        assert again.open(packet) is None  # ... so the new one rejects its replay
        again.seal(b"next")
        assert session.send_counter == 42  # and its sends move the shared counter
        adopted.keep({session.slot})
        assert adopted.allocate() != session.slot
    finally:
        adopted.close()
        table.close()
    full = CounterTable.create(1)
    full.allocate()
    with pytest.raises(SlotsExhausted):
        full.allocate()
    full.close()


def test_final_state_round_trips_and_bad_state_is_named() -> None:
    table = CounterTable.create(4)
    _, session = pair()
    _, fresh = pair()
    session.install(table)
    fresh.install(table)
    final = st.FinalState(
        udp=[
            st.UdpFinal(1, st.session_ref(session, session), ("127.0.0.1", 5000), 1000),
            st.UdpFinal(2, st.session_ref(fresh, session), None, 0),
            st.UdpFinal(3, None, None, 0),
        ],
        udp_pending=[(True, ("127.0.0.1", 5000), b"queued")],
        tcp_timestamps={3: 99},
    )
    data = st.encode_final(final)
    loaded = st.decode_final(data)
    # The snapshot's session is named only; a new one comes with its keys and slot.
    same, new, none = loaded.udp
    assert same.session is st.SNAPSHOT_SESSION
    _, in_new_process = pair()
    assert st.resolve(same.session, in_new_process, table, "tunnel 1") is in_new_process
    got = st.resolve(new.session, None, table, "tunnel 2")
    assert got is not None and got.send_key == fresh.send_key and got.slot == fresh.slot
    assert none.session is None and same.endpoint == ("127.0.0.1", 5000)
    assert loaded.udp_pending == final.udp_pending and loaded.tcp_timestamps == {3: 99}
    with pytest.raises(StateError, match="never had"):
        st.resolve(same.session, None, table, "tunnel 1")
    with pytest.raises(StateError, match="version"):
        st.decode_final(data[:4] + b"\x00\x09" + data[6:])
    with pytest.raises(StateError, match="truncated"):
        st.decode_final(data[:-3])
    with pytest.raises(StateError, match="not a hitless"):
        st.decode_final(b"\xff" * 20)
    snap = st.decode_snapshot(st.encode_snapshot(st.Snapshot(_config(), [], {}, 4)), table)
    assert snap.config == _config()
    with pytest.raises(StateError, match="counter table of 5 slots"):
        st.decode_snapshot(st.encode_snapshot(st.Snapshot(_config(), [], {}, 5)), table)
    table.close()
