"""``TunnelPlane``: the gateway's encrypted tunnels as a ``gateway_daemon.plane.Plane``.

One reactor thread serves three shared sockets (the UDP tunnel socket, the plain UDP
socket, the TCP tunnel listener) and every relayed TCP connection pair. The handoff
drives it through the ``Plane`` methods; ``adopt()`` builds the next process's copy.

Life of a plane::

    from_config()  ──▶ SERVING ◀── start(final) ── LOADED ◀── adopt()
                        │   ▲
                pause() ▼   │ resume()
                       PAUSED ── close() ──▶ CLOSED   (from any state)

Counters across a handoff. Every session's counters and replay window live in the
counter table (``counters``), a memfd passed with the sockets and mapped by both
processes: the new process continues every send counter exactly where the old one
stopped, with no safety margin, and nothing about them is copied at the cutover: after
``pause()`` the old process cannot send (its only sending thread is parked), and the new
one reads the table only once it has the final state. A margin would protect
against nothing that can happen, and it would cost: receivers slide their replay windows
forward by the margin, so old packets still in flight and reordered behind the first new
one fall out of the window and are lost. The one case where two processes could both
send from the same counters is a rollback after the next process already started; the
handoff must make sure the next process is gone before it calls ``resume()``. As defence
in depth, ``resume()`` after ``final_state()`` moves every UDP send counter forward by
``RESUME_COUNTER_SKIP`` (receivers accept the jump; a TCP stream cannot skip a record,
so TCP relies on the handoff's guarantee alone). A new process that served before it
was killed may also have reused a slot it freed; slots are reused oldest-released
first, which makes that unlikely but not impossible.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from gateway_daemon.plane import Handle, Passable, ReadySignal, SharedFile
from gateway_daemon.tunnels import state as st
from gateway_daemon.tunnels.config import Address, TunnelsConfig, format_address
from gateway_daemon.tunnels.counters import TCP_SLOTS, CounterTable
from gateway_daemon.tunnels.errors import PlaneStateError, StateError
from gateway_daemon.tunnels.loop import Reactor
from gateway_daemon.tunnels.session import KEY_LEN, Session
from gateway_daemon.tunnels.tcp import TcpConn, TcpPlane, TcpTunnel
from gateway_daemon.tunnels.udp import UdpPlane, UdpTunnel
from hitless import logs

DESCRIPTION_FORMAT: Final = "hitless.tunnels.sockets"
RESUME_COUNTER_SKIP: Final = 1 << 32
# Shared UDP sockets hold what arrives while the loop is frozen: about 10,000 small
# datagrams each: a second of the benchmark's traffic (10,000 packets/s per socket).
UDP_BUFFER_BYTES: Final = 4 * 1024 * 1024
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
PAUSE_TIMEOUT_S: Final = 2.0
LISTEN_BACKLOG: Final = 512
# How long the export freeze holds when the handoff neither pauses nor resumes.
FREEZE_TIMEOUT_S: Final = 60.0

log = logs.get(__name__)


class Phase(enum.Enum):
    LOADED = "loaded"
    SERVING = "serving"
    PAUSED = "paused"
    CLOSED = "closed"


def resolve(addr: Address) -> Address:
    """A configured address as ``recvfrom`` reports it (numeric IPv4)."""
    info = socket.getaddrinfo(addr[0], addr[1], socket.AF_INET, socket.SOCK_DGRAM)
    host, port = info[0][4][:2]
    return str(host), int(port)


def bind_sockets(config: TunnelsConfig) -> list[socket.socket]:
    """Fresh sockets for ``config``: UDP tunnel, UDP plain, TCP listener."""
    made: list[socket.socket] = []
    try:
        for addr in (config.udp_listen, config.udp_plain):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made.append(sock)
            size_buffers(sock)
            sock.bind(addr)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(config.tcp_listen)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in made:
            sock.close()
        raise
    for sock in made:
        sock.setblocking(False)
    return made


def size_buffers(sock: socket.socket) -> None:
    """Give a shared UDP socket ``UDP_BUFFER_BYTES`` each way. SO_RCVBUF is capped at
    net.core.rmem_max (wmem_max); with CAP_NET_ADMIN the FORCE variants are not, so the
    size is what is asked for on any host. (The kernel doubles it for its own overhead:
    getsockopt reports 8 MiB, which holds about 10,000 of the benchmark's datagrams.)"""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER_BYTES)


def _log_buffers(udp: socket.socket, plain: socket.socket) -> None:
    try:
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        rmem_max = -1
    log.info(
        "tunnels_udp_buffers",
        rcvbuf=[s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in (udp, plain)],
        rmem_max=rmem_max,
    )


class TunnelPlane:
    """The tunnels data plane of one gateway process."""

    def __init__(
        self,
        config: TunnelsConfig,
        udp_sock: socket.socket,
        plain_sock: socket.socket,
        listen_sock: socket.socket,
        *,
        name: str = "tunnels",
        clock: Callable[[], float] = time.monotonic,
        table: CounterTable | None = None,
    ) -> None:
        self.config = config
        static = config.private()
        udp, tcp = [], []
        for spec in config.tunnels:
            fwd = spec.forward
            if spec.protocol == "udp":
                plain = resolve(fwd.addr) if fwd.addr is not None else None
                udp.append(UdpTunnel(spec, plain))
            else:
                assert fwd.addr is not None
                tcp.append(TcpTunnel(spec, resolve(fwd.addr)))
        # Every session's counters: one slot per UDP tunnel and per TCP connection, and
        # one spare, since a UDP tunnel's new session takes its slot before the old one
        # gives its own back. TCP connections are limited to TCP_SLOTS (``tcp``).
        slots = len(udp) + TCP_SLOTS + 1
        self.table = table or CounterTable.create(slots, name=f"hitless-{name}")
        self.udp = UdpPlane(udp, static, udp_sock, plain_sock, self.table)
        _log_buffers(udp_sock, plain_sock)
        self.tcp = TcpPlane(tcp, static, listen_sock, self.table)
        # Where the shared sockets are bound, checked again before serving after a handoff.
        self._bound = (_name(udp_sock), _name(plain_sock), _name(listen_sock))
        self._inherited: list[SharedFile] = []
        self._reactor = Reactor(name)
        self._clock = clock
        self._phase = Phase.LOADED
        self._exported: list[tuple[dict[str, Any], Passable]] | None = None
        self._freeze_until = 0.0
        self._final_taken = False
        # What the last snapshot carried of each UDP tunnel (session, endpoint, last
        # handshake): the final state has only the tunnels that changed since, and the
        # whole session only of one that is new since.
        self._in_snapshot: dict[int, st.UdpTunnelState] = {}
        self._tcp_in_snapshot: dict[int, Session] = {}
        self._previous_last_forward = 0.0
        self.cutover_ms: float | None = None
        # time.monotonic_ns() stamps of the new process's side of the cutover.
        self._marks: dict[str, int] = {}

    # -- standalone use ----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: TunnelsConfig, *, name: str = "tunnels") -> TunnelPlane:
        """Bind fresh sockets for ``config`` and start serving."""
        plane = cls(config, *bind_sockets(config), name=name)
        plane._serve()
        return plane

    def __enter__(self) -> TunnelPlane:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def udp_address(self) -> Address:
        return _name(self.udp.tunnel_sock)

    @property
    def plain_address(self) -> Address:
        return _name(self.udp.plain_sock)

    @property
    def tcp_address(self) -> Address:
        return _name(self.tcp.listen_sock)

    def stats(self) -> dict[str, int]:
        """Counters for the operator (a copy; racy reads of plain ints are fine)."""
        out = {f"udp_{k}": v for k, v in vars(self.udp.stats).items()}
        out.update({f"tcp_{k}": v for k, v in vars(self.tcp.stats).items()})
        out["tcp_connections"] = len(self.tcp.conns)
        out["handler_errors"] = self._reactor.handler_errors
        out["loop_slow_rounds"] = self._reactor.slow_rounds
        return out

    # -- Plane: old process ------------------------------------------------------------

    def sockets(self) -> list[Passable]:
        """The counter table and every socket, in ``describe()`` order. From here on no
        new socket appears (no accepts, no handshakes on TCP) until ``resume()`` or the
        freeze times out."""
        self._require(Phase.SERVING, Phase.PAUSED, what="sockets()")
        self._reactor.call(self._freeze, PAUSE_TIMEOUT_S)
        exported: list[tuple[dict[str, Any], Passable]] = [
            ({"role": "counters", "slots": self.table.slots}, self.table),
            (
                {"role": "udp_tunnel", "addr": format_address(self.udp_address)},
                self.udp.tunnel_sock,
            ),
            (
                {"role": "udp_plain", "addr": format_address(self.plain_address)},
                self.udp.plain_sock,
            ),
            (
                {"role": "tcp_listen", "addr": format_address(self.tcp_address)},
                self.tcp.listen_sock,
            ),
        ]
        for conn in list(self.tcp.conns.values()):
            exported.append(({"role": "tcp_tunnel", "conn": conn.cid}, conn.tsock))
            if conn.psock is not None:
                exported.append(({"role": "tcp_plain", "conn": conn.cid}, conn.psock))
        self._exported = exported
        return [sock for _, sock in exported]

    def describe(self) -> dict[str, Any]:
        if self._exported is None:
            self.sockets()
        assert self._exported is not None
        return {
            "format": DESCRIPTION_FORMAT,
            "version": st.STATE_VERSION,
            "sockets": [role for role, _ in self._exported],
            "endpoints": self.endpoints(),
        }

    def snapshot(self) -> bytes:
        """The loop thread copies references and rehearses the final state (a few hundred
        microseconds in the benchmark, growing with tunnels and buffered TCP bytes); the
        snapshot is encoded here, while the loop goes on forwarding."""
        box: list[st.Snapshot] = []

        def take() -> None:
            box.append(self._take_snapshot())
            # A rehearsal of the cutover's share of this process, thrown away: the first
            # run of any code is the slowest, and the real one runs in the pause.
            self._encode_final()

        self._reactor.call(take, PAUSE_TIMEOUT_S)
        return st.encode_snapshot(box[0])

    def pause(self) -> None:
        self._require(Phase.SERVING, what="pause()")
        self._reactor.pause(PAUSE_TIMEOUT_S)
        self._phase = Phase.PAUSED
        self._final_taken = False

    def cut_over(self, send: Callable[[bytes], None]) -> None:
        """``pause()``, then ``final_state()`` passed to ``send``, both on the loop
        thread the moment it parks: the cutover pause does not wait for another thread
        to wake up. The plane is paused when this returns, and when ``send`` raised
        (which this raises): only a loop that did not park leaves it serving."""
        self._require(Phase.SERVING, what="cut_over()")

        def on_park() -> None:
            self._phase = Phase.PAUSED
            self._final_taken = False
            send(self.final_state())

        # on_park sets PAUSED before anything in it can fail; if the loop does not park
        # in time it never runs, and the plane stays SERVING, as after pause() fails.
        self._reactor.pause(PAUSE_TIMEOUT_S, on_park)

    def cut_over_when(self, ready: ReadySignal, send: Callable[[bytes], None]) -> None:
        """``cut_over(send)`` the moment READY arrives, with the READY read on the loop
        thread too (``Reactor.pause_when``): the loop forwards until the round that
        finds it, parks there, encodes the final state and sends it, with no other
        thread to wake anywhere in between. Raises what ``ready`` raises (the plane
        then serves on, as when READY never came), ``ready.timed_out()`` at its
        deadline, and what ``send`` raised (the plane is then paused)."""
        self._require(Phase.SERVING, what="cut_over_when()")
        if not self._reactor.running:
            ready.wait()
            self.cut_over(send)
            return

        def on_park() -> None:
            self._phase = Phase.PAUSED
            self._final_taken = False
            send(self.final_state())

        parked = self._reactor.pause_when(
            ready, ready.take, on_park, ready.deadline(), ready.tick, ready.every_s
        )
        if not parked:
            raise ready.timed_out()

    def final_state(self) -> bytes:
        self._require(Phase.PAUSED, what="final_state()")
        if self._exported is None or self._clock() > self._freeze_until:
            raise PlaneStateError(
                "final_state(): the sockets were not exported, or the export freeze timed "
                "out; call sockets() again and resend them"
            )
        exported = {id(sock) for _, sock in self._exported}
        for conn in self.tcp.conns.values():
            if id(conn.tsock) not in exported or (
                conn.psock is not None and id(conn.psock) not in exported
            ):
                raise PlaneStateError(
                    f"final_state(): TCP connection {conn.cid} has a socket that was not "
                    "exported; call sockets() again"
                )
        data = self._encode_final()
        self._final_taken = True
        return data

    def _encode_final(self) -> bytes:
        """What changed since the snapshot, encoded (on the loop thread, or parked)."""
        in_snapshot, tcp_in_snapshot = self._in_snapshot, self._tcp_in_snapshot
        udp = []
        for tid, t in self.udp.tunnels.items():
            was = in_snapshot.get(tid)
            if (
                was is None
                or was.session is not t.session
                or was.endpoint != t.endpoint
                or (was.last_timestamp != t.last_timestamp)
            ):
                session = st.session_ref(t.session, None if was is None else was.session)
                udp.append(st.UdpFinal(tid, session, t.endpoint, t.last_timestamp))
        final = st.FinalState(
            udp=udp,
            udp_pending=list(self.udp.pending),
            tcp_timestamps={tid: t.last_timestamp for tid, t in self.tcp.tunnels.items()},
            tcp=[_conn_final(c, tcp_in_snapshot.get(c.cid)) for c in self.tcp.conns.values()],
            last_forward=self.udp.last_forward,
        )
        return st.encode_final(final)

    def resume(self) -> None:
        """Undo ``pause()``; also lifts the export freeze of ``sockets()`` when the
        handoff is abandoned before it paused. First puts back what the other process,
        which held the same sockets, may have changed on them (``repair_sockets``);
        when one cannot serve as before, the plane still serves the others and this
        raises PlaneStateError saying which."""
        self._require(Phase.PAUSED, Phase.SERVING, what="resume()")
        problems = self.repair_sockets()
        if self._phase is Phase.SERVING:
            self._reactor.call(self._thaw, PAUSE_TIMEOUT_S)
        else:
            if self._final_taken:
                for tunnel in self.udp.tunnels.values():
                    if tunnel.session is not None:
                        tunnel.session.send_counter += RESUME_COUNTER_SKIP
            self._thaw()  # the loop is parked: safe to touch its selector
            self._phase = Phase.SERVING
            self._reactor.resume()
        if problems:
            raise PlaneStateError(
                "the tunnel plane serves again, but some of its sockets cannot serve as "
                f"before: {'; '.join(problems)}"
            )

    def repair_sockets(self) -> list[str]:
        """Make sure every socket of this plane is as it serves them, putting back what
        another process holding them may have changed: non-blocking mode (shared by
        every copy of a socket: the loop reads until EAGAIN and would block), the shared
        UDP sockets' buffers, the listener listening. Returns what cannot be put back
        (a socket closed, or bound elsewhere), one line each; empty when all is well."""
        wrong: list[str] = []
        shared = {
            "udp_tunnel": self.udp.tunnel_sock,
            "udp_plain": self.udp.plain_sock,
            "tcp_listen": self.tcp.listen_sock,
        }
        expected = {"udp_tunnel": self._bound[0], "udp_plain": self._bound[1],
                    "tcp_listen": self._bound[2]}  # fmt: skip
        for role, sock in shared.items():
            try:
                sock.setblocking(False)
                if role == "tcp_listen":
                    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                        # Shut down, it lost its port (Linux): bind it again, then listen.
                        with contextlib.suppress(OSError):
                            sock.bind(expected[role])
                        sock.listen(LISTEN_BACKLOG)
                elif sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < UDP_BUFFER_BYTES:
                    size_buffers(sock)
                if _name(sock) != expected[role]:
                    wrong.append(f"{role} is bound to {_name(sock)}, not {expected[role]}")
            except OSError as exc:
                wrong.append(f"{role}: {exc}")
        for conn in list(self.tcp.conns.values()):
            for side in (conn.tsock, conn.psock):
                if side is not None and side.fileno() >= 0:
                    try:
                        side.setblocking(False)
                    except OSError as exc:
                        wrong.append(f"TCP connection {conn.cid}: {exc}")
        return wrong

    # -- Plane: new process ------------------------------------------------------------

    def start(self, final_state: bytes) -> None:
        """Apply the final state and serve. Everything else was built in ``adopt()``,
        and the loop thread waits parked: this is the whole of the new process's share
        of the cutover pause."""
        self._require(Phase.LOADED, what="start()")
        self._start(final_state)
        self._serve()
        self._marks["serve_returned"] = time.monotonic_ns()

    def start_from(self, receive: Callable[[], bytes | None], timeout: float) -> None:
        """``start(receive())`` with all of it on the parked loop thread, which blocks
        in ``receive`` (it must have a deadline of its own) and goes straight on
        serving: the cutover wakes one thread of this process, not two. Returns once
        it serves; raises what ``receive`` or the final state raised (the plane then
        stays loaded and parked), or PlaneStateError past ``timeout``. ``receive``
        returns None when no final state will come (the old process died): the plane
        then starts alone (``_start_alone``)."""
        self._require(Phase.LOADED, what="start_from()")
        done = threading.Event()
        failed: list[BaseException] = []

        def on_loop() -> None:
            try:
                final = receive()
                if final is None:
                    self._start_alone()
                else:
                    self._start(final)
                # The caller learns it serves after the loop's first round: woken
                # earlier, it would take the GIL from that round.
                self._reactor.after_round(done.set)
                self._serve(from_loop=True)
            except BaseException as exc:  # raised below, in the caller's thread
                failed.append(exc)
                done.set()

        self._reactor.run_parked(on_loop)
        if not done.wait(timeout):
            raise PlaneStateError(f"start_from(): the loop did not start within {timeout}s")
        if failed:
            raise failed[0]
        self._marks["serve_returned"] = time.monotonic_ns()

    def _start(self, final_state: bytes) -> None:
        marks = self._marks
        marks["start"] = time.monotonic_ns()
        final = st.decode_final(final_state)
        marks["decoded"] = time.monotonic_ns()
        self._apply(final)
        marks["applied"] = time.monotonic_ns()
        self._previous_last_forward = final.last_forward
        self._reactor.every_tick(self._report_cutover)

    def _start_alone(self) -> None:
        """New process, the old one dead before it sent its final state: serve what
        the snapshot holds. Every counter and replay window is where the old process
        left it, in the counter table both mapped (it counts a send before it seals).
        What only the old process's memory held is lost with it, as in any crash:
        bytes it had read from a TCP connection or not yet written (that connection
        may then fail its next record and be reset), and the sessions of handshakes
        after the snapshot (those sites handshake again). As after a rollback, every
        UDP send counter moves ``RESUME_COUNTER_SKIP`` ahead: the old process's last
        handshakes may have reused a slot this process still reads as a snapshot
        session's; a TCP stream cannot skip records."""
        final = st.FinalState(
            udp=[],
            tcp=[
                st.TcpConnFinal(
                    c.cid, None if c.session is None else st.SNAPSHOT_SESSION, b"", b"", b"",
                    c.psock is not None, False, False, False, False, False,
                )
                for c in self.tcp.conns.values()
            ],
        )  # fmt: skip
        self._apply(final)
        for tunnel in self.udp.tunnels.values():
            if tunnel.session is not None:
                tunnel.session.send_counter += RESUME_COUNTER_SKIP
        log.warning(
            "tunnels_started_alone",
            udp_sessions=sum(1 for t in self.udp.tunnels.values() if t.session is not None),
            tcp_connections=len(self.tcp.conns),
        )

    def _prepare(self) -> None:
        """Start the loop thread parked, with every socket registered, so ``start()``
        only has to apply the final state and wake it (attaching again there only
        changes the interest the final state changed)."""
        self._reactor.pause(PAUSE_TIMEOUT_S)
        self.udp.attach(self._reactor)
        self.tcp.attach(self._reactor)
        self._reactor.start()
        _rehearse(self.tcp.conns)

    def close(self) -> None:
        """Stop the loop and close this process's copy of every socket (no FIN, no RST:
        after a handoff the next process owns the connections)."""
        if self._phase is Phase.CLOSED:
            return
        self._phase = Phase.CLOSED
        self._reactor.stop(PAUSE_TIMEOUT_S)
        self.tcp.close_all()
        for sock in (self.udp.tunnel_sock, self.udp.plain_sock, self.tcp.listen_sock):
            sock.close()
        for inherited in self._inherited:
            inherited.close()
        self.table.close()

    def endpoints(self) -> list[str]:
        return [
            f"udp://{format_address(self.udp_address)}",
            f"tcp://{format_address(self.tcp_address)}",
        ]

    # -- internals ---------------------------------------------------------------------

    def _freeze(self) -> None:
        # The deadline first, on the loop thread: the housekeeping tick must never see
        # the new freeze with an old deadline and lift it at once.
        self._freeze_until = self._clock() + FREEZE_TIMEOUT_S
        self.tcp.set_frozen(True)

    def _thaw(self) -> None:
        self.tcp.set_frozen(False)
        self._exported = None

    def _expire_freeze(self) -> None:
        if self.tcp.frozen and self._clock() > self._freeze_until:
            log.warning("tunnels_export_freeze_expired", timeout_s=FREEZE_TIMEOUT_S)
            self._thaw()

    def _report_cutover(self) -> None:
        """Once this process forwarded its first datagram after a handoff, log the
        cutover pause: the old process's last forward to this one's first."""
        first = self.udp.first_forward
        if self.cutover_ms is not None or not first or not self._previous_last_forward:
            return
        self.cutover_ms = (first - self._previous_last_forward) * 1000
        base = int(self._previous_last_forward * 1e9)
        marks = {
            **self._marks,
            "loop_woken": self._reactor.woken_ns,
            "first_forward": int(first * 1e9),
        }
        log.info(
            "tunnels_cutover",
            pause_ms=round(self.cutover_ms, 3),
            at=round(self._previous_last_forward, 6),  # time.monotonic, machine-wide
            marks_us={k: round((v - base) / 1000, 1) for k, v in marks.items()},
        )

    def add_marks(self, marks: dict[str, int]) -> None:
        """New process: more stamps (time.monotonic_ns) for the cutover's breakdown."""
        self._marks.update(marks)

    def cutover_marks(self) -> dict[str, int]:
        """Old process: when it last forwarded and when its loop parked
        (time.monotonic_ns), for the handoff's cutover breakdown."""
        return {
            "last_forward": int(self.udp.last_forward * 1e9),
            "parked": self._reactor.parked_ns,
        }

    def _serve(self, from_loop: bool = False) -> None:
        self.udp.attach(self._reactor)
        self.tcp.attach(self._reactor)
        self._reactor.every_tick(self._expire_freeze)
        self._phase = Phase.SERVING
        self._marks["resume"] = time.monotonic_ns()
        if from_loop:
            self._reactor.resume()  # this thread serves once it returns
        elif self._reactor.running:
            self._reactor.resume(wait_s=PAUSE_TIMEOUT_S)  # parked by _prepare()
        else:
            self._reactor.start()

    def _require(self, *phases: Phase, what: str) -> None:
        if self._phase not in phases:
            raise PlaneStateError(
                f"{what} in phase {self._phase.value}; allowed in "
                f"{', '.join(p.value for p in phases)}"
            )

    def _take_snapshot(self) -> st.Snapshot:
        """On the loop thread: which sessions there are now (no encoding here)."""
        udp = [
            st.UdpTunnelState(t.spec.id, t.session, t.endpoint, t.last_timestamp)
            for t in self.udp.tunnels.values()
        ]
        self._in_snapshot = {t.id: t for t in udp}
        self._tcp_in_snapshot = {
            c.cid: c.session for c in self.tcp.conns.values() if c.session is not None
        }
        return st.Snapshot(self.config, udp, dict(self._tcp_in_snapshot), self.table.slots)

    def _load(self, snap: st.Snapshot) -> None:
        """New process: the sessions of the snapshot, before the final state."""
        for item in snap.udp:
            tunnel = self.udp.tunnels.get(item.id)
            if tunnel is None:
                raise StateError(f"snapshot: UDP tunnel {item.id} is not in the config")
            tunnel.session, tunnel.endpoint = item.session, item.endpoint
            tunnel.last_timestamp = item.last_timestamp

    def _apply(self, final: st.FinalState) -> None:
        table = self.table
        for item in final.udp:
            tunnel = self.udp.tunnels.get(item.id)
            if tunnel is None:
                raise StateError(f"final state: UDP tunnel {item.id} is not in the config")
            where = f"UDP tunnel {item.id}"
            tunnel.session = st.resolve(item.session, tunnel.session, table, where)
            tunnel.endpoint = item.endpoint
            tunnel.last_timestamp = item.last_timestamp
        self.udp.pending.extend(final.udp_pending)
        for tid, stamp in final.tcp_timestamps.items():
            if tid in self.tcp.tunnels:
                self.tcp.tunnels[tid].last_timestamp = stamp
        live = {c.cid: c for c in final.tcp}
        for cid, conn in list(self.tcp.conns.items()):
            saved = live.pop(cid, None)
            if saved is None:
                # The old process closed it after exporting it: ours is the last copy.
                self.tcp.close_conn(conn)
                continue
            if saved.has_plain != (conn.psock is not None):
                raise StateError(f"final state: TCP connection {cid} sockets do not match")
            conn.session = st.resolve(saved.session, conn.session, table, f"TCP connection {cid}")
            conn.t_in, conn.t_out, conn.p_out = (
                bytearray(saved.t_in),
                bytearray(saved.t_out),
                bytearray(saved.p_out),
            )
            conn.p_connected, conn.t_eof, conn.p_eof = saved.p_connected, saved.t_eof, saved.p_eof
            conn.t_shut, conn.p_shut = saved.t_shut, saved.p_shut
        if live:
            raise StateError(f"final state: TCP connections {sorted(live)} came without sockets")
        sessions = [t.session for t in self.udp.tunnels.values()]
        sessions += [c.session for c in self.tcp.conns.values()]
        slots = [s.slot for s in sessions if s is not None]
        if len(set(slots)) != len(slots):
            raise StateError("final state: two sessions share a counter table slot")
        table.keep(set(slots))


def _rehearse(conns: dict[int, TcpConn]) -> None:
    """New process, before it says ready: run what the cutover runs first (decoding a
    final state like the one to come, sealing and opening a packet) on throwaway data,
    so that the real run, in the pause, is not the first."""
    final = st.FinalState(
        udp=[],
        tcp=[
            st.TcpConnFinal(cid, st.SNAPSHOT_SESSION, b"", b"", b"", c.psock is not None,
                            True, False, False, False, False)
            for cid, c in conns.items()
        ],
    )  # fmt: skip
    st.decode_final(st.encode_final(final))
    scratch = Session(0, os.urandom(KEY_LEN), os.urandom(KEY_LEN))
    echo = Session(0, scratch.recv_key, scratch.send_key)
    if echo.open(scratch.seal(bytes(64))) != bytes(64):
        raise StateError("the tunnel cipher does not open what it sealed")


def _name(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _conn_final(c: TcpConn, in_snapshot: Session | None) -> st.TcpConnFinal:
    return st.TcpConnFinal(
        cid=c.cid,
        session=st.session_ref(c.session, in_snapshot),
        t_in=bytes(c.t_in),
        t_out=bytes(c.t_out),
        p_out=bytes(c.p_out),
        has_plain=c.psock is not None,
        p_connected=c.p_connected,
        t_eof=c.t_eof,
        p_eof=c.p_eof,
        t_shut=c.t_shut,
        p_shut=c.p_shut,
    )


def adopt(description: dict[str, Any], sockets: list[Handle], snapshot: bytes) -> TunnelPlane:
    """Build the next process's plane from what the old one sent: loaded and checked,
    not serving until ``start(final_state)``. Raises StateError when the pieces do not
    fit together (the handoff then rolls back); the caller still owns the sockets then."""
    if description.get("format") != DESCRIPTION_FORMAT:
        raise StateError(f"description: not a {DESCRIPTION_FORMAT} document")
    if description.get("version") != st.STATE_VERSION:
        raise StateError(
            f"description: version {description.get('version')!r}, this version reads "
            f"{st.STATE_VERSION}"
        )
    roles = description.get("sockets")
    if not isinstance(roles, list) or len(roles) != len(sockets):
        raise StateError(
            f"description names {len(roles) if isinstance(roles, list) else 'no'} "
            f"descriptors, {len(sockets)} arrived"
        )
    first = roles[0] if roles and isinstance(roles[0], dict) else {}
    table_file = sockets[0] if first.get("role") == "counters" else None
    if not isinstance(table_file, SharedFile):
        raise StateError("description: the counter table must come first, and not as a socket")
    table = CounterTable.adopt(os.dup(table_file.fileno()))
    try:
        plane = _adopt(roles[1:], sockets[1:], st.decode_snapshot(snapshot, table), table)
    except BaseException:
        table.close()
        raise
    plane._inherited.append(table_file)
    return plane


def _adopt(
    roles: list[Any], sockets: list[Handle], snap: st.Snapshot, table: CounterTable
) -> TunnelPlane:
    shared: dict[str, socket.socket] = {}
    conns: dict[int, TcpConn] = {}
    for i, (role, sock) in enumerate(zip(roles, sockets, strict=True), start=1):
        kind = role.get("role") if isinstance(role, dict) else None
        if not isinstance(sock, socket.socket):
            raise StateError(f"descriptor {i} ({kind}): expected a socket")
        want = socket.SOCK_DGRAM if kind in ("udp_tunnel", "udp_plain") else socket.SOCK_STREAM
        if sock.type != want:
            raise StateError(f"socket {i} ({kind}): expected type {want!r}, got {sock.type!r}")
        sock.setblocking(False)
        if kind in ("udp_tunnel", "udp_plain", "tcp_listen"):
            if format_address(_name(sock)) != role.get("addr"):
                raise StateError(
                    f"socket {i} ({kind}): bound to {_name(sock)}, not {role.get('addr')}"
                )
            shared[kind] = sock
        elif kind in ("tcp_tunnel", "tcp_plain"):
            cid = role.get("conn")
            if not isinstance(cid, int):
                raise StateError(f"socket {i} ({kind}): missing its connection id")
            if kind == "tcp_tunnel":
                conns[cid] = TcpConn(cid, sock)
            elif cid in conns:
                conns[cid].psock = sock
            else:
                raise StateError(f"socket {i}: plain side of unknown connection {cid}")
        else:
            raise StateError(f"socket {i}: unknown role {kind!r}")
    missing = {"udp_tunnel", "udp_plain", "tcp_listen"} - set(shared)
    if missing:
        raise StateError(f"description: no socket for {sorted(missing)}")
    plane = TunnelPlane(
        snap.config, shared["udp_tunnel"], shared["udp_plain"], shared["tcp_listen"], table=table
    )
    plane._load(snap)
    for cid, conn in conns.items():
        conn.session = snap.tcp_sessions.get(cid)
        plane.tcp.add(conn)
    plane._prepare()
    return plane
