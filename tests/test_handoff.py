"""The handoff protocol with real processes and real sockets: descriptors in batches,
rollback on every kind of failure before the new process serves."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon import forwarding
from gateway_daemon.errors import HandoffFailed, HandoffTimeout
from gateway_daemon.handoff import parent, wire
from gateway_daemon.handoff.parent import Deadlines
from gateway_daemon.listeners import Listeners
from gateway_daemon.tunnels.lab import make_lab
from gateway_daemon.tunnels.plane import TunnelPlane
from gateway_daemon.tunnels.site import TcpSite, Timestamps
from hitless.config import HostPort
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]
FAST = Deadlines(ready_s=3.0, started_s=3.0)
DEADLINE = 5.0


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(64)


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.terminate()
        child.wait(timeout=10)


def _spawner(children: list[subprocess.Popen[bytes]]) -> parent.Spawn:
    def spawn(argv: object, control_fd: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), pass_fds=(control_fd,), cwd=ROOT)  # type: ignore[call-overload]
        children.append(child)
        return child

    return spawn


def _argv(mode: str):  # type: ignore[no-untyped-def]
    return lambda fd: [sys.executable, "-m", "tests.support.handoff_child", str(fd), mode]


def _plane(count: int) -> Listeners:
    plane = Listeners.bind(tuple(HostPort("127.0.0.1", 0) for _ in range(count)), b"parent\n")
    plane.start()
    return plane


def test_more_than_253_sockets_are_handed_over(spawned: list[subprocess.Popen[bytes]]) -> None:
    plane = _plane(300)
    ports = [s.getsockname()[1] for s in plane.sockets()]
    try:
        report = parent.hand_off(plane, _argv("ok"), {}, spawn=_spawner(spawned), deadlines=FAST)
    finally:
        plane.close()  # the parent's copies; the child's stay open
    assert report.descriptors == 300
    assert [_greeting(port) for port in ports] == [b"child\n"] * 300


def test_the_new_process_learns_when_the_old_one_stops_waiting_for_ready(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HELLO carries the ready deadline, so the new process can give its own steps
    (its agent reaching the broker) less time than that, whatever --handoff-timeout is."""
    ready_in = tmp_path / "ready-in"
    monkeypatch.setenv("HANDOFF_CHILD_READY_IN", str(ready_in))
    slow = Deadlines(ready_s=140.0, started_s=3.0)
    plane = _plane(1)
    try:
        parent.hand_off(plane, _argv("ok"), {}, spawn=_spawner(spawned), deadlines=slow)
    finally:
        plane.close()
    left = float(ready_in.read_text())
    assert 100.0 < left <= 140.0
    agent_by = forwarding.agent_deadline(time.monotonic() + left)
    assert agent_by - time.monotonic() > 100.0  # not AGENT_READY_S, 20 s


def test_the_new_agent_deadline_comes_before_the_old_process_stops_waiting() -> None:
    margin = forwarding.AGENT_READY_MARGIN_S
    assert forwarding.agent_deadline(1000.0, 990.0, now=10.0) == 1000.0 - margin
    assert forwarding.agent_deadline(None, now=10.0) == 10.0 + forwarding.AGENT_READY_S
    # A short deadline keeps most of itself for the agent: a tenth is the margin.
    assert forwarding.agent_deadline(15.0, 5.0, now=10.0) == 14.5
    # The new version's own start took what the deadline left: said, not waited for.
    with pytest.raises(HandoffTimeout, match="no time was left for its agent"):
        forwarding.agent_deadline(11.0, 30.0, now=10.0)


