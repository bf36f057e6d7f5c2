"""The control socket between a gateway's forwarding process and its agent.

The forwarding process (``forwarding``) starts the agent (``agent_process``) with one end
of a ``SOCK_SEQPACKET`` socketpair: each message is one JSON object in one packet, so
nothing needs framing, and EOF means the other process is gone (its end closes as it
dies, however it dies).

    forwarding -> agent   {"op": "start", "run_args": [...] | null, "context": {...} | null,
                           "ready_check": bool}
                          once, first: how the agent configures itself (the ``run``
                          arguments it was started with, or the context a handoff
                          brought), and whether it must reach the broker before it
                          attaches (during a takeover, not on a restart)
    agent -> forwarding   {"id": N, "op": "attach" | "recorded" | "health" | "hand_off", ...}
    forwarding -> agent   {"id": N, "ok": true, ...}  or
                          {"id": N, "ok": false, "error": "...", "kind": "rolled_back" |
                           "resume_failed" | "failed"}
    agent -> forwarding   {"op": "failed", "reason": "..."}   the agent gives up starting

Requests (``PlaneClient``):

- ``attach``: the agent is configured and, after a handoff, connected to the broker. The
  answer (``Attached``) comes once the data plane serves: its endpoints, the forwarding
  process's pid, and after a handoff what it brought (the command and how it ended, the
  process that handed over); the agent records and reports that, then says ``recorded``
  (after the soak, when the job has one). Until then every agent started gets it again.
- ``health``: the data plane's counters (``gateway_daemon.health``).
- ``hand_off``: hand the data plane to ``program`` (an argv up to its ``run``) with
  ``context``; the answer comes once the new version serves, or the handoff failed and
  this data plane serves again (``kind`` says whether it could: ``resume_failed`` when not).

The agent sends requests from several threads; each answer carries its request's id. The
forwarding process answers ``health`` at once and ``hand_off`` from a thread of its own,
so the agent's heartbeats and soak go on while a handoff runs.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Final

from gateway_daemon.errors import GatewayError, HandoffFailed
from gateway_daemon.handoff.parent import ResumeFailed
from gateway_daemon.health import Health
from hitless import logs

log = logs.get(__name__)

# How the forwarding process stops its agent when the gateway goes on without it (its
# data plane was handed over). SIGTERM means the gateway stops, and the agent then tells
# the controller (a heartbeat marked stopping) before it exits.
RETIRE_SIGNAL: Final = signal.SIGUSR1

# A message is one packet: the largest the two sides send is a handoff's context (a
# command and the gateway's settings, a few kilobytes).
MAX_MESSAGE: Final = 1 << 20

_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux, socket(7)

# What a failed hand_off's "kind" says, and the error the agent raises for it.
ROLLED_BACK: Final = "rolled_back"
RESUME_FAILED: Final = "resume_failed"
FAILED: Final = "failed"


class PlaneGone(GatewayError):
    """The forwarding process closed the control socket: it exited or was killed."""


class HandOffBroken(GatewayError):
    """A request failed in the forwarding process itself, not in a new version."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(forwarding's end, agent's end) of a new control socket. A packet can be as large
    as the sender's SO_SNDBUF allows (about 200 KiB by default, the kernel's wmem_max):
    each end asks for MAX_MESSAGE, with SO_SNDBUFFORCE where it may (CAP_NET_ADMIN)."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in ends:
        try:
            end.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, MAX_MESSAGE)
        except OSError:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
    return ends


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one message. Raises OSError when the other side is gone (EPIPE) and
    ValueError when it is larger than MAX_MESSAGE."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"a control message of {len(data)} bytes; at most {MAX_MESSAGE}")
    sock.send(data)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """The next message (blocking, as the socket is set), or None at EOF: the other side
    closed its end, or it exited with a message of ours unread (which the kernel reports
    as ECONNRESET). Raises ValueError when a packet is no JSON object or did not fit
    MAX_MESSAGE."""
    try:
        data, _, flags, _ = sock.recvmsg(MAX_MESSAGE)
    except ConnectionResetError:
        return None
    if not data:
        return None
    if flags & socket.MSG_TRUNC:
        raise ValueError(f"a control message larger than {MAX_MESSAGE} bytes")
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError(f"a control message that is no JSON object: {data[:100]!r}")
    return message


@dataclass(frozen=True)
class Attached:
    """The forwarding process's answer to ``attach``."""

    pid: int  # the forwarding process: the gateway process operators see
    endpoints: list[str]  # what its data plane serves, for the hello
    # What a handoff brought (its context), until an agent says it reported it (or, with
    # a soak, the soak ended).
    handover: dict[str, Any] | None
    predecessor: int | None  # the forwarding process that handed over, until then too
    # A handoff the agent before this one asked for, which failed after that agent died:
    # {"command_id", "target_version", "kind", "error"}, given to one agent.
    unanswered: dict[str, Any] | None = None


