"""The data plane's counters at one moment, as the agent reads them: for pre-checks
(``precheck``), the soak after a swap (``soak``) and what the old version hands the new
one. The forwarding process takes them from its plane (``DataPlane.health``); the agent
asks for them over the control socket (``control.PlaneClient.health``), as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Health:
    """The data plane's counters at one moment."""

    up: frozenset[str]  # UDP tunnels established, by tunnel id
    configured: int  # UDP tunnels configured
    received: int  # datagrams received, since the process started
    dropped: int  # dropped or rejected, since the process started

    def to_context(self) -> dict[str, int]:
        """What the old version hands the new one: its counters at the handoff."""
        return {"received": self.received, "dropped": self.dropped}

    def to_json(self) -> dict[str, Any]:
        return {
            "up": sorted(self.up),
            "configured": self.configured,
            "received": self.received,
            "dropped": self.dropped,
        }

    @classmethod
    def from_json(cls, value: Any) -> Health:
        """The counters ``to_json`` gave. Raises ValueError when ``value`` is not that."""
        try:
            up, configured = value["up"], value["configured"]
            received, dropped = value["received"], value["dropped"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not the data plane's counters: {value!r}") from exc
        counts = (configured, received, dropped)
        if not isinstance(up, list) or not all(isinstance(n, int) for n in counts):
            raise ValueError(f"not the data plane's counters: {value!r}")
        return cls(frozenset(str(t) for t in up), configured, received, dropped)


NONE = Health(frozenset(), 0, 0, 0)


class Counted(Protocol):
    """What gives the data plane's counters: the plane itself, or the agent's client."""

    def health(self) -> Health:
        """The counters now (no tunnels configured: all zero)."""
