"""The receive-side replay window: a sliding bitmap over packet counters (RFC 6479).

The bitmap is a ring of 64-bit words. Advancing the window clears only the words that
slide in, so the cost per packet does not grow with the window. A counter is accepted
once: when it is newer than everything seen, or inside the window and not yet seen.
Counters older than the window are rejected, since the window no longer remembers them.

Checking and marking are separate, as in WireGuard: ``check()`` before the (costly)
decryption to drop obvious replays cheaply, ``mark()`` only after the packet
authenticated, so a forged packet cannot move the window.
"""

from __future__ import annotations

import struct
from typing import Final

from gateway_daemon.tunnels.errors import StateError

WINDOW_BITS: Final = 2048
_WORD_BITS: Final = 64
# One word more than the window needs: the word holding the newest counter is partly
# "in the future", so a full window of history needs the spare word (RFC 6479, 2.2).
_WORDS: Final = WINDOW_BITS // _WORD_BITS + 1
_MASK: Final = (1 << 64) - 1
# Never accept a counter this close to wrapping (WireGuard's REJECT_AFTER_MESSAGES).
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1

_PACKED: Final = struct.Struct(f"!Q?{_WORDS}Q")
# The size of ``ReplayWindow.to_bytes()``.
WINDOW_BYTES: Final = _PACKED.size


class ReplayWindow:
    """Which counters of one receive key were already accepted."""

    __slots__ = ("_empty", "_ring", "_top")

    def __init__(self) -> None:
        self._top = 0
        self._empty = True
        self._ring = [0] * _WORDS

    @property
    def top(self) -> int:
        """The highest counter accepted so far (0 when none was)."""
        return self._top

    def check(self, counter: int) -> bool:
        """Whether ``counter`` would be accepted now; changes nothing."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        top = self._top
        if counter > top or self._empty:
            return True
        if top - counter >= WINDOW_BITS:
            return False
        word = self._ring[(counter >> 6) % _WORDS]
        return not (word >> (counter & 63)) & 1

    def mark(self, counter: int) -> bool:
        """Record ``counter`` as seen; False (and nothing changes) if it is a replay."""
        if not self.check(counter):
            return False
        ring = self._ring
        if counter > self._top or self._empty:
            if self._empty:
                current = (counter >> 6) - _WORDS
                self._empty = False
            else:
                current = self._top >> 6
            # Clear the words the window slides over; at most the whole ring.
            steps = min((counter >> 6) - current, _WORDS)
            for i in range(1, steps + 1):
                ring[(current + i) % _WORDS] = 0
            self._top = counter
        index = (counter >> 6) % _WORDS
        ring[index] = (ring[index] | (1 << (counter & 63))) & _MASK
        return True

    def to_bytes(self) -> bytes:
        """A compact copy of the window, for handing it to the next process."""
        return _PACKED.pack(self._top, self._empty, *self._ring)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayWindow:
        """The inverse of ``to_bytes()``; raises StateError on malformed input."""
        if len(data) != _PACKED.size:
            raise StateError(
                f"replay window: expected {_PACKED.size} bytes, got {len(data)}; "
                "the state comes from an incompatible version"
            )
        top, empty, *ring = _PACKED.unpack(data)
        window = cls()
        window._top = top
        window._empty = empty
        window._ring = list(ring)
        return window
