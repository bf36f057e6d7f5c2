"""What one process hands the next: the snapshot and the final state, encoded.

Both are JSON objects with a ``format`` name and a ``version``; byte strings are base64.
JSON keeps them readable in a debugging session and is compact enough: a UDP tunnel
costs about 500 bytes (mostly its 2048-bit replay window). Everything is validated on
load, and every error says which field is wrong (``StateError``).

- The snapshot carries the config (keys, routes) and the sessions as they are when it is
  taken, so the next process can load and check them while this one still serves.
- The final state, taken after ``pause()``, carries everything that moves while serving:
  every session in full (a site may have handshaken since the snapshot), send counters,
  replay windows, last handshake timestamps, queued datagrams, and per TCP connection its
  unparsed bytes, outgoing buffers and half-close flags.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Final

from gateway_daemon.tunnels.config import Address, TunnelsConfig, format_address, parse_address
from gateway_daemon.tunnels.errors import StateError, TunnelConfigError
from gateway_daemon.tunnels.replay import ReplayWindow
from gateway_daemon.tunnels.session import Session

STATE_VERSION: Final = 1
SNAPSHOT_FORMAT: Final = "hitless.tunnels.snapshot"
FINAL_FORMAT: Final = "hitless.tunnels.final"


@dataclass
class UdpTunnelState:
    id: int
    session: Session | None
    endpoint: Address | None
    last_timestamp: int


@dataclass
class TcpConnState:
    cid: int
    session: Session | None
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
class Snapshot:
    config: TunnelsConfig
    udp: list[UdpTunnelState]


@dataclass
class FinalState:
    udp: list[UdpTunnelState]
    udp_pending: list[tuple[bool, Address, bytes]] = field(default_factory=list)
    tcp_timestamps: dict[int, int] = field(default_factory=dict)
    tcp: list[TcpConnState] = field(default_factory=list)
    # When the old process last forwarded a datagram (time.monotonic(), machine-wide);
    # 0.0 when unknown. Only measured, never acted on.
    last_forward: float = 0.0


# -- encoding --------------------------------------------------------------------------


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


def _udp(t: UdpTunnelState) -> dict[str, Any]:
    return {
        "id": t.id,
        "session": _session(t.session),
        "endpoint": None if t.endpoint is None else format_address(t.endpoint),
        "last_timestamp": t.last_timestamp,
    }


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return json.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "version": STATE_VERSION,
            "config": snapshot.config.to_dict(),
            "udp": [_udp(t) for t in snapshot.udp],
        },
        separators=(",", ":"),
    ).encode()


def encode_final(final: FinalState) -> bytes:
    return json.dumps(
        {
            "format": FINAL_FORMAT,
            "version": STATE_VERSION,
            "udp": [_udp(t) for t in final.udp],
            "udp_pending": [
                [to_tunnel, format_address(addr), _b64(data)]
                for to_tunnel, addr, data in final.udp_pending
            ],
            "tcp_timestamps": {str(k): v for k, v in final.tcp_timestamps.items()},
            "tcp": [
                {
                    "cid": c.cid,
                    "session": _session(c.session),
                    "t_in": _b64(c.t_in),
                    "t_out": _b64(c.t_out),
                    "p_out": _b64(c.p_out),
                    "flags": [c.has_plain, c.p_connected, c.t_eof, c.p_eof, c.t_shut, c.p_shut],
                }
                for c in final.tcp
            ],
            "last_forward": final.last_forward,
        },
        separators=(",", ":"),
    ).encode()


# -- decoding --------------------------------------------------------------------------


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


def _document(data: bytes, fmt: str, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{what}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise StateError(f"{what}: not a {fmt} document")
    if raw.get("version") != STATE_VERSION:
        raise StateError(
            f"{what}: version {raw.get('version')!r}, this version reads {STATE_VERSION}; "
            "the handoff must be abandoned (roll back)"
        )
    return raw


def decode_snapshot(data: bytes) -> Snapshot:
    raw = _document(data, SNAPSHOT_FORMAT, "snapshot")
    try:
        config = TunnelsConfig.from_dict(raw.get("config"))
    except TunnelConfigError as exc:
        raise StateError(f"snapshot.config: {exc}") from None
    udp = _field(raw, "udp", list, "snapshot")
    return Snapshot(config, [_load_udp(t, f"snapshot.udp[{i}]") for i, t in enumerate(udp)])


def decode_final(data: bytes) -> FinalState:
    raw = _document(data, FINAL_FORMAT, "final state")
    where = "final state"
    udp = _field(raw, "udp", list, where)
    pending = []
    for i, item in enumerate(_field(raw, "udp_pending", list, where)):
        w = f"{where}.udp_pending[{i}]"
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], bool):
            raise StateError(f"{w}: expected [to_tunnel, address, data]")
        pending.append((item[0], _address(item[1], w), _bytes({"d": item[2]}, "d", w)))
    stamps = _field(raw, "tcp_timestamps", dict, where)
    try:
        tcp_timestamps = {int(k): int(v) for k, v in stamps.items()}
    except (TypeError, ValueError):
        raise StateError(f"{where}.tcp_timestamps: expected tunnel id → integer") from None
    conns = []
    for i, c in enumerate(_field(raw, "tcp", list, where)):
        w = f"{where}.tcp[{i}]"
        flags = _field(c, "flags", list, w)
        if len(flags) != 6 or not all(isinstance(f, bool) for f in flags):
            raise StateError(f"{w}.flags: expected six booleans")
        conns.append(
            TcpConnState(
                cid=_field(c, "cid", int, w),
                session=_load_session(c.get("session"), f"{w}.session"),
                t_in=_bytes(c, "t_in", w),
                t_out=_bytes(c, "t_out", w),
                p_out=_bytes(c, "p_out", w),
                has_plain=flags[0],
                p_connected=flags[1],
                t_eof=flags[2],
                p_eof=flags[3],
                t_shut=flags[4],
                p_shut=flags[5],
            )
        )
    last_forward = raw.get("last_forward", 0.0)  # optional: older versions do not send it
    if not isinstance(last_forward, int | float) or isinstance(last_forward, bool):
        raise StateError(f"{where}.last_forward: expected a number")
    return FinalState(
        udp=[_load_udp(t, f"{where}.udp[{i}]") for i, t in enumerate(udp)],
        udp_pending=pending,
        tcp_timestamps=tcp_timestamps,
        tcp=conns,
        last_forward=float(last_forward),
    )
