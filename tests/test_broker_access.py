"""Broker users and permissions, on the real broker through its management API: what a
gateway's user may do (its own queue, its own reports) and what the broker refuses it
(another gateway's queue, reports or user_id, any declare or bind), revocation and
re-enrollment, the services' users, and the passive mode of ``hitless.bus.amqp``.

Each test has its vhost and a user-name prefix of its own; its users are deleted afterwards
(users are global on a broker, not per vhost)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from controller_svc import broker_access
from controller_svc.app import PUBLISHED_QUEUES
from controller_svc.broker_access import (
    SERVICE_GRANTS,
    BrokerAccess,
    BrokerCredentials,
    Grant,
    ManagementRefused,
    ManagementUnavailable,
    gateway_grant,
    gateway_id_of,
    gateway_user,
)
from hitless.bus import codec, topology
from hitless.bus.amqp import ORIGINAL_USER_HEADER, Consumer, DeadLetter, Delivery, Publisher
from hitless.bus.amqp.channel import connect
from hitless.config import BusConfig
from hitless.errors import ConfigError, InvalidName, PublishFailed
from hitless.v1 import bus_pb2
from tests.support.rabbit import Management, amqp_url
from tests.support.wait import wait_for

MANAGEMENT = "http://guest:guest@127.0.0.1:15672"
ROOT = Path(__file__).resolve().parents[1]
GW1_QUEUE = topology.gateway_queue("gw-1").name
GW2_QUEUE = topology.gateway_queue("gw-2").name
REPORTS_QUEUE = topology.CONTROLLER_REPORTS.name


@pytest.fixture
def prefix(rabbit: Management) -> Iterator[str]:
    """A user-name prefix of this test's own; every user under it is deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    try:
        yield prefix
    finally:
        for user in rabbit.request("GET", "/users"):
            if user["name"].startswith(prefix):
                rabbit.request("DELETE", f"/users/{quote(user['name'], safe='')}")


@pytest.fixture
def access(prefix: str) -> BrokerAccess:
    return BrokerAccess(MANAGEMENT, prefix=prefix)


def _url(vhost: str, who: BrokerCredentials) -> str:
    user, password = (quote(part, safe="") for part in who)
    return f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost, safe='')}"


@contextlib.contextmanager
def _as(vhost: str, who: BrokerCredentials) -> Iterator[pika.BlockingConnection]:
    """An AMQP connection as ``who``."""
    params = pika.URLParameters(_url(vhost, who))
    params.connection_attempts = 1
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        yield connection
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def _channel(connection: pika.BlockingConnection) -> BlockingChannel:
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def _refused(
    connection: pika.BlockingConnection, action: Callable[[BlockingChannel], Any], code: int = 403
) -> str:
    """Run ``action`` on a fresh channel: the broker must close it with ``code``."""
    channel = _channel(connection)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        action(channel)
    assert caught.value.reply_code == code, caught.value
    return str(caught.value.reply_text)


def _publish(
    key: str, exchange: str = topology.REPORTS.name, **properties: Any
) -> Callable[[BlockingChannel], None]:
    """Publish ``{}`` with ``key`` and ``properties``, confirmed and mandatory."""
    return lambda channel: channel.basic_publish(
        exchange, key, b"{}", pika.BasicProperties(**properties), mandatory=True
    )


def _payloads(rabbit: Management, vhost: str, queue: str) -> list[str]:
    return [m["payload"] for m in rabbit.get_messages(vhost, queue)]


def _assert_granted(rabbit: Management, vhost: str, user: str, grant: Grant) -> None:
    """The user holds exactly ``grant`` in ``vhost``."""
    v, u = quote(vhost, safe=""), quote(user, safe="")
    held = rabbit.request("GET", f"/permissions/{v}/{u}")
    assert (held["configure"], held["write"], held["read"]) == (
        grant.configure,
        grant.write,
        grant.read,
    )
    try:
        topics = rabbit.request("GET", f"/topic-permissions/{v}/{u}")
    except urllib.error.HTTPError as exc:  # 404: no topic permission at all
        assert exc.code == 404, exc
        topics = []
    assert sorted((t["exchange"], t["write"], t["read"]) for t in topics) == sorted(
        (t.exchange, t.write, t.read) for t in grant.topics
    )


