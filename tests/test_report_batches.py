"""Status reports applied in batches: each report of a batch counts once (duplicates and
illegal moves ignored, a poison message dead-lettered alone), the event announcing a job's
end is written with the change that ended it, and a report wakes only its job's watchers.
Hellos and heartbeats of a batch are recorded together, merged per gateway, in the order
each gateway sent them relative to its status reports. Real SQLite and PostgreSQL, a real
broker where deliveries are involved."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import event, func, select, text

from controller_svc.admins import Admins
from controller_svc.app import PUBLISHED_QUEUES, reports_consumer
from controller_svc.db import Gateway, JobEvent, OutboxEvent, SeenMessage, make_engine, migrate
from controller_svc.engine import Engine
from controller_svc.events import Announcer
from controller_svc.follow import JobWatches, next_events
from controller_svc.outbox import Outbox, OutboxEntry
from controller_svc.records import GatewayRecord, JobRecord, ReportIn, ReportOutcome
from controller_svc.repository import Announce, GatewaySeen, Repository
from controller_svc.signing import Trust
from controller_svc.states import GatewayState, JobState
from hitless.bus import codec, topology
from hitless.bus.amqp import DeadLetter, Delivery, Publisher
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


def test_a_watch_finds_its_job_without_reading_its_gateways(
    repo: Repository, sql: SqlEngine
) -> None:
    """WatchJob needs only the job's id (given, or the latest job's): one row, not the
    job's thousand gateways."""
    first = _job(repo, 20)
    later, _ = repo.create_job(
        TARGET, [("gw-1", "1.0.0")], deadline=T0 + timedelta(hours=2),
        now=T0 + timedelta(seconds=1),
    )  # fmt: skip
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(sql, "before_cursor_execute", record)
    try:
        found = (repo.job_id(first.id), repo.job_id(None), repo.job_id("no-such-job"))
    finally:
        event.remove(sql, "before_cursor_execute", record)
    assert found == (first.id, later.id, None)
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


# Hellos and heartbeats -----------------------------------------------------------------


def _comparable(record: GatewayRecord | None) -> tuple[Any, ...]:
    """A gateway's recorded fields but its id."""
    assert record is not None
    return (
        record.version,
        record.first_seen,
        record.last_seen,
        record.pid,
        record.listen,
        record.vpn_sessions,
        record.heartbeat_interval,
    )


def test_announcements_recorded_together_leave_each_gateway_as_one_by_one_would(
    repo: Repository, sql: SqlEngine
) -> None:
    def hello(gid: str, version: str, pid: int, interval_s: float) -> GatewaySeen:
        return GatewaySeen(
            gid, version, pid=pid, listen=(f"{gid}:8443",),
            heartbeat_interval=timedelta(seconds=interval_s),
        )  # fmt: skip

    def beat(gid: str, version: str, vpn: int) -> GatewaySeen:
        return GatewaySeen(gid, version, vpn_sessions=vpn)

    # Two gateways of each story, "one-" recorded a message at a time, "all-" together.
    stories: dict[str, list[GatewaySeen]] = {
        "known-hello-then-beats": [
            hello("g", "1.0.0", 7, 30),
            beat("g", "1.0.1", 4),
            beat("g", "1.0.2", 5),
        ],
        "new-beat-then-hello": [beat("g", "1.0.0", 9), hello("g", "1.1.0", 8, 0)],
        "new-hello-alone": [hello("g", "2.0.0", 3, 15)],
        "known-beat-alone": [beat("g", "1.0.3", 0)],
        "new-interval-then-none": [hello("g", "1.0.0", 1, 30), hello("g", "1.0.0", 2, 0)],
    }
    at = T0 + timedelta(seconds=5)
    for story in stories:
        if story.startswith("known"):
            repo.record_gateway_seen(f"one-{story}", "0.9.0", T0, pid=1, listen=["old:1"])
            repo.record_gateway_seen(f"all-{story}", "0.9.0", T0, pid=1, listen=["old:1"])
    for story, messages in stories.items():
        for m in messages:
            repo.record_gateway_seen(
                f"one-{story}", m.version, at, pid=m.pid, listen=m.listen,
                vpn_sessions=m.vpn_sessions, heartbeat_interval=m.heartbeat_interval,
            )  # fmt: skip
    batch = [
        GatewaySeen(f"all-{story}", m.version, m.pid, m.listen, m.vpn_sessions,
                    m.heartbeat_interval)
        for story, messages in stories.items()
        for m in messages
    ]  # fmt: skip
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(sql, "before_cursor_execute", record)
    try:
        created = repo.record_gateways_seen(batch, at)
    finally:
        event.remove(sql, "before_cursor_execute", record)
    assert created == {f"all-{s}" for s in stories if s.startswith("new")}
    for story in stories:
        one, together = repo.get_gateway(f"one-{story}"), repo.get_gateway(f"all-{story}")
        assert _comparable(together) == _comparable(one), story
    merged = repo.get_gateway("all-known-hello-then-beats")
    assert merged is not None
    assert (merged.version, merged.pid, merged.listen, merged.vpn_sessions) == (
        "1.0.2",
        7,
        ("g:8443",),
        5,
    ), "a heartbeat after a hello lost what the hello said"
    assert merged.heartbeat_interval == timedelta(seconds=30)
    # One INSERT for all, and one UPDATE per kind of change (hello, heartbeat, both):
    # however many gateways, never one statement each.
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(writes) <= 4, writes
    # A message older than what is recorded changes nothing.
    assert repo.record_gateways_seen([beat("all-new-hello-alone", "0.1.0", 1)], T0) == set()
    assert _comparable(repo.get_gateway("all-new-hello-alone")) == _comparable(
        repo.get_gateway("one-new-hello-alone")
    )


