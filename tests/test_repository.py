"""The repository's domain operations, each test on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

import pytest

from controller_svc.db import make_engine, migrate
from controller_svc.errors import Conflict, InvalidRequest, NotFound
from controller_svc.repository import (
    JobRecord,
    ReportIn,
    ReportOutcome,
    Repository,
)
from controller_svc.states import GatewayState, JobState
from controller_svc.transitions import EXPIRED_ACTIVE, EXPIRED_QUEUED, NO_REASON, UNSENT

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DIGEST = "ab" * 32
T = TypeVar("T")


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _job(repo: Repository, gateways: int = 2, **kwargs: object) -> JobRecord:
    repo.add_release("2.0.0", DIGEST, 100, "", T0)
    targets = [(f"gw-{n}", "1.0.0") for n in range(1, gateways + 1)]
    for gateway_id, version in targets:
        repo.record_gateway_seen(gateway_id, version, T0)
    options: dict[str, object] = {"deadline": _at(600), "now": T0, **kwargs}
    job, created = repo.create_job("2.0.0", targets, **options)  # type: ignore[arg-type]
    assert created
    return job


_report_ids = iter(range(1_000_000))


def _report(
    job: JobRecord,
    gateway_id: str,
    state: GatewayState,
    *,
    at: float = 10,
    error: str = "",
    done: int = 0,
    total: int = 0,
    report_id: str | None = None,
) -> ReportIn:
    row = next(g for g in job.gateways if g.gateway_id == gateway_id)
    return ReportIn(
        report_id=report_id or f"r-{next(_report_ids)}",
        job_id=job.id,
        command_id=row.command_id,
        gateway_id=gateway_id,
        state=state,
        from_version="1.0.0",
        to_version="2.0.0",
        error=error,
        bytes_done=done,
        bytes_total=total,
        at=_at(at),
    )


def _in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in ``count`` threads released together; return results in order."""
    start = threading.Barrier(count, timeout=30)
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, f"a thread failed: {errors!r}"
    assert len(results) == count, "a thread did not finish within 60s"
    return [results[i] for i in range(count)]


# Gateways


def test_record_gateway_seen_new_then_known(repo: Repository) -> None:
    assert repo.record_gateway_seen("gw-2", "1.0.0", T0, pid=42, listen=["0.0.0.0:4500"])
    assert not repo.record_gateway_seen("gw-2", "1.1.0", _at(5), pid=43)
    assert repo.record_gateway_seen("gw-1", "1.0.0", _at(1))
    gateways = repo.list_gateways()
    assert [g.id for g in gateways] == ["gw-1", "gw-2"]
    gw2 = repo.get_gateway("gw-2")
    assert gw2 is not None
    assert (gw2.version, gw2.first_seen, gw2.last_seen, gw2.pid) == ("1.1.0", T0, _at(5), 43)
    assert gw2.first_seen.tzinfo is UTC
    assert not gw2.busy
    assert repo.get_gateway("gw-9") is None


def test_a_late_heartbeat_does_not_roll_the_gateway_back(repo: Repository) -> None:
    repo.record_gateway_seen("gw-1", "2.0.0", _at(10))
    repo.record_gateway_seen("gw-1", "1.0.0", _at(5))
    gateway = repo.get_gateway("gw-1")
    assert gateway is not None
    assert (gateway.version, gateway.last_seen) == ("2.0.0", _at(10))


def test_gateways_in_an_unfinished_job_are_busy(repo: Repository) -> None:
    job = _job(repo)
    repo.record_gateway_seen("gw-idle", "1.0.0", T0)
    assert {g.id: g.busy for g in repo.list_gateways()} == {
        "gw-1": True,
        "gw-2": True,
        "gw-idle": False,
    }
    repo.apply_report(_report(job, "gw-1", GatewayState.SUCCEEDED))
    busy = repo.get_gateway("gw-1")
    assert busy is not None and not busy.busy
    other = repo.get_gateway("gw-2")
    assert other is not None and other.busy


# Releases


