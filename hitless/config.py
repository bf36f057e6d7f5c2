"""Typed configuration, validated when built. Defaults live here, and only here.

Flags and environment variables are read at the CLI edge (each package's ``cli.py``),
which builds these objects; everything below the edge receives them.

| setting          | environment variable  | default                                      |
|------------------|-----------------------|----------------------------------------------|
| broker URL       | HITLESS_AMQP_URL      | amqp://guest:guest@127.0.0.1:5672/%2F        |
| controller       | HITLESS_CONTROLLER    | 127.0.0.1:50051                              |
| data directory   | HITLESS_DATA_DIR      | ~/.local/state/hitless                       |
| database URL     | HITLESS_DB_URL        | sqlite:///<data dir>/controller.db           |
| trust root       | HITLESS_TRUST_ROOT    | none: required (root.json of `keys init`)    |
| API token        | HITLESS_TOKEN, HITLESS_TOKEN_FILE | none (read in upgradectl/credentials.py) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from hitless import names
from hitless.errors import ConfigError

ENV_AMQP_URL = "HITLESS_AMQP_URL"
ENV_CONTROLLER = "HITLESS_CONTROLLER"
ENV_DATA_DIR = "HITLESS_DATA_DIR"
ENV_DB_URL = "HITLESS_DB_URL"
ENV_TRUST_ROOT = "HITLESS_TRUST_ROOT"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_CONTROLLER = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path("~/.local/state/hitless")
DEFAULT_COMMAND_DEADLINE_S = 600
HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_FEED_INTERVAL_S = 300.0
MAX_FEED_INTERVAL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, what: str = "address") -> HostPort:
        """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
        host, sep, port_text = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BusConfig:
    """Where RabbitMQ is. The URL's path is the vhost (``%2F`` for ``/``)."""

    url: str = DEFAULT_AMQP_URL

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigError(
                f"invalid broker URL {self.url!r}: expected amqp://USER:PASS@HOST:PORT/VHOST"
            )

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs and error messages."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return f"{parts.scheme}://{netloc}{parts.path}"


def data_dir(value: str | None = None) -> Path:
    """The data directory: the flag, else HITLESS_DATA_DIR, else the default."""
    raw = value or os.environ.get(ENV_DATA_DIR) or str(DEFAULT_DATA_DIR)
    return Path(raw).expanduser().resolve()


@dataclass(frozen=True)
class ControllerConfig:
    listen: HostPort
    db_url: str
    bus: BusConfig
    data_dir: Path
    command_deadline_s: int = DEFAULT_COMMAND_DEADLINE_S
    release_feed: str | None = None  # a directory or an http(s) URL
    feed_interval_s: float = DEFAULT_FEED_INTERVAL_S
    self_upgrade: bool = True  # an upgrade moves the controller to the release first
    # root.json from `upgradectl keys init` (the trust anchor), and the directory of the
    # online keys (snapshot, timestamp, command); None: online/ beside the trust root.
    trust_root: Path | None = None
    online_keys: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.feed_interval_s <= MAX_FEED_INTERVAL_S:
            raise ConfigError(
                f"invalid feed interval of {self.feed_interval_s:g}s: give from a fraction of a "
                f"second to {MAX_FEED_INTERVAL_S} seconds (7 days)"
            )
        if "://" not in self.db_url:
            raise ConfigError(
                f"invalid database URL {self.db_url!r}: expected e.g. sqlite:///path/controller.db"
                " or postgresql+psycopg://user@host/db"
            )
        names.deadline(timedelta(seconds=self.command_deadline_s))

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"


def default_db_url(data: Path) -> str:
    return f"sqlite:///{data / 'controller.db'}"


@dataclass(frozen=True)
class GatewayConfig:
    gateway_id: str
    controller: HostPort
    bus: BusConfig
    state_dir: Path
    listen: tuple[HostPort, ...] = field(default=())
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S

    def __post_init__(self) -> None:
        names.gateway_id(self.gateway_id)
