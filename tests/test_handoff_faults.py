"""Handoffs that meet faults, between real gateway processes under real traffic: a new
version that damages the sockets it shares with the old one, one that cannot hold the
descriptors passed to it, descriptor limits too low, and either process dying. Each
test plays an input that once left a gateway not serving, or a job without the reason it
failed (issue 11)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

from gateway_daemon.errors import HandoffFailed
from gateway_daemon.handoff import limits, parent
from gateway_daemon.handoff.parent import Deadlines, ResumeFailed
from gateway_daemon.handoff.shared import SharedState
from gateway_daemon.listeners import Listeners
from gateway_daemon.tunnels.errors import PlaneStateError
from gateway_daemon.tunnels.lab import make_lab
from gateway_daemon.tunnels.plane import Phase, TunnelPlane
from hitless.config import HostPort
from tests.support import fault_releases, releases
from tests.support.gateway_upgrades import GatewayUpgrades, state_name
from tests.support.limited_gateway import (
    descriptor_limits,
    open_descriptors,
    set_descriptor_limits,
    start_without_sys_resource,
)
from tests.support.procs import Procs
from tests.support.rabbit import amqp_url
from tests.support.tunnel_gateway import (
    GATEWAY_ID,
    Traffic,
    holds_socket_of,
    start_gateway,
    write_lab,
)
from tests.support.tunnel_probes import hold_tcp, relay, tcp_round_trip, udp_round_trip
from tests.support.wait import wait_for
from tests.test_hitless_upgrade import assert_clean


def test_a_new_version_that_sets_the_sockets_blocking_and_hangs_leaves_the_old_serving(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """O_NONBLOCK belongs to the open file description both processes hold: the old
    process puts it back while it waits and after the rollback, so its loop never blocks
    in recvfrom or accept. After the rollback it forwards, sets up new tunnel
    connections, and the next upgrade succeeds."""
    # A ready deadline the new version reaches its self-check within on a loaded machine.
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades, handoff_timeout=15.0
    )
    bad = fault_releases.build("1.2.0", tmp_path / "blocking.pyz", "blocking-and-hang")
    old = gateway.serving_pid()
    with Traffic(gateway.sites) as traffic:
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", bad, timeout=45)
        assert state_name(report) == "ROLLED_BACK", report.error
        assert "timed out waiting for the new process to say ready" in report.error
        assert gateway.new_process() is None, "the hanging version must be dead"
        assert fault_releases.BLOCKING_MARK in gateway.proc.log(), "the fault did not happen"
        wait_for(
            lambda: gateway.events("handoff_sockets_set_blocking_by_new_process"),
            timeout=5,
            what="the old process to say it set its sockets non-blocking again",
        )
        result = traffic.stop()
    assert_clean(result)
    assert gateway.serving_pid() == old
    # Idle now: a loop left with blocking sockets would hang in its next read or accept.
    udp_round_trip(gateway.sites, b"after the rollback")
    tcp_round_trip(gateway.sites, b"a new tunnel connection")
    udp_round_trip(gateway.sites, b"and again")
    good = releases.build("1.2.1", tmp_path / "good.pyz")
    report = upgrades.upgrade(GATEWAY_ID, "1.2.1", good)
    assert state_name(report) == "SUCCEEDED", report.error
    gateway.wait_serving(count=2)
    udp_round_trip(gateway.sites, b"through the next version")
    tcp_round_trip(gateway.sites, b"and its tunnels")


def test_a_new_version_that_cannot_hold_the_descriptors_reports_them_truncated(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """300 TCP tunnel connections held (603 descriptors with the shared sockets and the
    counter table), and a new version that limits itself to 128: the kernel truncates
    what it passes (MSG_CTRUNC). The new process says so before it exits, and the job's
    reason is that, not "Connection reset by peer"; every connection relays on."""
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        udp_tunnels=1, tcp_tunnels=1, handoff_timeout=20.0,
    )  # fmt: skip
    small = fault_releases.build("1.2.0", tmp_path / "small.pyz", "low-fd-limit")
    with contextlib.ExitStack() as stack:
        pairs = hold_tcp(stack, gateway.sites, 300)
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", small)
        assert state_name(report) == "ROLLED_BACK", report.error
        assert "descriptors were truncated in transit (MSG_CTRUNC)" in report.error, report.error
        assert "may hold 128 descriptors" in report.error, report.error
        assert "exited with 1" in report.error, report.error
        assert gateway.new_process() is None
        relay(pairs, "after the rollback")


def test_a_soft_descriptor_limit_too_tight_for_the_new_version_is_raised_for_it(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """A gateway holding 100 TCP tunnel connections with little room left under its soft
    limit: it raises the soft limit before it starts the next version, which inherits it
    and so has room for every connection and new ones."""
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        udp_tunnels=1, tcp_tunnels=1, handoff_timeout=20.0,
    )  # fmt: skip
    good = releases.build("1.2.0", tmp_path / "good.pyz")
    old = gateway.serving_pid()
    with contextlib.ExitStack() as stack:
        pairs = hold_tcp(stack, gateway.sites, 100)
        held = open_descriptors(old)
        set_descriptor_limits(old, held + 32, 20000)
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", good)
        assert state_name(report) == "SUCCEEDED", report.error
        gateway.wait_serving(count=2)
        new = gateway.serving_pid()
        soft, hard = descriptor_limits(new)
        assert soft >= held + limits.HEADROOM, (soft, held)
        assert hard == 20000
        relay(pairs, "through the new version")


def test_a_descriptor_limit_that_cannot_be_raised_refuses_the_handoff_with_the_reason(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """The hard limit leaves the new version no room for what it would receive and its
    own, and the gateway may not raise it (no CAP_SYS_RESOURCE): the handoff is refused
    before anything is started, with the numbers and what to change."""
    gateway = start_without_sys_resource(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades
    )
    good = releases.build("1.2.0", tmp_path / "good.pyz")
    old = gateway.serving_pid()
    with contextlib.ExitStack() as stack:
        pairs = hold_tcp(stack, gateway.sites, 100)
        held = open_descriptors(old)
        set_descriptor_limits(old, held + 32, held + 32)
        report = upgrades.upgrade(GATEWAY_ID, "1.2.0", good)
        assert state_name(report) == "ROLLED_BACK", report.error
        assert f"RLIMIT_NOFILE is {held + 32} (hard {held + 32})" in report.error, report.error
        assert "may not raise its hard limit" in report.error, report.error
        assert "raise the gateway's descriptor limit (LimitNOFILE" in report.error
        assert gateway.serving_pid() == old and gateway.new_process() is None
        assert "handoff_child_priority_restored" not in gateway.proc.log(), "it was started"
        relay(pairs, "after the refusal")


def test_the_old_process_killed_while_the_new_one_checks_itself_leaves_the_new_one_serving(
    vhost: str, tmp_path: Path, procs: Procs, upgrades: GatewayUpgrades
) -> None:
    """SIGKILL the old process once the new one holds every socket and is still in its
    self-check: the new process finds the old one gone (EOF, and its pidfd), starts from
    the snapshot and the shared counter table, and serves; the job succeeds instead of
    sitting in SWAPPING. UDP traffic goes on through it (only what the dead process had
    read may be lost), and its TCP tunnel connections are not reset: each relays on,
    byte-exact. (A TCP connection with bytes in the dead process's own buffers at that
    moment loses them and is reset: that is what was in flight in it.)"""
    gateway = start_gateway(
        procs, tmp_path, amqp_url=amqp_url(vhost), upgrades=upgrades,
        udp_tunnels=6, tcp_tunnels=1, handoff_timeout=20.0,
    )  # fmt: skip
    slow = fault_releases.build("1.2.0", tmp_path / "slow.pyz", "selfcheck-outlives-old")
    old = gateway.serving_pid()
    udp_port = gateway.sites.udp_gateway[1]
    killed: list[int] = []

    def kill_old_when_the_new_one_holds_the_sockets() -> bool:
        pid = gateway.new_process()
        if pid is None or not holds_socket_of(pid, old, udp_port):
            return False
        os.kill(old, signal.SIGKILL)
        killed.append(pid)
        return True

    udp_sites = dataclasses.replace(
        gateway.sites, sites=tuple(s for s in gateway.sites.sites if s.protocol == "udp")
    )
    with contextlib.ExitStack() as stack:
        pairs = hold_tcp(stack, gateway.sites, 20)
        relay(pairs, "before")
        with Traffic(udp_sites) as traffic:
            killer = threading.Thread(
                target=lambda: wait_for(
                    kill_old_when_the_new_one_holds_the_sockets,
                    timeout=20,
                    what="the new process to hold the gateway's sockets",
                    interval=0.01,
                ),
                daemon=True,
            )
            killer.start()
            report = upgrades.upgrade(GATEWAY_ID, "1.2.0", slow, timeout=30)
            killer.join(20)
            assert killed, f"the old process was not killed; {state_name(report)}: {report.error}"
            assert state_name(report) == "SUCCEEDED", report.error
            wait_for(
                lambda: gateway.events("tunnels_started_alone"),
                timeout=5,
                what="the new process to say it started alone",
            )
            result = traffic.stop()
        assert gateway.serving_pid() == killed[0]
        relay(pairs, "after")
    assert result.udp.received > 0 and result.udp.duplicated == 0, result.table()
    # Only what was in flight in the killed process may be lost: a few of the 2000 a
    # second, not the seconds the job would otherwise wait for its deadline.
    assert result.udp.lost < 200, result.table()
    udp_round_trip(gateway.sites, b"served by the survivor")
    tcp_round_trip(gateway.sites, b"a new tunnel connection to it")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def _spawner(children: list[subprocess.Popen[bytes]]) -> parent.Spawn:
    def spawn(argv: Sequence[str], control_fd: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), pass_fds=(control_fd,))
        children.append(child)
        return child

    return spawn


def _listeners(count: int) -> Listeners:
    plane = Listeners.bind(tuple(HostPort("127.0.0.1", 0) for _ in range(count)), b"old\n")
    plane.start()
    return plane


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(64)


def test_a_new_process_killed_by_a_signal_is_reported_with_the_signal(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    plane = _listeners(2)
    ports = [s.getsockname()[1] for s in plane.sockets()]
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    try:
        with pytest.raises(HandoffFailed, match="the new process was killed by SIGSEGV"):
            parent.hand_off(
                plane, lambda fd: [sys.executable, "-c", crash], {},
                spawn=_spawner(spawned), deadlines=Deadlines(ready_s=10.0),
            )  # fmt: skip
        assert [_greeting(port) for port in ports] == [b"old\n"] * 2
    finally:
        plane.close()


class _CannotResume(Listeners):
    """Listeners whose resume fails, as a data plane's loop that does not come back."""

    def resume(self) -> None:
        raise PlaneStateError("the loop did not run a call within 2.0s")


