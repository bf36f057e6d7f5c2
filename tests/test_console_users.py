"""The web console's users on each database the controller runs on: adding, listing and
removing them, the scrypt hash that is all a password leaves behind, and logins: right,
wrong, for a name that is no user, and slowed down after repeated failures, with guesses
sent in parallel getting no more tries than guesses sent one by one."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from controller_svc.access import Caller, Role
from controller_svc.db import ConsoleUser
from controller_svc.errors import Conflict, InvalidRequest, NotFound
from controller_svc.sessions import Sessions
from controller_svc.users import (
    FREE_FAILURES,
    MAX_WAIT,
    LoginRefused,
    LoginThrottled,
    Users,
    hash_password,
    password_matches,
    wait_after,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery staple"


@pytest.fixture
def users(sessions: Sessions) -> Users:
    return Users(sessions)


def _stored(sessions: Sessions, name: str) -> ConsoleUser:
    """The user's row as stored (a write session keeps it readable after commit)."""
    with sessions.write() as session:
        return session.scalars(select(ConsoleUser).where(ConsoleUser.name == name)).one()


def test_users_are_added_listed_and_removed(users: Users) -> None:
    added = users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    assert (added.name, added.role, added.created_at, added.created_by) == (
        "olive", Role.OPERATOR, T0, "token:admin",
    )  # fmt: skip
    assert added.last_login_at is None
    users.add("ada", Role.ADMIN, PASSWORD, T0, "token:admin")
    assert [u.name for u in users.list()] == ["ada", "olive"]
    assert users.get("olive") == added and users.get("nobody") is None
    assert users.remove("olive") == added
    assert [u.name for u in users.list()] == ["ada"]
    with pytest.raises(NotFound, match="no console user named 'olive'"):
        users.remove("olive")


def test_a_name_is_one_user_and_must_be_plain(users: Users) -> None:
    users.add("olive", Role.VIEWER, PASSWORD, T0, "token:admin")
    with pytest.raises(Conflict, match="exists already"):
        users.add("olive", Role.ADMIN, "another long password", T0, "token:admin")
    assert users.get("olive") is not None and users.get("olive").role is Role.VIEWER  # type: ignore[union-attr]
    for bad in ("", "a b", "x" * 65, "olive<script>", "ünïcode"):
        with pytest.raises(InvalidRequest, match="invalid user name"):
            users.add(bad, Role.VIEWER, PASSWORD, T0, "token:admin")


def test_a_password_has_at_least_twelve_characters(users: Users) -> None:
    with pytest.raises(InvalidRequest, match="at least 12 characters, and this one has 11"):
        users.add("olive", Role.VIEWER, "x" * 11, T0, "token:admin")
    with pytest.raises(InvalidRequest, match="at most 1024"):
        users.add("olive", Role.VIEWER, "x" * 1025, T0, "token:admin")
    users.add("olive", Role.VIEWER, "x" * 12, T0, "token:admin")
    assert users.list() != []


def test_only_a_salted_scrypt_hash_is_kept(users: Users, sessions: Sessions) -> None:
    users.add("olive", Role.VIEWER, PASSWORD, T0, "token:admin")
    users.add("otto", Role.VIEWER, PASSWORD, T0, "token:admin")
    olive, otto = _stored(sessions, "olive").password_hash, _stored(sessions, "otto").password_hash
    assert olive.split("$")[:4] == ["scrypt", str(2**14), "8", "1"]
    assert PASSWORD not in olive and olive != otto, "a salt of its own for each"
    assert password_matches(PASSWORD, olive) and not password_matches(PASSWORD + "!", olive)
    assert hash_password(PASSWORD, bytes(16)) == hash_password(PASSWORD, bytes(16))
    assert not password_matches(PASSWORD, "md5$whatever") and not password_matches(PASSWORD, "")


