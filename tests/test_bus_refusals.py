"""What the broker refuses for one message fails that message alone, on the real broker:
the publisher goes on with the next one at once, and a consumer settles a message it
cannot dead-letter instead of taking it back forever."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from hitless.backoff import Backoff
from hitless.bus import codec, topology
from hitless.bus.amqp import (
    MAX_PROPERTIES_BYTES,
    ORIGINAL_USER_HEADER,
    Consumer,
    DeadLetter,
    Delivery,
    Publisher,
)
from hitless.bus.topology import Exchange, Queue
from hitless.config import BusConfig
from hitless.errors import PublishFailed
from hitless.v1 import bus_pb2
from tests.support.proxy import CuttingProxy
from tests.support.rabbit import Management, amqp_url
from tests.support.wait import wait_for

# Far below the 30 s a caller waits for a broker that does not answer: a refusal is an
# answer, and comes at once.
REFUSAL_S = 10.0


def _beat(gid: str) -> bus_pb2.GatewayHeartbeat:
    return bus_pb2.GatewayHeartbeat(gateway_id=gid, version="1.0.0")


@pytest.fixture
def publisher(bus: BusConfig) -> Iterator[Publisher]:
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS], name="test-publisher")
    publisher.start()
    assert publisher.wait_connected(10)
    try:
        yield publisher
    finally:
        publisher.close()


def _still_publishes(publisher: Publisher, rabbit: Management, vhost: str, tag: str) -> None:
    """A good message published after the refusal arrives in its queue."""
    key = topology.report_key("gw-ok", topology.HEARTBEAT)
    publisher.publish(topology.REPORTS, key, _beat("gw-ok"), message_id=tag, timeout=REFUSAL_S)
    found = rabbit.get_messages(vhost, topology.CONTROLLER_REPORTS.name, count=100)
    assert tag in {m["properties"].get("message_id") for m in found}


def _refused_quickly(action: object, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(PublishFailed, match=match):
        action()  # type: ignore[operator]
    assert time.monotonic() - started < REFUSAL_S


@pytest.mark.parametrize(
    ("what", "queue_name", "match"),
    [
        ("too long in characters", "hitless.gateway." + "x" * 250, "ShortStringTooLong"),
        ("too long in bytes", "hitless.gateway." + "é" * 120, "ShortStringTooLong"),
        ("reserved by the broker", "amq.hitless", "ACCESS_REFUSED"),
    ],
)
def test_a_queue_the_broker_refuses_fails_alone(
    publisher: Publisher,
    rabbit: Management,
    vhost: str,
    what: str,
    queue_name: str,
    match: str,
) -> None:
    bad = Queue(queue_name, (topology.Binding(topology.COMMANDS, "gateway.bad"),))
    _refused_quickly(lambda: publisher.declare([bad], timeout=30), match)
    _still_publishes(publisher, rabbit, vhost, f"after-{what}")
    # The refused queue is not kept: a reconnect must not declare it again, forever.
    good = topology.gateway_queue("gw-1")
    publisher.declare([good], timeout=REFUSAL_S)
    names = {q["name"] for q in rabbit.request("GET", f"/queues/{vhost}")}
    assert good.name in names and queue_name not in names


def test_a_message_the_broker_refuses_fails_alone(
    publisher: Publisher, rabbit: Management, vhost: str
) -> None:
    key = topology.report_key("gw-1", topology.HEARTBEAT)
    missing = Exchange("hitless.no-such-exchange", "topic")
    _refused_quickly(lambda: publisher.publish(missing, key, _beat("a"), timeout=30), "NOT_FOUND")
    _refused_quickly(
        lambda: publisher.publish(topology.REPORTS, "k" * 300, _beat("a"), timeout=30),
        "ShortStringTooLong",
    )
    _refused_quickly(
        lambda: publisher.publish(
            topology.REPORTS, key, _beat("a"), headers={"big": "x" * MAX_PROPERTIES_BYTES}
        ),
        "properties and headers take",
    )
    _refused_quickly(
        lambda: publisher.publish(topology.REPORTS, key, _beat("a"), expiration_ms=2**32),
        "TTL",
    )
    _still_publishes(publisher, rabbit, vhost, "after-refusals")
    found = rabbit.get_messages(vhost, topology.CONTROLLER_REPORTS.name, count=100)
    assert [m["properties"].get("message_id") for m in found] == ["after-refusals"], (
        "nothing refused may have been delivered"
    )


@pytest.fixture
def other_user(rabbit: Management, vhost: str) -> Iterator[tuple[str, str]]:
    """A second broker user with full rights on this test's vhost (an admin publishing from
    the management UI), removed afterwards."""
    name, password = f"ops-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit.request("PUT", f"/users/{name}", {"password": password, "tags": "management"})
    rabbit.request(
        "PUT", f"/permissions/{vhost}/{name}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    try:
        yield name, password
    finally:
        rabbit.request("DELETE", f"/users/{name}")


def test_a_message_published_by_another_user_is_dead_lettered_once(
    bus: BusConfig, vhost: str, rabbit: Management, other_user: tuple[str, str]
) -> None:
    """Its user_id names a user the consumer is not: republished as it came, the broker
    would refuse it and it would be redelivered forever."""
    name, password = other_user
    handled: list[str] = []
    lock = threading.Lock()

    def handle(delivery: Delivery) -> None:
        with lock:
            handled.append(delivery.message_id or "")
        if delivery.message_id == "refused":
            raise DeadLetter("refused by the handler")

    source = topology.CONTROLLER_JOBS
    consumer = Consumer(bus, source, handle, name="test-jobs").start()
    try:
        assert consumer.wait_consuming(10)
        as_other = Management(user=name, password=password)
        for message_id in ("refused", "after"):
            assert as_other.publish(
                vhost, topology.JOBS.name, "upgrade", "{}", message_id=message_id, user_id=name
            )
        wait_for(lambda: "after" in handled, timeout=15, what="the next message handled")
        dead = wait_for(
            lambda: rabbit.get_messages(vhost, topology.DEAD_LETTERS.name),
            timeout=10,
            what="the refused message dead-lettered",
        )
        (message,) = dead
        headers = message["properties"]["headers"]
        assert message["payload"] == "{}"
        assert headers[topology.REASON_HEADER] == "refused by the handler"
        assert headers[ORIGINAL_USER_HEADER] == name
        assert "user_id" not in message["properties"]
        assert as_other.publish(
            vhost, topology.JOBS.name, "upgrade", "{}", message_id="last", user_id=name
        )
        wait_for(lambda: "last" in handled, timeout=15, what="a later message handled")
        assert handled.count("refused") == 1, f"redelivered: {handled}"
        assert rabbit.get_messages(vhost, source.name) == [], "nothing may wait in the queue"
        assert consumer.dead_letter_failures == 0
    finally:
        consumer.stop()


def test_a_message_that_cannot_be_dead_lettered_is_settled_and_counted(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    """With the dead-letter exchange gone, dead-lettering fails: the message is acked all
    the same (logged and counted) and the next one is handled."""
    handled: list[str] = []
    consumer = Consumer(
        bus,
        topology.CONTROLLER_REPORTS,
        lambda d: _note_and_refuse(handled, d),
        name="test-reports",
    ).start()
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    try:
        assert consumer.wait_consuming(10)
        rabbit.request("DELETE", f"/exchanges/{vhost}/{topology.DLX.name}")
        key = topology.report_key("gw-1", topology.HEARTBEAT)
        for message_id in ("poison", "next"):
            publisher.publish(topology.REPORTS, key, _beat("a"), message_id=message_id)
        wait_for(lambda: "next" in handled, timeout=15, what="the next message handled")
        wait_for(lambda: consumer.dead_letter_failures == 1, timeout=10, what="the failure counted")
        publisher.publish(topology.REPORTS, key, _beat("a"), message_id="last")
        wait_for(lambda: "last" in handled, timeout=15, what="a later message handled")
        assert handled.count("poison") == 1, f"redelivered: {handled}"
        assert rabbit.get_messages(vhost, topology.CONTROLLER_REPORTS.name) == []
    finally:
        consumer.stop()
        publisher.close()


def _note_and_refuse(handled: list[str], delivery: Delivery) -> None:
    handled.append(delivery.message_id or "")
    if delivery.message_id == "poison":
        raise DeadLetter("poison")


def test_dead_letter_keeps_the_body_and_names_the_reason(
    publisher: Publisher, rabbit: Management, vhost: str
) -> None:
    body = codec.encode(_beat("gw-1"))
    publisher.dead_letter(body, "r" * 5000, source="hitless.gateway.gw-1", message_id="c-1")
    (message,) = wait_for(
        lambda: rabbit.get_messages(vhost, topology.DEAD_LETTERS.name),
        timeout=10,
        what="the dead letter",
    )
    assert message["payload"] == body.decode()
    headers = message["properties"]["headers"]
    assert headers[topology.SOURCE_QUEUE_HEADER] == "hitless.gateway.gw-1"
    assert headers[topology.REASON_HEADER].startswith("r" * 1000)
    assert len(headers[topology.REASON_HEADER]) < 1010


def test_amqp_url_of_this_vhost(vhost: str) -> None:
    """The fixture the tests above use points at this test's own vhost."""
    assert amqp_url(vhost).endswith(vhost)


