"""Rollouts an operator steers: waves, a cap on gateways in flight, a failure limit that
aborts the job, pause, resume and cancel. The rules are unit-tested on plain values; the
engine is tested with a real broker (a vhost per test), real SQLite and PostgreSQL and its
real dispatcher thread, gateways' reports handed to it as the reports queue delivers them.
"""

from __future__ import annotations

import base64
import re
import urllib.error
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from controller_svc import rollout
from controller_svc.db import OutboxEvent
from controller_svc.engine import Engine
from controller_svc.errors import FailedPrecondition, InvalidRequest
from controller_svc.records import GatewayJobRecord, JobRecord, ReportIn
from controller_svc.repository import GatewaySeen
from controller_svc.rollout import Rollout
from controller_svc.states import JOB_MOVES, GatewayState, JobState, can_move_job
from controller_svc.transitions import HELD_BACK
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery
from hitless.v1 import bus_pb2, common_pb2
from tests.support.rabbit import Management
from tests.test_dispatch_lifecycle import VERSION, World, _commands

# The rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "total", "sizes"),
    [
        ("", 7, [7]),
        ("100%", 7, [7]),
        ("1,10%,50%,100%", 20, [1, 1, 8, 10]),
        ("1,10%,50%,100%", 3, [1, 1, 1]),  # 10% of 3 rounds up to the canary: dropped
        ("1, 2, 100%", 2, [1, 1]),
        ("5,100%", 3, [3]),  # a count past the job's size reaches all of it
        ("2,4", 4, [2, 2]),
    ],
)
def test_waves_are_cumulative_steps(spec: str, total: int, sizes: list[int]) -> None:
    assert rollout.wave_sizes(spec, total) == sizes
    assert rollout.assign_waves(spec, [f"gw-{n}" for n in range(total)]) == [
        wave for wave, size in enumerate(sizes) for _ in range(size)
    ]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("1,50%", "ends at 2 of the job's 4 gateways: end with 100%"),
        ("50%,1,100%", "must not go down"),
        ("0,100%", "starts no gateway"),
        ("1,ten,100%", "neither a count nor a percentage"),
        ("150%", "not a percentage from 1% to 100%"),
        ("-1,100%", "neither a count nor a percentage"),
        (",".join(["100%"] * 21), "more than 20"),
    ],
)
def test_a_wave_spec_that_cannot_work_says_why(spec: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)):
        rollout.wave_sizes(spec, 4)


@pytest.mark.parametrize(
    ("spec", "total", "limit"),
    [("", 10, None), ("0", 10, 0), ("3", 10, 3), ("10%", 25, 2), ("100%", 7, 7), ("9%", 10, 0)],
)
def test_the_failure_limit_is_a_count_or_a_percentage_rounded_down(
    spec: str, total: int, limit: int | None
) -> None:
    assert rollout.failure_limit(spec, total) == limit


def test_a_failure_limit_that_is_no_number_is_refused() -> None:
    for spec in ("few", "-1", "101%", "1.5"):
        with pytest.raises(InvalidRequest, match="--max-failures"):
            rollout.failure_limit(spec, 10)
    with pytest.raises(InvalidRequest, match="--max-parallel -1 is negative"):
        rollout.check(Rollout(max_parallel=-1), 3)


def test_aborting_passes_the_limit_not_reaches_it() -> None:
    assert rollout.past_limit("1", 1, 10) is None
    reason = rollout.past_limit("1", 2, 10)
    assert reason is not None and "more than --max-failures 1 allows (1)" in reason
    assert rollout.past_limit("", 10, 10) is None


def _row(gid: str, wave: int, state: GatewayState, published: bool) -> GatewayJobRecord:
    now = datetime.now(UTC)
    return GatewayJobRecord(
        gid, f"cmd-{gid}", state, "1.0.0", VERSION, "", 0, 0, now, published=published, wave=wave
    )


