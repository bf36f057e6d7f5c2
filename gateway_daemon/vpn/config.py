"""Where the VPN service listens, where its files live, and how long a silent session lasts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hitless.config import HostPort
from hitless.errors import ConfigError

DEFAULT_KEEPALIVE_TIMEOUT_S = 30.0
# A Unix socket's path must fit sockaddr_un (108 bytes on Linux, with the NUL).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class VpnConfig:
    listen: HostPort
    state_dir: Path  # the gateway's state directory; the service's files are in its vpn/
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.keepalive_timeout_s <= 0:
            raise ConfigError(
                f"the VPN keepalive timeout must be > 0 seconds, got {self.keepalive_timeout_s}"
            )
        if len(str(self.control_socket).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"the state directory {self.state_dir} is too long for the VPN service's "
                f"control socket ({self.control_socket}); use a shorter --state-dir"
            )

    @property
    def dir(self) -> Path:
        return self.state_dir / "vpn"

    @property
    def cert(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "key.pem"

    @property
    def pid_file(self) -> Path:
        return self.dir / "service.pid"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"