def test_add_release_is_idempotent_and_refuses_another_digest(repo: Repository) -> None:
    published = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    release, created = repo.add_release("1.4.0", DIGEST, 123, "restarts VPN", published)
    assert created
    assert (release.version, release.sha256, release.size, release.notes) == (
        "1.4.0",
        DIGEST,
        123,
        "restarts VPN",
    )
    assert release.published_at == T0 and release.published_at.tzinfo is UTC
    again, created = repo.add_release("1.4.0", DIGEST, 123, "restarts VPN", published)
    assert (again, created) == (release, False)
    with pytest.raises(Conflict, match=f"already exists with sha256 {DIGEST}"):
        repo.add_release("1.4.0", "cd" * 32, 123, "", published)
    assert repo.get_release("1.4.0") == release


@pytest.mark.parametrize(
    ("version", "sha256", "size"),
    [("1.4", DIGEST, 1), ("v1.4.0", DIGEST, 1), ("1.4.0", "xyz", 1), ("1.4.0", DIGEST, -1)],
)
def test_add_release_validates(repo: Repository, version: str, sha256: str, size: int) -> None:
    with pytest.raises(InvalidRequest):
        repo.add_release(version, sha256, size, "", T0)
    assert repo.list_releases() == []


def test_releases_are_ordered_by_semantic_version(repo: Repository) -> None:
    for version in ["1.9.0", "1.10.0", "1.2.0", "2.0.0", "1.10.1"]:
        repo.add_release(version, DIGEST, 1, "", T0)
    assert [r.version for r in repo.list_releases()] == [
        "2.0.0",
        "1.10.1",
        "1.10.0",
        "1.9.0",
        "1.2.0",
    ]
    latest = repo.latest_release()
    assert latest is not None and latest.version == "2.0.0"
    assert repo.get_release("3.0.0") is None


def test_no_releases(repo: Repository) -> None:
    assert repo.list_releases() == []
    assert repo.latest_release() is None


# Jobs


def test_create_job_queues_one_command_per_gateway(repo: Repository) -> None:
    job = _job(repo, gateways=3, source="management")
    assert job.state is JobState.PENDING
    assert (job.target_version, job.source, job.created_at, job.deadline) == (
        "2.0.0",
        "management",
        T0,
        _at(600),
    )
    assert [g.gateway_id for g in job.gateways] == ["gw-1", "gw-2", "gw-3"]
    assert all(g.state is GatewayState.QUEUED for g in job.gateways)
    assert all((g.from_version, g.to_version) == ("1.0.0", "2.0.0") for g in job.gateways)
    assert len({g.command_id for g in job.gateways}) == 3
    assert repo.get_job(job.id) == job
    events = repo.events_after(job.id, 0)
    assert [(e.job_state, e.gateway_id, e.gateway_state) for e in events] == [
        (JobState.PENDING, None, None),
        (None, "gw-1", GatewayState.QUEUED),
        (None, "gw-2", GatewayState.QUEUED),
        (None, "gw-3", GatewayState.QUEUED),
    ]


def test_create_job_with_a_used_request_id_returns_that_job(repo: Repository) -> None:
    job = _job(repo, request_id="req-1")
    again, created = repo.create_job(
        "2.0.0", [("gw-9", "1.0.0")], deadline=_at(900), request_id="req-1", now=_at(5)
    )
    assert (again, created) == (job, False)
    assert repo.list_jobs() == [job]
    assert len(repo.events_after(job.id, 0)) == 3


def test_concurrent_requests_with_one_request_id_make_one_job(repo: Repository) -> None:
    repo.add_release("2.0.0", DIGEST, 100, "", T0)

    def create(index: int) -> tuple[JobRecord, bool]:
        return repo.create_job(
            "2.0.0", [("gw-1", "1.0.0")], deadline=_at(600), request_id="same", now=_at(index)
        )

    results = _in_threads(4, create)
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert len({job.id for job, _ in results}) == 1
    assert len(repo.list_jobs()) == 1


def test_create_job_refusals(repo: Repository) -> None:
    with pytest.raises(NotFound, match=r"no release 2\.0\.0"):
        repo.create_job("2.0.0", [("gw-1", "1.0.0")], deadline=_at(600), now=T0)
    repo.add_release("2.0.0", DIGEST, 100, "", T0)
    with pytest.raises(InvalidRequest, match="at least one"):
        repo.create_job("2.0.0", [], deadline=_at(600), now=T0)
    with pytest.raises(InvalidRequest, match="named twice"):
        repo.create_job("2.0.0", [("a", "1.0.0"), ("a", "1.0.0")], deadline=_at(600), now=T0)
    with pytest.raises(InvalidRequest, match="source"):
        repo.create_job("2.0.0", [("a", "1.0.0")], deadline=_at(600), now=T0, source="web")
    with pytest.raises(InvalidRequest, match="naive"):
        repo.create_job("2.0.0", [("a", "1.0.0")], deadline=datetime(2030, 1, 1), now=T0)
    assert repo.list_jobs() == []