def _job(
    rows: list[GatewayJobRecord], *, state: JobState = JobState.RUNNING, **kw: object
) -> JobRecord:
    now = datetime.now(UTC)
    current = min((r.wave for r in rows if not r.state.terminal), default=None)
    return JobRecord(
        "job", state, VERSION, "cli", None, now, now, now, tuple(rows),
        current_wave=current, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


NOW = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


def test_only_the_current_wave_starts_and_within_the_cap() -> None:
    q, ok = GatewayState.QUEUED, GatewayState.SUCCEEDED
    rows = [
        _row("a", 0, ok, True),
        _row("b", 1, GatewayState.DOWNLOADING, True),
        _row("c", 1, q, False),
        _row("d", 1, q, False),
        _row("e", 2, q, False),
    ]
    assert [g.gateway_id for g in rollout.to_start(_job(rows), NOW)] == ["c", "d"]
    assert [g.gateway_id for g in rollout.to_start(_job(rows, max_parallel=2), NOW)] == ["c"]
    assert rollout.to_start(_job(rows, max_parallel=1), NOW) == []
    assert rollout.to_start(_job(rows, state=JobState.PAUSED), NOW) == []
    assert rollout.to_start(_job(rows, ending=JobState.CANCELLED), NOW) == []
    assert rollout.to_start(_job(rows, not_before=NOW + timedelta(seconds=1)), NOW) == []
    assert rollout.to_start(_job(rows, window="Sat 02:00-04:00 UTC"), NOW) == []


def test_the_job_table_has_the_rollout_moves() -> None:
    assert can_move_job(JobState.RUNNING, JobState.PAUSED)
    assert can_move_job(JobState.PAUSED, JobState.RUNNING)
    assert can_move_job(JobState.PAUSED, JobState.CANCELLED)
    assert can_move_job(JobState.RUNNING, JobState.ABORTED)
    assert not can_move_job(JobState.ABORTED, JobState.RUNNING)
    assert not can_move_job(JobState.CANCELLED, JobState.PAUSED)
    assert not JOB_MOVES[JobState.ABORTED] and JobState.ABORTED.terminal
    assert GatewayState.SKIPPED.terminal and GatewayState.CANCELLED.terminal


# The engine, on a real broker and database ---------------------------------------------


def _report(
    engine: Engine,
    job: JobRecord,
    gateway_id: str,
    state: GatewayState,
    error: str = "",
    health: str = "",
) -> None:
    """Hand the engine ``gateway_id``'s report of ``state``, as the reports queue would;
    the engine takes it."""
    outcome = _deliver(engine, job, gateway_id, state, error, health)
    assert outcome is None, outcome


def _deliver(
    engine: Engine,
    job: JobRecord,
    gateway_id: str,
    state: GatewayState,
    error: str = "",
    health: str = "",
) -> BaseException | None:
    """What the engine makes of ``gateway_id``'s report of ``state``."""
    row = next(g for g in job.gateways if g.gateway_id == gateway_id)
    message = bus_pb2.StatusReport(
        report_id=str(uuid.uuid4()),
        command_id=row.command_id,
        job_id=job.id,
        gateway_id=gateway_id,
        state=common_pb2.GatewayJobState.Value(f"GATEWAY_JOB_STATE_{state.value}"),  # type: ignore[arg-type]
        from_version="1.0.0",
        to_version=VERSION,
        error=error,
        health=health,
    )
    message.at.FromDatetime(datetime.now(UTC))
    delivery = Delivery(
        body=codec.encode(message),
        routing_key=topology.report_key(gateway_id, topology.STATUS),
        exchange=topology.REPORTS.name,
        message_id=message.report_id,
        headers={},
        redelivered=False,
        user_id=None,
    )
    (outcome,) = engine.on_reports([delivery])
    return outcome


def _settled(world: World, engine: Engine, job_id: str) -> JobRecord:
    """The job once the dispatcher has nothing left in hand (it has sent what may start)."""
    assert engine.wait_dispatched(30), "the dispatcher never went idle"
    return world.job(job_id)


def _waiting(rabbit: Management, vhost: str, gateway_id: str) -> list[str]:
    """The command ids in the gateway's queue; none when the queue was never declared."""
    try:
        return _commands(rabbit, vhost, gateway_id)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


def _published(job: JobRecord) -> list[str]:
    return [g.gateway_id for g in job.gateways if g.published]


def _states(job: JobRecord) -> dict[str, str]:
    return {g.gateway_id: g.state.value for g in job.gateways}


def test_waves_start_one_after_another(world: World, rabbit: Management, vhost: str) -> None:
    ids = world.gateways(4)
    engine = world.controller()
    job = engine.start_upgrade(version=VERSION, rollout=Rollout(waves="1,50%,100%"))
    assert [g.wave for g in job.gateways] == [0, 1, 2, 2]
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:1] and job.state is JobState.RUNNING
    assert _waiting(rabbit, vhost, ids[1]) == []
    _report(engine, job, ids[0], GatewayState.DOWNLOADING)
    assert _published(_settled(world, engine, job.id)) == ids[:1]
    _report(engine, job, ids[0], GatewayState.SUCCEEDED)
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:2] and job.current_wave == 1
    _report(engine, job, ids[1], GatewayState.SUCCEEDED)
    job = _settled(world, engine, job.id)
    assert _published(job) == ids
    row = next(g for g in job.gateways if g.gateway_id == ids[3])
    assert _commands(rabbit, vhost, ids[3]) == [row.command_id]
    for gid in ids[2:]:
        _report(engine, job, gid, GatewayState.SUCCEEDED)
    assert world.job(job.id).state is JobState.SUCCEEDED


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cap_keeps_at_most_n_in_flight(world: World) -> None:
    ids = world.gateways(5)
    engine = world.controller()
    job = _settled(
        world, engine, engine.start_upgrade(version=VERSION, rollout=Rollout(max_parallel=2)).id
    )
    assert _published(job) == ids[:2]
    _report(engine, job, ids[1], GatewayState.FAILED, "disk full")
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:3]
    _report(engine, job, ids[0], GatewayState.SUCCEEDED)
    _report(engine, job, ids[2], GatewayState.SUCCEEDED)
    job = _settled(world, engine, job.id)
    assert _published(job) == ids
    for gid in ids[3:]:
        _report(engine, job, gid, GatewayState.SUCCEEDED)
    assert world.job(job.id).state is JobState.PARTIAL


