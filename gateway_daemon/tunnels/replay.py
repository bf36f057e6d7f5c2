"""The receive-side replay window: a sliding bitmap over packet counters (RFC 6479).

The bitmap is a ring of 64-bit words, kept with the highest counter in a session's slot
of the counter table (``counters``), so the next process of a handoff finds it there.
Advancing the window clears only the words that slide in, so the cost per packet does
not grow with the window. A counter is accepted
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
# Never accept a counter this close to wrapping (WireGuard's REJECT_AFTER_MESSAGES).
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1

_PACKED: Final = struct.Struct(f"!Q?{_WORDS}Q")
# Words the window takes in a counter table slot: the top, the "empty" flag, the ring.
WINDOW_WORDS: Final = 2 + _WORDS
_TOP, _EMPTY, _RING = 0, 1, 2


def _words(count: int) -> memoryview:
    return memoryview(bytearray(count * 8)).cast("Q")


class ReplayWindow:
    """Which counters of one receive key were already accepted.

    The window lives in ``WINDOW_WORDS`` 64-bit words from ``base`` in ``words`` (a
    session's slot in the counter table), or in words of its own when none are given.
    """

    __slots__ = ("_b", "_w")

    def __init__(self, words: memoryview | None = None, base: int = 0) -> None:
        if words is None:
            words, base = _words(WINDOW_WORDS), 0
            words[_EMPTY] = 1
        self._w = words
        self._b = base

    def check(self, counter: int) -> bool:
        """Whether ``counter`` would be accepted now; changes nothing."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        w, b = self._w, self._b
        top = w[b]
        if counter > top or w[b + _EMPTY]:
            return True
        if top - counter >= WINDOW_BITS:
            return False
        return not (w[b + _RING + (counter >> 6) % _WORDS] >> (counter & 63)) & 1

    def mark(self, counter: int) -> bool:
        """Record ``counter`` as seen; False (and nothing changes) if it is a replay."""
        if not self.check(counter):
            return False
        self.accept(counter)
        return True

    def accept(self, counter: int) -> None:
        """Record ``counter`` as seen, which ``check()`` just allowed (nothing may touch
        the window in between: one thread reads each session)."""
        w, b = self._w, self._b
        ring = b + _RING
        if counter > w[b] or w[b + _EMPTY]:
            if w[b + _EMPTY]:
                current = (counter >> 6) - _WORDS
                w[b + _EMPTY] = 0
            else:
                current = w[b] >> 6
            # Clear the words the window slides over; at most the whole ring.
            steps = min((counter >> 6) - current, _WORDS)
            for i in range(1, steps + 1):
                w[ring + (current + i) % _WORDS] = 0
            w[b] = counter
        index = ring + (counter >> 6) % _WORDS
        w[index] = w[index] | (1 << (counter & 63))

    def to_bytes(self) -> bytes:
        """A compact copy of the window (tests, debugging)."""
        w, b = self._w, self._b
        return _PACKED.pack(w[b], bool(w[b + _EMPTY]), *w[b + _RING : b + WINDOW_WORDS])

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayWindow:
        """The inverse of ``to_bytes()`` (a window of its own); raises StateError on
        malformed input."""
        if len(data) != _PACKED.size:
            raise StateError(
                f"replay window: expected {_PACKED.size} bytes, got {len(data)}; "
                "the state comes from an incompatible version"
            )
        top, empty, *ring = _PACKED.unpack(data)
        window = cls()
        window._w[_TOP] = top
        window._w[_EMPTY] = int(empty)
        window._w[_RING:WINDOW_WORDS] = memoryview(struct.pack(f"={_WORDS}Q", *ring)).cast("Q")
        return window
