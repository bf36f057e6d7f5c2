"""``Consumer``: its thread receives; handlers run on worker threads so long work never
starves heartbeats; the ack (or dead-lettering) goes back through
``add_callback_threadsafe`` once the handler has committed its effect.

A ``Batched`` handler is given the deliveries at hand together (up to its ``size``, never
waiting for more) and says what became of each; those it handled are acked together, with
one ``multiple`` ack (AMQP 0-9-1 basic.ack), once every delivery before them is settled.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    Delivery,
    back_off,
    check_properties,
    close_quietly,
    connect,
    cut,
    dead_letter_headers,
)
from hitless.bus.handling import DeadLetter, Requeue
from hitless.bus.topology import Queue
from hitless.config import BusConfig
from hitless.errors import PublishFailed

log = logs.get(__name__)

Handler = Callable[[Delivery], None]
# Given deliveries, returns one outcome per delivery, in order: None (handled: ack it), or
# the exception a ``Handler`` would have raised for it (DeadLetter, Requeue, ...).
BatchHandler = Callable[[Sequence[Delivery]], Sequence[BaseException | None]]


@dataclass(frozen=True)
class Batched:
    """A handler of several deliveries at once (one database transaction for all, say).

    If ``handle`` raises, or returns a wrong number of outcomes, each delivery of that
    batch is handed to it again alone, so one poison message fails only itself.
    """

    handle: BatchHandler
    size: int = 200

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a batch size must be at least 1, not {self.size}")


@dataclass(frozen=True)
class _Pending:
    """A delivery waiting in a batch queue, with what settling it needs."""

    connection: pika.BlockingConnection
    tags: _Tags
    tag: int
    delivery: Delivery


class _Tags:
    """One channel's delivery tags not yet settled, in delivery order (used on the I/O
    thread only). Handled ones are acked with one ``multiple`` ack up to the last of them
    that has nothing unsettled before it; ones settled alone (dead-lettered, requeued) are
    passed over, since a multiple ack covers only what is still unacknowledged."""

    _OPEN, _HANDLED, _SETTLED = 0, 1, 2

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        self._order: collections.deque[int] = collections.deque()
        self._state: dict[int, int] = {}

    @property
    def open(self) -> int:
        return len(self._state)

    def delivered(self, tag: int) -> None:
        self._order.append(tag)
        self._state[tag] = self._OPEN

    def settled_alone(self, tag: int) -> None:
        self._state[tag] = self._SETTLED

    def handled(self, tag: int) -> None:
        self._state[tag] = self._HANDLED

    def ack_ready(self) -> None:
        """Ack every handled tag that has no open tag before it, in one frame."""
        last = None
        while self._order and self._state[self._order[0]] != self._OPEN:
            tag = self._order.popleft()
            if self._state.pop(tag) == self._HANDLED:
                last = tag
        if last is not None:
            self.channel.basic_ack(last, multiple=True)


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

    With a ``Batched`` handler, deliveries are handed over in batches (per lane, with
    ``lane``), and each outcome is settled as a handler's return or exception would be.
    ``prefetch`` bounds how many can be at hand: give it several batches' worth.

    With ``passive`` (default: ``bus.passive``), the topology, ``queues`` and ``source``
    are only checked to exist,
    never declared or bound (``channel.declare``): for a broker user with no configure
    permission, which can still consume and dead-letter. Until their owner has declared
    them, connecting fails and is retried like a lost connection.

    ``pump_s`` (seconds, default ``PUMP_S``, > 0) is how long the I/O thread waits for the
    broker before it looks again whether it must stop. A delivery, a settled message,
    ``stop``, a lost connection and a consumer the broker cancelled each end the wait at
    once, and pika's own timers (the connection's heartbeats) still run on time, so it
    only sets how often an idle consumer wakes for nothing: a longer one costs a mostly
    idle consumer (a gateway's commands) less CPU. Raises ValueError for ``pump_s`` <= 0.

    A consumer the broker cancels (its queue deleted; RabbitMQ sends ``basic.cancel``),
    or whose channel it closes, connects again as after a lost connection, declaring the
    queue again unless ``passive``.
    """

    def __init__(
        self,
        bus: BusConfig,
        source: Queue,
        handler: Handler | Batched,
        *,
        queues: Iterable[Queue] = (),
        prefetch: int = 1,
        workers: int = 1,
        name: str = "consumer",
        backoff: Backoff = Backoff(),
        lane: Callable[[Delivery], str] | None = None,
        passive: bool | None = None,
        pump_s: float = PUMP_S,
    ) -> None:
        if not pump_s > 0:
            raise ValueError(f"pump_s must be more than 0 seconds, not {pump_s!r}")
        self._bus = bus
        self._pump_s = pump_s
        self._passive = bus.passive if passive is None else passive
        self._source = source
        self._batched: Batched | None = None
        self._handler: Handler = self._unbatched
        if isinstance(handler, Batched):
            self._batched = handler
        else:
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
        # Handlers running or not yet settled, each with the connection it must be settled
        # on (I/O thread and workers, under _lock).
        self._in_flight: dict[concurrent.futures.Future[None], pika.BlockingConnection] = {}
        self._lock = threading.Lock()
        # Batch mode: deliveries received in the current pump (I/O thread only), then per
        # pool those waiting for a worker and how many workers are taking them (_lock).
        self._arrived: list[_Pending] = []
        self._tags: _Tags | None = None
        self._waiting = [collections.deque[_Pending]() for _ in self._pools]
        self._taking = [0 for _ in self._pools]
        self._max_taking = [1] * len(self._pools) if lane is not None else [workers]
        self._thread = threading.Thread(target=self._run, name=f"bus-{name}", daemon=True)
        self._dead_letters: BlockingChannel | None = None
        # The I/O thread's connection while it has one (``stop`` wakes it through it).
        self._connection: pika.BlockingConnection | None = None
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
        connection = self._connection
        if connection is not None:
            # Wakes the I/O thread from its pump (``pump_s``) to see the stop now. A
            # connection closed or closing meanwhile ends its thread's pump anyway.
            with contextlib.suppress(*CONNECT_ERRORS):
                connection.add_callback_threadsafe(_nothing)
        self._thread.join(timeout)
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool_for(self, delivery: Delivery) -> concurrent.futures.ThreadPoolExecutor:
        return self._pools[self._pool_index(delivery)]

    def _pool_index(self, delivery: Delivery) -> int:
        if self._lane is None:
            return 0
        key = self._lane(delivery).encode()
        return zlib.crc32(key) % len(self._pools)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            connection = None
            try:
                connection, channel = connect(self._bus, self._queues, passive=self._passive)
                self._connection = connection
                self._dead_letters = connection.channel()
                self._dead_letters.confirm_delivery()
                channel.basic_qos(prefetch_count=self._prefetch)
                self._tags = _Tags(channel)
                tag = channel.basic_consume(
                    queue=self._source.name,
                    on_message_callback=functools.partial(self._on_message, connection),
                )
                attempt = 0
                self._consuming.set()
                log.info("bus_consuming", role=self._name, queue=self._source.name)
                while not self._stop.is_set():
                    connection.process_data_events(time_limit=self._pump_s)
                    self._hand_over()
                    if not channel.is_open or tag not in channel.consumer_tags:
                        # Nothing more would come here: start again, as after a lost
                        # connection (unacked messages come back when it closes, unless
                        # their queue is gone).
                        raise pika.exceptions.ConsumerCancelled(
                            f"the broker cancelled the consumer of {self._source.name} "
                            "(its queue deleted?) or closed its channel"
                        )
                # No new deliveries from here; those in flight finish and are settled.
                channel.basic_cancel(tag)
                self._drain(connection)
            except CONNECT_ERRORS as exc:
                back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                self._consuming.clear()
                self._connection = None
                close_quietly(connection)
                with self._lock:
                    # Their settles, queued on the closed connection, never run: the
                    # broker has their messages back (or their queue is gone).
                    for future in [f for f, c in self._in_flight.items() if c is connection]:
                        del self._in_flight[future]

    def _drain(self, connection: pika.BlockingConnection, timeout: float = 10.0) -> None:
        """After stop: wait for handlers in flight so their acks go out before closing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._hand_over()
            with self._lock:
                busy = bool(self._in_flight)
            busy = busy or bool(self._tags and self._tags.open)
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
        if self._batched is not None and self._tags is not None:
            self._tags.delivered(tag)
            self._arrived.append(_Pending(connection, self._tags, tag, delivery))
            return
        future = self._pool_for(delivery).submit(self._handler, delivery)
        with self._lock:
            self._in_flight[future] = connection

        def settle(done: concurrent.futures.Future[None]) -> None:
            try:
                connection.add_callback_threadsafe(
                    lambda: self._settle(channel, tag, delivery, done)
                )
            except CONNECT_ERRORS:
                # The connection is gone: the broker redelivers the message.
                with self._lock:
                    self._in_flight.pop(done, None)

        future.add_done_callback(settle)

    def _hand_over(self) -> None:
        """Batch mode, on the I/O thread: queue what the last pump received for the
        workers, starting one where a pool has room for another."""
        if not self._arrived:
            return
        arrived, self._arrived = self._arrived, []
        start = []
        with self._lock:
            for pending in arrived:
                index = self._pool_index(pending.delivery)
                self._waiting[index].append(pending)
                if self._taking[index] < self._max_taking[index]:
                    self._taking[index] += 1
                    start.append(index)
        for index in start:
            self._pools[index].submit(self._take_batches, index)

    def _take_batches(self, index: int) -> None:
        """A worker of pool ``index``: handle batches from its queue until it is empty."""
        assert self._batched is not None
        try:
            while batch := self._next_batch(index, self._batched.size):
                self._handle_and_settle(batch)
        except Exception:
            # Unsettled, the batch's deliveries come back when the channel closes.
            log.exception("batch_worker_failed", role=self._name)
        finally:
            with self._lock:
                self._taking[index] -= 1
                left = bool(self._waiting[index])
            if left and not self._stop.is_set():
                # Queued after this worker found the queue empty: another one takes them.
                self._hand_over_to(index)

    def _next_batch(self, index: int, size: int) -> list[_Pending]:
        with self._lock:
            waiting = self._waiting[index]
            return [waiting.popleft() for _ in range(min(len(waiting), size))]

    def _hand_over_to(self, index: int) -> None:
        with self._lock:
            if self._taking[index] >= self._max_taking[index]:
                return
            self._taking[index] += 1
        self._pools[index].submit(self._take_batches, index)

    def _handle_and_settle(self, batch: list[_Pending]) -> None:
        """Handle one batch, then settle its deliveries on the I/O thread."""
        outcomes = self._handle_batch([p.delivery for p in batch])
        by_channel: dict[int, list[tuple[_Pending, BaseException | None]]] = {}
        for pending, outcome in zip(batch, outcomes, strict=True):
            by_channel.setdefault(id(pending.tags), []).append((pending, outcome))
        for settled in by_channel.values():
            # A connection that is gone raises: the broker redelivers these.
            with contextlib.suppress(*CONNECT_ERRORS):
                settled[0][0].connection.add_callback_threadsafe(
                    functools.partial(self._settle_batch, settled)
                )

    def _handle_batch(self, deliveries: list[Delivery]) -> list[BaseException | None]:
        """The batch handler's outcomes; when it fails as a whole, each delivery's alone."""
        assert self._batched is not None
        try:
            outcomes = list(self._batched.handle(deliveries))
            if len(outcomes) != len(deliveries):
                raise ValueError(f"{len(outcomes)} outcomes for {len(deliveries)} deliveries")
            return outcomes
        except Exception as exc:
            if len(deliveries) == 1:
                return [exc]
            log.warning(
                "batch_failed_handling_alone",
                role=self._name,
                deliveries=len(deliveries),
                error=f"{type(exc).__name__}: {exc}",
            )
        return [self._handle_alone(delivery) for delivery in deliveries]

    def _handle_alone(self, delivery: Delivery) -> BaseException | None:
        assert self._batched is not None
        try:
            outcomes = list(self._batched.handle([delivery]))
            if len(outcomes) != 1:
                raise ValueError(f"{len(outcomes)} outcomes for one delivery")
            return outcomes[0]
        except Exception as exc:
            return exc

    def _unbatched(self, delivery: Delivery) -> None:
        """Never called: in batch mode deliveries go through ``_take_batches``."""
        raise AssertionError(f"{delivery.message_id}: a batched consumer handles in batches")

    def _settle_batch(self, settled: list[tuple[_Pending, BaseException | None]]) -> None:
        """On the I/O thread: ack what was handled (together), settle the rest alone."""
        tags = settled[0][0].tags
        if not tags.channel.is_open:
            return  # its deliveries come again, on the next channel
        for pending, outcome in settled:
            if outcome is None:
                tags.handled(pending.tag)
                continue
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_exception(outcome)
            self._settle(tags.channel, pending.tag, pending.delivery, done)
            tags.settled_alone(pending.tag)
        tags.ack_ready()

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
                self._in_flight.pop(done, None)

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


def _nothing() -> None:
    """Does nothing: scheduled on a connection only to wake its I/O thread."""
