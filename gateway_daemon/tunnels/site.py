"""The remote end of a tunnel: what a site does, as the traffic tool and tests play it.

A site holds its static key and the gateway's public key, handshakes (as initiator) and
then seals and opens with its session. ``UdpSite`` talks datagrams; ``TcpSite`` talks
records over a TCP connection. Both are non-blocking after the handshake; the handshake
itself blocks up to a deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.config import Address
from gateway_daemon.tunnels.errors import HandshakeError, RecordRejected
from gateway_daemon.tunnels.handshake import MESSAGE_LEN, finish, initiate
from gateway_daemon.tunnels.session import Session
from gateway_daemon.tunnels.wire import (
    HEADER,
    MAX_DATAGRAM,
    MAX_RECORD,
    OVERHEAD,
    RECORD_LEN,
    TYPE_DATA,
)

SITE_BUFFER_BYTES = 4 * 1024 * 1024


class Timestamps:
    """Handshake timestamps that always grow, even when the wall clock does not."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._last = 0

    def next(self) -> int:
        self._last = max(self._clock_ns(), self._last + 1)
        return self._last


class UdpSite:
    """A site's end of one UDP tunnel, on a socket of its own."""

    def __init__(
        self,
        tunnel_id: int,
        static: X25519PrivateKey,
        gateway_key: X25519PublicKey,
        gateway: Address,
        bind: Address = ("127.0.0.1", 0),
    ) -> None:
        self.tunnel_id = tunnel_id
        self._static = static
        self._gateway_key = gateway_key
        self.gateway = gateway
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SITE_BUFFER_BYTES)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SITE_BUFFER_BYTES)
        self.sock.bind(bind)
        self.session: Session | None = None

    def handshake(self, timestamps: Timestamps, timeout: float) -> Session:
        """Initiate and wait for the response, resending every 0.5 s until ``timeout``."""
        deadline = time.monotonic() + timeout
        init = initiate(
            self.tunnel_id, self._static, self._gateway_key, timestamp=timestamps.next()
        )
        self.sock.setblocking(True)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandshakeError(
                        f"tunnel {self.tunnel_id}: no handshake response from "
                        f"{self.gateway} within {timeout}s"
                    )
                self.sock.sendto(init.message, self.gateway)
                self.sock.settimeout(min(left, 0.5))
                try:
                    data = self.sock.recv(MAX_DATAGRAM)
                except TimeoutError:
                    # Lost on the way, or the gateway is frozen: the same initiation is
                    # refused as a replay, so build a fresh one.
                    init = initiate(
                        self.tunnel_id, self._static, self._gateway_key, timestamp=timestamps.next()
                    )
                    continue
                if len(data) == MESSAGE_LEN:
                    self.session = finish(init, data)
                    return self.session
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


class TcpSite:
    """A site's end of one TCP tunnel connection: records in, records out."""

    def __init__(
        self,
        tunnel_id: int,
        static: X25519PrivateKey,
        gateway_key: X25519PublicKey,
        gateway: Address,
    ) -> None:
        self.tunnel_id = tunnel_id
        self._static = static
        self._gateway_key = gateway_key
        self.gateway = gateway
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.session: Session | None = None
        self.inbox = bytearray()  # received bytes not yet a whole record

    def connect(self, timestamps: Timestamps, timeout: float) -> Session:
        """Connect, handshake, and switch to non-blocking; all within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        self.sock.connect(self.gateway)
        init = initiate(
            self.tunnel_id, self._static, self._gateway_key, timestamp=timestamps.next()
        )
        self.sock.sendall(RECORD_LEN.pack(len(init.message)) + init.message)
        while True:
            records = self._records()
            if records:
                self.session = finish(init, records[0])
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeError(f"tunnel {self.tunnel_id}: no handshake response in time")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise HandshakeError(f"tunnel {self.tunnel_id}: the gateway closed the connection")
            self.inbox += data
        self.sock.setblocking(False)
        return self.session

    def seal_record(self, payload: bytes) -> bytes:
        """One record carrying ``payload`` (at most MAX_RECORD_PAYLOAD bytes)."""
        assert self.session is not None
        sealed = self.session.seal(payload)
        return RECORD_LEN.pack(len(sealed)) + sealed

    def _records(self) -> list[bytes]:
        """Whole records from ``inbox`` (removed from it), undecrypted."""
        out, off, buf = [], 0, self.inbox
        while len(buf) - off >= RECORD_LEN.size:
            (length,) = RECORD_LEN.unpack_from(buf, off)
            if length > MAX_RECORD:
                raise RecordRejected(f"tunnel {self.tunnel_id}: record of {length} bytes")
            if len(buf) - off - RECORD_LEN.size < length:
                break
            start = off + RECORD_LEN.size
            out.append(bytes(buf[start : start + length]))
            off = start + length
        del buf[:off]
        return out

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the socket; return the plaintext of whole records. Raises
        RecordRejected when a record does not authenticate or is out of order."""
        assert self.session is not None
        self.inbox += data
        plain = bytearray()
        for record in self._records():
            kind, _, counter = HEADER.unpack_from(record)
            out = memoryview(bytearray(len(record) - OVERHEAD))
            if (
                kind != TYPE_DATA
                or self.session.open_record_into(memoryview(record), counter, out) < 0
            ):
                raise RecordRejected(
                    f"tunnel {self.tunnel_id}: record {counter} from the gateway rejected"
                )
            plain += out
        return bytes(plain)

    def close(self) -> None:
        self.sock.close()
