"""What the handoff needs from a gateway's data plane, whatever it carries.

The running version passes its sockets and state to the next version of itself
(``gateway_daemon.handoff``). Any data plane that implements ``Plane`` can be handed off:

    old process                               new process
    -----------                               -----------
    sockets(), describe(), snapshot()  --->   Plane.adopt(description, sockets, snapshot)
                                              (loaded and checked, not serving yet)
                                       <---   ready
    pause(); final_state()             --->   start(final_state)   (serving from here)
    close()                                   ...

``resume()`` undoes ``pause()`` on the old side when the new process fails before it
starts serving (rollback). When the old process dies instead, the new one starts without
a final state (``PredecessorGone`` where the final state was awaited) and serves alone.
Between ``pause()`` in the old process and ``start()`` in the new one nobody reads or
sends: packets wait in the kernel's buffers of the shared sockets, and no two processes
ever send under the same key and counter.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Sequence
from typing import Any, Protocol

from gateway_daemon.errors import HandoffFailed


class PredecessorGone(HandoffFailed):
    """New process: the old one died after this one took the sockets, before it sent its
    final state (the handoff's channel reached EOF and the process is gone). This one
    serves alone, from the snapshot and the state the two share (the tunnels' counter
    table): nobody else can send any more."""


class SharedFile:
    """A passed descriptor that is not a socket (the tunnels' counter table, a memfd)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """The descriptor, or -1 once closed (as a closed socket says)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# What a data plane passes: sockets, and descriptors such as shared memory.
Handle = socket.socket | SharedFile


class Passable(Protocol):
    def fileno(self) -> int:
        """The descriptor to pass with SCM_RIGHTS."""


def wrap(fd: int) -> Handle:
    """A received descriptor as a socket, or as a SharedFile when it is not one."""
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        return socket.socket(fileno=fd)
    return SharedFile(fd)


class ReadySignal(Protocol):
    """The new process's READY, for a plane that waits for it on its own loop thread
    (``cut_over_when``): the old process's plane goes on forwarding until the very round
    in which READY arrives, and parks from there with no other thread to wake."""

    def fileno(self) -> int:
        """The control socket: readable when READY (or anything else) has arrived."""

    def take(self) -> bool:
        """Loop thread, the socket readable: True once READY has arrived whole, False
        while it has not. Raises HandoffFailed for anything else (the other side gone,
        its ABORT with the reason, another frame)."""

    def wait(self) -> None:
        """Block the calling thread until READY (for a plane whose loop cannot wait);
        raises as ``take`` does, and HandoffTimeout at the deadline."""

    def deadline(self) -> float:
        """When to stop waiting (time.monotonic)."""

    def tick(self) -> None:
        """What the waiting thread does every ``every_s`` seconds meanwhile."""

    @property
    def every_s(self) -> float:
        """How often ``tick`` runs."""

    def timed_out(self) -> HandoffFailed:
        """The error to raise when the deadline passed without READY."""


class Plane(Protocol):
    def sockets(self) -> Sequence[Passable]:
        """Every descriptor to pass (sockets, shared memory), in the order
        ``describe()`` names them."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of ``sockets()`` (roles, addresses), sent with them."""

    def snapshot(self) -> bytes:
        """State the new process may load before cutover (keys, routes) while this one
        goes on serving."""

    def pause(self) -> None:
        """Stop reading and sending; return once no thread touches the sockets."""

    def final_state(self) -> bytes:
        """After pause(): what changed since snapshot() and is not already shared with
        the new process (new sessions, partly read records, queued bytes)."""

    def resume(self) -> None:
        """Undo pause(): the handoff was abandoned and this process goes on serving."""

    def start(self, final_state: bytes) -> None:
        """New process: apply the final state and begin serving."""

    def close(self) -> None:
        """Stop for good and close every socket of this process's copy."""

    def endpoints(self) -> list[str]:
        """The addresses served, for the gateway's hello message."""
