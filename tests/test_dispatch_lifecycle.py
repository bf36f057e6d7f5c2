"""A job's dispatch: StartUpgrade only records the job, the engine's dispatcher publishes its
commands, and nothing strands a job PENDING. Real broker (a vhost per test), real SQLite
and PostgreSQL, a real engine with its dispatcher thread; only the clock is passed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from controller_svc.admins import Admins
from controller_svc.db import Job, JobGateway, make_engine, migrate
from controller_svc.engine import UNSENT, Engine
from controller_svc.events import Announcer
from controller_svc.outbox import Outbox
from controller_svc.records import JobRecord
from controller_svc.repository import Repository
from controller_svc.signing import Trust
from controller_svc.states import (
    JOB_MOVES,
    GatewayState,
    IllegalJobMove,
    JobState,
    can_move_job,
    check_job_move,
)
from controller_svc.transitions import EXPIRED_QUEUED, set_job_state
from hitless.bus import topology
from hitless.bus.amqp import Publisher
from hitless.bus.amqp.publisher import Confirm
from hitless.config import BusConfig
from hitless.digest import file_sha256
from hitless.errors import BusUnavailable
from hitless.trust import keys as trust_keys
from hitless.trust import release
from tests.support.rabbit import Management
from tests.support.wait import wait_for

VERSION = "1.1.0"


class Clock:
    """The engine's clock: the real time, moved ahead by the test."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.ahead


@dataclass
class Controller:
    """What one controller process holds: its publisher and engine, on a shared database."""

    engine: Engine
    publisher: Publisher

    def close(self) -> None:
        self.engine.stop()
        self.publisher.close()


class World:
    """A database with gateways and a signed release, and the controllers made on it."""

    def __init__(self, db_url: str, tmp: Path, bus: BusConfig) -> None:
        self.db = make_engine(db_url)
        migrate(self.db)
        self.repo = Repository(self.db)
        self.bus = bus
        self.clock = Clock()
        artifact = tmp / "release.pyz"
        artifact.write_bytes(b"release 1.1.0\n")
        sha256, size = file_sha256(artifact)
        keys = trust_keys.init(tmp / "keys")
        self.trust = Trust(tmp / "tuf", keys.root_json.read_bytes(), keys.online)
        self.trust.accept(
            release.sign_targets(None, keys.dir, add={release.target_name(VERSION): artifact})
        )
        self.repo.add_release(VERSION, sha256, size, "", self.clock())
        self.controllers: list[Controller] = []

    def gateways(self, count: int) -> list[str]:
        ids = [f"gw-{n:04d}" for n in range(count)]
        for gateway_id in ids:
            self.repo.record_gateway_seen(gateway_id, "1.0.0", self.clock())
        return ids

    def controller(self, publisher: Publisher | None = None, *, connect: bool = True) -> Engine:
        """A started engine; its publisher started and connected unless ``connect`` is
        False (then it never reaches the broker: "the broker is not connected")."""
        publisher = publisher or Publisher(self.bus, name="test-dispatch", lanes=4)
        if connect:
            publisher.start()
            assert publisher.wait_connected(15), "the publisher never reached the broker"
        engine = Engine(
            self.repo,
            publisher,
            Announcer(publisher, Admins(self.repo.sessions), Outbox(self.repo.sessions)),
            self.trust,
            command_deadline=timedelta(minutes=10),
            clock=self.clock,
        )
        engine.start()
        self.controllers.append(Controller(engine, publisher))
        return engine

    def job(self, job_id: str) -> JobRecord:
        job = self.repo.get_job(job_id)
        assert job is not None, f"job {job_id} vanished"
        return job

    def running(self, job_id: str, timeout: float = 60) -> JobRecord:
        """The job once RUNNING with every command confirmed."""

        def probe() -> JobRecord | None:
            job = self.job(job_id)
            done = job.state is JobState.RUNNING and all(g.published for g in job.gateways)
            return job if done else None

        return wait_for(
            probe, timeout=timeout, what=f"job {job_id} RUNNING with every command published",
            describe=lambda: _summary(self.job(job_id)),
        )  # fmt: skip

    def close(self) -> None:
        for controller in self.controllers:
            controller.close()
        self.db.dispose()


