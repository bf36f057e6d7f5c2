"""The data plane's event loop: one thread, one selector, and a freeze for the handoff.

Every socket of the data plane is read and written on this thread only, so pausing the
thread is enough to guarantee that nothing touches the sockets: ``pause()`` returns once
the thread is parked between two rounds of events, and nothing is sent until
``resume()`` (rollback) or ``stop()``. Handlers may register and modify sockets only from
the loop thread, or while the loop is parked or not yet started.

The owner of a ``Reactor`` (the ``TunnelPlane``) starts it and stops it; ``stop()``
joins the thread with a deadline.
"""

from __future__ import annotations

import contextlib
import enum
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway_daemon.tunnels.errors import PlaneStateError
from hitless import logs

Handler = Callable[[int], None]


class Selectable(Protocol):
    def fileno(self) -> int:
        """The descriptor the selector watches."""


EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
# The loop re-checks its commands at least this often even when no wake-up arrives.
_IDLE_SELECT_S = 0.5
TICK_S = 0.5
# The loop thread shares the GIL with the rest of the gateway (agent, bus, gRPC). It
# gives the GIL up at every socket call and must win it back each time; while another
# thread computes, CPython makes it wait a whole switch interval (5 ms by default) per
# call: the convoy effect, a few hundred packets a second instead of tens of thousands.
# Measured with one busy thread beside a plane at 20,000 packets/s: 38% lost at 5 ms,
# none at 0.5 ms. The gateway's own upgrade work (download, spawn, snapshot) is such a
# thread: bench-hitless's largest gap during upgrades was 21-37 ms over 7 runs at 0.1 ms,
# 25-63 ms over 8 runs at 0.5 ms. A shorter interval costs the busy thread only more
# switches.
SWITCH_INTERVAL_S = 0.0001
# A round of events normally takes well under a millisecond; one that takes longer than
# this kept every tunnel waiting (see ``Reactor._slow_round``).
SLOW_ROUND_S = 0.005
# The loop thread's nice value. It needs a fraction of a core, but needs it at once:
# while it waits for a CPU, the shared sockets fill (an upgrade starts a whole new
# interpreter beside it; other work may share the machine). A higher priority than the
# rest of the process and machine lets it win the CPU whenever it is runnable. Needs
# CAP_SYS_NICE (root) or RLIMIT_NICE; without either the loop runs at the default.
LOOP_NICE = -10
# How long ``pause_when()`` gives the loop to take or drop its watch on a socket, and to
# park once it saw the signal: a round of events takes well under a millisecond.
PAUSE_WAIT_S = 2.0

log = logs.get(__name__)


class _Want(enum.Enum):
    RUN = "run"
    PAUSE = "pause"
    STOP = "stop"


