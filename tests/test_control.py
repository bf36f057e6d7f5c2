"""The control socket between a gateway's forwarding process and its agent
(``gateway_daemon.control``), on a real SOCK_SEQPACKET socketpair: answers matched to
requests by id whatever their order, refusals raised as the errors the agent reports by,
and the forwarding process going away seen by every waiting call."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_daemon import agent_process, control
from gateway_daemon.control import HandOffBroken, PlaneClient, PlaneGone
from gateway_daemon.errors import HandoffFailed
from gateway_daemon.handoff.parent import ResumeFailed
from gateway_daemon.health import Health

Pair = tuple[socket.socket, PlaneClient, threading.Event]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """(the forwarding process's end, the agent's client, set once it saw EOF)."""
    ours, theirs = control.pair()
    ours.settimeout(5)  # a request that never comes fails the test, never hangs it
    gone = threading.Event()
    client = PlaneClient(theirs)
    control.send(ours, {"op": "start", "run_args": ["run", "--id", "gw-1"], "context": None})
    assert client.first()["run_args"] == ["run", "--id", "gw-1"]
    client.start(on_gone=gone.set)
    yield ours, client, gone
    ours.close()
    client.close()


def _in_thread(
    call: Callable[[], object], catch: type[BaseException] = Exception
) -> tuple[threading.Thread, list[BaseException]]:
    """``call()`` started on a thread; the list collects what it raised of ``catch``."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except catch as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def _request(sock: socket.socket) -> dict[str, Any]:
    message = control.receive(sock)
    assert message is not None
    return message


def test_answers_reach_their_callers_whatever_their_order(pair: Pair) -> None:
    ours, client, _ = pair
    results: dict[str, Any] = {}
    hand_off = threading.Thread(
        target=lambda: results.update(
            hand_off=client.hand_off(["prog"], {"a": 1}, command_id="c-1", target_version="1.2.0")
        )
    )
    hand_off.start()
    first = _request(ours)
    assert (first["op"], first["program"], first["context"]) == ("hand_off", ["prog"], {"a": 1})
    assert (first["command_id"], first["target_version"]) == ("c-1", "1.2.0")
    health = threading.Thread(target=lambda: results.update(health=client.health()))
    health.start()
    second = _request(ours)
    assert second["op"] == "health" and second["id"] != first["id"]
    # The health answer overtakes the running handoff's.
    counters = Health(frozenset({"1", "2"}), 3, 100, 4)
    control.send(ours, {"id": second["id"], "ok": True, "health": counters.to_json()})
    health.join(5)
    assert results["health"] == counters and hand_off.is_alive()
    control.send(ours, {"id": first["id"], "ok": True})
    hand_off.join(5)
    assert "hand_off" in results


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (control.ROLLED_BACK, HandoffFailed),
        (control.RESUME_FAILED, ResumeFailed),
        (control.FAILED, HandOffBroken),
    ],
)
def test_a_refused_handoff_raises_by_its_kind(
    pair: Pair, kind: str, error: type[Exception]
) -> None:
    ours, client, _ = pair
    thread, raised = _in_thread(
        lambda: client.hand_off(["prog"], {}, command_id="c-1", target_version="1.2.0")
    )
    request = _request(ours)
    control.send(ours, {"id": request["id"], "ok": False, "kind": kind, "error": "why: this"})
    thread.join(5)
    assert len(raised) == 1 and type(raised[0]) is error and str(raised[0]) == "why: this"


def test_a_forwarding_process_that_goes_fails_every_waiting_call_and_says_so(pair: Pair) -> None:
    ours, client, gone = pair
    thread, raised = _in_thread(client.attach, PlaneGone)
    assert _request(ours)["op"] == "attach"
    ours.close()
    thread.join(5)
    assert gone.wait(5) and len(raised) == 1
    with pytest.raises(PlaneGone):
        client.health()


def test_malformed_counters_are_refused_not_trusted(pair: Pair) -> None:
    ours, client, _ = pair
    thread, raised = _in_thread(client.health, HandOffBroken)
    request = _request(ours)
    control.send(ours, {"id": request["id"], "ok": True, "health": {"up": "1", "configured": 1}})
    thread.join(5)
    assert len(raised) == 1 and "not the data plane's counters" in str(raised[0])


def test_a_message_too_large_for_one_packet_is_refused_before_it_is_sent() -> None:
    ours, theirs = control.pair()
    with ours, theirs:
        with pytest.raises(ValueError, match="at most"):
            control.send(ours, {"blob": "x" * control.MAX_MESSAGE})
        control.send(ours, {"op": "start"})
        assert control.receive(theirs) == {"op": "start"}


def test_a_side_that_exits_with_a_message_unread_reads_as_gone() -> None:
    """The kernel resets a socket closed with data unread; that is an exit, like EOF."""
    ours, theirs = control.pair()
    with ours:
        control.send(ours, {"op": "start"})
        theirs.close()  # the agent exited before it read its start message
        assert control.receive(ours) is None


def test_an_agent_after_a_handoff_that_cannot_reach_the_broker_gives_up_in_its_time(
    tmp_path: Path,
) -> None:
    """A new version's agent (the real process) has until the time its forwarding process
    gives it (``ready_by``, on the host's monotonic clock), no more, and says why it
    gives up."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    context = {
        "gateway_id": "gw-1",
        "controller": "127.0.0.1:1",
        "amqp_url": f"amqp://guest:guest@127.0.0.1:{port}/%2F",
        "state_dir": str(tmp_path / "state"),
        "listen": [],
        "heartbeat_interval_s": 5.0,
    }
    ours, theirs = control.pair()
    ours.settimeout(30)
    try:
        agent = subprocess.Popen(
            [sys.executable, "-m", "gateway_daemon", "agent", "--control-fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        theirs.close()
        began = time.monotonic()
        control.send(ours, {"op": "start", "context": context, "ready_check": True,
                            "ready_by": began + 2.0})  # fmt: skip
        said = control.receive(ours)
        took = time.monotonic() - began
        assert agent.wait(timeout=30) == 1
    finally:
        closed.close()
        ours.close()
        theirs.close()
    assert 1.9 <= took < agent_process.BUS_READY_TIMEOUT_S
    assert said is not None and said["op"] == "failed"
    assert f"cannot reach the broker at amqp://guest@127.0.0.1:{port}/%2F in " in said["reason"]
    assert said["reason"].endswith(" s, the time its forwarding process gave it")
