"""Signed UpgradeCommands: the controller signs each command with its command key, and a
gateway runs only a command signed by a command key its trusted root carries.

What is signed is the exact bytes that travel: the UpgradeCommand's deterministic protobuf
serialization, prefixed with a domain tag so the signature means nothing in any other
context. The verifier checks the signature over the bytes it received and only then parses
them, so no re-encoding can change what was signed. The signature (Ed25519, RFC 8032) and
the key id travel beside the bytes, e.g. in message headers, so gateways that do not verify
still read the body as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from google.protobuf.message import DecodeError
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature, Signer
from tuf.api.metadata import Root

from hitless.trust.errors import (
    BadCommandSignature,
    CommandExpired,
    CommandMisaddressed,
    UnknownCommandKey,
    UnsignedCommand,
)
from hitless.trust.keys import command_keys
from hitless.v1 import bus_pb2

DOMAIN = b"hitless.v1.UpgradeCommand\x00"


@dataclass(frozen=True)
class SignedCommand:
    """An UpgradeCommand as sent: ``payload`` its serialized bytes, ``keyid`` the command
    key's id (hex), ``signature`` the Ed25519 signature over DOMAIN + payload (hex)."""

    payload: bytes
    keyid: str
    signature: str


def sign_command(command: bus_pb2.UpgradeCommand, signer: Signer) -> SignedCommand:
    """Serialize ``command`` deterministically and sign it with ``signer`` (the command key,
    ``keys.load_role_signer(path, "command", root)``)."""
    payload = command.SerializeToString(deterministic=True)
    signature = signer.sign(DOMAIN + payload)
    return SignedCommand(payload, signature.keyid, signature.signature)


def verify_command(
    signed: SignedCommand, root: Root, gateway_id: str, now: datetime
) -> bus_pb2.UpgradeCommand:
    """The UpgradeCommand in ``signed``, once ``open_command`` accepts it and
    ``check_deadline`` finds its deadline after ``now`` (UTC).

    Raises what those two raise.
    """
    command = open_command(signed, root, gateway_id)
    check_deadline(command, now)
    return command


def open_command(signed: SignedCommand, root: Root, gateway_id: str) -> bus_pb2.UpgradeCommand:
    """The UpgradeCommand in ``signed``, once its signature verifies against a command key
    carried by the trusted ``root`` (``keys.command_keys``) and it names ``gateway_id``.
    Its deadline is not checked here (``check_deadline``): a gateway answers an expired
    command it can trust differently from one it cannot.

    Replay (the same command id with other content) needs the gateway's memory of command
    ids and is checked there.

    Raises UnsignedCommand, UnknownCommandKey, BadCommandSignature (altered or forged, or
    bytes that are not an UpgradeCommand), CommandMisaddressed.
    """
    if not signed.signature or not signed.keyid:
        raise UnsignedCommand("the UpgradeCommand carries no signature: it was not run")
    keys = command_keys(root)
    key = keys.get(signed.keyid)
    if key is None:
        raise UnknownCommandKey(
            f"the UpgradeCommand is signed by key {signed.keyid[:64]}, which root version "
            f"{root.version} does not carry (command keys: {', '.join(keys) or 'none'}): "
            "it was not run"
        )
    try:
        key.verify_signature(Signature(signed.keyid, signed.signature), DOMAIN + signed.payload)
    except UnverifiedSignatureError as exc:  # VerificationError (bad hex...) included
        raise BadCommandSignature(
            f"the UpgradeCommand's signature by key {signed.keyid} does not match its bytes "
            f"(altered or forged): it was not run ({exc})"
        ) from exc
    command = bus_pb2.UpgradeCommand()
    try:
        command.ParseFromString(signed.payload)
    except DecodeError as exc:
        raise BadCommandSignature(
            f"the signed bytes by key {signed.keyid} are not an UpgradeCommand: {exc}"
        ) from exc
    if command.gateway_id != gateway_id:
        raise CommandMisaddressed(
            f"command {command.command_id} is addressed to gateway {command.gateway_id!r}, "
            f"not {gateway_id!r}: it was not run"
        )
    return command


def check_deadline(command: bus_pb2.UpgradeCommand, now: datetime) -> None:
    """Raise CommandExpired unless ``command`` has a deadline after ``now`` (tz-aware)."""
    if not command.HasField("deadline"):
        raise CommandExpired(f"command {command.command_id} carries no deadline: it was not run")
    deadline = command.deadline.ToDatetime(tzinfo=now.tzinfo)
    if now >= deadline:
        raise CommandExpired(
            f"command {command.command_id} expired at {deadline.isoformat()} "
            f"(now {now.isoformat()}): it was not run"
        )
