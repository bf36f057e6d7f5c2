"""The root of every error hitless raises on purpose.

    HitlessError
    ├── ConfigError              bad flag, environment variable or config value
    │   └── InvalidName          an id, key or deadline the bus or the database cannot carry
    ├── BusError                 anything on RabbitMQ
    │   ├── BusUnavailable       the broker cannot be reached (transient)
    │   ├── PublishFailed        the broker nacked or could not route a message
    │   └── DecodeError          a message body is not what its type says (keeps the raw bytes)
    ├── hitless.addresses.InvalidAddress   an admin address that cannot be mailed
    ├── hitless.trust.errors.TrustError    TUF metadata, keys or a signed command refused
    ├── controller_svc.errors.ControllerError
    ├── gateway_daemon.errors.GatewayError
    └── upgradectl.errors.CliError

Each package keeps its own subtree; library errors are translated where they are caught
(``raise X(...) from exc``), and every message says what failed, on what, and what to do.
"""

from __future__ import annotations


class HitlessError(Exception):
    """Base of all hitless errors."""


class ConfigError(HitlessError):
    """A configuration value is missing or malformed."""


class InvalidName(ConfigError):
    """A gateway id, request id, message id or deadline breaks the rules of
    ``hitless.names`` (what the bus and the database can carry)."""


class BusError(HitlessError):
    """Something went wrong talking to RabbitMQ."""


class BusUnavailable(BusError):
    """The broker could not be reached; retrying later may succeed."""


class PublishFailed(BusError):
    """The broker refused a message: nacked, or unroutable under ``mandatory``."""


class DecodeError(BusError):
    """A message body could not be decoded as the type its queue carries.

    ``raw`` keeps the body untouched so it can be dead-lettered as it arrived.
    """

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw
