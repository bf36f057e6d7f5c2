"""The allowed publishers of management jobs, on each database the controller runs on:
allowing, disallowing, the exact match a job's user_id must make, and the names refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from controller_svc.db import make_engine, migrate
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.publishers import LISTED, Publishers, broker_user
from controller_svc.sessions import Sessions

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def publishers(db_url: str) -> Iterator[Publishers]:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield Publishers(Sessions(engine))
    finally:
        engine.dispose()


def test_allowing_twice_keeps_the_first_record(publishers: Publishers) -> None:
    record, created = publishers.allow("ops-alice", T0, "token:admin")
    assert created and (record.user, record.allowed_at, record.allowed_by) == (
        "ops-alice", T0, "token:admin",
    )  # fmt: skip
    again, created = publishers.allow("ops-alice", T0 + timedelta(hours=1), "token:other")
    assert not created and again == record
    assert publishers.list() == [record]


def test_only_an_exact_allowed_name_is_allowed(publishers: Publishers) -> None:
    publishers.allow("ops-alice", T0, "token:admin")
    publishers.allow("jörg", T0, "token:admin")
    assert publishers.is_allowed("ops-alice") and publishers.is_allowed("jörg")
    for other in ("OPS-ALICE", "ops-alice ", "ops", "joerg", "", None):
        assert not publishers.is_allowed(other), other
    assert [p.user for p in publishers.list()] == ["jörg", "ops-alice"]


def test_disallowing_removes_the_user(publishers: Publishers) -> None:
    publishers.allow("ops-alice", T0, "token:admin")
    publishers.allow("ops-bob", T0, "token:admin")
    removed = publishers.disallow("ops-alice")
    assert removed.user == "ops-alice" and removed.allowed_by == "token:admin"
    assert not publishers.is_allowed("ops-alice") and publishers.is_allowed("ops-bob")
    assert [p.user for p in publishers.list()] == ["ops-bob"]


def test_disallowing_a_user_not_allowed_names_those_that_are(publishers: Publishers) -> None:
    with pytest.raises(NotFound, match="no broker user is allowed"):
        publishers.disallow("ops-alice")
    publishers.allow("ops-bob", T0, "token:admin")
    with pytest.raises(NotFound) as caught:
        publishers.disallow("ops-alice")
    message = str(caught.value)
    assert "broker user 'ops-alice' is not an allowed publisher" in message
    assert "the allowed ones are 'ops-bob'" in message
    assert "`upgradectl jobs publishers` lists them" in message
    for n in range(LISTED + 5):
        publishers.allow(f"user-{n:02d}", T0, "token:admin")
    with pytest.raises(NotFound, match=r"'user-18' and 6 more\)"):
        publishers.disallow("ops-alice")
    assert len(publishers.list()) == LISTED + 6, "a refused disallow changes nothing"


@pytest.mark.parametrize("name", ["a", "ops alice", "ops@example.com", "é" * 127 + "a"])
def test_names_a_user_id_can_carry_are_taken(name: str) -> None:
    assert broker_user(name) == name


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("", "no broker user given"),
        ("a" * 256, "256 bytes of UTF-8, and a message's user_id carries at most 255"),
        ("é" * 128, "256 bytes of UTF-8"),
        ("ops\nalice", "control or invisible characters"),
        ("ops\x00", "control or invisible characters"),
        ("ops\u200b", "control or invisible characters"),
        ("alice\u202egpj", "control or invisible characters"),
        (" ops", "starts or ends with a space"),
        ("ops\u00a0", "starts or ends with a space"),
    ],
)
def test_names_no_user_id_could_carry_are_refused_and_change_nothing(
    publishers: Publishers, name: str, complaint: str
) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        publishers.allow(name, T0, "token:admin")
    with pytest.raises(InvalidRequest, match=complaint):
        publishers.disallow(name)
    assert publishers.list() == []
