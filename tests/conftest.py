"""Fixtures shared by the whole suite: a throwaway RabbitMQ vhost and PostgreSQL database
per test, and the path of the project's interpreter for spawning real processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller_svc.db import make_engine, migrate
from controller_svc.sessions import Sessions
from hitless.bus import topology
from hitless.config import BusConfig
from tests.support.browser import browser  # noqa: F401  (the fixture, for every test)
from tests.support.databases import BACKENDS, database_url
from tests.support.fleet import Fleet
from tests.support.gateway_upgrades import GatewayUpgrades
from tests.support.procs import Procs
from tests.support.rabbit import Management, amqp_url
from tests.support.wait import wait_for
from tests.test_dispatch_lifecycle import World

IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_URL = os.environ.get("HITLESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def rabbit() -> Management:
    mgmt = Management()
    if not mgmt.available():
        pytest.fail(
            "RabbitMQ's management API does not answer on 127.0.0.1:15672: start the broker "
            "(rabbitmq-server -detached) and enable the plugin "
            "(rabbitmq-plugins enable rabbitmq_management)"
        )
    return mgmt


@pytest.fixture
def vhost(rabbit: Management) -> Iterator[str]:
    """A vhost of this test's own, deleted afterwards with everything in it, and with every
    broker user whose name starts with it (the gateways' users a controller made there:
    the fleet's controller names them ``<vhost>-gateway-<id>``)."""
    name = f"hitless-test-{uuid.uuid4().hex[:12]}"
    rabbit.create_vhost(name)
    try:
        yield name
    finally:
        rabbit.delete_vhost(name)
        rabbit.delete_users(prefix=f"{name}-")


@pytest.fixture
def bus(vhost: str) -> BusConfig:
    return BusConfig(amqp_url(vhost))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of each kind the controller runs on: SQLite, and PostgreSQL."""
    return database_url(request, tmp_path)


@pytest.fixture
def sessions(db_url: str) -> Iterator[Sessions]:
    """The controller's sessions on a fresh, migrated database of each kind."""
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield Sessions(engine)
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI and does not answer: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"hitless_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real processes, each stopped with all its descendants at the end of the test."""
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def fleet(vhost: str, tmp_path: Path, procs: Procs, rabbit: Management) -> Iterator[Fleet]:
    """A running controller (SQLite) on this test's vhost, its reports and jobs queues bound
    (so a message a test publishes is routed); gateways are started by the test."""
    fleet = Fleet(procs, tmp_path, amqp_url(vhost))
    try:
        fleet.start_controller()
        for queue in (topology.CONTROLLER_REPORTS, topology.CONTROLLER_JOBS):
            exchange = queue.bindings[0].exchange.name
            wait_for(
                lambda queue=queue, exchange=exchange: rabbit.bound(vhost, exchange, queue.name),
                timeout=30,
                what=f"the controller's {queue.name} bound to {exchange}",
                describe=procs.dump_logs,
            )
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def upgrades(vhost: str, tmp_path: Path) -> Iterator[GatewayUpgrades]:
    """Releases, their signed metadata and signed commands for real gateway processes on
    this test's vhost, without a controller (``tests.support.gateway_upgrades``)."""
    driver = GatewayUpgrades(amqp_url(vhost), tmp_path / "store")
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture
def world(db_url: str, tmp_path: Path, bus: BusConfig) -> Iterator[World]:
    """A database (each backend) with gateways and a signed release, and the engines made
    on it (``World``), closed after the test."""
    world = World(db_url, tmp_path, bus)
    try:
        yield world
    finally:
        world.close()