def test_a_failing_canary_aborts_the_job_before_the_next_wave(
    world: World, rabbit: Management, vhost: str
) -> None:
    ids = world.gateways(3)
    engine = world.controller()
    job = engine.start_upgrade(version=VERSION, rollout=Rollout(waves="1,100%", max_failures="0"))
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:1]
    _report(engine, job, ids[0], GatewayState.ROLLED_BACK, "self-check failed: port 8443 closed")
    job = _settled(world, engine, job.id)
    assert job.state is JobState.ABORTED
    assert _states(job) == {ids[0]: "ROLLED_BACK", ids[1]: "SKIPPED", ids[2]: "SKIPPED"}
    assert _published(job) == ids[:1]
    assert _waiting(rabbit, vhost, ids[1]) == [] and _waiting(rabbit, vhost, ids[2]) == []
    assert "more than --max-failures 0 allows (0): stopped in wave 1 of 2" in job.stop_reason
    assert "self-check failed: port 8443 closed" in job.stop_reason
    # The "job finished" event, written with the change, says why.
    with world.repo.sessions.read() as session:
        bodies = [bytes(row.body).decode() for row in session.query(OutboxEvent).all()]
    assert any("ABORTED" in body and "stopped in wave 1 of 2" in body for body in bodies), bodies


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_paused_job_starts_nothing_until_resumed(world: World) -> None:
    ids = world.gateways(3)
    engine = world.controller()
    job = _settled(
        world, engine, engine.start_upgrade(version=VERSION, rollout=Rollout(max_parallel=1)).id
    )
    assert _published(job) == ids[:1]
    paused = engine.pause_job(job.id, "alice")
    assert paused.state is JobState.PAUSED and paused.stop_reason == "paused by alice"
    assert engine.pause_job(job.id, "alice").state is JobState.PAUSED  # twice: no change
    _report(engine, job, ids[0], GatewayState.SUCCEEDED)
    engine.sweep()
    job = _settled(world, engine, job.id)
    assert job.state is JobState.PAUSED and _published(job) == ids[:1]
    resumed = engine.resume_job(job.id, "alice")
    assert resumed.state is JobState.RUNNING and not resumed.stop_reason
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:2]


