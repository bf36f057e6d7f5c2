"""The tunnel handshake: one round trip of X25519 giving a session's two keys.

Both ends have a static X25519 key pair and know the other's static public key from
config. The remote site initiates; the gateway responds. Over UDP the two messages are
datagrams on the tunnel socket; over TCP they are the first record each way.

Initiation (64 bytes)::

    header(type=INIT, tunnel id, counter=timestamp) | E_i (32) | tag (16)

    tag = AEAD(k_auth, nonce 0, "", aad = header | E_i)
    k_auth = HKDF(DH(e_i, S_r) | DH(s_i, S_r))

The tag proves the initiator holds its static key (and binds the timestamp), so the
gateway answers only authentic initiations. The timestamp (nanoseconds, from a clock the
caller passes) must grow: a replayed initiation is refused, as WireGuard does with its
TAI64N field. The last accepted timestamp per tunnel is part of the handed-over state.

Response (64 bytes)::

    header(type=RESPONSE, tunnel id, counter=0) | E_r (32) | tag (16)

    keys = HKDF(DH(e_i, e_r) | DH(e_i, S_r) | DH(s_i, e_r) | DH(s_i, S_r),
                info = initiation | header | E_r) -> k_i2r | k_r2i | k_confirm
    tag = AEAD(k_confirm, nonce 0, "", aad = header | E_r)

The ephemeral-ephemeral term gives forward secrecy; the static terms authenticate both
ends. What this leaves out, knowingly: WireGuard's cookie reply (DoS under load),
identity hiding of the initiator, and rekeying on a timer (a site rekeys by handshaking
again, which the gateway accepts at any time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway_daemon.tunnels.errors import HandshakeError
from gateway_daemon.tunnels.session import Session
from gateway_daemon.tunnels.wire import HEADER, HEADER_LEN, TYPE_INIT, TYPE_RESPONSE

MESSAGE_LEN: Final = HEADER_LEN + 32 + 16
_SALT: Final = b"hitless tunnel handshake v1"
_ZERO_NONCE: Final = bytes(12)


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(ikm)


def _tag(key: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, b"", aad)


def _verify(key: bytes, tag: bytes, aad: bytes) -> bool:
    try:
        ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, tag, aad)
    except InvalidTag:
        return False
    return True


@dataclass(frozen=True)
class Initiation:
    """What the initiator keeps between sending its message and reading the response."""

    tunnel_id: int
    message: bytes
    ephemeral: X25519PrivateKey
    static: X25519PrivateKey
    responder: X25519PublicKey


def initiate(
    tunnel_id: int,
    static: X25519PrivateKey,
    responder: X25519PublicKey,
    *,
    timestamp: int,
    ephemeral: X25519PrivateKey | None = None,
) -> Initiation:
    """Build an initiation message for ``tunnel_id`` (the remote site's side)."""
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    head = HEADER.pack(TYPE_INIT, tunnel_id, timestamp) + public_bytes(eph)
    k_auth = _hkdf(eph.exchange(responder) + static.exchange(responder), b"auth" + head, 32)
    return Initiation(tunnel_id, head + _tag(k_auth, head), eph, static, responder)


@dataclass(frozen=True)
class Accepted:
    """An authentic initiation, answered: the message to send back and the session."""

    tunnel_id: int
    timestamp: int
    response: bytes
    session: Session


def parse_initiation(message: bytes) -> tuple[int, int]:
    """The tunnel id and timestamp an initiation claims (not yet authenticated)."""
    if len(message) != MESSAGE_LEN:
        raise HandshakeError(f"initiation: expected {MESSAGE_LEN} bytes, got {len(message)}")
    kind, tunnel_id, timestamp = HEADER.unpack_from(message)
    if kind != TYPE_INIT:
        raise HandshakeError(f"initiation: message type {kind}, expected {TYPE_INIT}")
    return tunnel_id, timestamp


def respond(
    message: bytes,
    static: X25519PrivateKey,
    initiator: X25519PublicKey,
    *,
    last_timestamp: int,
    ephemeral: X25519PrivateKey | None = None,
) -> Accepted:
    """Check an initiation from the site whose static key is ``initiator`` and answer it
    (the gateway's side). Raises HandshakeError when it is forged or replayed."""
    tunnel_id, timestamp = parse_initiation(message)
    head, tag = message[: HEADER_LEN + 32], message[HEADER_LEN + 32 :]
    try:
        e_i = X25519PublicKey.from_public_bytes(head[HEADER_LEN:])
        es = static.exchange(e_i)
    except ValueError as exc:
        raise HandshakeError(f"initiation for tunnel {tunnel_id}: bad ephemeral key") from exc
    ss = static.exchange(initiator)
    if not _verify(_hkdf(es + ss, b"auth" + head, 32), tag, head):
        raise HandshakeError(f"initiation for tunnel {tunnel_id} does not authenticate")
    if timestamp <= last_timestamp:
        raise HandshakeError(
            f"initiation for tunnel {tunnel_id} is a replay (timestamp {timestamp} is not "
            f"after {last_timestamp})"
        )
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    reply_head = HEADER.pack(TYPE_RESPONSE, tunnel_id, 0) + public_bytes(eph)
    ikm = eph.exchange(e_i) + es + eph.exchange(initiator) + ss
    keys = _hkdf(ikm, b"keys" + message + reply_head, 96)
    i2r, r2i, confirm = keys[:32], keys[32:64], keys[64:]
    return Accepted(
        tunnel_id,
        timestamp,
        reply_head + _tag(confirm, reply_head),
        Session(tunnel_id, send_key=r2i, recv_key=i2r),
    )


def finish(initiation: Initiation, response: bytes) -> Session:
    """Check the gateway's response and return the site's session."""
    if len(response) != MESSAGE_LEN:
        raise HandshakeError(f"response: expected {MESSAGE_LEN} bytes, got {len(response)}")
    kind, tunnel_id, _ = HEADER.unpack_from(response)
    if kind != TYPE_RESPONSE or tunnel_id != initiation.tunnel_id:
        raise HandshakeError(
            f"response: type {kind} for tunnel {tunnel_id}, expected type {TYPE_RESPONSE} "
            f"for tunnel {initiation.tunnel_id}"
        )
    reply_head, tag = response[: HEADER_LEN + 32], response[HEADER_LEN + 32 :]
    try:
        e_r = X25519PublicKey.from_public_bytes(reply_head[HEADER_LEN:])
        ee = initiation.ephemeral.exchange(e_r)
    except ValueError as exc:
        raise HandshakeError(f"response for tunnel {tunnel_id}: bad ephemeral key") from exc
    ikm = (
        ee
        + initiation.ephemeral.exchange(initiation.responder)
        + initiation.static.exchange(e_r)
        + initiation.static.exchange(initiation.responder)
    )
    keys = _hkdf(ikm, b"keys" + initiation.message + reply_head, 96)
    if not _verify(keys[64:], tag, reply_head):
        raise HandshakeError(f"response for tunnel {tunnel_id} does not authenticate")
    return Session(tunnel_id, send_key=keys[:32], recv_key=keys[32:64])
