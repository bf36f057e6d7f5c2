"""Upgrade paths: a release that upgrades only from a version on (``min_from``) takes an
older gateway there through the releases in between, one job, each hop its own command.
The engine runs with its real dispatcher on a real broker (a vhost per test) and real
SQLite and PostgreSQL; gateways' reports are handed to it as the reports queue delivers
them. The path with real gateway processes is in tests/test_rollout_fleet.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller_svc.engine import Engine
from controller_svc.errors import FailedPrecondition, InvalidRequest
from controller_svc.records import GatewayJobRecord, JobRecord
from controller_svc.rollout import Rollout, to_start
from controller_svc.states import GatewayState, JobState
from hitless.bus import codec, topology
from hitless.bus.amqp import Delivery
from hitless.digest import file_sha256
from hitless.trust import release
from hitless.v1 import bus_pb2, common_pb2
from tests.support.rabbit import Management
from tests.test_dispatch_lifecycle import VERSION, World

BASE = "1.0.0"  # what World's gateways run; VERSION (1.1.0) upgrades from anything


def _publish(world: World, tmp: Path, version: str, min_from: str | None) -> None:
    """Sign ``version`` into the world's targets and record it with ``min_from``."""
    artifact = tmp / f"release-{version}.pyz"
    artifact.write_bytes(f"release {version}\n".encode())
    current, _ = world.trust.targets()
    world.trust.accept(
        release.sign_targets(
            current or None, tmp / "keys", add={release.target_name(version): artifact}
        )
    )
    sha256, size = file_sha256(artifact)
    world.repo.add_release(version, sha256, size, "", world.clock(), min_from=min_from)


def _row(job: JobRecord, gateway_id: str) -> GatewayJobRecord:
    return next(g for g in job.gateways if g.gateway_id == gateway_id)


def _report(
    engine: Engine, job: JobRecord, gateway_id: str, state: GatewayState, command_id: str = ""
) -> BaseException | None:
    """Hand the engine the gateway's report of ``state`` for its current command (or
    ``command_id``), as the reports queue would; what the engine made of it."""
    row = _row(job, gateway_id)
    message = bus_pb2.StatusReport(
        report_id=str(uuid.uuid4()),
        command_id=command_id or row.command_id,
        job_id=job.id,
        gateway_id=gateway_id,
        state=common_pb2.GatewayJobState.Value(f"GATEWAY_JOB_STATE_{state.value}"),  # type: ignore[arg-type]
        from_version=row.from_version,
        to_version=row.to_version,
    )
    message.at.FromDatetime(datetime.now(UTC))
    (outcome,) = engine.on_reports(
        [
            Delivery(
                body=codec.encode(message),
                routing_key=topology.report_key(gateway_id, topology.STATUS),
                exchange=topology.REPORTS.name,
                message_id=message.report_id,
                headers={},
                redelivered=False,
                user_id=None,
            )
        ]
    )
    return outcome


def _settled(world: World, engine: Engine, job_id: str) -> JobRecord:
    assert engine.wait_dispatched(30), "the dispatcher never went idle"
    return world.job(job_id)


def _sent(rabbit: Management, vhost: str, gateway_id: str) -> list[tuple[str, str]]:
    """(command id, target version) of each command waiting in the gateway's queue."""
    queue = topology.gateway_queue(gateway_id).name
    out = []
    for message in rabbit.get_messages(vhost, queue):
        command = codec.decode(bus_pb2.UpgradeCommand, message["payload"].encode())
        out.append((command.command_id, command.target_version))
    return out


