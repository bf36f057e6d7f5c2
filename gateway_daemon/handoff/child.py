"""The new process's side of the handoff.

    accept():   HELLO, descriptors, SNAPSHOT   -> Inheritance (the plane is not serving)
    ready():    READY, wait CUTOVER            -> the old process's final state
                (or say_ready(), then cutover() on the thread that will serve)
    started():  STARTED                        -> the old process exits

If the old process dies once this one holds the sockets (its end of the channel closes
and it is confirmed gone through a pidfd, so the two can never both send), this one goes
on alone: READY and STARTED that cannot be sent are skipped, and a CUTOVER that cannot
come raises ``plane.PredecessorGone``, on which the data plane starts from the snapshot.

Leaving without ``started()`` (crash, exception, deadline) closes the control socket,
which the old process reads as failure: it kills this process and serves on. A failure
this side can name (descriptors truncated, a malformed handoff, a failed self-check) is
sent first, with ABORT, so that the old process reports the real reason.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from gateway_daemon.errors import HandoffFailed, HandoffTimeout
from gateway_daemon.handoff import priority, wire
from gateway_daemon.plane import Handle, PredecessorGone, wrap
from hitless import logs

log = logs.get(__name__)

# How long a failed channel waits for the old process to be reported gone before it
# counts as a refusal of the old process instead (which then kills this one).
PREDECESSOR_EXIT_S = 2.0


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
    # The old process (this one's parent): a pidfd on it, -1 when it is gone already.
    predecessor: int = -1
    # Set once the old process is gone: this one finishes the takeover alone.
    alone: bool = False
    # When the old process stops waiting for READY (time.monotonic), as its HELLO said,
    # and how long its whole deadline was, in seconds; None from an old process that
    # does not say.
    ready_by: float | None = None
    ready_s: float | None = None

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
        try:
            self.channel.send(wire.READY)
        except HandoffFailed as exc:
            self._alone_if_gone(exc, "saying ready")

    def cutover(self, deadline: float) -> bytes:
        """The final state the old process sends once it has paused (any thread may
        wait for it; HandoffTimeout at ``deadline``, a time.monotonic value). Raises
        PredecessorGone when the old process died instead."""
        if self.alone:
            raise PredecessorGone("the old process is gone: no final state will come")
        try:
            kind, payload = self.channel.receive(deadline, "the old process to cut over")
        except (HandoffTimeout, wire.HandoffAborted):
            raise
        except HandoffFailed as exc:
            self._alone_if_gone(exc, "waiting for the final state")
            raise PredecessorGone(f"the old process died before it cut over ({exc})") from exc
        if kind != wire.CUTOVER:
            raise HandoffFailed(f"protocol error: expected CUTOVER, got frame kind {kind}")
        return payload

    def started(self) -> None:
        """Say this process serves now; the handoff is over."""
        if not self.alone:
            try:
                self.channel.send(wire.STARTED)
            except HandoffFailed as exc:
                self._alone_if_gone(exc, "saying it serves")
        self._close()

    def abort(self, reason: str) -> None:
        """Tell the old process to go on serving, and why."""
        # The old process may be gone already; it rolls back on EOF just the same.
        with contextlib.suppress(HandoffFailed):
            self.channel.send_json(wire.ABORT, {"reason": reason})
        self._close()

    def _alone_if_gone(self, exc: HandoffFailed, step: str) -> None:
        """The channel failed at ``step``: go on alone if the old process is dead (it
        cannot send any more), else raise ``exc`` (the old process gave up on this one
        and kills it)."""
        if not _exited(self.predecessor, PREDECESSOR_EXIT_S):
            raise exc
        if not self.alone:
            log.warning("handoff_predecessor_gone", step=step, error=str(exc))
        self.alone = True

    def _close(self) -> None:
        self.channel.close()
        if self.predecessor >= 0:
            os.close(self.predecessor)
            self.predecessor = -1


def accept(control_fd: int, timeout_s: float = 10.0) -> Inheritance:
    """Take over from the old process (this one's parent) through the inherited control
    socket."""
    channel = wire.Channel(socket.socket(fileno=control_fd))
    deadline = time.monotonic() + timeout_s
    try:
        predecessor = os.pidfd_open(os.getppid())
    except ProcessLookupError:
        predecessor = -1  # gone already: the channel says so at once
    try:
        kind, payload = channel.receive(deadline, "the handoff's HELLO")
        if kind != wire.HELLO:
            raise HandoffFailed(f"protocol error: expected HELLO, got frame kind {kind}")
        hello = json.loads(payload)
        ready_by, ready_s = _ready_deadline(hello)
        fds = channel.receive_fds(int(hello["fds"]), deadline)
        sockets = [wrap(fd) for fd in fds]
        kind, snapshot = channel.receive(deadline, "the data plane's snapshot")
        if kind != wire.SNAPSHOT:
            for sock in sockets:
                sock.close()
            raise HandoffFailed(f"protocol error: expected SNAPSHOT, got frame kind {kind}")
    except BaseException as exc:
        if isinstance(exc, Exception):
            # The old process reports the reason, not only that this side went away.
            reason = f"the new version could not take over: {exc}"
            with contextlib.suppress(HandoffFailed):
                channel.send_json(wire.ABORT, {"reason": reason})
        channel.close()
        if predecessor >= 0:
            os.close(predecessor)
        raise
    return Inheritance(
        hello["description"], sockets, snapshot, hello["context"], channel,
        predecessor=predecessor, ready_by=ready_by, ready_s=ready_s,
    )  # fmt: skip


def _ready_deadline(hello: dict[str, Any]) -> tuple[float | None, float | None]:
    """From the old process's HELLO: when it stops waiting for READY (time.monotonic)
    and how long it waits in all, in seconds; (None, None) when it does not say."""
    ready_in_s = hello.get("ready_in_s")
    if ready_in_s is None:
        return None, None
    # CLOCK_MONOTONIC is the host's; seconds left would start counting only now.
    ready_by = hello.get("ready_by_monotonic", time.monotonic() + float(ready_in_s))
    return float(ready_by), float(ready_in_s)


def _exited(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind ``pidfd`` (-1: one already gone) exits within
    ``timeout_s``: its end of the channel closes as it dies, a moment before it is
    reported gone."""
    if pidfd < 0:
        return True
    poller = select.poll()  # not select(): a gateway may hold descriptors past 1024
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))