def test_cancel_withdraws_what_was_not_taken_and_ends_when_in_flight_finish(
    world: World,
) -> None:
    ids = world.gateways(3)
    engine = world.controller()
    job = _settled(
        world, engine, engine.start_upgrade(version=VERSION, rollout=Rollout(max_parallel=2)).id
    )
    _report(engine, job, ids[0], GatewayState.DOWNLOADING)
    cancelled = engine.cancel_job(job.id, "alice", "wrong release")
    # gw 0 is downloading: it finishes. gw 1 was sent its command but never took it, and
    # gw 2 was never sent one: both CANCELLED, and the job waits for gw 0.
    assert cancelled.state is JobState.RUNNING and cancelled.ending is JobState.CANCELLED
    assert _states(cancelled) == {ids[0]: "DOWNLOADING", ids[1]: "CANCELLED", ids[2]: "CANCELLED"}
    assert cancelled.stop_reason == "cancelled by alice: wrong release"
    taken, sent, never = (next(g for g in job.gateways if g.gateway_id == i) for i in ids)
    assert engine.withdrawn(taken.command_id) is None
    assert "CANCELLED" in (engine.withdrawn(sent.command_id) or "")
    assert "wrong release" in (engine.withdrawn(never.command_id) or "")
    with pytest.raises(FailedPrecondition, match="ending CANCELLED"):
        engine.pause_job(job.id, "bob")
    _report(engine, job, ids[0], GatewayState.SUCCEEDED)
    job = _settled(world, engine, job.id)
    assert job.state is JobState.CANCELLED
    assert _published(job) == ids[:2]
    with pytest.raises(FailedPrecondition, match="cannot move from CANCELLED to RUNNING"):
        engine.resume_job(job.id, "bob")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancelling_a_job_with_nothing_in_flight_ends_it_at_once(world: World) -> None:
    ids = world.gateways(2)
    engine = world.controller()
    job = _settled(world, engine, engine.start_upgrade(version=VERSION).id)
    cancelled = engine.cancel_job(job.id, "alice")
    assert cancelled.state is JobState.CANCELLED and cancelled.ending is JobState.CANCELLED
    assert set(_states(cancelled).values()) == {"CANCELLED"}
    # A gateway that took the command anyway is not counted: its report changes nothing.
    (outcome,) = world.repo.apply_reports([_report_in(job, ids[0], GatewayState.DOWNLOADING)])
    assert not outcome.applied and "cannot move from CANCELLED" in outcome.reason


