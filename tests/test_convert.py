"""Records to API messages: the parts written by hand, checked against protobuf's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controller_svc import convert


@pytest.mark.parametrize(
    "value",
    [
        datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
        datetime(2026, 12, 1, 13, 44, 1, 999_999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, 0, 1, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),  # before the epoch
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2030, 6, 1, 8, 15, 30, 250),  # naive: read as UTC
    ],
)
def test_a_timestamp_is_what_protobuf_makes_of_the_datetime(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    stamp = convert.timestamp(value)
    assert (stamp.seconds, stamp.nanos) == (expected.seconds, expected.nanos)
    assert 0 <= stamp.nanos < 1_000_000_000
    assert stamp.ToDatetime(tzinfo=UTC) == (value if value.tzinfo else value.replace(tzinfo=UTC))
