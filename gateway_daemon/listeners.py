"""The gateway's TCP listeners: each accepted connection is greeted with one line naming
the gateway and the version serving it, then closed.

A minimal data plane: its listening sockets are what a handoff passes, so a client that
connects in a loop through an upgrade sees the version change and never a refused
connection (the kernel queues connections in the shared socket's backlog while neither
process accepts).
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any

from hitless import logs
from hitless.config import HostPort

log = logs.get(__name__)

BACKLOG = 1024


class Listeners:
    """Implements gateway_daemon.plane.Plane for plain TCP listeners."""

    def __init__(self, sockets: list[socket.socket], greeting: bytes) -> None:
        self._sockets = sockets
        self._greeting = greeting
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in sockets:
            sock.setblocking(False)

    @classmethod
    def bind(cls, addresses: tuple[HostPort, ...], greeting: bytes) -> Listeners:
        sockets = []
        try:
            for address in addresses:
                family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address.host, address.port))
                sock.listen(BACKLOG)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, greeting)

    # Plane -----------------------------------------------------------------------------

    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def describe(self) -> dict[str, Any]:
        return {"kind": "listeners", "sockets": [{"role": "tcp-listen"} for _ in self._sockets]}

    def snapshot(self) -> bytes:
        return b""

    def final_state(self) -> bytes:
        return b""

    def start(self, final_state: bytes = b"") -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="listeners", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self._thread = None

    def resume(self) -> None:
        if self._thread is None:  # a handoff abandoned before pause() left it serving
            self.start()

    def close(self) -> None:
        self.pause()
        for sock in self._sockets:
            sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def endpoints(self) -> list[str]:
        names = []
        for sock in self._sockets:
            host, port = sock.getsockname()[:2]
            names.append(str(HostPort(host, port)))
        return names

    # Serving ---------------------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        self._wake_r.recv(64)
                        continue
                    self._accept(key.fileobj)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept_failed", error=str(exc))
                return
            with conn:
                try:
                    conn.setblocking(True)
                    conn.settimeout(1.0)
                    conn.sendall(self._greeting)
                except OSError:
                    pass


def adopt(description: dict[str, Any], sockets: list[socket.socket], greeting: bytes) -> Listeners:
    """The new process's copy of the listeners handed over by the old one."""
    if description.get("kind") != "listeners" or len(description["sockets"]) != len(sockets):
        raise ValueError(f"cannot adopt {description!r} with {len(sockets)} sockets as listeners")
    return Listeners(sockets, greeting)