def test_an_older_gateway_goes_through_each_hop_one_command_at_a_time(
    world: World, rabbit: Management, vhost: str, tmp_path: Path
) -> None:
    _publish(world, tmp_path, "1.2.0", min_from="1.1.0")
    _publish(world, tmp_path, "2.0.0", min_from="1.2.0")
    old, ready = world.gateways(2)
    world.repo.record_gateway_seen(ready, "1.2.0", world.clock())
    engine = world.controller()

    plan = engine.plan("2.0.0")
    assert {g.gateway_id: g.path for g in plan.gateways} == {
        old: (VERSION, "1.2.0", "2.0.0"),
        ready: (),
    }
    job = _settled(world, engine, engine.start_upgrade(version="2.0.0").id)
    first = _row(job, old)
    assert (first.path, first.hop, first.to_version) == ((VERSION, "1.2.0", "2.0.0"), 0, VERSION)
    assert _sent(rabbit, vhost, old) == [(first.command_id, VERSION)]
    assert _sent(rabbit, vhost, ready) == [(_row(job, ready).command_id, "2.0.0")]

    assert _report(engine, job, ready, GatewayState.SUCCEEDED) is None
    assert _report(engine, job, old, GatewayState.SUCCEEDED) is None
    job = _settled(world, engine, job.id)
    second = _row(job, old)
    # The hop done is recorded (the gateway runs it); the next is a new command.
    assert (second.state, second.hop, second.from_version, second.to_version) == (
        GatewayState.QUEUED, 1, VERSION, "1.2.0",
    )  # fmt: skip
    assert second.command_id != first.command_id and second.published
    assert world.repo.get_gateway(old).version == VERSION  # type: ignore[union-attr]
    assert _sent(rabbit, vhost, old)[-1] == (second.command_id, "1.2.0")
    assert job.state is JobState.RUNNING

    # A late report of the first hop's command moves nothing.
    assert _report(engine, job, old, GatewayState.FAILED, command_id=first.command_id) is None
    assert _row(world.job(job.id), old).state is GatewayState.QUEUED

    assert _report(engine, job, old, GatewayState.SUCCEEDED) is None
    job = _settled(world, engine, job.id)
    third = _row(job, old)
    assert (third.hop, third.to_version) == (2, "2.0.0")
    assert _sent(rabbit, vhost, old)[-1] == (third.command_id, "2.0.0")
    assert _report(engine, job, old, GatewayState.SUCCEEDED) is None

    job = world.job(job.id)
    assert job.state is JobState.SUCCEEDED
    assert _row(job, old).state is GatewayState.SUCCEEDED
    assert world.repo.get_gateway(old).version == "2.0.0"  # type: ignore[union-attr]
    events = world.repo.events_after(job.id, 0)
    hops = [e.gateway_state for e in events if e.gateway_id == old]
    assert hops.count(GatewayState.SUCCEEDED) == 3 and hops[-1] is GatewayState.SUCCEEDED