def test_mark_running(repo: Repository) -> None:
    job = _job(repo)
    running = repo.mark_running(job.id, _at(1))
    assert (running.state, running.updated_at) == (JobState.RUNNING, _at(1))
    assert repo.mark_running(job.id, _at(2)) == running
    assert [e.job_state for e in repo.events_after(job.id, 0) if e.job_state] == [
        JobState.PENDING,
        JobState.RUNNING,
    ]
    with pytest.raises(NotFound):
        repo.mark_running("no-such-job", _at(1))


def test_latest_and_list_jobs_newest_first(repo: Repository) -> None:
    assert repo.latest_job() is None
    first = _job(repo)
    second, _ = repo.create_job("2.0.0", [("gw-1", "1.0.0")], deadline=_at(900), now=_at(60))
    assert repo.latest_job() == second
    assert [j.id for j in repo.list_jobs()] == [second.id, first.id]
    assert [j.id for j in repo.list_jobs(limit=1)] == [second.id]
    assert repo.get_job("nope") is None


# Reports


def test_reports_move_a_gateway_and_record_progress(repo: Repository) -> None:
    job = repo.mark_running(_job(repo).id, _at(1))
    outcome = repo.apply_report(
        _report(job, "gw-1", GatewayState.DOWNLOADING, at=2, done=10, total=100)
    )
    assert (outcome.applied, outcome.duplicate, outcome.job_finished) == (True, False, None)
    outcome = repo.apply_report(
        _report(job, "gw-1", GatewayState.DOWNLOADING, at=3, done=60, total=100)
    )
    assert outcome.applied
    outcome = repo.apply_report(_report(job, "gw-1", GatewayState.VERIFYING, at=4))
    assert outcome.job is not None
    row = outcome.job.gateways[0]
    # A report without progress keeps the last progress known.
    assert (row.state, row.bytes_done, row.bytes_total, row.updated_at) == (
        GatewayState.VERIFYING,
        60,
        100,
        _at(4),
    )
    progress = [
        (e.gateway_state, e.bytes_done) for e in repo.events_after(job.id, 0) if e.gateway_id
    ]
    assert progress[-3:] == [
        (GatewayState.DOWNLOADING, 10),
        (GatewayState.DOWNLOADING, 60),
        (GatewayState.VERIFYING, 60),
    ]


def test_a_report_on_a_pending_job_starts_it(repo: Repository) -> None:
    job = _job(repo)
    outcome = repo.apply_report(_report(job, "gw-1", GatewayState.DOWNLOADING))
    assert outcome.job is not None and outcome.job.state is JobState.RUNNING


def test_a_redelivered_report_changes_nothing(repo: Repository) -> None:
    job = _job(repo)
    report = _report(job, "gw-1", GatewayState.DOWNLOADING, done=1, total=100)
    assert repo.apply_report(report).applied
    events = repo.events_after(job.id, 0)
    again = repo.apply_report(report)
    assert (again.applied, again.duplicate, again.job_finished) == (False, True, None)
    assert repo.events_after(job.id, 0) == events


def test_concurrent_deliveries_of_one_report_apply_once(repo: Repository) -> None:
    job = _job(repo)
    report = _report(job, "gw-1", GatewayState.DOWNLOADING, done=1, total=100)
    outcomes = _in_threads(4, lambda _: repo.apply_report(report))
    assert sorted(o.applied for o in outcomes) == [False, False, False, True]
    assert sum(o.duplicate for o in outcomes) == 3


def test_reports_for_unknown_jobs_or_commands_are_refused(repo: Repository) -> None:
    job = _job(repo)
    report = _report(job, "gw-1", GatewayState.SUCCEEDED)
    cases: list[tuple[ReportIn, str]] = [
        (ReportIn(**{**report.__dict__, "job_id": "ghost"}), "unknown job ghost"),
        (ReportIn(**{**report.__dict__, "command_id": "ghost"}), "unknown command ghost"),
        (ReportIn(**{**report.__dict__, "gateway_id": "gw-2"}), "unknown command"),
    ]
    for bad, reason in cases:
        outcome = repo.apply_report(bad)
        assert (outcome.applied, outcome.duplicate) == (False, False)
        assert reason in outcome.reason
    assert repo.get_job(job.id) == job


