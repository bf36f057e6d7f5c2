"""What one process hands the next: the snapshot and the final state, encoded.

Two documents with different jobs, so two encodings:

- The snapshot, sent while the old process still serves, carries the config (keys,
  routes), the size of the counter table and every session as it is then (UDP tunnels
  and established TCP tunnel connections: keys and counter-table slot), so the next
  process builds everything before it says ready: sessions with their ciphers, routes,
  connections. It is JSON (byte strings in base64), readable in a debugging session,
  validated field by field (``StateError`` names the field); its cost is paid off the
  hot path.
- The final state, taken after ``pause()``, is on the hot path: nothing is forwarded
  from the moment the old process parks until the new one has applied it. Counters and
  replay windows are not in it: they are in the counter table both processes map
  (``counters``). It carries only what changed since the snapshot, in a compact binary
  form: the UDP tunnels whose session, endpoint or last handshake changed (a site
  handshook in between: the new session's keys and slot); queued datagrams; per TCP
  tunnel its last handshake; per TCP connection its unparsed bytes, outgoing buffers
  and half-close flags. With no handshake in between it is a few hundred bytes
  whatever the number of tunnels.

Final state layout (big-endian)::

    magic "HTFS", u16 version, f64 last_forward
    u32 n, n x UDP tunnel:  u32 id, u8 flags, u64 last_timestamp, [address], session
    u32 n, n x datagram:    u8 to_tunnel, address, u32 length, bytes
    u32 n, n x TCP tunnel:  u32 id, u64 last_timestamp
    u32 n, n x connection:  u64 cid, u8 flags, session, 3 x (u32 length, bytes)
    address:  u8 length, host (ASCII), u16 port
    session:  u8 0 (none) | 1 (the snapshot's) | 2 (new: u32 tunnel id, u32 slot,
              32-byte send key, 32-byte receive key)
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from gateway_daemon.tunnels.config import Address, TunnelsConfig, format_address, parse_address
from gateway_daemon.tunnels.counters import CounterTable
from gateway_daemon.tunnels.errors import StateError, TunnelConfigError
from gateway_daemon.tunnels.session import KEY_LEN, Session

STATE_VERSION: Final = 3
SNAPSHOT_FORMAT: Final = "hitless.tunnels.snapshot"
FINAL_MAGIC: Final = b"HTFS"

_HEAD = struct.Struct(">4sHd")
_COUNT = struct.Struct(">I")
_UDP = struct.Struct(">IBQ")
_PORT = struct.Struct(">H")
_LENGTH = struct.Struct(">I")
_TCP_STAMP = struct.Struct(">IQ")
_CONN = struct.Struct(">QB")
_KEYS = struct.Struct(f">II{KEY_LEN}s{KEY_LEN}s")

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
    slots: int = 0  # the counter table's size


@dataclass(frozen=True)
class NewSession:
    """A session the snapshot did not carry: its keys, and its slot in the table."""

    tunnel_id: int
    slot: int
    send_key: bytes
    recv_key: bytes

    @classmethod
    def of(cls, session: Session) -> NewSession:
        return cls(session.tunnel_id, session.slot, session.send_key, session.recv_key)


class _Snapshots:
    """The final state's "the session the snapshot carried"."""

    def __repr__(self) -> str:
        return "SNAPSHOT_SESSION"


SNAPSHOT_SESSION: Final = _Snapshots()
# A session in the final state: none, the snapshot's, or a new one.
SessionRef = NewSession | _Snapshots | None


def session_ref(session: Session | None, in_snapshot: Session | None) -> SessionRef:
    if session is None:
        return None
    return SNAPSHOT_SESSION if session is in_snapshot else NewSession.of(session)


def resolve(
    ref: SessionRef, from_snapshot: Session | None, table: CounterTable, where: str
) -> Session | None:
    """The session to serve with: the snapshot's, or the new one in its slot."""
    if ref is None:
        return None
    if isinstance(ref, NewSession):
        try:
            return Session(
                ref.tunnel_id, ref.send_key, ref.recv_key, table=table, slot=ref.slot
            )
        except ValueError as exc:
            raise StateError(f"final state: {where}: {exc}") from None
    if from_snapshot is None:
        raise StateError(f"final state: {where} has counters for a session it never had")
    return from_snapshot


@dataclass
class UdpFinal:
    id: int
    session: SessionRef
    endpoint: Address | None
    last_timestamp: int


@dataclass
class TcpConnFinal:
    cid: int
    session: SessionRef
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
    udp: list[UdpFinal]  # the UDP tunnels that changed since the snapshot
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
        "slot": s.slot,
    }


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return json.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "version": STATE_VERSION,
            "config": snapshot.config.to_dict(),
            "slots": snapshot.slots,
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


def _load_session(raw: Any, where: str, table: CounterTable) -> Session | None:
    """The session whose counters are in its slot of ``table`` (nothing is written)."""
    if raw is None:
        return None
    try:
        return Session(
            _field(raw, "tunnel", int, where),
            send_key=_bytes(raw, "send_key", where),
            recv_key=_bytes(raw, "recv_key", where),
            table=table,
            slot=_field(raw, "slot", int, where),
        )
    except ValueError as exc:
        raise StateError(f"{where}: {exc}") from None


def _load_udp(raw: Any, where: str, table: CounterTable) -> UdpTunnelState:
    endpoint = raw.get("endpoint") if isinstance(raw, dict) else None
    return UdpTunnelState(
        id=_field(raw, "id", int, where),
        session=_load_session(raw.get("session"), f"{where}.session", table),
        endpoint=None if endpoint is None else _address(endpoint, f"{where}.endpoint"),
        last_timestamp=_field(raw, "last_timestamp", int, where),
    )


def decode_snapshot(data: bytes, table: CounterTable) -> Snapshot:
    """The snapshot, with its sessions bound to their slots of ``table`` (the counter
    table the old process passed)."""
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
    slots = _field(raw, "slots", int, "snapshot")
    if slots != table.slots:
        raise StateError(
            f"snapshot: a counter table of {slots} slots, but the one passed has {table.slots}"
        )
    udp = _field(raw, "udp", list, "snapshot")
    tcp: dict[int, Session] = {}
    for i, item in enumerate(_field(raw, "tcp", list, "snapshot")):
        where = f"snapshot.tcp[{i}]"
        raw_session = _field(item, "session", dict, where)
        session = _load_session(raw_session, f"{where}.session", table)
        assert session is not None
        tcp[_field(item, "cid", int, where)] = session
    loaded = [_load_udp(t, f"snapshot.udp[{i}]", table) for i, t in enumerate(udp)]
    return Snapshot(config, loaded, tcp, slots)


# -- final state (binary) --------------------------------------------------------------


def _put_address(out: bytearray, addr: Address) -> None:
    host = addr[0].encode("ascii")
    out += bytes((len(host),)) + host + _PORT.pack(addr[1])


def _put_session(out: bytearray, s: SessionRef) -> None:
    if s is None:
        out.append(_NO_SESSION)
    elif isinstance(s, NewSession):
        out.append(_NEW_SESSION)
        out += _KEYS.pack(s.tunnel_id, s.slot, s.send_key, s.recv_key)
    else:
        out.append(_SNAPSHOT_SESSION)


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

    def session(self, where: str) -> SessionRef:
        kind = self.byte()
        if kind == _NO_SESSION:
            return None
        if kind == _SNAPSHOT_SESSION:
            return SNAPSHOT_SESSION
        if kind == _NEW_SESSION:
            return NewSession(*self.take(_KEYS))
        raise StateError(f"final state: {where}: unknown session kind {kind}")


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
