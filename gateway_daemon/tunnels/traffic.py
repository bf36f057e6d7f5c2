"""The traffic tool: plays the remote sites of a gateway and measures what gets through.

For every UDP tunnel it runs two streams: site → gateway → plain service ("up", sealed
by the tool, decrypted by the gateway) and plain service → gateway → site ("down",
sealed by the gateway, checked by the tool). Packets carry a stream id, a sequence
number and a send time; the tool counts lost, duplicated and reordered packets and the
gaps between consecutive arrivals (the longest is what a handoff costs). For every TCP
tunnel it streams a known byte pattern both ways and checks every byte.

Usage (``gateway-daemon traffic`` once wired, or ``python -m gateway_daemon.tunnels.traffic``)::

    traffic --write-lab DIR --udp-tunnels 4 --tcp-tunnels 2 --port-base 51820
    gateway-daemon --tunnels DIR/tunnels.json ...       # or: python -m gateway_daemon.tunnels.serve
    traffic --sites DIR/sites.json --rate 40000 --duration 5 --json

Loopback addresses only. One thread; pacing by the clock, reads until EAGAIN. SIGINT or
SIGTERM ends the sending early; the tool still drains and reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels import drops
from gateway_daemon.tunnels.errors import TunnelConfigError, TunnelError
from gateway_daemon.tunnels.lab import Sites, write_lab
from gateway_daemon.tunnels.report import GapStats, TcpReport, TrafficReport, UdpReport
from gateway_daemon.tunnels.site import SITE_BUFFER_BYTES, TcpSite, Timestamps, UdpSite
from gateway_daemon.tunnels.wire import HEADER, MAX_DATAGRAM, MAX_RECORD_PAYLOAD, OVERHEAD

EXIT_OK: Final = 0
EXIT_TRAFFIC_PROBLEM: Final = 1  # loss, duplicates, corruption or resets were seen
EXIT_USAGE: Final = 2

PACKET: Final = struct.Struct("!IQQ")  # stream id, sequence, send time
PATTERN_LEN: Final = 65536
_PATTERN: Final = bytes((i * 131 + (i >> 8) * 7) & 0xFF for i in range(PATTERN_LEN)) * 2
# Per tunnel and direction: bytes the tool keeps queued before it stops generating more.
TCP_QUEUE: Final = 256 * 1024
BURST: Final = 512
# The selector's resolution (epoll waits whole milliseconds); shorter waits are slept.
_TICK_S: Final = 0.001


@dataclass(frozen=True)
class TrafficConfig:
    """One traffic run: which sites, how much, how long."""

    sites: Sites
    rate: float = 1000.0  # UDP packets per second, all tunnels and both directions
    duration: float = 2.0
    size: int = 64  # UDP payload bytes
    tcp_rate: float = 1_000_000.0  # bytes per second per TCP tunnel and direction
    drain: float = 2.0  # how long to wait for stragglers after sending stops
    setup_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.tcp_rate < 0 or self.duration <= 0 or self.drain < 0:
            raise TunnelConfigError("traffic: rates and drain must be >= 0, duration > 0")
        if not PACKET.size <= self.size <= MAX_DATAGRAM - OVERHEAD:
            raise TunnelConfigError(
                f"traffic: size must be {PACKET.size}..{MAX_DATAGRAM - OVERHEAD} bytes"
            )


def _expected(offset: int, length: int) -> bytes:
    """The pattern bytes at stream ``offset``; ``length`` at most PATTERN_LEN."""
    start = offset % PATTERN_LEN
    return _PATTERN[start : start + length]


class _UdpStream:
    """One direction of one UDP tunnel."""

    __slots__ = ("sent", "stats", "to_site")

    def __init__(self, to_site: bool) -> None:
        self.to_site = to_site
        self.sent = 0
        self.stats = GapStats()


class _TcpDirection:
    __slots__ = ("exact", "gaps", "generated", "queue", "received")

    def __init__(self) -> None:
        self.generated = 0
        self.received = 0
        self.exact = True
        self.queue = bytearray()
        self.gaps = GapStats()


class _TcpFlow:
    __slots__ = ("dead", "down", "plain", "site", "up")

    def __init__(self, site: TcpSite, plain: socket.socket) -> None:
        self.site = site
        self.plain = plain
        self.up = _TcpDirection()  # site → plain service
        self.down = _TcpDirection()  # plain service → site
        self.dead = False


class TrafficRun:
    """One run of the tool. ``run()`` blocks; ``started`` is set once traffic flows, so a
    test can do something (a handoff) in the middle of it."""

    def __init__(self, config: TrafficConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.started = threading.Event()
        self._stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._udp_sites: list[UdpSite] = []
        self._plain_udp: list[socket.socket] = []
        self._streams: list[_UdpStream] = []
        self._tcp: list[_TcpFlow] = []
        self._closables: list[socket.socket] = []
        self._resets = 0
        self._rejected = 0
        # The longest the tool went without sending while it should have: its own
        # stalls (CPU it did not get), which look like gaps at the receivers too.
        self._max_send_gap = 0.0
        # UDP pacing: when sending began, packets sent, whose turn is next, last send.
        self._start = 0.0
        self._sent = 0
        self._turn = 0
        self._last_send = 0.0
        self._payload = bytearray(config.size)
        self._sealed = memoryview(bytearray(config.size + OVERHEAD))
        self._rbuf = bytearray(MAX_DATAGRAM)
        self._rview = memoryview(self._rbuf)
        self._obuf = memoryview(bytearray(MAX_DATAGRAM))

    def stop(self) -> None:
        """End the sending now (from any thread); ``run()`` drains and reports."""
        self._stopping.set()

    def run(self) -> TrafficReport:
        collecting = gc.isenabled()
        try:
            self._setup()
            # No collector pauses while measuring: a full collection stalls the tool
            # for milliseconds, which would show as gaps the gateway did not cause. What
            # the run allocates is freed by reference counting.
            gc.collect()
            gc.disable()
            self.started.set()
            elapsed = self._pump()
            return self._report(elapsed)
        finally:
            if collecting:
                gc.enable()
            self._close()

    # -- set-up --------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, sites = self.config, self.config.sites
        gateway_key = X25519PublicKey.from_public_bytes(sites.gateway_public)
        stamps = Timestamps()
        # Every plain socket is bound before any site socket exists: a site socket takes
        # an ephemeral port, which could otherwise be a plain port still to bind.
        plains = [self._bind_plain(spec.protocol, spec.plain) for spec in sites.sites]
        for spec, plain in zip(sites.sites, plains, strict=True):
            static = X25519PrivateKey.from_private_bytes(spec.private_key)
            if spec.protocol == "udp":
                site = UdpSite(spec.tunnel, static, gateway_key, sites.udp_gateway)
                self._closables.append(site.sock)
                site.handshake(stamps, cfg.setup_timeout)
                index = len(self._udp_sites)
                self._udp_sites.append(site)
                self._plain_udp.append(plain)
                self._streams += [_UdpStream(False), _UdpStream(True)]
                self._selector.register(plain, selectors.EVENT_READ, ("plain", index))
                self._selector.register(site.sock, selectors.EVENT_READ, ("site", index))
            else:
                tsite = TcpSite(spec.tunnel, static, gateway_key, sites.tcp_gateway)
                self._closables.append(tsite.sock)
                tsite.connect(stamps, cfg.setup_timeout)
                conn, _ = plain.accept()
                self._closables.append(conn)
                conn.setblocking(False)
                flow = _TcpFlow(tsite, conn)
                index = len(self._tcp)
                self._tcp.append(flow)
                self._selector.register(tsite.sock, selectors.EVENT_READ, ("tsite", index))
                self._selector.register(conn, selectors.EVENT_READ, ("tplain", index))

    def _bind_plain(self, protocol: str, addr: tuple[str, int]) -> socket.socket:
        """The plain service's socket of one site: UDP, or a TCP listener."""
        if protocol == "udp":
            plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._closables.append(plain)
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SITE_BUFFER_BYTES)
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SITE_BUFFER_BYTES)
            plain.bind(addr)
            plain.setblocking(False)
            return plain
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._closables.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(addr)
        listener.listen(1)
        listener.settimeout(self.config.setup_timeout)
        return listener

    def _close(self) -> None:
        self._selector.close()
        for sock in self._closables:
            sock.close()

    # -- the loop ------------------------------------------------------------------------

    def _pump(self) -> float:
        cfg, clock = self.config, self._clock
        start = self._start = clock()
        end = start + cfg.duration
        streams = self._streams
        while True:
            now = clock()
            if self._stopping.is_set() and now < end:
                end = now
            sending = now < end
            if sending:
                self._send_due(now)
                self._generate_tcp(min(now, end) - start)
            elif self._drained() or now > end + cfg.drain:
                return min(now, end) - start
            self._flush_tcp()
            timeout = 0.002 if sending or self._tcp else 0.01
            if sending and streams and cfg.rate > 0:
                # Paced by the clock, not by what comes back: a site goes on sending
                # while the gateway is silent (during a handoff's cutover, say).
                timeout = min(timeout, max(start + (self._sent + 1) / cfg.rate - clock(), 0.0))
            events = self._selector.select(timeout if timeout >= _TICK_S else 0)
            if not events and 0 < timeout < _TICK_S:
                time.sleep(timeout)  # the selector counts whole milliseconds
            for key, _mask in events:
                kind, index = key.data
                if kind == "plain":
                    self._read_plain(index)
                elif kind == "site":
                    self._read_site(index)
                else:
                    self._read_tcp(self._tcp[index], kind == "tsite")
                if sending:
                    # Between two reads too: a round of many reads must not hold back
                    # what is due, or the sites would send in bursts.
                    self._send_due(clock())

    def _send_due(self, now: float) -> None:
        """Send the UDP packets due by ``now`` at the configured rate (at most BURST)."""
        if not self._streams:
            return
        due = min(int(self.config.rate * (now - self._start)) - self._sent, BURST)
        if due <= 0:
            return
        if self._last_send:
            self._max_send_gap = max(self._max_send_gap, now - self._last_send)
        self._last_send = now
        count = len(self._streams)
        for _ in range(due):
            if self._send_udp(self._turn, now):
                self._sent += 1
            self._turn = (self._turn + 1) % count

    def _drained(self) -> bool:
        if any(s.stats.received < s.sent for s in self._streams):
            return False
        return all(
            f.dead or (f.up.received >= f.up.generated and f.down.received >= f.down.generated)
            for f in self._tcp
        )

    def _send_udp(self, index: int, now: float) -> bool:
        stream = self._streams[index]
        tunnel = index >> 1
        PACKET.pack_into(self._payload, 0, index, stream.sent, int(now * 1e9))
        try:
            if stream.to_site:
                self._plain_udp[tunnel].sendto(self._payload, self.config.sites.plain_gateway)
            else:
                site = self._udp_sites[tunnel]
                assert site.session is not None
                k = site.session.seal_into(self._sealed, self._payload)
                site.sock.sendto(self._sealed[:k], site.gateway)
        except BlockingIOError:
            return False  # the same sequence number goes out next time
        stream.sent += 1
        return True

    def _read_plain(self, tunnel: int) -> None:
        sock, rbuf, clock = self._plain_udp[tunnel], self._rbuf, self._clock
        for _ in range(BURST):
            try:
                n = sock.recv_into(rbuf)
            except BlockingIOError:
                return
            if n >= PACKET.size:
                stream, seq, _ = PACKET.unpack_from(rbuf)
                if stream < len(self._streams):
                    self._streams[stream].stats.arrive(seq, clock())

    def _read_site(self, tunnel: int) -> None:
        site, rview, obuf, clock = self._udp_sites[tunnel], self._rview, self._obuf, self._clock
        session = site.session
        assert session is not None
        for _ in range(BURST):
            try:
                n = site.sock.recv_into(self._rbuf)
            except BlockingIOError:
                return
            if n < OVERHEAD:
                self._rejected += 1
                continue
            _, _, counter = HEADER.unpack_from(self._rbuf)
            m = session.open_datagram_into(rview[:n], counter, obuf)
            if m < PACKET.size:
                self._rejected += 1
                continue
            stream, seq, _ = PACKET.unpack_from(obuf)
            if stream < len(self._streams):
                self._streams[stream].stats.arrive(seq, clock())

    # -- TCP -----------------------------------------------------------------------------

    def _generate_tcp(self, elapsed: float) -> None:
        target = int(self.config.tcp_rate * elapsed)
        for flow in self._tcp:
            if flow.dead:
                continue
            for direction, sealed in ((flow.up, True), (flow.down, False)):
                while direction.generated < target and len(direction.queue) < TCP_QUEUE:
                    n = min(MAX_RECORD_PAYLOAD, target - direction.generated)
                    chunk = _expected(direction.generated, n)
                    direction.queue += flow.site.seal_record(chunk) if sealed else chunk
                    direction.generated += n

    def _flush_tcp(self) -> None:
        for flow in self._tcp:
            if flow.dead:
                continue
            for direction, sock in ((flow.up, flow.site.sock), (flow.down, flow.plain)):
                if not direction.queue:
                    continue
                try:
                    sent = sock.send(direction.queue)
                except BlockingIOError:
                    continue
                except OSError:
                    self._kill(flow)
                    break
                del direction.queue[:sent]

    def _read_tcp(self, flow: _TcpFlow, from_site: bool) -> None:
        if flow.dead:
            return
        sock = flow.site.sock if from_site else flow.plain
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            self._kill(flow)
            return
        if not data:
            self._kill(flow)
            return
        if from_site:
            try:
                data = flow.site.receive(data)
            except TunnelError:
                self._kill(flow)
                return
        direction = flow.down if from_site else flow.up
        now = self._clock()
        view = memoryview(data)
        for off in range(0, len(data), PATTERN_LEN):
            piece = view[off : off + PATTERN_LEN]
            if piece != _expected(direction.received + off, len(piece)):
                direction.exact = False
        direction.received += len(data)
        direction.gaps.tick(now)

    def _kill(self, flow: _TcpFlow) -> None:
        flow.dead = True
        self._resets += 1
        for sock in (flow.site.sock, flow.plain):
            self._selector.unregister(sock)

    # -- the report ----------------------------------------------------------------------

    def _report(self, elapsed: float) -> TrafficReport:
        udp = UdpReport.of([s.stats for s in self._streams], [s.sent for s in self._streams])
        udp.rejected = self._rejected
        udp.max_send_gap_ms = round(self._max_send_gap * 1000, 3)
        udp.rcvbuf_drops = drops.of_sockets(self._plain_udp + [s.sock for s in self._udp_sites])
        directions = [d for f in self._tcp for d in (f.up, f.down)]
        tcp = TcpReport(
            connections=len(self._tcp),
            bytes_sent=sum(d.generated for d in directions),
            bytes_received=sum(d.received for d in directions),
            byte_exact=all(d.exact and d.received == d.generated for d in directions),
            resets=self._resets,
            max_gap_ms=max((d.gaps.max_gap_ms() for d in directions), default=0.0),
        )
        return TrafficReport(duration_s=elapsed, rate_pps=self.config.rate, udp=udp, tcp=tcp)


