"""The old process's side of the handoff.

    room for the descriptors it will hold (``limits``), or refuse
    spawn new version (exec, with one end of a socketpair)
    HELLO (description, context) + descriptors in batches + SNAPSHOT
    wait READY  ........................ deadline (sends too): ready_s; EOF or ABORT = failed
    plane.pause(); CUTOVER(final state) .. when the plane has cut_over_when(): READY read,
    wait STARTED                           the pause, the send and the wait for STARTED
                                           all on its own loop thread, which forwards
                                           until READY arrives; one deadline for the
                                           CUTOVER send and STARTED: started_s
    done: the caller closes its copy of the plane and exits

Any failure before STARTED kills the new process, waits for it to be gone, and resumes the
plane (which also lifts what ``sockets()`` froze when the handoff fails before the pause):
the old version goes on serving, and the two never send at the same time. Before it
resumes, it puts back what the new process may have changed on the sockets both held
(``shared``: O_NONBLOCK, socket options) and checks them. The error it raises says why,
in full: what the new process said when it gave up (ABORT), and its exit code or the
signal that ended it; ``ResumeFailed`` when this process could not serve as before.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway_daemon.errors import GatewayError, HandoffFailed, HandoffTimeout
from gateway_daemon.handoff import limits, priority, wire
from gateway_daemon.handoff.shared import SharedState
from gateway_daemon.plane import Plane
from hitless import logs

log = logs.get(__name__)


class ChildProcess(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Spawn = Callable[[Sequence[str], int], ChildProcess]


def spawn_process(argv: Sequence[str], control_fd: int) -> ChildProcess:
    """Start the new version by exec (never a bare fork: gRPC does not survive fork), at
    idle priority until it says ready (``priority``)."""
    child = subprocess.Popen(list(argv), pass_fds=(control_fd,), stdin=subprocess.DEVNULL)
    priority.lower(child.pid)
    return child


# While it waits for the new process, how often this process checks that the sockets
# both hold are still non-blocking (``shared``): the longest its plane can stall on a
# socket the new process set to blocking mode, given traffic on it. Each check is a
# wake-up of a process that otherwise sleeps until READY, and CPU taken from the new
# version starting beside it: at 20 ms a waiting process spent about 11 ms of CPU a
# second on them on an idle machine (with 30 gateways upgraded at once on two cores,
# the waiting old processes took 0.14 of a core together), at 100 ms about 2 ms.
GUARD_S = 0.1
# A new process that closed the control socket is given this long to exit on its own, so
# that its exit status, not the SIGKILL that follows, is reported.
EXIT_GRACE_S = 0.5


class ResumeFailed(HandoffFailed):
    """The handoff failed and this process could not serve as before it (its data plane
    did not resume, or the new version changed a shared socket beyond repair): reported
    as FAILED, not as a rollback."""


@dataclass(frozen=True)
class Deadlines:
    ready_s: float = 30.0  # spawn to READY: the new interpreter starts and loads
    # CUTOVER to STARTED. The old plane has paused: nothing forwards while it waits, and
    # packets pile up in the receive buffers (8 MiB, about 0.4 s at 20,000 packets/s), so
    # a new version that never takes the final state costs this long a gap. A healthy one
    # says STARTED within milliseconds (pause to STARTED: 7.5 ms at most in
    # bench-hitless), so a quarter of a second keeps a hung one's gap inside what the
    # buffers hold and still leaves a loaded machine 30 times that maximum.
    started_s: float = 0.25
    # Spawn to normal priority if not ready by then (``priority``): a head start on spare
    # CPU, never more than a tenth of the ready deadline. A new version takes 1-2 s of
    # idle time to start on a two-core gateway under load; back at normal priority
    # before it is done, its last work (a full collection) competes with the traffic.
    idle_s: float = 3.0

    @property
    def idle_until_s(self) -> float:
        return min(self.idle_s, self.ready_s / 10)


@dataclass(frozen=True)
class HandoffReport:
    """How long each phase took, in milliseconds, and what was passed."""

    child_pid: int
    descriptors: int
    spawn_to_ready_ms: float
    descriptors_ms: float
    state_ms: float
    cutover_ms: float
    snapshot_bytes: int
    final_state_bytes: int
    # The old process's side of the cutover, in microseconds from its last forward
    # (when the plane reports one): READY read, loop parked, final state encoded,
    # CUTOVER written, and this thread back (once STARTED has come).
    cutover_marks_us: dict[str, float] = field(default_factory=dict)


def hand_off(
    plane: Plane,
    argv_for: Callable[[int], Sequence[str]],
    context: dict[str, Any],
    *,
    spawn: Spawn = spawn_process,
    deadlines: Deadlines = Deadlines(),
    clock: Callable[[], float] = time.monotonic,
) -> HandoffReport:
    """Pass ``plane`` to a new process started from ``argv_for(control_fd)``.

    Returns once the new process serves. Raises HandoffFailed (the new process is dead
    and ``plane`` serves again) otherwise.
    """
    limits.ensure()  # before anything is started or frozen: refused here, nothing to undo
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = wire.Channel(ours)
    shared = SharedState()
    try:
        started_at = clock()
        try:
            child = spawn(argv_for(theirs.fileno()), theirs.fileno())
        except OSError as exc:
            raise HandoffFailed(f"could not start the new version: {exc}") from exc
        finally:
            theirs.close()
        try:
            return _run(plane, channel, child, context, deadlines, clock, started_at, shared)
        except BaseException as exc:
            # It may have started serving: it must be dead before this process goes on.
            reason = _why(exc, channel, child)
            _resume(plane, shared, reason)
            if isinstance(exc, HandoffFailed):
                raise (HandoffTimeout if isinstance(exc, HandoffTimeout) else HandoffFailed)(
                    reason
                ) from exc
            if isinstance(exc, GatewayError | OSError):
                raise HandoffFailed(f"the data plane could not be handed off: {reason}") from exc
            raise
    finally:
        channel.close()


def _why(exc: BaseException, channel: wire.Channel, child: ChildProcess) -> str:
    """Why the handoff failed, in full, once the new process is dead: what this side saw,
    what the new process said when it gave up (an ABORT that arrived while this side was
    sending), and how it ended (its exit code, or the signal that killed it)."""
    reason = str(exc)
    word = None if isinstance(exc, wire.HandoffAborted) else channel.last_word()
    leaving = word is not None or (
        isinstance(exc, HandoffFailed) and not isinstance(exc, HandoffTimeout)
    )
    if word is not None:
        reason = f"the other side gave up: {word} (this side saw: {exc})"
    if leaving:
        # It closed the control socket: it is on its way out. Its own exit status says
        # more than the SIGKILL that would end it otherwise.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=EXIT_GRACE_S)
    killed = _kill(child)
    code = child.poll()
    if code is None or (killed and code == -signal.SIGKILL):
        return reason
    if code < 0:
        return f"{reason} (the new process was killed by {signal.Signals(-code).name})"
    return f"{reason} (the new process exited with {code})"


def _resume(plane: Plane, shared: SharedState, reason: str) -> None:
    """Serve again after a failed handoff: first undo what the new process may have
    changed on the sockets both held (``shared``) and check them, then resume the plane.
    Raises ResumeFailed, with ``reason`` and what is wrong, when this process cannot
    serve as before (its plane then serves what it can)."""
    restored = shared.restore()
    if restored:
        log.warning("handoff_shared_state_restored", changes=restored)
    problems = shared.problems()
    try:
        plane.resume()
    except (GatewayError, OSError) as exc:
        raise ResumeFailed(f"{reason}; then this process's data plane: {exc}") from exc
    if problems:
        raise ResumeFailed(
            f"{reason}; then this process resumed with sockets the new version changed "
            f"beyond repair: {'; '.join(problems[:5])}"
        )


def _run(
    plane: Plane,
    channel: wire.Channel,
    child: ChildProcess,
    context: dict[str, Any],
    deadlines: Deadlines,
    clock: Callable[[], float],
    started_at: float,
    shared: SharedState,
) -> HandoffReport:
    sockets = plane.sockets()
    shared.record(sockets)
    # Everything before READY shares its deadline: a new process that never reads what
    # is sent (a snapshot larger than the socket's buffer waits on it) is one that never
    # says ready.
    ready_by = started_at + deadlines.ready_s
    watch = _Watch(child, shared, started_at + deadlines.idle_until_s)
    reading = "the new process to read the handoff"
    left_s = max(0.0, ready_by - clock())
    hello = {
        "description": plane.describe(), "fds": len(sockets), "context": context,
        # When this process stops waiting for READY, so that the new one gives its own
        # steps less: on CLOCK_MONOTONIC, which every process of the host shares (the
        # HELLO waits in the socket while the new interpreter starts), and as the
        # seconds left now, for the length of the whole deadline.
        "ready_by_monotonic": time.monotonic() + left_s,
        "ready_in_s": left_s,
    }  # fmt: skip
    channel.send_json(wire.HELLO, hello, deadline=ready_by, what=reading, tick=watch)
    fds_at = clock()
    channel.send_fds([s.fileno() for s in sockets], deadline=ready_by, what=reading, tick=watch)
    state_at = clock()
    snapshot = plane.snapshot()
    channel.send(wire.SNAPSHOT, snapshot, deadline=ready_by, what=reading, tick=watch)
    snapshot_done = clock()
    ready = _Ready(channel, ready_by, watch, clock)
    marks: dict[str, int] = {}
    sent: list[bytes] = []

    def cut_over(final_state: bytes) -> None:
        # On the plane's loop thread, parked (``cut_over_when``): it sends the final
        # state and waits for STARTED itself, so that no other thread of this process
        # wakes, for a CPU or the GIL, before the new process serves.
        marks["encoded"] = time.monotonic_ns()
        # One deadline for the send and STARTED: the plane is paused from here, and a
        # new process that does not read (or never starts) holds it.
        started_by = time.monotonic() + deadlines.started_s
        channel.send(
            wire.CUTOVER, final_state, deadline=started_by,
            what="the new process to read the final state",
        )  # fmt: skip
        marks["sent"] = time.monotonic_ns()
        sent.append(final_state)
        _expect(channel, wire.STARTED, started_by, "the new process to start")

    cut_over_when = getattr(plane, "cut_over_when", None)
    if cut_over_when is not None:
        cut_over_when(ready, cut_over)
    else:
        ready.wait()
        plane.pause()
        cut_over(plane.final_state())
    started = clock()
    marks["ready"] = ready.at_ns
    ready_at = ready.at
    marks["returned"] = time.monotonic_ns()
    final_state = sent[0]
    report = HandoffReport(
        child_pid=child.pid,
        descriptors=len(sockets),
        spawn_to_ready_ms=(ready_at - started_at) * 1000,
        descriptors_ms=(state_at - fds_at) * 1000,
        state_ms=(snapshot_done - state_at) * 1000,
        cutover_ms=(started - ready_at) * 1000,  # pause asked to STARTED
        snapshot_bytes=len(snapshot),
        final_state_bytes=len(final_state),
        cutover_marks_us=_relative(marks, plane),
    )
    log.info("handoff_done", **report.__dict__)
    return report


def _relative(marks: dict[str, int], plane: Plane) -> dict[str, float]:
    plane_marks: dict[str, int] = getattr(plane, "cutover_marks", dict)()
    marks = {**plane_marks, **marks}
    base = marks.get("last_forward") or marks["ready"]
    return {k: round((v - base) / 1000, 1) for k, v in marks.items()}


class _Ready:
    """The new process's READY (``plane.ReadySignal``): read by the plane's loop thread
    when the plane can (``take``), by the handoff's thread otherwise (``wait``)."""

    what = "the new process to say ready"

    def __init__(
        self, channel: wire.Channel, deadline: float, watch: _Watch, clock: Callable[[], float]
    ) -> None:
        self._channel = channel
        self._deadline = deadline
        self._watch = watch
        self._clock = clock
        self.every_s = watch.every_s
        self.at = 0.0  # when READY was read (``clock``)
        self.at_ns = 0  # the same, time.monotonic_ns

    def fileno(self) -> int:
        return self._channel.sock.fileno()

    def take(self) -> bool:
        frame = self._channel.receive_now(self.what)
        if frame is None:
            return False
        self._arrived()
        if frame[0] != wire.READY:
            raise HandoffFailed(
                f"protocol error while waiting for {self.what}: got frame kind {frame[0]}"
            )
        return True

    def wait(self) -> None:
        _expect(self._channel, wire.READY, self._deadline, self.what, self._watch)
        self._arrived()

    def deadline(self) -> float:
        return self._deadline

    def tick(self) -> None:
        self._watch()

    def timed_out(self) -> HandoffFailed:
        return HandoffTimeout(f"timed out waiting for {self.what} on the control socket")

    def _arrived(self) -> None:
        self.at = self._clock()
        self.at_ns = time.monotonic_ns()


