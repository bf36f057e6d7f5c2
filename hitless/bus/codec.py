"""Message bodies: protobuf messages written as JSON with ``json_format``.

Typed in one place (proto/), readable and typeable by a person in the management UI.
Decoding is strict by default: unknown fields and wrong types are errors, carried as one
DecodeError that keeps the raw bytes for the dead-letter queue. A gateway decodes commands
leniently (unknown fields skipped), so a newer controller can add fields.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from hitless.errors import DecodeError

CONTENT_TYPE = "application/json"

M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, indent=None, sort_keys=True
    ).encode("utf-8")


def decode(cls: type[M], body: bytes, *, strict: bool = True) -> M:
    """Decode a JSON body as ``cls``; raise DecodeError saying what was wrong.

    ``strict=False`` skips fields ``cls`` does not have, for messages that a newer version
    of another service may send (wrong types are errors either way)."""
    name = cls.DESCRIPTOR.full_name
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{name}: body is not UTF-8 text ({exc})", body) from exc
    message = cls()
    try:
        json_format.Parse(text, message, ignore_unknown_fields=not strict)
    except json_format.ParseError as exc:
        raise DecodeError(f"{name}: {exc}", body) from exc
    return message
