"""The notifier's typed configuration, validated when built. Its defaults live here.

Flags and environment variables are read only in ``notifier/cli.py``.

| setting          | flag                | environment             | default                       |
|------------------|---------------------|-------------------------|-------------------------------|
| SMTP server      | `--smtp`            | HITLESS_SMTP            | 127.0.0.1:25                  |
| STARTTLS         | `--smtp-starttls`   | HITLESS_SMTP_STARTTLS   | off                           |
| SMTP user        | `--smtp-user`       | HITLESS_SMTP_USER       | none (no login)               |
| SMTP password    | (never a flag)      | HITLESS_SMTP_PASSWORD   | none                          |
| sender           | `--from`            | HITLESS_SMTP_FROM       | hitless@localhost             |
| delivery ledger  | `--state`           | HITLESS_NOTIFIER_STATE  | <data dir>/notifier.db        |
| controller user  | `--controller-user` | HITLESS_CONTROLLER_USER | the user of the `--amqp` URL  |
|                  |                     |                         | (``BusConfig.user``)          |

Only events the controller's broker user published are mailed (``notifier.handler``): one
login shared by every service (one machine, the demo) needs no setting; with a broker user
per service, give the controller's.
"""

from __future__ import annotations

import ipaddress
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from hitless.config import BusConfig, HostPort
from hitless.errors import ConfigError

ENV_SMTP = "HITLESS_SMTP"
ENV_SMTP_STARTTLS = "HITLESS_SMTP_STARTTLS"
ENV_SMTP_USER = "HITLESS_SMTP_USER"
ENV_SMTP_PASSWORD = "HITLESS_SMTP_PASSWORD"
ENV_SMTP_FROM = "HITLESS_SMTP_FROM"
ENV_STATE = "HITLESS_NOTIFIER_STATE"
ENV_CONTROLLER_USER = "HITLESS_CONTROLLER_USER"

DEFAULT_SMTP = "127.0.0.1:25"
DEFAULT_SENDER = "hitless@localhost"
STATE_FILE = "notifier.db"
# A message carries user_id as an AMQP 0-9-1 short string: at most 255 bytes.
MAX_USER_BYTES = 255


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, *, what: str) -> str:
    """A bare ASCII ``local@domain`` address, without display name, spaces or line breaks.

    This is the rule for the sender (``--from``), which may be a local name such as the
    default ``hitless@localhost`` that the admin rule (``hitless.addresses``) refuses. ASCII,
    so the sender never needs the SMTP server's SMTPUTF8 extension: if it did, every email
    would depend on it."""
    local, sep, domain = address.rpartition("@")
    if (
        not sep
        or not local
        or not domain
        or not address.isascii()
        or any(c.isspace() or c in '<>,;"()' for c in address)
        or not address.isprintable()
    ):
        raise ConfigError(
            f"invalid {what} {address!r}: expected a bare ASCII address like ops@example.com"
        )
    return address


def check_user(user: str, *, what: str) -> str:
    """A RabbitMQ user name a message's user_id can carry: 1 to 255 bytes of UTF-8 (an
    AMQP short string), no control characters, no spaces at either end."""
    size = len(user.encode("utf-8", errors="replace"))
    if (
        not 0 < size <= MAX_USER_BYTES
        or user != user.strip()
        or any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in user)
    ):
        raise ConfigError(
            f"invalid {what} {user[:64]!r}: expected the RabbitMQ user name as "
            f"`rabbitmqctl list_users` shows it (1 to {MAX_USER_BYTES} bytes, no control "
            "characters, no spaces at either end)"
        )
    return user


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to hand mail over. A login needs both user and password, and STARTTLS
    unless the server is on loopback (a password is never sent in clear over a network)."""

    server: HostPort
    starttls: bool = False
    user: str | None = None
    password: str | None = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.user and not self.password:
            raise ConfigError(
                f"--smtp-user {self.user!r} is set but no password: put it in the environment "
                f"variable {ENV_SMTP_PASSWORD} (never on the command line)"
            )
        if self.password and not self.user:
            raise ConfigError(
                f"{ENV_SMTP_PASSWORD} is set but no user: add --smtp-user (or {ENV_SMTP_USER})"
            )
        if self.user and not self.starttls and not is_loopback(self.server.host):
            raise ConfigError(
                f"logging in to {self.server} as {self.user!r} without --smtp-starttls would send "
                "the password in clear: add --smtp-starttls"
            )
        if self.timeout_s <= 0:
            raise ConfigError("the SMTP timeout must be a positive number of seconds")

    def __repr__(self) -> str:
        secret = "***" if self.password else None
        return (
            f"SmtpConfig(server={self.server}, starttls={self.starttls}, user={self.user!r}, "
            f"password={secret!r}, timeout_s={self.timeout_s})"
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts, and how long a recipient's temporary refusal
    (SMTP 4xx) is retried before it counts as a permanent failure. An unreachable server is
    retried without a time bound: the event waits for it."""

    initial_s: float = 0.5
    max_s: float = 60.0
    recipient_deadline_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ConfigError("retry delays must satisfy 0 < initial <= max")
        if self.recipient_deadline_s <= 0:
            raise ConfigError("the recipient retry deadline must be positive")

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: between half and all of the capped delay."""
        capped: float = min(self.max_s, self.initial_s * 2**attempt)
        return capped / 2 + random.uniform(0, capped / 2)


@dataclass(frozen=True)
class NotifierConfig:
    """``controller_user``: the broker user the controller publishes events as; events
    whose broker-validated user_id is anyone else's are dead-lettered, never mailed."""

    bus: BusConfig
    smtp: SmtpConfig
    state_path: Path
    controller_user: str
    sender: str = DEFAULT_SENDER
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        check_address(self.sender, what="sender address (--from)")
        check_user(self.controller_user, what="controller user (--controller-user)")
        if self.state_path.exists() and self.state_path.is_dir():
            raise ConfigError(f"--state {self.state_path} is a directory: give a file path")