def test_a_gateway_midway_starts_before_one_not_started() -> None:
    now = datetime.now(UTC)

    def row(gateway_id: str, hop: int) -> GatewayJobRecord:
        path = (VERSION, "1.2.0")
        return GatewayJobRecord(
            gateway_id, f"cmd-{gateway_id}", GatewayState.QUEUED, BASE, path[hop], "", 0, 0,
            now, path=path, hop=hop,
        )  # fmt: skip

    job = JobRecord(
        "job", JobState.RUNNING, "1.2.0", "cli", None, now, now, now,
        (row("gw-a", 0), row("gw-b", 1)), max_parallel=1, current_wave=0,
    )  # fmt: skip
    assert [g.gateway_id for g in to_start(job, now)] == ["gw-b"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_next_hop_keeps_within_the_cap(world: World, tmp_path: Path) -> None:
    _publish(world, tmp_path, "1.2.0", min_from="1.1.0")
    ids = world.gateways(3)
    engine = world.controller()
    job = engine.start_upgrade(version="1.2.0", rollout=Rollout(max_parallel=1))
    job = _settled(world, engine, job.id)
    assert [g.gateway_id for g in job.gateways if g.published] == ids[:1]
    assert _report(engine, job, ids[0], GatewayState.SUCCEEDED) is None
    job = _settled(world, engine, job.id)
    # Its next hop takes the one place in flight before another gateway starts.
    assert [g.gateway_id for g in job.gateways if g.published] == ids[:1]
    assert _row(job, ids[0]).hop == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancelling_midway_says_where_the_gateway_stays(world: World, tmp_path: Path) -> None:
    _publish(world, tmp_path, "1.2.0", min_from="1.1.0")
    (gateway,) = world.gateways(1)
    engine = world.controller()
    job = _settled(world, engine, engine.start_upgrade(version="1.2.0").id)
    # Paused after its first hop: its next command is not sent.
    engine.pause_job(job.id, "alice")
    assert _report(engine, job, gateway, GatewayState.SUCCEEDED) is None
    job = _settled(world, engine, job.id)
    assert not _row(job, gateway).published
    job = engine.cancel_job(job.id, "alice", "release notes changed")
    row = _row(job, gateway)
    assert job.state is JobState.CANCELLED
    assert row.state is GatewayState.CANCELLED
    assert row.error == (
        "cancelled by alice: release notes changed (it stays on 1.1.0: hop 2 of 2 not started)"
    )
    assert world.repo.get_gateway(gateway).version == VERSION  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_no_path_starts_nothing_and_says_what_to_publish(world: World, tmp_path: Path) -> None:
    _publish(world, tmp_path, "2.0.0", min_from="1.5.0")
    world.gateways(1)
    engine = world.controller()
    with pytest.raises(FailedPrecondition, match=r"no upgrade path for gw-0000 from 1\.0\.0"):
        engine.start_upgrade(version="2.0.0")
    assert world.repo.list_jobs() == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_yanked_release_is_no_hop(world: World, tmp_path: Path) -> None:
    """Only signed releases make a path: with 1.1.0 yanked, 1.0.0 cannot reach 1.2.0."""
    _publish(world, tmp_path, "1.2.0", min_from="1.1.0")
    current, _ = world.trust.targets()
    world.trust.accept(
        release.sign_targets(current, tmp_path / "keys", remove=[release.target_name(VERSION)])
    )
    (gateway,) = world.gateways(1)
    engine = world.controller()
    (planned,) = engine.plan("1.2.0").gateways
    assert planned.blocked.startswith(f"no upgrade path for {gateway} from 1.0.0 to 1.2.0")
    with pytest.raises(FailedPrecondition, match="no upgrade path"):
        engine.start_upgrade(version="1.2.0")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_min_from_must_be_below_the_release(world: World) -> None:
    with pytest.raises(InvalidRequest, match="--min-from must name a version below"):
        world.repo.add_release("3.0.0", "b" * 64, 1, "", world.clock(), min_from="3.0.0")
    with pytest.raises(InvalidRequest):
        world.repo.add_release("3.0.0", "b" * 64, 1, "", world.clock(), min_from="three")
    assert world.repo.get_release("3.0.0") is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_gateway_no_path_reaches_is_left_out_skipped_with_why(
    world: World, tmp_path: Path
) -> None:
    _publish(world, tmp_path, "2.0.0", min_from="1.5.0")
    stuck, ready = world.gateways(2)
    world.repo.record_gateway_seen(ready, "1.5.0", world.clock())
    engine = world.controller()
    job = _settled(world, engine, engine.start_upgrade(version="2.0.0").id)
    left, going = _row(job, stuck), _row(job, ready)
    assert left.state is GatewayState.SKIPPED and not left.published
    assert left.error.startswith(f"no upgrade path for {stuck} from {BASE} to 2.0.0: ")
    assert going.state is GatewayState.QUEUED and going.published


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_plan_says_which_gateways_are_offline(world: World) -> None:
    """A gateway not heard from for three heartbeat intervals is OFFLINE in the plan, so
    the operator learns before starting that its command will wait for it."""
    away, back = world.gateways(2)
    world.clock.ahead = timedelta(hours=1)
    world.repo.record_gateway_seen(back, "1.0.0", world.clock())
    plan = world.controller().plan(VERSION)
    assert {g.gateway_id: g.state for g in plan.gateways} == {away: "OFFLINE", back: "ONLINE"}
    assert plan.controller_from is None  # this engine does not upgrade its controller