def test_illegal_transitions_are_ignored(repo: Repository) -> None:
    job = _job(repo)
    assert repo.apply_report(_report(job, "gw-1", GatewayState.SWAPPING, at=5)).applied
    late = repo.apply_report(_report(job, "gw-1", GatewayState.DOWNLOADING, at=6))
    assert not late.applied and not late.duplicate
    assert "cannot move from SWAPPING to DOWNLOADING" in late.reason
    assert repo.apply_report(_report(job, "gw-1", GatewayState.SUCCEEDED, at=7)).applied
    after_final = repo.apply_report(_report(job, "gw-1", GatewayState.FAILED, at=8, error="x"))
    assert not after_final.applied
    current = repo.get_job(job.id)
    assert current is not None and current.gateways[0].state is GatewayState.SUCCEEDED


def test_failures_always_carry_a_reason(repo: Repository) -> None:
    job = _job(repo)
    failed = repo.apply_report(_report(job, "gw-1", GatewayState.FAILED))
    rolled = repo.apply_report(
        _report(job, "gw-2", GatewayState.ROLLED_BACK, error="new process not ready in 5s")
    )
    assert rolled.job is not None
    assert [g.error for g in rolled.job.gateways] == [NO_REASON, "new process not ready in 5s"]
    assert failed.applied and rolled.job_finished is JobState.FAILED


def test_success_updates_the_gateways_version(repo: Repository) -> None:
    job = _job(repo)
    repo.apply_report(_report(job, "gw-1", GatewayState.SUCCEEDED))
    gateway = repo.get_gateway("gw-1")
    assert gateway is not None and gateway.version == "2.0.0"
    untouched = repo.get_gateway("gw-2")
    assert untouched is not None and untouched.version == "1.0.0"


@pytest.mark.parametrize(
    ("finals", "outcome"),
    [
        ((GatewayState.SUCCEEDED, GatewayState.SUCCEEDED), JobState.SUCCEEDED),
        ((GatewayState.SUCCEEDED, GatewayState.ROLLED_BACK), JobState.PARTIAL),
        ((GatewayState.FAILED, GatewayState.ROLLED_BACK), JobState.FAILED),
    ],
)
def test_the_last_final_report_finishes_the_job(
    repo: Repository, finals: tuple[GatewayState, GatewayState], outcome: JobState
) -> None:
    job = repo.mark_running(_job(repo).id, _at(1))
    first = repo.apply_report(_report(job, "gw-1", finals[0], at=20, error="e"))
    assert first.job_finished is None
    assert first.job is not None and first.job.state is JobState.RUNNING
    last = repo.apply_report(_report(job, "gw-2", finals[1], at=30, error="e"))
    assert last.job_finished is outcome
    assert last.job is not None
    assert (last.job.state, last.job.updated_at) == (outcome, _at(30))
    final_event = repo.events_after(job.id, 0)[-1]
    assert (final_event.job_state, final_event.gateway_id, final_event.at) == (
        outcome,
        None,
        _at(30),
    )


def test_events_resume_after_a_sequence_number(repo: Repository) -> None:
    job = _job(repo, gateways=3)
    other = _job(repo, gateways=1)
    events = repo.events_after(job.id, 0)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert {e.job_id for e in events} == {job.id}
    assert repo.events_after(job.id, events[1].seq) == events[2:]
    assert repo.events_after(job.id, 0, limit=2) == events[:2]
    assert repo.events_after(job.id, events[-1].seq) == []
    repo.apply_report(_report(job, "gw-2", GatewayState.DOWNLOADING))
    newer = repo.events_after(job.id, events[-1].seq)
    assert [(e.gateway_id, e.gateway_state) for e in newer] == [
        (None, None),  # PENDING -> RUNNING comes first, as a job-level event
        ("gw-2", GatewayState.DOWNLOADING),
    ]
    assert newer[0].job_state is JobState.RUNNING
    assert newer[0].seq > max(e.seq for e in repo.events_after(other.id, 0))


# Concurrency and deadlines


