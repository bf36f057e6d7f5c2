"""``Reactor.pause_when``: the loop reads the handoff's READY itself and parks from there.

Real threads and socketpairs: a served socket stands for the data plane, a second pair
for the control socket, with the handoff's own framing (``handoff.wire``) where it
matters.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gateway_daemon.errors import HandoffFailed
from gateway_daemon.handoff import wire
from gateway_daemon.tunnels.loop import EVENT_READ, Reactor
from tests.support.wait import wait_for


class _Lab:
    """A running reactor serving one socket, and a control socketpair it does not
    watch yet."""

    def __init__(self) -> None:
        self.reactor = Reactor("pause-when-test")
        self.served, self.client = socket.socketpair()
        self.control, self.peer = socket.socketpair()
        self.handled: list[bytes] = []
        self.reactor.register(self.served, EVENT_READ, self._handle)
        self.reactor.start()

    def _handle(self, _mask: int) -> None:
        self.handled.append(self.served.recv(64))

    def round_trip(self, data: bytes) -> None:
        """Send ``data`` to the served socket and wait until the loop handled it."""
        self.client.send(data)
        wait_for(lambda: data in self.handled, timeout=5, what=f"the loop to handle {data!r}")

    def close(self) -> None:
        self.reactor.stop(5)
        for sock in (self.served, self.client, self.control, self.peer):
            sock.close()


@pytest.fixture
def lab() -> Iterator[_Lab]:
    made = _Lab()
    try:
        yield made
    finally:
        made.close()


def _ready_on(channel: wire.Channel, calls: list[int]) -> Callable[[], bool]:
    """A ``ready`` callable over ``channel``: True once a READY frame has arrived."""

    def ready() -> bool:
        calls.append(1)
        frame = channel.receive_now("READY")
        if frame is None:
            return False
        assert frame[0] == wire.READY
        return True

    return ready


def test_the_loop_serves_until_ready_arrives_then_parks_and_runs_on_park_itself(
    lab: _Lab,
) -> None:
    """READY arrives while the caller waits (sent from its first tick): the loop parks
    in the round that read it and runs ``on_park`` on its own thread; nothing is
    handled while parked, and everything waiting is handled once it resumes."""
    channel = wire.Channel(lab.control)
    peer = wire.Channel(lab.peer)
    parked_on: list[str] = []
    ticks: list[float] = []
    calls: list[int] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 1:
            lab.round_trip(b"before ready")  # the loop serves while READY is awaited
            peer.send(wire.READY)

    parked = lab.reactor.pause_when(
        lab.control,
        _ready_on(channel, calls),
        lambda: parked_on.append(threading.current_thread().name),
        deadline=time.monotonic() + 10,
        tick=tick,
        every_s=0.01,
    )
    assert parked
    assert parked_on == ["pause-when-test"]
    lab.client.send(b"while parked")
    lab.reactor.call(lambda: None, timeout=5)  # parked: runs here, on this thread
    assert b"while parked" not in lab.handled
    lab.reactor.resume()
    wait_for(lambda: b"while parked" in lab.handled, timeout=5, what="the loop to serve again")


def test_a_peer_that_closes_fails_the_wait_and_the_loop_serves_on(lab: _Lab) -> None:
    """The other side closes the control socket (a new process that died before READY):
    the caller gets the error, the loop keeps serving and no longer watches the control
    socket (readable at EOF for good, it would otherwise be read in every round)."""
    channel = wire.Channel(lab.control)
    calls: list[int] = []
    lab.peer.close()
    with pytest.raises(HandoffFailed, match="closed the control socket"):
        lab.reactor.pause_when(
            lab.control,
            _ready_on(channel, calls),
            lambda: pytest.fail("on_park ran without READY"),
            deadline=time.monotonic() + 10,
            tick=lambda: None,
            every_s=0.05,
        )
    assert lab.control.fileno() not in lab.reactor._selector.get_map()
    seen = len(calls)
    for n in range(3):
        lab.round_trip(f"after the error {n}".encode())
    assert len(calls) == seen


def test_an_abort_reaches_the_caller_with_its_reason(lab: _Lab) -> None:
    """The new process gave up and said why (ABORT): the caller gets that reason."""
    channel = wire.Channel(lab.control)
    wire.Channel(lab.peer).send_json(wire.ABORT, {"reason": "self-check failed: KAT"})
    with pytest.raises(wire.HandoffAborted, match="self-check failed: KAT"):
        lab.reactor.pause_when(
            lab.control,
            _ready_on(channel, []),
            lambda: pytest.fail("on_park ran without READY"),
            deadline=time.monotonic() + 10,
            tick=lambda: None,
            every_s=0.05,
        )
    lab.round_trip(b"still serving")


def test_past_the_deadline_nothing_changes_and_the_socket_is_the_callers_again(
    lab: _Lab,
) -> None:
    """No READY by the deadline: False, the ticks ran meanwhile, the loop serves on, and
    what arrives on the control socket afterwards is left for the caller to read."""
    channel = wire.Channel(lab.control)
    ticks: list[float] = []
    calls: list[int] = []
    parked = lab.reactor.pause_when(
        lab.control,
        _ready_on(channel, calls),
        lambda: pytest.fail("on_park ran without READY"),
        deadline=time.monotonic() + 0.2,
        tick=lambda: ticks.append(time.monotonic()),
        every_s=0.02,
    )
    assert not parked
    assert len(ticks) >= 3
    # Still watched, the socket would wake every round once readable: a busy loop.
    assert lab.control.fileno() not in lab.reactor._selector.get_map()
    wire.Channel(lab.peer).send(wire.READY)
    lab.round_trip(b"after the deadline")
    assert calls == []
    assert channel.receive(time.monotonic() + 5, "READY") == (wire.READY, b"")


def test_pause_when_needs_a_serving_loop(lab: _Lab) -> None:
    """A loop already paused cannot also wait for a signal: a clear error, no wait."""
    lab.reactor.pause(5)
    with pytest.raises(Exception, match="needs a serving loop"):
        lab.reactor.pause_when(
            lab.control, lambda: True, lambda: None, time.monotonic() + 10, lambda: None, 0.05
        )
    lab.reactor.resume()
    lab.round_trip(b"serving again")


def test_a_signal_taken_as_the_deadline_passes_still_parks_the_loop(lab: _Lab) -> None:
    """READY is being read on the loop thread while the caller's deadline passes: it
    counts (True, ``on_park`` ran, the loop parked), never a timeout with the loop
    parking behind the caller's back."""
    deadline = time.monotonic() + 0.15
    parked_on: list[str] = []

    def slow_ready() -> bool:
        lab.control.recv(1)
        # The slowness under test, not synchronisation: the read straddles the deadline.
        threading.Event().wait(max(0.0, deadline - time.monotonic()) + 0.15)
        return True

    lab.peer.send(b"R")
    parked = lab.reactor.pause_when(
        lab.control,
        slow_ready,
        lambda: parked_on.append(threading.current_thread().name),
        deadline=deadline,
        tick=lambda: None,
        every_s=0.05,
    )
    assert parked
    assert parked_on == ["pause-when-test"]
    lab.reactor.resume()
    lab.round_trip(b"serving after the cutover was abandoned")