def _report_in(job: JobRecord, gateway_id: str, state: GatewayState) -> ReportIn:
    row = next(g for g in job.gateways if g.gateway_id == gateway_id)
    return ReportIn(
        str(uuid.uuid4()), job.id, row.command_id, gateway_id, state, "1.0.0", VERSION, "", 0, 0,
        datetime.now(UTC),
    )  # fmt: skip


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_new_controller_carries_the_rollout_on(world: World) -> None:
    ids = world.gateways(3)
    first = world.controller()
    job = _settled(
        world, first, first.start_upgrade(version=VERSION, rollout=Rollout(waves="1,100%")).id
    )
    assert _published(job) == ids[:1]
    first.stop()
    second = world.controller()
    _report(second, job, ids[0], GatewayState.SUCCEEDED)
    job = _settled(world, second, job.id)
    assert _published(job) == ids


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_gateways_held_back_at_the_deadline_are_skipped_not_failed(world: World) -> None:
    ids = world.gateways(3)
    engine = world.controller()
    job = _settled(
        world, engine, engine.start_upgrade(version=VERSION, rollout=Rollout(waves="1,100%")).id
    )
    _report(engine, job, ids[0], GatewayState.DOWNLOADING)
    world.clock.ahead = timedelta(minutes=10, seconds=1)
    engine.sweep()
    job = world.job(job.id)
    assert _states(job)[ids[1]] == "SKIPPED" and job.gateways[1].error == HELD_BACK
    assert _states(job)[ids[0]] == "DOWNLOADING"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_rollout_that_does_not_fit_starts_nothing(world: World) -> None:
    world.gateways(2)
    engine = world.controller()
    with pytest.raises(InvalidRequest, match="ends at 1 of the job's 2 gateways"):
        engine.start_upgrade(version=VERSION, rollout=Rollout(waves="1"))
    assert world.repo.latest_job() is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_gateway_cannot_report_a_state_only_the_controller_sets(world: World) -> None:
    ids = world.gateways(1)
    engine = world.controller()
    job = _settled(world, engine, engine.start_upgrade(version=VERSION).id)
    outcome = _deliver(engine, job, ids[0], GatewayState.SKIPPED)
    assert isinstance(outcome, DeadLetter) and "only the controller sets it" in str(outcome)
    assert _states(world.job(job.id)) == {ids[0]: "QUEUED"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_newer_job_supersedes_commands_not_started(world: World) -> None:
    """gw 0 took job A's command, gw 1 did not: job B for both supersedes gw 1's only,
    and job A ends once gw 0 has."""
    ids = world.gateways(2)
    engine = world.controller()
    first = _settled(world, engine, engine.start_upgrade(version=VERSION).id)
    _report(engine, first, ids[0], GatewayState.DOWNLOADING)
    second = engine.start_upgrade(version=VERSION, gateway_ids=ids)
    first = world.job(first.id)
    assert _states(first) == {ids[0]: "DOWNLOADING", ids[1]: "SUPERSEDED"}
    assert first.gateways[1].error == f"superseded by job {second.id} (to {VERSION})"
    assert "SUPERSEDED" in (engine.withdrawn(first.gateways[1].command_id) or "")
    assert engine.withdrawn(first.gateways[0].command_id) is None
    assert _states(second) == {ids[0]: "QUEUED", ids[1]: "QUEUED"}
    _report(engine, first, ids[0], GatewayState.SUCCEEDED)
    assert world.job(first.id).state is JobState.PARTIAL
    # A gateway cannot claim the state for itself.
    outcome = _deliver(engine, second, ids[0], GatewayState.SUPERSEDED)
    assert isinstance(outcome, DeadLetter)


# When gateways may start -----------------------------------------------------------------


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("spec", "now", "opens"),
    [
        # 2026-12-05 is a Saturday.
        ("Sat 02:00-04:00 UTC", "2026-12-04T10:00:00+00:00", "2026-12-05T02:00:00+00:00"),
        ("Sat 02:00-04:00 UTC", "2026-12-05T03:59:00+00:00", "2026-12-05T03:59:00+00:00"),
        ("Sat 02:00-04:00 UTC", "2026-12-05T04:00:00+00:00", "2026-12-12T02:00:00+00:00"),
        # Friday's window crosses midnight into Saturday, in Paris (UTC+1 in December).
        (
            "Mon-Fri 22:00-02:00 Europe/Paris",
            "2026-12-04T23:30:00+00:00",
            "2026-12-04T23:30:00+00:00",
        ),
        (
            "Mon-Fri 22:00-02:00 Europe/Paris",
            "2026-12-05T02:00:00+00:00",
            "2026-12-07T21:00:00+00:00",
        ),
        ("sat,sun 00:00-01:00 UTC", "2026-12-05T01:00:00+00:00", "2026-12-06T00:00:00+00:00"),
        ("daily 12:00-12:30 UTC", "2026-12-01T13:00:00+00:00", "2026-12-02T12:00:00+00:00"),
        ("Fri-Mon 09:00-10:00 UTC", "2026-12-08T09:30:00+00:00", "2026-12-11T09:00:00+00:00"),
    ],
)
def test_a_weekly_window_opens_when_it_says(spec: str, now: str, opens: str) -> None:
    assert rollout.Window.parse(spec).next_open(_at(now)) == _at(opens)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("Sat 2-4 UTC", "is not DAYS HH:MM-HH:MM ZONE"),
        ("Caturday 02:00-04:00 UTC", "is not a day"),
        ("Sat 25:00-26:00 UTC", "is not a time of day"),
        ("Sat 02:00-02:00 UTC", "opens and closes at the same time"),
        ("Sat 02:00-04:00 Mars/Olympus", "time zone 'Mars/Olympus' is not known"),
    ],
)
def test_a_window_that_cannot_be_read_says_why(spec: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)):
        rollout.Window.parse(spec)