def _at_least(count: int, messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return messages if len(messages) >= count else None


def _declare_as_guest(vhost: str, queues: tuple[topology.Queue, ...]) -> None:
    """What the controller declares at its start (it runs as guest here)."""
    connection, _ = connect(BusConfig(amqp_url(vhost)), queues)
    connection.close()


def _service_user(access: BrokerAccess, vhost: str, role: str) -> BrokerCredentials:
    who = BrokerCredentials(f"{access.prefix}{role}", broker_access.new_password())
    access.ensure_service_user(vhost, role, *who)
    return who


# Gateway users


def test_a_gateway_takes_its_own_commands_and_reports_as_itself(
    access: BrokerAccess, vhost: str, rabbit: Management, prefix: str
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    assert gw1.username == f"{prefix}gateway-gw-1"
    assert access.gateway_id_of(gw1.username) == "gw-1"
    _assert_granted(rabbit, vhost, gw1.username, gateway_grant("gw-1"))
    assert rabbit.bound(vhost, topology.COMMANDS.name, GW1_QUEUE), "enrollment binds its queue"
    assert rabbit.publish(vhost, topology.COMMANDS.name, "gateway.gw-1", "command-1")

    with _as(vhost, gw1) as connection:
        channel = _channel(connection)
        method, _, body = channel.basic_get(GW1_QUEUE)
        assert body == b"command-1"
        channel.basic_ack(method.delivery_tag)
        for kind in broker_access.GATEWAY_REPORT_KINDS:
            key = topology.report_key("gw-1", kind)
            _publish(key, user_id=gw1.username)(channel)

    reports = rabbit.get_messages(vhost, REPORTS_QUEUE)
    assert [r["routing_key"] for r in reports] == [
        topology.report_key("gw-1", kind) for kind in broker_access.GATEWAY_REPORT_KINDS
    ]
    assert {r["properties"]["user_id"] for r in reports} == {gw1.username}
    assert rabbit.get_messages(vhost, GW1_QUEUE) == []


def test_a_gateway_cannot_read_another_gateways_queue(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    access.enroll_gateway(vhost, "gw-2")
    assert rabbit.publish(vhost, topology.COMMANDS.name, "gateway.gw-2", "for gw-2 only")

    with _as(vhost, gw1) as connection:
        reason = _refused(connection, lambda ch: ch.basic_get(GW2_QUEUE))
        assert "ACCESS_REFUSED" in reason and GW2_QUEUE in reason
        _refused(connection, lambda ch: ch.basic_consume(GW2_QUEUE, lambda *_: None))
        _refused(connection, lambda ch: ch.queue_purge(GW2_QUEUE))
        _refused(connection, lambda ch: ch.queue_delete(GW2_QUEUE))

    assert _payloads(rabbit, vhost, GW2_QUEUE) == ["for gw-2 only"]


def test_a_gateway_cannot_publish_a_report_as_another(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    access.enroll_gateway(vhost, "gw-2")

    with _as(vhost, gw1) as connection:
        for key in ("gateway.gw-2.status", "gateway.gw-1.expired", "gateway.gw-10.status", "#"):
            reason = _refused(connection, _publish(key))
            assert "ACCESS_REFUSED" in reason and "topic" in reason, reason
        # Commands, events, jobs, and another queue through the default exchange.
        _refused(connection, _publish("gateway.gw-2", topology.COMMANDS.name))
        _refused(connection, _publish("job.finished", topology.EVENTS.name))
        _refused(connection, _publish("upgrade", topology.JOBS.name))
        _refused(connection, _publish(GW2_QUEUE, ""))

    assert rabbit.get_messages(vhost, REPORTS_QUEUE) == []
    assert rabbit.get_messages(vhost, GW2_QUEUE) == []


def test_refreshing_an_enrolled_gateway_grants_a_report_kind_added_since(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    """A gateway enrolled by an earlier release may not publish ``precheck`` answers;
    ``refresh_gateway`` gives it this release's grant without a new password."""
    gw1 = access.enroll_gateway(vhost, "gw-1")
    user = access.gateway_user("gw-1")
    older = r"^gateway\.gw\-1\.(status|hello|heartbeat|refused)$"
    rabbit.request(
        "PUT",
        f"/topic-permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
        {"exchange": topology.REPORTS.name, "write": older, "read": "^$"},
    )
    with _as(vhost, gw1) as connection:
        _refused(connection, _publish("gateway.gw-1.precheck"))

    assert access.refresh_gateway(vhost, "gw-1") is True
    assert access.refresh_gateway(vhost, "gw-9") is False  # never enrolled: nothing to do
    _assert_granted(rabbit, vhost, user, gateway_grant("gw-1"))
    with _as(vhost, gw1) as connection:  # the same password still works
        _channel(connection).basic_publish(
            topology.REPORTS.name, "gateway.gw-1.precheck", b"{}", mandatory=True
        )
    assert [m["routing_key"] for m in rabbit.get_messages(vhost, REPORTS_QUEUE)] == [
        "gateway.gw-1.precheck"
    ]


def test_a_gateway_cannot_claim_another_user_id(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    gw2 = access.enroll_gateway(vhost, "gw-2")

    with _as(vhost, gw1) as connection:
        for claimed in ("other", gw2.username, "guest"):
            reason = _refused(connection, _publish("gateway.gw-1.status", user_id=claimed), 406)
            assert f"user_id property set to '{claimed}'" in reason

    assert rabbit.get_messages(vhost, REPORTS_QUEUE) == []


def test_a_gateway_declares_and_binds_nothing(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    access.enroll_gateway(vhost, "gw-2")
    v = quote(vhost, safe="")
    queues_before = sorted(q["name"] for q in rabbit.request("GET", f"/queues/{v}"))

    with _as(vhost, gw1) as connection:
        bind = _refused(
            connection, lambda ch: ch.queue_bind(GW1_QUEUE, "hitless.commands", "gateway.gw-2")
        )
        assert "ACCESS_REFUSED" in bind
        _refused(connection, lambda ch: ch.queue_bind(GW1_QUEUE, "hitless.reports", "#"))
        arguments = dict(topology.gateway_queue("gw-1").arguments)
        _refused(
            connection, lambda ch: ch.queue_declare(GW1_QUEUE, durable=True, arguments=arguments)
        )
        _refused(connection, lambda ch: ch.queue_declare("hitless.gateway.gw-1x", durable=True))
        _refused(
            connection, lambda ch: ch.exchange_declare("hitless.commands", "topic", durable=True)
        )
        _refused(connection, lambda ch: ch.exchange_declare("hitless.mine", "fanout"))
        # What it may do instead: check that they exist.
        channel = connection.channel()
        for exchange in topology.EXCHANGES:
            channel.exchange_declare(exchange.name, exchange.kind, passive=True)
        channel.queue_declare(GW1_QUEUE, passive=True)

    bindings = rabbit.request("GET", f"/queues/{v}/{quote(GW1_QUEUE, safe='')}/bindings")
    assert sorted((b["source"], b["routing_key"]) for b in bindings) == [
        ("", GW1_QUEUE),
        (topology.COMMANDS.name, "gateway.gw-1"),
    ]
    assert sorted(q["name"] for q in rabbit.request("GET", f"/queues/{v}")) == queues_before
    assert rabbit.publish(vhost, topology.COMMANDS.name, "gateway.gw-2", "for gw-2")
    assert rabbit.get_messages(vhost, GW1_QUEUE) == []


def _closed_by_broker(connection: pika.BlockingConnection) -> str | None:
    """Why the broker closed ``connection`` (None while it is open)."""
    try:
        connection.process_data_events(time_limit=0)
    except pika.exceptions.ConnectionClosedByBroker as exc:
        return f"{exc.reply_code} {exc.reply_text}"
    return None


def test_revoking_a_gateway_closes_its_connection_and_it_cannot_connect_again(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    gw1 = access.enroll_gateway(vhost, "gw-1")
    with _as(vhost, gw1) as connection:
        channel = connection.channel()
        channel.basic_consume(GW1_QUEUE, lambda *_: None)
        access.revoke_gateway(vhost, "gw-1")
        closed = wait_for(
            lambda: _closed_by_broker(connection),
            timeout=5,
            what="the broker to close the revoked user's connection",
        )
        assert closed.startswith("320 CONNECTION_FORCED"), closed

    with pytest.raises(pika.exceptions.ProbableAuthenticationError), _as(vhost, gw1):
        pass
    access.revoke_gateway(vhost, "gw-1")  # again: nothing to do
    assert access.gateway_user("gw-1") not in {u["name"] for u in rabbit.request("GET", "/users")}
    assert rabbit.bound(vhost, topology.COMMANDS.name, GW1_QUEUE), "its queue stays"


def test_enrolling_again_replaces_the_password_and_closes_old_connections(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    old = access.enroll_gateway(vhost, "gw-1")
    assert rabbit.publish(vhost, topology.COMMANDS.name, "gateway.gw-1", "kept")
    with _as(vhost, old) as connection:
        new = access.enroll_gateway(vhost, "gw-1")
        wait_for(
            lambda: _closed_by_broker(connection),
            timeout=5,
            what="the broker to close the connection made with the old password",
        )

    assert new.username == old.username and new.password != old.password
    assert "password='***'" in repr(new) and new.password not in repr(new)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError), _as(vhost, old):
        pass
    with _as(vhost, new) as connection:
        _, _, body = connection.channel().basic_get(GW1_QUEUE, auto_ack=True)
    assert body == b"kept", "enrolling again keeps the queue and what waits in it"
    _assert_granted(rabbit, vhost, new.username, gateway_grant("gw-1"))


def test_a_user_name_held_by_someone_else_is_never_taken_over(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    admin_name = access.gateway_user("gw-1")
    rabbit.request("PUT", f"/users/{admin_name}", {"password": "x", "tags": "administrator"})
    with pytest.raises(ManagementRefused, match="administrator"):
        access.enroll_gateway(vhost, "gw-1")
    with pytest.raises(ManagementRefused, match="administrator"):
        access.revoke_gateway(vhost, "gw-1")
    assert rabbit.request("GET", f"/users/{admin_name}")["tags"] == ["administrator"]

    # A gateway of another deployment (another vhost) under the same prefix.
    elsewhere = access.gateway_user("gw-2")
    rabbit.request("PUT", f"/users/{elsewhere}", {"password": "x", "tags": ""})
    rabbit.request(
        "PUT", f"/permissions/%2F/{elsewhere}", {"configure": "^$", "write": "^$", "read": "^$"}
    )
    with pytest.raises(ManagementRefused, match="another deployment"):
        access.enroll_gateway(vhost, "gw-2")
    with pytest.raises(ManagementRefused, match="another deployment"):
        access.revoke_gateway(vhost, "gw-2")
    assert rabbit.request("GET", f"/users/{elsewhere}")["name"] == elsewhere

    for name in ("guest", access.gateway_user("gw-3")):
        with pytest.raises(ManagementRefused, match="management user or a gateway's"):
            access.ensure_service_user(vhost, broker_access.NOTIFIER, name, "pw")
    assert rabbit.request("GET", "/users/guest")["tags"] == ["administrator"]


# Service users


def test_a_job_publisher_publishes_jobs_and_nothing_else(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    _declare_as_guest(vhost, PUBLISHED_QUEUES)
    jobs = _service_user(access, vhost, broker_access.JOB_PUBLISHER)
    _assert_granted(rabbit, vhost, jobs.username, SERVICE_GRANTS[broker_access.JOB_PUBLISHER])

    with _as(vhost, jobs) as connection:
        _publish("upgrade", topology.JOBS.name, user_id=jobs.username)(_channel(connection))
        topic = _refused(connection, _publish("other", topology.JOBS.name))
        assert "topic 'other'" in topic
        for exchange, key in (
            (topology.COMMANDS.name, "gateway.gw-1"),
            (topology.EVENTS.name, "job.finished"),
            (topology.REPORTS.name, "gateway.gw-1.status"),
            (topology.DLX.name, ""),
        ):
            _refused(connection, _publish(key, exchange))
        _refused(connection, lambda ch: ch.basic_get(topology.CONTROLLER_JOBS.name))
        _refused(connection, lambda ch: ch.exchange_declare("hitless.jobs", "topic", durable=True))
    # The management UI's way, as that person.
    as_person = Management(user=jobs.username, password=jobs.password)
    assert as_person.publish(vhost, topology.JOBS.name, "upgrade", "{}", message_id="ui-1")

    found = rabbit.get_messages(vhost, topology.CONTROLLER_JOBS.name)
    assert [m["properties"].get("user_id") for m in found] == [jobs.username, None]
    assert rabbit.get_messages(vhost, topology.CONTROLLER_REPORTS.name) == []
    assert rabbit.get_messages(vhost, topology.DEAD_LETTERS.name) == []


def test_the_notifier_consumes_its_queue_and_dead_letters_and_publishes_nothing_else(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    _declare_as_guest(vhost, PUBLISHED_QUEUES)
    notifier = _service_user(access, vhost, broker_access.NOTIFIER)
    _assert_granted(rabbit, vhost, notifier.username, SERVICE_GRANTS[broker_access.NOTIFIER])

    def refuse(delivery: Delivery) -> None:
        raise DeadLetter(f"cannot take {delivery.message_id}")

    consumer = Consumer(
        BusConfig(_url(vhost, notifier)),
        topology.NOTIFIER_EVENTS,
        refuse,
        name="test-notifier",
        passive=True,
    ).start()
    try:
        assert consumer.wait_consuming(10), "the notifier's user could not consume"
        assert rabbit.publish(vhost, topology.EVENTS.name, "job.finished", "{}", message_id="e1")
        (dead,) = wait_for(
            lambda: rabbit.get_messages(vhost, topology.DEAD_LETTERS.name),
            timeout=10,
            what="the event dead-lettered",
        )
    finally:
        consumer.stop()
    assert dead["properties"]["headers"][topology.REASON_HEADER] == "cannot take e1"
    assert "user_id" not in dead["properties"]
    assert consumer.dead_letter_failures == 0
    assert rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name) == []

    with _as(vhost, notifier) as connection:
        _refused(connection, _publish("gateway.gw-1", topology.COMMANDS.name))
        _refused(connection, _publish("job.finished", topology.EVENTS.name))
        _refused(connection, lambda ch: ch.basic_get(topology.CONTROLLER_REPORTS.name))
        _refused(connection, lambda ch: ch.queue_declare("hitless.notifier.events", durable=True))


def test_the_controller_declares_its_topology_and_cannot_publish_jobs(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    """On an empty vhost, as the controller runs: declare everything, every gateway's
    queue, publish commands, events and dead letters, consume reports."""
    controller = _service_user(access, vhost, broker_access.CONTROLLER)
    _assert_granted(rabbit, vhost, controller.username, SERVICE_GRANTS[broker_access.CONTROLLER])
    bus = BusConfig(_url(vhost, controller))
    seen: list[str] = []
    consumer = Consumer(
        bus,
        topology.CONTROLLER_REPORTS,
        lambda d: seen.append(d.routing_key),
        queues=PUBLISHED_QUEUES,
        name="test-controller",
    ).start()
    publisher = Publisher(bus, queues=PUBLISHED_QUEUES, name="test-controller-publisher").start()
    try:
        assert publisher.wait_connected(10) and consumer.wait_consuming(10)
        publisher.declare([topology.gateway_queue("gw-9")])
        command = bus_pb2.UpgradeCommand(command_id="c-1", gateway_id="gw-9")
        publisher.publish(topology.COMMANDS, topology.command_key("gw-9"), command)
        publisher.publish(topology.EVENTS, topology.JOB_FINISHED, bus_pb2.Event(event_id="e-1"))
        publisher.dead_letter(b"{}", "could not send", source="test")
        with pytest.raises(PublishFailed, match="403"):
            publisher.publish(topology.JOBS, "upgrade", b"{}", timeout=10)
        assert rabbit.publish(vhost, topology.REPORTS.name, "gateway.gw-9.hello", "{}")
        wait_for(lambda: seen, timeout=10, what="a report consumed by the controller's user")
    finally:
        publisher.close()
        consumer.stop()
    assert seen == ["gateway.gw-9.hello"]
    assert _payloads(rabbit, vhost, topology.gateway_queue("gw-9").name) == [
        codec.encode(command).decode()
    ]
    assert len(rabbit.get_messages(vhost, topology.NOTIFIER_EVENTS.name)) == 1
    assert _payloads(rabbit, vhost, topology.DEAD_LETTERS.name) == ["{}"]
    with _as(vhost, controller) as connection:
        _refused(connection, lambda ch: ch.basic_get(topology.DEAD_LETTERS.name))


def test_dead_lettering_never_republishes_a_user_the_publisher_only_claimed(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    """A job publisher puts the dead-letter header naming another user on its message: the
    controller's copy in hitless.dead names only the broker-validated publisher, and never
    carries a user_id."""
    _declare_as_guest(vhost, PUBLISHED_QUEUES)
    jobs = _service_user(access, vhost, broker_access.JOB_PUBLISHER)
    controller = _service_user(access, vhost, broker_access.CONTROLLER)
    claimed = {ORIGINAL_USER_HEADER: "admin"}
    with _as(vhost, jobs) as connection:
        channel = _channel(connection)
        _publish("upgrade", topology.JOBS.name, message_id="anonymous", headers=claimed)(channel)
        _publish(
            "upgrade",
            topology.JOBS.name,
            message_id="signed",
            headers=claimed,
            user_id=jobs.username,
        )(channel)

    def refuse(delivery: Delivery) -> None:
        raise DeadLetter("refused")

    consumer = Consumer(
        BusConfig(_url(vhost, controller)), topology.CONTROLLER_JOBS, refuse, name="test-jobs"
    ).start()
    try:
        dead = wait_for(
            lambda: _at_least(2, rabbit.get_messages(vhost, topology.DEAD_LETTERS.name)),
            timeout=10,
            what="both jobs dead-lettered",
        )
    finally:
        consumer.stop()
    by_id = {m["properties"]["message_id"]: m["properties"] for m in dead}
    assert ORIGINAL_USER_HEADER not in by_id["anonymous"]["headers"]
    assert by_id["signed"]["headers"][ORIGINAL_USER_HEADER] == jobs.username
    assert all("user_id" not in properties for properties in by_id.values())
    assert consumer.dead_letter_failures == 0


# The passive mode of hitless.bus.amqp


def test_a_gateway_user_runs_the_bus_clients_in_passive_mode(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    """As gateway_daemon does: a Publisher and a Consumer on its queue, with the queues the
    daemon names, reports published, a refused command dead-lettered."""
    gw1 = access.enroll_gateway(vhost, "gw-1")
    bus = BusConfig(_url(vhost, gw1))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
        connect(bus, [])  # the default declares, which a gateway's user may not

    handled: list[str] = []
    lock = threading.Lock()

    def handle(delivery: Delivery) -> None:
        with lock:
            handled.append(delivery.message_id or "")
        if delivery.message_id == "refuse":
            raise DeadLetter("not signed")

    queues = [topology.gateway_queue("gw-1"), topology.CONTROLLER_REPORTS]
    publisher = Publisher(bus, queues=queues, name="test-gw-publisher", passive=True).start()
    consumer = Consumer(
        bus,
        topology.gateway_queue("gw-1"),
        handle,
        passive=True,
        queues=[topology.CONTROLLER_REPORTS],
        name="test-gw",
    ).start()
    try:
        assert publisher.wait_connected(10), "the passive publisher did not connect"
        assert consumer.wait_consuming(10), "the passive consumer did not consume"
        publisher.declare([topology.gateway_queue("gw-1")])
        hello = bus_pb2.GatewayHello(gateway_id="gw-1", version="1.0.0")
        key = topology.report_key("gw-1", topology.HELLO)
        publisher.publish(topology.REPORTS, key, hello, user_id=gw1.username)
        with pytest.raises(PublishFailed, match="PRECONDITION_FAILED"):
            publisher.publish(topology.REPORTS, key, hello, user_id="other", timeout=10)
        with pytest.raises(PublishFailed, match="ACCESS_REFUSED"):
            publisher.publish(
                topology.REPORTS, topology.report_key("gw-2", topology.HELLO), hello, timeout=10
            )
        for message_id in ("run", "refuse"):
            assert rabbit.publish(
                vhost, topology.COMMANDS.name, "gateway.gw-1", "{}", message_id=message_id
            )
        wait_for(lambda: len(handled) == 2, timeout=10, what="both commands handled")
        (dead,) = wait_for(
            lambda: rabbit.get_messages(vhost, topology.DEAD_LETTERS.name),
            timeout=10,
            what="the refused command dead-lettered",
        )
    finally:
        consumer.stop()
        publisher.close()
    assert sorted(handled) == ["refuse", "run"]
    assert dead["properties"]["headers"][topology.REASON_HEADER] == "not signed"
    assert "user_id" not in dead["properties"]
    assert consumer.dead_letter_failures == 0
    (report,) = rabbit.get_messages(vhost, REPORTS_QUEUE)
    assert report["routing_key"] == "gateway.gw-1.hello"
    assert access.gateway_id_of(report["properties"]["user_id"]) == "gw-1"
    assert rabbit.get_messages(vhost, GW1_QUEUE) == []


def test_passive_mode_waits_for_the_topology_to_exist(vhost: str) -> None:
    """Passive declares check and never create: on an empty vhost, a 404 NOT_FOUND."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        connect(BusConfig(amqp_url(vhost)), [], passive=True)
    _declare_as_guest(vhost, ())
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        connect(BusConfig(amqp_url(vhost)), [topology.CONTROLLER_REPORTS], passive=True)
    _declare_as_guest(vhost, (topology.CONTROLLER_REPORTS,))
    connection, _ = connect(BusConfig(amqp_url(vhost)), [topology.CONTROLLER_REPORTS], passive=True)
    connection.close()


# Errors of the management API


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_management_errors_say_what_to_do(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    with pytest.raises(ManagementRefused, match="401") as wrong:
        BrokerAccess("http://guest:wrong@127.0.0.1:15672").check()
    assert "wrong" not in str(wrong.value), "the password never shows in a message"

    person = _service_user(access, vhost, broker_access.JOB_PUBLISHER)
    user, password = (quote(part, safe="") for part in person)
    as_person = BrokerAccess(f"http://{user}:{password}@127.0.0.1:15672", prefix=access.prefix)
    with pytest.raises(ManagementRefused, match="lacks the administrator tag"):
        as_person.enroll_gateway(vhost, "gw-1")

    with pytest.raises(ManagementUnavailable, match="rabbitmq-plugins enable rabbitmq_management"):
        BrokerAccess(f"http://guest:guest@127.0.0.1:{_free_port()}", timeout=2).check()
    with pytest.raises(ManagementRefused, match="does not exist"):
        access.enroll_gateway(f"no-such-{uuid.uuid4().hex}", "gw-1")
    with pytest.raises(ManagementRefused, match="unknown broker role"):
        access.ensure_service_user(vhost, "admin", f"{access.prefix}x", "pw")
    with pytest.raises(InvalidName):
        access.enroll_gateway(vhost, "gw.1")
    with pytest.raises(ConfigError, match="no user and password"):
        BrokerAccess("http://127.0.0.1:15672")
    assert access.gateway_user("gw-1") not in {u["name"] for u in rabbit.request("GET", "/users")}


def test_the_broker_refuses_a_gateway_queue_declared_otherwise(
    access: BrokerAccess, vhost: str, rabbit: Management
) -> None:
    v = quote(vhost, safe="")
    rabbit.request("PUT", f"/queues/{v}/{GW1_QUEUE}", {"durable": True, "arguments": {}})
    with pytest.raises(ManagementRefused, match="inequivalent arg"):
        access.enroll_gateway(vhost, "gw-1")


# Names and the table


def test_gateway_user_names_map_back_to_gateways() -> None:
    assert gateway_user("hitless-", "gw-1") == "hitless-gateway-gw-1"
    assert gateway_user("", "A_b-9") == "gateway-A_b-9"
    assert gateway_id_of("hitless-", "hitless-gateway-gw-1") == "gw-1"
    for user in (
        "hitless-gateway-",
        "hitless-gateway-gw.1",
        "other-gateway-gw-1",
        "hitless-controller",
        "gateway-gw-1",
        "",
        None,
    ):
        assert gateway_id_of("hitless-", user) is None, user
    with pytest.raises(InvalidName):
        gateway_user("hitless-", "gw-1.status")
    with pytest.raises(ConfigError):
        gateway_user("bad prefix ", "gw-1")


def test_a_gateways_patterns_match_its_own_names_only() -> None:
    grant = gateway_grant("gw-1")
    (topic,) = grant.topics
    assert grant.read == r"^hitless\.gateway\.gw\-1$"
    assert re.fullmatch(grant.read, GW1_QUEUE)
    assert not re.fullmatch(grant.read, "hitless.gateway.gw-10")
    for kind in broker_access.GATEWAY_REPORT_KINDS:
        assert re.fullmatch(topic.write, topology.report_key("gw-1", kind))
    for key in ("gateway.gw-2.status", "gateway.gw-1.expired", "gateway.gw-1x.status"):
        assert not re.fullmatch(topic.write, key), key
    assert grant.configure == "^$" and grant.passive


def test_the_readme_shows_the_permissions_the_controller_sets() -> None:
    table = broker_access.readme_table()
    assert r"`^hitless\.gateway\.<id>$`" in table
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README.md must carry broker_access.readme_table() as it is"
