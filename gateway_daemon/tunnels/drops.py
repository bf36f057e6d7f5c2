"""Per-socket receive-buffer drops, from the kernel's UDP socket table.

``Udp RcvbufErrors`` (/proc/net/snmp) counts the drops of every UDP socket on the
machine: the gateway's shared sockets, the traffic tool's sockets and anything else
running. The last column of ``/proc/net/udp`` is the same count for one socket, so a
measurement can say whose buffer overflowed: the gateway's (it fell behind) or the
traffic tool's (the measuring instrument did).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

UDP_TABLE = Path("/proc/net/udp")


def _rows(table: Path) -> Iterable[tuple[int, int, int]]:
    """(local port, inode, drops) of every socket in ``table``."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 13:
            continue
        yield int(fields[1].rsplit(":", 1)[1], 16), int(fields[9]), int(fields[-1])


def of_sockets(socks: Iterable[socket.socket], table: Path = UDP_TABLE) -> int:
    """Receive-buffer drops so far of these (open, IPv4 UDP) sockets."""
    inodes = {os.fstat(sock.fileno()).st_ino for sock in socks if sock.fileno() >= 0}
    return sum(drops for _, inode, drops in _rows(table) if inode in inodes)


def on_ports(ports: Iterable[int], table: Path = UDP_TABLE) -> int:
    """Receive-buffer drops so far of the IPv4 UDP sockets bound to ``ports``."""
    wanted = set(ports)
    return sum(drops for port, _, drops in _rows(table) if port in wanted)
