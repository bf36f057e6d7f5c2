"""The new process's side of the handoff.

    accept():   HELLO, descriptors, SNAPSHOT   -> Inheritance (the plane is not serving)
    ready():    READY, wait CUTOVER            -> the old process's final state
                (or say_ready(), then cutover() on the thread that will serve)
    started():  STARTED                        -> the old process exits

Leaving without ``started()`` (crash, exception, deadline) closes the control socket,
which the old process reads as failure: it kills this process and serves on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from gateway_daemon.errors import HandoffFailed
from gateway_daemon.handoff import priority, wire
from gateway_daemon.plane import Handle, wrap


@dataclass
class Inheritance:
    """What the old process handed over, and the channel to finish the handoff on."""

    description: dict[str, Any]
    sockets: list[Handle]  # sockets, and shared memory the plane passes
    snapshot: bytes
    context: dict[str, Any]
    channel: wire.Channel = field(repr=False)
    # When this process said ready (time.monotonic_ns), for the cutover's breakdown.
    marks: dict[str, int] = field(default_factory=dict)

    def ready(self, timeout_s: float = 10.0) -> bytes:
        """Say ready; return the final state once the old process has paused."""
        self.say_ready()
        return self.cutover(time.monotonic() + timeout_s)

    def say_ready(self) -> None:
        """Say ready. First, while the old process still serves: collect and freeze
        what the start allocated (a full collection in the middle of the cutover would
        stall it for milliseconds), and take normal priority back (``priority``)."""
        gc.collect()
        gc.freeze()
        priority.restore()
        self.marks["ready_send"] = time.monotonic_ns()
        self.channel.send(wire.READY)

    def cutover(self, deadline: float) -> bytes:
        """The final state the old process sends once it has paused (any thread may
        wait for it; HandoffTimeout at ``deadline``, a time.monotonic value)."""
        kind, payload = self.channel.receive(deadline, "the old process to cut over")
        if kind != wire.CUTOVER:
            raise HandoffFailed(f"protocol error: expected CUTOVER, got frame kind {kind}")
        return payload

    def started(self) -> None:
        """Say this process serves now; the handoff is over."""
        self.channel.send(wire.STARTED)
        self.channel.close()

    def abort(self, reason: str) -> None:
        """Tell the old process to go on serving, and why."""
        # The old process may be gone already; it rolls back on EOF just the same.
        with contextlib.suppress(HandoffFailed):
            self.channel.send_json(wire.ABORT, {"reason": reason})
        self.channel.close()


def accept(control_fd: int, timeout_s: float = 10.0) -> Inheritance:
    """Take over from the old process through the inherited control socket."""
    channel = wire.Channel(socket.socket(fileno=control_fd))
    deadline = time.monotonic() + timeout_s
    try:
        kind, payload = channel.receive(deadline, "the handoff's HELLO")
        if kind != wire.HELLO:
            raise HandoffFailed(f"protocol error: expected HELLO, got frame kind {kind}")
        hello = json.loads(payload)
        fds = channel.receive_fds(int(hello["fds"]), deadline)
        sockets = [wrap(fd) for fd in fds]
        kind, snapshot = channel.receive(deadline, "the data plane's snapshot")
        if kind != wire.SNAPSHOT:
            for sock in sockets:
                sock.close()
            raise HandoffFailed(f"protocol error: expected SNAPSHOT, got frame kind {kind}")
    except BaseException:
        channel.close()
        raise
    return Inheritance(hello["description"], sockets, snapshot, hello["context"], channel)
