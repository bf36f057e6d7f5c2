"""What one process hands the next: the snapshot and the final state, encoded.

Two documents with different jobs, so two encodings:

- The snapshot, sent while the old process still serves, carries the config (keys,
  routes) and every session as it is then (UDP tunnels and established TCP tunnel
  connections), so the next process builds everything before it says ready: sessions
  with their ciphers, routes, connections. It is JSON (byte strings in base64), readable
  in a debugging session, validated field by field (``StateError`` names the field);
  its cost is paid off the hot path.
- The final state, taken after ``pause()``, is on the hot path: nothing is forwarded
  from the moment the old process parks until the new one has applied it. It carries
  only what moves while serving, in a compact binary form: per session its send counter,
  next expected TCP counter and replay window, and its keys only when the session is new
  since the snapshot (a site handshook in between); per UDP tunnel its endpoint and last
  handshake timestamp; queued datagrams; per TCP connection its unparsed bytes, outgoing
  buffers and half-close flags. About 330 bytes per UDP tunnel, mostly the window.

Final state layout (big-endian)::

    magic "HTFS", u16 version, f64 last_forward
    u32 n, n x UDP tunnel:  u32 id, u8 flags, u64 last_timestamp, [address], [session]
    u32 n, n x datagram:    u8 to_tunnel, address, u32 length, bytes
    u32 n, n x TCP tunnel:  u32 id, u64 last_timestamp
    u32 n, n x connection:  u64 cid, u8 flags, [session], 3 x (u32 length, bytes)
    address:  u8 length, host (ASCII), u16 port
    session:  u8 0 (none) | 1 (the snapshot's) | 2 (new: u32 tunnel id, 32-byte send key,
              32-byte receive key), then unless 0: u64 send counter, u64 next receive
              counter, the replay window (``ReplayWindow.to_bytes``)
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from gateway_daemon.tunnels.config import Address, TunnelsConfig, format_address, parse_address
from gateway_daemon.tunnels.errors import StateError, TunnelConfigError
from gateway_daemon.tunnels.replay import WINDOW_BYTES, ReplayWindow
from gateway_daemon.tunnels.session import KEY_LEN, Session

STATE_VERSION: Final = 2
SNAPSHOT_FORMAT: Final = "hitless.tunnels.snapshot"
FINAL_MAGIC: Final = b"HTFS"

_HEAD = struct.Struct(">4sHd")
_COUNT = struct.Struct(">I")
_UDP = struct.Struct(">IBQ")
_PORT = struct.Struct(">H")
_LENGTH = struct.Struct(">I")
_TCP_STAMP = struct.Struct(">IQ")
_CONN = struct.Struct(">QB")
_KEYS = struct.Struct(f">I{KEY_LEN}s{KEY_LEN}s")
_COUNTERS = struct.Struct(f">QQ{WINDOW_BYTES}s")

_HAS_ENDPOINT: Final = 1
_NO_SESSION, _SNAPSHOT_SESSION, _NEW_SESSION = 0, 1, 2
_TCP_FLAGS: Final = ("has_plain", "p_connected", "t_eof", "p_eof", "t_shut", "p_shut")


@dataclass
class UdpTunnelState:
    """A UDP tunnel in the snapshot."""

    id: int
    session: Session | None
    endpoint: Address | None
    last_timestamp: int


@dataclass
class Snapshot:
    config: TunnelsConfig
    udp: list[UdpTunnelState]
    tcp_sessions: dict[int, Session] = field(default_factory=dict)  # by connection id


@dataclass
class Counters:
    """What moves in a session while it serves."""

    send_counter: int
    recv_next: int
    window: bytes  # ReplayWindow.to_bytes()

    @classmethod
    def of(cls, session: Session) -> Counters:
        return cls(session.send_counter, session.recv_next, session.window.to_bytes())

    def apply(self, session: Session) -> None:
        session.send_counter = self.send_counter
        session.recv_next = self.recv_next
        session.window = ReplayWindow.from_bytes(self.window)


@dataclass
class SessionFinal:
    """A session in the final state: its counters, and ``new`` (the whole session) when
    it is not the one the snapshot carried; None then means "the snapshot's"."""

    counters: Counters
    new: Session | None = None

    @classmethod
    def of(cls, session: Session, in_snapshot: Session | None) -> SessionFinal:
        return cls(Counters.of(session), None if session is in_snapshot else session)

    def resolve(self, from_snapshot: Session | None, where: str) -> Session:
        """The session to serve with: the new one, or the snapshot's, with the counters."""
        session = self.new if self.new is not None else from_snapshot
        if session is None:
            raise StateError(f"final state: {where} has counters for a session it never had")
        self.counters.apply(session)
        return session


@dataclass
class UdpFinal:
    id: int
    session: SessionFinal | None
    endpoint: Address | None
    last_timestamp: int


