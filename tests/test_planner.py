"""What an upgrade will do: pure rules, checked without a database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controller_svc.errors import FailedPrecondition, NotFound
from controller_svc.planner import DOWNGRADE, NOTHING, UPGRADE, check, make_plan, upgrade_path
from controller_svc.records import GatewayRecord, ReleaseRecord

NOW = datetime(2026, 11, 27, tzinfo=UTC)


def _release(version: str, vpn: bool = False) -> ReleaseRecord:
    return ReleaseRecord(version, "a" * 64, 1, "notes", NOW, restarts_vpn_service=vpn)


def _gateways(**versions: str) -> dict[str, GatewayRecord]:
    return {
        gid.replace("_", "-"): GatewayRecord(
            gid.replace("_", "-"), v, NOW, NOW, busy=False, vpn_sessions=3
        )
        for gid, v in versions.items()
    }


def test_actions_follow_semantic_version_order() -> None:
    plan = make_plan(_release("1.10.0"), _gateways(gw_1="1.9.0", gw_2="1.10.0", gw_3="2.0.0"), [])
    assert [(g.gateway_id, g.action) for g in plan.gateways] == [
        ("gw-1", UPGRADE),
        ("gw-2", NOTHING),
        ("gw-3", DOWNGRADE),
    ]
    assert [g.gateway_id for g in plan.changes] == ["gw-1", "gw-3"]


def test_unknown_gateway_lists_the_known_ones() -> None:
    with pytest.raises(NotFound, match="unknown gateway\\(s\\): gw-9; known: gw-1"):
        make_plan(_release("1.1.0"), _gateways(gw_1="1.0.0"), ["gw-9"])


def test_no_gateways_known() -> None:
    with pytest.raises(FailedPrecondition, match=r"no gateways are known yet: .* once enrolled"):
        make_plan(_release("1.1.0"), {}, [])


def test_same_version_is_nothing_to_do() -> None:
    plan = make_plan(_release("1.1.0"), _gateways(gw_1="1.1.0"), [])
    with pytest.raises(FailedPrecondition, match="nothing to do: every chosen gateway already"):
        check(plan, allow_downgrade=True, accept_vpn_disruption=True)


def test_downgrade_needs_consent() -> None:
    plan = make_plan(_release("1.0.0"), _gateways(gw_1="1.1.0"), [])
    with pytest.raises(FailedPrecondition, match=r"gw-1 \(1.1.0\).*--allow-downgrade"):
        check(plan, allow_downgrade=False, accept_vpn_disruption=False)
    check(plan, allow_downgrade=True, accept_vpn_disruption=False)


def test_vpn_release_needs_consent_and_counts_the_users() -> None:
    plan = make_plan(_release("2.0.0", vpn=True), _gateways(gw_1="1.0.0", gw_2="2.0.0"), [])
    assert plan.vpn_sessions_affected == 3  # gw-2 does not change, its users stay
    with pytest.raises(FailedPrecondition, match="disconnecting 3 connected VPN user"):
        check(plan, allow_downgrade=False, accept_vpn_disruption=False)
    check(plan, allow_downgrade=False, accept_vpn_disruption=True)
    assert make_plan(_release("2.0.0"), _gateways(gw_1="1.0.0"), []).vpn_sessions_affected == 0


@pytest.mark.parametrize(
    ("running", "pending", "target", "action"),
    [
        ("1.2.0", "7.2.0", "1.3.0", DOWNGRADE),  # queued behind a newer job
        ("1.2.0", "1.3.0", "1.3.0", UPGRADE),  # the same again: the first may still fail
        ("1.3.0", "1.2.0", "1.3.0", UPGRADE),  # back up after an allowed downgrade
        ("1.3.0", "1.3.0", "1.3.0", NOTHING),
        ("1.3.0", "1.4.0", "1.3.0", DOWNGRADE),
    ],
)
def test_a_gateway_in_an_unfinished_job_is_judged_by_where_that_job_takes_it(
    running: str, pending: str, target: str, action: str
) -> None:
    gateway = GatewayRecord("gw-2", running, NOW, NOW, busy=True, pending_version=pending)
    (planned,) = make_plan(_release(target), {"gw-2": gateway}, []).gateways
    assert (planned.action, planned.pending_version) == (action, pending)


def test_a_refused_downgrade_names_the_version_an_unfinished_job_brings() -> None:
    gateway = GatewayRecord("gw-2", "1.2.0", NOW, NOW, busy=True, pending_version="7.2.0")
    plan = make_plan(_release("1.3.0"), {"gw-2": gateway}, [])
    with pytest.raises(FailedPrecondition, match=r"gw-2 \(1.2.0, 7.2.0 once its unfinished job"):
        check(plan, allow_downgrade=False, accept_vpn_disruption=False)


# Upgrade paths through intermediate releases ------------------------------------------


def _from(version: str, min_from: str | None = None) -> ReleaseRecord:
    return ReleaseRecord(version, "a" * 64, 1, "", NOW, min_from=min_from)


RELEASES = [
    _from("1.1.0"),
    _from("1.2.0", min_from="1.1.0"),
    _from("1.3.0", min_from="1.1.0"),
    _from("2.0.0", min_from="1.3.0"),
    _from("2.1.0", min_from="1.3.0"),
    _from("3.0.0", min_from="2.1.0"),
]


@pytest.mark.parametrize(
    ("start", "target", "path"),
    [
        ("1.3.0", "2.0.0", ("2.0.0",)),  # at min_from: straight there
        ("1.4.7", "2.0.0", ("2.0.0",)),  # above it, though no release: straight there
        ("1.1.0", "2.0.0", ("1.3.0", "2.0.0")),  # the newest release reachable, not 1.2.0
        ("1.0.0", "2.0.0", ("1.1.0", "1.3.0", "2.0.0")),
        ("1.0.0", "3.0.0", ("1.1.0", "1.3.0", "2.1.0", "3.0.0")),  # 2.0.0 is not needed
        ("1.0.0", "1.2.0", ("1.1.0", "1.2.0")),
        ("2.0.0", "3.0.0", ("2.1.0", "3.0.0")),
        ("0.9.0", "1.1.0", ("1.1.0",)),  # no min_from: from anything
    ],
)
def test_a_path_takes_the_newest_release_each_hop_can_reach(
    start: str, target: str, path: tuple[str, ...]
) -> None:
    release = next(r for r in RELEASES if r.version == target)
    assert upgrade_path(start, release, RELEASES) == path


def test_no_release_leading_on_is_refused_with_what_is_missing() -> None:
    target = _from("2.0.0", min_from="1.5.0")
    with pytest.raises(FailedPrecondition) as refused:
        upgrade_path("1.0.0", target, [_from("1.2.0"), _from("1.4.0", min_from="1.2.0"), target])
    said = str(refused.value)
    assert "no upgrade path for the gateway from 1.0.0 to 2.0.0" in said
    assert "2.0.0 upgrades only from 1.5.0 on" in said
    assert "(reached through 1.2.0, 1.4.0)" in said
    assert "publish one that does" in said


def test_a_plan_carries_each_gateways_path_and_direct_ones_carry_none() -> None:
    target = next(r for r in RELEASES if r.version == "2.0.0")
    known = _gateways(gw_old="1.0.0", gw_new="1.3.0", gw_same="2.0.0", gw_newer="2.1.0")
    plan = make_plan(target, known, [], RELEASES)
    paths = {g.gateway_id: g.path for g in plan.gateways}
    assert paths == {
        "gw-old": ("1.1.0", "1.3.0", "2.0.0"),
        "gw-new": (),
        "gw-same": (),
        "gw-newer": (),  # a downgrade goes straight back
    }


def test_a_gateway_no_path_reaches_is_left_out_and_a_plan_of_only_those_is_refused() -> None:
    target = _from("2.0.0", min_from="1.3.0")
    known = _gateways(gw_1="1.0.0", gw_2="1.3.0")
    plan = make_plan(target, known, [], [target])
    blocked = {g.gateway_id: g.blocked for g in plan.gateways}
    assert blocked["gw-2"] == ""
    assert blocked["gw-1"].startswith("no upgrade path for gw-1 from 1.0.0 to 2.0.0")
    check(plan, allow_downgrade=False, accept_vpn_disruption=False)
    alone = make_plan(target, known, ["gw-1"], [target])
    with pytest.raises(FailedPrecondition, match=r"no upgrade path for gw-1 from 1\.0\.0 to 2"):
        check(alone, allow_downgrade=False, accept_vpn_disruption=False)
