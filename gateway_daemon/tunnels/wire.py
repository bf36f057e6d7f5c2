"""The wire format of tunnel packets, shared by UDP datagrams and TCP records.

Every message starts with a 16-byte header, authenticated as AEAD associated data::

    0      1          4                8                        16
    +------+----------+----------------+------------------------+
    | type | reserved | tunnel id (BE) |   counter (BE, 64 bit) |
    +------+----------+----------------+------------------------+

- ``TYPE_DATA``: header + ChaCha20-Poly1305(payload), nonce = 4 zero bytes + counter.
  The tunnel id plays the part of WireGuard's receiver index; it is the configured id of
  the tunnel, the same in both directions.
- ``TYPE_INIT`` / ``TYPE_RESPONSE``: the handshake (``handshake.py``); the counter field
  carries the initiator's timestamp in an initiation and is zero in a response.

On TCP each message travels as a record: a 4-byte big-endian length, then the message.
"""

from __future__ import annotations

import struct
from typing import Final

TYPE_INIT: Final = 1
TYPE_RESPONSE: Final = 2
TYPE_DATA: Final = 4

HEADER: Final = struct.Struct("!B3xIQ")
HEADER_LEN: Final = HEADER.size
TAG_LEN: Final = 16
OVERHEAD: Final = HEADER_LEN + TAG_LEN

# The AEAD nonce: 32 zero bits, then the 64-bit counter, big-endian (as in WireGuard,
# which puts the counter little-endian; ESP-style big-endian keeps it equal to the header).
NONCE: Final = struct.Struct("!4xQ")

RECORD_LEN: Final = struct.Struct("!I")
# The largest plaintext one TCP record carries; reads from a plain socket are cut to it.
MAX_RECORD_PAYLOAD: Final = 16384
MAX_RECORD: Final = OVERHEAD + MAX_RECORD_PAYLOAD

# The largest UDP payload that fits an IPv4 datagram once sealed.
MAX_DATAGRAM: Final = 65507
MAX_UDP_PAYLOAD: Final = MAX_DATAGRAM - OVERHEAD
