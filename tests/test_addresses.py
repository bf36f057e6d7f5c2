"""Admin addresses: the one rule (hitless.addresses) and ``admins add`` / ``admins remove``
refusing what the notifier could not mail, with the reason, against real databases and a
real controller."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert

from controller_svc.admins import Admins
from controller_svc.db import Admin, make_engine, migrate
from controller_svc.errors import InvalidRequest, NotFound
from controller_svc.repository import Repository
from hitless.addresses import Address, InvalidAddress, parse
from tests.support.fleet import Fleet

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

# (input, reason the refusal must give)
REFUSED = [
    ("", "must have an @-sign"),
    ("ops", "must have an @-sign"),
    ("ops@", "something after the @-sign"),
    ("a b@example.com", "invalid characters before the @-sign: SPACE"),
    ("x@example.com\nBcc: z@example.org", "invalid characters"),
    ("ops@example.com,evil@example.org", "invalid characters"),
    ("Ops <ops@example.com>", "display name"),
    ('"ops"@example.com', "Quoting the part before the @-sign is not allowed"),
    ("ops@[127.0.0.1]", "bracketed IP address"),
    ("ops@mailhost", "should have a period"),
    ("ops@corp.local", "special-use or reserved name"),
    ("jörg@exämple.test", "special-use or reserved name"),
    ("a" * 250 + "@example.com", "too long"),
]


@pytest.mark.parametrize(
    ("raw", "text", "wire"),
    [
        ("  Ops@Example.COM ", "Ops@example.com", "Ops@example.com"),
        # An internationalised domain is one admin in either spelling, sent as IDNA.
        ("a@EXÄMPLE.com", "a@exämple.com", "a@xn--exmple-cua.com"),
        ("a@xn--exmple-cua.com", "a@exämple.com", "a@xn--exmple-cua.com"),
        # A non-ASCII local part has no ASCII form: it needs SMTPUTF8.
        ("jörg@exämple.com", "jörg@exämple.com", "jörg@exämple.com"),
        # Unicode NFC: "o" followed by a combining diaeresis is "ö".
        ("jo\u0308rg@example.com", "jörg@example.com", "jörg@example.com"),
    ],
)
def test_canonical_and_wire_forms(raw: str, text: str, wire: str) -> None:
    address = parse(raw)
    assert address == Address(text=text, wire=wire)
    assert address.needs_smtputf8 is (not wire.isascii())


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_refusals_name_the_address_and_the_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        parse(raw)
    message = str(caught.value)
    assert message.startswith(f"invalid email address {repr(raw)[:60]}"), message
    assert reason in message, f"expected {reason!r} in {message!r}"
    assert "ops@example.com" in message, "the message shows what an accepted address looks like"


def test_the_rule_never_asks_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.resolver

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an address check made a DNS query")

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", no_dns)
    assert parse("ops@no-such-domain-anywhere.example.com").text == (
        "ops@no-such-domain-anywhere.example.com"
    )


@pytest.fixture
def admins(db_url: str) -> Iterator[Admins]:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield Admins(Repository(engine).sessions)
    finally:
        engine.dispose()


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_admins_add_refuses_with_the_reason_and_stores_nothing(
    admins: Admins, raw: str, reason: str
) -> None:
    admins.add("ops@example.com", NOW)
    with pytest.raises(InvalidRequest, match=reason):
        admins.add(raw, NOW)
    assert admins.list() == ["ops@example.com"]


def test_admins_are_stored_in_canonical_form_once(admins: Admins) -> None:
    assert admins.add("a@xn--exmple-cua.com", NOW) == ("a@exämple.com", True)
    assert admins.add("a@EXÄMPLE.com", NOW) == ("a@exämple.com", False)
    assert admins.add("jörg@exämple.com", NOW) == ("jörg@exämple.com", True)
    assert admins.list() == ["a@exämple.com", "jörg@exämple.com"]
    assert admins.remove("a@XN--EXMPLE-CUA.com") == "a@exämple.com"
    assert admins.list() == ["jörg@exämple.com"]


def test_a_row_an_earlier_rule_accepted_can_still_be_removed(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(Admin),
                [
                    {"email": "ops@corp.local", "added_at": NOW},
                    {"email": "a@b.example", "added_at": NOW},
                ],
            )
        admins = Admins(Repository(engine).sessions)
        assert admins.remove(" ops@CORP.local") == "ops@corp.local"
        assert admins.list() == ["a@b.example"]
        with pytest.raises(NotFound, match=r"ops@corp\.local is not an admin"):
            admins.remove("ops@corp.local")
    finally:
        engine.dispose()


def test_upgradectl_admins_add_shows_the_controllers_reason(fleet: Fleet) -> None:
    refused = fleet.cli("admins", "add", "jörg@exämple.test", check=False)
    assert refused.returncode == 4, refused
    assert "invalid email address 'jörg@exämple.test'" in refused.stderr
    assert "special-use or reserved name" in refused.stderr

    accepted = fleet.cli("admins", "add", "jörg@EXÄMPLE.com")
    assert "jörg@exämple.com" in accepted.stdout, accepted
    listed = fleet.cli("admins", "list", "--json")
    assert json.loads(listed.stdout) == [{"email": "jörg@exämple.com"}]
