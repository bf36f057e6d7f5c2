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

What the broker refuses for one message (a 406 PRECONDITION_FAILED closing the channel, a
name longer than AMQP's 255-byte short string, properties that do not fit a frame) fails
that one publish or declare with ``PublishFailed``, on a fresh channel, and never takes the
connection down for everything queued behind it: only a lost connection is retried.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import queue
import struct
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
# Raised by pika before anything is sent, or by the broker for this one request: the
# request fails, the connection carries on.
_REFUSED_BY_CLIENT = (
    pika.exceptions.ShortStringTooLong,
    pika.exceptions.DuplicateGetOkCallback,
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)
_PUMP_S = 0.2
# A request that took the connection down this many times (e.g. properties larger than a
# frame, which the broker answers by closing the connection) is failed, not retried.
_MAX_CONNECTION_LOSSES = 3
# Message properties (headers included) must fit one frame with room to spare; RabbitMQ's
# default frame_max is 131072 bytes.
MAX_PROPERTIES_BYTES = 64 * 1024
# Reasons are cut to this many characters before they become a header.
MAX_REASON_CHARS = 1000
# RabbitMQ's upper bound for a per-message TTL (the expiration property), in ms.
MAX_EXPIRATION_MS = 2**32 - 1
# Beside the reason: who published a dead-lettered message (its broker-validated user_id,
# which cannot travel as user_id once another user republishes it).
ORIGINAL_USER_HEADER = "x-hitless-original-user-id"


def dead_letter_headers(headers: Mapping[str, Any], reason: str, source: str) -> dict[str, Any]:
    """``headers`` plus the dead-letter reason (cut to MAX_REASON_CHARS) and source queue."""
    return {
        **headers,
        topology.REASON_HEADER: _cut(reason, MAX_REASON_CHARS),
        topology.SOURCE_QUEUE_HEADER: source,
    }


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
    bus: BusConfig,
    queues: Iterable[Queue],
    on_refused: Callable[[Queue, BaseException], None] | None = None,
) -> tuple[pika.BlockingConnection, BlockingChannel]:
    """Connect, declare the topology and ``queues``, and return a channel.

    With ``on_refused``, a queue the broker refuses (e.g. one redeclared by hand with other
    arguments: 406 PRECONDITION_FAILED) is handed to it and skipped, so that one queue never
    keeps the connection from coming up; without, the refusal propagates.
    """
    params = pika.URLParameters(bus.url)
    if "heartbeat=" not in bus.url:
        params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        declare_topology(channel)
        for q in queues:
            try:
                declare(channel, [q])
            except (pika.exceptions.ChannelClosedByBroker, *_REFUSED_BY_CLIENT) as exc:
                if on_refused is None:
                    raise
                on_refused(q, exc)
                if not channel.is_open:
                    channel = connection.channel()
    except BaseException:
        connection.close()
        raise
    return connection, channel


def declare_topology(channel: BlockingChannel) -> None:
    """Declare every exchange and the base queues: what every service needs."""
    for exchange in topology.EXCHANGES:
        channel.exchange_declare(exchange=exchange.name, exchange_type=exchange.kind, durable=True)
    declare(channel, topology.BASE_QUEUES)


def declare(channel: BlockingChannel, queues: Iterable[Queue]) -> None:
    """Declare ``queues`` with their bindings (their exchanges must exist already)."""
    for q in queues:
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
    what: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Set by a caller that stopped waiting: the request is dropped, never sent late.
    abandoned: bool = False
    connection_losses: int = 0

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def _refusal(what: str, exc: BaseException) -> PublishFailed:
    """The PublishFailed for a request the broker (or pika, before sending) refused."""
    if isinstance(exc, pika.exceptions.UnroutableError):
        text = (
            "the broker could not route the message to any queue (mandatory publish): "
            "declare the destination queue first"
        )
    elif isinstance(exc, pika.exceptions.NackError):
        text = "the broker refused the message (negative confirm)"
    elif isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        text = f"the broker refused it: {exc.reply_code} {exc.reply_text}"
    else:
        text = f"it cannot be sent over AMQP: {type(exc).__name__}: {_cut(str(exc), 200)}"
    error = PublishFailed(f"cannot {what}: {text}")
    error.__cause__ = exc
    return error


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _properties_size(properties: pika.BasicProperties) -> int:
    return sum(len(part) for part in properties.encode())