def _finish_from_two_repositories(db_url: str, job: JobRecord) -> list[ReportOutcome]:
    """Report every gateway SUCCEEDED, split across two threads with engines of their own
    (as two controllers would), all released at once."""
    engines = [make_engine(db_url), make_engine(db_url)]
    try:
        repos = [Repository(engine) for engine in engines]
        half = len(job.gateways) // 2
        shares = [job.gateways[:half], job.gateways[half:]]

        def report_share(index: int) -> list[ReportOutcome]:
            return [
                repos[index].apply_report(_report(job, row.gateway_id, GatewayState.SUCCEEDED))
                for row in shares[index]
            ]

        return [o for share in _in_threads(2, report_share) for o in share]
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("round_", range(3))
def test_racing_final_reports_finish_the_job_exactly_once(
    repo: Repository, db_url: str, round_: int
) -> None:
    job = repo.mark_running(_job(repo, gateways=10).id, _at(1))
    outcomes = _finish_from_two_repositories(db_url, job)
    assert all(o.applied for o in outcomes)
    finished = [o.job_finished for o in outcomes if o.job_finished is not None]
    assert finished == [JobState.SUCCEEDED], f"round {round_}: {finished}"
    final_events = [e for e in repo.events_after(job.id, 0) if e.job_state is JobState.SUCCEEDED]
    assert len(final_events) == 1


def test_expire_overdue(repo: Repository) -> None:
    job = repo.mark_running(_job(repo, gateways=3).id, _at(1))
    repo.mark_published([g.command_id for g in job.gateways], _at(1))
    repo.apply_report(_report(job, "gw-2", GatewayState.DOWNLOADING, at=100, done=1, total=9))
    repo.apply_report(_report(job, "gw-3", GatewayState.SUCCEEDED, at=200))
    grace = timedelta(seconds=60)
    assert repo.expire_overdue(_at(600), grace=grace) == []  # not past the deadline yet

    assert repo.expire_overdue(_at(601), grace=grace) == []  # gw-2 still in its grace
    current = repo.get_job(job.id)
    assert current is not None
    assert [(g.state, g.error) for g in current.gateways] == [
        (GatewayState.UNREACHABLE, EXPIRED_QUEUED),
        (GatewayState.DOWNLOADING, ""),
        (GatewayState.SUCCEEDED, ""),
    ]

    finished = repo.expire_overdue(_at(661), grace=grace)
    assert [j.id for j in finished] == [job.id]
    assert finished[0].state is JobState.PARTIAL
    assert finished[0].gateways[1].state is GatewayState.FAILED
    assert finished[0].gateways[1].error == EXPIRED_ACTIVE
    assert repo.expire_overdue(_at(9999), grace=grace) == []
    job_events = [e.job_state for e in repo.events_after(job.id, 0) if e.job_state]
    assert job_events == [JobState.PENDING, JobState.RUNNING, JobState.PARTIAL]


def test_expire_overdue_closes_a_job_nobody_took(repo: Repository) -> None:
    job = _job(repo)
    repo.mark_published([g.command_id for g in job.gateways], _at(1))
    finished = repo.expire_overdue(_at(601), grace=timedelta(0))
    assert [(j.id, j.state) for j in finished] == [(job.id, JobState.FAILED)]
    assert {g.state for g in finished[0].gateways} == {GatewayState.UNREACHABLE}


def test_a_command_never_published_is_failed_unsent_at_the_deadline(repo: Repository) -> None:
    job = _job(repo, gateways=2)
    repo.mark_published([job.gateways[0].command_id], _at(1))
    finished = repo.expire_overdue(_at(601), grace=timedelta(0))
    assert [(g.state, g.error) for g in finished[0].gateways] == [
        (GatewayState.UNREACHABLE, EXPIRED_QUEUED),
        (GatewayState.FAILED, UNSENT),
    ]


def test_prune_seen_forgets_old_report_ids(repo: Repository) -> None:
    job = _job(repo)
    report = _report(job, "gw-1", GatewayState.DOWNLOADING, at=10, done=1, total=9)
    repo.apply_report(report)
    assert repo.prune_seen(_at(10)) == 0
    assert repo.prune_seen(_at(11)) == 1
    # Forgotten: a redelivery now is judged by the state machine alone.
    again = repo.apply_report(report)
    assert not again.duplicate