class Reactor:
    """A selectors loop on a thread of its own that can be frozen and thawed."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, EVENT_READ, self._drain_wake)
        self._cond = threading.Condition()
        self._want = _Want.RUN
        self._parked = False
        self._thread: threading.Thread | None = None
        self._calls: list[_Call] = []
        self._on_park: Callable[[], None] | None = None
        self._parked_fn: Callable[[], None] | None = None
        self._after_round: list[Callable[[], None]] = []
        self._park_error: BaseException | None = None
        self._ticks: list[Callable[[], None]] = []
        self._next_tick = 0.0
        self.handler_errors = 0
        # Rounds of events that took longer than SLOW_ROUND_S, and the slowest so far.
        self.slow_rounds = 0
        self.slowest_round_ms = 0.0
        self._slow_logged = 0.0
        # When the loop thread last parked and last left a park (time.monotonic_ns), for
        # the handoff's cutover breakdown.
        self.parked_ns = 0
        self.woken_ns = 0

    # -- registration (loop thread, or while parked / not started) -------------------

    def register(self, sock: socket.socket, events: int, handler: Handler) -> None:
        self._selector.register(sock, events, handler)

    def modify(self, sock: socket.socket, events: int, handler: Handler) -> None:
        self._selector.modify(sock, events, handler)

    def unregister(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)

    def after_round(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once, on the loop thread, after its next round of events (which
        a wake-up makes sure comes at once, events or not)."""
        self._after_round.append(fn)
        self._wake()

    def every_tick(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread about every ``TICK_S`` seconds (housekeeping)."""
        self._ticks.append(fn)

    # -- control (any thread) ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise PlaneStateError(f"{self._name}: the loop was already started")
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def pause(self, timeout: float, on_park: Callable[[], None] | None = None) -> None:
        """Park the loop thread; return once it touches no socket. Raises
        PlaneStateError if it does not park within ``timeout`` seconds.

        ``on_park`` runs on the loop thread itself the moment it parks, before this
        returns (or here, when the loop is not running): the handoff sends its final
        state from there instead of waiting for this thread to wake first. What it
        raises, this raises; the loop is parked either way. Past the deadline it is
        withdrawn together with the pause, so it never runs late."""
        with self._cond:
            if self._want is _Want.STOP:
                raise PlaneStateError(f"{self._name}: cannot pause a stopped loop")
            self._want = _Want.PAUSE
            if self._thread is None or self._parked:
                if on_park is not None:
                    on_park()
                return
            self._on_park = on_park
            self._park_error = None
            self._wake()
            parked = self._cond.wait_for(lambda: self._parked, timeout=timeout)
            self._on_park = None
            if not parked:
                self._want = _Want.RUN
                raise PlaneStateError(
                    f"{self._name}: the loop did not park within {timeout}s; a handler is "
                    "stuck, the handoff must be abandoned"
                )
            error, self._park_error = self._park_error, None
            if error is not None:
                raise error

    def pause_when(
        self,
        sock: Selectable,
        ready: Callable[[], bool],
        on_park: Callable[[], None],
        deadline: float,
        tick: Callable[[], None],
        every_s: float,
    ) -> bool:
        """Serve until ``ready()``, called on the loop thread whenever ``sock`` is
        readable, returns True; then park at once and run ``on_park`` there, as
        ``pause()`` does. The loop needs no other thread to wake it: the round that
        finds ``sock`` readable is its last. The calling thread waits, and runs
        ``tick`` every ``every_s`` seconds meanwhile.

        Returns True once parked and ``on_park`` ran (raising what it raised); False
        at ``deadline`` (time.monotonic) with nothing changed (the loop serves on).
        What ``ready`` raised is raised here, the loop serving on. Either way ``sock``
        is no longer watched when this returns, so the caller may read it again.
        The loop must be running and not parked (PlaneStateError otherwise)."""
        with self._cond:
            if not self.running or self._parked or self._want is not _Want.RUN:
                raise PlaneStateError(f"{self._name}: pause_when() needs a serving loop")
        trigger = _Trigger()

        # on_readable, watch and withdraw all run on the loop thread (withdraw also runs
        # while it is parked): a signal is either taken, and the loop parks whatever
        # the waiting thread does, or withdrawn from, never both.
        def on_readable(_mask: int) -> None:
            if trigger.withdrawn:
                return  # withdrawn earlier in this round of events
            try:
                fired = ready()
            except BaseException as exc:  # raised by pause_when(), in the caller's thread
                self._selector.unregister(sock)
                with self._cond:
                    trigger.error = exc
                    self._cond.notify_all()
                return
            if not fired:
                return
            self._selector.unregister(sock)
            with self._cond:
                if self._want is not _Want.RUN:
                    trigger.error = PlaneStateError(
                        f"{self._name}: the loop was paused or stopped while it waited for "
                        "the signal"
                    )
                    self._cond.notify_all()
                    return
                # No notify here: the waiting thread wakes when the loop has parked and
                # run on_park (``_hold``), not now, when it would take the GIL and a CPU
                # from this thread's last steps before the other process can start.
                trigger.fired = True
                self._want = _Want.PAUSE
                self._on_park = on_park
                self._park_error = None

        def watch() -> None:
            if not trigger.withdrawn:
                self._selector.register(sock, EVENT_READ, on_readable)

        def withdraw() -> None:
            if trigger.fired or trigger.error is not None or trigger.withdrawn:
                return
            trigger.withdrawn = True
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)

        try:
            self.call(watch, PAUSE_WAIT_S)
        except PlaneStateError:
            trigger.withdrawn = True  # a watch still queued must not register late
            raise
        try:
            self._wait_for_signal(trigger, deadline, tick, every_s)
        except BaseException:
            self.call(withdraw, PAUSE_WAIT_S)
            if trigger.fired:
                self._until_parked()  # paused, as the caller's failure path expects
            raise
        self.call(withdraw, PAUSE_WAIT_S)
        if trigger.error is not None:
            raise trigger.error
        if not trigger.fired:
            return False
        error = self._until_parked()
        if error is not None:
            raise error
        return True

    def _wait_for_signal(
        self, trigger: _Trigger, deadline: float, tick: Callable[[], None], every_s: float
    ) -> None:
        """Until ``pause_when``'s signal is taken or refused, or ``deadline``; ``tick``
        every ``every_s`` meanwhile."""
        next_tick = time.monotonic() + every_s
        while True:
            with self._cond:
                now = time.monotonic()
                self._cond.wait_for(
                    lambda: trigger.fired or trigger.error is not None,
                    timeout=max(0.0, min(deadline, next_tick) - now),
                )
                if trigger.fired or trigger.error is not None:
                    return
            if time.monotonic() >= deadline:
                return
            tick()
            next_tick = time.monotonic() + every_s

    def _until_parked(self) -> BaseException | None:
        """After ``pause_when``'s signal: wait for the loop to park; what ``on_park``
        raised, or PlaneStateError (and the pause withdrawn) when it does not park."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._parked, timeout=PAUSE_WAIT_S):
                self._want = _Want.RUN
                self._on_park = None
                return PlaneStateError(
                    f"{self._name}: the loop did not park within {PAUSE_WAIT_S}s; a handler "
                    "is stuck, the handoff must be abandoned"
                )
            error, self._park_error = self._park_error, None
        return error

    def resume(self, wait_s: float = 0.0) -> None:
        """Undo ``pause()``. With ``wait_s``, return once the loop thread runs again (or
        that long has passed): the caller then leaves the GIL to it at once instead of
        keeping it for a switch interval."""
        with self._cond:
            if self._want is _Want.PAUSE:
                self._want = _Want.RUN
                self._cond.notify_all()
                if wait_s > 0 and self.running:
                    self._cond.wait_for(lambda: not self._parked, timeout=wait_s)

    def run_parked(self, fn: Callable[[], None]) -> None:
        """Have the parked loop thread run ``fn`` (which may block, and may call
        ``resume()`` to go straight on serving from that thread). ``fn`` must not raise.
        The new process waits for the handoff's final state this way: the thread that
        will serve receives it, applies it and serves, with no thread to wake between."""
        with self._cond:
            if not self._parked or self._parked_fn is not None:
                raise PlaneStateError(f"{self._name}: the loop is not parked")
            self._parked_fn = fn
            self._cond.notify_all()

    def call(self, fn: Callable[[], None], timeout: float) -> None:
        """Run ``fn`` on the loop thread (directly when the loop is parked or not
        running) and return once it ran; raises what ``fn`` raised, or PlaneStateError
        past ``timeout``."""
        with self._cond:
            direct = self._thread is None or self._parked or not self._thread.is_alive()
            if not direct:
                queued = _Call(fn)
                self._calls.append(queued)
                self._wake()
        if direct:
            fn()
            return
        if not queued.done.wait(timeout):
            raise PlaneStateError(f"{self._name}: the loop did not run a call within {timeout}s")
        if queued.error is not None:
            raise queued.error

    def stop(self, timeout: float) -> None:
        """Stop the thread for good and close the selector; idempotent."""
        with self._cond:
            self._want = _Want.STOP
            self._cond.notify_all()
            self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise PlaneStateError(f"{self._name}: the loop did not stop within {timeout}s")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop thread ---------------------------------------------------------------

    def _wake(self) -> None:
        # A full buffer means a wake-up is already pending; a closed one, that the loop ended.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            calls, self._calls = self._calls, []
        _run_calls(calls)

    def _hold(self) -> bool:
        """Wait while paused; False when the loop must end."""
        with self._cond:
            while self._want is _Want.PAUSE:
                if not self._parked:
                    self.parked_ns = time.monotonic_ns()
                    # Calls queued before the pause run now, as they would if parked.
                    calls, self._calls = self._calls, []
                    _run_calls(calls)
                    on_park, self._on_park = self._on_park, None
                    if on_park is not None:
                        try:
                            on_park()
                        except BaseException as exc:  # raised by pause(), in its thread
                            self._park_error = exc
                self._parked = True
                self._cond.notify_all()
                fn, self._parked_fn = self._parked_fn, None
                if fn is None:
                    self._cond.wait()
                    continue
                self._cond.release()
                try:
                    fn()
                finally:
                    self._cond.acquire()
            if self._parked:
                self.woken_ns = time.monotonic_ns()
                self._parked = False
                self._cond.notify_all()
            return self._want is _Want.RUN

    def _run(self) -> None:
        _raise_priority(self._name)
        select = self._selector.select
        clock = time.monotonic
        while True:
            # Read without the lock on the fast path; a stale RUN costs one more round.
            if self._want is not _Want.RUN and not self._hold():
                return
            events = select(_IDLE_SELECT_S)
            began = clock()
            for key, mask in events:
                if self._want is not _Want.RUN:
                    # Park (or stop) now: readiness is level-triggered, what is left of
                    # this round is reported again to whoever serves next.
                    break
                try:
                    key.data(mask)
                except Exception:
                    # One broken handler must not take the gateway down: count it, log it
                    # with its traceback, and go on serving the other sockets.
                    self.handler_errors += 1
                    log.exception("tunnel_handler_failed", loop=self._name)
            if self._after_round:
                once, self._after_round = self._after_round, []
                for fn in once:
                    fn()
            now = clock()
            if now - began > SLOW_ROUND_S:
                self._slow_round(now - began, now)
            if self._ticks and now >= self._next_tick:
                self._next_tick = clock() + TICK_S
                for fn in self._ticks:
                    try:
                        fn()
                    except Exception:
                        self.handler_errors += 1
                        log.exception("tunnel_tick_failed", loop=self._name)

    def _slow_round(self, took: float, now: float) -> None:
        """A round of events took long: the loop waited for the GIL (another thread of
        the process computing) or for a CPU. Counted, and logged at most once a second."""
        self.slow_rounds += 1
        self.slowest_round_ms = max(self.slowest_round_ms, took * 1000)
        if now - self._slow_logged >= 1.0:
            self._slow_logged = now
            log.warning(
                "tunnel_loop_slow_round",
                loop=self._name,
                took_ms=round(took * 1000, 1),
                at=round(now, 6),  # time.monotonic, machine-wide
                slow_rounds=self.slow_rounds,
            )


@dataclass
class _Trigger:
    """How a ``pause_when()`` went: READY seen, ``ready()`` raised, or given up."""

    fired: bool = False
    error: BaseException | None = None
    withdrawn: bool = False


@dataclass
class _Call:
    """A function queued for the loop thread, and how it went."""

    fn: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _run_calls(calls: list[_Call]) -> None:
    """Run queued calls; one that raises hands its error to its caller, never to the
    loop thread (which must go on serving) or to the calls after it."""
    for call in calls:
        try:
            call.fn()
        except BaseException as exc:  # raised by call(), in the caller's thread
            call.error = exc
        finally:
            call.done.set()


def _raise_priority(name: str) -> None:
    """Give the calling thread (only it: nice is per thread on Linux) ``LOOP_NICE``."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOOP_NICE)
    except PermissionError:
        log.info("tunnel_loop_priority_unchanged", loop=name, wanted_nice=LOOP_NICE)
