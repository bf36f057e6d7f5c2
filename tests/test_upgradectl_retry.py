"""An upgrade whose answer is lost, against a real controller process and database.

The controller is made slower than upgradectl's deadline the way a busy database makes it:
the test holds the database so no job can be written (reads go on, so the plan is
answered). StartUpgrade then outlives the CLI's call, and the job appears after the CLI
has given up. The CLI must say so, with the request id, and the retry it prints must be
answered with that job rather than start a second one.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hitless.v1 import controller_pb2
from tests.support.fleet import Fleet
from tests.support.procs import Procs
from tests.support.proxy import CuttingProxy
from tests.support.rabbit import amqp_url
from tests.support.wait import wait_for
from upgradectl.build import build_release
from upgradectl.cli import run
from upgradectl.errors import ExitCode

TARGET = "99.0.0"  # newer than any version the gateway runs


@contextlib.contextmanager
def _no_job_can_be_written(db_url: str) -> Iterator[None]:
    """Hold the controller's database so writing a job waits (up to SQLite's 30 s busy
    timeout; on PostgreSQL for as long as the lock is held) while reads go on."""
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers are not blocked
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(db_url.replace("+psycopg", "")) as pg:
        # Blocks INSERT into jobs, not SELECT.
        pg.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        yield
        pg.rollback()


def _jobs(fleet: Fleet) -> list[Any]:
    return list(fleet.stub().ListJobs(controller_pb2.ListJobsRequest(), timeout=10).jobs)


@pytest.fixture
def fleet_on(db_url: str, vhost: str, tmp_path: Path, procs: Procs) -> Iterator[Fleet]:
    """A controller on ``db_url`` (SQLite and PostgreSQL) with one gateway on an old version,
    and a release ``TARGET`` to upgrade it to.

    The gateway downloads through a proxy held shut, so a job leaves it on its version and
    a retried upgrade still plans a change for it.
    """
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        # The fleet alone: this is about StartUpgrade, not the controller's own upgrade.
        fleet.start_controller(db_url, "--no-self-upgrade")
        with CuttingProxy(("127.0.0.1", fleet.gateway_port), gate=threading.Event()) as shut:
            fleet.start_gateway("gw-1", controller=f"127.0.0.1:{shut.port}")
            wait_for(
                lambda: fleet.gateways().get("gw-1", {}).get("state") == "ONLINE",
                timeout=30,
                what="gw-1 online",
                interval=0.2,
                describe=fleet.procs.dump_logs,
            )
            artifact = tmp_path / f"hitless-{TARGET}.pyz"
            build_release(TARGET, artifact)
            fleet.cli(
                "releases", "publish", "--version", TARGET, "--artifact", str(artifact),
                "--keys", str(fleet.keys.dir),
            )  # fmt: skip
            yield fleet
    finally:
        fleet.close()


def test_a_lost_answer_names_the_request_and_its_retry_starts_no_second_job(
    fleet_on: Fleet, db_url: str
) -> None:
    fleet = fleet_on
    out, err = io.StringIO(), io.StringIO()
    # No pre-check: gw-1's downloads are held shut, which its pre-check would report.
    argv = ["--controller", fleet.controller_address, "upgrade", "--version", TARGET]
    argv += ["--no-precheck", "--json"]
    with _no_job_can_be_written(db_url):
        code = run(
            argv,
            env={"HITLESS_TOKEN": fleet.token, "HITLESS_CA_CERT": str(fleet.ca_cert)},
            out=out,
            err=err,
            stdin=io.StringIO(),
            call_timeout=2.0,
        )
        assert code == ExitCode.UNCONFIRMED, err.getvalue()
        assert out.getvalue() == ""
        assert _jobs(fleet) == []  # the controller is still at it
    # The controller finishes what it was asked after the CLI gave up: the job exists.
    (job,) = wait_for(
        lambda: _jobs(fleet),
        timeout=30,
        what="the job StartUpgrade created after its caller gave up",
        describe=fleet.procs.dump_logs,
    )
    # With --json the plan is on stderr too; the error comes last.
    lines = err.getvalue().splitlines()
    message = lines[next(i for i, line in enumerate(lines) if line.startswith("upgradectl:")) :]
    assert message[0].startswith(
        f"upgradectl: error: the controller at {fleet.controller_address} did not answer "
        f"StartUpgrade (no answer within 2 s); the upgrade to {TARGET} may have started anyway "
        "(request id "
    )
    assert "'upgradectl jobs list'" in message[1] and "'upgradectl status'" in message[1]
    retry = shlex.split(message[3])
    request_id = retry[retry.index("--request-id") + 1]
    assert message[0].endswith(f"(request id {request_id})")

    # The operator runs exactly what was printed, with the real executable.
    assert retry[0] == "upgradectl"
    answer = fleet.cli(*retry[1:])
    assert answer.returncode == ExitCode.OK
    assert json.loads(answer.stdout)["job_id"] == job.job_id
    assert [j.job_id for j in _jobs(fleet)] == [job.job_id]
