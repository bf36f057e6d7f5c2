"""Message bodies: protobuf messages written as JSON with ``json_format``.

Typed in one place (proto/), readable and typeable by a person in the management UI.
Decoding is strict by default: unknown fields and wrong types are errors, carried as one
DecodeError that keeps the raw bytes for the dead-letter queue. A gateway decodes commands
leniently (unknown fields skipped), so a newer controller can add fields.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, Final, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

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
    of another service may send (wrong types are errors either way).

    What ``json_format.Parse`` accepts and how it reads it are the rule (the proto3 JSON
    mapping, https://protobuf.dev/programming-guides/json/). A body whose every value is
    of a plain kind (text, a whole number, true or false, an enum's name, a Timestamp
    or Duration) is read by ``_plain`` instead, a fifth of the time (the controller
    decodes every report and heartbeat of the fleet); any other body, and any that
    ``_plain`` is not sure of, goes to ``json_format``, which gives the result or the
    error."""
    name = cls.DESCRIPTOR.full_name
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{name}: body is not UTF-8 text ({exc})", body) from exc
    plain = _plain(cls, text, strict)
    if plain is not None:
        return plain
    message = cls()
    try:
        json_format.Parse(text, message, ignore_unknown_fields=not strict)
    except json_format.ParseError as exc:
        raise DecodeError(f"{name}: {exc}", body) from exc
    return message


# -- the plain reader ---------------------------------------------------------------------

_NOT_PLAIN: Final = object()
_RANGES: Final = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Whole numbers as proto3 JSON writes 64-bit ones: ASCII digits, an optional minus.
_DIGITS: Final = re.compile(r"-?[0-9]+")
_TIME_TYPES: Final[dict[str, type[Timestamp] | type[Duration]]] = {
    "google.protobuf.Timestamp": Timestamp,
    "google.protobuf.Duration": Duration,
}

Convert = Callable[[Any], Any]


class _Duplicate(Exception):
    """A JSON object named one key twice (``json_format`` refuses it)."""


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(items)
    if len(result) != len(items):
        raise _Duplicate
    return result


def _plain(cls: type[M], text: str, strict: bool) -> M | None:
    """``cls`` read from ``text`` when every value in it is of a plain kind; None when
    ``json_format`` must read it (any other kind, an unknown field in strict mode, a
    value out of range, non-ASCII text, or anything malformed, whatever it raised here:
    json_format then gives the error): what this accepts, it reads as json_format does."""
    try:
        return _plain_values(cls, text, strict)
    except Exception:  # json_format.Parse turns any of them into its ParseError
        return None


def _plain_values(cls: type[M], text: str, strict: bool) -> M | None:
    try:
        value = json.loads(text, object_pairs_hook=_pairs)
    except (ValueError, _Duplicate):
        return None
    if type(value) is not dict:
        return None
    fields = _fields(cls.DESCRIPTOR)
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        found = fields.get(key)
        if found is None:
            if strict or key.startswith("["):
                return None
            continue
        name, convert = found
        if name in kwargs:
            return None  # two spellings of one field
        converted = convert(raw)
        if converted is _NOT_PLAIN:
            return None
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except (ValueError, TypeError):
        return None


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, tuple[str, Convert]]:
    """Each field of ``descriptor`` under its JSON name and its proto name, with how to
    read a plain value of it."""
    fields: dict[str, tuple[str, Convert]] = {}
    for field in descriptor.fields:
        convert = _converter(field)
        fields[field.name] = fields[field.json_name] = (field.name, convert)
    return fields


def _converter(field: FieldDescriptor) -> Convert:
    if field.containing_oneof is not None:
        return _not_plain
    one = _scalar(field)
    if field.is_repeated:
        if field.message_type is not None:
            return _not_plain

        def repeated(raw: Any) -> Any:
            if type(raw) is not list:
                return _NOT_PLAIN
            items = [one(item) for item in raw]
            return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items

        return repeated
    return one


def _scalar(field: FieldDescriptor) -> Convert:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _text
    if kind == FieldDescriptor.TYPE_BOOL:
        return lambda raw: raw if type(raw) is bool else _NOT_PLAIN
    if kind in _RANGES:
        low, high = _RANGES[kind]

        def whole(raw: Any) -> Any:
            if type(raw) is str and _DIGITS.fullmatch(raw):
                raw = int(raw)
            elif type(raw) is not int:
                return _NOT_PLAIN
            return raw if low <= raw <= high else _NOT_PLAIN

        return whole
    if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        numbers = {v.name: v.number for v in field.enum_type.values}
        return lambda raw: numbers.get(raw, _NOT_PLAIN) if type(raw) is str else _NOT_PLAIN
    message_type = field.message_type
    if message_type is not None and message_type.full_name in _TIME_TYPES:
        make = _TIME_TYPES[message_type.full_name]

        def instant(raw: Any) -> Any:
            if type(raw) is not str or not raw.isascii():
                return _NOT_PLAIN
            message = make()
            try:
                message.FromJsonString(raw)
            except ValueError:
                return _NOT_PLAIN
            return message

        return instant
    return _not_plain


def _text(raw: Any) -> Any:
    # Non-ASCII text goes to json_format, which also refuses unpaired surrogates.
    return raw if type(raw) is str and raw.isascii() else _NOT_PLAIN


def _not_plain(_raw: Any) -> Any:
    return _NOT_PLAIN