def test_260_established_tcp_tunnel_connections_are_handed_over_and_relay_on(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    """520 descriptors of established connections (site side and plain side of each),
    three batches: every connection relays both ways in the new process, byte-exact."""
    count = 260
    config, sites = make_lab(0, 1)
    plane = TunnelPlane.from_config(config)
    sites = sites.at(plane.udp_address, plane.plain_address, plane.tcp_address)
    spec = sites.sites[0]
    static = X25519PrivateKey.from_private_bytes(spec.private_key)
    gateway_key = X25519PublicKey.from_public_bytes(sites.gateway_public)
    stamps = Timestamps()
    pairs: list[tuple[TcpSite, socket.socket]] = []
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(socket.create_server(spec.plain, backlog=count))
        service.settimeout(DEADLINE)
        for _ in range(count):
            site = TcpSite(spec.tunnel, static, gateway_key, sites.tcp_gateway)
            stack.enter_context(site.sock)
            site.connect(stamps, DEADLINE)
            plain, _ = service.accept()
            stack.enter_context(plain)
            plain.settimeout(DEADLINE)
            pairs.append((site, plain))
        try:
            report = parent.hand_off(
                plane, _argv("tunnels"), {}, spawn=_spawner(spawned), deadlines=FAST
            )
        finally:
            plane.close()  # the parent's copies: no FIN, no RST
        assert report.descriptors == 1 + 3 + 2 * count  # the counter table, then sockets
        assert spawned[0].poll() is None, "the new process must serve"
        for i, (site, plain) in enumerate(pairs):
            site.sock.sendall(site.seal_record(f"up {i}".encode()))
            plain.sendall(f"down {i}".encode())
        for i, (site, plain) in enumerate(pairs):
            assert _read(plain, len(f"up {i}")) == f"up {i}".encode()
            assert _read_records(site, len(f"down {i}")) == f"down {i}".encode()


def _read(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def _read_records(site: TcpSite, size: int) -> bytes:
    site.sock.settimeout(DEADLINE)
    got = b""
    while len(got) < size:
        chunk = site.sock.recv(65536)
        assert chunk, f"tunnel connection closed after {got!r}"
        got += site.receive(chunk)
    return got


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("crash", HandoffFailed, "exited with 3"),
        ("hang", HandoffTimeout, "timed out waiting for the new process to say ready"),
        ("abort", HandoffFailed, "self-check failed: config checksum mismatch"),
        ("die-after-ready", HandoffFailed, "control socket"),
    ],
)
def test_a_failed_new_version_is_rolled_back(
    spawned: list[subprocess.Popen[bytes]], mode: str, error: type[Exception], message: str
) -> None:
    plane = _plane(2)
    ports = [s.getsockname()[1] for s in plane.sockets()]
    try:
        with pytest.raises(error, match=message):
            parent.hand_off(plane, _argv(mode), {}, spawn=_spawner(spawned), deadlines=FAST)
        assert all(child.poll() is not None for child in spawned), "the new process must be dead"
        assert [_greeting(port) for port in ports] == [b"parent\n"] * 2
    finally:
        plane.close()


class _LargeSnapshot(Listeners):
    """Listeners whose snapshot is far larger than the control socket's buffer."""

    def snapshot(self) -> bytes:
        return bytes(16 * 1024 * 1024)


def _large_snapshot_plane() -> _LargeSnapshot:
    plane = _LargeSnapshot.bind((HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 0)), b"parent\n")
    plane.start()
    return plane


