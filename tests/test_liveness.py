"""OFFLINE is judged against each gateway's own heartbeat interval, which its hello
carries, or at once when its last heartbeat said it stops: the rule on plain records, then
real hellos and heartbeats through the broker into the controller's database (SQLite and
PostgreSQL) and back out of its API, then a real gateway stopped and upgraded."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller_svc import db
from controller_svc.liveness import DEFAULT_HEARTBEAT_INTERVAL, gateway_state, offline_after
from controller_svc.records import GatewayRecord
from controller_svc.repository import Repository
from gateway_daemon.reporter import Reporter
from hitless.bus import topology
from hitless.bus.topology import REPORTS
from hitless.v1 import controller_pb2
from tests.support.databases import BACKENDS, database_url
from tests.support.fleet import Fleet
from tests.support.procs import Procs
from tests.support.rabbit import Management, amqp_url
from tests.support.wait import wait_for

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def _heard(ago_s: float, interval: timedelta | None, *, busy: bool = False) -> GatewayRecord:
    at = NOW - timedelta(seconds=ago_s)
    return GatewayRecord("gw-1", "1.0.0", at, at, busy, heartbeat_interval=interval)


def test_a_gateway_with_a_30_s_interval_heard_40_s_ago_is_online() -> None:
    assert gateway_state(_heard(40, timedelta(seconds=30)), NOW) == "ONLINE"


def test_a_gateway_with_a_5_s_interval_heard_40_s_ago_is_offline() -> None:
    assert gateway_state(_heard(40, timedelta(seconds=5)), NOW) == "OFFLINE"


def test_offline_after_three_of_the_gateways_own_intervals() -> None:
    interval = timedelta(seconds=30)
    assert offline_after(_heard(0, interval)) == timedelta(seconds=90)
    assert gateway_state(_heard(90, interval), NOW) == "ONLINE"
    assert gateway_state(_heard(90.001, interval), NOW) == "OFFLINE"


def test_a_gateway_that_announced_no_interval_gets_the_default() -> None:
    # A gateway of an earlier release: its hello carries no interval.
    assert offline_after(_heard(0, None)) == 3 * DEFAULT_HEARTBEAT_INTERVAL
    default_s = DEFAULT_HEARTBEAT_INTERVAL.total_seconds()
    assert gateway_state(_heard(3 * default_s, None), NOW) == "ONLINE"
    assert gateway_state(_heard(3 * default_s + 0.001, None), NOW) == "OFFLINE"


def test_a_gateway_in_an_unfinished_job_is_upgrading_whatever_its_interval() -> None:
    assert gateway_state(_heard(3600, timedelta(seconds=1), busy=True), NOW) == "UPGRADING"


def test_a_gateway_whose_last_message_said_it_stops_is_offline_at_once() -> None:
    stopped = dataclasses.replace(_heard(0, timedelta(seconds=30)), stopped=True)
    assert gateway_state(stopped, NOW) == "OFFLINE"
    assert gateway_state(dataclasses.replace(stopped, busy=True), NOW) == "UPGRADING"


@pytest.fixture(params=BACKENDS)
def controller(
    request: pytest.FixtureRequest, vhost: str, tmp_path: Path, procs: Procs, rabbit: Management
) -> Iterator[tuple[Fleet, Repository]]:
    """A controller process on each database, its reports queue bound, and a repository
    on the same database for reading what it stored."""
    url = database_url(request, tmp_path)
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    engine = None
    try:
        fleet.start_controller(url)
        queue = topology.CONTROLLER_REPORTS
        wait_for(
            lambda: rabbit.bound(vhost, queue.bindings[0].exchange.name, queue.name),
            timeout=30,
            what="the controller's reports queue bound",
            describe=procs.dump_logs,
        )
        engine = db.make_engine(url)
        yield fleet, Repository(engine)
    finally:
        fleet.close()
        if engine is not None:
            engine.dispose()


def test_hellos_through_the_broker_carry_each_gateways_interval_into_its_liveness(
    controller: tuple[Fleet, Repository],
) -> None:
    fleet, repo = controller
    # The gateway's own hello code, each logged in as that gateway's broker user.
    for gateway_id, interval_s in (("gw-slow", 30.0), ("gw-fast", 0.2)):
        with fleet.as_gateway(gateway_id) as publisher:
            Reporter(publisher, gateway_id, "1.0.0").hello(["127.0.0.1:1"], interval_s)
    # A gateway of the previous release says nothing of its interval.
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    old = {"gateway_id": "gw-old", "version": "0.9.0", "pid": 7, "at": at}
    with fleet.as_gateway("gw-old") as publisher:
        publisher.publish(REPORTS, "gateway.gw-old.hello", json.dumps(old).encode())

    def stored() -> dict[str, GatewayRecord] | None:
        found = {g: repo.get_gateway(g) for g in ("gw-slow", "gw-fast", "gw-old")}
        if any(record is None for record in found.values()):
            return None
        return {g: record for g, record in found.items() if record is not None}

    records = wait_for(stored, timeout=20, what="the three hellos recorded")
    assert records["gw-slow"].heartbeat_interval == timedelta(seconds=30)
    assert records["gw-fast"].heartbeat_interval == timedelta(milliseconds=200)
    assert records["gw-old"].heartbeat_interval is None

    def states() -> dict[str, str]:
        answer = fleet.stub().ListGateways(controller_pb2.ListGatewaysRequest(), timeout=5)
        return {g.id: g.state for g in answer.gateways}

    # Three missed 0.2 s heartbeats make gw-fast OFFLINE within a second; with the old
    # constant (15 s for everyone) it would stay ONLINE past this deadline.
    seen = wait_for(
        lambda: (s := states()).get("gw-fast") == "OFFLINE" and s,
        timeout=10,
        what="gw-fast OFFLINE after three missed 0.2 s heartbeats",
    )
    assert seen["gw-slow"] == "ONLINE", seen
    assert seen["gw-old"] == "ONLINE", seen


def _state(fleet: Fleet, gateway_id: str) -> str:
    answer = fleet.stub().ListGateways(controller_pb2.ListGatewaysRequest(), timeout=5)
    return next((g.state for g in answer.gateways if g.id == gateway_id), "")


def test_a_stopping_heartbeat_makes_its_gateway_offline_until_it_is_heard_again(
    controller: tuple[Fleet, Repository],
) -> None:
    fleet, _ = controller
    with fleet.as_gateway("gw-1") as publisher:
        reporter = Reporter(publisher, "gw-1", "1.0.0")
        reporter.hello(["127.0.0.1:1"], 30.0)
        wait_for(lambda: _state(fleet, "gw-1") == "ONLINE", timeout=20, what="gw-1 ONLINE")
        reporter.heartbeat(stopping=True)
        # Three missed 30 s heartbeats would take 90 s.
        wait_for(
            lambda: _state(fleet, "gw-1") == "OFFLINE", timeout=10, what="gw-1 OFFLINE at once"
        )
        reporter.heartbeat()
        wait_for(lambda: _state(fleet, "gw-1") == "ONLINE", timeout=10, what="gw-1 ONLINE again")


def test_a_gateway_that_stops_says_so_and_one_that_upgrades_does_not(fleet: Fleet) -> None:
    """A real gateway (heartbeats every 30 s): an upgrade hands over and retires the old
    agent without a word, so the gateway stays ONLINE; SIGTERM stops the gateway, whose
    agent says so, and it is OFFLINE long before three heartbeats are missed."""
    gateway = fleet.start_gateway("gw-1", None, "--heartbeat-interval", "30")
    fleet.wait_gateways({"gw-1": "1.0.0"})
    fleet.release("1.1.0")
    fleet.cli("upgrade", "--latest", "--yes", "--wait", "--no-precheck")
    fleet.wait_gateways({"gw-1": "1.1.0"})
    assert fleet.controller is not None
    assert '"gateway_stopping"' not in fleet.controller.log(), "an upgrade is no stop"
    assert _state(fleet, "gw-1") == "ONLINE"

    os.kill(_serving_pid(gateway.log()), signal.SIGTERM)
    wait_for(lambda: _state(fleet, "gw-1") == "OFFLINE", timeout=15, what="gw-1 OFFLINE")
    assert '"gateway_stopping"' in fleet.controller.log()


def _serving_pid(log: str) -> int:
    """The pid in the last ``gateway_serving`` line of a gateway's log (every process of
    the gateway writes to it): the forwarding process that serves now."""
    pids = [
        int(json.loads(line)["pid"])
        for line in log.splitlines()
        if line.startswith("{") and '"gateway_serving"' in line
    ]
    assert pids, "no gateway process said it serves"
    return pids[-1]
