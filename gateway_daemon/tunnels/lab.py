"""A lab: a gateway's tunnels config and the matching remote sites, made together.

The traffic tool plays the remote sites, so it needs what the gateway must never hold:
the sites' private keys. ``Sites`` is that other half (a JSON file of its own), and
``make_lab`` generates both halves with fresh keys for N UDP and M TCP tunnels on
loopback. Each tunnel forwards to a plain local address that the tool also plays, so a
packet goes site → gateway (decrypt) → plain service and back the other way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway_daemon.tunnels.config import (
    Address,
    Forward,
    Protocol,
    TunnelsConfig,
    TunnelSpec,
    decode_key,
    encode_key,
    format_address,
    parse_address,
)
from gateway_daemon.tunnels.errors import TunnelConfigError
from gateway_daemon.tunnels.handshake import public_bytes

SITES_VERSION = 1
LOOPBACK = ("127.0.0.1", 0)


def require_loopback(addr: Address, where: str) -> None:
    """The traffic tool floods what it is pointed at: loopback only."""
    try:
        loopback = ipaddress.ip_address(addr[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TunnelConfigError(f"{where}: {format_address(addr)} is not a loopback address")


@dataclass(frozen=True)
class SiteSpec:
    """One remote site's end of one tunnel, and the plain service it reaches."""

    tunnel: int
    protocol: Protocol
    private_key: bytes
    plain: Address

    def __post_init__(self) -> None:
        if self.protocol not in ("udp", "tcp"):
            raise TunnelConfigError(f"site {self.tunnel}: protocol must be 'udp' or 'tcp'")
        if len(self.private_key) != 32:
            raise TunnelConfigError(f"site {self.tunnel}: private_key must be 32 bytes")
        require_loopback(self.plain, f"site {self.tunnel}.plain")


@dataclass(frozen=True)
class Sites:
    """Everything the traffic tool needs to play the sites of one gateway."""

    gateway_public: bytes
    udp_gateway: Address
    plain_gateway: Address
    tcp_gateway: Address
    sites: tuple[SiteSpec, ...]

    def __post_init__(self) -> None:
        if len(self.gateway_public) != 32:
            raise TunnelConfigError("sites: gateway_public must be 32 bytes")
        for name in ("udp_gateway", "plain_gateway", "tcp_gateway"):
            require_loopback(getattr(self, name), f"sites.{name}")

    def at(self, udp: Address, plain: Address, tcp: Address) -> Sites:
        """The same sites pointed at a gateway bound elsewhere (e.g. on port 0)."""
        return dataclasses.replace(self, udp_gateway=udp, plain_gateway=plain, tcp_gateway=tcp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SITES_VERSION,
            "gateway_public": encode_key(self.gateway_public),
            "udp_gateway": format_address(self.udp_gateway),
            "plain_gateway": format_address(self.plain_gateway),
            "tcp_gateway": format_address(self.tcp_gateway),
            "sites": [
                {
                    "tunnel": s.tunnel,
                    "protocol": s.protocol,
                    "private_key": encode_key(s.private_key),
                    "plain": format_address(s.plain),
                }
                for s in self.sites
            ],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Sites:
        if not isinstance(raw, dict) or raw.get("version") != SITES_VERSION:
            raise TunnelConfigError(f"sites: expected an object with version {SITES_VERSION}")
        sites = raw.get("sites")
        if not isinstance(sites, list):
            raise TunnelConfigError("sites: 'sites' must be a list")
        specs = []
        for i, s in enumerate(sites):
            where = f"sites[{i}]"
            if not isinstance(s, dict) or not isinstance(s.get("tunnel"), int):
                raise TunnelConfigError(f"{where}: expected an object with an integer 'tunnel'")
            specs.append(
                SiteSpec(
                    tunnel=s["tunnel"],
                    protocol=s.get("protocol"),  # type: ignore[arg-type]  # checked on construction
                    private_key=decode_key(s.get("private_key"), f"{where}.private_key"),
                    plain=parse_address(s.get("plain"), f"{where}.plain"),
                )
            )
        return cls(
            gateway_public=decode_key(raw.get("gateway_public"), "sites.gateway_public"),
            udp_gateway=parse_address(raw.get("udp_gateway"), "sites.udp_gateway"),
            plain_gateway=parse_address(raw.get("plain_gateway"), "sites.plain_gateway"),
            tcp_gateway=parse_address(raw.get("tcp_gateway"), "sites.tcp_gateway"),
            sites=tuple(specs),
        )

    @classmethod
    def load(cls, path: str | Path) -> Sites:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise TunnelConfigError(f"sites file {path}: {exc}") from exc


def free_port(kind: socket.SocketKind) -> int:
    """A loopback port that was free a moment ago (the lab's best effort)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(LOOPBACK)
        return int(sock.getsockname()[1])


def make_lab(
    udp_tunnels: int,
    tcp_tunnels: int,
    *,
    udp_listen: Address = LOOPBACK,
    udp_plain: Address = LOOPBACK,
    tcp_listen: Address = LOOPBACK,
) -> tuple[TunnelsConfig, Sites]:
    """A gateway config and its sites, with fresh keys and free loopback plain ports.
    Gateway addresses on port 0 are meant for ``TunnelPlane.from_config`` followed by
    ``Sites.at(...)`` with the addresses the plane bound."""
    gateway = X25519PrivateKey.generate()
    specs, sites = [], []
    for i in range(udp_tunnels + tcp_tunnels):
        protocol: Protocol = "udp" if i < udp_tunnels else "tcp"
        site_key = X25519PrivateKey.generate()
        plain = (
            "127.0.0.1",
            free_port(socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM),
        )
        specs.append(
            TunnelSpec(i + 1, protocol, public_bytes(site_key), Forward(protocol, addr=plain))
        )
        sites.append(SiteSpec(i + 1, protocol, site_key.private_bytes_raw(), plain))
    config = TunnelsConfig(
        gateway.private_bytes_raw(), udp_listen, udp_plain, tcp_listen, tuple(specs)
    )
    return config, Sites(public_bytes(gateway), udp_listen, udp_plain, tcp_listen, tuple(sites))


def write_lab(directory: Path, udp_tunnels: int, tcp_tunnels: int, port_base: int) -> None:
    """Write ``tunnels.json`` (for the gateway) and ``sites.json`` (for the traffic tool),
    the gateway on loopback ports ``port_base`` to ``port_base + 2``."""
    config, sites = make_lab(
        udp_tunnels,
        tcp_tunnels,
        udp_listen=("127.0.0.1", port_base),
        udp_plain=("127.0.0.1", port_base + 1),
        tcp_listen=("127.0.0.1", port_base + 2),
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tunnels.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (directory / "sites.json").write_text(json.dumps(sites.to_dict(), indent=2) + "\n")