def run_traffic(config: TrafficConfig) -> TrafficReport:
    """Play the sites of ``config`` for its duration and report what got through."""
    return TrafficRun(config).run()


# -- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tool's flags, for ``gateway-daemon traffic``."""
    parser.add_argument("--sites", type=Path, help="sites file (from --write-lab)")
    parser.add_argument("--rate", type=float, default=1000.0, help="UDP packets/s, total")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of traffic")
    parser.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    parser.add_argument(
        "--tcp-rate", type=float, default=1_000_000.0, help="bytes/s per TCP tunnel and way"
    )
    parser.add_argument("--drain", type=float, default=2.0, help="seconds to wait at the end")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--write-lab", type=Path, metavar="DIR", help="write a lab and exit")
    parser.add_argument("--udp-tunnels", type=int, default=4)
    parser.add_argument("--tcp-tunnels", type=int, default=1)
    parser.add_argument("--port-base", type=int, default=51820)


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run the tool from parsed ``args`` (as ``gateway-daemon traffic`` passes them) or
    from an argv list; return the exit code."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="traffic", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    try:
        if args.write_lab is not None:
            write_lab(args.write_lab, args.udp_tunnels, args.tcp_tunnels, args.port_base)
            print(f"wrote {args.write_lab}/tunnels.json and {args.write_lab}/sites.json")
            return EXIT_OK
        if args.sites is None:
            print("traffic: give --sites FILE (or --write-lab DIR)", file=sys.stderr)
            return EXIT_USAGE
        config = TrafficConfig(
            Sites.load(args.sites),
            rate=args.rate,
            duration=args.duration,
            size=args.size,
            tcp_rate=args.tcp_rate,
            drain=args.drain,
        )
        run = TrafficRun(config)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: run.stop())
        report = run.run()
    except TunnelConfigError as exc:
        print(f"traffic: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TunnelError, OSError) as exc:
        print(f"traffic: cannot set up the sites: {exc}", file=sys.stderr)
        return EXIT_TRAFFIC_PROBLEM
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return EXIT_OK if report.clean else EXIT_TRAFFIC_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
