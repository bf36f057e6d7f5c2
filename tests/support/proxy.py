"""A TCP proxy on loopback that can cut a connection after a number of bytes: a real
broken stream, as a flaky network gives one."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; the first ``cuts`` connections are reset
    once ``cut_after`` bytes have gone from upstream to the client. While ``gate`` is
    clear, nothing goes from upstream to the client (a stalled link). ``port`` (default: any
    free one) lets a new proxy stand in for one that was closed (a broker coming back)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        cut_after: int | None = None,
        cuts: int = 1,
        gate: threading.Event | None = None,
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.gate = gate
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # Closing a listening socket does not wake a thread blocked in accept() on Linux;
        # shutting it down does (accept fails with EINVAL).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            if self._stop.is_set():  # closed while connecting: leave nothing open
                client.close()
                server.close()
                return
            with self._lock:
                self.connections += 1
                cut = self.cut_after if self.cuts_left > 0 and self.cut_after else None
                self.cuts_left -= 1
                self._sockets += [client, server]
            threading.Thread(
                target=self._pump, args=(client, server, None, None), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, cut, self.gate), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        cut_after: int | None,
        gate: threading.Event | None,
    ) -> None:
        moved = 0
        try:
            while data := src.recv(65536):
                if gate is not None:
                    gate.wait(timeout=120)
                if cut_after is not None and moved + len(data) >= cut_after:
                    dst.sendall(data[: cut_after - moved])
                    # The link breaks here: the client reads every byte sent so far, then
                    # the end of the stream (FIN, at once, whichever thread still reads
                    # the socket); upstream is reset (SO_LINGER 0), like a dropped link.
                    # A reset towards the client would let its kernel drop bytes it had
                    # not read yet, and a cut stream could then resume from nothing.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    with contextlib.suppress(OSError):
                        src.shutdown(socket.SHUT_RDWR)
                    src.close()
                    return
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
