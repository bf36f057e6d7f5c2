"""Paged lists (Google AIP-158: page_size, page_token, next_page_token) from the database
to the CLI, and a watched job of 1,000 gateways kept current from its events alone.

The keyset queries run on SQLite and PostgreSQL; the tokens are checked as a client
would misuse them; one controller process serves a fleet and a job of 1,000 gateways to
the real CLI, which must show them all and must not read the job again per event.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller_svc import db, paging
from controller_svc.errors import InvalidRequest
from controller_svc.records import ReportIn
from controller_svc.repository import Repository
from controller_svc.states import GatewayState
from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.procs import Procs
from tests.support.rabbit import amqp_url
from tests.support.wait import wait_for
from upgradectl import client as client_module
from upgradectl.cli import run
from upgradectl.errors import ExitCode
from upgradectl.model import GatewayProgress, JobEvent, JobView, LiveJob

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32
FLEET = 1000


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()


def _seed_gateways(repo: Repository, ids: list[str]) -> None:
    for gateway_id in ids:
        repo.record_gateway_seen(gateway_id, "1.0.0", T0)


# Keyset queries, on both databases ----------------------------------------------------


def test_gateway_pages_cover_the_fleet_once_in_id_order(repo: Repository) -> None:
    ids = [f"gw-{n:02d}" for n in range(25)]
    _seed_gateways(repo, ids)
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        records, more = repo.gateways_page(after, 10)
        pages.append([r.id for r in records])
        if not more:
            break
        after = records[-1].id
        if len(pages) == 1:
            # Rows added while paging: before the cursor it is not seen, after it is; no
            # row already sent moves or repeats.
            _seed_gateways(repo, ["gw-00a", "gw-99"])
    assert [len(p) for p in pages] == [10, 10, 6]
    listed = [gid for page in pages for gid in page]
    assert listed == sorted(set(ids) | {"gw-99"})


def test_job_pages_are_newest_first_and_break_ties_on_the_id(repo: Repository) -> None:
    repo.add_release("1.1.0", SHA, 10, "", T0)
    made = []
    for n in range(5):
        # Jobs 1 to 3 share one created_at: the id decides their order.
        at = T0 + timedelta(seconds=min(n, 1) + max(0, n - 3))
        job, _ = repo.create_job(
            "1.1.0", [(f"gw-{n}", "1.0.0")], deadline=at + timedelta(hours=1), now=at
        )
        made.append(job)
    expected = [j.id for j in sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)]
    listed: list[str] = []
    after: tuple[datetime, str] | None = None
    while True:
        jobs, more = repo.jobs_page(after, 2)
        listed += [j.id for j in jobs]
        assert all(len(j.gateways) == 1 for j in jobs)
        if not more:
            break
        after = (jobs[-1].created_at, jobs[-1].id)
    assert listed == expected
    with pytest.raises(InvalidRequest):
        repo.jobs_page(None, 0)


def test_a_jobs_gateways_come_in_pages_with_the_count(repo: Repository) -> None:
    repo.add_release("1.1.0", SHA, 10, "", T0)
    targets = [(f"gw-{n}", "1.0.0") for n in range(7)]
    job, _ = repo.create_job("1.1.0", targets, deadline=T0 + timedelta(hours=1), now=T0)
    seen: list[str] = []
    after: str | None = None
    for expected_more in (True, True, False):
        page = repo.job_page(job.id, after, 3)
        assert page is not None and page.job.id == job.id
        assert (page.gateway_count, page.more) == (7, expected_more)
        seen += [g.gateway_id for g in page.job.gateways]
        after = page.job.gateways[-1].gateway_id
    assert seen == [gid for gid, _ in targets]
    latest = repo.job_page(None, None, 2)
    assert latest is not None and latest.job.id == job.id
    assert repo.job_page("no-such-job", None, 2) is None


# Tokens -------------------------------------------------------------------------------


def test_a_token_round_trips_and_is_opaque() -> None:
    cursor = paging.Cursor("job-gateways", "job-1", ("gw-7",))
    token = paging.encode(cursor)
    assert "gw-7" not in token and "=" not in token
    assert paging.decode(token, "job-gateways", "job-1") == cursor
    assert paging.decode(token, "job-gateways", None) == cursor
    assert paging.decode("", "gateways") is None


@pytest.mark.parametrize(
    ("token", "kind", "scope", "says"),
    [
        ("not base64 !", "gateways", "", "does not decode"),
        (paging.encode(paging.Cursor("jobs", "", ("a", "b"))), "gateways", "", "another list"),
        (paging.encode(paging.Cursor("job-gateways", "j-1", ("g",))), "job-gateways", "j-2",
         "another list"),
        (paging.encode(paging.Cursor("gateways", "", ("a", "b"))), "gateways", "",
         "does not decode"),
        ("A" * 2000, "gateways", "", "longer than"),
    ],
)  # fmt: skip
def test_a_bad_token_is_refused_saying_so(token: str, kind: str, scope: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid page_token") as caught:
        paging.decode(token, kind, scope)
    assert says in str(caught.value)


def test_page_sizes_follow_aip_158() -> None:
    assert paging.page_size(0, 50) == 50
    assert paging.page_size(7, 50) == 7
    assert paging.page_size(5000, 50) == paging.MAX_PAGE_SIZE
    with pytest.raises(InvalidRequest, match="negative"):
        paging.page_size(-1, 50)


# The live model -----------------------------------------------------------------------


def test_a_live_job_applies_events_to_the_gateways_it_holds() -> None:
    gateways = tuple(
        GatewayProgress(f"gw-{n:04d}", "QUEUED", "1.0.0", "1.1.0") for n in range(FLEET)
    )
    live = LiveJob(JobView("j-1", "RUNNING", "1.1.0", gateways))
    for seq, n in enumerate(range(0, FLEET, 2), start=1):
        live.apply(JobEvent(seq, T0, f"gw-{n:04d}", "DOWNLOADING", "", "", 5, 10))
    live.apply(JobEvent(FLEET, T0, "gw-0001", "FAILED", "", "disk full"))
    live.apply(JobEvent(FLEET + 1, T0, "", "", "PARTIAL"))
    view = live.view()
    assert [g.id for g in view.gateways] == [g.id for g in gateways], "order is kept"
    assert Counter(g.state for g in view.gateways) == {
        "DOWNLOADING": FLEET // 2,
        "QUEUED": FLEET // 2 - 1,
        "FAILED": 1,
    }
    assert view.gateways[1].error == "disk full" and view.gateways[0].bytes_done == 5
    assert view.state == "PARTIAL" and live.finished


# End to end ---------------------------------------------------------------------------


@pytest.fixture
def seeded(vhost: str, tmp_path: Path, procs: Procs) -> Iterator[tuple[Fleet, Repository, str]]:
    """A controller process on SQLite whose database already holds 1,000 gateways and a
    RUNNING job to 1.1.0 on all of them (commands confirmed published, so nothing is
    dispatched), written through the repository before the controller started."""
    url = f"sqlite:///{tmp_path / 'paging' / 'controller.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    repo = Repository(engine)
    ids = [f"gw-{n:04d}" for n in range(FLEET)]
    _seed_gateways(repo, ids)
    now = datetime.now(UTC)
    repo.add_release("1.1.0", SHA, 10, "", now)
    job, _ = repo.create_job(
        "1.1.0", [(g, "1.0.0") for g in ids], deadline=now + timedelta(hours=1), now=now
    )
    repo.mark_published([g.command_id for g in job.gateways], now)
    repo.mark_running(job.id, now)
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        fleet.start_controller(url)
        yield fleet, repo, job.id
    finally:
        fleet.close()
        engine.dispose()


def _cli(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(args), env=fleet.env, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_a_fleet_of_1000_is_listed_and_watched_whole(
    seeded: tuple[Fleet, Repository, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet, repo, job_id = seeded
    stub = fleet.stub()

    # Old clients: no page_size, today's answer (the default page holds 1,000).
    whole = stub.ListGateways(controller_pb2.ListGatewaysRequest(), timeout=30)
    assert (len(whole.gateways), whole.next_page_token) == (FLEET, "")
    job = stub.GetJob(controller_pb2.GetJobRequest(job_id=job_id), timeout=30)
    assert (len(job.gateways), job.gateway_count, job.next_page_token) == (FLEET, FLEET, "")
    # Paged, and a token from one list refused by another.
    first = stub.ListGateways(controller_pb2.ListGatewaysRequest(page_size=300), timeout=30)
    assert len(first.gateways) == 300 and first.next_page_token
    for bad in ("garbage!", first.next_page_token):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJob(controller_pb2.GetJobRequest(job_id=job_id, page_token=bad), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid page_token" in (caught.value.details() or "")

    # ListJobs keeps its older limit, which is not given with a page_size.
    listed = stub.ListJobs(controller_pb2.ListJobsRequest(limit=1), timeout=30)
    assert ([j.job_id for j in listed.jobs], listed.next_page_token) == ([job_id], "")
    for request in (
        controller_pb2.ListJobsRequest(limit=1, page_size=1),
        controller_pb2.ListJobsRequest(page_token=first.next_page_token),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # WatchJob finds its job by id alone: an unknown id is NOT_FOUND, none is the latest.
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchJob(controller_pb2.WatchJobRequest(job_id="no-such-job"), timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no job with id" in (caught.value.details() or "")
    latest = stub.WatchJob(controller_pb2.WatchJobRequest(), timeout=30)
    first_event = next(latest)
    latest.cancel()
    assert (first_event.seq, first_event.gateway_id) == (1, "")

    # The CLI shows every gateway, in pages (500 a call).
    code, out, err = _cli(fleet, "gateways", "list", "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert [g["id"] for g in json.loads(out)] == [f"gw-{n:04d}" for n in range(FLEET)]
    code, out, err = _cli(fleet, "jobs", "list", "--json")
    assert (code, err) == (ExitCode.OK, "")
    assert [len(j["gateways"]) for j in json.loads(out)] == [FLEET]

    # Watch the job while 1,000 gateways finish, counting the CLI's calls.
    calls: Counter[str] = Counter()
    events = Counter[str]()
    unary, watch = client_module.ControllerClient._unary, client_module.ControllerClient.watch_job

    def counted_unary(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return unary(self, method, *args, **kwargs)

    def counted_watch(self: Any, *args: Any, **kwargs: Any) -> Iterator[JobEvent]:
        for event in watch(self, *args, **kwargs):
            events["received"] += 1
            yield event

    monkeypatch.setattr(client_module.ControllerClient, "_unary", counted_unary)
    monkeypatch.setattr(client_module.ControllerClient, "watch_job", counted_watch)
    result: list[tuple[int, str, str]] = []
    watcher = threading.Thread(
        target=lambda: result.append(_cli(fleet, "status", job_id, "--watch", "--json")),
        name="watch",
    )
    watcher.start()
    try:
        # The job's creation made 1,001 events; the watch is open once they arrive.
        wait_for(lambda: events["received"] > FLEET, timeout=30, what="the watch under way")
        opened = events["received"]
        now = datetime.now(UTC)
        current = repo.get_job(job_id)
        assert current is not None
        for row in current.gateways[:50]:
            repo.apply_report(
                ReportIn(f"r-{row.gateway_id}", job_id, row.command_id, row.gateway_id,
                         GatewayState.SUCCEEDED, "1.0.0", "1.1.0", "", 0, 0, now)
            )  # fmt: skip
        # The rest never took their command: the deadline closes them, and the job.
        repo.expire_overdue(now + timedelta(hours=2), grace=timedelta(0))
        watcher.join(timeout=60)
        assert not watcher.is_alive(), "the watch did not end with the job"
    finally:
        watcher.join(timeout=60)
    code, out, err = result[0]
    assert code == ExitCode.JOB_NOT_SUCCEEDED, err
    shown = json.loads(out)
    assert Counter(g["state"] for g in shown["gateways"]) == {
        "SUCCEEDED": 50,
        "UNREACHABLE": FLEET - 50,
    }
    assert events["received"] - opened >= FLEET, events
    # Two pages before the watch and two after it, whatever the number of events.
    assert calls["GetJob"] == 2 * (FLEET // client_module.PAGE_SIZE), (calls, events)
