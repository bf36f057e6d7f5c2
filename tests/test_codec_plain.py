"""The codec's plain reader gives what ``json_format`` gives, result or error, for every
message on the bus: thousands of bodies, valid ones and ones with a value of the wrong
kind, out of range, misspelt, twice or unknown."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from hitless.bus import codec
from hitless.errors import DecodeError
from hitless.v1 import bus_pb2, common_pb2

MESSAGES = [
    getattr(bus_pb2, name)
    for name in sorted(bus_pb2.DESCRIPTOR.message_types_by_name)
]  # fmt: skip

ODD_VALUES: list[Any] = [
    0, -1, 7, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, "12", "-12", "+12", " 12", "1_000",
    "٣", 5.0, 5.5, True, False, None, "", "text", "é", "\ud800", "a\udc00b", [], ["x"], [1],
    ["x", None], {}, {"seconds": 1}, "2026-12-02T07:00:00Z", "2026-12-02T07:00:00.5+01:00",
    "2026-13-01T00:00:00Z", "1970-01-01T00:00:00Z", "5s", "-1.5s", "5", "1e3s",
    "GATEWAY_JOB_STATE_SUCCEEDED", "GATEWAY_JOB_STATE_NOPE", 3, 99,
]  # fmt: skip


def _random_value(field: FieldDescriptor, rng: random.Random) -> Any:
    """A valid JSON value for ``field``, as json_format writes one."""
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return f"2026-{rng.randint(1, 12):02d}-0{rng.randint(1, 9)}T07:0{rng.randint(0, 9)}:00Z"
        if field.message_type.full_name == "google.protobuf.Duration":
            return f"{rng.randint(0, 100)}s"
        return {}
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return rng.choice(field.enum_type.values).name
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(["gw-1", "", "1.2.0", "x" * rng.randint(0, 40)])
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64):
        return str(rng.randint(0, 2**40))
    return rng.randint(0, 2**20)


def _body(cls: type[Message], rng: random.Random) -> str:
    """A body for ``cls``: valid, or with one or two things wrong or unusual."""
    fields = list(cls.DESCRIPTOR.fields)
    pairs: list[tuple[str, Any]] = []
    for field in rng.sample(fields, rng.randint(0, len(fields))):
        value = _random_value(field, rng)
        if field.is_repeated:
            value = [value for _ in range(rng.randint(0, 3))]
        name = field.json_name if rng.random() < 0.2 else field.name
        pairs.append((name, value))
    for _ in range(rng.choice([0, 0, 1, 2])):
        change = rng.random()
        if change < 0.5 and pairs:
            index = rng.randrange(len(pairs))
            pairs[index] = (pairs[index][0], rng.choice(ODD_VALUES))
        elif change < 0.65:
            pairs.append((rng.choice(["nope", "[ext.x]", "@type"]), 1))
        elif change < 0.8 and pairs:
            pairs.append(rng.choice(pairs))  # the same key twice
        elif pairs:
            field = rng.choice(fields)  # both spellings of one field
            pairs += [(field.name, _random_value(field, rng)),
                      (field.json_name, _random_value(field, rng))]  # fmt: skip
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    return text if rng.random() > 0.02 else rng.choice(["[]", "1", "null", "{", text + "x"])


def _reference(cls: type[Message], text: str, strict: bool) -> Message | str:
    try:
        return json_format.Parse(text, cls(), ignore_unknown_fields=not strict)
    except json_format.ParseError:
        return "error"


def _ours(cls: type[Message], text: str, strict: bool) -> Message | str:
    try:
        return codec.decode(cls, text.encode(), strict=strict)
    except DecodeError:
        return "error"


@pytest.mark.parametrize("strict", [True, False])
def test_the_plain_reader_agrees_with_json_format(strict: bool) -> None:
    rng = random.Random(20261202 + strict)
    plain_read = 0
    cases = 0
    for cls in MESSAGES:
        for _ in range(400):
            text = _body(cls, rng)
            cases += 1
            expected = _reference(cls, text, strict)
            got = _ours(cls, text, strict)
            assert got == expected, (cls.DESCRIPTOR.name, text, got, expected)
            if expected != "error":
                assert isinstance(got, Message)
                assert got.ListFields() == expected.ListFields(), text  # type: ignore[union-attr]
            plain = codec._plain(cls, text, strict)
            if plain is not None:
                plain_read += 1
                assert plain == expected, (cls.DESCRIPTOR.name, text)
    # Most bodies are read by the plain reader, so the comparison above tests it.
    assert plain_read > cases // 3, (plain_read, cases)


def test_a_status_report_as_a_gateway_writes_it_is_read_plainly() -> None:
    """What the gateways send most (reports, heartbeats) never needs json_format."""
    report = bus_pb2.StatusReport(
        report_id="r-1", command_id="c-1", job_id="j-1", gateway_id="gw-1",
        state=common_pb2.GATEWAY_JOB_STATE_DOWNLOADING, from_version="1.0.0",
        to_version="1.1.0", bytes_done=2**33, bytes_total=2**34, health="3/3 tunnels up",
    )  # fmt: skip
    report.at.GetCurrentTime()
    beat = bus_pb2.GatewayHeartbeat(gateway_id="gw-1", version="1.0.0", vpn_sessions=3)
    beat.at.GetCurrentTime()
    for message in (report, beat):
        text = codec.encode(message).decode()
        assert codec._plain(type(message), text, True) == message
        assert codec.decode(type(message), text.encode()) == message


@pytest.mark.parametrize(
    "text",
    [
        '{"gateway_id": "gw-1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"gateway_id": "gw-1", "at": "1970-01-01T00:00:00.5e400Z"}',
        '{"gateway_id": "gw-1", "vpnSessions": "' + "1" * 5000 + '"}',
    ],
    ids=["nested-deeper-than-the-recursion-limit", "exponent-in-a-timestamp", "5000-digits"],
)
def test_bodies_the_plain_reader_chokes_on_are_decode_errors_as_before(text: str) -> None:
    """What makes the plain reader raise (RecursionError, OverflowError, Python's limit
    on digits) is json_format's to judge: a DecodeError, as it always was, never an
    exception the consumer does not expect."""
    assert _reference(bus_pb2.GatewayHeartbeat, text, False) == "error"
    with pytest.raises(DecodeError):
        codec.decode(bus_pb2.GatewayHeartbeat, text.encode(), strict=False)
