"""Typed configuration, validated when built. Defaults live here, and only here.

Flags and environment variables are read at the CLI edge (each package's ``cli.py``),
which builds these objects; everything below the edge receives them. A variable that holds
a secret (a URL with a password, an enrollment code) may instead name a file holding it
in ``<NAME>_FILE`` (``env_secret``), as Docker secrets are mounted.

| setting          | environment variable  | default                                      |
|------------------|-----------------------|----------------------------------------------|
| broker URL       | HITLESS_AMQP_URL      | amqp://guest:guest@127.0.0.1:5672/%2F        |
| broker's CA (amqps) | HITLESS_AMQP_CA_CERT | the system's trusted CAs                   |
| controller       | HITLESS_CONTROLLER    | 127.0.0.1:50051                              |
| gateway port     | HITLESS_GATEWAY_LISTEN | the API port's host, port 50052 (mutual TLS) |
| CA certificate   | HITLESS_CA_CERT       | none: required by clients (<data dir>/pki/ca.pem) |
| broker mgmt API  | HITLESS_BROKER_API    | none: gateways share the controller's broker login |
| data directory   | HITLESS_DATA_DIR      | ~/.local/state/hitless                       |
| database URL     | HITLESS_DB_URL        | sqlite:///<data dir>/controller.db           |
| trust root       | HITLESS_TRUST_ROOT    | none: required (root.json of `keys init`)    |
| API token        | HITLESS_TOKEN, HITLESS_TOKEN_FILE | none (read in upgradectl/credentials.py) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hitless import names
from hitless.errors import ConfigError

ENV_AMQP_URL = "HITLESS_AMQP_URL"
ENV_AMQP_CA_CERT = "HITLESS_AMQP_CA_CERT"
ENV_CONTROLLER = "HITLESS_CONTROLLER"
ENV_DATA_DIR = "HITLESS_DATA_DIR"
ENV_DB_URL = "HITLESS_DB_URL"
ENV_TRUST_ROOT = "HITLESS_TRUST_ROOT"
ENV_GATEWAY_LISTEN = "HITLESS_GATEWAY_LISTEN"
ENV_CA_CERT = "HITLESS_CA_CERT"
ENV_BROKER_API = "HITLESS_BROKER_API"
ENV_HTTP_LISTEN = "HITLESS_HTTP_LISTEN"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_CONTROLLER = "127.0.0.1:50051"
DEFAULT_GATEWAY_PORT = 50052
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"  # the web console (HTTPS); "off": none
DEFAULT_BROKER_USER_PREFIX = "hitless-"
DEFAULT_DATA_DIR = Path("~/.local/state/hitless")
DEFAULT_COMMAND_DEADLINE_S = 600
HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_FEED_INTERVAL_S = 300.0
MAX_FEED_INTERVAL_S = 7 * 24 * 3600


MAX_SECRET_FILE_BYTES = 64 * 1024


def env_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the environment variable ``name``, else the contents of the file that
    ``name + "_FILE"`` names (surrounding whitespace stripped), else None: the convention
    of Docker's and Compose's secrets, mounted as files under /run/secrets. Raises
    ConfigError naming the variable when the file cannot be read or is empty."""
    environ = os.environ if environ is None else environ
    if environ.get(name):
        return environ[name]
    path = environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({name}_FILE): {exc.strerror or exc}") from exc
    text = data.decode("utf-8", errors="replace").strip()
    if not text or len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{path} ({name}_FILE) must hold one value of at most 64 KiB")
    return text


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
    # The login may declare nothing (a gateway's own broker user, the notifier's): exchanges
    # and queues are only checked to exist (passive declares), and someone else declares them.
    passive: bool = False
    # For amqps:// URLs, the CA certificate (PEM file) the broker's certificate must chain
    # to; None: the system's trusted CAs.
    ca_cert: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigError(
                f"invalid broker URL {self.url!r}: expected amqp://USER:PASS@HOST:PORT/VHOST"
            )
        if self.ca_cert is not None and not os.access(self.ca_cert, os.R_OK):
            raise ConfigError(
                f"cannot read the broker's CA certificate {self.ca_cert} ({ENV_AMQP_CA_CERT})"
            )

    @classmethod
    def from_env(cls, url: str, *, passive: bool = False) -> BusConfig:
        """``url`` with the broker's CA certificate that ``HITLESS_AMQP_CA_CERT`` names."""
        ca_cert = os.environ.get(ENV_AMQP_CA_CERT)
        return cls(url, passive=passive, ca_cert=Path(ca_cert) if ca_cert else None)

    @property
    def user(self) -> str:
        """The broker user the URL logs in as (pika's default, guest, when it names none):
        what a published message's user_id says, and RabbitMQ checks."""
        return unquote(urlsplit(self.url).username or "guest")

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
    # The port gateways download from, with their client certificates (mutual TLS); None:
    # the API port's host and DEFAULT_GATEWAY_PORT (port 0 when the API port is 0).
    gateway_listen: HostPort | None = None
    # Names the server certificate covers beyond hitless.pki.default_names.
    tls_names: tuple[str, ...] = ()
    # RabbitMQ's management API (http://USER:PASS@HOST:15672): with it, each gateway gets
    # a broker user of its own at enrollment, named with broker_user_prefix.
    broker_api: str | None = None
    broker_user_prefix: str = DEFAULT_BROKER_USER_PREFIX

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

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def gateway_address(self) -> HostPort:
        if self.gateway_listen is not None:
            return self.gateway_listen
        port = DEFAULT_GATEWAY_PORT if self.listen.port else 0
        return HostPort(self.listen.host, port)


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
    # The other gateway of its high-availability pair ("" for none): a rollout never has
    # both in flight at once, nor in one wave.
    ha_peer: str = ""

    def __post_init__(self) -> None:
        names.gateway_id(self.gateway_id)
        if self.ha_peer:
            names.gateway_id(self.ha_peer)
            if self.ha_peer == self.gateway_id:
                raise ConfigError(f"--ha-peer {self.ha_peer} is this gateway itself: name its peer")