@dataclass
class TcpConnFinal:
    cid: int
    session: SessionFinal | None
    t_in: bytes
    t_out: bytes
    p_out: bytes
    has_plain: bool
    p_connected: bool
    t_eof: bool
    p_eof: bool
    t_shut: bool
    p_shut: bool


@dataclass
class FinalState:
    udp: list[UdpFinal]
    udp_pending: list[tuple[bool, Address, bytes]] = field(default_factory=list)
    tcp_timestamps: dict[int, int] = field(default_factory=dict)
    tcp: list[TcpConnFinal] = field(default_factory=list)
    # When the old process last forwarded a datagram (time.monotonic(), machine-wide);
    # 0.0 when unknown. Only measured, never acted on.
    last_forward: float = 0.0


# -- snapshot (JSON) -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _session(s: Session | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "tunnel": s.tunnel_id,
        "send_key": _b64(s.send_key),
        "recv_key": _b64(s.recv_key),
        "send_counter": s.send_counter,
        "window": _b64(s.window.to_bytes()),
        "recv_next": s.recv_next,
    }


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return json.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "version": STATE_VERSION,
            "config": snapshot.config.to_dict(),
            "udp": [
                {
                    "id": t.id,
                    "session": _session(t.session),
                    "endpoint": None if t.endpoint is None else format_address(t.endpoint),
                    "last_timestamp": t.last_timestamp,
                }
                for t in snapshot.udp
            ],
            "tcp": [
                {"cid": cid, "session": _session(s)} for cid, s in snapshot.tcp_sessions.items()
            ],
        },
        separators=(",", ":"),
    ).encode()


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise StateError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise StateError(f"{where}.{key}: expected {kind}, got {type(value).__name__}")
    return value


def _bytes(obj: Any, key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_field(obj, key, str, where), validate=True)
    except (binascii.Error, ValueError):
        raise StateError(f"{where}.{key}: not valid base64") from None


def _address(value: Any, where: str) -> Address:
    try:
        return parse_address(value, where)
    except TunnelConfigError as exc:
        raise StateError(str(exc)) from None


def _load_session(raw: Any, where: str) -> Session | None:
    if raw is None:
        return None
    try:
        return Session(
            _field(raw, "tunnel", int, where),
            send_key=_bytes(raw, "send_key", where),
            recv_key=_bytes(raw, "recv_key", where),
            send_counter=_field(raw, "send_counter", int, where),
            window=ReplayWindow.from_bytes(_bytes(raw, "window", where)),
            recv_next=_field(raw, "recv_next", int, where),
        )
    except ValueError as exc:
        raise StateError(f"{where}: {exc}") from None


def _load_udp(raw: Any, where: str) -> UdpTunnelState:
    endpoint = raw.get("endpoint") if isinstance(raw, dict) else None
    return UdpTunnelState(
        id=_field(raw, "id", int, where),
        session=_load_session(raw.get("session"), f"{where}.session"),
        endpoint=None if endpoint is None else _address(endpoint, f"{where}.endpoint"),
        last_timestamp=_field(raw, "last_timestamp", int, where),
    )


def decode_snapshot(data: bytes) -> Snapshot:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"snapshot: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != SNAPSHOT_FORMAT:
        raise StateError(f"snapshot: not a {SNAPSHOT_FORMAT} document")
    if raw.get("version") != STATE_VERSION:
        raise StateError(
            f"snapshot: version {raw.get('version')!r}, this version reads {STATE_VERSION}; "
            "the handoff must be abandoned (roll back)"
        )
    try:
        config = TunnelsConfig.from_dict(raw.get("config"))
    except TunnelConfigError as exc:
        raise StateError(f"snapshot.config: {exc}") from None
    udp = _field(raw, "udp", list, "snapshot")
    tcp: dict[int, Session] = {}
    for i, item in enumerate(_field(raw, "tcp", list, "snapshot")):
        where = f"snapshot.tcp[{i}]"
        session = _load_session(_field(item, "session", dict, where), f"{where}.session")
        assert session is not None
        tcp[_field(item, "cid", int, where)] = session
    return Snapshot(config, [_load_udp(t, f"snapshot.udp[{i}]") for i, t in enumerate(udp)], tcp)


# -- final state (binary) --------------------------------------------------------------


def _put_address(out: bytearray, addr: Address) -> None:
    host = addr[0].encode("ascii")
    out += bytes((len(host),)) + host + _PORT.pack(addr[1])


def _put_session(out: bytearray, s: SessionFinal | None) -> None:
    if s is None:
        out.append(_NO_SESSION)
        return
    if s.new is None:
        out.append(_SNAPSHOT_SESSION)
    else:
        out.append(_NEW_SESSION)
        out += _KEYS.pack(s.new.tunnel_id, s.new.send_key, s.new.recv_key)
    c = s.counters
    out += _COUNTERS.pack(c.send_counter, c.recv_next, c.window)


