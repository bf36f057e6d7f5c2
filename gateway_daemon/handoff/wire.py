"""Framing on the handoff's control socket, with file descriptors passed by SCM_RIGHTS.

A frame is one byte of kind, four bytes of big-endian length, then the payload. A frame of
kind FDS carries a JSON count in its payload and the descriptors in ancillary data of
the same ``sendmsg``: at most ``MAX_FDS_PER_MESSAGE`` (253, the kernel's SCM_MAX_FD) per
message, so many sockets go in several batches. EOF on the socket means the other side is
gone, which every step treats as failure. A side that gives up sends ABORT with its reason
first (``HandoffAborted`` on the other side); one that fails while sending reads the
other's reason with ``last_word()``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import resource
import select
import socket
import struct
import time
from typing import Any, Protocol

from gateway_daemon.errors import HandoffFailed, HandoffTimeout

MAX_FDS_PER_MESSAGE = 253
_HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 64 * 1024 * 1024

# Frame kinds, in the order the protocol uses them.
HELLO = 1  # parent -> child: JSON with what the child takes over (description, context)
FDS = 2  # parent -> child: a batch of descriptors
SNAPSHOT = 3  # parent -> child: the data plane's snapshot (bytes)
READY = 4  # child -> parent: loaded and checked
CUTOVER = 5  # parent -> child: the data plane's final state (bytes); parent has paused
STARTED = 6  # child -> parent: serving
ABORT = 7  # either way: give up, with a JSON reason


class Tick(Protocol):
    """Called every ``every_s`` seconds while a send waits on the other side to read."""

    every_s: float

    def __call__(self) -> None: ...


class Channel:
    """One end of the control socket, with a deadline on every receive (and on a send
    that is given one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._next_tick = 0.0  # when a waiting send next calls its tick (time.monotonic)

    def close(self) -> None:
        self.sock.close()

    def send(
        self, kind: int, payload: bytes = b"", *, deadline: float | None = None,
        what: str = "the other side to read", tick: Tick | None = None,
    ) -> None:  # fmt: skip
        """Send one frame. Without ``deadline`` (a time.monotonic value) this waits as
        long as the other side does not read; with one it raises HandoffTimeout ("timed
        out waiting for ``what``") at that time, and calls ``tick`` every
        ``Tick.every_s`` meanwhile. A frame larger than the socket's buffer (a large
        snapshot) waits on the reader; a reader that hangs must not hold the sender."""
        frame = _HEADER.pack(kind, len(payload)) + payload
        self._ticks_from_now(tick)
        try:
            if deadline is None:
                self.sock.sendall(frame)
            else:
                self._send_until(memoryview(frame), deadline, what, tick)
        except OSError as exc:
            raise HandoffFailed(f"the control socket failed while sending: {exc}") from exc

    def send_json(
        self, kind: int, value: Any, *, deadline: float | None = None,
        what: str = "the other side to read", tick: Tick | None = None,
    ) -> None:  # fmt: skip
        self.send(kind, json.dumps(value).encode(), deadline=deadline, what=what, tick=tick)

    def send_fds(
        self, fds: list[int], *, deadline: float | None = None,
        what: str = "the other side to take the descriptors", tick: Tick | None = None,
    ) -> None:  # fmt: skip
        """Send every descriptor, in batches the kernel accepts; ``deadline``, ``what``
        and ``tick`` as for ``send``."""
        self._ticks_from_now(tick)
        for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            batch = fds[start : start + MAX_FDS_PER_MESSAGE]
            payload = json.dumps({"count": len(batch)}).encode()
            frame = _HEADER.pack(FDS, len(payload)) + payload
            # The descriptors ride on the frame's first byte; sendmsg on a stream socket
            # may send fewer bytes, so the rest follows.
            try:
                if deadline is None:
                    sent = socket.send_fds(self.sock, [frame], batch)
                else:
                    sent = self._send_fds_until(frame, batch, deadline, what, tick)
                if sent < len(frame):
                    rest = memoryview(frame)[sent:]
                    if deadline is None:
                        self.sock.sendall(rest)
                    else:
                        self._send_until(rest, deadline, what, tick)
            except OSError as exc:
                raise HandoffFailed(f"passing descriptors failed: {exc}") from exc

    def _ticks_from_now(self, tick: Tick | None) -> None:
        self._next_tick = time.monotonic() + (tick.every_s if tick is not None else 0.0)

    def _send_fds_until(
        self, frame: bytes, fds: list[int], deadline: float, what: str, tick: Tick | None
    ) -> int:
        while True:
            self._wait_writable(deadline, what, tick)
            try:
                return socket.send_fds(self.sock, [frame], fds, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue

    def _send_until(self, data: memoryview, deadline: float, what: str, tick: Tick | None) -> None:
        while data:
            self._wait_writable(deadline, what, tick)
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # another writer took the room (none here): wait again
            data = data[sent:]

    def _wait_writable(self, deadline: float, what: str, tick: Tick | None) -> None:
        """Until the socket takes more bytes; HandoffTimeout at ``deadline``. ``tick``
        runs whenever ``every_s`` has passed since it last did (or since the send
        began), whether or not the reader keeps taking bytes meanwhile."""
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while True:
            now = time.monotonic()
            if tick is not None and now >= self._next_tick:
                tick()
                now = time.monotonic()
                self._next_tick = now + tick.every_s
            if now >= deadline:
                raise HandoffTimeout(f"timed out waiting for {what} on the control socket")
            step = deadline if tick is None else min(deadline, self._next_tick)
            if poller.poll(max(0.0, step - now) * 1000):
                return

    def receive(self, deadline: float, what: str) -> tuple[int, bytes]:
        """The next frame, or HandoffTimeout at ``deadline`` (a time.monotonic value)."""
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            self._read(deadline, what)

    def receive_now(self, what: str) -> tuple[int, bytes] | None:
        """The next frame if it has arrived whole, or None; never waits. Raises
        HandoffFailed at EOF (``HandoffAborted`` for an ABORT), as ``receive`` does: for
        a caller woken by the socket being readable (an event loop)."""
        frame = self._take_frame()
        if frame is not None:
            return frame
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(0):
            return None
        if not self._receive(what):
            raise HandoffFailed(f"the other side closed the control socket while awaiting {what}")
        return self._take_frame()

    def receive_fds(self, count: int, deadline: float) -> list[int]:
        """Receive ``count`` descriptors sent by send_fds(), consuming their frames."""
        try:
            announced = 0
            while announced < count:
                kind, payload = self.receive(deadline, "descriptors")
                if kind != FDS:
                    raise HandoffFailed(f"expected a descriptor frame, got kind {kind}")
                announced += int(json.loads(payload)["count"])
            if len(self._fds) != count:
                raise HandoffFailed(f"{count} descriptors announced, {len(self._fds)} arrived")
        except BaseException:
            self.close_received()
            raise
        fds, self._fds = self._fds, []
        return fds

    def close_received(self) -> None:
        """Close descriptors received but not yet taken (on failure)."""
        for fd in self._fds:
            _close_fd(fd)
        self._fds = []

    def _take_frame(self) -> tuple[int, bytes] | None:
        if len(self._buffer) < _HEADER.size:
            return None
        kind, length = _HEADER.unpack_from(self._buffer)
        if length > MAX_PAYLOAD:
            raise HandoffFailed(f"control frame of {length} bytes exceeds {MAX_PAYLOAD}")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        if kind == ABORT:
            raise HandoffAborted(str(json.loads(payload)["reason"]))
        return kind, payload

    def last_word(self) -> str | None:
        """The reason of an ABORT the other side sent before it went, when it is among
        what has already arrived; None otherwise. Never waits: a side that failed while
        sending reads here why the other one gave up."""
        try:
            while True:
                if self._take_frame() is None and not self._read_now():
                    return None
        except HandoffAborted as exc:
            return exc.reason
        except HandoffFailed:
            return None

    def _read_now(self) -> bool:
        """Read what has arrived, without waiting; False when nothing has (or EOF)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return self._receive("the other side's last word")

    def _read(self, deadline: float, what: str) -> None:
        """Read what is there; descriptors may arrive with any read, so every read is a
        recvmsg with room for a full batch, and they are kept until asked for."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HandoffTimeout(f"timed out waiting for {what} on the control socket")
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(remaining * 1000):
            raise HandoffTimeout(f"timed out waiting for {what} on the control socket")
        if not self._receive(what):
            raise HandoffFailed(f"the other side closed the control socket while awaiting {what}")

    def _receive(self, what: str) -> bool:
        """One recvmsg; False at EOF, or when the other side exited with bytes of ours
        unread (the kernel then reports ECONNRESET, not EOF: the same end, told apart
        only by timing)."""
        space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(65536, space)
        except ConnectionResetError:
            return False
        except OSError as exc:
            raise HandoffFailed(f"the control socket failed while awaiting {what}: {exc}") from exc
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self._fds.extend(_unpack_fds(cdata))
        if flags & socket.MSG_CTRUNC:
            self.close_received()
            raise HandoffFailed(f"descriptors were truncated in transit (MSG_CTRUNC): {_room()}")
        if not data:
            return False
        self._buffer += data
        return True


class HandoffAborted(HandoffFailed):
    """The other side sent ABORT: it gave up, and ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the other side gave up: {reason}")
        self.reason = reason


def _room() -> str:
    """How many descriptors this process may hold and holds (after a truncation: the
    kernel drops what does not fit under RLIMIT_NOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        held = str(len(os.listdir("/proc/self/fd")) - 1)
    except OSError:
        held = "an unknown number"
    return (
        f"the receiving process may hold {soft} descriptors (RLIMIT_NOFILE soft {soft}, "
        f"hard {hard}) and holds {held}; start it with a limit above the descriptors passed "
        "plus its own"
    )


def _unpack_fds(cdata: bytes) -> list[int]:
    fds = array.array("i")
    usable = len(cdata) - (len(cdata) % fds.itemsize)
    fds.frombytes(cdata[:usable])
    return list(fds)


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