def _announcement(kind: str, message: Any, message_id: str, sender: str = "") -> Delivery:
    return Delivery(
        body=codec.encode(message),
        routing_key=topology.report_key(sender or message.gateway_id, kind),
        exchange=topology.REPORTS.name,
        message_id=message_id,
        headers={},
        redelivered=False,
        user_id=None,
    )


def _hello(gid: str, version: str, pid: int, interval_s: int = 30) -> Delivery:
    hello = bus_pb2.GatewayHello(
        gateway_id=gid, version=version, pid=pid, listen=[f"10.0.0.{pid % 250}:8443"],
        heartbeat_interval=Duration(seconds=interval_s),
    )  # fmt: skip
    return _announcement(topology.HELLO, hello, f"hello-{gid}-{pid}")


def _beat(gid: str, version: str, vpn: int) -> Delivery:
    beat = bus_pb2.GatewayHeartbeat(gateway_id=gid, version=version, vpn_sessions=vpn)
    return _announcement(topology.HEARTBEAT, beat, f"beat-{gid}-{vpn}")


class _Counting(Repository):
    """Notes each transaction of reports (``reports``) or announcements (``seen``), and
    its size."""

    calls: list[tuple[str, int]]

    def apply_reports(
        self, reports: Sequence[ReportIn], *, announce: Announce | None = None
    ) -> list[ReportOutcome]:
        self.calls.append(("reports", len(reports)))
        return super().apply_reports(reports, announce=announce)

    def record_gateways_seen(self, seen: Sequence[GatewaySeen], at: datetime) -> set[str]:
        self.calls.append(("seen", len(seen)))
        return super().record_gateways_seen(seen, at)


def _counting_engine(sql: SqlEngine, trust: Trust, bus: BusConfig) -> tuple[_Counting, Engine]:
    repo = _Counting(sql)
    repo.calls = []
    publisher = Publisher(bus, queues=PUBLISHED_QUEUES, name="test-announcements")
    announcer = Announcer(publisher, Admins(repo.sessions), Outbox(repo.sessions))
    engine = Engine(
        repo, publisher, announcer, trust, command_deadline=timedelta(hours=1),
        clock=lambda: T0 + timedelta(minutes=1),  # after the gateways were first seen
    )  # fmt: skip
    return repo, engine