def _summary(job: JobRecord) -> str:
    published = sum(1 for g in job.gateways if g.published)
    return f"{job.state} with {published} of {len(job.gateways)} commands published"


def _commands(rabbit: Management, vhost: str, gateway_id: str) -> list[str]:
    """The command ids waiting in a gateway's queue (left there)."""
    queue = topology.gateway_queue(gateway_id).name
    return [m["properties"]["message_id"] for m in rabbit.get_messages(vhost, queue)]


# The job's state machine -------------------------------------------------------------


def test_the_job_state_table_allows_only_its_moves() -> None:
    for state in JobState:
        assert (not JOB_MOVES[state]) == state.terminal, f"{state}: final iff no moves"
    assert can_move_job(JobState.PENDING, JobState.RUNNING)
    assert can_move_job(JobState.RUNNING, JobState.PARTIAL)
    assert can_move_job(JobState.PENDING, JobState.FAILED)
    for current, new in [
        (JobState.RUNNING, JobState.PENDING),
        (JobState.SUCCEEDED, JobState.RUNNING),
        (JobState.FAILED, JobState.SUCCEEDED),
        (JobState.PENDING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.RUNNING),
    ]:
        with pytest.raises(IllegalJobMove, match=f"cannot move from {current} to {new}"):
            check_job_move("job-1", current, new)


def test_a_finished_job_refuses_to_move_and_keeps_its_state(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    repo = Repository(engine)
    try:
        now = datetime.now(UTC)
        repo.add_release(VERSION, "ab" * 32, 1, "", now)
        repo.record_gateway_seen("gw-1", "1.0.0", now)
        job, _ = repo.create_job(
            VERSION, [("gw-1", "1.0.0")], deadline=now - timedelta(seconds=1), now=now
        )
        (finished,) = repo.expire_overdue(now, grace=timedelta(0))
        assert finished.state is JobState.FAILED
        illegal = pytest.raises(IllegalJobMove, match="cannot move from FAILED to RUNNING")
        with illegal, repo.sessions.write() as session:
            set_job_state(session, session.get_one(Job, job.id), JobState.RUNNING, now)
        assert repo.mark_running(job.id, now).state is JobState.FAILED
        events = [e.job_state for e in repo.events_after(job.id, 0) if e.job_state]
        assert events == [JobState.PENDING, JobState.FAILED]
    finally:
        engine.dispose()


# Starting and dispatching ------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_start_upgrade_replies_before_its_commands_are_sent(
    world: World, rabbit: Management, vhost: str
) -> None:
    """300 gateways (queues only, no gateway processes): the reply is the job PENDING,
    recorded before the first command was confirmed; the dispatcher then sends each
    gateway exactly one command and the job is RUNNING."""
    gateway_ids = world.gateways(300)
    engine = world.controller()
    reply = engine.start_upgrade(version=VERSION, request_id="start-300")
    replied_at = datetime.now(UTC)
    assert reply.state is JobState.PENDING
    assert not any(g.published for g in reply.gateways)
    job = world.running(reply.id)
    with world.repo.sessions.read() as session:
        last_published = session.scalar(
            select(func.max(JobGateway.published_at)).where(JobGateway.job_id == job.id)
        )
    assert last_published is not None and replied_at < last_published, (
        f"the reply came at {replied_at}, the last command was published at {last_published}"
    )
    for gateway_id in (gateway_ids[0], gateway_ids[150], gateway_ids[-1]):
        row = next(g for g in job.gateways if g.gateway_id == gateway_id)
        assert _commands(rabbit, vhost, gateway_id) == [row.command_id]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_queue_deleted_since_it_was_declared_is_declared_again(
    world: World, rabbit: Management, vhost: str
) -> None:
    """The controller declares a gateway's queue once; when someone deletes it, the next
    command comes back unroutable, and the controller declares the queue again and sends
    the command instead of failing the gateway."""
    (gateway_id,) = world.gateways(1)
    engine = world.controller()
    first = world.running(engine.start_upgrade(version=VERSION).id)
    queue = topology.gateway_queue(gateway_id).name
    rabbit.request("DELETE", f"/queues/{vhost}/{queue}")
    now = world.clock()
    again, _ = world.repo.create_job(
        VERSION, [(gateway_id, "1.0.0")], deadline=now + timedelta(minutes=5), now=now
    )
    engine.sweep()
    second = world.running(again.id)
    assert second.id != first.id
    (row,) = second.gateways
    assert row.state is GatewayState.QUEUED and not row.error, row
    assert _commands(rabbit, vhost, gateway_id) == [row.command_id]