@dataclass(frozen=True)
class _CountingBackoff(Backoff):
    """Short delays, and a record of each reconnect attempt that failed."""

    initial_s: float = 0.02
    max_s: float = 0.1
    attempts: list[int] = field(default_factory=list)

    def delay(self, attempt: int) -> float:
        self.attempts.append(attempt)
        return super().delay(attempt)


def test_a_publish_cut_by_a_broker_outage_goes_out_once_the_broker_is_back(
    vhost: str, rabbit: Management
) -> None:
    """Failed reconnects while the broker is away are no refusal of the message: it waits
    for the broker and goes out then, within the caller's timeout."""
    gate = threading.Event()
    gate.set()
    backoff = _CountingBackoff()
    proxy = CuttingProxy(("127.0.0.1", 5672), gate=gate).__enter__()
    url = amqp_url(vhost).replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
    publisher = Publisher(BusConfig(url), queues=[topology.CONTROLLER_REPORTS], backoff=backoff)
    publisher.start()
    outcome: list[BaseException | None] = []
    try:
        assert publisher.wait_connected(10)
        gate.clear()  # the broker's confirm no longer comes through
        worker = threading.Thread(target=lambda: outcome.append(_publish(publisher)))
        worker.start()
        proxy.__exit__()  # the broker goes away: the connection drops, reconnects fail
        # As many failed attempts as once made the message itself count as refused.
        wait_for(lambda: len(backoff.attempts) >= 3, timeout=20, what="three failed reconnects")
        assert worker.is_alive(), f"the publish ended while the broker was away: {outcome}"
        with CuttingProxy(("127.0.0.1", 5672), port=proxy.port):  # the broker is back
            worker.join(30)
            assert outcome == [None], f"the publish failed: {outcome}"
            found = rabbit.get_messages(vhost, topology.CONTROLLER_REPORTS.name)
            assert "cut" in {m["properties"].get("message_id") for m in found}
    finally:
        publisher.close()


def _publish(publisher: Publisher) -> BaseException | None:
    """Publish one heartbeat with message id "cut"; the error, or None once confirmed."""
    key = topology.report_key("gw-1", topology.HEARTBEAT)
    try:
        publisher.publish(topology.REPORTS, key, _beat("a"), message_id="cut", timeout=30)
    except BaseException as exc:
        return exc
    return None
