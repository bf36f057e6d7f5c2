"""The gateway's data plane: every part a gateway process serves, handed off as one.

A gateway serves encrypted tunnels (``tunnels.TunnelPlane``, from ``--tunnels FILE``)
and plain TCP listeners (``listeners.Listeners``, from ``--listen``). ``DataPlane`` puts
the parts behind the one ``gateway_daemon.plane.Plane`` the handoff drives, and tells the
next version which part is which: its description names every part with its own
description and how many of the passed sockets are its, in order::

    {"format": "hitless.gateway.dataplane", "version": 1,
     "parts": [{"name": "tunnels", "sockets": 7, "description": {...}},
               {"name": "listeners", "sockets": 1, "description": {...}}]}

Snapshots and final states are the parts' own bytes, framed one after another in the
same order. The tunnels go first: they are paused last and started first, so their
cutover pause is the shortest the handoff can make it.

The gateway's VPN service is not a part. It runs as a process of its own, which an
ordinary upgrade does not touch (only a release that says it restarts the VPN service
does), so nothing of it is passed here.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Final

from gateway_daemon import health, listeners
from gateway_daemon.errors import HandoffFailed
from gateway_daemon.health import Health
from gateway_daemon.plane import Handle, Passable, Plane, PredecessorGone, ReadySignal
from gateway_daemon.tunnels import plane as tunnels
from gateway_daemon.tunnels.config import TunnelsConfig
from hitless import logs
from hitless.config import HostPort

DESCRIPTION_FORMAT: Final = "hitless.gateway.dataplane"
FORMAT_VERSION: Final = 1
TUNNELS: Final = "tunnels"
LISTENERS: Final = "listeners"
_NAME = struct.Struct(">H")
_LENGTH = struct.Struct(">I")

log = logs.get(__name__)


class DataPlane:
    """Implements ``Plane`` over named parts, each a ``Plane`` of its own."""

    def __init__(self, parts: list[tuple[str, Plane]]) -> None:
        names = [name for name, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"data plane parts must have distinct names, got {names}")
        self._parts = parts
        self._counts: dict[str, int] = {}

    @classmethod
    def serve(
        cls, listen: tuple[HostPort, ...], tunnels_config: TunnelsConfig | None, greeting: bytes
    ) -> DataPlane:
        """Bind fresh sockets for every configured part and start serving them."""
        parts: list[tuple[str, Plane]] = []
        try:
            if tunnels_config is not None:
                parts.append((TUNNELS, tunnels.TunnelPlane.from_config(tunnels_config)))
            if listen:
                plain = listeners.Listeners.bind(listen, greeting)
                parts.append((LISTENERS, plain))
                plain.start()
        except BaseException:
            for _, part in parts:
                part.close()
            raise
        return cls(parts)

    def part(self, name: str) -> Plane | None:
        return next((part for n, part in self._parts if n == name), None)

    @property
    def tunnels(self) -> tunnels.TunnelPlane | None:
        part = self.part(TUNNELS)
        return part if isinstance(part, tunnels.TunnelPlane) else None

    # Plane -----------------------------------------------------------------------------

    def sockets(self) -> list[Passable]:
        out: list[Passable] = []
        self._counts = {}
        for name, part in self._parts:
            socks = part.sockets()
            self._counts[name] = len(socks)
            out += socks
        return out

    def describe(self) -> dict[str, Any]:
        if len(self._counts) != len(self._parts):
            self.sockets()
        return {
            "format": DESCRIPTION_FORMAT,
            "version": FORMAT_VERSION,
            "parts": [
                {"name": name, "sockets": self._counts[name], "description": part.describe()}
                for name, part in self._parts
            ],
        }

    def snapshot(self) -> bytes:
        return _pack([(name, part.snapshot()) for name, part in self._parts])

    def pause(self) -> None:
        paused: list[Plane] = []
        try:
            for _, part in reversed(self._parts):
                part.pause()
                paused.append(part)
        except BaseException:
            for part in reversed(paused):
                part.resume()
            raise

    def cut_over(self, send: Callable[[bytes], None]) -> None:
        """``pause()`` and ``send(final_state())``, with the tunnels' part done on their
        loop thread the moment it parks (``TunnelPlane.cut_over``). On failure the caller
        resumes the plane once the next process is gone, as after ``pause()``."""
        pieces: dict[str, bytes] = {}
        order = [name for name, _ in self._parts]

        def send_all(last: str, data: bytes) -> None:
            pieces[last] = data
            send(_pack([(name, pieces[name]) for name in order]))

        if not self._parts:
            send(_pack([]))
            return
        *first, (last_name, last) = reversed(self._parts)
        for _, part in first:
            part.pause()
        for name, part in first:
            pieces[name] = part.final_state()
        if isinstance(last, tunnels.TunnelPlane):
            last.cut_over(lambda data: send_all(last_name, data))
        else:
            last.pause()
            send_all(last_name, last.final_state())

    def cut_over_when(self, ready: ReadySignal, send: Callable[[bytes], None]) -> None:
        """``cut_over(send)`` once READY arrives. With the tunnels alone, their loop
        thread reads the READY itself and parks from there
        (``TunnelPlane.cut_over_when``); with other parts, which pause from this
        thread, this thread waits for READY first."""
        plane = self.tunnels
        if plane is not None and len(self._parts) == 1:
            plane.cut_over_when(ready, lambda data: send(_pack([(TUNNELS, data)])))
            return
        ready.wait()
        self.cut_over(send)

    def final_state(self) -> bytes:
        return _pack([(name, part.final_state()) for name, part in self._parts])

    def resume(self) -> None:
        for _, part in self._parts:
            part.resume()

    def start(self, final_state: bytes) -> None:
        pieces = _unpack(final_state, [name for name, _ in self._parts], "final state")
        for name, part in self._parts:
            part.start(pieces[name])

    def start_from(self, receive: Callable[[], bytes], timeout: float) -> None:
        """``start(receive())``, with the tunnels' loop thread itself waiting for the
        final state and serving at once (``TunnelPlane.start_from``); the other parts
        start after it, from here.

        When ``receive`` raises PredecessorGone (the old process died after this one
        took the sockets), every part starts alone: the tunnels from their snapshot
        and counter table (``TunnelPlane.start_from``), the listeners, which carry no
        state, as they would have."""
        names = [name for name, _ in self._parts]
        pieces: dict[str, bytes] = {}

        def final() -> bytes | None:
            try:
                pieces.update(_unpack(receive(), names, "final state"))
            except PredecessorGone as exc:
                log.warning("dataplane_starting_alone", reason=str(exc))
                pieces.update({name: b"" for name in names})
                return None
            return pieces.get(TUNNELS, b"")

        plane = self.tunnels
        if plane is None:
            final()
        else:
            plane.start_from(final, timeout)
        for name, part in self._parts:
            if part is not plane:
                part.start(pieces[name])

    def close(self) -> None:
        for _, part in self._parts:
            part.close()

    def endpoints(self) -> list[str]:
        return [endpoint for _, part in self._parts for endpoint in part.endpoints()]

    def health(self) -> Health:
        """Its counters now (``gateway_daemon.health``), read from another thread than
        the one forwarding, without locking: plain attribute reads, at worst one datagram
        or handshake behind. A UDP tunnel is up once its site's handshake gave it a
        session and an endpoint to send to; TCP tunnels are not counted (each carries
        connections a site opens when it has traffic, so one with none is idle, not down)."""
        plane = self.tunnels
        if plane is None:
            return health.NONE
        udp = plane.udp
        up = frozenset(
            str(tid) for tid, t in list(udp.tunnels.items()) if t.session is not None and t.endpoint
        )
        stats = udp.stats
        return Health(up, len(udp.tunnels), stats.received, stats.dropped + stats.rejected)

    def cutover_marks(self) -> dict[str, int]:
        """The tunnels' last forward and park (time.monotonic_ns); empty without tunnels."""
        plane = self.tunnels
        return plane.cutover_marks() if plane is not None else {}