def test_a_batch_records_announcements_together_in_each_gateways_order(
    sql: SqlEngine, trust: Trust, bus: BusConfig
) -> None:
    repo, engine = _counting_engine(sql, trust, bus)
    job = _job(repo, 3)
    repo.calls.clear()
    succeeded = common_pb2.GATEWAY_JOB_STATE_SUCCEEDED
    downloading = common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
    batch = [
        _hello("gw-3", "1.0.0", 7),
        _beat("gw-1", "1.0.0", 1),  # gw-1 before its upgrade ...
        _status(job, "gw-1", succeeded, "gw-1-done"),  # ... then on 2.0.0
        _beat("gw-3", "1.0.0", 4),
        _status(job, "gw-3", downloading, "gw-3-progress"),
        _beat("gw-2", "banana", 1),  # refused alone
        _beat("gw-3", "1.0.0", 5),
        _status(job, "gw-2", succeeded, "gw-2-done"),
        _hello("gw-2", "1.0.0", 9),  # gw-2 after its upgrade: back on 1.0.0
    ]
    outcomes = engine.on_reports(batch)

    assert [type(o).__name__ if o else None for o in outcomes] == [None] * 5 + ["DeadLetter"] + [
        None
    ] * 3
    assert "banana" in str(outcomes[5]) and "MAJOR.MINOR.PATCH" in str(outcomes[5])
    gw1, gw2, gw3 = (repo.get_gateway(f"gw-{n}") for n in (1, 2, 3))
    assert gw1 is not None and gw2 is not None and gw3 is not None
    assert gw1.version == TARGET, "a heartbeat sent before SUCCEEDED was applied after it"
    assert (gw2.version, gw2.pid) == ("1.0.0", 9), "a hello sent after SUCCEEDED came first"
    # gw-3's hello and two heartbeats are one change: the hello's pid, addresses and
    # interval, the last heartbeat's sessions; its progress report applied between them.
    assert (gw3.pid, gw3.listen, gw3.vpn_sessions) == (7, ("10.0.0.7:8443",), 5)
    assert gw3.heartbeat_interval == timedelta(seconds=30)
    states = {g.gateway_id: g.state for g in (repo.get_job(job.id) or job).gateways}
    assert states == {
        "gw-1": GatewayState.SUCCEEDED,
        "gw-2": GatewayState.SUCCEEDED,
        "gw-3": GatewayState.DOWNLOADING,
    }
    # Three transactions for nine deliveries: gw-2's hello waits for the reports before
    # it (its SUCCEEDED), gw-1's SUCCEEDED for the announcements before it (its heartbeat).
    assert repo.calls == [("reports", 2), ("seen", 5), ("reports", 1)]

    # One delivery at a time still works, and still refuses alone.
    engine.on_report(_beat("gw-3", "1.0.1", 6))
    with pytest.raises(DeadLetter, match="refused announcement from gw-3: pid -1"):
        engine.on_report(_hello("gw-3", "1.0.1", -1))
    gw3 = repo.get_gateway("gw-3")
    assert gw3 is not None and (gw3.version, gw3.vpn_sessions, gw3.pid) == ("1.0.1", 6, 7)


def test_a_fleets_batch_takes_two_rounds_however_many_gateways_it_holds(
    sql: SqlEngine, trust: Trust, bus: BusConfig
) -> None:
    """Each gateway's messages come together, as they do while a fleet upgrades: a
    heartbeat, its progress, SUCCEEDED, then the new version's hello and heartbeat. Each
    SUCCEEDED follows its own gateway's heartbeat and precedes its hello, yet the batch
    is applied in four transactions, not two for every gateway."""
    repo, engine = _counting_engine(sql, trust, bus)
    gateways = 50
    job = _job(repo, gateways)
    repo.calls.clear()
    downloading = common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
    succeeded = common_pb2.GATEWAY_JOB_STATE_SUCCEEDED
    deliveries: list[Delivery] = []
    for n in range(1, gateways + 1):
        gid = f"gw-{n}"
        deliveries += [
            _beat(gid, "1.0.0", 1),
            _status(job, gid, downloading, f"{gid}-progress"),
            _status(job, gid, succeeded, f"{gid}-done"),
            _hello(gid, TARGET, 1000 + n),
            _beat(gid, TARGET, 2),
        ]

    assert engine.on_reports(deliveries) == [None] * len(deliveries)

    n = gateways
    assert repo.calls == [("reports", n), ("seen", n), ("reports", n), ("seen", 2 * n)]
    after = repo.get_job(job.id)
    assert after is not None and after.state is JobState.SUCCEEDED
    for number in range(1, gateways + 1):
        gateway = repo.get_gateway(f"gw-{number}")
        assert gateway is not None
        assert (gateway.version, gateway.pid, gateway.vpn_sessions) == (TARGET, 1000 + number, 2)


