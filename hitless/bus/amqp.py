"""The RabbitMQ adapter: the only module that imports pika.

Two pieces, each owning one BlockingConnection on one thread of its own (pika is not
thread-safe, and BlockingConnection services heartbeats only inside pika calls):

- ``Publisher``: callers on any thread hand it messages; its thread publishes each with
  publisher confirms and ``mandatory=True`` and wakes the caller with the outcome.
- ``Consumer``: its thread receives; handlers run on a worker thread so long work never
  starves heartbeats; the ack (or dead-lettering) goes back through
  ``add_callback_threadsafe`` once the handler has committed its effect.

Both reconnect with bounded exponential backoff and jitter and declare the topology again
after every reconnect.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from google.protobuf.message import Message
from pika.adapters.blocking_connection import BlockingChannel

from hitless import logs
from hitless.backoff import Backoff
from hitless.bus import codec, topology
from hitless.bus.topology import Exchange, Queue
from hitless.config import BusConfig
from hitless.errors import BusUnavailable, HitlessError, PublishFailed

log = logs.get(__name__)

_CONNECT_ERRORS = (pika.exceptions.AMQPError, OSError)
_PUMP_S = 0.2


class DeadLetter(HitlessError):
    """Raised by a handler for a message that can never be processed: the consumer moves it
    to the dead-letter queue, body untouched, with ``reason`` in a header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Requeue(HitlessError):
    """Raised by a handler that is not the one to take this message (e.g. a process that
    is handing over): the message goes back to its queue for another consumer, and this
    does not count as a failure toward dead-lettering."""


@dataclass(frozen=True)
class Delivery:
    """One received message, as a handler sees it."""

    body: bytes
    routing_key: str
    exchange: str
    message_id: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    user_id: str | None = None


def _connect(
    bus: BusConfig, queues: Iterable[Queue]
) -> tuple[pika.BlockingConnection, BlockingChannel]:
    params = pika.URLParameters(bus.url)
    if "heartbeat=" not in bus.url:
        params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        declare(channel, queues)
    except BaseException:
        connection.close()
        raise
    return connection, channel


def declare(channel: BlockingChannel, queues: Iterable[Queue]) -> None:
    """Declare every exchange, the base queues and ``queues`` with their bindings."""
    for exchange in topology.EXCHANGES:
        channel.exchange_declare(exchange=exchange.name, exchange_type=exchange.kind, durable=True)
    for q in (*topology.BASE_QUEUES, *queues):
        channel.queue_declare(queue=q.name, durable=True, arguments=dict(q.arguments) or None)
        for binding in q.bindings:
            channel.queue_bind(
                queue=q.name, exchange=binding.exchange.name, routing_key=binding.routing_key
            )


def _back_off(
    role: str,
    bus: BusConfig,
    backoff: Backoff,
    attempt: int,
    error: BaseException,
    stop: threading.Event,
) -> None:
    """Say the broker is unreachable and wait before the next attempt (or until stop)."""
    delay = backoff.delay(attempt)
    log.warning(
        "bus_unreachable",
        role=role,
        broker=bus.safe_url,
        error=str(error) or type(error).__name__,
        retry_in_s=round(delay, 2),
    )
    stop.wait(delay)


