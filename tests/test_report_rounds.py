"""A batch of reports split into rounds (``controller_svc.report_rounds``): each gateway's
order kept where it changes what is written, and no more rounds than that needs. Domain
logic alone; ``test_report_batches.py`` applies batches to real databases."""

from __future__ import annotations

from datetime import UTC, datetime

from controller_svc.records import ReportIn
from controller_svc.report_rounds import ReportRounds
from controller_svc.repository import GatewaySeen
from controller_svc.states import GatewayState

AT = datetime(2026, 1, 1, tzinfo=UTC)


def _report(gateway_id: str, state: GatewayState) -> ReportIn:
    return ReportIn(
        report_id=f"{gateway_id}-{state.value}",
        job_id="job",
        command_id=f"cmd-{gateway_id}",
        gateway_id=gateway_id,
        state=state,
        from_version="1.0.0",
        to_version="2.0.0",
        error="",
        bytes_done=0,
        bytes_total=0,
        at=AT,
    )


def _seen(gateway_id: str, version: str) -> GatewaySeen:
    return GatewaySeen(gateway_id, version)


def _shape(rounds: ReportRounds) -> list[tuple[list[str], list[str]]]:
    """Each round as (its status reports' ids, its announcements as gateway@version)."""
    return [
        (
            [r.report_id for r in batch.statuses],
            [f"{s.gateway_id}@{s.version}" for s in batch.announcements],
        )
        for batch in rounds
    ]


def test_an_ending_report_waits_for_its_gateways_announcements_before_it() -> None:
    rounds = ReportRounds()
    rounds.add_announcement(_seen("a", "1.0.0"), ["a"])
    rounds.add_status(_report("a", GatewayState.SUCCEEDED), ["a"])
    rounds.add_status(_report("b", GatewayState.SUCCEEDED), ["b"])
    assert _shape(rounds) == [(["b-SUCCEEDED"], ["a@1.0.0"]), (["a-SUCCEEDED"], [])]


def test_an_announcement_comes_after_its_gateways_ending_report() -> None:
    rounds = ReportRounds()
    rounds.add_status(_report("a", GatewayState.SUCCEEDED), ["a"])
    rounds.add_announcement(_seen("a", "2.0.0"), ["a"])
    assert _shape(rounds) == [(["a-SUCCEEDED"], ["a@2.0.0"])]


def test_progress_moves_past_announcements_and_stays_in_order_with_reports() -> None:
    rounds = ReportRounds()
    rounds.add_announcement(_seen("a", "1.0.0"), ["a"])
    rounds.add_status(_report("a", GatewayState.DOWNLOADING), ["a"])
    rounds.add_status(_report("a", GatewayState.VERIFYING), ["a"])
    rounds.add_status(_report("a", GatewayState.SUCCEEDED), ["a"])
    rounds.add_announcement(_seen("a", "2.0.0"), ["a"])
    assert _shape(rounds) == [
        (["a-DOWNLOADING", "a-VERIFYING"], ["a@1.0.0"]),
        (["a-SUCCEEDED"], ["a@2.0.0"]),
    ]


def test_a_fleet_takes_two_rounds_and_one_gateway_alternating_takes_one_each_time() -> None:
    fleet = ReportRounds()
    for n in range(1000):
        gid = f"gw-{n}"
        fleet.add_announcement(_seen(gid, "1.0.0"), [gid])
        fleet.add_status(_report(gid, GatewayState.DOWNLOADING), [gid])
        fleet.add_status(_report(gid, GatewayState.SUCCEEDED), [gid])
        fleet.add_announcement(_seen(gid, "2.0.0"), [gid])
    assert [(len(r.statuses), len(r.announcements)) for r in fleet] == [(1000, 1000), (1000, 1000)]

    alternating = ReportRounds()
    for _ in range(3):
        alternating.add_announcement(_seen("a", "1.0.0"), ["a"])
        alternating.add_status(_report("a", GatewayState.FAILED), ["a"])
    assert [(len(r.statuses), len(r.announcements)) for r in alternating] == [
        (0, 1), (1, 1), (1, 1), (1, 0),
    ]  # fmt: skip


def test_a_message_naming_two_gateways_keeps_the_order_of_both() -> None:
    """A report whose routing key and body name different gateways comes after what
    either of them sent before it."""
    rounds = ReportRounds()
    rounds.add_announcement(_seen("b", "1.0.0"), ["b"])
    rounds.add_status(_report("a", GatewayState.SUCCEEDED), ["a", "b"])
    rounds.add_announcement(_seen("a", "2.0.0"), ["a"])
    assert _shape(rounds) == [([], ["b@1.0.0"]), (["a-SUCCEEDED"], ["a@2.0.0"])]


def test_an_empty_batch_has_no_rounds() -> None:
    assert list(ReportRounds()) == []
