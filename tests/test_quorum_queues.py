"""Quorum queues on the real broker: the types and arguments declared, the broker's delivery
limit, expired commands still coming back as ``expired`` reports, and a deployment whose
queues exist as classic queues (a release before quorum queues) working on, then moved."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import quote

import pika
import pytest

from controller_svc.broker_access import BrokerAccess, QueueMove
from hitless.bus import codec, topology
from hitless.bus.amqp import Consumer, Delivery, Publisher
from hitless.bus.amqp.channel import declare, declare_topology
from hitless.config import BusConfig
from hitless.v1 import bus_pb2
from tests.support.rabbit import Management
from tests.support.wait import wait_for

MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672"
SERVICE_QUEUES = topology.SERVICE_QUEUES


def _queue(rabbit: Management, vhost: str, name: str) -> dict[str, object]:
    info: dict[str, object] = rabbit.request(
        "GET", f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
    )
    return info


def _types(rabbit: Management, vhost: str) -> dict[str, str]:
    listed = rabbit.request("GET", f"/queues/{quote(vhost, safe='')}?columns=name,type")
    return {q["name"]: q["type"] for q in listed}


def _heartbeat(gid: str) -> bus_pb2.GatewayHeartbeat:
    return bus_pb2.GatewayHeartbeat(gateway_id=gid, version="1.0.0")


def _command(gid: str) -> bus_pb2.UpgradeCommand:
    return bus_pb2.UpgradeCommand(job_id="job-1", gateway_id=gid, target_version="1.1.0")


def test_classic_keeps_the_route_and_drops_only_quorum_arguments() -> None:
    queue = topology.gateway_queue("gw-1")
    kept = topology.classic(queue)
    assert queue.quorum and not kept.quorum
    assert kept.name == queue.name and kept.bindings == queue.bindings
    assert kept.arguments == {
        "x-dead-letter-exchange": topology.REPORTS.name,
        "x-dead-letter-routing-key": "gateway.gw-1.expired",
    }
    assert topology.classic(topology.CONTROLLER_REPORTS).arguments == {
        "x-dead-letter-exchange": topology.DLX.name
    }
    assert not topology.DEAD_LETTERS.quorum


def test_the_queues_are_quorum_queues_on_the_broker(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    publisher = Publisher(bus, queues=SERVICE_QUEUES).start()
    try:
        publisher.declare([topology.gateway_queue("gw-1")])
        types = _types(rabbit, vhost)
    finally:
        publisher.close()
    assert types == {
        **{q.name: "quorum" for q in SERVICE_QUEUES},
        "hitless.gateway.gw-1": "quorum",
        topology.DEAD_LETTERS.name: "classic",
    }
    arguments = _queue(rabbit, vhost, topology.CONTROLLER_REPORTS.name)["arguments"]
    assert arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": topology.DLX.name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": topology.DELIVERY_LIMIT,
    }


def test_a_message_that_keeps_coming_back_is_dead_lettered_by_the_broker(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    """A message whose consumer never settles it (its process dies holding it: here, its
    channel closes) is dead-lettered by the broker once it has gone back DELIVERY_LIMIT
    times, body and headers untouched, the reason in x-first-death-reason."""
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    key = topology.report_key("gw-1", topology.HEARTBEAT)
    body = codec.encode(_heartbeat("gw-1"))
    try:
        publisher.publish(
            topology.REPORTS, key, body, message_id="m-poison", headers={"x-mine": "kept"}
        )
    finally:
        publisher.close()
    counts = []
    with pika.BlockingConnection(pika.URLParameters(bus.url)) as connection:
        for _ in range(topology.DELIVERY_LIMIT + 1):
            channel = connection.channel()
            # A closed channel's unacked message goes back to the queue a moment later.
            properties = wait_for(
                lambda ch=channel: ch.basic_get(topology.CONTROLLER_REPORTS.name)[1],
                interval=0.01,
                timeout=10,
                what=f"the message back in the queue after {len(counts)} deliveries",
            )
            counts.append((properties.headers or {}).get("x-delivery-count", 0))
            channel.close()  # unacked: back to the queue, as when a consumer dies
    assert counts == list(range(topology.DELIVERY_LIMIT + 1))
    dead = wait_for(
        lambda: rabbit.get_messages(vhost, topology.DEAD_LETTERS.name),
        timeout=10,
        what="the message in hitless.dead",
    )
    (message,) = dead
    headers = message["properties"]["headers"]
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-first-death-queue"] == topology.CONTROLLER_REPORTS.name
    assert headers["x-mine"] == "kept"
    assert message["properties"]["message_id"] == "m-poison"
    assert message["payload"] == body.decode()
    with pika.BlockingConnection(pika.URLParameters(bus.url)) as connection:
        left = connection.channel().queue_declare(topology.CONTROLLER_REPORTS.name, passive=True)
    assert left.method.message_count == 0


def test_an_expired_command_becomes_the_expired_report(bus: BusConfig) -> None:
    seen: list[Delivery] = []
    consumer = Consumer(bus, topology.CONTROLLER_REPORTS, seen.append, name="reports").start()
    publisher = Publisher(bus, queues=[topology.gateway_queue("gw-1")]).start()
    body = codec.encode(_command("gw-1"))
    try:
        assert consumer.wait_consuming(10)
        publisher.publish(
            topology.COMMANDS,
            topology.command_key("gw-1"),
            body,
            message_id="c-1",
            expiration_ms=50,
            headers={topology.ISSUED_AT_HEADER: "2026-01-01T00:00:00+00:00"},
        )
        (report,) = wait_for(lambda: seen, timeout=10, what="the expired report")
    finally:
        publisher.close()
        consumer.stop()
    assert report.routing_key == topology.report_key("gw-1", topology.EXPIRED)
    assert report.body == body
    assert report.message_id == "c-1"
    assert report.headers[topology.ISSUED_AT_HEADER] == "2026-01-01T00:00:00+00:00"
    assert report.headers["x-first-death-reason"] == "expired"


def _previous_release(bus: BusConfig, gateway_ids: list[str]) -> None:
    """Declare the topology as a release before quorum queues did: classic queues."""
    with pika.BlockingConnection(pika.URLParameters(bus.url)) as connection:
        channel = connection.channel()
        declare_topology(channel)
        queues = [*SERVICE_QUEUES, *(topology.gateway_queue(g) for g in gateway_ids)]
        declare(channel, [topology.classic(q) for q in queues])


def test_classic_queues_of_a_running_deployment_are_kept_then_migrated(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    _previous_release(bus, ["gw-1", "gw-2"])
    publisher = Publisher(bus, queues=SERVICE_QUEUES).start()
    key = topology.report_key("gw-1", topology.HEARTBEAT)
    try:
        # A report waiting from before the upgrade, and one sent after it.
        publisher.publish(topology.REPORTS, key, _heartbeat("before"), message_id="r-0")
        publisher.declare([topology.gateway_queue("gw-1"), topology.gateway_queue("gw-3")])
        # The previous release, still running beside the new one, declares as it did.
        _previous_release(bus, ["gw-1", "gw-2"])
        seen: list[str] = []

        def handle(delivery: Delivery) -> None:
            if delivery.routing_key.endswith(f".{topology.EXPIRED}"):
                seen.append(delivery.routing_key)
            else:
                seen.append(codec.decode(bus_pb2.GatewayHeartbeat, delivery.body).gateway_id)

        consumer = Consumer(
            bus, topology.CONTROLLER_REPORTS, handle, queues=SERVICE_QUEUES, name="reports"
        ).start()
        try:
            assert consumer.wait_consuming(10)
            publisher.publish(topology.REPORTS, key, _heartbeat("after"), message_id="r-1")
            publisher.publish(
                topology.COMMANDS,
                topology.command_key("gw-1"),
                _command("gw-1"),
                message_id="c-1",
                expiration_ms=50,
            )
            wait_for(lambda: len(seen) == 3, timeout=10, what=f"three reports, saw {seen}")
            assert seen == ["before", "after", topology.report_key("gw-1", topology.EXPIRED)]
            # The enrollment path (management API) keeps a classic queue as well.
            BrokerAccess(MANAGEMENT_URL, prefix=f"{vhost}-").enroll_gateway(vhost, "gw-2")
            types = _types(rabbit, vhost)
            assert {n: types[n] for n in [*(q.name for q in SERVICE_QUEUES)]} == dict.fromkeys(
                (q.name for q in SERVICE_QUEUES), "classic"
            )
            assert types["hitless.gateway.gw-1"] == "classic"
            assert types["hitless.gateway.gw-2"] == "classic"
            assert types["hitless.gateway.gw-3"] == "quorum"  # new: made by this release
            # In use (the consumer) or holding messages: kept, and the CLI says why.
            publisher.publish(topology.COMMANDS, topology.command_key("gw-2"), _command("gw-2"))
            done = subprocess.run(
                [sys.executable, "-m", "controller_svc.cli", "broker", "migrate-queues",
                 "--vhost", vhost],
                env={"HITLESS_BROKER_API": MANAGEMENT_URL, "PATH": "/usr/bin:/bin"},
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 3, done.stderr
            lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
            assert lines[topology.CONTROLLER_REPORTS.name].startswith("kept classic")
            assert lines["hitless.gateway.gw-2"].startswith("kept classic")
            assert lines["hitless.gateway.gw-3"] == "quorum already"
            # Empty and unused (gw-1's command expired into the expired report): moved.
            for moved in (topology.NOTIFIER_EVENTS.name, topology.CONTROLLER_JOBS.name):
                assert lines[moved] == "moved", done.stdout
            assert lines["hitless.gateway.gw-1"] == "moved", done.stdout
        finally:
            consumer.stop()
        with pika.BlockingConnection(pika.URLParameters(bus.url)) as connection:
            connection.channel().queue_purge("hitless.gateway.gw-2")
        moves = BrokerAccess(MANAGEMENT_URL).migrate_queues(vhost)
        assert {m.queue: m.outcome for m in moves} == {
            topology.CONTROLLER_JOBS.name: QueueMove.QUORUM,
            topology.CONTROLLER_REPORTS.name: QueueMove.MOVED,
            topology.NOTIFIER_EVENTS.name: QueueMove.QUORUM,
            "hitless.gateway.gw-1": QueueMove.QUORUM,
            "hitless.gateway.gw-2": QueueMove.MOVED,
            "hitless.gateway.gw-3": QueueMove.QUORUM,
        }
        types = _types(rabbit, vhost)
        assert types.pop(topology.DEAD_LETTERS.name) == "classic"
        assert set(types.values()) == {"quorum"}
        assert rabbit.bound(vhost, topology.COMMANDS.name, "hitless.gateway.gw-1")
        assert rabbit.bound(vhost, topology.REPORTS.name, topology.CONTROLLER_REPORTS.name)
        # Everything still flows on the quorum queues, the publisher reconnected or not.
        after: list[str] = []
        consumer = Consumer(
            bus, topology.CONTROLLER_REPORTS, lambda d: after.append(d.routing_key), name="r"
        ).start()
        try:
            assert consumer.wait_consuming(10)
            publisher.publish(
                topology.COMMANDS, topology.command_key("gw-1"), _command("gw-1"),
                expiration_ms=50,
            )  # fmt: skip
            wait_for(lambda: after, timeout=10, what="the expired report after migrating")
            assert after == [topology.report_key("gw-1", topology.EXPIRED)]
        finally:
            consumer.stop()
    finally:
        publisher.close()


def test_a_declare_of_the_previous_release_is_refused_by_a_quorum_queue(bus: BusConfig) -> None:
    """Why ``migrate-queues`` waits for every process of the previous release to be gone:
    RabbitMQ 3.10 refuses a declaration of a quorum queue without its quorum arguments."""
    queue = topology.gateway_queue("gw-1")
    with pika.BlockingConnection(pika.URLParameters(bus.url)) as connection:
        channel = connection.channel()
        declare_topology(channel)
        declare(channel, [queue])
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="inequivalent arg"):
            declare(channel, [topology.classic(queue)])
