"""One tunnel session: a pair of directional keys with their counters.

A session is what a handshake produces and what a handoff must carry over exactly: the
two keys, the next send counter and, for the receive side, either a replay window
(datagrams may arrive reordered) or the next expected counter (records on a TCP stream
arrive in order, so anything else is an attack or a bug).

The hot-path methods write into buffers the caller owns, so forwarding a packet does
not allocate the packet twice.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gateway_daemon.tunnels.counters import (
    RECV_NEXT,
    SEND,
    SLOT_WORDS,
    WINDOW,
    CounterTable,
    private_slot,
)
from gateway_daemon.tunnels.errors import CounterExhausted
from gateway_daemon.tunnels.replay import REJECT_AFTER_MESSAGES, ReplayWindow
from gateway_daemon.tunnels.wire import HEADER, HEADER_LEN, NONCE, OVERHEAD, TYPE_DATA

KEY_LEN: Final = 32


class Session:
    """Keys and counters of one tunnel (UDP) or one tunnel connection (TCP).

    The counters and the replay window live in a slot: one of its own until
    ``install()`` moves them to the gateway's counter table (``counters``), which the
    next process of a handoff maps too.
    """

    __slots__ = (
        "_b",
        "_open_nonce",
        "_receiver",
        "_seal_nonce",
        "_sender",
        "_w",
        "recv_key",
        "send_key",
        "slot",
        "tunnel_id",
        "window",
    )

    def __init__(
        self,
        tunnel_id: int,
        send_key: bytes,
        recv_key: bytes,
        *,
        table: CounterTable | None = None,
        slot: int = -1,
    ) -> None:
        """A session with fresh counters, in a slot of its own; or,
        with ``table`` and ``slot``, the session whose counters are already there (the
        next process of a handoff: nothing is written to the slot)."""
        if len(send_key) != KEY_LEN or len(recv_key) != KEY_LEN:
            raise ValueError("session keys are 32 bytes each")
        self.tunnel_id = tunnel_id
        self.window: ReplayWindow
        self.slot: int
        self.send_key = send_key
        self.recv_key = recv_key
        self._sender = ChaCha20Poly1305(send_key)
        self._receiver = ChaCha20Poly1305(recv_key)
        # Nonce buffers reused for every packet: packing into them avoids an allocation.
        self._seal_nonce = bytearray(NONCE.size)
        self._open_nonce = bytearray(NONCE.size)
        if table is not None:
            if not 0 <= slot < table.slots:
                raise ValueError(f"slot {slot} is not in the counter table")
            self._bind(table.words, slot)
            return
        self._bind(private_slot(), 0)
        self.slot = -1  # not in a shared table

    def _bind(self, words: memoryview, slot: int) -> None:
        self._w = words
        self._b = slot * SLOT_WORDS
        self.slot = slot
        self.window = ReplayWindow(words, self._b + WINDOW)

    def install(self, table: CounterTable) -> None:
        """Move the counters to a fresh slot of ``table`` (the gateway's)."""
        slot = table.allocate()
        base = slot * SLOT_WORDS
        table.words[base : base + SLOT_WORDS] = self._w[self._b : self._b + SLOT_WORDS]
        self._bind(table.words, slot)

    @property
    def send_counter(self) -> int:
        return self._w[self._b + SEND]

    @send_counter.setter
    def send_counter(self, value: int) -> None:
        self._w[self._b + SEND] = value

    @property
    def recv_next(self) -> int:
        return self._w[self._b + RECV_NEXT]

    @recv_next.setter
    def recv_next(self, value: int) -> None:
        self._w[self._b + RECV_NEXT] = value

    def seal_into(self, out: memoryview, payload: bytes | bytearray | memoryview) -> int:
        """Write header + ciphertext of ``payload`` to the start of ``out``; return the
        length written. ``out`` must hold ``len(payload) + OVERHEAD`` bytes."""
        w, at = self._w, self._b + SEND
        counter = w[at]
        if counter >= REJECT_AFTER_MESSAGES:
            raise CounterExhausted(
                f"tunnel {self.tunnel_id}: send counter exhausted; the site must handshake "
                "again before more traffic can be sealed"
            )
        w[at] = counter + 1
        HEADER.pack_into(out, 0, TYPE_DATA, self.tunnel_id, counter)
        NONCE.pack_into(self._seal_nonce, 0, counter)
        total = len(payload) + OVERHEAD
        self._sender.encrypt_into(
            self._seal_nonce, payload, out[:HEADER_LEN], out[HEADER_LEN:total]
        )
        return total

    def seal(self, payload: bytes) -> bytes:
        """``seal_into`` for callers off the hot path."""
        out = memoryview(bytearray(len(payload) + OVERHEAD))
        self.seal_into(out, payload)
        return bytes(out)

    def open_datagram_into(self, packet: memoryview, counter: int, out: memoryview) -> int:
        """Authenticate and decrypt a datagram whose header was already parsed (giving
        ``counter``); write the payload to ``out``. Returns the payload length, or -1 when
        the packet is a replay or does not authenticate (nothing changes then)."""
        window = self.window
        if not window.check(counter):
            return -1
        length = len(packet) - OVERHEAD
        if length < 0:
            return -1
        NONCE.pack_into(self._open_nonce, 0, counter)
        try:
            self._receiver.decrypt_into(
                self._open_nonce, packet[HEADER_LEN:], packet[:HEADER_LEN], out[:length]
            )
        except InvalidTag:
            return -1
        # Marked only after authentication: a forged packet must not move the window.
        window.accept(counter)
        return length

    def open_record_into(self, record: memoryview, counter: int, out: memoryview) -> int:
        """Like ``open_datagram_into`` for a TCP record, which must carry exactly the next
        counter. Returns the payload length, or -1 (the connection is then to be reset)."""
        w, at = self._w, self._b + RECV_NEXT
        if counter != w[at]:
            return -1
        length = len(record) - OVERHEAD
        if length < 0:
            return -1
        NONCE.pack_into(self._open_nonce, 0, counter)
        try:
            self._receiver.decrypt_into(
                self._open_nonce, record[HEADER_LEN:], record[:HEADER_LEN], out[:length]
            )
        except InvalidTag:
            return -1
        w[at] = counter + 1
        return length

    def open(self, packet: bytes) -> bytes | None:
        """Parse and open one datagram off the hot path; None when rejected."""
        if len(packet) < OVERHEAD:
            return None
        kind, tunnel_id, counter = HEADER.unpack_from(packet)
        if kind != TYPE_DATA or tunnel_id != self.tunnel_id:
            return None
        out = memoryview(bytearray(len(packet) - OVERHEAD))
        n = self.open_datagram_into(memoryview(packet), counter, out)
        return None if n < 0 else bytes(out[:n])
