"""What a handed-over socket shares with the other process, and putting it back.

SCM_RIGHTS passes open file descriptions, not copies: the file status flags
(``O_NONBLOCK`` among them) and every socket option are one state that both processes
see. A new version that sets a received socket to blocking mode changes the old
process's socket too, and its data plane, which reads until ``EAGAIN``, then blocks in
``recvfrom`` for as long as nothing arrives. Nothing the new process does to that state
is undone by its death.

So the old process records each passed socket's state before it sends it
(``SharedState.record``), puts ``O_NONBLOCK`` back every ``parent.GUARD_S`` while it
waits for the new process (``guard``: so the plane's reads do not block until the
deadline; a read that had already begun to block still waits for its next datagram or
connection), and after a failed handoff, once the new process is dead, restores all of it
(``restore``) and lists what it cannot repair (``problems``) before the plane resumes.

Recorded and restored: the file status flags ``F_SETFL`` can change (``O_NONBLOCK``,
``O_ASYNC``, ``O_APPEND``); ``SO_KEEPALIVE`` and ``TCP_NODELAY`` on stream sockets;
``SO_RCVBUF`` and ``SO_SNDBUF`` on datagram sockets (a TCP socket's buffers are tuned by
the kernel as it goes, so they are not compared); and that a listening socket listens, on
its address (a listener shut down loses its port, so it is bound again when it can be).
Not repairable, and so reported: a socket bound elsewhere (it cannot be), or closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway_daemon.plane import Passable

# The options compared, per socket type: (level, option).
_STREAM_OPTIONS: Final = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
)
_DGRAM_OPTIONS: Final = (
    (socket.SOL_SOCKET, socket.SO_RCVBUF),
    (socket.SOL_SOCKET, socket.SO_SNDBUF),
)
# SO_RCVBUF and SO_SNDBUF are capped by net.core.[rw]mem_max; the FORCE variants are not
# (CAP_NET_ADMIN), as the plane sized them.
_FORCE: Final = {
    socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33),
    socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32),
}
_BACKLOG: Final = socket.SOMAXCONN
_OPTION_NAMES: Final = {
    socket.SO_KEEPALIVE: "SO_KEEPALIVE",
    socket.TCP_NODELAY: "TCP_NODELAY",
    socket.SO_RCVBUF: "SO_RCVBUF",
    socket.SO_SNDBUF: "SO_SNDBUF",
}


@dataclass(frozen=True)
class _Saved:
    handle: Passable
    fd: int
    flags: int
    options: tuple[tuple[int, int, int], ...]
    listening: bool
    name: object


class SharedState:
    """The shared state of the sockets passed to another process, as it was before."""

    def __init__(self) -> None:
        self._saved: list[_Saved] = []

    def record(self, handles: Sequence[Passable]) -> None:
        """Remember the state of every socket among ``handles`` (other descriptors, such
        as shared memory, are skipped). Call before passing them."""
        saved = []
        for handle in handles:
            fd = handle.fileno()
            sock = _socket(fd)
            if sock is None:
                continue
            with sock:
                options = tuple((lv, o, sock.getsockopt(lv, o)) for lv, o in _options(sock))
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                saved.append(
                    _Saved(handle, fd, flags, options, _listening(sock), sock.getsockname())
                )
        self._saved = saved

    def guard(self) -> int:
        """Set ``O_NONBLOCK`` again on every recorded socket that lost it; return how
        many had. Cheap (one ``fcntl`` per socket): run while another process holds
        them."""
        fixed = 0
        for saved in self._saved:
            if not saved.flags & os.O_NONBLOCK or saved.handle.fileno() != saved.fd:
                continue
            with contextlib.suppress(OSError):
                flags = fcntl.fcntl(saved.fd, fcntl.F_GETFL)
                if not flags & os.O_NONBLOCK:
                    fcntl.fcntl(saved.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                    fixed += 1
        return fixed

    def restore(self) -> list[str]:
        """Put back everything recorded that differs now; return what was changed, one
        line per socket and setting (empty when nothing was). Call once no other
        process holds the sockets."""
        changed: list[str] = []
        for saved in self._saved:
            if saved.handle.fileno() != saved.fd:
                continue  # the plane closed it since
            try:
                changed += _restore(saved)
            except OSError as exc:
                changed.append(f"descriptor {saved.fd}: could not be restored: {exc}")
        return changed

    def problems(self) -> list[str]:
        """What still differs from the recorded state (after ``restore``); empty when
        every socket is as it was."""
        found: list[str] = []
        for saved in self._saved:
            if saved.handle.fileno() != saved.fd:
                continue
            sock = _socket(saved.fd)
            if sock is None:
                found.append(f"descriptor {saved.fd} is no longer a socket")
                continue
            with sock:
                found += [f"descriptor {saved.fd}: {what}" for what in _differences(saved, sock)]
        return found


def _socket(fd: int) -> socket.socket | None:
    """A second socket object on ``fd`` (a dup: closing it leaves ``fd`` open), or None
    when ``fd`` is no socket."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None


def _options(sock: socket.socket) -> tuple[tuple[int, int], ...]:
    if sock.type == socket.SOCK_DGRAM:
        return _DGRAM_OPTIONS
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        return _STREAM_OPTIONS
    return ()


def _listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def _differences(saved: _Saved, sock: socket.socket) -> list[str]:
    out = []
    flags = fcntl.fcntl(saved.fd, fcntl.F_GETFL)
    if flags != saved.flags:
        out.append(f"file status flags {flags:#o}, were {saved.flags:#o}")
    for level, name, value in saved.options:
        now = sock.getsockopt(level, name)
        if now != value:
            out.append(f"{_OPTION_NAMES.get(name, name)} is {now}, was {value}")
    if saved.listening and not _listening(sock):
        out.append("no longer listens")
    try:
        name_now: object = sock.getsockname()
    except OSError as exc:
        name_now = f"unknown ({exc})"
    if name_now != saved.name:
        out.append(f"bound to {name_now}, was {saved.name}")
    return out


def _restore(saved: _Saved) -> list[str]:
    sock = _socket(saved.fd)
    if sock is None:
        return [f"descriptor {saved.fd} is no longer a socket"]
    changed = []
    with sock:
        flags = fcntl.fcntl(saved.fd, fcntl.F_GETFL)
        if flags != saved.flags:
            fcntl.fcntl(saved.fd, fcntl.F_SETFL, saved.flags)
            changed.append(
                f"descriptor {saved.fd}: file status flags {flags:#o} -> {saved.flags:#o}"
            )
        for level, name, value in saved.options:
            now = sock.getsockopt(level, name)
            if now == value:
                continue
            _set_option(sock, level, name, value)
            label = _OPTION_NAMES.get(name, str(name))
            changed.append(f"descriptor {saved.fd}: {label} {now} -> {value}")
        if saved.listening and not _listening(sock):
            # A listener shut down loses its port (Linux): bind it again first.
            with contextlib.suppress(OSError):
                sock.bind(saved.name)  # type: ignore[arg-type]
            sock.listen(_BACKLOG)
            changed.append(f"descriptor {saved.fd}: listens again")
    return changed


def _set_option(sock: socket.socket, level: int, name: int, value: int) -> None:
    if name in _FORCE:
        # getsockopt reports twice what was set (the kernel's bookkeeping overhead).
        try:
            sock.setsockopt(level, _FORCE[name], value // 2)
        except PermissionError:
            sock.setsockopt(level, name, value // 2)
        return
    sock.setsockopt(level, name, value)