class _Watch:
    """What this process does every ``GUARD_S`` while it waits on the new one before
    READY (sending to it or waiting for its answer). The new process holds the sockets
    meanwhile: ``shared.guard()`` keeps them non-blocking for this process's plane. Past
    ``restore_at`` (``Deadlines.idle_until_s`` after the spawn), the new process gets
    normal priority (``priority``)."""

    every_s = GUARD_S

    def __init__(self, child: ChildProcess, shared: SharedState, restore_at: float) -> None:
        self._child = child
        self._shared = shared
        self._restore_at = restore_at
        self._restored = False

    def __call__(self) -> None:
        fixed = self._shared.guard()
        if fixed:
            log.warning("handoff_sockets_set_blocking_by_new_process", sockets=fixed)
        if not self._restored and time.monotonic() >= self._restore_at:
            self._restored = True
            if priority.restore(self._child.pid):
                log.info("handoff_child_priority_restored", pid=self._child.pid)


def _expect(
    channel: wire.Channel,
    kind: int,
    deadline: float,
    what: str,
    watch: _Watch | None = None,
) -> None:
    """The next frame is ``kind``, within ``deadline`` (HandoffTimeout); ``watch`` runs
    every ``GUARD_S`` meanwhile."""
    while True:
        step = deadline if watch is None else min(deadline, time.monotonic() + GUARD_S)
        try:
            got, _ = channel.receive(step, what)
            break
        except HandoffTimeout:
            if step >= deadline:
                raise
        assert watch is not None
        watch()
    if got != kind:
        raise HandoffFailed(f"protocol error while waiting for {what}: got frame kind {got}")


def _kill(child: ChildProcess) -> bool:
    """SIGKILL ``child`` unless it has exited, and reap it; True when it was killed."""
    killed = child.poll() is None
    if killed:
        child.kill()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("handoff_child_unkillable", pid=child.pid)
    return killed
