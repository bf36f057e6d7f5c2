"""Errors of the gateway daemon.

HitlessError
└── GatewayError
    ├── DownloadFailed        the artifact could not be fetched (after retries)
    ├── AgentRetired          this process handed over; a command is left to the next one
    ├── HandoffFailed         the new version did not take over; the old one serves on
    │   ├── HandoffTimeout    a handoff step missed its deadline
    │   └── SelfCheckFailed   the new version found itself unfit to serve
    ├── VpnServiceError       the VPN service could not be started, reached or stopped
    ├── TransitionRefused     a command's state would move against state.TRANSITIONS
    └── tunnels.errors.TunnelError   the data plane (its own subtree there)
"""

from __future__ import annotations

from hitless.bus.handling import Requeue
from hitless.errors import HitlessError


class GatewayError(HitlessError):
    """Base of the gateway daemon's errors."""


class DownloadFailed(GatewayError):
    """The artifact could not be downloaded."""


class AgentRetired(GatewayError, Requeue):
    """This process has handed the gateway to the next version and takes no command: the
    command goes back to the queue, for the new version, without counting as a failure."""


class HandoffFailed(GatewayError):
    """The new process did not take over; the old one goes on serving (rollback)."""


class HandoffTimeout(HandoffFailed):
    """A step of the handoff missed its deadline."""


class SelfCheckFailed(HandoffFailed):
    """The new version's self-check failed (gateway_daemon.selfcheck): it does not serve."""


class VpnServiceError(GatewayError):
    """The VPN service (gateway_daemon.vpn) could not be started, reached or stopped."""


class TransitionRefused(GatewayError):
    """A command's state was asked to move where the gateway's transition table
    (``gateway_daemon.state.TRANSITIONS``) does not lead: a defect, reported, never sent."""
