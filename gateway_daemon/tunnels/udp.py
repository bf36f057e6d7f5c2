"""UDP tunnels: decrypt what the sites send and forward it; encrypt what comes back.

Two shared sockets carry every UDP tunnel, as in WireGuard: the tunnel socket (sealed
packets from and to the sites, told apart by the tunnel id in the header) and the plain
socket (cleartext from and to local addresses, told apart by address). All work happens
on the reactor thread; each readiness event reads a batch of datagrams until EAGAIN (or
a cap, so one busy socket cannot starve the others) and forwards each one at once with
``recvfrom_into``/``encrypt_into``/``sendto`` on reused buffers.

A datagram the kernel will not take right now (EAGAIN) is queued, in order, and the
queue is part of the handed-over state: a packet read is a packet forwarded.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.config import Address, TunnelSpec
from gateway_daemon.tunnels.counters import CounterTable, SlotsExhausted
from gateway_daemon.tunnels.errors import CounterExhausted, HandshakeError
from gateway_daemon.tunnels.handshake import respond
from gateway_daemon.tunnels.loop import EVENT_READ, EVENT_WRITE, Reactor
from gateway_daemon.tunnels.session import Session
from gateway_daemon.tunnels.wire import (
    HEADER,
    HEADER_LEN,
    MAX_DATAGRAM,
    MAX_UDP_PAYLOAD,
    OVERHEAD,
    TYPE_DATA,
    TYPE_INIT,
)
from hitless import logs

# Datagrams read per readiness event before the loop looks at other sockets.
BATCH = 256
# Datagrams queued for a socket whose send buffer is full, beyond which they are dropped.
MAX_PENDING = 4096

log = logs.get(__name__)


@dataclass
class UdpStats:
    """Counters an operator reads to see what the UDP plane did with its traffic."""

    received: int = 0
    forwarded: int = 0
    rejected: int = 0  # replayed, forged or malformed
    no_session: int = 0  # for a tunnel the site has not handshaken yet, or unknown
    handshakes: int = 0
    handshake_failures: int = 0
    dropped: int = 0  # too big to seal, queue full, or the send failed




class UdpTunnel:
    """The run-time state of one configured UDP tunnel."""

    __slots__ = ("endpoint", "last_timestamp", "peer_key", "plain", "session", "spec", "target")

    def __init__(self, spec: TunnelSpec, plain: Address | None) -> None:
        self.spec = spec
        self.peer_key: X25519PublicKey = spec.peer_key()
        self.session: Session | None = None
        self.endpoint: Address | None = None
        self.last_timestamp = 0
        self.plain = plain
        self.target: UdpTunnel | None = None


Pending = tuple[bool, Address, bytes]  # (to the tunnel socket?, destination, datagram)


class UdpPlane:
    """Forwarding between the UDP tunnel socket and the plain socket."""

    def __init__(
        self,
        tunnels: list[UdpTunnel],
        static: X25519PrivateKey,
        tunnel_sock: socket.socket,
        plain_sock: socket.socket,
        table: CounterTable,
    ) -> None:
        self._table = table
        self.tunnels = {t.spec.id: t for t in tunnels}
        for t in tunnels:
            if t.spec.forward.kind == "tunnel":
                t.target = self.tunnels[t.spec.forward.tunnel or 0]
        self._by_plain = {t.plain: t for t in tunnels if t.plain is not None}
        self._static = static
        self.tunnel_sock = tunnel_sock
        self.plain_sock = plain_sock
        self.pending: deque[Pending] = deque()
        self.stats = UdpStats()
        self._reactor: Reactor | None = None
        self._rbuf = bytearray(MAX_DATAGRAM + 1)
        self._rview = memoryview(self._rbuf)
        self._obuf = memoryview(bytearray(MAX_DATAGRAM))
        self._sbuf = memoryview(bytearray(MAX_DATAGRAM + OVERHEAD))
        # When this process forwarded its first and (so far) last datagram, in
        # time.monotonic() seconds (one clock for every process of the machine): the
        # handoff's cutover pause is the old process's last to the new process's first.
        self.first_forward = 0.0
        self.last_forward = 0.0

    def attach(self, reactor: Reactor) -> None:
        """Register with ``reactor``; again (after a final state queued datagrams) only
        asks to write what is queued."""
        if self._reactor is not reactor:
            self._reactor = reactor
            reactor.register(self.tunnel_sock, EVENT_READ, self._on_tunnel)
            reactor.register(self.plain_sock, EVENT_READ, self._on_plain)
        if self.pending:
            self._want_write(True)

    # -- reading -----------------------------------------------------------------------

    def _on_tunnel(self, mask: int) -> None:
        before = self.stats.forwarded
        if mask & EVENT_WRITE:
            self._flush()
        if mask & EVENT_READ:
            self._read_tunnel()
        if self.stats.forwarded != before:
            self.last_forward = time.monotonic()

    def _on_plain(self, mask: int) -> None:
        before = self.stats.forwarded
        if mask & EVENT_WRITE:
            self._flush()
        if mask & EVENT_READ:
            self._read_plain()
        if self.stats.forwarded != before:
            self.last_forward = time.monotonic()

    def _read_tunnel(self) -> None:
        sock, rbuf, rview, obuf = self.tunnel_sock, self._rbuf, self._rview, self._obuf
        tunnels, stats, unpack = self.tunnels, self.stats, HEADER.unpack_from
        for _ in range(BATCH):
            try:
                n, addr = sock.recvfrom_into(rbuf)
            except BlockingIOError:
                return
            except OSError:
                stats.dropped += 1  # an ICMP error for an earlier send; nothing was read
                continue
            stats.received += 1
            if n < HEADER_LEN:
                stats.rejected += 1
                continue
            kind, tunnel_id, counter = unpack(rbuf)
            tunnel = tunnels.get(tunnel_id)
            if tunnel is None:
                stats.no_session += 1
                continue
            if kind == TYPE_DATA:
                session = tunnel.session
                if session is None:
                    stats.no_session += 1
                    continue
                m = session.open_datagram_into(rview[:n], counter, obuf)
                if m < 0:
                    stats.rejected += 1
                    continue
                target = tunnel.target
                if target is None:
                    self._send(False, obuf[:m], tunnel.plain)  # type: ignore[arg-type]
                else:
                    self._seal_to(target, obuf[:m])
            elif kind == TYPE_INIT:
                self._handshake(tunnel, bytes(rview[:n]), addr)
            else:
                stats.rejected += 1

    def _read_plain(self) -> None:
        sock, rbuf, rview = self.plain_sock, self._rbuf, self._rview
        by_plain, stats = self._by_plain, self.stats
        for _ in range(BATCH):
            try:
                n, addr = sock.recvfrom_into(rbuf)
            except BlockingIOError:
                return
            except OSError:
                stats.dropped += 1
                continue
            stats.received += 1
            tunnel = by_plain.get(addr)
            if tunnel is None:
                stats.no_session += 1
                continue
            if n > MAX_UDP_PAYLOAD:
                stats.dropped += 1
                continue
            self._seal_to(tunnel, rview[:n])

    # -- sending -----------------------------------------------------------------------

    def _seal_to(self, tunnel: UdpTunnel, payload: memoryview) -> None:
        session, endpoint = tunnel.session, tunnel.endpoint
        if session is None or endpoint is None:
            self.stats.no_session += 1
            return
        try:
            k = session.seal_into(self._sbuf, payload)
        except CounterExhausted:
            self.stats.dropped += 1
            return
        self._send(True, self._sbuf[:k], endpoint)

    def _send(self, to_tunnel: bool, data: memoryview, addr: Address) -> None:
        if self.pending:
            # Keep order: nothing overtakes what is already queued.
            self._queue(to_tunnel, data, addr)
            return
        try:
            (self.tunnel_sock if to_tunnel else self.plain_sock).sendto(data, addr)
        except BlockingIOError:
            self._queue(to_tunnel, data, addr)
            self._want_write(True)
            return
        except OSError:
            self.stats.dropped += 1
            return
        if not self.first_forward:
            self.first_forward = time.monotonic()
        self.stats.forwarded += 1

    def _queue(self, to_tunnel: bool, data: memoryview, addr: Address) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.stats.dropped += 1
            return
        self.pending.append((to_tunnel, addr, bytes(data)))

    def _flush(self) -> None:
        pending = self.pending
        while pending:
            to_tunnel, addr, data = pending[0]
            try:
                (self.tunnel_sock if to_tunnel else self.plain_sock).sendto(data, addr)
            except BlockingIOError:
                return
            except OSError:
                self.stats.dropped += 1
            else:
                if not self.first_forward:
                    self.first_forward = time.monotonic()
                self.stats.forwarded += 1
            pending.popleft()
        self._want_write(False)

    def _want_write(self, on: bool) -> None:
        if self._reactor is None:
            return
        events = EVENT_READ | (EVENT_WRITE if on else 0)
        self._reactor.modify(self.tunnel_sock, events, self._on_tunnel)
        self._reactor.modify(self.plain_sock, events, self._on_plain)

    # -- handshakes --------------------------------------------------------------------

    def _handshake(self, tunnel: UdpTunnel, message: bytes, addr: Address) -> None:
        if tunnel.spec.peer is not None and addr != tunnel.spec.peer:
            self.stats.handshake_failures += 1
            log.warning("udp_handshake_refused", tunnel=tunnel.spec.id, source=str(addr))
            return
        try:
            accepted = respond(
                message, self._static, tunnel.peer_key, last_timestamp=tunnel.last_timestamp
            )
        except HandshakeError as exc:
            self.stats.handshake_failures += 1
            log.warning("udp_handshake_failed", tunnel=tunnel.spec.id, error=str(exc))
            return
        try:
            accepted.session.install(self._table)
        except SlotsExhausted as exc:
            self.stats.handshake_failures += 1
            log.error("udp_handshake_dropped", tunnel=tunnel.spec.id, error=str(exc))
            return
        if tunnel.session is not None:
            self._table.release(tunnel.session.slot)
        tunnel.session = accepted.session
        tunnel.endpoint = addr
        tunnel.last_timestamp = accepted.timestamp
        self.stats.handshakes += 1
        self._send(True, memoryview(accepted.response), addr)
        log.info("udp_tunnel_up", tunnel=tunnel.spec.id, peer=f"{addr[0]}:{addr[1]}")
