"""Status reports applied in batches: each report of a batch counts once (duplicates and
illegal moves ignored, a poison message dead-lettered alone), the event announcing a job's
end is written with the change that ended it, and a report wakes only its job's watchers.
Real SQLite and PostgreSQL, a real broker where deliveries are involved."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import event, func, select

from controller_svc.admins import Admins
from controller_svc.app import PUBLISHED_QUEUES, reports_consumer
from controller_svc.db import JobEvent, OutboxEvent, SeenMessage, make_engine, migrate
from controller_svc.engine import Engine
from controller_svc.events import Announcer
from controller_svc.follow import JobWatches, next_events
from controller_svc.outbox import Outbox, OutboxEntry
from controller_svc.records import JobRecord, ReportIn, ReportOutcome
from controller_svc.repository import Announce, Repository
from controller_svc.signing import Trust
from controller_svc.states import GatewayState, JobState
from hitless.bus import codec, topology
from hitless.bus.amqp import Delivery, Publisher
from hitless.config import BusConfig
from hitless.trust import keys as trust_keys
from hitless.v1 import bus_pb2, common_pb2
from tests.support.wait import wait_for

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TARGET = "2.0.0"


@pytest.fixture
def sql(db_url: str) -> Iterator[SqlEngine]:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def repo(sql: SqlEngine) -> Repository:
    return Repository(sql)


@pytest.fixture
def trust(tmp_path: Path) -> Trust:
    keys = trust_keys.init(tmp_path / "keys")
    return Trust(tmp_path / "tuf", keys.root_json.read_bytes(), keys.online)


def _job(repo: Repository, gateways: int) -> JobRecord:
    repo.add_release(TARGET, "ab" * 32, 100, "", T0)
    targets = [(f"gw-{n}", "1.0.0") for n in range(1, gateways + 1)]
    for gateway_id, version in targets:
        repo.record_gateway_seen(gateway_id, version, T0)
    job, _ = repo.create_job(TARGET, targets, deadline=T0 + timedelta(hours=1), now=T0)
    return job


def _report(
    job: JobRecord, gateway_id: str, state: GatewayState, report_id: str, at: float = 10
) -> ReportIn:
    row = next(g for g in job.gateways if g.gateway_id == gateway_id)
    return ReportIn(
        report_id=report_id,
        job_id=job.id,
        command_id=row.command_id,
        gateway_id=gateway_id,
        state=state,
        from_version="1.0.0",
        to_version=TARGET,
        error="broke" if state is GatewayState.FAILED else "",
        bytes_done=0,
        bytes_total=0,
        at=T0 + timedelta(seconds=at),
    )


def _entry(job: JobRecord) -> OutboxEntry:
    return OutboxEntry(f"job:{job.id}", topology.JOB_FINISHED, job.state.value.encode())


def _count(repo: Repository, model: Any, *where: Any) -> int:
    with repo.sessions.read() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _kinds(outcomes: Sequence[ReportOutcome]) -> list[str]:
    return [
        "applied" if o.applied else "duplicate" if o.duplicate else f"refused: {o.reason}"
        for o in outcomes
    ]


def test_a_mixed_batch_applies_each_report_once_and_finishes_the_job_once(
    repo: Repository,
) -> None:
    job = _job(repo, 3)
    assert repo.apply_report(_report(job, "gw-3", GatewayState.SWAPPING, "early")).applied
    announced: list[JobRecord] = []

    def announce(record: JobRecord) -> OutboxEntry:
        announced.append(record)
        return _entry(record)

    batch = [
        _report(job, "gw-1", GatewayState.DOWNLOADING, "a"),
        _report(job, "gw-1", GatewayState.DOWNLOADING, "a"),  # the same delivery twice
        _report(job, "gw-3", GatewayState.SWAPPING, "early"),  # applied before this batch
        _report(job, "gw-3", GatewayState.DOWNLOADING, "back"),  # SWAPPING -> DOWNLOADING
        _report(job, "gw-1", GatewayState.SUCCEEDED, "b", at=20),
        _report(job, "gw-2", GatewayState.FAILED, "c", at=21),
        _report(job, "gw-3", GatewayState.SUCCEEDED, "d", at=22),  # the last gateway
        _report(job, "gw-3", GatewayState.FAILED, "e", at=23),  # after the end
    ]
    outcomes = repo.apply_reports(batch, announce=announce)

    assert _kinds(outcomes) == [
        "applied",
        "duplicate",
        "duplicate",
        "refused: gateway gw-3 cannot move from SWAPPING to DOWNLOADING",
        "applied",
        "applied",
        "applied",
        "refused: gateway gw-3 cannot move from SUCCEEDED to FAILED",
    ]
    assert [o.job_finished for o in outcomes] == [None] * 6 + [JobState.PARTIAL, None]
    finished = outcomes[6].job
    assert finished is not None and finished.state is JobState.PARTIAL
    assert finished.updated_at == T0 + timedelta(seconds=22)
    assert [a.id for a in announced] == [job.id]
    # The event is in the outbox: written by the transaction that ended the job.
    assert _count(repo, OutboxEvent, OutboxEvent.event_id == f"job:{job.id}") == 1
    # Each applied report is one gateway event; the job moved RUNNING, then PARTIAL.
    assert _count(repo, JobEvent, JobEvent.job_id == job.id, JobEvent.gateway_id.is_not(None)) == (
        3 + 1 + 4
    )
    job_states = [e.job_state for e in repo.events_after(job.id, 0) if e.job_state]
    assert job_states == [JobState.PENDING, JobState.RUNNING, JobState.PARTIAL]
    # Everything seen once is remembered, the refused move included (its redelivery is
    # a duplicate); nothing twice.
    assert _count(repo, SeenMessage) == len({"early", "a", "back", "b", "c", "d", "e"})
    again = repo.apply_reports(batch, announce=announce)
    assert all(o.duplicate for o in again) and len(announced) == 1


def test_a_batch_reads_each_job_once_however_many_reports_it_holds(
    repo: Repository, sql: SqlEngine
) -> None:
    job = _job(repo, 50)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    def reading_rows(reports: list[ReportIn]) -> list[str]:
        statements.clear()
        event.listen(sql, "before_cursor_execute", record)
        try:
            assert all(o.applied for o in repo.apply_reports(reports))
        finally:
            event.remove(sql, "before_cursor_execute", record)
        return [s for s in statements if s.lstrip().upper().startswith("SELECT")]

    ids = iter(range(10_000))
    few = [_report(job, "gw-1", GatewayState.DOWNLOADING, f"r{next(ids)}")]
    many = [
        _report(job, f"gw-{n}", GatewayState.DOWNLOADING, f"r{next(ids)}") for n in range(2, 51)
    ]
    closing = [_report(job, f"gw-{n}", GatewayState.SUCCEEDED, f"r{next(ids)}") for n in (1, 2)]
    assert len(reading_rows(few)) == len(reading_rows(many)) == 3, statements
    # Closing gateways adds one count of the job's states, whatever the batch's size.
    selects = reading_rows(closing)
    assert len(selects) == 4, selects
    assert "count" in selects[-1].lower() and "group by" in selects[-1].lower()


def test_expiring_a_job_writes_its_event_in_the_same_transaction(repo: Repository) -> None:
    job = _job(repo, 2)
    finished = repo.expire_overdue(T0 + timedelta(hours=2), grace=timedelta(0), announce=_entry)
    assert [j.id for j in finished] == [job.id]
    assert _count(repo, OutboxEvent, OutboxEvent.event_id == f"job:{job.id}") == 1


class _Crash(Exception):
    """The controller dies here: nothing after this point of the handler runs."""


class _CrashingAfterCommit(Repository):
    """Commits a batch of reports, then dies before anything else happens."""

    def apply_reports(
        self, reports: Sequence[ReportIn], *, announce: Announce | None = None
    ) -> list[ReportOutcome]:
        super().apply_reports(reports, announce=announce)
        raise _Crash("killed between the commit and the publish")


def _status(job: JobRecord, gateway_id: str, state: int, report_id: str) -> Delivery:
    row = next(g for g in job.gateways if g.gateway_id == gateway_id)
    at = Timestamp()
    at.FromDatetime(T0)
    report = bus_pb2.StatusReport(
        report_id=report_id,
        command_id=row.command_id,
        job_id=job.id,
        gateway_id=gateway_id,
        state=state,  # type: ignore[arg-type]
        from_version="1.0.0",
        to_version=TARGET,
        at=at,
    )
    return Delivery(
        body=codec.encode(report),
        routing_key=topology.report_key(gateway_id, topology.STATUS),
        exchange=topology.REPORTS.name,
        message_id=report_id,
        headers={},
        redelivered=False,
        user_id=None,
    )


def _notifier_events(bus: BusConfig) -> list[dict[str, Any]]:
    connection = pika.BlockingConnection(pika.URLParameters(bus.url))
    try:
        channel = connection.channel()
        found: list[dict[str, Any]] = []
        while True:
            method, _, body = channel.basic_get(topology.NOTIFIER_EVENTS.name, auto_ack=True)
            if method is None:
                return found
            found.append(json.loads(body))
    finally:
        connection.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_crash_between_the_commit_and_the_publish_still_announces_the_job(
    sql: SqlEngine, trust: Trust, bus: BusConfig
) -> None:
    crashing = _CrashingAfterCommit(sql)
    job = _job(crashing, 1)
    Admins(crashing.sessions).add("ops@example.com", T0)
    publisher = Publisher(bus, queues=PUBLISHED_QUEUES, name="test-announce").start()
    assert publisher.wait_connected(15)

    def controller(repo: Repository) -> Engine:
        outbox = Outbox(repo.sessions, settle=timedelta(0))
        announcer = Announcer(publisher, Admins(repo.sessions), outbox)
        return Engine(repo, publisher, announcer, trust, command_deadline=timedelta(hours=1))

    last = _status(job, "gw-1", common_pb2.GATEWAY_JOB_STATE_SUCCEEDED, "last")
    try:
        with pytest.raises(_Crash):
            controller(crashing).on_reports([last])
        assert _notifier_events(bus) == []  # it died before publishing anything
        # The restarted controller: the redelivered report is a duplicate by now ...
        restarted = controller(Repository(sql))
        assert restarted.on_reports([last]) == [None]
        assert _notifier_events(bus) == []
        # ... and the event, committed with the job's end, goes out from the outbox.
        restarted.announcer.flush()
        events = wait_for(
            lambda: _notifier_events(bus), timeout=15, what="job_finished on the events queue"
        )
        assert [e["event_id"] for e in events] == [f"job:{job.id}"]
        assert events[0]["admins"] == ["ops@example.com"]
        assert events[0]["job_finished"]["state"] == "JOB_STATE_SUCCEEDED"
    finally:
        publisher.close()


class _Poisoned(Repository):
    """A database on which any batch holding report ``poison`` fails unexpectedly."""

    batches: list[int]

    def apply_reports(
        self, reports: Sequence[ReportIn], *, announce: Announce | None = None
    ) -> list[ReportOutcome]:
        self.batches.append(len(reports))
        if any(r.report_id == "poison" for r in reports):
            raise RuntimeError("poison report")
        return super().apply_reports(reports, announce=announce)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_poison_report_is_dead_lettered_alone_while_its_batch_applies(
    sql: SqlEngine, trust: Trust, bus: BusConfig
) -> None:
    repo = _Poisoned(sql)
    repo.batches = []
    job = _job(repo, 6)
    publisher = Publisher(bus, queues=PUBLISHED_QUEUES, name="test-reports").start()
    assert publisher.wait_connected(15)
    announcer = Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions))
    engine = Engine(repo, publisher, announcer, trust, command_deadline=timedelta(hours=1))
    downloading = common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
    deliveries = [_status(job, f"gw-{n}", downloading, f"good-{n}") for n in range(1, 6)]
    deliveries.insert(2, _status(job, "gw-6", downloading, "poison"))
    connection = pika.BlockingConnection(pika.URLParameters(bus.url))
    consumer = reports_consumer(bus, engine.on_reports)
    try:
        channel = connection.channel()
        for delivery in [*deliveries, _garbled()]:
            channel.basic_publish(
                topology.REPORTS.name,
                delivery.routing_key,
                delivery.body,
                pika.BasicProperties(message_id=delivery.message_id, delivery_mode=2),
            )
        queue = topology.CONTROLLER_REPORTS.name
        wait_for(
            lambda: channel.queue_declare(queue, passive=True).method.message_count == 7,
            timeout=15,
            what="the seven reports waiting in the reports queue",
        )
        consumer.start()
        dead = wait_for(
            lambda: _dead_letters(channel, 2),
            timeout=30,
            what="the poison and the garbled report dead-lettered",
        )
        reasons = {d[0]: d[1] for d in dead}
        assert reasons.keys() == {"poison", "garbled"}
        assert "failed again on redelivery: RuntimeError: poison report" in reasons["poison"]
        assert "StatusReport" in reasons["garbled"]
        wait_for(lambda: _count(repo, SeenMessage) == 5, timeout=15, what="the five good reports")
        with repo.sessions.read() as session:
            seen = set(session.scalars(select(SeenMessage.message_id)))
        assert seen == {f"good-{n}" for n in range(1, 6)}
        assert max(repo.batches) > 1, f"the reports were never batched: {repo.batches}"
        wait_for(
            lambda: channel.queue_declare(queue, passive=True).method.message_count == 0,
            timeout=15,
            what="the reports queue empty",
        )
    finally:
        consumer.stop()
        connection.close()
        publisher.close()
    # Every delivery was settled: none is back in the queue after the consumer closed.
    connection = pika.BlockingConnection(pika.URLParameters(bus.url))
    try:
        left = connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()
    assert left == 0


def _garbled() -> Delivery:
    return Delivery(
        body=b"{not json",
        routing_key=topology.report_key("gw-1", topology.STATUS),
        exchange=topology.REPORTS.name,
        message_id="garbled",
        headers={},
        redelivered=False,
        user_id=None,
    )


def _dead_letters(channel: Any, count: int) -> list[tuple[str, str]] | None:
    """(message id, reason) of what is in the dead-letter queue, once there are ``count``."""
    found = []
    while True:
        method, properties, _ = channel.basic_get(topology.DEAD_LETTERS.name, auto_ack=False)
        if method is None:
            break
        found.append((properties.message_id, properties.headers["x-hitless-reason"]))
    if found:
        channel.basic_recover(requeue=True)
    return found if len(found) >= count else None


def test_a_change_wakes_only_the_watchers_of_its_job() -> None:
    watches = JobWatches()
    returned: dict[str, threading.Event] = {"a": threading.Event(), "b": threading.Event()}

    def watch(job_id: str) -> None:
        watches.wait(job_id, timeout=60)
        returned[job_id].set()

    threads = [threading.Thread(target=watch, args=(job_id,)) for job_id in returned]
    for thread in threads:
        thread.start()
    wait_for(
        lambda: watches.waiting("a") == watches.waiting("b") == 1,
        timeout=10,
        what="a watcher on each job",
    )
    watches.notify(["b", "unwatched"])
    assert returned["b"].wait(10), "the watcher of job b was not woken"
    assert watches.waiting("a") == 1 and not returned["a"].is_set()
    watches.notify(None)
    assert returned["a"].wait(10), "notify(None) did not wake the watcher of job a"
    for thread in threads:
        thread.join(10)
    assert watches.waiting("a") == watches.waiting("b") == 0


def test_a_watcher_with_nothing_new_reads_the_job_state_alone(
    repo: Repository, sql: SqlEngine
) -> None:
    job = _job(repo, 20)
    last = repo.events_after(job.id, 0)[-1].seq
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(sql, "before_cursor_execute", record)
    try:
        batch = next_events(repo, job.id, last)
    finally:
        event.remove(sql, "before_cursor_execute", record)
    assert batch.events == [] and not batch.finished
    assert statements and not [s for s in statements if "job_gateways" in s], statements


def test_reports_wake_the_watchers_of_their_own_job(repo: Repository, trust: Trust) -> None:
    job = _job(repo, 2)
    # Never started: no job ends here, so nothing is published.
    publisher = Publisher(BusConfig("amqp://guest:guest@127.0.0.1:1/%2F"), name="test-watch")
    announcer = Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions))
    engine = Engine(repo, publisher, announcer, trust, command_deadline=timedelta(hours=1))
    woken = {"mine": threading.Event(), "other": threading.Event()}
    other = str(uuid.uuid4())

    def watch(name: str, job_id: str) -> None:
        engine.wait_for_change(job_id, timeout=60)
        woken[name].set()

    threads = [
        threading.Thread(target=watch, args=("mine", job.id)),
        threading.Thread(target=watch, args=("other", other)),
    ]
    for thread in threads:
        thread.start()
    wait_for(
        lambda: engine._watches.waiting(job.id) == engine._watches.waiting(other) == 1,
        timeout=10,
        what="a watcher on each job",
    )
    downloading = common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
    assert engine.on_reports([_status(job, "gw-1", downloading, "r-1")]) == [None]
    assert woken["mine"].wait(10), "the report did not wake its job's watcher"
    assert not woken["other"].is_set()
    engine.notify()
    for thread in threads:
        thread.join(10)
    assert woken["other"].is_set()