def adopt(
    description: dict[str, Any], sockets: list[Handle], snapshot: bytes, greeting: bytes
) -> DataPlane:
    """The new process's copy of the old one's data plane: loaded, not serving until
    ``start()``. Raises HandoffFailed (or a part's own error) when the pieces do not fit;
    the caller still owns ``sockets`` then."""
    if description.get("format") != DESCRIPTION_FORMAT:
        raise HandoffFailed(f"the handoff describes no {DESCRIPTION_FORMAT}: {description!r}")
    if description.get("version") != FORMAT_VERSION:
        raise HandoffFailed(
            f"data plane description version {description.get('version')!r}; this version "
            f"reads {FORMAT_VERSION}"
        )
    entries = description.get("parts")
    if not isinstance(entries, list) or sum(int(e["sockets"]) for e in entries) != len(sockets):
        raise HandoffFailed(
            f"the data plane description does not account for the {len(sockets)} sockets "
            "that arrived"
        )
    snapshots = _unpack(snapshot, [str(e["name"]) for e in entries], "snapshot")
    parts: list[tuple[str, Plane]] = []
    offset = 0
    for entry in entries:
        name, count, part_description = entry["name"], int(entry["sockets"]), entry["description"]
        own = sockets[offset : offset + count]
        offset += count
        if name == TUNNELS:
            parts.append((name, tunnels.adopt(part_description, own, snapshots[name])))
        elif name == LISTENERS:
            if not all(isinstance(sock, socket.socket) for sock in own):
                raise HandoffFailed("the listeners were passed a descriptor that is no socket")
            parts.append((name, listeners.adopt(part_description, own, greeting)))  # type: ignore[arg-type]
        else:
            raise HandoffFailed(f"this version cannot serve the data plane part {name!r}")
    return DataPlane(parts)


def _pack(pieces: list[tuple[str, bytes]]) -> bytes:
    out: list[bytes] = []
    for name, data in pieces:
        raw = name.encode()
        out += (_NAME.pack(len(raw)), raw, _LENGTH.pack(len(data)), data)
    return b"".join(out)  # one copy of each piece: the final state is on the cutover's path


def _unpack(data: bytes, names: list[str], what: str) -> dict[str, bytes]:
    """The pieces ``_pack`` framed, checked to be exactly ``names`` in that order."""
    pieces: dict[str, bytes] = {}
    view, offset = memoryview(data), 0
    try:
        for expected in names:
            (size,) = _NAME.unpack_from(view, offset)
            offset += _NAME.size
            name = bytes(view[offset : offset + size]).decode()
            offset += size
            (length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            if name != expected or offset + length > len(data):
                raise HandoffFailed(f"the data plane's {what} holds {name!r}, not {expected!r}")
            pieces[name] = bytes(view[offset : offset + length])
            offset += length
    except (struct.error, UnicodeDecodeError) as exc:
        raise HandoffFailed(f"the data plane's {what} is malformed: {exc}") from exc
    if offset != len(data):
        raise HandoffFailed(f"the data plane's {what} has {len(data) - offset} stray bytes")
    return pieces