def test_starts_at_combines_the_times() -> None:
    now = _at("2026-12-04T10:00:00+00:00")
    later = now + timedelta(hours=1)
    assert rollout.starts_at(Rollout(), now) == now
    assert rollout.starts_at(Rollout(not_before=later), now) == later
    window = Rollout(window="Sat 02:00-04:00 UTC", not_before=later)
    assert rollout.starts_at(window, now) == _at("2026-12-05T02:00:00+00:00")
    closed = Rollout(window="Sat 02:00-04:00 UTC", not_after=now + timedelta(hours=2))
    assert rollout.starts_at(closed, now) is None
    with pytest.raises(InvalidRequest, match="is not after --not-before"):
        rollout.check(Rollout(not_before=later, not_after=now), 1)
    with pytest.raises(InvalidRequest, match="has passed"):
        rollout.check(Rollout(not_after=now), 1, now)
    with pytest.raises(InvalidRequest, match="has no time zone"):
        rollout.check(Rollout(not_before=datetime(2026, 12, 4)), 1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_waits_pending_for_not_before_and_its_deadline_runs_from_then(
    world: World,
) -> None:
    ids = world.gateways(2)
    engine = world.controller()
    opens = world.clock() + timedelta(minutes=5)
    job = engine.start_upgrade(version=VERSION, rollout=Rollout(not_before=opens))
    assert job.deadline == opens + timedelta(minutes=10)
    engine.sweep()
    job = _settled(world, engine, job.id)
    assert job.state is JobState.PENDING and _published(job) == []
    world.clock.ahead = timedelta(minutes=5, seconds=1)
    engine.sweep()
    job = _settled(world, engine, job.id)
    assert job.state is JobState.RUNNING and _published(job) == ids


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_gateways_not_started_by_not_after_are_skipped(world: World) -> None:
    ids = world.gateways(2)
    engine = world.controller()
    closes = world.clock() + timedelta(minutes=1)
    job = engine.start_upgrade(version=VERSION, rollout=Rollout(max_parallel=1, not_after=closes))
    job = _settled(world, engine, job.id)
    assert _published(job) == ids[:1]
    _report(engine, job, ids[0], GatewayState.DOWNLOADING)
    world.clock.ahead = timedelta(minutes=1, seconds=1)
    engine.sweep()
    job = world.job(job.id)
    # gw 0 started before: it goes on. gw 1 never started, and now never will.
    assert _states(job) == {ids[0]: "DOWNLOADING", ids[1]: "SKIPPED"}
    assert "--not-after" in job.gateways[1].error
    _report(engine, job, ids[0], GatewayState.SUCCEEDED)
    assert world.job(job.id).state is JobState.PARTIAL


def test_high_availability_peers_never_share_a_wave() -> None:
    ids = ["a", "b", "c", "d"]
    peers = {"a": "b", "b": "a", "c": "d", "d": "c"}
    # One wave asked for: each pair splits across two.
    assert rollout.assign_waves("", ids, peers) == [0, 1, 0, 1]
    # Waves asked for: a peer landing with its pair moves one wave on.
    assert rollout.assign_waves("2,100%", ids, peers) == [0, 1, 1, 2]
    assert rollout.assign_waves("1,100%", ids, {"b": "a", "a": "b"}) == [0, 1, 1, 1]
    assert rollout.assign_waves("1,100%", ids, {"b": "c", "c": "b"}) == [0, 1, 2, 1]


def test_high_availability_peers_in_two_jobs_are_never_in_flight_together(
    world: World, rabbit: Management, vhost: str
) -> None:
    """Waves keep a pair apart within one job; across jobs, a gateway whose peer is
    upgrading waits for it, and starts once the peer's command ends."""
    first, second, other = world.gateways(3)
    world.repo.record_gateways_seen(
        [GatewaySeen(first, "1.0.0", ha_peer=second)], world.clock()
    )  # only one of the two names the other: still a pair
    engine = world.controller()
    job_a = _settled(world, engine, engine.start_upgrade(version=VERSION, gateway_ids=[first]).id)
    assert _published(job_a) == [first]
    job_b = engine.start_upgrade(version=VERSION, gateway_ids=[second, other])
    job_b = _settled(world, engine, job_b.id)
    assert _published(job_b) == [other]
    assert _waiting(rabbit, vhost, second) == []

    _report(engine, job_a, first, GatewayState.SUCCEEDED)
    job_b = _settled(world, engine, job_b.id)
    assert _published(job_b) == [second, other]
    row = next(g for g in job_b.gateways if g.gateway_id == second)
    assert _commands(rabbit, vhost, second) == [row.command_id]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_gateway_held_for_its_peer_at_the_deadline_says_so(world: World) -> None:
    first, second = world.gateways(2)
    world.repo.record_gateways_seen([GatewaySeen(second, "1.0.0", ha_peer=first)], world.clock())
    engine = world.controller()
    _settled(world, engine, engine.start_upgrade(version=VERSION, gateway_ids=[first]).id)
    job = engine.start_upgrade(version=VERSION, gateway_ids=[second])
    _settled(world, engine, job.id)
    world.clock.ahead = timedelta(minutes=11)
    engine.sweep()
    row = world.job(job.id).gateways[0]
    assert row.state is GatewayState.FAILED
    assert "held back while its high-availability peer gw-0000 was upgrading" in row.error


def _signed_command(rabbit: Management, vhost: str, gateway_id: str) -> bus_pb2.UpgradeCommand:
    """The signed copy of the command waiting in the gateway's queue (left there)."""
    queue = topology.gateway_queue(gateway_id).name
    (message,) = rabbit.get_messages(vhost, queue)
    signed = base64.b64decode(message["properties"]["headers"][topology.SIGNED_COMMAND_HEADER])
    return bus_pb2.UpgradeCommand.FromString(signed)


def test_a_wave_is_promoted_once_its_gateways_passed_their_soak(
    world: World, rabbit: Management, vhost: str
) -> None:
    ids = world.gateways(3)
    engine = world.controller()
    job = engine.start_upgrade(version=VERSION, rollout=Rollout(waves="1,100%", soak_s=30))
    job = _settled(world, engine, job.id)
    assert job.soak_s == 30 and _published(job) == ids[:1]
    signed = _signed_command(rabbit, vhost, ids[0])
    assert signed.soak_seconds == 30
    for state in (GatewayState.SWAPPING, GatewayState.SOAKING):
        _report(engine, job, ids[0], state, health="1/1 tunnels up, 0 dropped of 10, 5 s of 30 s")
    _report(engine, job, ids[0], GatewayState.SOAKING, health="1/1 tunnels up, 0 dropped of 90")
    job = _settled(world, engine, job.id)
    row = next(g for g in job.gateways if g.gateway_id == ids[0])
    assert (row.state, row.health) == (GatewayState.SOAKING, "1/1 tunnels up, 0 dropped of 90")
    assert _published(job) == ids[:1], "the next wave waits for the soak"
    _report(engine, job, ids[0], GatewayState.SUCCEEDED, health="1/1 tunnels up, 30 s of 30 s")
    assert _published(_settled(world, engine, job.id)) == ids


def test_a_soak_out_of_range_starts_nothing(world: World) -> None:
    world.gateways(1)
    engine = world.controller()
    with pytest.raises(InvalidRequest, match=r"--soak 3601s is out of range: give 0 \(no soak\)"):
        engine.start_upgrade(version=VERSION, rollout=Rollout(soak_s=3601))
    assert world.repo.list_jobs() == []
