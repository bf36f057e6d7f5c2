"""VPN users for tests: real TLS clients of the gateway's VPN service that say HELLO and
keep their session alive with PING/PONG until they stop or the service drops them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from gateway_daemon.errors import VpnServiceError
from gateway_daemon.vpn import certs, control
from gateway_daemon.vpn.supervisor import is_running
from tests.support.wait import wait_for

KEEPALIVE_S = 0.2


class VpnUser:
    """One connected user; ``dropped`` says why its session ended, once it has."""

    def __init__(self, name: str, port: int, cert: Path, keepalive_s: float = KEEPALIVE_S):
        self.name = name
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock = certs.client_context(cert).wrap_socket(raw, server_hostname="localhost")
        self._buffer = b""
        self._send(f"HELLO {name}")
        word, _, self.session_id = self._line().partition(" ")
        if word != "WELCOME" or not self.session_id:
            self._sock.close()
            raise AssertionError(f"expected 'WELCOME <session-id>', got {word!r}")
        self.pongs = 0
        self.dropped: str | None = None
        self._keepalive_s = keepalive_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalives, name=f"vpn-{name}", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self.dropped is None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.dropped is None:
            with contextlib.suppress(OSError):
                self._send("BYE")
        self._sock.close()

    def _keepalives(self) -> None:
        while not self._stop.wait(self._keepalive_s):
            try:
                self._send("PING")
                answer = self._line()
            except (OSError, EOFError) as exc:
                self.dropped = f"{type(exc).__name__}: {exc}"
                return
            if answer != "PONG":
                self.dropped = answer
                return
            self.pongs += 1

    def _send(self, line: str) -> None:
        self._sock.sendall(f"{line}\n".encode())

    def _line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise EOFError("the service closed the session")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


def connect_users(count: int, port: int, cert: Path, prefix: str = "user") -> list[VpnUser]:
    return [VpnUser(f"{prefix}-{i}", port, cert) for i in range(count)]


def service_pid(state_dir: Path) -> int | None:
    """The pid of the VPN service that answers on ``state_dir``'s control socket."""
    try:
        return control.status(state_dir / "vpn" / "control.sock").pid
    except VpnServiceError:
        return None


def stop_service(state_dir: Path) -> None:
    """Stop the VPN service a test's gateway left running (it outlives the daemon on
    purpose), and wait until it is gone."""
    try:
        pid = int((state_dir / "vpn" / "service.pid").read_text())
    except (OSError, ValueError):
        return
    if not is_running(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_for(lambda: not is_running(pid), timeout=10, what=f"the VPN service {pid} to exit")
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # a service the test's own supervisor started is its child
