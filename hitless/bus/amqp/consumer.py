"""``Consumer``: its thread receives; handlers run on worker threads so long work never
starves heartbeats; the ack (or dead-lettering) goes back through
``add_callback_threadsafe`` once the handler has committed its effect.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from hitless import logs
from hitless.backoff import Backoff
from hitless.bus import codec, topology
from hitless.bus.amqp.channel import (
    CONNECT_ERRORS,
    MAX_REASON_CHARS,
    ORIGINAL_USER_HEADER,
    PUMP_S,
    REFUSED_BY_CLIENT,
    DeadLetter,
    Delivery,
    Requeue,
    back_off,
    check_properties,
    close_quietly,
    connect,
    cut,
    dead_letter_headers,
)
from hitless.bus.topology import Queue
from hitless.config import BusConfig
from hitless.errors import PublishFailed

log = logs.get(__name__)

Handler = Callable[[Delivery], None]


class Consumer:
    """Consumes one queue with manual acks; handlers run off the I/O thread.

    A handler that returns has committed its effect: the message is acked. One that raises
    DeadLetter sends it to the dead-letter queue with the reason; one that raises Requeue
    puts it back for another consumer. Any other exception is
    treated as transient: the message is requeued once, and dead-lettered if it fails
    again on redelivery, so a poison message cannot stall the queue.

    Dead-lettering republishes the message under this service's broker user, on a channel
    of its own, and never with a ``user_id`` property: the original one (which RabbitMQ
    checks against the publishing user) moves to the ``x-hitless-original-user-id`` header
    (a header of that name the publisher set itself is dropped), and a message the
    broker still refuses there is logged, counted (``dead_letter_failures``) and acked all
    the same, never redelivered forever.

    With ``lane`` given, each of the ``workers`` threads is a lane of its own and every
    message goes to the lane its key picks: messages with the same key are handled one
    at a time, in the order the broker delivered them (a gateway's reports, for one).
    Without it, any free worker takes the next message.

    With ``passive`` (default: ``bus.passive``), the topology, ``queues`` and ``source``
    are only checked to exist,
    never declared or bound (``channel.declare``): for a broker user with no configure
    permission, which can still consume and dead-letter. Until their owner has declared
    them, connecting fails and is retried like a lost connection.
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
        passive: bool | None = None,
    ) -> None:
        self._bus = bus
        self._passive = bus.passive if passive is None else passive
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
        self._dead_letters: BlockingChannel | None = None
        # Messages that could not be dead-lettered (and were acked, with a log line).
        self.dead_letter_failures = 0

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
                connection, channel = connect(self._bus, self._queues, passive=self._passive)
                self._dead_letters = connection.channel()
                self._dead_letters.confirm_delivery()
                channel.basic_qos(prefetch_count=self._prefetch)
                tag = channel.basic_consume(
                    queue=self._source.name,
                    on_message_callback=functools.partial(self._on_message, connection),
                )
                attempt = 0
                self._consuming.set()
                log.info("bus_consuming", role=self._name, queue=self._source.name)
                while not self._stop.is_set():
                    connection.process_data_events(time_limit=PUMP_S)
                # No new deliveries from here; those in flight finish and are settled.
                channel.basic_cancel(tag)
                self._drain(connection)
            except CONNECT_ERRORS as exc:
                back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                self._consuming.clear()
                close_quietly(connection)

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
                    lambda: self._settle(channel, tag, delivery, done)
                )
            except CONNECT_ERRORS:
                # The connection is gone: the broker redelivers the message.
                with self._lock:
                    self._in_flight.discard(done)

        future.add_done_callback(settle)

    def _settle(
        self,
        channel: BlockingChannel,
        tag: int,
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
                self._dead_letter(channel, tag, delivery, error.reason)
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
                self._dead_letter(channel, tag, delivery, reason)
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
        self, channel: BlockingChannel, tag: int, delivery: Delivery, reason: str
    ) -> None:
        """Republish to the dead-letter exchange, body untouched, then ack; a message the
        broker will not take there is acked all the same (logged and counted)."""
        headers = dead_letter_headers(delivery.headers, reason, self._source.name)
        # Only the broker-validated user_id may speak for who published: a header of that
        # name that came with the message is the publisher's own claim, and is dropped.
        headers.pop(ORIGINAL_USER_HEADER, None)
        if delivery.user_id:
            headers[ORIGINAL_USER_HEADER] = delivery.user_id
        properties = pika.BasicProperties(
            content_type=codec.CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=delivery.message_id,
            headers=headers,
            timestamp=int(time.time()),
        )
        try:
            check_properties(properties, "dead-letter the message")
            if self._dead_letters is None or not self._dead_letters.is_open:
                self._dead_letters = channel.connection.channel()
                self._dead_letters.confirm_delivery()
            self._dead_letters.basic_publish(
                exchange=topology.DLX.name,
                routing_key=delivery.routing_key,
                body=delivery.body,
                properties=properties,
                mandatory=True,
            )
        except (
            PublishFailed,
            pika.exceptions.UnroutableError,
            pika.exceptions.NackError,
            pika.exceptions.ChannelClosedByBroker,
            *REFUSED_BY_CLIENT,
        ) as exc:
            self.dead_letter_failures += 1
            log.error(
                "dead_letter_failed",
                role=self._name,
                queue=self._source.name,
                message_id=delivery.message_id,
                reason=cut(reason, MAX_REASON_CHARS),
                error=cut(str(exc), 300) or type(exc).__name__,
            )
        else:
            log.warning(
                "message_dead_lettered",
                role=self._name,
                queue=self._source.name,
                message_id=delivery.message_id,
                reason=cut(reason, MAX_REASON_CHARS),
            )
        channel.basic_ack(tag)