def test_the_right_password_logs_in_with_the_users_role(users: Users) -> None:
    users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    caller = users.authenticate("olive", PASSWORD, T0 + timedelta(minutes=1))
    assert caller == Caller("user:olive", Role.OPERATOR)
    assert users.get("olive").last_login_at == T0 + timedelta(minutes=1)  # type: ignore[union-attr]


def test_a_wrong_password_and_an_unknown_name_get_the_same_answer(users: Users) -> None:
    users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    answers = []
    for name, password in (("olive", "not the password"), ("nobody", PASSWORD)):
        with pytest.raises(LoginRefused) as refused:
            users.authenticate(name, password, T0)
        answers.append(str(refused.value))
    assert answers == ["wrong user name or password: check both and try again"] * 2


def test_wait_grows_from_one_second_after_five_failures_up_to_fifteen_minutes() -> None:
    assert [wait_after(n) for n in range(1, 5)] == [None] * 4
    assert [wait_after(n) for n in (5, 6, 7, 14)] == [timedelta(seconds=s) for s in (1, 2, 4, 512)]
    assert wait_after(15) == wait_after(400) == MAX_WAIT


@pytest.mark.parametrize("name", ["olive", "nobody"])
def test_failures_in_a_row_slow_the_name_down_until_the_right_password(
    users: Users, sessions: Sessions, name: str
) -> None:
    users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    now = T0
    for _ in range(FREE_FAILURES):
        with pytest.raises(LoginRefused) as refused:
            users.authenticate(name, "a wrong guess", now)
    assert f"after {FREE_FAILURES} failed logins in a row" in str(refused.value)
    assert "is taken from 12:00:01 UTC" in str(refused.value)

    # Within the wait every try is refused, the right password too, and none counts.
    for offset in (0, 0.5, 0.999):
        with pytest.raises(LoginThrottled) as throttled:
            users.authenticate(name, PASSWORD, now + timedelta(seconds=offset))
        assert throttled.value.retry_at == now + timedelta(seconds=1)
    assert f"too many failed logins in a row for {name!r}: try again after 12:00:01" in str(
        throttled.value
    )
    # After it, a wrong try counts and doubles the wait.
    now += timedelta(seconds=1)
    with pytest.raises(LoginRefused, match="is taken from 12:00:03 UTC"):
        users.authenticate(name, "a wrong guess", now)
    if name == "nobody":
        with pytest.raises(LoginRefused):
            users.authenticate(name, PASSWORD, now + timedelta(seconds=2))
        return
    assert _stored(sessions, "olive").failed_logins == FREE_FAILURES + 1
    # The right password after the wait logs in and forgets the failures.
    assert users.authenticate("olive", PASSWORD, now + timedelta(seconds=2)).actor == "user:olive"
    row = _stored(sessions, "olive")
    assert (row.failed_logins, row.locked_until) == (0, None)
    with pytest.raises(LoginRefused, match=r"check both and try again$"):
        users.authenticate("olive", "a wrong guess", now + timedelta(seconds=3))


def test_the_wait_is_capped_at_fifteen_minutes(users: Users, sessions: Sessions) -> None:
    users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    with sessions.write() as session:
        session.execute(update(ConsoleUser).values(failed_logins=40))
    with pytest.raises(LoginRefused, match="after 41 failed logins in a row"):
        users.authenticate("olive", "a wrong guess", T0)
    assert _stored(sessions, "olive").locked_until == T0 + MAX_WAIT


def test_guesses_in_parallel_get_no_more_tries_than_one_by_one(users: Users) -> None:
    users.add("olive", Role.OPERATOR, PASSWORD, T0, "token:admin")
    outcomes: list[str] = []
    lock = threading.Lock()

    def guess() -> None:
        try:
            users.authenticate("olive", "a wrong guess", T0)
        except (LoginRefused, LoginThrottled) as exc:
            with lock:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["LoginRefused"] * FREE_FAILURES + ["LoginThrottled"] * 7