def test_announcements_from_the_reports_queue_are_recorded_in_batches(
    sql: SqlEngine, trust: Trust, bus: BusConfig
) -> None:
    repo, engine = _counting_engine(sql, trust, bus)
    gateways = 20
    job = _job(repo, gateways)
    repo.calls.clear()
    downloading = common_pb2.GATEWAY_JOB_STATE_DOWNLOADING
    deliveries: list[Delivery] = []
    for n in range(1, gateways + 1):
        gid = f"gw-{n}"
        deliveries += [
            _hello(gid, "1.0.0", 100 + n),
            _beat(gid, "1.0.0", 1),
            _status(job, gid, downloading, f"{gid}-progress"),
            _beat(gid, "1.0.0", 2),
            _beat(gid, "1.0.0", 10 + n),
        ]
    bad = _announcement(
        topology.HELLO, bus_pb2.GatewayHello(gateway_id="gw-1", version="1.0.0", pid=-5), "bad"
    )
    garbled = Delivery(
        body=b"{not a heartbeat",
        routing_key=topology.report_key("gw-2", topology.HEARTBEAT),
        exchange=topology.REPORTS.name,
        message_id="garbled",
        headers={},
        redelivered=False,
        user_id=None,
    )
    deliveries[7:7] = [bad, garbled]
    connection = pika.BlockingConnection(pika.URLParameters(bus.url))
    consumer = reports_consumer(bus, engine.on_reports)
    publisher = engine._publisher
    publisher.start()
    try:
        assert publisher.wait_connected(15)
        channel = connection.channel()
        for delivery in deliveries:
            channel.basic_publish(
                topology.REPORTS.name,
                delivery.routing_key,
                delivery.body,
                pika.BasicProperties(message_id=delivery.message_id, delivery_mode=2),
            )
        queue = topology.CONTROLLER_REPORTS.name
        wait_for(
            lambda: (
                channel.queue_declare(queue, passive=True).method.message_count == len(deliveries)
            ),
            timeout=15,
            what=f"the {len(deliveries)} messages waiting in the reports queue",
        )
        consumer.start()

        def settled() -> list[tuple[str, int, int]] | None:
            with repo.sessions.read() as session:
                rows = session.execute(
                    select(Gateway.id, Gateway.pid, Gateway.vpn_sessions).order_by(Gateway.id)
                ).all()
            found = [(gid, pid or 0, vpn) for gid, pid, vpn in rows]
            return found if all(vpn > 10 for _, _, vpn in found) else None

        wait_for(settled, timeout=30, what="every gateway's last heartbeat recorded")
        dead = wait_for(
            lambda: _dead_letters(channel, 2),
            timeout=30,
            what="the bad hello and the garbled heartbeat dead-lettered",
        )
        reasons = {d[0]: d[1] for d in dead}
        assert reasons.keys() == {"bad", "garbled"}
        assert "pid -5 is negative" in reasons["bad"]
        assert "GatewayHeartbeat" in reasons["garbled"]
        wait_for(
            lambda: channel.queue_declare(queue, passive=True).method.message_count == 0,
            timeout=15,
            what="the reports queue empty",
        )
    finally:
        consumer.stop()
        connection.close()
        publisher.close()
    for n in range(1, gateways + 1):
        gateway = repo.get_gateway(f"gw-{n}")
        assert gateway is not None
        assert (gateway.pid, gateway.vpn_sessions) == (100 + n, 10 + n), gateway
        assert gateway.heartbeat_interval == timedelta(seconds=30)
    assert _count(repo, SeenMessage) == gateways
    seen = [size for kind, size in repo.calls if kind == "seen"]
    announcements = 4 * gateways
    assert sum(seen) == announcements
    assert len(seen) < announcements / 4, f"announcements were not batched: {repo.calls}"