class PlaneClient:
    """The agent's end of the control socket. ``on_gone`` is called once, from the
    reader thread, when the forwarding process has gone; every call waiting then, and
    every later one, raises PlaneGone."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._gone = threading.Event()
        self._on_gone: list[Any] = []

    def first(self) -> dict[str, Any]:
        """The start message, read before ``start()``. Raises PlaneGone at EOF."""
        message = receive(self._sock)
        if message is None or message.get("op") != "start":
            raise PlaneGone(f"the forwarding process sent no start message: {message!r}")
        return message

    def start(self, on_gone: Any) -> PlaneClient:
        """Start reading answers on a thread of its own; ``on_gone()`` runs at EOF."""
        self._on_gone.append(on_gone)
        threading.Thread(target=self._read, name="plane-control", daemon=True).start()
        return self

    def _read(self) -> None:
        try:
            while (message := receive(self._sock)) is not None:
                with self._lock:
                    waiter = self._waiting.pop(int(message.get("id", -1)), None)
                if waiter is None:
                    log.warning("control_message_unexpected", message=str(message)[:200])
                    continue
                waiter[1].append(message)
                waiter[0].set()
        except (OSError, ValueError) as exc:
            log.error("control_socket_failed", error=str(exc))
        self._gone.set()
        with self._lock:
            for event, _ in self._waiting.values():
                event.set()
        log.warning("forwarding_process_gone")
        for callback in self._on_gone:
            callback()

    def close(self) -> None:
        """Close this end, once the forwarding process is gone (its reader has ended)."""
        self._gone.wait(1.0)
        self._sock.close()

    def call(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send request ``op`` and return its answer (``ok`` true). Raises PlaneGone when
        the forwarding process goes first, TimeoutError after ``timeout_s`` (None: no
        limit), and for a refusal, by its ``kind``: HandoffFailed (rolled back: the plane
        serves as before), ResumeFailed (it could not) or HandOffBroken."""
        event, answer = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            if self._gone.is_set():
                raise PlaneGone("the forwarding process is gone")
            self._next_id += 1
            request = self._next_id
            self._waiting[request] = (event, answer)
            try:
                send(self._sock, {"id": request, "op": op, **fields})
            except OSError as exc:
                self._waiting.pop(request, None)
                raise PlaneGone(f"the forwarding process is gone: {exc}") from exc
        if not event.wait(timeout_s):
            with self._lock:
                self._waiting.pop(request, None)
            raise TimeoutError(f"the forwarding process did not answer {op} in {timeout_s} s")
        if not answer:
            raise PlaneGone(f"the forwarding process went away before it answered {op}")
        reply: dict[str, Any] = answer[0]
        if not reply.get("ok"):
            error = str(reply.get("error", "no reason given"))
            kind = reply.get("kind")
            if kind == ROLLED_BACK:
                raise HandoffFailed(error)
            if kind == RESUME_FAILED:
                raise ResumeFailed(error)
            raise HandOffBroken(error)
        return reply

    def attach(self) -> Attached:
        """Wait until the data plane serves; what it brought (``Attached``)."""
        reply = self.call("attach")
        predecessor = reply.get("predecessor")
        return Attached(
            int(reply["pid"]),
            [str(e) for e in reply.get("endpoints", [])],
            reply.get("handover"),
            int(predecessor) if predecessor else None,
            reply.get("unanswered"),
        )

    def recorded(self) -> None:
        """Say the handover ``attach`` gave is recorded: a restarted agent gets none."""
        self.call("recorded", timeout_s=10)

    def health(self) -> Health:
        """The data plane's counters now. Raises PlaneGone, TimeoutError (10 s)."""
        reply = self.call("health", timeout_s=10)
        try:
            return Health.from_json(reply.get("health"))
        except ValueError as exc:
            raise HandOffBroken(str(exc)) from exc

    def hand_off(
        self,
        program: list[str],
        context: dict[str, Any],
        *,
        command_id: str,
        target_version: str,
    ) -> None:
        """Hand the data plane to ``program`` run with ``context`` for command
        ``command_id``; return once it serves. Raises HandoffFailed (this version serves
        on), ResumeFailed, HandOffBroken. Should this agent die first, a failure is given
        to the next agent (``Attached.unanswered``)."""
        self.call(
            "hand_off", program=program, context=context,
            command_id=command_id, target_version=target_version,
        )  # fmt: skip

    def fail(self, reason: str) -> None:
        """Tell the forwarding process this agent gives up starting, and why."""
        try:
            with self._lock:
                send(self._sock, {"op": "failed", "reason": reason})
        except OSError:
            pass  # gone already: it sees this agent exit just the same