def _check_properties(properties: pika.BasicProperties, what: str) -> None:
    """Refuse, before the broker does by closing the connection, properties too big for a
    frame (frame_max, AMQP 0-9-1 section 4.2.3)."""
    try:
        size = _properties_size(properties)
    except _REFUSED_BY_CLIENT as exc:
        raise _refusal(what, exc) from exc
    if size > MAX_PROPERTIES_BYTES:
        raise PublishFailed(
            f"cannot {what}: its properties and headers take {size} bytes, more than the "
            f"{MAX_PROPERTIES_BYTES} a message may carry here"
        )


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
        self._queues_lock = threading.Lock()
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

    @property
    def connected(self) -> bool:
        """True while the publisher holds a connection to the broker."""
        return self._connected.is_set()

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
        what = f"publish to {exchange.name} with key {_cut(routing_key, 80)!r}"
        body = message if isinstance(message, bytes) else codec.encode(message)
        if expiration_ms is not None and not 0 <= expiration_ms <= MAX_EXPIRATION_MS:
            raise PublishFailed(
                f"cannot {what}: a TTL of {expiration_ms} ms is outside what RabbitMQ takes "
                f"(0 to {MAX_EXPIRATION_MS})"
            )
        properties = pika.BasicProperties(
            content_type=codec.CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            timestamp=int(time.time()),
        )
        _check_properties(properties, what)

        def action(channel: BlockingChannel) -> None:
            channel.basic_publish(
                exchange=exchange.name,
                routing_key=routing_key,
                body=body,
                properties=properties,
                mandatory=True,
            )

        self._submit(action, timeout, what)

    def dead_letter(
        self,
        body: bytes,
        reason: str,
        *,
        source: str,
        message_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publish ``body`` untouched to the dead-letter exchange with ``reason`` (cut to
        MAX_REASON_CHARS) and ``source`` (e.g. the queue it was meant for, or "") in headers:
        for a message this service made but could not deliver. Raises as ``publish``."""
        self.publish(
            topology.DLX,
            "",
            body,
            message_id=message_id,
            headers=dead_letter_headers({}, reason, source),
            timeout=timeout,
        )

    def declare(self, queues: Iterable[Queue], timeout: float = 30.0) -> None:
        """Declare more queues; once declared they are kept and declared again after every
        reconnect. Raises PublishFailed when the broker refuses one (nothing is kept from
        this call then), BusUnavailable as ``publish``."""
        new = tuple(queues)
        self._submit(lambda channel: declare(channel, new), timeout, "declare queues")
        with self._queues_lock:
            self._queues = (*self._queues, *(q for q in new if q not in self._queues))

    def _forget(self, refused: Queue, error: BaseException) -> None:
        """A kept queue the broker refuses on reconnect is declared no more."""
        log.error("queue_refused", role=self._name, queue=_cut(refused.name, 80),
                  error=_cut(str(error), 300) or type(error).__name__)  # fmt: skip
        with self._queues_lock:
            self._queues = tuple(q for q in self._queues if q != refused)

    def _submit(self, action: Callable[[BlockingChannel], None], timeout: float, what: str) -> None:
        if not self._thread.is_alive():
            raise BusUnavailable(f"cannot {what}: the {self._name} is not running")
        request = _Request(action, what)
        self._requests.put(request)
        if not request.done.wait(timeout):
            request.abandoned = True
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
            executing = False
            try:
                with self._queues_lock:
                    kept = self._queues
                connection, channel = _connect(self._bus, kept, self._forget)
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
                    if not pending.abandoned:
                        executing = True
                        self._execute(pending, channel)
                        executing = False
                    pending = None
                    if not channel.is_open:  # the broker closed it to refuse a request
                        channel = connection.channel()
                        channel.confirm_delivery()
            except _CONNECT_ERRORS as exc:
                self._connected.clear()
                if pending is not None and executing:
                    pending = self._lost_while_executing(pending, exc)
                _back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            except Exception as exc:  # a bug must not silently end publishing for good
                self._connected.clear()
                log.exception("publisher_failed", role=self._name)
                if pending is not None:
                    pending.fail(BusUnavailable(f"the {self._name} failed: {exc}"))
                    pending = None
                _back_off(self._name, self._bus, self._backoff, attempt, exc, self._stop)
                attempt += 1
            finally:
                _close_quietly(connection)
        self._connected.clear()
        if pending is not None:
            pending.fail(BusUnavailable(f"the {self._name} was closed"))
        self._fail_waiting()

    def _lost_while_executing(self, request: _Request, error: BaseException) -> _Request | None:
        """The connection went down while ``request`` ran: retried on the next connection,
        unless it has taken the connection down _MAX_CONNECTION_LOSSES times (the broker
        closes the connection, not the channel, for some messages, e.g. a frame too large)."""
        request.connection_losses += 1
        if request.connection_losses < _MAX_CONNECTION_LOSSES:
            return request
        log.error("publish_dropped", role=self._name, what=request.what,
                  error=str(error) or type(error).__name__)  # fmt: skip
        request.fail(_refusal(request.what, error))
        return None

    def _execute(self, request: _Request, channel: BlockingChannel) -> None:
        """Run one request. What the broker or pika refuses for this request fails it alone
        (the caller replaces a channel the broker closed); a lost connection propagates, so
        the request is retried on the next one."""
        try:
            request.action(channel)
        except (
            pika.exceptions.UnroutableError,
            pika.exceptions.NackError,
            pika.exceptions.ChannelClosedByBroker,
            *_REFUSED_BY_CLIENT,
        ) as exc:
            log.warning("publish_refused", role=self._name, what=request.what,
                        error=_cut(str(exc), 300) or type(exc).__name__)  # fmt: skip
            request.fail(_refusal(request.what, exc))
            return
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

    Dead-lettering republishes the message under this service's broker user, on a channel
    of its own: the original ``user_id`` property (which RabbitMQ checks against the
    publishing user) moves to the ``x-hitless-original-user-id`` header, and a message the
    broker still refuses there is logged, counted (``dead_letter_failures``) and acked all
    the same, never redelivered forever.

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
                connection, channel = _connect(self._bus, self._queues)
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
                    lambda: self._settle(channel, tag, delivery, done)
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
            _check_properties(properties, "dead-letter the message")
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
            *_REFUSED_BY_CLIENT,
        ) as exc:
            self.dead_letter_failures += 1
            log.error(
                "dead_letter_failed",
                role=self._name,
                queue=self._source.name,
                message_id=delivery.message_id,
                reason=_cut(reason, MAX_REASON_CHARS),
                error=_cut(str(exc), 300) or type(exc).__name__,
            )
        else:
            log.warning(
                "message_dead_lettered",
                role=self._name,
                queue=self._source.name,
                message_id=delivery.message_id,
                reason=_cut(reason, MAX_REASON_CHARS),
            )
        channel.basic_ack(tag)
