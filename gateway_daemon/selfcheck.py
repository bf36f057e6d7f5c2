"""What a new version checks about itself before it says ready to take over.

During a handoff the new process has adopted the old one's sockets and state but serves
nothing yet; the old one still serves. ``run()`` is the last step before READY: if it
raises ``SelfCheckFailed``, the new process aborts the handoff with the reason, the old
process goes on serving, and the gateway reports ROLLED_BACK with that reason. This is
the hook a release's own health checks belong in (the forwarding process checks the broker
itself: its agent must have reached it, ``forwarding.take_over``).

Checks, each cheap (milliseconds):

- crypto known answer: ChaCha20-Poly1305 seals RFC 8439's test vector (section 2.8.2) to
  the published ciphertext and tag. A build whose crypto backend is broken must never
  carry tunnels: it would send garbage, or worse, under keys that are live;
- the adopted data plane: every inherited socket is open, and the tunnel plane is loaded
  and not yet serving (it must not send before the old process has paused).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gateway_daemon.dataplane import DataPlane
from gateway_daemon.errors import SelfCheckFailed
from gateway_daemon.plane import Handle
from gateway_daemon.tunnels.plane import Phase

_KEY: Final = bytes(range(0x80, 0xA0))
_NONCE: Final = bytes.fromhex("070000004041424344454647")
_AAD: Final = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_PLAINTEXT: Final = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
_CIPHERTEXT_HEAD: Final = bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
_TAG: Final = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")


def run(plane: DataPlane, inherited: Sequence[Handle]) -> None:
    """Raise SelfCheckFailed, saying what is wrong, unless this version is fit to serve
    ``plane``, adopted from the ``inherited`` sockets."""
    _crypto_known_answer()
    _plane_loaded(plane, inherited)


def _crypto_known_answer() -> None:
    sealed = ChaCha20Poly1305(_KEY).encrypt(_NONCE, _PLAINTEXT, _AAD)
    if sealed[:16] != _CIPHERTEXT_HEAD or sealed[-16:] != _TAG:
        raise SelfCheckFailed(
            "self-check failed: ChaCha20-Poly1305 does not give RFC 8439's known answer; "
            "this build's crypto backend is broken"
        )


def _plane_loaded(plane: DataPlane, inherited: Sequence[Handle]) -> None:
    closed = sum(1 for sock in inherited if sock.fileno() < 0)
    if closed:
        raise SelfCheckFailed(f"self-check failed: {closed} inherited descriptors are closed")
    tunnels = plane.tunnels
    if tunnels is not None and tunnels.phase is not Phase.LOADED:
        raise SelfCheckFailed(
            f"self-check failed: the tunnel plane is {tunnels.phase.value} before cutover; "
            "it must not serve until the old process has paused"
        )