def _close_quietly(connection: pika.BlockingConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    with contextlib.suppress(*_CONNECT_ERRORS):
        connection.close()


@dataclass
class _Request:
    action: Callable[[BlockingChannel], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Publisher:
    """Publishes persistent messages with confirms and mandatory routing, from any thread."""

    def __init__(
        self,
        bus: BusConfig,
        *,
        queues: Iterable[Queue] = (),
        name: str = "publisher",
        backoff: Backoff = Backoff(),
    ) -> None:
        self._bus = bus
        self._queues = tuple(queues)
        self._name = name
        self._backoff = backoff
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-{name}", daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        exchange: Exchange,
        routing_key: str,
        message: Message | bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        expiration_ms: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publish and wait for the broker's confirm.

        Raises PublishFailed when the broker nacks or cannot route the message, and
        BusUnavailable when no confirm came within ``timeout`` (the broker is away).
        """
        body = message if isinstance(message, bytes) else codec.encode(message)
        properties = pika.BasicProperties(
            content_type=codec.CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            timestamp=int(time.time()),
        )

        def action(channel: BlockingChannel) -> None:
            channel.basic_publish(
                exchange=exchange.name,
                routing_key=routing_key,
                body=body,
                properties=properties,
                mandatory=True,
            )

        self._submit(action, timeout, f"publish to {exchange.name} with key {routing_key!r}")

    def declare(self, queues: Iterable[Queue], timeout: float = 30.0) -> None:
        """Declare more queues (kept, and declared again after every reconnect)."""
        new = tuple(queues)
        self._queues = (*self._queues, *(q for q in new if q not in self._queues))
        self._submit(lambda channel: declare(channel, new), timeout, "declare queues")

    def _submit(self, action: Callable[[BlockingChannel], None], timeout: float, what: str) -> None:
        if not self._thread.is_alive():
            raise BusUnavailable(f"cannot {what}: the {self._name} is not running")
        request = _Request(action)
        self._requests.put(request)
        if not request.done.wait(timeout):
            raise BusUnavailable(
                f"cannot {what}: no answer from the broker at {self._bus.safe_url} within "
                f"{timeout:.0f}s; check that RabbitMQ is running"
            )
        if request.error is not None:
            raise request.error

    def _run(self) -> None:
        attempt = 0
        pending: _Request | None = None
        while not self._stop.is_set():
            connection = None
            try:
                connection, channel = _connect(self._bus, self._queues)
                channel.confirm_delivery()
                attempt = 0
                self._connected.set()
                log.info("bus_connected", role=self._name, broker=self._bus.safe_url)
                while not self._stop.is_set():
                    if pending is None:
                        try:
                            pending = self._requests.get(timeout=_PUMP_S)
                        except queue.Empty:
                            connection.process_data_events(time_limit=0)
                            continue
                    self._execute(pending, channel)
                    pending = None
            except _CONNECT_ERRORS as exc:
                self._connected.clear()
                _back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                _close_quietly(connection)
        self._connected.clear()
        self._fail_waiting()

    def _execute(self, request: _Request, channel: BlockingChannel) -> None:
        """Run one request; a lost connection propagates so the request is retried."""
        try:
            request.action(channel)
        except pika.exceptions.UnroutableError as exc:
            request.error = PublishFailed(
                "the broker could not route the message to any queue (mandatory publish): "
                "declare the destination queue first"
            )
            request.error.__cause__ = exc
        except pika.exceptions.NackError as exc:
            request.error = PublishFailed("the broker refused the message (negative confirm)")
            request.error.__cause__ = exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            request.error = PublishFailed(f"the broker closed the channel: {exc}")
            request.error.__cause__ = exc
            request.done.set()
            raise
        request.done.set()

    def _fail_waiting(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request.error = BusUnavailable(f"the {self._name} was closed")
            request.done.set()


Handler = Callable[[Delivery], None]


class Consumer:
    """Consumes one queue with manual acks; handlers run off the I/O thread.

    A handler that returns has committed its effect: the message is acked. One that raises
    DeadLetter sends it to the dead-letter queue with the reason; one that raises Requeue
    puts it back for another consumer. Any other exception is
    treated as transient: the message is requeued once, and dead-lettered if it fails
    again on redelivery, so a poison message cannot stall the queue.

    With ``lane`` given, each of the ``workers`` threads is a lane of its own and every
    message goes to the lane its key picks: messages with the same key are handled one
    at a time, in the order the broker delivered them (a gateway's reports, for one).
    Without it, any free worker takes the next message.
    """

    def __init__(
        self,
        bus: BusConfig,
        source: Queue,
        handler: Handler,
        *,
        queues: Iterable[Queue] = (),
        prefetch: int = 1,
        workers: int = 1,
        name: str = "consumer",
        backoff: Backoff = Backoff(),
        lane: Callable[[Delivery], str] | None = None,
    ) -> None:
        self._bus = bus
        self._source = source
        self._handler = handler
        self._lane = lane
        self._queues = (*queues, source)
        self._prefetch = prefetch
        self._name = name
        self._backoff = backoff
        self._stop = threading.Event()
        self._consuming = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor
        self._pools = (
            [pool(1, thread_name_prefix=f"{name}-lane{i}") for i in range(workers)]
            if lane is not None
            else [pool(workers, thread_name_prefix=name)]
        )
        self._in_flight: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"bus-{name}", daemon=True)

    def start(self) -> Consumer:
        self._thread.start()
        return self

    def wait_consuming(self, timeout: float) -> bool:
        return self._consuming.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, let handlers in flight finish, send their acks, close."""
        self._stop.set()
        self._thread.join(timeout)
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool_for(self, delivery: Delivery) -> concurrent.futures.ThreadPoolExecutor:
        if self._lane is None:
            return self._pools[0]
        key = self._lane(delivery).encode()
        return self._pools[zlib.crc32(key) % len(self._pools)]

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            connection = None
            try:
                connection, channel = _connect(self._bus, self._queues)
                channel.confirm_delivery()
                channel.basic_qos(prefetch_count=self._prefetch)
                tag = channel.basic_consume(
                    queue=self._source.name,
                    on_message_callback=functools.partial(self._on_message, connection),
                )
                attempt = 0
                self._consuming.set()
                log.info("bus_consuming", role=self._name, queue=self._source.name)
                while not self._stop.is_set():
                    connection.process_data_events(time_limit=_PUMP_S)
                # No new deliveries from here; those in flight finish and are settled.
                channel.basic_cancel(tag)
                self._drain(connection)
            except _CONNECT_ERRORS as exc:
                _back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                self._consuming.clear()
                _close_quietly(connection)

    def _drain(self, connection: pika.BlockingConnection, timeout: float = 10.0) -> None:
        """After stop: wait for handlers in flight so their acks go out before closing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._in_flight)
            connection.process_data_events(time_limit=0.05)
            if not busy:
                return

    def _on_message(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(
            body=body,
            routing_key=method.routing_key,
            exchange=method.exchange,
            message_id=properties.message_id,
            headers=dict(properties.headers or {}),
            redelivered=bool(method.redelivered),
            user_id=properties.user_id,
        )
        tag = method.delivery_tag
        future = self._pool_for(delivery).submit(self._handler, delivery)
        with self._lock:
            self._in_flight.add(future)

        def settle(done: concurrent.futures.Future[None]) -> None:
            try:
                connection.add_callback_threadsafe(
                    lambda: self._settle(channel, tag, properties, delivery, done)
                )
            except _CONNECT_ERRORS:
                # The connection is gone: the broker redelivers the message.
                with self._lock:
                    self._in_flight.discard(done)

        future.add_done_callback(settle)

    def _settle(
        self,
        channel: BlockingChannel,
        tag: int,
        properties: pika.BasicProperties,
        delivery: Delivery,
        done: concurrent.futures.Future[None],
    ) -> None:
        try:
            if done.cancelled():
                channel.basic_nack(tag, requeue=True)
                return
            error = done.exception()
            if error is None:
                channel.basic_ack(tag)
            elif isinstance(error, DeadLetter):
                self._dead_letter(channel, tag, properties, delivery, error.reason)
            elif isinstance(error, Requeue):
                log.info(
                    "message_requeued",
                    role=self._name,
                    message_id=delivery.message_id,
                    reason=str(error),
                )
                channel.basic_nack(tag, requeue=True)
            elif delivery.redelivered:
                reason = f"failed again on redelivery: {type(error).__name__}: {error}"
                self._dead_letter(channel, tag, properties, delivery, reason)
            else:
                log.warning(
                    "handler_failed_requeued",
                    role=self._name,
                    message_id=delivery.message_id,
                    error=f"{type(error).__name__}: {error}",
                )
                channel.basic_nack(tag, requeue=True)
        finally:
            with self._lock:
                self._in_flight.discard(done)

    def _dead_letter(
        self,
        channel: BlockingChannel,
        tag: int,
        properties: pika.BasicProperties,
        delivery: Delivery,
        reason: str,
    ) -> None:
        headers = dict(properties.headers or {})
        headers[topology.REASON_HEADER] = reason
        headers[topology.SOURCE_QUEUE_HEADER] = self._source.name
        properties.headers = headers
        channel.basic_publish(
            exchange=topology.DLX.name,
            routing_key=delivery.routing_key,
            body=delivery.body,
            properties=properties,
            mandatory=True,
        )
        channel.basic_ack(tag)
        log.warning(
            "message_dead_lettered",
            role=self._name,
            queue=self._source.name,
            message_id=delivery.message_id,
            reason=reason,
        )
