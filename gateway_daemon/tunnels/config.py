"""The tunnels config: which tunnels a gateway serves and where each one forwards.

A JSON file (``gateway-daemon --tunnels FILE``), validated when loaded::

    {
      "version": 1,
      "private_key": "<base64 of the gateway's 32-byte X25519 private key>",
      "udp_listen": "0.0.0.0:51820",     # encrypted UDP from/to the sites
      "udp_plain": "127.0.0.1:51821",    # the gateway's plain UDP socket, local side
      "tcp_listen": "0.0.0.0:51822",     # encrypted TCP tunnel connections
      "tunnels": [
        {"id": 1, "protocol": "udp", "peer_public": "<base64>",
         "forward": {"udp": "127.0.0.1:7001"}},
        {"id": 2, "protocol": "udp", "peer_public": "<base64>", "peer": "198.51.100.7:51820",
         "forward": {"tunnel": 3}},
        {"id": 5, "protocol": "tcp", "peer_public": "<base64>",
         "forward": {"tcp": "127.0.0.1:7100"}}
      ]
    }

Routing is explicit and symmetric for UDP: a tunnel forwarding to plain address X
receives what the plain socket gets from X; a tunnel forwarding to another tunnel sends
its decrypted traffic into that tunnel. A TCP tunnel accepts any number of connections
from its site; each gets its own keys and its own plain connection to the target.

``peer`` is optional: when given, handshakes from any other address are refused; the
address a site last handshook from is where the gateway sends that tunnel's traffic.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway_daemon.tunnels.errors import TunnelConfigError

CONFIG_VERSION = 1
Address = tuple[str, int]
Protocol = Literal["udp", "tcp"]


def parse_address(value: object, where: str) -> Address:
    """``"host:port"`` → ``(host, port)``, with an error naming ``where`` it was found."""
    if not isinstance(value, str) or ":" not in value:
        raise TunnelConfigError(f"{where}: expected 'host:port', got {value!r}")
    host, _, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise TunnelConfigError(f"{where}: port {port_text!r} is not a number") from None
    if not host or not 0 <= port <= 65535:
        raise TunnelConfigError(f"{where}: expected 'host:port' with port 0-65535, got {value!r}")
    return host, port


def format_address(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


def decode_key(value: object, where: str) -> bytes:
    """A base64 X25519 key → its 32 raw bytes."""
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise TunnelConfigError(f"{where}: not valid base64") from None
    if len(raw) != 32:
        raise TunnelConfigError(f"{where}: expected a 32-byte key, got {len(raw)} bytes")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Forward:
    """Where a tunnel's decrypted traffic goes: a plain UDP/TCP address or a tunnel."""

    kind: Literal["udp", "tcp", "tunnel"]
    addr: Address | None = None
    tunnel: int | None = None

    def __post_init__(self) -> None:
        if (self.kind == "tunnel") != (self.tunnel is not None) or (self.kind != "tunnel") != (
            self.addr is not None
        ):
            raise TunnelConfigError(f"forward {self.kind!r}: needs exactly its own target")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "tunnel":
            return {"tunnel": self.tunnel}
        assert self.addr is not None
        return {self.kind: format_address(self.addr)}


@dataclass(frozen=True)
class TunnelSpec:
    """One configured tunnel."""

    id: int
    protocol: Protocol
    peer_public: bytes
    forward: Forward
    peer: Address | None = None

    def __post_init__(self) -> None:
        where = f"tunnel {self.id}"
        if not 1 <= self.id < 2**32:
            raise TunnelConfigError(f"{where}: id must be in 1..2^32-1")
        if self.protocol not in ("udp", "tcp"):
            raise TunnelConfigError(f"{where}: protocol must be 'udp' or 'tcp'")
        if len(self.peer_public) != 32:
            raise TunnelConfigError(f"{where}: peer_public must be 32 bytes")
        if self.protocol == "udp" and self.forward.kind == "tcp":
            raise TunnelConfigError(f"{where}: a UDP tunnel forwards to 'udp' or 'tunnel'")
        if self.protocol == "tcp" and self.forward.kind != "tcp":
            raise TunnelConfigError(
                f"{where}: a TCP tunnel forwards to a plain 'tcp' address (tunnel-to-tunnel "
                "TCP relaying is not supported)"
            )

    def peer_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.peer_public)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "protocol": self.protocol,
            "peer_public": encode_key(self.peer_public),
            "forward": self.forward.to_dict(),
        }
        if self.peer is not None:
            out["peer"] = format_address(self.peer)
        return out