def _put_bytes(out: bytearray, data: bytes) -> None:
    out += _LENGTH.pack(len(data))
    out += data


def encode_final(final: FinalState) -> bytes:
    out = bytearray(_HEAD.pack(FINAL_MAGIC, STATE_VERSION, final.last_forward))
    out += _COUNT.pack(len(final.udp))
    for t in final.udp:
        flags = _HAS_ENDPOINT if t.endpoint is not None else 0
        out += _UDP.pack(t.id, flags, t.last_timestamp)
        if t.endpoint is not None:
            _put_address(out, t.endpoint)
        _put_session(out, t.session)
    out += _COUNT.pack(len(final.udp_pending))
    for to_tunnel, addr, data in final.udp_pending:
        out.append(1 if to_tunnel else 0)
        _put_address(out, addr)
        _put_bytes(out, data)
    out += _COUNT.pack(len(final.tcp_timestamps))
    for tid, stamp in final.tcp_timestamps.items():
        out += _TCP_STAMP.pack(tid, stamp)
    out += _COUNT.pack(len(final.tcp))
    for c in final.tcp:
        flags = sum(1 << i for i, name in enumerate(_TCP_FLAGS) if getattr(c, name))
        out += _CONN.pack(c.cid, flags)
        _put_session(out, c.session)
        for data in (c.t_in, c.t_out, c.p_out):
            _put_bytes(out, data)
    return bytes(out)


class _Reader:
    """A cursor over the final state; every short read is a StateError with the offset."""

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.offset = 0

    def take(self, s: struct.Struct) -> tuple[Any, ...]:
        try:
            values = s.unpack_from(self.view, self.offset)
        except struct.error:
            raise StateError(f"final state: truncated at byte {self.offset}") from None
        self.offset += s.size
        return values

    def raw(self, length: int) -> bytes:
        end = self.offset + length
        if end > len(self.view):
            raise StateError(f"final state: truncated at byte {self.offset}")
        data = bytes(self.view[self.offset : end])
        self.offset = end
        return data

    def byte(self) -> int:
        return self.raw(1)[0]

    def address(self) -> Address:
        host = self.raw(self.byte())
        (port,) = self.take(_PORT)
        try:
            return host.decode("ascii"), port
        except UnicodeDecodeError:
            raise StateError(f"final state: bad address at byte {self.offset}") from None

    def blob(self) -> bytes:
        (length,) = self.take(_LENGTH)
        return self.raw(length)

    def session(self, where: str) -> SessionFinal | None:
        kind = self.byte()
        if kind == _NO_SESSION:
            return None
        new = None
        if kind == _NEW_SESSION:
            tunnel_id, send_key, recv_key = self.take(_KEYS)
            new = Session(tunnel_id, send_key, recv_key)
        elif kind != _SNAPSHOT_SESSION:
            raise StateError(f"final state: {where}: unknown session kind {kind}")
        return SessionFinal(Counters(*self.take(_COUNTERS)), new)


def decode_final(data: bytes) -> FinalState:
    r = _Reader(data)
    magic, version, last_forward = r.take(_HEAD)
    if magic != FINAL_MAGIC:
        raise StateError("final state: not a hitless tunnels final state")
    if version != STATE_VERSION:
        raise StateError(
            f"final state: version {version}, this version reads {STATE_VERSION}; "
            "the handoff must be abandoned (roll back)"
        )
    udp = []
    for _ in range(r.take(_COUNT)[0]):
        tid, flags, stamp = r.take(_UDP)
        endpoint = r.address() if flags & _HAS_ENDPOINT else None
        udp.append(UdpFinal(tid, r.session(f"UDP tunnel {tid}"), endpoint, stamp))
    pending = []
    for _ in range(r.take(_COUNT)[0]):
        to_tunnel = r.byte() != 0
        pending.append((to_tunnel, r.address(), r.blob()))
    stamps = dict(r.take(_TCP_STAMP) for _ in range(r.take(_COUNT)[0]))
    conns = []
    for _ in range(r.take(_COUNT)[0]):
        cid, flags = r.take(_CONN)
        session = r.session(f"TCP connection {cid}")
        t_in, t_out, p_out = r.blob(), r.blob(), r.blob()
        bits = [bool(flags & (1 << i)) for i in range(len(_TCP_FLAGS))]
        conns.append(TcpConnFinal(cid, session, t_in, t_out, p_out, *bits))
    if r.offset != len(data):
        raise StateError(f"final state: {len(data) - r.offset} stray bytes at the end")
    return FinalState(udp, pending, stamps, conns, last_forward)