def _hand_off_in_thread(plane: Listeners, mode: str, spawned: list[subprocess.Popen[bytes]]):  # type: ignore[no-untyped-def]
    """hand_off on a thread (a blocked one must not hang the test); returns the thread
    and a list that receives what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            parent.hand_off(plane, _argv(mode), {}, spawn=_spawner(spawned), deadlines=FAST)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def test_a_new_version_that_never_reads_a_large_snapshot_is_rolled_back_at_the_deadline(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    """16 MiB of snapshot to a new process that never reads: the old process's send
    waits no longer than the ready deadline, then it serves on."""
    plane = _large_snapshot_plane()
    ports = [s.getsockname()[1] for s in plane.sockets()]
    try:
        thread, raised = _hand_off_in_thread(plane, "hang", spawned)
        thread.join(FAST.ready_s + 10)
        assert not thread.is_alive(), "hand_off is still blocked sending the snapshot"
        assert len(raised) == 1 and isinstance(raised[0], HandoffTimeout), raised
        assert "timed out waiting for the new process to read the handoff" in str(raised[0])
        assert all(child.poll() is not None for child in spawned), "the new process must be dead"
        assert [_greeting(port) for port in ports] == [b"parent\n"] * 2
    finally:
        plane.close()


def test_sockets_set_blocking_are_made_non_blocking_again_while_the_snapshot_waits(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new process that sets the shared sockets to blocking mode and then never reads
    the snapshot: the old process puts O_NONBLOCK back while its send waits."""
    mark = tmp_path / "blocked"
    monkeypatch.setenv("HANDOFF_CHILD_MARK", str(mark))
    plane = _large_snapshot_plane()
    sockets = plane.sockets()
    try:
        thread, raised = _hand_off_in_thread(plane, "blocking-hang", spawned)
        wait_for(mark.exists, timeout=FAST.ready_s, what="the new process to set blocking mode")
        wait_for(
            lambda: not any(os.get_blocking(s.fileno()) for s in sockets),
            timeout=FAST.ready_s,
            what="the old process to make its sockets non-blocking again",
            interval=0.005,
        )
        assert thread.is_alive() and not raised, "the fix must come while the send waits"
        thread.join(FAST.ready_s + 10)
        assert len(raised) == 1 and isinstance(raised[0], HandoffTimeout), raised
    finally:
        plane.close()


def test_a_side_that_exits_with_frames_unread_reads_as_closed_not_failed() -> None:
    """A process killed with bytes of the other side unread makes the kernel report
    ECONNRESET, not EOF; the channel says the same as for EOF, whatever the timing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = wire.Channel(ours)
    try:
        channel.send(wire.HELLO, b"{}")
        theirs.close()  # gone with HELLO unread
        with pytest.raises(HandoffFailed, match="the other side closed the control socket"):
            channel.receive(time.monotonic() + 5, "the new process to say ready")
    finally:
        channel.close()


class _Ticks:
    """A send's tick that counts its calls."""

    every_s = 0.01

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_a_send_with_a_deadline_times_out_on_a_silent_reader_and_ticks_meanwhile() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel, ticks = wire.Channel(ours), _Ticks()
    try:
        start = time.monotonic()
        with pytest.raises(HandoffTimeout, match="timed out waiting for the reader"):
            channel.send(
                wire.SNAPSHOT, bytes(8 * 1024 * 1024), deadline=start + 0.3,
                what="the reader", tick=ticks,
            )  # fmt: skip
        assert 0.3 <= time.monotonic() - start < 5
        assert ticks.count >= 5, "tick runs while the send waits"
        theirs.close()
        with pytest.raises(HandoffFailed, match="control socket failed while sending"):
            channel.send(wire.SNAPSHOT, b"x" * 1024, deadline=time.monotonic() + 5)
    finally:
        channel.close()


def test_a_send_to_a_slow_reader_ticks_while_it_makes_progress() -> None:
    """The reader empties the socket every 5 ms: it keeps turning writable before the
    tick's interval is up, and the tick (the old process's guard of the shared sockets)
    must still run on time."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel, ticks, done = wire.Channel(ours), _Ticks(), threading.Event()

    def read_slowly() -> None:
        while theirs.recv(1 << 20):
            if done.wait(0.005):
                return

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    try:
        start = time.monotonic()
        channel.send(wire.SNAPSHOT, bytes(4 * 1024 * 1024), deadline=start + 30, tick=ticks)
        took = time.monotonic() - start
        assert took >= 0.05, f"the reader was not slow enough to show anything ({took:.3f} s)"
        assert ticks.count >= int(took / _Ticks.every_s) // 2, (ticks.count, took)
    finally:
        done.set()
        channel.close()
        reader.join(5)
        theirs.close()
