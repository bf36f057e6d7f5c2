"""The VPN service process and its supervisor, with real processes and real TLS sessions
(no broker): the line protocol, keepalives, the control socket, stopping with a count,
attaching to a running service, and restarting a crashed one."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_daemon.vpn import certs, control
from gateway_daemon.vpn.config import VpnConfig
from gateway_daemon.vpn.supervisor import Backoff, VpnSupervisor, is_running
from hitless import version
from hitless.config import HostPort
from hitless.errors import ConfigError
from tests.support.procs import Procs, command, free_port
from tests.support.vpn_users import VpnUser, connect_users, service_pid, stop_service
from tests.support.wait import wait_for


@pytest.fixture
def vpn(tmp_path: Path) -> Iterator[VpnConfig]:
    """A VPN config in a state dir of this test's own; whatever service runs there at the
    end is stopped."""
    config = VpnConfig(HostPort("127.0.0.1", free_port()), tmp_path / "gw", keepalive_timeout_s=1)
    try:
        yield config
    finally:
        stop_service(config.state_dir)


def start_service(procs: Procs, config: VpnConfig) -> int:
    argv = [
        command("gateway-daemon"), "vpn-service",
        "--state-dir", str(config.state_dir),
        "--listen", str(config.listen),
        "--keepalive-timeout", str(config.keepalive_timeout_s),
        "--id", "gw-test",
    ]  # fmt: skip
    proc = procs.start("vpn", argv)
    return wait_for(
        lambda: service_pid(config.state_dir) == proc.popen.pid and proc.popen.pid,
        timeout=15,
        what="the VPN service to answer on its control socket",
        describe=procs.dump_logs,
    )


def tls_line_exchange(config: VpnConfig, line: str) -> list[str]:
    """Send one line on a fresh session, return every line the service sends before it
    closes the session."""
    raw = socket.create_connection(("127.0.0.1", config.listen.port), timeout=5)
    context = certs.client_context(config.cert)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(f"{line}\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().splitlines()


def test_sessions_keepalives_and_status(procs: Procs, vpn: VpnConfig) -> None:
    pid = start_service(procs, vpn)
    assert vpn.pid_file.read_text().strip() == str(pid)
    users = connect_users(2, vpn.listen.port, vpn.cert)
    try:
        status = control.status(vpn.control_socket)
        assert (status.sessions, status.version, status.listen) == (
            2,
            version.current(),
            str(vpn.listen),
        )
        # A session that stops sending keepalives is dropped after the timeout (1 s here),
        # while the users that ping stay.
        silent = VpnUser("silent", vpn.listen.port, vpn.cert, keepalive_s=30)
        try:
            wait_for(lambda: control.status(vpn.control_socket).sessions == 3, timeout=5,
                     what="three sessions")  # fmt: skip
            wait_for(lambda: control.status(vpn.control_socket).sessions == 2, timeout=5,
                     what="the silent session dropped")  # fmt: skip
        finally:
            silent.close()
        assert all(u.connected for u in users), [u.dropped for u in users]
        wait_for(lambda: all(u.pongs >= 3 for u in users), timeout=5, what="keepalives answered")
        assert len({u.session_id for u in users}) == 2
    finally:
        for user in users:
            user.close()
    assert tls_line_exchange(vpn, "GET / HTTP/1.0") == ["ERROR expected: HELLO <user>"]
    wait_for(lambda: control.status(vpn.control_socket).sessions == 0, timeout=5,
             what="every session closed")  # fmt: skip


def test_stop_drops_every_session_and_says_how_many(procs: Procs, vpn: VpnConfig) -> None:
    start_service(procs, vpn)
    users = connect_users(3, vpn.listen.port, vpn.cert)
    try:
        assert control.stop(vpn.control_socket) == 3
        wait_for(lambda: not any(u.connected for u in users), timeout=5, what="users dropped")
        assert {u.dropped for u in users} == {"BYE service restarting"}
    finally:
        for user in users:
            user.close()
    (proc,) = procs.started()
    assert proc.popen.wait(timeout=10) == 0
    assert not vpn.pid_file.exists() and not vpn.control_socket.exists()


def test_supervisor_starts_attaches_restarts_and_revives(vpn: VpnConfig) -> None:
    fast = Backoff(initial_s=0.1, max_s=0.5)
    first = VpnSupervisor(vpn, "gw-test", command=[command("gateway-daemon")], backoff=fast)
    first.start()
    try:
        started = first.pid
        assert started is not None and service_pid(vpn.state_dir) == started
    finally:
        first.close()
    assert is_running(started), "closing the supervisor must leave the service running"

    users = connect_users(2, vpn.listen.port, vpn.cert)
    second = VpnSupervisor(vpn, "gw-test", command=[command("gateway-daemon")], backoff=fast)
    second.start()
    try:
        assert second.pid == started, "a new supervisor attaches to the running service"
        assert second.sessions() == 2
        assert second.restart() == 2
        wait_for(lambda: not any(u.connected for u in users), timeout=5, what="users dropped")
        restarted = second.pid
        assert restarted not in (None, started) and service_pid(vpn.state_dir) == restarted
        again = VpnUser("again", vpn.listen.port, vpn.cert)
        again.close()

        assert restarted is not None
        os.kill(restarted, signal.SIGKILL)
        revived = wait_for(
            lambda: (pid := service_pid(vpn.state_dir)) not in (None, restarted) and pid,
            timeout=15,
            what="the supervisor to start the VPN service again after it was killed",
        )
        wait_for(lambda: second.pid == revived, timeout=5, what="the supervisor to watch it")
    finally:
        second.close()
        for user in users:
            user.close()


def test_a_state_dir_too_long_for_the_control_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too long"):
        VpnConfig(HostPort("127.0.0.1", 1), tmp_path / ("x" * 120))