@contextmanager
def _before_first(
    sql: SqlEngine, statement: str, action: Callable[[Repository], object]
) -> Iterator[list[str]]:
    """While in the block: just before the first SQL statement on ``sql`` that starts
    with ``statement``, ``action`` runs (and commits) on a Repository of its own, as
    another controller would. Yields the statements it ran before (empty: never)."""
    raced: list[str] = []

    def first(_conn: Any, _cursor: Any, text: str, *_args: Any) -> None:
        if text.lstrip().upper().startswith(statement) and not raced:
            raced.append(text)
            other = make_engine(sql.url.render_as_string(hide_password=False))
            try:
                action(Repository(other))
            finally:
                other.dispose()

    event.listen(sql, "before_cursor_execute", first)
    try:
        yield raced
    finally:
        event.remove(sql, "before_cursor_execute", first)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_gateway_another_controller_inserts_meanwhile_is_updated(
    repo: Repository, sql: SqlEngine
) -> None:
    repo.record_gateway_seen("gw-old", "1.0.0", T0)
    # Between this batch's read of the known gateways and its INSERT, another controller's
    # hello for gw-new commits.
    with _before_first(
        sql, "INSERT INTO GATEWAYS", lambda other: other.record_gateway_seen("gw-new", "0.9.0", T0)
    ) as raced:
        created = repo.record_gateways_seen(
            [GatewaySeen("gw-new", "1.0.0", vpn_sessions=3), GatewaySeen("gw-old", "1.0.1")],
            T0 + timedelta(seconds=1),
        )
    assert raced, "the batch never inserted"
    assert created == set()
    new = repo.get_gateway("gw-new")
    assert new is not None and (new.version, new.vpn_sessions) == ("1.0.0", 3)
    assert new.last_seen == T0 + timedelta(seconds=1)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_confirm_recorded_while_a_batch_is_applied_is_kept(
    repo: Repository, sql: SqlEngine
) -> None:
    # The broker's confirm of a command is recorded without the job's lock
    # (mark_published); the reports of that gateway, often there first, are applied under
    # it. A confirm that commits between the batch's read of the rows and its write must
    # survive the write: the HA guard (peers_in_flight) counts only published commands.
    job = _job(repo, 2)
    commands = [gateway.command_id for gateway in job.gateways]
    with _before_first(
        sql,
        "UPDATE JOB_GATEWAYS",
        lambda other: other.mark_published(commands, T0 + timedelta(seconds=5)),
    ) as raced:
        outcomes = repo.apply_reports(
            [_report(job, gateway, GatewayState.DOWNLOADING, f"r-{gateway}")
             for gateway in ("gw-1", "gw-2")]
        )  # fmt: skip
    assert raced, "the batch never wrote the gateways' rows"
    assert _kinds(outcomes) == ["applied", "applied"]
    after = repo.get_job(job.id)
    assert after is not None
    assert [(g.state, g.published) for g in after.gateways] == [
        (GatewayState.DOWNLOADING, True),
        (GatewayState.DOWNLOADING, True),
    ]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_confirm_takes_row_locks_in_the_order_ingestion_does(
    repo: Repository, sql: SqlEngine
) -> None:
    # Ingestion locks a batch's gateway rows in (job, gateway) order (write_rows); a confirm
    # (mark_published) of commands whose ids sort the other way must take them in that
    # order too, or the two deadlock and PostgreSQL aborts one of them.
    job = _job_against_key_order(repo, _job(repo, 2))
    first, second = job.gateways  # gw-1, gw-2: key order
    with sql.connect() as ingesting:
        ingesting.execute(text("SET lock_timeout = '5s'"))
        lock = "SELECT 1 FROM job_gateways WHERE command_id = :c FOR UPDATE"
        ingesting.execute(text(lock), {"c": first.command_id})
        confirm = threading.Thread(
            target=repo.mark_published,
            args=([first.command_id, second.command_id], T0 + timedelta(seconds=5)),
        )
        confirm.start()
        # Autocommit: a transaction sees pg_stat_activity as it was at its first read.
        with sql.connect().execution_options(isolation_level="AUTOCOMMIT") as watching:
            wait_for(
                lambda: watching.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                        "'Lock' AND query LIKE '%job_gateways%'"
                    )
                ).scalar(),
                timeout=10,
                what="the confirm waiting for the first row",
            )
        # The confirm waits for gw-1 holding nothing else: gw-2 is free to take.
        ingesting.execute(text(lock), {"c": second.command_id})
        ingesting.commit()
    confirm.join(timeout=10)
    assert not confirm.is_alive()
    after = repo.get_job(job.id)
    assert after is not None and [g.published for g in after.gateways] == [True, True]


def _job_against_key_order(repo: Repository, job: JobRecord) -> JobRecord:
    """The job of two gateways with its rows in the order opposite to (job, gateway) both
    by command id (swapped when needed) and on disk (gw-1's row rewritten last), so that
    a writer locking them by either of those orders takes gw-2 first."""
    one, two = job.gateways
    with repo.sessions.write() as session:
        if one.command_id < two.command_id:
            swap = "UPDATE job_gateways SET command_id = :new WHERE command_id = :old"
            session.execute(text(swap), {"new": "swap", "old": one.command_id})
            session.execute(text(swap), {"new": one.command_id, "old": two.command_id})
            session.execute(text(swap), {"new": two.command_id, "old": "swap"})
        session.execute(
            text("UPDATE job_gateways SET error = error WHERE gateway_id = :g"),
            {"g": one.gateway_id},
        )
    swapped = repo.get_job(job.id)
    assert swapped is not None
    assert swapped.gateways[1].command_id < swapped.gateways[0].command_id
    return swapped