def _parse_forward(value: object, where: str) -> Forward:
    if not isinstance(value, dict) or len(value) != 1:
        raise TunnelConfigError(
            f"{where}.forward: expected one of {{'udp': addr}}, {{'tcp': addr}}, {{'tunnel': id}}"
        )
    ((kind, target),) = value.items()
    if kind == "tunnel":
        if not isinstance(target, int) or isinstance(target, bool):
            raise TunnelConfigError(f"{where}.forward.tunnel: expected a tunnel id")
        return Forward("tunnel", tunnel=target)
    if kind in ("udp", "tcp"):
        return Forward(kind, addr=parse_address(target, f"{where}.forward.{kind}"))
    raise TunnelConfigError(f"{where}.forward: unknown kind {kind!r}")


def _parse_tunnel(raw: object, index: int) -> TunnelSpec:
    where = f"tunnels[{index}]"
    if not isinstance(raw, dict):
        raise TunnelConfigError(f"{where}: expected an object")
    unknown = set(raw) - {"id", "protocol", "peer_public", "forward", "peer"}
    if unknown:
        raise TunnelConfigError(f"{where}: unknown fields {sorted(unknown)}")
    tunnel_id = raw.get("id")
    if not isinstance(tunnel_id, int) or isinstance(tunnel_id, bool):
        raise TunnelConfigError(f"{where}.id: expected an integer")
    peer = raw.get("peer")
    return TunnelSpec(
        id=tunnel_id,
        protocol=raw.get("protocol"),  # type: ignore[arg-type]  # checked on construction
        peer_public=decode_key(raw.get("peer_public"), f"{where}.peer_public"),
        forward=_parse_forward(raw.get("forward"), where),
        peer=None if peer is None else parse_address(peer, f"{where}.peer"),
    )


@dataclass(frozen=True)
class TunnelsConfig:
    """Everything the data plane needs to serve: its key, its sockets, its tunnels."""

    private_key: bytes
    udp_listen: Address
    udp_plain: Address
    tcp_listen: Address
    tunnels: tuple[TunnelSpec, ...]

    def __post_init__(self) -> None:
        if len(self.private_key) != 32:
            raise TunnelConfigError("private_key must be 32 bytes")
        by_id = {t.id: t for t in self.tunnels}
        if len(by_id) != len(self.tunnels):
            raise TunnelConfigError("tunnel ids must be unique")
        plain: set[Address] = set()
        for t in self.tunnels:
            if t.forward.kind == "tunnel":
                other = by_id.get(t.forward.tunnel or 0)
                if other is None or other.protocol != t.protocol or other.id == t.id:
                    raise TunnelConfigError(
                        f"tunnel {t.id}: forwards to tunnel {t.forward.tunnel}, which is not "
                        f"another {t.protocol} tunnel of this config"
                    )
            elif t.protocol == "udp":
                assert t.forward.addr is not None
                if t.forward.addr in plain:
                    raise TunnelConfigError(
                        f"tunnel {t.id}: plain address {format_address(t.forward.addr)} is "
                        "already another tunnel's; return traffic would be ambiguous"
                    )
                plain.add(t.forward.addr)

    def private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.private_key)

    @classmethod
    def from_dict(cls, raw: object) -> TunnelsConfig:
        if not isinstance(raw, dict):
            raise TunnelConfigError("tunnels config: expected a JSON object")
        if raw.get("version") != CONFIG_VERSION:
            raise TunnelConfigError(
                f"tunnels config: version {raw.get('version')!r} is not supported "
                f"(this gateway reads version {CONFIG_VERSION})"
            )
        tunnels = raw.get("tunnels")
        if not isinstance(tunnels, list):
            raise TunnelConfigError("tunnels config: 'tunnels' must be a list")
        return cls(
            private_key=decode_key(raw.get("private_key"), "private_key"),
            udp_listen=parse_address(raw.get("udp_listen"), "udp_listen"),
            udp_plain=parse_address(raw.get("udp_plain"), "udp_plain"),
            tcp_listen=parse_address(raw.get("tcp_listen"), "tcp_listen"),
            tunnels=tuple(_parse_tunnel(t, i) for i, t in enumerate(tunnels)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "private_key": encode_key(self.private_key),
            "udp_listen": format_address(self.udp_listen),
            "udp_plain": format_address(self.udp_plain),
            "tcp_listen": format_address(self.tcp_listen),
            "tunnels": [t.to_dict() for t in self.tunnels],
        }

    @classmethod
    def load(cls, path: str | Path) -> TunnelsConfig:
        """Read and validate a config file; errors name the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise TunnelConfigError(f"tunnels config {path}: cannot read: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise TunnelConfigError(f"tunnels config {path}: not JSON: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except TunnelConfigError as exc:
            raise TunnelConfigError(f"tunnels config {path}: {exc}") from exc
