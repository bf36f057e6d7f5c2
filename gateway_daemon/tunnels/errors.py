"""Errors of the tunnel data plane.

    hitless.errors.HitlessError
    └── gateway_daemon.errors.GatewayError
        └── TunnelError             anything the data plane raises on purpose
            ├── TunnelConfigError   a tunnels config is malformed (also a ConfigError)
            ├── StateError          a snapshot, final state or description cannot be loaded
            ├── HandshakeError      a handshake message is malformed, stale or not authentic
            ├── RecordRejected      a TCP record does not authenticate or is out of order
            ├── CounterExhausted    a session sent as many packets as its key may protect
            └── PlaneStateError     a Plane method was called in the wrong order or timed out

Packets that fail authentication or the replay check on the hot path are counted, not
raised: an attacker must not be able to make the gateway pay for exceptions.
"""

from __future__ import annotations

from gateway_daemon.errors import GatewayError
from hitless.errors import ConfigError


class TunnelError(GatewayError):
    """Base of every error the tunnel data plane raises."""


class TunnelConfigError(TunnelError, ConfigError):
    """A tunnels config is malformed; the message names the field and what it expects."""


class StateError(TunnelError):
    """Handed-over state (snapshot, final state, description) is not what this version
    can load: wrong version, missing field, bad encoding, or sockets that do not match."""


class HandshakeError(TunnelError):
    """A handshake message is malformed, replayed or does not authenticate."""


class RecordRejected(TunnelError):
    """A TCP record does not authenticate, is out of order, or is malformed."""


class CounterExhausted(TunnelError):
    """A session's send counter reached the limit; the site must handshake again."""


class PlaneStateError(TunnelError):
    """A Plane method was called out of order (e.g. final_state() before pause()) or a
    step missed its deadline."""
