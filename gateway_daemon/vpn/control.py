"""The daemon's side of the VPN service's control socket: one request line, one JSON line."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway_daemon.errors import VpnServiceError
from gateway_daemon.vpn import protocol

STATUS_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class VpnStatus:
    pid: int
    version: str
    sessions: int
    listen: str


def status(path: Path, timeout_s: float = STATUS_TIMEOUT_S) -> VpnStatus:
    """What the running service says about itself; VpnServiceError if nothing answers."""
    reply = _ask(path, protocol.STATUS, timeout_s)
    try:
        return VpnStatus(
            int(reply["pid"]), str(reply["version"]), int(reply["sessions"]), str(reply["listen"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VpnServiceError(f"the VPN service at {path} sent a bad status: {reply!r}") from exc


def stop(path: Path, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Stop the service: it drops every session and exits. Returns how many it dropped."""
    reply = _ask(path, protocol.STOP, timeout_s)
    try:
        return int(reply["dropped"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VpnServiceError(
            f"the VPN service at {path} sent a bad stop reply: {reply!r}"
        ) from exc


def _ask(path: Path, command: str, timeout_s: float) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(f"{command}\n".encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise VpnServiceError(
            f"the VPN service's control socket {path} does not answer {command}: {exc}"
        ) from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise VpnServiceError(f"the VPN service at {path} answered {data!r} to {command}") from exc
    if not isinstance(reply, dict) or "error" in reply:
        raise VpnServiceError(f"the VPN service at {path} refused {command}: {reply!r}")
    return reply
