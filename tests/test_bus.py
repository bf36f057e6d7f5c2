"""The pika adapter against the real broker: confirms, mandatory routing, acks after the
handler, dead-lettering with the reason, a poison message not stalling the queue."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import urllib.error
from collections.abc import Callable
from urllib.parse import quote

import pytest

from hitless.backoff import Backoff
from hitless.bus import codec, topology
from hitless.bus.amqp import Consumer, DeadLetter, Delivery, Publisher, Requeue
from hitless.config import BusConfig
from hitless.errors import DecodeError, PublishFailed
from hitless.v1 import bus_pb2
from tests.support.rabbit import Management, amqp_url
from tests.support.wait import wait_for


def _heartbeat(gid: str) -> bus_pb2.GatewayHeartbeat:
    return bus_pb2.GatewayHeartbeat(gateway_id=gid, version="1.0.0")


def test_codec_round_trip_and_strict_decode() -> None:
    message = _heartbeat("gw-1")
    assert codec.decode(bus_pb2.GatewayHeartbeat, codec.encode(message)) == message
    with pytest.raises(DecodeError) as info:
        codec.decode(bus_pb2.GatewayHeartbeat, b'{"gateway_id": "gw-1", "colour": "red"}')
    assert "colour" in str(info.value)
    assert info.value.raw == b'{"gateway_id": "gw-1", "colour": "red"}'
    with pytest.raises(DecodeError):
        codec.decode(bus_pb2.GatewayHeartbeat, b"\xff\xfe")


def test_unroutable_publish_is_refused(bus: BusConfig) -> None:
    publisher = Publisher(bus).start()
    try:
        with pytest.raises(PublishFailed, match="could not route"):
            publisher.publish(topology.COMMANDS, topology.command_key("nobody"), _heartbeat("x"))
    finally:
        publisher.close()


def test_consumer_acks_and_dead_letters_with_reason(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def handle(delivery: Delivery) -> None:
        message = codec.decode(bus_pb2.GatewayHeartbeat, delivery.body)
        if message.gateway_id == "poison":
            raise DeadLetter("gateway id 'poison' is not allowed")
        if message.gateway_id == "flaky":
            raise RuntimeError("always fails")
        with lock:
            seen.append(message.gateway_id)

    consumer = Consumer(bus, topology.CONTROLLER_REPORTS, handle, name="test-consumer").start()
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    try:
        assert consumer.wait_consuming(10)
        key = topology.report_key("gw", topology.HEARTBEAT)
        for gid in ("a", "poison", "flaky", "b"):
            publisher.publish(topology.REPORTS, key, _heartbeat(gid), message_id=f"m-{gid}")
        wait_for(lambda: len(seen) == 2, timeout=10, what="two good messages handled")
        assert seen == ["a", "b"]

        def dead() -> list[dict[str, object]] | None:
            messages = rabbit.get_messages(vhost, topology.DEAD_LETTERS.name)
            return messages if len(messages) == 2 else None

        messages = wait_for(dead, timeout=10, what="two dead letters")
        reasons = {
            m["properties"]["message_id"]: m["properties"]["headers"][topology.REASON_HEADER]
            for m in messages
        }
        assert reasons["m-poison"] == "gateway id 'poison' is not allowed"
        assert "failed again on redelivery" in reasons["m-flaky"]
        bodies = {m["properties"]["message_id"]: m["payload"] for m in messages}
        assert bodies["m-poison"] == codec.encode(_heartbeat("poison")).decode()
    finally:
        publisher.close()
        consumer.stop()


def test_long_handler_does_not_starve_heartbeats(vhost: str) -> None:
    """A handler busy for three heartbeat timeouts: the connection stays up (the message
    is not redelivered) because the I/O thread keeps servicing heartbeats."""
    bus = BusConfig(amqp_url(vhost) + "?heartbeat=1")
    handled: list[str] = []
    release = threading.Event()

    def handle(delivery: Delivery) -> None:
        gid = codec.decode(bus_pb2.GatewayHeartbeat, delivery.body).gateway_id
        handled.append(gid)
        if gid == "slow":
            release.wait(timeout=30)  # the long work under test, ended by the test

    consumer = Consumer(bus, topology.CONTROLLER_REPORTS, handle, name="slow-consumer").start()
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    try:
        assert consumer.wait_consuming(10)
        key = topology.report_key("gw", topology.HEARTBEAT)
        publisher.publish(topology.REPORTS, key, _heartbeat("slow"))
        wait_for(lambda: handled == ["slow"], timeout=10, what="the slow message taken")
        # Three heartbeat timeouts pass while the handler works; a starved connection
        # would be closed by the broker and the message redelivered.
        threading.Event().wait(3.5)  # the handler's busy time under test
        release.set()
        publisher.publish(topology.REPORTS, key, _heartbeat("next"))
        wait_for(lambda: "next" in handled, timeout=10, what="the next message handled")
        assert handled == ["slow", "next"], f"the slow message was redelivered: {handled}"
    finally:
        release.set()
        publisher.close()
        consumer.stop()


def test_one_gateways_reports_are_handled_in_order_beside_the_others(bus: BusConfig) -> None:
    """Reports queued together and handled by four workers: those of one gateway one at a
    time and in the order sent (a held one is not overtaken), while another gateway's go
    on beside it."""
    handled: dict[str, list[int]] = {"gw-slow": [], "gw-fast": []}
    lock = threading.Lock()
    release = threading.Event()

    def handle(delivery: Delivery) -> None:
        beat = codec.decode(bus_pb2.GatewayHeartbeat, delivery.body)
        seq = int(beat.version.rsplit(".", 1)[1])
        if beat.gateway_id == "gw-slow" and seq == 0:
            release.wait(timeout=30)  # held by the test
        with lock:
            handled[beat.gateway_id].append(seq)

    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    consumer = Consumer(
        bus,
        topology.CONTROLLER_REPORTS,
        handle,
        prefetch=32,
        workers=4,
        name="lanes-consumer",
        lane=lambda d: topology.reporting_gateway(d.routing_key),
    )
    try:
        for seq in range(5):
            for gid in handled:
                beat = bus_pb2.GatewayHeartbeat(gateway_id=gid, version=f"1.0.{seq}")
                key = topology.report_key(gid, topology.HEARTBEAT)
                publisher.publish(topology.REPORTS, key, beat)
        consumer.start()
        wait_for(
            lambda: handled["gw-fast"] == [0, 1, 2, 3, 4],
            timeout=10,
            what="the other gateway's reports handled while one is held",
        )
        assert handled["gw-slow"] == [], "a later report overtook the one being handled"
        release.set()
        wait_for(lambda: len(handled["gw-slow"]) == 5, timeout=10, what="the held gateway's")
        assert handled["gw-slow"] == [0, 1, 2, 3, 4]
    finally:
        release.set()
        publisher.close()
        consumer.stop()


def test_reporting_gateway_reads_the_routing_key() -> None:
    assert topology.reporting_gateway(topology.report_key("gw.a-1", topology.STATUS)) == "gw.a-1"
    assert topology.reporting_gateway("gateway.gw-1.heartbeat") == "gw-1"
    assert topology.reporting_gateway("job.finished") == ""


def test_requeue_puts_a_message_back_without_dead_lettering_it(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    """A handler that is not the one for a message (a process handing over) requeues it,
    however often, and it is neither lost nor dead-lettered."""
    attempts: list[bool] = []

    def handle(delivery: Delivery) -> None:
        attempts.append(delivery.redelivered)
        if len(attempts) < 4:
            raise Requeue("not mine: this process is handing over")

    consumer = Consumer(bus, topology.CONTROLLER_REPORTS, handle, name="requeue-consumer").start()
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    try:
        assert consumer.wait_consuming(10)
        key = topology.report_key("gw", topology.HEARTBEAT)
        publisher.publish(topology.REPORTS, key, _heartbeat("gw"), message_id="m-1")
        wait_for(lambda: len(attempts) == 4, timeout=10, what="four deliveries")
        assert attempts == [False, True, True, True]
        assert rabbit.get_messages(vhost, topology.DEAD_LETTERS.name) == []
    finally:
        publisher.close()
        consumer.stop()


def _io_thread_frames(consumer: Consumer) -> list[str]:
    """The names of the functions the consumer's I/O thread is in, innermost first."""
    frame = sys._current_frames().get(consumer._thread.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _waiting_in_pump(consumer: Consumer) -> bool:
    """Whether the consumer's I/O thread is blocked in its pump, waiting for the broker
    with no callback of its own running: only a wake-up (or the pump's end) frees it."""
    names = _io_thread_frames(consumer)
    dispatching = {"_dispatch_connection_events", "_dispatch_channel_events"} & set(names)
    return bool(names) and names[0] == "poll" and "process_data_events" in names and not dispatching


def _stop_promptly(consumer: Consumer, why: str) -> None:
    """Stop ``consumer``; fail with ``why`` unless it stops within 5 s with its I/O thread
    ended (a missed wake-up makes ``stop`` give up after 10 s with the thread running)."""
    began = time.monotonic()
    consumer.stop()
    assert time.monotonic() - began < 5, why
    assert not consumer.wait_consuming(0), "the I/O thread is still running"


def _recorder() -> tuple[list[str], Callable[[Delivery], None]]:
    """A handler that records each heartbeat's gateway id, and the list it records in."""
    handled: list[str] = []

    def handle(delivery: Delivery) -> None:
        handled.append(codec.decode(bus_pb2.GatewayHeartbeat, delivery.body).gateway_id)

    return handled, handle


def _reports_queue_path(vhost: str) -> str:
    """The management API's path of the controller's reports queue in ``vhost``."""
    return f"/queues/{quote(vhost, safe='')}/{quote(topology.CONTROLLER_REPORTS.name, safe='')}"


def test_a_long_pump_delays_no_delivery_ack_or_stop(bus: BusConfig) -> None:
    """A consumer whose I/O thread waits a minute for the broker between looks at its
    stop flag (``pump_s``; a gateway's idle command consumer waits 1 s): a delivery, the
    ack that lets the next one come (prefetch 1) and ``stop`` each wake it at once."""
    handled, handle = _recorder()

    consumer = Consumer(
        bus, topology.CONTROLLER_REPORTS, handle, name="idle-consumer", prefetch=1, pump_s=60
    ).start()
    publisher = Publisher(bus, queues=[topology.CONTROLLER_REPORTS]).start()
    stopped = False
    try:
        assert consumer.wait_consuming(10)
        key = topology.report_key("gw", topology.HEARTBEAT)
        for gid in ("a", "b", "c"):
            publisher.publish(topology.REPORTS, key, _heartbeat(gid))
        # With prefetch 1 the broker sends b only once a is acked, and c once b is: each
        # ack is sent by the I/O thread, which the settled handler must wake.
        wait_for(lambda: handled == ["a", "b", "c"], timeout=10, what="three messages handled")
        wait_for(lambda: _waiting_in_pump(consumer), timeout=10, what="the I/O thread in its pump")
        stopped = True
        _stop_promptly(consumer, "stop() waited for the pump")
    finally:
        publisher.close()
        if not stopped:
            consumer.stop()


def test_a_long_pump_still_sends_heartbeats(vhost: str, rabbit: Management) -> None:
    """pika's heartbeat timers run inside the pump: a consumer idle in a minute's pump, on
    a connection with 1 s heartbeats, keeps that connection for three heartbeat timeouts
    (a starved one is closed by the broker, and the consumer comes back on a new one)."""
    bus = BusConfig(amqp_url(vhost) + "?heartbeat=1")
    handled, handle = _recorder()

    def connections() -> set[str]:
        listed = rabbit.request("GET", f"/vhosts/{quote(vhost, safe='')}/connections")
        return {c["name"] for c in listed}

    consumer = Consumer(
        bus, topology.CONTROLLER_REPORTS, handle, name="idle-heartbeats", pump_s=60
    ).start()
    try:
        assert consumer.wait_consuming(10)
        first = wait_for(connections, timeout=10, what="the consumer's connection listed")
        threading.Event().wait(3.5)  # the idle time under test: three heartbeat timeouts
        with contextlib.closing(Publisher(bus).start()) as publisher:
            key = topology.report_key("gw", topology.HEARTBEAT)
            publisher.publish(topology.REPORTS, key, _heartbeat("after"))
            wait_for(lambda: handled == ["after"], timeout=10, what="the message handled")
        assert first <= connections(), "the consumer's connection was closed and replaced"
    finally:
        consumer.stop()


def test_a_consumer_whose_queue_is_deleted_declares_it_and_consumes_again(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    """The broker cancels the consumers of a deleted queue (``basic.cancel``). The consumer
    then connects again, as after a lost connection, declaring its queue again: it does
    not stay on a connection where nothing will come. Its pump is a minute long, so the
    cancel itself must wake it."""
    handled, handle = _recorder()

    path = _reports_queue_path(vhost)

    def queue_exists() -> bool:
        try:
            rabbit.request("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    consumer = Consumer(
        bus, topology.CONTROLLER_REPORTS, handle, name="deleted-queue", pump_s=60
    ).start()
    try:
        assert consumer.wait_consuming(10)
        rabbit.request("DELETE", path)
        # Declared again by the consumer alone: the publisher below declares nothing.
        wait_for(queue_exists, timeout=30, what="the consumer to declare its queue again")
        assert consumer.wait_consuming(30), "declared, then not consuming"  # bound too
        with contextlib.closing(Publisher(bus).start()) as publisher:
            key = topology.report_key("gw", topology.HEARTBEAT)
            publisher.publish(topology.REPORTS, key, _heartbeat("again"))
            wait_for(lambda: handled == ["again"], timeout=30, what="the message handled")
    finally:
        consumer.stop()


def test_a_pump_of_no_time_is_refused(bus: BusConfig) -> None:
    with pytest.raises(ValueError, match="pump_s"):
        Consumer(bus, topology.CONTROLLER_REPORTS, lambda _d: None, pump_s=0)


class _FixedBackoff(Backoff):
    def delay(self, attempt: int) -> float:
        return 3.0


def test_a_handler_done_while_its_consumer_reconnects_does_not_hold_up_stop(
    bus: BusConfig, vhost: str, rabbit: Management
) -> None:
    """A handler that finishes after its consumer was cancelled, while the old connection
    still waits to be closed (the consumer backing off): its settle, queued there, never
    runs. The consumer must not count it in flight for good, or ``stop`` would wait for it
    (and give up after 10 s with the I/O thread still running)."""
    started, release = threading.Event(), threading.Event()

    def handle(_delivery: Delivery) -> None:
        started.set()
        release.wait(30)  # the handler's work under test, ended by the test

    path = _reports_queue_path(vhost)
    consumer = Consumer(
        bus, topology.CONTROLLER_REPORTS, handle, name="slow-handler", backoff=_FixedBackoff()
    ).start()
    stopped = False
    try:
        assert consumer.wait_consuming(10)
        with contextlib.closing(Publisher(bus).start()) as publisher:
            key = topology.report_key("gw", topology.HEARTBEAT)
            publisher.publish(topology.REPORTS, key, _heartbeat("slow"))
        assert started.wait(10), "the message never reached the handler"
        rabbit.request("DELETE", path)
        wait_for(
            lambda: "back_off" in _io_thread_frames(consumer), timeout=10,
            what="the consumer backing off, its old connection not yet closed",
        )  # fmt: skip
        release.set()
        # Back in a pump after the backoff: on a new connection, the old one closed.
        wait_for(
            lambda: _waiting_in_pump(consumer), timeout=15, what="the consumer consuming again"
        )
        stopped = True
        _stop_promptly(consumer, "stop() waited for a settle that never runs")
    finally:
        release.set()
        if not stopped:
            consumer.stop()