class FailsOnce(Publisher):
    """A real publisher whose first message meets a broker that does not answer."""

    failed = False

    def publish_nowait(self, *args: Any, **kwargs: Any) -> Confirm:
        if not self.failed:
            self.failed = True
            raise BusUnavailable("cannot publish: no answer from the broker within 30s")
        return super().publish_nowait(*args, **kwargs)


def test_a_publish_that_fails_once_leaves_the_job_pending_until_the_sweep_sends_it(
    world: World, rabbit: Management, vhost: str
) -> None:
    gateway_ids = world.gateways(3)
    publisher = FailsOnce(world.bus, name="fails-once", lanes=2)
    engine = world.controller(publisher)
    job = engine.start_upgrade(version=VERSION)
    assert engine.wait_dispatched(30), "the dispatcher never finished with the job"
    assert publisher.failed
    stuck = world.job(job.id)
    assert stuck.state is JobState.PENDING
    assert all(g.state is GatewayState.QUEUED for g in stuck.gateways), _summary(stuck)
    engine.sweep()
    done = world.running(job.id)
    for gateway_id in gateway_ids:
        row = next(g for g in done.gateways if g.gateway_id == gateway_id)
        assert row.state is GatewayState.QUEUED and not row.error
        assert _commands(rabbit, vhost, gateway_id) == [row.command_id], "sent exactly once"


def test_the_sweep_sends_a_job_another_controller_left_pending(
    world: World, rabbit: Management, vhost: str
) -> None:
    """The first controller records the job but never reaches the broker, and stops; a
    controller already running (its start-up resume long done) finds the job in the
    database on its next sweep and sends it."""
    (gateway_id,) = world.gateways(1)
    running = world.controller()
    running.resume_pending()
    cut_off = world.controller(connect=False)
    job = cut_off.start_upgrade(version=VERSION)
    world.controllers[-1].close()
    assert world.job(job.id).state is JobState.PENDING
    running.sweep()
    done = world.running(job.id)
    assert _commands(rabbit, vhost, gateway_id) == [done.gateways[0].command_id]


def test_a_retried_request_sends_a_job_left_pending(
    world: World, rabbit: Management, vhost: str
) -> None:
    (gateway_id,) = world.gateways(1)
    cut_off = world.controller(connect=False)
    first = cut_off.start_upgrade(version=VERSION, request_id="retry-me")
    world.controllers[-1].close()
    again = world.controller().start_upgrade(version=VERSION, request_id="retry-me")
    assert again.id == first.id
    done = world.running(first.id)
    assert _commands(rabbit, vhost, gateway_id) == [done.gateways[0].command_id]


# The deadline --------------------------------------------------------------------------


def test_a_command_never_sent_fails_at_the_deadline_with_the_error_that_kept_it(
    world: World,
) -> None:
    """Not UNREACHABLE ("expired before the gateway took it"): it never reached a queue."""
    world.gateways(2)
    engine = world.controller(connect=False)
    job = engine.start_upgrade(version=VERSION, deadline=timedelta(seconds=60))
    assert engine.wait_dispatched(30), "the dispatcher never finished with the job"
    engine.sweep()
    assert world.job(job.id).state is JobState.PENDING
    world.clock.ahead += timedelta(seconds=61)

    def failed() -> JobRecord | None:
        engine.sweep()
        current = world.job(job.id)
        return current if current.state.terminal else None

    finished = wait_for(failed, timeout=15, what="the job to finish at its deadline")
    assert finished.state is JobState.FAILED
    for row in finished.gateways:
        assert row.state is GatewayState.FAILED, row
        assert row.error == f"{UNSENT}: the broker is not connected", row.error
        assert EXPIRED_QUEUED not in row.error