def test_a_plane_that_cannot_resume_is_a_failure_with_both_reasons(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    plane = _CannotResume.bind((HostPort("127.0.0.1", 0),), b"old\n")
    plane.start()
    try:
        with pytest.raises(ResumeFailed) as caught:
            parent.hand_off(
                plane, lambda fd: [sys.executable, "-c", "raise SystemExit(3)"], {},
                spawn=_spawner(spawned), deadlines=Deadlines(ready_s=10.0),
            )  # fmt: skip
        assert "exited with 3" in str(caught.value)
        assert "then this process's data plane: the loop did not run a call" in str(caught.value)
    finally:
        plane.close()


def test_what_another_process_changed_on_shared_sockets_is_put_back() -> None:
    """The state a passed socket shares with the other process, changed the ways a bad
    new version could (blocking mode, buffer sizes, Nagle, a listener shut down), is
    restored, and nothing is left to report."""
    listener = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with listener, udp:
        udp.bind(("127.0.0.1", 0))
        for sock in (listener, udp):
            sock.setblocking(False)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        state = SharedState()
        state.record([listener, udp])
        # What the other process does to its copies (the same open file descriptions).
        theirs = [socket.socket(fileno=os.dup(s.fileno())) for s in (listener, udp)]
        theirs[0].setblocking(True)
        theirs[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        theirs[0].shutdown(socket.SHUT_RDWR)  # a listener stops listening
        theirs[1].setblocking(True)
        theirs[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for sock in theirs:
            sock.close()
        assert len(state.problems()) == 5, state.problems()
        assert state.guard() == 2
        changed = state.restore()
        assert len(changed) == 3, changed  # Nagle, listening, the buffer
        assert state.problems() == []
        assert not listener.getblocking() and not udp.getblocking()
        with socket.create_connection(listener.getsockname(), timeout=5):
            listener.settimeout(5)
            conn, _ = listener.accept()
            conn.close()


def test_the_tunnel_plane_repairs_its_sockets_before_it_resumes() -> None:
    """Another holder of the plane's sockets set them to blocking mode and shut the
    tunnel listener down: ``resume()`` puts both back before the loop reads again, so
    it forwards and accepts new tunnel connections."""
    config, lab_sites = make_lab(1, 1)
    with TunnelPlane.from_config(config) as plane:
        sites = lab_sites.at(plane.udp_address, plane.plain_address, plane.tcp_address)
        handed = plane.sockets()
        for handle in handed:
            if handle.fileno() >= 0 and stat.S_ISSOCK(os.fstat(handle.fileno()).st_mode):
                with socket.socket(fileno=os.dup(handle.fileno())) as theirs:
                    theirs.setblocking(True)
        with socket.socket(fileno=os.dup(plane.tcp.listen_sock.fileno())) as theirs:
            theirs.shutdown(socket.SHUT_RDWR)
        plane.resume()
        assert plane.phase is Phase.SERVING
        assert not plane.udp.tunnel_sock.getblocking()
        udp_round_trip(sites, b"after the repair")
        tcp_round_trip(sites, b"a new connection")
        udp_round_trip(sites, b"and on")


@pytest.mark.parametrize("step", ["after-ready", "after-cutover"])
def test_the_old_process_killed_during_the_cutover_leaves_the_new_one_serving(
    tmp_path: Path, step: str
) -> None:
    """The old process dies after the new one said ready: before it paused and sent the
    final state (the new one starts from the snapshot, alone), or right after it sent
    it (the new one has it, and STARTED has nowhere to go). Either way the new one
    serves: tunnels forward both ways and take new connections."""
    tunnels, sites = write_lab(tmp_path, 1, 1)
    old = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dying_parent", str(tunnels), step],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        bufsize=0,  # unbuffered: select() on the pipe says whether a line is there
    )  # fmt: skip
    assert old.stdin is not None and old.stdout is not None
    with old:
        try:
            _await_line(old.stdout, "serving")
            udp_round_trip(sites, b"before")
            old.stdin.write(b"go\n")
            old.stdin.flush()
            assert old.wait(timeout=30) == -signal.SIGKILL
            # The new process inherited the old one's stdout (and logs there).
            lines = _await_line(old.stdout, "serving ")
            from_snapshot = any("tunnels_started_alone" in line for line in lines)
            assert from_snapshot == (step == "after-ready"), lines
            udp_round_trip(sites, b"through the survivor")
            tcp_round_trip(sites, b"a new tunnel connection")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, signal.SIGKILL)


def _await_line(stream: IO[bytes], prefix: str, timeout: float = 30.0) -> list[str]:
    """The lines of ``stream`` up to the first that starts with ``prefix``."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([stream], [], [], left)[0], f"no {prefix!r} line"
        line = stream.readline().decode()
        assert line, f"the stream ended before a {prefix!r} line"
        lines.append(line)
        if line.startswith(prefix):
            return lines
