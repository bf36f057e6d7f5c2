"""The counter table: every session's counters and replay window, in memory that the
next process of the gateway maps too.

What moves while a tunnel serves is a handful of numbers per session: the next send
counter, the next expected TCP record counter and the receive replay window. They live
here, one fixed-size slot per session, and not in Python objects. The table is a memfd,
passed to the next process with the sockets (SCM_RIGHTS) and mapped by it while the old
process still serves. At the cutover the new process finds every counter and window
where the old one left them: nothing is encoded, sent or applied for them, so the pause
does not grow with the number of tunnels.

Only one process writes at a time, as only one sends: the new process reads nothing
from the table before the old one has parked (the handoff's guarantee), and the old one
never serves again after a successful cutover.

Slot layout, in 64-bit words: send counter, next TCP receive counter, then the replay
window (``replay``): highest counter seen, an "empty" flag, and its ring of bitmap words.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from typing import Final

from gateway_daemon.tunnels.errors import StateError, TunnelError
from gateway_daemon.tunnels.replay import WINDOW_WORDS

SEND: Final = 0
RECV_NEXT: Final = 1
WINDOW: Final = 2  # the replay window's first word
SLOT_WORDS: Final = WINDOW + WINDOW_WORDS
SLOT_BYTES: Final = SLOT_WORDS * 8
# Sessions a gateway can hold at once beyond one per UDP tunnel: TCP tunnel connections.
TCP_SLOTS: Final = 4096


_EMPTY_SLOT: Final = memoryview(bytearray(SLOT_BYTES)).cast("Q")
_EMPTY_SLOT[WINDOW + 1] = 1  # the window's "empty" flag


class SlotsExhausted(TunnelError):
    """Every slot of the table is in use; the new session cannot be installed."""


def private_slot() -> memoryview:
    """One empty slot of its own, outside any table (a session not yet installed)."""
    return memoryview(bytearray(_EMPTY_SLOT)).cast("Q")


class CounterTable:
    """Fixed-size slots of 64-bit words in a memfd mapping, shareable with the next
    process (``fileno()`` is what to pass it)."""

    def __init__(self, buffer: mmap.mmap, fd: int) -> None:
        self._buffer = buffer
        self._fd = fd
        self.words = memoryview(buffer).cast("Q")
        self.slots = len(self.words) // SLOT_WORDS
        self._used: set[int] = set()
        # Oldest released first, so a slot just given back is the last to be reused.
        # Built on the first allocation after ``keep()``, off the cutover's path.
        self._free: deque[int] | None = None

    @classmethod
    def create(cls, slots: int, name: str = "hitless-counters") -> CounterTable:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * SLOT_BYTES)
            return cls(mmap.mmap(fd, slots * SLOT_BYTES), fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> CounterTable:
        """Map the table the old process passed. Its slots are all taken until
        ``keep()`` says which are live; nothing is written here."""
        size = os.fstat(fd).st_size
        if size == 0 or size % SLOT_BYTES:
            raise StateError(
                f"counter table: {size} bytes is not a whole number of {SLOT_BYTES}-byte "
                "slots; the old process runs an incompatible version"
            )
        table = cls(mmap.mmap(fd, size), fd)
        table._used = set(range(table.slots))
        table._free = deque()
        return table

    def fileno(self) -> int:
        return self._fd

    def allocate(self) -> int:
        """A free slot, reset: counters 0, replay window empty."""
        if self._free is None:
            self._free = deque(s for s in range(self.slots) if s not in self._used)
        if not self._free:
            raise SlotsExhausted(f"all {self.slots} session slots are in use")
        slot = self._free.popleft()
        self._used.add(slot)
        base = slot * SLOT_WORDS
        self.words[base : base + SLOT_WORDS] = _EMPTY_SLOT
        return slot

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.discard(slot)
            if self._free is not None:
                self._free.append(slot)

    def keep(self, live: set[int]) -> None:
        """After adopting: ``live`` are the slots in use, every other one is free."""
        bad = [s for s in live if not 0 <= s < self.slots]
        if bad:
            raise StateError(f"counter table: slots {sorted(bad)} are beyond its {self.slots}")
        self._used = set(live)
        self._free = None

    @property
    def in_use(self) -> int:
        return len(self._used)

    def close(self) -> None:
        """Unmap (sessions must no longer be used) and close this process's descriptor."""
        try:
            self.words.release()
            self._buffer.close()
        except BufferError:
            pass  # a session still holds a view; the mapping goes with the process
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
