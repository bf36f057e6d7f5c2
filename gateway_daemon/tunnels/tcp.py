"""TCP tunnels: encrypted record streams from the sites, relayed to plain TCP services.

A site opens a TCP connection to the gateway's tunnel listener and sends an initiation
as its first record; the gateway answers and opens a plain connection to the tunnel's
target. From then on each connection pair relays both ways: records from the site are
decrypted onto the plain connection; bytes from the plain side are sealed into records
back to the site. Each connection has its own keys and counters, and records must carry
consecutive counters (a TCP stream is in order: anything else is tampering).

Per connection the relay keeps what it has read but not yet passed on: bytes of the site
stream that are not yet a whole record, and the two outgoing buffers. Reading from one
side stops while the other side's buffer is above a high-water mark, so a slow receiver
pushes back on its sender through TCP flow control instead of filling memory. All of it
is part of the handed-over state, together with the half-close flags.

While the handoff has exported the sockets (``freeze``), no new socket may appear: the
listener is not accepted from, and connections still in their handshake are not read
(their bytes wait in the kernel, or in ``t_in``, for the next process).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.config import Address, TunnelSpec
from gateway_daemon.tunnels.counters import TCP_SLOTS, CounterTable
from gateway_daemon.tunnels.errors import CounterExhausted, HandshakeError
from gateway_daemon.tunnels.handshake import parse_initiation, respond
from gateway_daemon.tunnels.loop import EVENT_READ, EVENT_WRITE, Reactor
from gateway_daemon.tunnels.session import Session
from gateway_daemon.tunnels.wire import (
    HEADER,
    HEADER_LEN,
    MAX_RECORD,
    MAX_RECORD_PAYLOAD,
    RECORD_LEN,
    TYPE_DATA,
)
from hitless import logs

# Above this many buffered bytes toward one side, the other side is not read.
HIGH_WATER = 256 * 1024
# Reads per readiness event, so one fast connection cannot starve the rest.
READS_PER_EVENT = 8
_LINGER_RESET = struct.pack("ii", 1, 0)

log = logs.get(__name__)


@dataclass
class TcpStats:
    accepted: int = 0
    established: int = 0
    closed: int = 0
    resets: int = 0
    bytes_from_sites: int = 0
    bytes_to_sites: int = 0


class TcpTunnel:
    """A configured TCP tunnel: who may connect and where its connections go."""

    __slots__ = ("last_timestamp", "peer_key", "spec", "target")

    def __init__(self, spec: TunnelSpec, target: Address) -> None:
        self.spec = spec
        self.peer_key: X25519PublicKey = spec.peer_key()
        self.target = target
        self.last_timestamp = 0


class TcpConn:
    """One site connection and the plain connection it is relayed to."""

    __slots__ = (
        "cid",
        "closed",
        "on_plain",
        "on_tunnel",
        "p_connected",
        "p_eof",
        "p_events",
        "p_out",
        "p_shut",
        "psock",
        "session",
        "t_eof",
        "t_events",
        "t_in",
        "t_out",
        "t_shut",
        "tsock",
    )

    def __init__(self, cid: int, tsock: socket.socket) -> None:
        self.cid = cid
        self.tsock = tsock
        self.psock: socket.socket | None = None
        self.session: Session | None = None
        self.t_in = bytearray()  # from the site, not yet a whole record
        self.t_out = bytearray()  # sealed records waiting to go to the site
        self.p_out = bytearray()  # plaintext waiting to go to the plain service
        self.p_connected = False
        self.t_eof = self.p_eof = False  # that side sent FIN
        self.t_shut = self.p_shut = False  # we sent FIN to that side
        self.closed = False
        self.t_events = self.p_events = 0
        self.on_tunnel: Callable[[int], None] = lambda _m: None
        self.on_plain: Callable[[int], None] = lambda _m: None


class TcpPlane:
    """The TCP tunnel listener and every relayed connection pair."""

    def __init__(
        self,
        tunnels: list[TcpTunnel],
        static: X25519PrivateKey,
        listen_sock: socket.socket,
        table: CounterTable,
    ) -> None:
        self._table = table
        self.tunnels = {t.spec.id: t for t in tunnels}
        self._static = static
        self.listen_sock = listen_sock
        self.conns: dict[int, TcpConn] = {}
        self.next_cid = 1
        self.frozen = False
        self.stats = TcpStats()
        self._reactor: Reactor | None = None
        self._listening = False
        self._buf = bytearray(MAX_RECORD_PAYLOAD)
        self._view = memoryview(self._buf)
        self._out = memoryview(bytearray(MAX_RECORD))
        self._seal = memoryview(bytearray(RECORD_LEN.size + MAX_RECORD))

    # -- set-up --------------------------------------------------------------------------

    def add(self, conn: TcpConn) -> None:
        """Adopt a connection (new or handed over) and bind its handlers."""
        conn.on_tunnel = lambda mask: self._on_tunnel(conn, mask)
        conn.on_plain = lambda mask: self._on_plain(conn, mask)
        self.conns[conn.cid] = conn
        self.next_cid = max(self.next_cid, conn.cid + 1)
        if self._reactor is not None:
            self._interest(conn)

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self._listen_interest()
        for conn in self.conns.values():
            self._interest(conn)

    def set_frozen(self, frozen: bool) -> None:
        """Export freeze on/off; call on the loop thread or while it is parked."""
        self.frozen = frozen
        self._listen_interest()
        for conn in list(self.conns.values()):
            self._interest(conn)

    def close_conn(self, conn: TcpConn) -> None:
        """Close one connection's sockets (no FIN or RST of ours: see ``close_all``)."""
        self._drop(conn)

    def close_all(self) -> None:
        """Close this process's copy of every socket, without FIN or RST: after a handoff
        the next process holds the same connections."""
        for conn in self.conns.values():
            conn.closed = True
            conn.tsock.close()
            if conn.psock is not None:
                conn.psock.close()
        self.conns.clear()

    # -- interest ------------------------------------------------------------------------

    def _listen_interest(self) -> None:
        reactor = self._reactor
        if reactor is None:
            return
        want = not self.frozen
        if want and not self._listening:
            reactor.register(self.listen_sock, EVENT_READ, self._on_accept)
        elif not want and self._listening:
            reactor.unregister(self.listen_sock)
        self._listening = want

    def _interest(self, c: TcpConn) -> None:
        reactor = self._reactor
        if reactor is None or c.closed:
            return
        t = 0
        if not c.t_eof and len(c.p_out) < HIGH_WATER and not (self.frozen and c.session is None):
            t |= EVENT_READ
        if c.t_out:
            t |= EVENT_WRITE
        if t != c.t_events:
            _set(reactor, c.tsock, c.t_events, t, c.on_tunnel)
            c.t_events = t
        if c.psock is None:
            return
        p = 0
        if not c.p_connected:
            p = EVENT_WRITE
        else:
            if not c.p_eof and len(c.t_out) < HIGH_WATER:
                p |= EVENT_READ
            if c.p_out:
                p |= EVENT_WRITE
        if p != c.p_events:
            _set(reactor, c.psock, c.p_events, p, c.on_plain)
            c.p_events = p

    # -- events --------------------------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        for _ in range(READS_PER_EVENT):
            try:
                sock, _addr = self.listen_sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("tcp_accept_failed", error=str(exc))
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.accepted += 1
            conn = TcpConn(self.next_cid, sock)
            self.add(conn)

    def _on_tunnel(self, c: TcpConn, mask: int) -> None:
        if c.closed:
            return
        try:
            if mask & EVENT_WRITE:
                self.stats.bytes_to_sites += _write(c.tsock, c.t_out)
            if mask & EVENT_READ:
                self._read_tunnel(c)
        except (OSError, _Refused) as exc:
            self._reset(c, str(exc))
            return
        self._progress(c)

    def _on_plain(self, c: TcpConn, mask: int) -> None:
        if c.closed or c.psock is None:
            return
        try:
            if not c.p_connected:
                err = c.psock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connecting to the plain target: {errno.errorcode[err]}")
                c.p_connected = True
            if mask & EVENT_WRITE:
                _write(c.psock, c.p_out)
            if mask & EVENT_READ:
                self._read_plain(c)
        except (OSError, CounterExhausted) as exc:
            self._reset(c, str(exc))
            return
        self._progress(c)

    def _read_tunnel(self, c: TcpConn) -> None:
        for _ in range(READS_PER_EVENT):
            if c.t_eof or len(c.p_out) >= HIGH_WATER:
                return
            try:
                n = c.tsock.recv_into(self._buf)
            except BlockingIOError:
                return
            if n == 0:
                c.t_eof = True
                if c.session is None:
                    raise _Refused("the site closed before its handshake")
                return
            self.stats.bytes_from_sites += n
            c.t_in += self._view[:n]
            self._records(c)

    def _records(self, c: TcpConn) -> None:
        """Handle every whole record in ``t_in``; keep the incomplete tail."""
        buf, off, total = c.t_in, 0, len(c.t_in)
        try:
            while total - off >= RECORD_LEN.size:
                (length,) = RECORD_LEN.unpack_from(buf, off)
                if not HEADER_LEN <= length <= MAX_RECORD:
                    raise _Refused(f"record length {length} out of range")
                if total - off - RECORD_LEN.size < length:
                    return
                if c.session is None and self.frozen:
                    return  # handshakes wait for the next process: it will own the socket
                start = off + RECORD_LEN.size
                record = buf[start : start + length]  # a copy: t_in is resized below
                off = start + length
                if c.session is None:
                    self._handshake(c, bytes(record))
                    continue
                kind, tunnel_id, counter = HEADER.unpack_from(record)
                if kind != TYPE_DATA or tunnel_id != c.session.tunnel_id:
                    raise _Refused(f"unexpected record type {kind} for tunnel {tunnel_id}")
                m = c.session.open_record_into(memoryview(record), counter, self._out)
                if m < 0:
                    raise _Refused("record does not authenticate or is out of order")
                c.p_out += self._out[:m]
        finally:
            if off:
                del buf[:off]

    def _handshake(self, c: TcpConn, message: bytes) -> None:
        try:
            tunnel_id, _ = parse_initiation(message)
            tunnel = self.tunnels.get(tunnel_id)
            if tunnel is None:
                raise HandshakeError(f"no TCP tunnel {tunnel_id}")
            accepted = respond(
                message, self._static, tunnel.peer_key, last_timestamp=tunnel.last_timestamp
            )
        except HandshakeError as exc:
            raise _Refused(str(exc)) from exc
        peer = tunnel.spec.peer
        if peer is not None and c.tsock.getpeername()[0] != peer[0]:
            raise _Refused(f"tunnel {tunnel_id}: connection from an address not its peer")
        if sum(1 for other in self.conns.values() if other.session is not None) >= TCP_SLOTS:
            raise _Refused(f"all {TCP_SLOTS} TCP tunnel connections are in use")
        accepted.session.install(self._table)
        tunnel.last_timestamp = accepted.timestamp
        c.session = accepted.session
        c.t_out += RECORD_LEN.pack(len(accepted.response)) + accepted.response
        psock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        psock.setblocking(False)
        psock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = psock.connect_ex(tunnel.target)
        if err not in (0, errno.EINPROGRESS):
            psock.close()
            raise _Refused(f"cannot connect to {tunnel.target}: {errno.errorcode.get(err, err)}")
        c.psock = psock
        self.stats.established += 1
        log.info("tcp_tunnel_up", tunnel=tunnel_id, conn=c.cid)

    def _read_plain(self, c: TcpConn) -> None:
        assert c.psock is not None and c.session is not None
        seal, view = self._seal, self._view
        for _ in range(READS_PER_EVENT):
            if c.p_eof or len(c.t_out) >= HIGH_WATER:
                return
            try:
                n = c.psock.recv_into(self._buf)
            except BlockingIOError:
                return
            if n == 0:
                c.p_eof = True
                return
            k = c.session.seal_into(seal[RECORD_LEN.size :], view[:n])
            RECORD_LEN.pack_into(seal, 0, k)
            c.t_out += seal[: RECORD_LEN.size + k]

    def _progress(self, c: TcpConn) -> None:
        """Pass on half-closes once everything before them went out; close when done."""
        try:
            if c.t_out:
                self.stats.bytes_to_sites += _write(c.tsock, c.t_out)
            if c.p_out and c.p_connected and c.psock is not None:
                _write(c.psock, c.p_out)
            if c.t_eof and not c.p_out and not c.p_shut and c.p_connected and c.psock:
                c.psock.shutdown(socket.SHUT_WR)
                c.p_shut = True
            if c.p_eof and not c.t_out and not c.t_shut:
                c.tsock.shutdown(socket.SHUT_WR)
                c.t_shut = True
        except OSError as exc:
            self._reset(c, str(exc))
            return
        if c.t_shut and c.p_shut:
            self._drop(c)
            self.stats.closed += 1
            return
        self._interest(c)

    def _reset(self, c: TcpConn, why: str) -> None:
        """Tear a connection pair down at once, with RST, both ways."""
        log.info("tcp_tunnel_reset", conn=c.cid, reason=why)
        self.stats.resets += 1
        for sock in (c.tsock, c.psock):
            if sock is not None:
                # An error here means the socket is already gone: close() is all that is left.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._drop(c)

    def _drop(self, c: TcpConn) -> None:
        reactor = self._reactor
        if reactor is not None:
            if c.t_events:
                reactor.unregister(c.tsock)
            if c.p_events and c.psock is not None:
                reactor.unregister(c.psock)
        c.t_events = c.p_events = 0
        c.closed = True
        if c.session is not None:
            self._table.release(c.session.slot)
            c.session = None
        c.tsock.close()
        if c.psock is not None:
            c.psock.close()
        self.conns.pop(c.cid, None)


class _Refused(Exception):
    """A protocol violation on one connection: it is reset, the gateway goes on."""


def _set(
    reactor: Reactor, sock: socket.socket, old: int, new: int, handler: Callable[[int], None]
) -> None:
    if old and new:
        reactor.modify(sock, new, handler)
    elif new:
        reactor.register(sock, new, handler)
    else:
        reactor.unregister(sock)


def _write(sock: socket.socket, buf: bytearray) -> int:
    """Send what the kernel takes now; drop it from ``buf``; return the count."""
    if not buf:
        return 0
    try:
        sent = sock.send(buf)
    except BlockingIOError:
        return 0
    del buf[:sent]
    return sent
